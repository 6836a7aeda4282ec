"""lightning_netsim: input similarity from the neural network perspective, for PyTorch Lightning.

Two inputs are similar for a network when a parameter change that moves the
output for one would move the output for the other as well (Charpiat et al.,
NeurIPS 2019).
"""

from lightning_netsim.__about__ import __version__
from lightning_netsim.callbacks import DenoisingMonitor, DensityMonitor, NeighborMonitor
from lightning_netsim.core.enforcement import pair_similarity, similarity_loss
from lightning_netsim.mixin import SimilarityMixin
from lightning_netsim.core.neighbors import class_similarity
from lightning_netsim.core import (
    counts_from_similarity,
    denoising_factor,
    gradient_kernel,
    influence,
    inverse_sqrt_psd,
    nearest_neighbors,
    neighbor_consistency,
    neighbor_counts,
    normalized_jacobian,
    normalizer,
    per_sample_jacobian,
    predicted_noise,
    select_parameters,
    similarity,
    soft_density,
)
from lightning_netsim.errors import UsageError

__all__ = [
    "DenoisingMonitor",
    "DensityMonitor",
    "NeighborMonitor",
    "SimilarityMixin",
    "UsageError",
    "__version__",
    "class_similarity",
    "counts_from_similarity",
    "denoising_factor",
    "gradient_kernel",
    "influence",
    "inverse_sqrt_psd",
    "nearest_neighbors",
    "neighbor_consistency",
    "neighbor_counts",
    "normalized_jacobian",
    "normalizer",
    "pair_similarity",
    "per_sample_jacobian",
    "predicted_noise",
    "select_parameters",
    "similarity",
    "similarity_loss",
    "soft_density",
]
