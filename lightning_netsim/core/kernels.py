r"""Kernel blocks, normalizers and the network's similarity between inputs.

With per-sample Jacobians :math:`J_i \in \mathbb{R}^{d \times P}`:

.. math::

    K_{ij} = J_i J_j^\top, \qquad
    \hat J_i = K_{ii}^{-1/2} J_i, \qquad
    \rho_{ij} = \frac{1}{d} \operatorname{tr}\big(K_{ii}^{-1/2} K_{ij} K_{jj}^{-1/2}\big)
             = \frac{1}{d} \langle \hat J_i, \hat J_j \rangle_F .

Degenerate policy (one rule everywhere): :math:`K_{ii}^{-1/2}` is the
pseudo-inverse square root from a symmetric eigendecomposition, eigenvalues
at or below ``eps * lambda_max`` treated as zero. A sample whose Jacobian is
zero has similarity 0 with everything (and with itself). Results are never
NaN or inf for finite Jacobians.
"""

from typing import Literal, Optional, get_args

import torch
from torch import Tensor

__all__ = [
    "Reduction",
    "default_eps",
    "gradient_kernel",
    "influence",
    "inverse_sqrt_psd",
    "normalized_jacobian",
    "normalizer",
    "similarity",
]

Reduction = Literal["trace", "none"]
_REDUCTIONS: tuple[str, ...] = get_args(Reduction)


def default_eps(dtype: torch.dtype, d: int) -> float:
    """Relative eigenvalue cut-off of the pseudo-inverse policy: ``100 · d · machine epsilon``.

    Example:
        >>> default_eps(torch.float64, 1) < 1e-13
        True
    """
    return 100.0 * d * torch.finfo(dtype).eps


def _as_jacobian(jac: object, name: str) -> Tensor:
    if not isinstance(jac, Tensor):
        raise TypeError(f"Expected argument `{name}` to be a torch.Tensor, but got {type(jac).__name__}.")
    if not jac.is_floating_point():
        raise TypeError(
            f"Expected argument `{name}` to be a floating-point tensor, but got dtype {jac.dtype}. "
            "Fix: cast it, e.g. `jac.double()`."
        )
    if jac.ndim == 2:  # [N, P]: per-sample gradients of a scalar output
        return jac.unsqueeze(1)
    if jac.ndim != 3:
        raise ValueError(
            f"Expected argument `{name}` to be a 3D tensor of shape [N, d, P] (or 2D [N, P] for "
            f"d = 1) but got shape {tuple(jac.shape)}. Fix: use `per_sample_jacobian`'s output."
        )
    return jac


def _as_pair(jac_a: object, jac_b: object) -> tuple[Tensor, Optional[Tensor]]:
    a = _as_jacobian(jac_a, "jac_a")
    if jac_b is None:
        return a, None
    b = _as_jacobian(jac_b, "jac_b")
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(
            "Expected `jac_a` and `jac_b` to share d (outputs) and P (parameters), but got "
            f"[N, d, P] shapes {tuple(a.shape)} and {tuple(b.shape)}. Fix: compute both with the "
            "same model, `output_fn` and `params`."
        )
    if a.dtype != b.dtype or a.device != b.device:
        raise TypeError(
            f"Expected `jac_a` and `jac_b` on one dtype and device, but got {a.dtype} on {a.device} "
            f"and {b.dtype} on {b.device}. Fix: `jac_b = jac_b.to(jac_a)`."
        )
    return a, b


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"Expected `reduction` to be one of {_REDUCTIONS}, but got {reduction!r}.")


def gradient_kernel(jac_a: Tensor, jac_b: Optional[Tensor] = None) -> Tensor:
    r"""Unnormalized kernel blocks :math:`K_{ij} = J_i J_j^\top` (the empirical NTK).

    Args:
        jac_a: per-sample Jacobians ``(Na, d, P)`` (or ``(Na, P)`` for d = 1).
        jac_b: ``(Nb, d, P)``; default ``jac_a``.

    Returns:
        Tensor of shape ``(Na, Nb, d, d)``; block ``[i, j][m, n] = <J_i[m], J_j[n]>``.

    Example:
        >>> jac = torch.tensor([[[1.0, 0.0]], [[2.0, 1.0]]])
        >>> gradient_kernel(jac)[..., 0, 0]
        tensor([[1., 2.],
                [2., 5.]])
    """
    a, b = _as_pair(jac_a, jac_b)
    b = a if b is None else b
    (na, d, p), nb = a.shape, b.shape[0]
    flat = a.reshape(na * d, p) @ b.reshape(nb * d, p).T
    return flat.reshape(na, d, nb, d).permute(0, 2, 1, 3)


