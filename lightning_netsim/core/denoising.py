r"""Label-free statistics of the network's averaging: denoising factor and neighbor consistency.

With unnormalized blocks :math:`K_{ij} = J_i J_j^\top` over the reference set and
:math:`M_i = \sum_j K_{ij}^\top`, the network's prediction at :math:`x_i` behaves like
a kernel average of the reference labels with weights :math:`a_{ij} = K_{ij}^\top M_i^{-1}`:

.. math::

    D_i = \sum_j a_{ij} a_{ij}^\top, \qquad
    c_i = \Big\lVert y_i - \big(\textstyle\sum_j y_j^\top K_{ij}^\top\big) M_i^{-1} \Big\rVert .

For d = 1, :math:`D_i = \sum_j k_{ij}^2 / (\sum_j k_{ij})^2`. Labels with i.i.d.
noise of variance :math:`\sigma^2` leave about :math:`\sigma^2 \operatorname{tr}(D_i)/d`
after averaging; :math:`1/D_i` is an effective number of neighbors. The sums
over ``j`` include ``i`` itself when the reference is the data.
:math:`M_i^{-1}` is a pseudo-inverse (``torch.linalg.pinv``), so a degenerate
:math:`M_i` gives finite values.

Since :math:`M_i = T J_i^\top` with :math:`T = \sum_j J_j` and
:math:`\sum_j K_{ij} y_j = J_i u` with :math:`u = \sum_j J_j^\top y_j`, the
consistency is exact in linear time. The denoising factor needs every pair:
it is streamed over reference batches (exact), or, with ``sketch_dim``,
computed in linear time from a seeded random projection of the Jacobians.
"""

import math
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from lightning_netsim.core._sweep import Batches, check_same_d, checked_jacobian, streamed_pairs
from lightning_netsim.core.data import check_data
from lightning_netsim.core.distributed import ShardLayout, ShardSpec, all_reduce_sum
from lightning_netsim.core.jacobians import JacobianEngine, OutputFn, PreparedBatch, grad_mode_for_autograd
from lightning_netsim.core.parameters import ParamSelection

__all__ = ["denoising_factor", "neighbor_consistency", "predicted_noise"]

TargetFn = Callable[[Any], Tensor]


class _Setup:
    """Engine, layouts and batches shared by the two statistics."""

    def __init__(self, model: nn.Module, data: Any, reference: Any, options: dict[str, Any]) -> None:
        check_data(data, "data")
        if reference is not None:
            check_data(reference, "reference")
        self.engine = JacobianEngine(
            model, output_fn=options["output_fn"], params=options["params"], chunk_size=options["chunk_size"]
        )
        self.same = reference is None
        self.data_layout = ShardLayout(options["shard"], self.engine.device)
        ref_layout = self.data_layout if self.same else ShardLayout(options["reference_shard"], self.engine.device)
        self.data = Batches(self.engine, data, "data", self.data_layout)
        self.reference = self.data if self.same else Batches(self.engine, reference, "reference", ref_layout)


def _inverse(matrix: Tensor) -> Tensor:
    return torch.linalg.pinv(matrix)


def _targets(engine: JacobianEngine, batch: PreparedBatch, targets: Optional[TargetFn], d: int) -> Tensor:
    """``(B, d)`` targets: the model's outputs, or ``targets(batch)`` (integer labels one-hot when d > 1)."""
    if targets is None:
        return engine.outputs(batch)
    value = targets(batch.rebuild(batch.leaves))
    if not isinstance(value, Tensor) or value.shape[0] != batch.size:
        raise ValueError(
            f"Expected `targets(batch)` to return a tensor with {batch.size} rows (one per example), "
            f"but got {getattr(value, 'shape', type(value).__name__)}."
        )
    if not value.is_floating_point():
        if value.ndim != 1:
            raise ValueError("Expected integer targets to be class labels of shape [B].")
        value = nn.functional.one_hot(value.long(), d) if d > 1 else value[:, None]
    value = value.reshape(batch.size, -1).to(engine.dtype)
    if value.shape[1] != d:
        raise ValueError(f"Expected targets of dimension d = {d} (the outputs), but got {value.shape[1]}.")
    return value


