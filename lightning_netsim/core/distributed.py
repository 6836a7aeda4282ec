"""Collectives for sharded data: sums, and per-example results gathered in data order.

Every function is a no-op (or a local computation) when ``torch.distributed``
is not initialized. Under it, **every rank must call every function**, in the
same order: they are collectives.

How ranks hold their examples is described by a *shard spec*:

- ``None``: each rank holds a distinct, contiguous part of the data, in rank
  order (rank 0 first).
- an ``int`` ``N``: the layout of ``torch.utils.data.DistributedSampler`` without
  shuffling over a dataset of length ``N`` (what Lightning uses for
  validation): local example ``p`` of rank ``r`` is example ``p·W + r``, and
  positions ``>= N`` are the sampler's padding (repeats), counted zero times.
- a 1-D integer tensor: the global index of each local example, in iteration
  order; an index seen more than once (on any rank) counts once.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "ShardLayout",
    "ShardSpec",
    "all_gather_rows",
    "all_reduce_max",
    "all_reduce_sum",
    "gather_examples",
    "replicated",
    "world",
]

ShardSpec = Union[None, int, Tensor]

_REPLICATED: ContextVar[bool] = ContextVar("lightning_netsim_replicated", default=False)


@contextmanager
def replicated() -> Iterator[None]:
    """Treat the data as whole on every rank: inside, the statistics run no collectives.

    For callers that have gathered the data themselves (e.g. torchmetrics'
    state synchronization), so that each rank computes on all of it.

    Example:
        >>> with replicated():
        ...     world()
        (0, 1)
    """
    token = _REPLICATED.set(True)
    try:
        yield
    finally:
        _REPLICATED.reset(token)


def world() -> tuple[int, int]:
    """``(rank, world_size)``, or ``(0, 1)`` without an initialized process group.

    Example:
        >>> world()
        (0, 1)
    """
    if not _REPLICATED.get() and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum over ranks (a new tensor; the input is left alone)."""
    out = tensor.clone()
    if world()[1] > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_max(tensor: Tensor) -> Tensor:
    """Elementwise maximum over ranks (a new tensor)."""
    out = tensor.clone()
    if world()[1] > 1:
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out


def all_gather_rows(tensor: Tensor) -> list[Tensor]:
    """Every rank's tensor, in rank order; the leading sizes may differ between ranks."""
    _, size = world()
    if size == 1:
        return [tensor]
    n = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(n) for _ in range(size)]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded.contiguous())
    return [part[: int(s.item())] for part, s in zip(parts, sizes)]


class ShardLayout:
    """Where this rank's examples sit in the whole data set, from a shard spec.

    Use ``keep(start, n)`` during a sweep (which local examples count), then
    ``finish(n_local)`` once the sweep has counted them, then ``to_global`` and
    ``gather``. Construction and ``finish`` are collectives for some specs:
    call them on every rank.

    Example:
        >>> layout = ShardLayout(5, torch.device("cpu"))
        >>> layout.keep(0, 3).tolist()
        [True, True, True]
        >>> layout.finish(3); layout.gather(torch.tensor([1.0, 2.0, 3.0])).tolist()
        [1.0, 2.0, 3.0, 0.0, 0.0]
    """

    def __init__(self, spec: ShardSpec, device: torch.device) -> None:
        self.rank, self.size = world()
        self.device = device
        self.spec = spec
        self.total: Optional[int] = None
        self._index: Optional[Tensor] = None
        self._keep: Optional[Tensor] = None
        self._offset = 0
        if spec is None:
            return
        if isinstance(spec, int) and not isinstance(spec, bool):
            if spec < 1:
                raise ValueError(f"Expected the dataset length to be a positive integer, but got {spec}.")
            self.total = spec
            return
        if isinstance(spec, Tensor) and spec.ndim == 1 and not spec.is_floating_point():
            index = spec.to(device=device, dtype=torch.long)
            if (index < 0).any():
                raise ValueError("Expected non-negative global indices in the shard spec.")
            parts = all_gather_rows(index)
            offset = sum(int(t.shape[0]) for t in parts[: self.rank])
            self._index = index
            self._keep = _first_occurrence(torch.cat(parts))[offset : offset + index.numel()]
            return
        raise TypeError(
            "Expected a shard spec to be None, a dataset length (int) or a 1-D integer tensor of global "
            f"indices, but got {type(spec).__name__}."
        )

    def _positions(self, start: int, n: int) -> Tensor:
        return torch.arange(start, start + n, device=self.device)

    def keep(self, start: int, n: int) -> Tensor:
        """Mask of the local examples ``start .. start+n-1`` that count (not padding or repeats)."""
        if self._keep is not None:
            if start + n > self._keep.numel():
                raise ValueError(
                    f"The data holds more examples than the {self._keep.numel()} global indices given."
                )
            return self._keep[start : start + n]
        if self.total is not None:
            return self._positions(start, n) * self.size + self.rank < self.total
        return torch.ones(n, dtype=torch.bool, device=self.device)

    def finish(self, n_local: int) -> None:
        """Record how many local examples the sweep saw (a collective for the ``None`` spec)."""
        if self._index is not None and n_local != self._index.numel():
            raise ValueError(
                f"Expected one global index per local example ({n_local}), but got {self._index.numel()}."
            )
        if self.spec is None:
            counts = [int(t.shape[0]) for t in all_gather_rows(torch.zeros(n_local, 1, device=self.device))]
            self._offset = sum(counts[: self.rank])
            self.total = sum(counts)
        self.n_local = n_local

    def to_global(self, local: Tensor) -> Tensor:
        """Global indices of local positions."""
        if self._index is not None:
            return self._index[local]
        if self.spec is None:
            return local + self._offset
        return local * self.size + self.rank

    def gather(self, values: Tensor) -> Tensor:
        """Per-example results of every rank at their global index, each example once: ``(total, ...)``."""
        local = self._positions(0, values.shape[0])
        keep = self.keep(0, values.shape[0])
        return gather_examples(values, self.to_global(local), keep, self.total)


def _first_occurrence(index: Tensor) -> Tensor:
    """Mask of the first position of each distinct value."""
    _, inverse = torch.unique(index, return_inverse=True)
    positions = torch.arange(index.numel(), device=index.device)
    first = torch.full((int(inverse.max()) + 1,), index.numel(), device=index.device, dtype=torch.long)
    first = first.scatter_reduce(0, inverse, positions, reduce="amin")
    return first[inverse] == positions


def gather_examples(values: Tensor, index: Tensor, keep: Tensor, total: Optional[int]) -> Tensor:
    """Per-example results of every rank, placed at their global index (each example once).

    Args:
        values: ``(n_local, ...)`` results for the local examples.
        index: global index of each local example (from :func:`local_layout`).
        keep: which local examples count (from :func:`local_layout`).
        total: number of examples; default ``max index + 1``.

    Returns:
        ``(total, ...)``, the same on every rank.
    """
    all_values = torch.cat(all_gather_rows(values[keep]))
    all_index = torch.cat(all_gather_rows(index[keep]))
    total = int(all_index.max()) + 1 if total is None else total
    out = torch.zeros((total, *values.shape[1:]), dtype=values.dtype, device=values.device)
    out[all_index] = all_values
    return out