def _psd_power(gram: Tensor, power: float, eps: Optional[float]) -> Tensor:
    """``gram ** power`` on the kept eigenvalues (power < 0), zero on the others."""
    d = gram.shape[-1]
    eps = default_eps(gram.dtype, d) if eps is None else float(eps)
    if eps < 0:
        raise ValueError(f"Expected `eps` to be non-negative, but got {eps}.")
    tiny = torch.finfo(gram.dtype).tiny
    if d == 1:
        k = gram[..., 0, 0]
        return torch.where(k > 0, k.clamp_min(tiny).pow(power), torch.zeros_like(k))[..., None, None]
    sym = 0.5 * (gram + gram.mT)
    lam, vec = torch.linalg.eigh(sym)
    cut = eps * lam[..., -1:].clamp_min(0)
    scale = torch.where(lam > cut, lam.clamp_min(tiny).pow(power), torch.zeros_like(lam))
    return (vec * scale.unsqueeze(-2)) @ vec.mT


def inverse_sqrt_psd(gram: Tensor, eps: Optional[float] = None) -> Tensor:
    """Pseudo-inverse square root of symmetric positive semi-definite matrices ``(..., d, d)``.

    Eigenvalues at or below ``eps * lambda_max`` (default :func:`default_eps`)
    are treated as zero; a zero matrix maps to zero.

    Example:
        >>> inverse_sqrt_psd(torch.tensor([[[4.0, 0.0], [0.0, 0.0]]]))
        tensor([[[0.5000, 0.0000],
                 [0.0000, 0.0000]]])
    """
    return _psd_power(gram, -0.5, eps)


def normalizer(jac: Tensor, *, eps: Optional[float] = None) -> Tensor:
    r"""Per-sample normalizers :math:`W_i = K_{ii}^{-1/2}` with the pseudo-inverse policy.

    Args:
        jac: per-sample Jacobians ``(N, d, P)`` (or ``(N, P)`` for d = 1).
        eps: relative eigenvalue cut-off; default :func:`default_eps`.

    Returns:
        Tensor of shape ``(N, d, d)``, symmetric; zero for a zero Jacobian.

    Example:
        >>> normalizer(torch.tensor([[[3.0, 4.0]], [[0.0, 0.0]]]))
        tensor([[[0.2000]],
        <BLANKLINE>
                [[0.0000]]])
    """
    j = _as_jacobian(jac, "jac")
    return inverse_sqrt_psd(j @ j.mT, eps)


def normalized_jacobian(jac: Tensor, *, eps: Optional[float] = None) -> Tensor:
    r"""Normalized Jacobians :math:`\hat J_i = K_{ii}^{-1/2} J_i` (orthonormal rows), ``(N, d, P)``.

    Example:
        >>> normalized_jacobian(torch.tensor([[[3.0, 4.0]]]))
        tensor([[[0.6000, 0.8000]]])
    """
    j = _as_jacobian(jac, "jac")
    return normalizer(j, eps=eps) @ j


