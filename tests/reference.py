"""Brute-force references in float64: per-sample autograd loops and explicit matrices.

Deliberately naive: one backward per sample and output, one matrix square root
per sample (scipy), so they share no code path with the library.
"""

import warnings
from collections.abc import Callable, Sequence

import numpy as np
import scipy.linalg
import torch
from torch import Tensor, nn


def loop_jacobian(
    model: nn.Module,
    samples: Sequence[object],
    output_fn: Callable[[nn.Module, object], Tensor],
    params: Sequence[nn.Parameter] | None = None,
) -> Tensor:
    """``[N, d, P]`` Jacobians from one ``autograd.grad`` call per sample and output.

    ``samples`` are batches of one example each.
    """
    params = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
    rows = []
    for sample in samples:
        out = output_fn(model, sample).reshape(-1)
        per_output = []
        for k in range(out.numel()):
            grads = torch.autograd.grad(out[k], params, retain_graph=True, allow_unused=True)
            per_output.append(
                torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)])
            )
        rows.append(torch.stack(per_output))
    return torch.stack(rows)


def pinv_sqrt(matrix: np.ndarray, rcond: float = 1e-12) -> np.ndarray:
    """Pseudo-inverse square root through scipy: ``pinv(sqrtm(K))`` for PSD ``K``."""
    with warnings.catch_warnings():  # singular on purpose in the rank-deficient tests
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        root = np.real(scipy.linalg.sqrtm(matrix))
    return np.linalg.pinv(root, rcond=rcond, hermitian=True)


def explicit_similarity(jac_a: Tensor, jac_b: Tensor | None = None) -> np.ndarray:
    """``rho_ij = tr(K_ii^{-1/2} K_ij K_jj^{-1/2}) / d`` pair by pair, with scipy's ``sqrtm`` and ``inv``."""
    a = jac_a.detach().double().numpy()
    b = a if jac_b is None else jac_b.detach().double().numpy()
    d = a.shape[1]
    wa = [np.linalg.inv(np.real(scipy.linalg.sqrtm(j @ j.T))) for j in a]
    wb = [np.linalg.inv(np.real(scipy.linalg.sqrtm(j @ j.T))) for j in b]
    out = np.empty((len(a), len(b)))
    for i in range(len(a)):
        for j in range(len(b)):
            out[i, j] = np.trace(wa[i] @ (a[i] @ b[j].T) @ wb[j]) / d
    return out


def explicit_blocks(jac_a: Tensor, jac_b: Tensor | None = None) -> np.ndarray:
    """``K_ij = J_i J_j^T`` pair by pair: ``[Na, Nb, d, d]``."""
    a = jac_a.detach().double().numpy()
    b = a if jac_b is None else jac_b.detach().double().numpy()
    return np.array([[a[i] @ b[j].T for j in range(len(b))] for i in range(len(a))])
