"""Retrieval: the reference examples the network sees as most similar to each query."""

from collections.abc import Callable
from typing import Any, Optional

import torch
from torch import Tensor, nn

from lightning_netsim.core._sweep import Batches, checked_jacobian, streamed_pairs
from lightning_netsim.core.data import check_data
from lightning_netsim.core.distributed import ShardLayout, ShardSpec, all_gather_rows
from lightning_netsim.core.jacobians import JacobianEngine, OutputFn, grad_mode_for_autograd
from lightning_netsim.core.kernels import inverse_sqrt_psd
from lightning_netsim.core.parameters import ParamSelection

__all__ = ["class_similarity", "nearest_neighbors"]


def nearest_neighbors(
    model: nn.Module,
    queries: Any,
    data: Any,
    *,
    k: int,
    output_fn: Optional[OutputFn] = None,
    params: ParamSelection = None,
    chunk_size: Optional[int] = None,
    eps: Optional[float] = None,
    shard: ShardSpec = None,
    query_shard: ShardSpec = None,
) -> tuple[Tensor, Tensor]:
    r"""Exact top-``k`` most similar examples of ``data`` for each query, streamed.

    Similarity is :math:`\rho` of :func:`similarity`. The normalized query
    Jacobians meet each batch of ``data`` in turn, keeping a running top-k, so
    memory is bounded by the queries and one batch. A query that is also in
    ``data`` finds itself first (:math:`\rho = 1`). Ties keep the lower index.

    Args:
        model: the network.
        queries: the query examples (a batch or a re-iterable of batches).
        data: the examples searched (a batch or a re-iterable of batches).
        k: neighbors per query; at most the number of examples in ``data``.
        shard: under ``torch.distributed``, how ranks hold ``data``; indices are global.
        query_shard: how ranks hold ``queries``; results are gathered in query order.
        Other arguments as in :func:`soft_density`.

    Returns:
        ``(similarities, indices)``, both ``(Q, k)``, most similar first;
        ``indices`` point into ``data`` in iteration order.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))
        >>> x = torch.randn(10, 2)
        >>> sims, idx = nearest_neighbors(net, x[:3], x, k=2)
        >>> idx[:, 0].tolist()
        [0, 1, 2]
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"Expected `k` to be a positive integer, but got {k!r}.")
    check_data(queries, "queries")
    check_data(data, "data")
    engine = JacobianEngine(model, output_fn=output_fn, params=params, chunk_size=chunk_size)
    query_layout = ShardLayout(query_shard, engine.device)
    data_layout = ShardLayout(shard, engine.device)
    query_batches = Batches(engine, queries, "queries", query_layout)
    data_batches = Batches(engine, data, "data", data_layout)
    data_batches.ensure_counted()
    if data_layout.total is not None and k > data_layout.total:
        raise ValueError(
            f"Expected `k` to be at most the number of examples in `data` ({data_layout.total}), but got {k}."
        )

    def features(batches: Batches) -> Any:
        def compute(batch: Any, start: int) -> Tensor:
            jac = checked_jacobian(engine, batch, batches.name, start)
            return (inverse_sqrt_psd(jac @ jac.mT, eps) @ jac).flatten(1)

        return compute

    def init(rows: int) -> tuple[Tensor, Tensor]:
        sims = torch.full((rows, 0), -torch.inf, device=engine.device, dtype=engine.dtype)
        return sims, torch.zeros((rows, 0), dtype=torch.long, device=engine.device)

    def accumulate(state: Any, q: Tensor, _q_index: Tensor, r: Tensor, keep: Tensor, r_index: Tensor) -> Any:
        if q.shape[1] != r.shape[1]:
            raise ValueError(
                "Expected `queries` and `data` to give outputs of one dimension, but their Jacobians "
                f"have {q.shape[1]} and {r.shape[1]} entries. Fix: use one `output_fn` for both."
            )
        d = r.shape[1] // engine.num_params
        rho = (q @ r.T / d).clamp(-1.0, 1.0).masked_fill(~keep[None, :], -torch.inf)
        return _merge(state, (rho, r_index.expand_as(rho)), k)

    def reduce(state: Any) -> Any:
        gathered_sims = all_gather_rows(state[0].T.contiguous())
        gathered_index = all_gather_rows(state[1].T.contiguous())
        if len(gathered_sims) == 1:
            return state
        merged = (torch.cat(gathered_sims).T, torch.cat(gathered_index).T)
        return _merge(init(state[0].shape[0]), merged, k)

    with grad_mode_for_autograd():
        parts = streamed_pairs(
            query_batches,
            features(query_batches),
            data_batches,
            features(data_batches),
            accumulate,
            init=init,
            reduce=reduce,
            take=lambda state, a, b: (state[0][a:b], state[1][a:b]),
        )
    sims = query_layout.gather(torch.cat([p[0] for p in parts]))
    index = query_layout.gather(torch.cat([p[1] for p in parts]))
    return sims, index


def _merge(state: tuple[Tensor, Tensor], new: tuple[Tensor, Tensor], k: int) -> tuple[Tensor, Tensor]:
    """Top-k of the union, ties broken by the lower index (deterministic across batchings)."""
    sims = torch.cat([state[0], new[0]], dim=1)
    index = torch.cat([state[1], new[1]], dim=1)
    order = torch.argsort(index, dim=1, stable=True)  # lower index first among equals
    sims, index = sims.gather(1, order), index.gather(1, order)
    top = torch.argsort(sims, dim=1, descending=True, stable=True)[:, : min(k, sims.shape[1])]
    return sims.gather(1, top), index.gather(1, top)


def class_similarity(
    model: nn.Module,
    data: Any,
    *,
    labels: Optional[Callable[[Any], Tensor]] = None,
    output_fn: Optional[OutputFn] = None,
    params: ParamSelection = None,
    chunk_size: Optional[int] = None,
    eps: Optional[float] = None,
    shard: ShardSpec = None,
) -> tuple[Tensor, Tensor]:
    r"""Mean similarity of same-class pairs and of different-class pairs, exactly, in linear time.

    With :math:`S_c = \sum_{i \in c} \hat J_i`, the sum of :math:`\rho_{ij}` over
    ordered pairs of class ``c`` is :math:`\lVert S_c \rVert_F^2 / d` minus the
    diagonal, so one sweep gives both means (pairs ``i ≠ j``) without the
    ``N × N`` matrix: how well the network's own notion of similarity separates
    the classes.

    Args:
        labels: ``labels(batch) -> (B,)`` integer classes; default the batch's
            labels (:func:`~lightning_netsim.core.outputs.find_labels`).
        Other arguments as in :func:`~lightning_netsim.soft_density`.

    Returns:
        ``(intra, inter)`` scalar tensors (NaN-free: 0 when a kind of pair is absent).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))
        >>> x, y = torch.randn(6, 2), torch.tensor([0, 0, 1, 1, 2, 2])
        >>> intra, inter = class_similarity(net, (x, y))
        >>> bool(-1 <= intra <= 1 and -1 <= inter <= 1)
        True
    """
    from lightning_netsim.core.closed_form import LayerwiseKernels
    from lightning_netsim.core.distributed import all_reduce_max, all_reduce_sum
    from lightning_netsim.core.outputs import find_labels

    check_data(data, "data")
    engine = JacobianEngine(model, output_fn=output_fn, params=params, chunk_size=chunk_size)
    layers = LayerwiseKernels(engine)
    batches = Batches(engine, data, "data", ShardLayout(shard, engine.device))
    get_labels = labels or (lambda batch: find_labels(batch))
    found = []
    for batch, _, _ in batches:
        y = get_labels(batch.rebuild(batch.leaves))
        if y is None:
            raise ValueError(
                "Expected integer labels in each batch (a tuple `(x, y)` or a dict with key 'y', 'label(s)' "
                "or 'target(s)'), or `labels=`. Fix: pass `labels=lambda batch: ...`."
            )
        found.append(int(y.max()))
    classes = int(all_reduce_max(torch.tensor([max(found) + 1], device=engine.device)).item())
    sums: Optional[Tensor] = None
    diagonal = torch.zeros((), device=engine.device, dtype=engine.dtype)
    counts = torch.zeros(classes, device=engine.device, dtype=engine.dtype)
    with grad_mode_for_autograd():
        for batch, keep, _ in batches:
            y = get_labels(batch.rebuild(batch.leaves)).to(engine.device).long()
            onehot = torch.nn.functional.one_hot(y, classes).to(engine.dtype) * keep.to(engine.dtype)[:, None]
            rho_ii: list[Tensor] = []

            def weights(kernel: Tensor, rows: slice, onehot: Tensor = onehot) -> Tensor:
                w = inverse_sqrt_psd(kernel, eps)
                d = w.shape[1]
                rho_ii.append(torch.einsum("bmk,bkl,bml->b", w, kernel, w) / d)
                return (onehot[rows, :, None, None] * w[:, None]).flatten(1, 2)  # (b, C·d, d)

            _, _, part = layers.compute(batch, weights)
            assert part is not None
            sums = part if sums is None else sums + part
            diagonal = diagonal + (torch.cat(rho_ii) * onehot.sum(1)).sum()
            counts = counts + onehot.sum(0)
    assert sums is not None
    sums, diagonal, counts = all_reduce_sum(sums), all_reduce_sum(diagonal), all_reduce_sum(counts)
    per_class = sums.reshape(classes, -1, sums.shape[1])  # (C, d, P)
    d = per_class.shape[1]
    same = per_class.square().sum() / d - diagonal
    everything = per_class.sum(0).square().sum() / d - diagonal
    same_pairs = (counts * (counts - 1)).sum()
    other_pairs = counts.sum() ** 2 - counts.square().sum()
    intra = same / same_pairs if same_pairs > 0 else same.new_zeros(())
    inter = (everything - same) / other_pairs if other_pairs > 0 else same.new_zeros(())
    return intra, inter
