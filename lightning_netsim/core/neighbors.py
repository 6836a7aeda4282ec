"""Retrieval: the reference examples the network sees as most similar to each query."""

from typing import Any, Optional

import torch
from torch import Tensor, nn

from lightning_netsim.core._sweep import Batches, checked_jacobian, streamed_pairs
from lightning_netsim.core.data import check_data
from lightning_netsim.core.distributed import ShardLayout, ShardSpec, all_gather_rows
from lightning_netsim.core.jacobians import JacobianEngine, OutputFn, grad_mode_for_autograd
from lightning_netsim.core.kernels import inverse_sqrt_psd
from lightning_netsim.core.parameters import ParamSelection

__all__ = ["nearest_neighbors"]


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