def _reference_sums(setup: _Setup, targets: Optional[TargetFn], need_u: bool) -> tuple[Tensor, Optional[Tensor]]:
    """``T = Σ_j J_j`` (d, P) and ``u = Σ_j J_jᵀ y_j`` (P), over ranks, each example once."""
    total: Optional[Tensor] = None
    weighted: Optional[Tensor] = None
    for batch, keep, start in setup.reference:
        jac = checked_jacobian(setup.engine, batch, setup.reference.name, start)
        w = keep.to(jac.dtype)[:, None, None]
        part = (jac * w).sum(0)
        total = part if total is None else total + part
        if need_u:
            y = _targets(setup.engine, batch, targets, jac.shape[1])
            part_u = torch.einsum("bkp,bk->p", jac * w, y)
            weighted = part_u if weighted is None else weighted + part_u
    assert total is not None
    return all_reduce_sum(total), (all_reduce_sum(weighted) if weighted is not None else None)


def neighbor_consistency(
    model: nn.Module,
    data: Any,
    *,
    reference: Any = None,
    targets: Optional[TargetFn] = None,
    output_fn: Optional[OutputFn] = None,
    params: ParamSelection = None,
    chunk_size: Optional[int] = None,
    shard: ShardSpec = None,
    reference_shard: ShardSpec = None,
) -> Tensor:
    r"""How far each value is from the kernel average of its network-neighbors' values, exactly, in linear time.

    :math:`c_i = \lVert y_i - (J_i u)^\top M_i^{-1} \rVert` with :math:`u = \sum_j J_j^\top y_j`
    and :math:`M_i = T J_i^\top`. With the model's predictions (default) it
    measures how consistent the network is with itself; with labels it ranks
    examples whose label disagrees with their neighbors (candidate label noise).

    Args:
        targets: ``None`` for the model's outputs, or ``targets(batch) -> (B, d)``
            (or integer class labels ``(B,)``, one-hot encoded) applied to the
            batches of ``data`` and ``reference`` alike, e.g. ``lambda b: b[1]``.
        Other arguments as in :func:`soft_density`.

    Returns:
        ``(N,)`` consistency distances (0 = agrees with its neighbors).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))
        >>> neighbor_consistency(net, torch.randn(6, 2)).shape
        torch.Size([6])
    """
    setup = _Setup(model, data, reference, locals())
    with grad_mode_for_autograd():
        total, u = _reference_sums(setup, targets, need_u=True)
        assert u is not None
        out = []
        for batch, _, start in setup.data:
            jac = checked_jacobian(setup.engine, batch, "data", start)
            check_same_d(jac.shape[1], total.shape[0])
            m = total @ jac.mT  # M_i[m, k] = T_m · J_i,k
            average = ((jac @ u).unsqueeze(1) @ _inverse(m)).squeeze(1)
            y = _targets(setup.engine, batch, targets, jac.shape[1])
            out.append((y - average).norm(dim=1))
    return setup.data_layout.gather(torch.cat(out))


def denoising_factor(
    model: nn.Module,
    data: Any,
    *,
    reference: Any = None,
    full: bool = False,
    sketch_dim: Optional[int] = None,
    seed: int = 0,
    output_fn: Optional[OutputFn] = None,
    params: ParamSelection = None,
    chunk_size: Optional[int] = None,
    shard: ShardSpec = None,
    reference_shard: ShardSpec = None,
) -> Tensor:
    r"""Denoising factor :math:`D_i = \sum_j a_{ij} a_{ij}^\top`: how much label noise the network averages away.

    Exact by default (every pair, streamed: memory bounded by a batch, time
    quadratic). With ``sketch_dim = s``, the Jacobians are projected on ``s``
    seeded Gaussian directions (:math:`\tilde J = J R / \sqrt{s}`) and the pair
    sum becomes :math:`\sum_j \tilde J_j^\top \tilde J_j`-type moments: linear
    time, ``d²·s²`` memory, error shrinking like :math:`1/\sqrt{s}`. The
    projection uses its own generator; the global RNG is untouched.

    Args:
        full: return the ``(N, d, d)`` matrices instead of ``tr(D_i)/d``.
        sketch_dim: projection size ``s``; ``None`` for the exact computation.
        seed: seed of the projection.
        Other arguments as in :func:`soft_density`.

    Returns:
        ``(N,)`` (``tr(D_i)/d``) or ``(N, d, d)``.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))
        >>> denoising_factor(net, torch.randn(6, 2)).shape
        torch.Size([6])
    """
    if sketch_dim is not None and (not isinstance(sketch_dim, int) or sketch_dim < 1):
        raise ValueError(f"Expected `sketch_dim` to be a positive integer or None, but got {sketch_dim!r}.")
    setup = _Setup(model, data, reference, locals())
    engine = setup.engine
    with grad_mode_for_autograd():
        total, _ = _reference_sums(setup, None, need_u=False)
        d, p = total.shape

        def query_weights(jac: Tensor) -> Tensor:
            inv = _inverse(total @ jac.mT)  # M_i^{-1}
            return inv @ inv.mT  # Q_i

        if sketch_dim is None:
            parts = _exact_pairs(setup, query_weights, d)
        else:
            parts = _sketched(setup, query_weights, d, sketch_dim, seed)
    factor = setup.data_layout.gather(torch.cat(parts))
    return factor if full else factor.diagonal(dim1=1, dim2=2).sum(-1) / d


