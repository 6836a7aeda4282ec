r"""How many examples the network sees as similar to each example.

Three counts over a reference set (default: the data itself):

- soft: :math:`n_i = \sum_j \rho_{ij}` (negative similarities count negatively; **includes**
  :math:`j = i`, which adds 1 when the reference is the data);
- hard: :math:`n_i = \#\{j \ne i : \rho_{ij} > t\}`;
- less-soft: :math:`n_i = \sum_{j \ne i} \max(\rho_{ij}, 0)^p`.

Hard and less-soft counts exclude the example itself (same global index).
"""

from typing import Any, Literal, Optional, get_args

import torch
from torch import Tensor, nn

from lightning_netsim.core._sweep import Batches, check_finite, check_same_d, checked_jacobian, streamed_pairs
from lightning_netsim.core.closed_form import LayerwiseKernels
from lightning_netsim.core.data import check_data
from lightning_netsim.core.distributed import ShardLayout, ShardSpec, all_reduce_max, all_reduce_sum
from lightning_netsim.core.jacobians import JacobianEngine, OutputFn, PreparedBatch, grad_mode_for_autograd
from lightning_netsim.core.kernels import inverse_sqrt_psd
from lightning_netsim.core.parameters import ParamSelection

__all__ = ["CountMethod", "DensityAccumulator", "counts_from_similarity", "neighbor_counts", "soft_density"]

CountMethod = Literal["hard", "less_soft"]
_METHODS: tuple[str, ...] = get_args(CountMethod)


def soft_density(
    model: nn.Module,
    data: Any,
    *,
    reference: Any = None,
    output_fn: Optional[OutputFn] = None,
    params: ParamSelection = None,
    chunk_size: Optional[int] = None,
    eps: Optional[float] = None,
    shard: ShardSpec = None,
    reference_shard: ShardSpec = None,
) -> Tensor:
    r"""Soft neighbor count :math:`n_i = \sum_j \rho_{ij}`, in time linear in the data.

    With :math:`S = \sum_j \hat J_j` over the reference, :math:`n_i = \langle \hat J_i, S \rangle_F / d`.
    Sweep 1 over the reference gets the :math:`d \times d` normalizers
    :math:`W_i = K_{ii}^{-1/2}` and :math:`S = \sum_i W_i J_i` (``d × P``) from
    one forward pass and one backward pass to the layer outputs per batch
    (all d rows at once), with closed forms per layer where they exist (see
    :mod:`lightning_netsim.core.closed_form`; other modules use ``torch.func``);
    sweep 2 gets :math:`J_i S_m` by forward-mode derivatives, vectorized over
    the d rows of ``S``. Never builds the ``N × N`` matrix nor the ``N × P``
    gradients; memory is one batch of activations plus ``d·P + N·d²``.

    Args:
        model: the network (eval-mode BatchNorm, no training-mode dropout).
        data: the examples to count neighbors for: a tensor / tuple / dict (one
            batch) or a re-iterable of batches (a ``DataLoader``, a list).
        reference: the examples counted as neighbors; default ``data``.
        output_fn: ``(model, batch) -> (B, d)``; see :func:`per_sample_jacobian`.
        params: parameter selection; see :func:`select_parameters`.
        chunk_size: examples per ``vmap`` chunk.
        eps: cut-off of the pseudo-inverse normalizers; see :func:`similarity`.
        shard: under ``torch.distributed``, how ranks hold ``data`` (see
            :mod:`lightning_netsim.core.distributed`); results are gathered in
            data order on every rank, each example once.
        reference_shard: the same for ``reference`` (default: ``shard`` when
            ``reference`` is ``None``).

    Returns:
        ``(N,)`` soft counts, including the example itself when ``reference`` is ``None``.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))
        >>> x = torch.randn(10, 2)
        >>> from lightning_netsim import per_sample_jacobian, similarity
        >>> rho = similarity(per_sample_jacobian(net, x))
        >>> torch.allclose(soft_density(net, x), rho.sum(1), atol=1e-4)
        True
    """
    check_data(data, "data")
    if reference is not None:
        check_data(reference, "reference")
    state = DensityAccumulator(model, output_fn=output_fn, params=params, chunk_size=chunk_size, eps=eps)
    same = reference is None
    data_layout = ShardLayout(shard, state.engine.device)
    ref_layout = data_layout if same else ShardLayout(reference_shard, state.engine.device)
    ref_batches = Batches(state.engine, data if same else reference, "data" if same else "reference", ref_layout)
    kept_normalizers: list[Tensor] = []
    with grad_mode_for_autograd():
        for batch, keep, start in ref_batches:
            w = state.add_prepared(batch, keep, name=ref_batches.name, start=start)
            if same:
                kept_normalizers.append(w)
        state.reduce()
        counts = []
        data_batches = ref_batches if same else Batches(state.engine, data, "data", data_layout)
        for i, (batch, _, start) in enumerate(data_batches):
            w = kept_normalizers[i] if same else None
            counts.append(state.count_prepared(batch, w, name="data", start=start))
    return data_layout.gather(torch.cat(counts))


