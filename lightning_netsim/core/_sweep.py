"""Sweeps over data shared by the statistics: per-batch Jacobians, and streamed pairs."""

from collections.abc import Callable, Iterator
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_netsim.core.batch import batch_size, flatten_batch
from lightning_netsim.core.data import iterate_batches
from lightning_netsim.core.distributed import ShardLayout, all_gather_rows, world
from lightning_netsim.core.jacobians import JacobianEngine, PreparedBatch

__all__ = ["Batches", "check_finite", "checked_jacobian", "streamed_pairs"]


class Batches:
    """Iterate a data argument as prepared batches with their keep-masks and positions."""

    def __init__(self, engine: JacobianEngine, data: Any, name: str, layout: ShardLayout) -> None:
        self.engine, self.data, self.name, self.layout = engine, data, name, layout
        self.count: Optional[int] = None
        self.num_batches = 0

    def ensure_counted(self) -> None:
        """Count the examples (without computing anything) so global indices are known."""
        if self.count is None:
            start = batches = 0
            for raw in iterate_batches(self.data, self.name):
                start += batch_size(flatten_batch(raw)[0], name=self.name)
                batches += 1
            self.count, self.num_batches = start, batches
            self.layout.finish(start)

    def __iter__(self) -> Iterator[tuple[PreparedBatch, Tensor, int]]:
        start = batches = 0
        for raw in iterate_batches(self.data, self.name):
            batch = self.engine.prepare(raw, self.name)
            yield batch, self.layout.keep(start, batch.size), start
            start += batch.size
            batches += 1
        if self.count is None:
            self.count, self.num_batches = start, batches
            self.layout.finish(start)
        elif self.count != start:
            raise ValueError(
                f"Argument `{self.name}` yielded {start} examples on this sweep but {self.count} on the "
                "previous one. Fix: pass data that iterates identically every time (no shuffling)."
            )


def check_same_d(d_data: int, d_ref: int) -> None:
    """Refuse data and reference whose outputs have different dimensions."""
    if d_data != d_ref:
        raise ValueError(
            f"Expected `data` and `reference` to give outputs of one dimension, but got d = {d_data} "
            f"and d = {d_ref}. Fix: use the same `output_fn` for both (and the same kind of batch)."
        )


def check_finite(values: Tensor, name: str, start: int) -> None:
    """Refuse per-sample values ``(B, ...)`` (outputs, Jacobians, kernels) that are not finite."""
    bad = (~torch.isfinite(values)).flatten(1).any(1)
    if bad.any():
        first = int(bad.nonzero()[0])
        raise ValueError(
            f"Non-finite outputs or Jacobian for example #{start + first} of `{name}` (position in "
            "iteration order on this rank). Fix: check that input and the model's numerics."
        )


def checked_jacobian(engine: JacobianEngine, batch: PreparedBatch, name: str, start: int) -> Tensor:
    """Per-sample Jacobians of a batch, refusing non-finite values with the example's position."""
    jac = engine.jacobian(batch)
    check_finite(jac, name, start)
    return jac


def _rounds(local_count: int, device: torch.device) -> int:
    count = torch.tensor([local_count], device=device)
    if world()[1] > 1:
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return int(count.item())


Features = Callable[[PreparedBatch, int], Tensor]


def streamed_pairs(
    queries: Batches,
    query_features: Features,
    reference: Batches,
    reference_features: Features,
    accumulate: Callable[[Any, Tensor, Tensor, Tensor, Tensor, Tensor], Any],
    init: Callable[[int], Any],
    reduce: Callable[[Any], Any],
    take: Callable[[Any, int, int], Any],
) -> list[Any]:
    """Stream every (query batch, reference batch) pair, across ranks.

    Round by round, the ranks exchange the features of their next query
    batch; each streams its reference shard against all of them, and
    ``reduce`` combines the partial results over ranks; each rank keeps the
    rows of its own batch. Memory is bounded by one gathered query block and
    one reference batch; the reference is swept once per round.

    Args:
        queries: the query batches (this rank's shard).
        query_features: ``(batch, start) -> (B, F)``.
        reference: the reference batches (this rank's shard).
        reference_features: ``(batch, start) -> (B_r, F_r)``.
        accumulate: ``(state, q_feats, q_index, r_feats, r_keep, r_index) -> state``,
            with global indices of the queries and the reference examples.
        init: ``rows -> state`` for a gathered block of ``rows`` queries.
        reduce: combine a state over ranks (every rank calls it).
        take: ``(state, start, stop) -> rows`` of this rank's part of the block.

    Returns:
        One result per local query batch, in order.
    """
    device = reference.engine.device
    rank = world()[0]
    queries.ensure_counted()
    reference.ensure_counted()
    results = []
    local = iter(queries)
    empty = torch.zeros(0, device=device, dtype=reference.engine.dtype)
    for _ in range(_rounds(queries.num_batches, device)):
        item = next(local, None)
        if item is None:
            feats, index = None, torch.zeros(0, dtype=torch.long, device=device)
        else:
            batch, _, start = item
            feats = query_features(batch, start)
            index = queries.layout.to_global(torch.arange(start, start + batch.size, device=device))
        width = _agreed_width(0 if feats is None else feats.shape[1], device)
        parts = all_gather_rows(feats if feats is not None else empty.new_zeros(0, width))
        block, block_index = torch.cat(parts), torch.cat(all_gather_rows(index))
        state = init(block.shape[0])
        for ref_batch, keep, ref_start in reference:
            ref_feats = reference_features(ref_batch, ref_start)
            ref_index = reference.layout.to_global(torch.arange(ref_start, ref_start + ref_batch.size, device=device))
            state = accumulate(state, block, block_index, ref_feats, keep, ref_index)
        state = reduce(state)
        if feats is not None:
            offset = sum(int(p.shape[0]) for p in parts[:rank])
            results.append(take(state, offset, offset + feats.shape[0]))
    return results


def _agreed_width(width: int, device: torch.device) -> int:
    """The feature width of the ranks that have a query batch this round."""
    value = torch.tensor([width], device=device)
    if world()[1] > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value.item())