def _blocked_products(left: Tensor, right: Tensor, reduction: str, block_size: Optional[int], transform) -> Tensor:
    """Pairwise ``<transform(left_i), right_j>`` blocks, ``block_size`` rows of ``left`` at a time."""
    na, d, p = left.shape
    nb = right.shape[0]
    step = na if block_size is None else block_size
    if step < 1:
        raise ValueError(f"Expected `block_size` to be a positive integer or None, but got {block_size!r}.")
    parts = []
    for start in range(0, na, step):
        rows = transform(left[start : start + step])
        m = rows.shape[0]
        if reduction == "trace":
            parts.append(rows.reshape(m, d * p) @ right.reshape(nb, d * p).T / d)
        else:
            flat = rows.reshape(m * d, p) @ right.reshape(nb * d, p).T
            parts.append(flat.reshape(m, d, nb, d).permute(0, 2, 1, 3))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def similarity(
    jac_a: Tensor,
    jac_b: Optional[Tensor] = None,
    *,
    reduction: Reduction = "trace",
    eps: Optional[float] = None,
    block_size: Optional[int] = None,
) -> Tensor:
    r"""The network's similarity between inputs, from their per-sample Jacobians.

    .. math::

        \tilde K_{ij} = K_{ii}^{-1/2} K_{ij} K_{jj}^{-1/2} = \hat J_i \hat J_j^\top,
        \qquad \rho_{ij} = \operatorname{tr}(\tilde K_{ij}) / d .

    For d = 1 this is the cosine of the two gradients. Computed through the
    normalized Jacobians, ``block_size`` rows of ``jac_a`` at a time, so no
    ``Na * Nb * P`` intermediate is ever built. Symmetric when ``jac_b`` is
    ``None``; ``|rho| <= 1``; ``rho_ii = 1`` for full-rank ``K_ii`` (``rank/d``
    otherwise, 0 for a zero Jacobian).

    Args:
        jac_a: per-sample Jacobians ``(Na, d, P)`` (or ``(Na, P)`` for d = 1).
        jac_b: ``(Nb, d, P)``; default ``jac_a``.
        reduction: ``"trace"`` for the scalar similarity ``(Na, Nb)``;
            ``"none"`` for the normalized blocks ``(Na, Nb, d, d)``.
        eps: relative eigenvalue cut-off of the pseudo-inverse; default :func:`default_eps`.
        block_size: rows of ``jac_a`` normalized and multiplied at once; default all.

    Returns:
        ``(Na, Nb)`` for ``"trace"``, ``(Na, Nb, d, d)`` for ``"none"``.

    Example:
        >>> g = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, -2.0]])
        >>> similarity(g)
        tensor([[ 1.0000,  0.7071,  0.0000],
                [ 0.7071,  1.0000, -0.7071],
                [ 0.0000, -0.7071,  1.0000]])
    """
    _check_reduction(reduction)
    a, b = _as_pair(jac_a, jac_b)
    right = normalized_jacobian(a if b is None else b, eps=eps)
    if b is None and (block_size is None or block_size >= a.shape[0]):
        left_transform = lambda rows: right  # noqa: E731 - reuse the normalized copy
    else:
        left_transform = lambda rows: normalized_jacobian(rows, eps=eps)  # noqa: E731
    rho = _blocked_products(a, right, reduction, block_size, left_transform)
    if b is None:  # exact symmetry despite rounding
        rho = 0.5 * (rho + (rho.mT if reduction == "trace" else rho.permute(1, 0, 3, 2)))
    return rho.clamp(-1.0, 1.0) if reduction == "trace" else rho


def influence(
    jac_a: Tensor,
    jac_b: Optional[Tensor] = None,
    *,
    reduction: Reduction = "trace",
    eps: Optional[float] = None,
    block_size: Optional[int] = None,
) -> Tensor:
    r"""Asymmetric influence: how much a step that moves :math:`f(x_i)` moves :math:`f(x_j)`.

    .. math::

        k^C_{ij} = K_{ii}^{+} K_{ij}, \qquad \text{for } d = 1:\;
        k^C(x_i, x_j) = \frac{g_i \cdot g_j}{\lVert g_i \rVert^2}.

    Not symmetric and not bounded by 1; :func:`similarity` is the default
    notion everywhere else. Same arguments and shapes as :func:`similarity`.

    Example:
        >>> influence(torch.tensor([[1.0, 0.0], [2.0, 2.0]]))
        tensor([[1.0000, 2.0000],
                [0.2500, 1.0000]])
    """
    _check_reduction(reduction)
    a, b = _as_pair(jac_a, jac_b)
    right = a if b is None else b

    def transform(rows: Tensor) -> Tensor:
        return _psd_power(rows @ rows.mT, -1.0, eps) @ rows

    return _blocked_products(a, right, reduction, block_size, transform)