class DensityAccumulator:
    r"""The two sweeps of :func:`soft_density`, one batch at a time, for callers that stream data.

    Sweep 1: :meth:`add` each reference batch (it returns the batch's
    normalizers :math:`W_i = K_{ii}^{-1/2}` for later); then :meth:`reduce`
    once (sums :math:`S` over ranks: a collective). Sweep 2: :meth:`count` each
    query batch, with its normalizers when they are known.

    Args:
        model, output_fn, params, chunk_size, eps: as in :func:`soft_density`.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> x = torch.randn(10, 2)
        >>> acc = DensityAccumulator(net)
        >>> ws = [acc.add(part) for part in x.split(4)]
        >>> acc.reduce()
        >>> n = torch.cat([acc.count(part, w) for part, w in zip(x.split(4), ws)])
        >>> torch.allclose(n, soft_density(net, x), atol=1e-5)
        True
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        output_fn: Optional[OutputFn] = None,
        params: ParamSelection = None,
        chunk_size: Optional[int] = None,
        eps: Optional[float] = None,
    ) -> None:
        self.engine = JacobianEngine(model, output_fn=output_fn, params=params, chunk_size=chunk_size)
        self.layers = LayerwiseKernels(self.engine)
        self.eps = eps
        self.total: Optional[Tensor] = None
        self.reduced = False

    def normalizers(self, batch: Any, *, name: str = "data", start: int = 0) -> Tensor:
        """``(B, d, d)`` normalizers of a batch, without adding it to the reference."""
        with grad_mode_for_autograd():
            prepared = self.engine.prepare(batch, name)
            out, kernel, _ = self.layers.compute(prepared)
        check_finite(out, name, start)
        check_finite(kernel, name, start)
        return inverse_sqrt_psd(kernel, self.eps)

    def add(self, batch: Any, keep: Optional[Tensor] = None, *, name: str = "reference", start: int = 0) -> Tensor:
        """Add a reference batch (the examples where ``keep`` is True) to :math:`S`; return its normalizers."""
        with grad_mode_for_autograd():
            return self.add_prepared(self.engine.prepare(batch, name), keep, name=name, start=start)

    def add_prepared(self, batch: PreparedBatch, keep: Optional[Tensor], *, name: str, start: int) -> Tensor:
        if self.reduced:
            raise RuntimeError("`DensityAccumulator.add` was called after `reduce`.")
        normalizers: list[Tensor] = []

        def weights(kernel: Tensor, rows: slice) -> Tensor:
            check_finite(kernel, name, start + rows.start)
            w = inverse_sqrt_psd(kernel, self.eps)
            normalizers.append(w)
            return w if keep is None else w * keep[rows].to(w.dtype)[:, None, None]

        with grad_mode_for_autograd():
            out, _, part = self.layers.compute(batch, weights)
        check_finite(out, name, start)
        assert part is not None
        if self.total is not None and part.shape[0] != self.total.shape[0]:
            check_same_d(part.shape[0], self.total.shape[0])
        self.total = part if self.total is None else self.total + part
        return torch.cat(normalizers)

    def reduce(self) -> None:
        """Sum :math:`S` over ranks (every rank must call it, with or without batches)."""
        local_d = 0 if self.total is None else self.total.shape[0]
        d = int(all_reduce_max(torch.tensor([local_d], device=self.engine.device)).item())
        if d == 0:
            raise ValueError("Expected at least one reference example, but no rank added any.")
        if self.total is None:
            self.total = torch.zeros(d, self.engine.num_params, device=self.engine.device, dtype=self.engine.dtype)
        self.total = all_reduce_sum(self.total)
        self.reduced = True

    def count(self, batch: Any, normalizers: Optional[Tensor] = None, *, name: str = "data", start: int = 0) -> Tensor:
        """``(B,)`` soft counts of a query batch against the reduced reference."""
        with grad_mode_for_autograd():
            return self.count_prepared(self.engine.prepare(batch, name), normalizers, name=name, start=start)

    def count_prepared(
        self, batch: PreparedBatch, normalizers: Optional[Tensor], *, name: str, start: int
    ) -> Tensor:
        if not self.reduced or self.total is None:
            raise RuntimeError("`DensityAccumulator.count` needs `reduce` first.")
        d = self.total.shape[0]
        if normalizers is None:
            with grad_mode_for_autograd():
                out, kernel, _ = self.layers.compute(batch)
            check_finite(out, name, start)
            check_finite(kernel, name, start)
            check_same_d(out.shape[1], d)
            normalizers = inverse_sqrt_psd(kernel, self.eps)
        directional = self.engine.jvp(batch, self.total)  # [d (rows m of S), B, d (outputs k)]
        return torch.einsum("bmk,mbk->b", normalizers, directional) / d


def counts_from_similarity(
    rho: Tensor,
    *,
    method: CountMethod = "hard",
    threshold: float = 0.9,
    power: float = 2.0,
    self_mask: Optional[Tensor] = None,
) -> Tensor:
    r"""Hard or less-soft neighbor counts from an explicit similarity matrix ``(N, M)``.

    Args:
        rho: similarities, e.g. from :func:`similarity`.
        method: ``"hard"`` counts :math:`\rho_{ij} > t`; ``"less_soft"`` sums
            :math:`\max(\rho_{ij}, 0)^p`.
        threshold: ``t`` of the hard count.
        power: ``p`` of the less-soft count.
        self_mask: ``(N, M)`` boolean, True where ``j`` is ``i`` itself (excluded);
            default the diagonal of a square matrix.

    Returns:
        ``(N,)`` counts.

    Example:
        >>> rho = torch.tensor([[1.0, 0.95, -0.5], [0.95, 1.0, 0.5], [-0.5, 0.5, 1.0]])
        >>> counts_from_similarity(rho)
        tensor([1., 1., 0.])
        >>> counts_from_similarity(rho, method="less_soft")
        tensor([0.9025, 1.1525, 0.2500])
    """
    if method not in _METHODS:
        raise ValueError(f"Expected `method` to be one of {_METHODS}, but got {method!r}.")
    if rho.ndim != 2:
        raise ValueError(f"Expected `rho` to be a 2D tensor of shape [N, M] but got shape {tuple(rho.shape)}.")
    if self_mask is None:
        if rho.shape[0] != rho.shape[1]:
            raise ValueError("Expected `self_mask` for a non-square `rho` (which entries are the example itself).")
        self_mask = torch.eye(rho.shape[0], dtype=torch.bool, device=rho.device)
    if method == "hard":
        values = (rho > threshold).to(rho.dtype)
    else:
        values = rho.clamp_min(0).pow(power)
    return values.masked_fill(self_mask, 0).sum(1)


def neighbor_counts(
    model: nn.Module,
    data: Any,
    *,
    reference: Any = None,
    method: CountMethod = "hard",
    threshold: float = 0.9,
    power: float = 2.0,
    output_fn: Optional[OutputFn] = None,
    params: ParamSelection = None,
    chunk_size: Optional[int] = None,
    eps: Optional[float] = None,
    shard: ShardSpec = None,
    reference_shard: ShardSpec = None,
) -> Tensor:
    r"""Hard (:math:`\#\{j \ne i: \rho_{ij} > t\}`) or less-soft neighbor counts, streamed.

    Exact: each block of normalized query Jacobians meets every reference
    batch in turn, so memory is bounded by a block and a batch (time is
    quadratic in the data, unlike :func:`soft_density`). The example itself
    (same global index) is excluded when ``reference`` is ``None``.

    Args:
        method: ``"hard"`` or ``"less_soft"``; see :func:`counts_from_similarity`.
        threshold: ``t`` of the hard count.
        power: ``p`` of the less-soft count.
        Other arguments as in :func:`soft_density`.

    Returns:
        ``(N,)`` counts.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))
        >>> neighbor_counts(net, torch.randn(6, 2), threshold=0.5).shape
        torch.Size([6])
    """
    if method not in _METHODS:
        raise ValueError(f"Expected `method` to be one of {_METHODS}, but got {method!r}.")
    check_data(data, "data")
    if reference is not None:
        check_data(reference, "reference")
    engine = JacobianEngine(model, output_fn=output_fn, params=params, chunk_size=chunk_size)
    same = reference is None
    data_layout = ShardLayout(shard, engine.device)
    ref_layout = data_layout if same else ShardLayout(reference_shard, engine.device)
    data_batches = Batches(engine, data, "data", data_layout)
    ref_batches = data_batches if same else Batches(engine, reference, "reference", ref_layout)

    def normalized(batch: Any, start: int) -> Tensor:
        jac = checked_jacobian(engine, batch, "data", start)
        return (inverse_sqrt_psd(jac @ jac.mT, eps) @ jac).flatten(1)

    def ref_normalized(batch: Any, start: int) -> Tensor:
        jac = checked_jacobian(engine, batch, ref_batches.name, start)
        return (inverse_sqrt_psd(jac @ jac.mT, eps) @ jac).flatten(1)

    def accumulate(state: Tensor, q: Tensor, q_index: Tensor, r: Tensor, keep: Tensor, r_index: Tensor) -> Tensor:
        if q.shape[1] != r.shape[1]:
            check_same_d(q.shape[1] // engine.num_params, r.shape[1] // engine.num_params)
        rho = (q @ r.T / (r.shape[1] // engine.num_params)).clamp(-1.0, 1.0)
        excluded = ~keep[None, :].expand_as(rho)
        if same:
            excluded = excluded | (q_index[:, None] == r_index[None, :])
        return state + counts_from_similarity(rho, method=method, threshold=threshold, power=power, self_mask=excluded)

    with grad_mode_for_autograd():
        parts = streamed_pairs(
            data_batches,
            normalized,
            ref_batches,
            ref_normalized,
            accumulate,
            init=lambda rows: torch.zeros(rows, device=engine.device, dtype=engine.dtype),
            reduce=all_reduce_sum,
            take=lambda state, a, b: state[a:b],
        )
    return data_layout.gather(torch.cat(parts))
