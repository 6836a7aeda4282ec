"""lightning_netsim: input similarity from the neural network perspective, for PyTorch Lightning.

Two inputs are similar for a network when a parameter change that moves the
output for one would move the output for the other as well (Charpiat et al.,
NeurIPS 2019).
"""

from lightning_netsim.__about__ import __version__
from lightning_netsim.core import (
    gradient_kernel,
    influence,
    inverse_sqrt_psd,
    normalized_jacobian,
    normalizer,
    per_sample_jacobian,
    select_parameters,
    similarity,
)
from lightning_netsim.errors import UsageError

__all__ = [
    "UsageError",
    "__version__",
    "gradient_kernel",
    "influence",
    "inverse_sqrt_psd",
    "normalized_jacobian",
    "normalizer",
    "per_sample_jacobian",
    "select_parameters",
    "similarity",
]
