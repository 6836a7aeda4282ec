"""Pure-torch core: per-sample Jacobians, kernels and similarity (no Lightning imports)."""

from lightning_netsim.core.batch import batch_size, flatten_batch
from lightning_netsim.core.denoising import denoising_factor, neighbor_consistency, predicted_noise
from lightning_netsim.core.density import counts_from_similarity, neighbor_counts, soft_density
from lightning_netsim.core.jacobians import OutputFn, default_output_fn, per_sample_jacobian
from lightning_netsim.core.kernels import (
    default_eps,
    gradient_kernel,
    influence,
    inverse_sqrt_psd,
    normalized_jacobian,
    normalizer,
    similarity,
)
from lightning_netsim.core.neighbors import nearest_neighbors
from lightning_netsim.core.parameters import ParamSelection, parameter_slices, select_parameters

__all__ = [
    "OutputFn",
    "ParamSelection",
    "batch_size",
    "counts_from_similarity",
    "default_eps",
    "default_output_fn",
    "denoising_factor",
    "flatten_batch",
    "gradient_kernel",
    "influence",
    "inverse_sqrt_psd",
    "nearest_neighbors",
    "neighbor_consistency",
    "neighbor_counts",
    "normalized_jacobian",
    "normalizer",
    "parameter_slices",
    "per_sample_jacobian",
    "predicted_noise",
    "select_parameters",
    "similarity",
    "soft_density",
]