def _exact_pairs(setup: _Setup, query_weights: Callable[[Tensor], Tensor], d: int) -> list[Tensor]:
    engine = setup.engine
    p = engine.num_params

    def query_features(batch: PreparedBatch, start: int) -> Tensor:
        jac = checked_jacobian(engine, batch, "data", start)
        if jac.shape[1] != d:
            raise ValueError(f"Expected `data` and `reference` to give outputs of one dimension, but got d = {jac.shape[1]} and {d}.")
        return torch.cat([jac.flatten(1), query_weights(jac).flatten(1)], dim=1)

    def reference_features(batch: PreparedBatch, start: int) -> Tensor:
        return checked_jacobian(engine, batch, setup.reference.name, start).flatten(1)

    def accumulate(state: Tensor, q: Tensor, _qi: Tensor, r: Tensor, keep: Tensor, _ri: Tensor) -> Tensor:
        jq = q[:, : d * p].reshape(-1, d, p)
        weights = q[:, d * p :].reshape(-1, d, d)
        jr = r.reshape(-1, d, p) * keep.to(r.dtype)[:, None, None]
        blocks = torch.einsum("qkp,rmp->qrkm", jq, jr)  # K_ij[k, m]
        return state + torch.einsum("qrkm,qkl,qrln->qmn", blocks, weights, blocks)

    return streamed_pairs(
        setup.data,
        query_features,
        setup.reference,
        reference_features,
        accumulate,
        init=lambda rows: torch.zeros(rows, d, d, device=engine.device, dtype=engine.dtype),
        reduce=all_reduce_sum,
        take=lambda state, a, b: state[a:b],
    )


def _projection(num_params: int, sketch_dim: int, seed: int, like: Tensor) -> Tensor:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    proj = torch.randn(num_params, sketch_dim, generator=generator, dtype=torch.float64)
    return (proj / math.sqrt(sketch_dim)).to(device=like.device, dtype=like.dtype)


def _sketched(
    setup: _Setup, query_weights: Callable[[Tensor], Tensor], d: int, sketch_dim: int, seed: int
) -> list[Tensor]:
    engine = setup.engine
    proj: Optional[Tensor] = None
    moments: Optional[Tensor] = None
    for batch, keep, start in setup.reference:
        jac = checked_jacobian(engine, batch, setup.reference.name, start)
        proj = _projection(engine.num_params, sketch_dim, seed, jac) if proj is None else proj
        small = (jac @ proj) * keep.to(jac.dtype)[:, None, None]  # [B, d, s]
        part = torch.einsum("bmp,bnq->mnpq", small, small)
        moments = part if moments is None else moments + part
    assert moments is not None and proj is not None
    moments = all_reduce_sum(moments)
    out = []
    for batch, _, start in setup.data:
        jac = checked_jacobian(engine, batch, "data", start)
        small = jac @ proj
        weights = query_weights(jac)
        inner = torch.einsum("bkp,bkl,blq->bpq", small, weights, small)
        out.append(torch.einsum("bpq,mnpq->bmn", inner, moments))
    return out


def predicted_noise(denoising: Tensor, noise_std: float) -> Tensor:
    r"""Per-example noise left after the network's averaging: :math:`\sigma \sqrt{D_i}`.

    Args:
        denoising: ``tr(D_i)/d`` from :func:`denoising_factor` (``(N,)``).
        noise_std: the label-noise standard deviation :math:`\sigma` (per output).

    Example:
        >>> predicted_noise(torch.tensor([0.04, 0.25]), 2.0)
        tensor([0.4000, 1.0000])
    """
    if noise_std < 0:
        raise ValueError(f"Expected `noise_std` to be non-negative, but got {noise_std}.")
    return noise_std * denoising.clamp_min(0).sqrt()
