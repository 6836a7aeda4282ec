"""Data arguments of the statistics: one batch, or a re-iterable of batches."""

from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Union

from torch import Tensor
from torch.utils.data import Dataset

from lightning_netsim.core.batch import Batch

__all__ = ["Data", "check_data", "iterate_batches"]

Data = Union[Tensor, tuple, Mapping, Iterable[Batch]]
"""A tensor, tuple or dict (one batch), or a re-iterable of batches (a ``DataLoader``, a list)."""


def check_data(data: Any, name: str) -> Any:
    """Validate a data argument once, before the sweeps; returns it unchanged.

    Raises:
        TypeError: a one-shot iterator or generator (two sweeps are needed),
            a ``Dataset`` (not batched), or a non-iterable.

    Example:
        >>> check_data(iter([1]), "data")
        Traceback (most recent call last):
        ...
        TypeError: Expected argument `data` to be re-iterable (a DataLoader, a list of batches or one batch), but got a one-shot list_iterator. ...
    """
    if isinstance(data, (Tensor, tuple, Mapping)):
        return data
    if isinstance(data, Dataset) and not isinstance(data, Iterable):
        raise TypeError(
            f"Expected argument `{name}` to be batched, but got a {type(data).__name__} dataset. "
            "Fix: wrap it in a `torch.utils.data.DataLoader(dataset, batch_size=...)`."
        )
    if isinstance(data, Iterator):
        raise TypeError(
            f"Expected argument `{name}` to be re-iterable (a DataLoader, a list of batches or one batch), "
            f"but got a one-shot {type(data).__name__}. The statistics sweep the data more than once. "
            "Fix: pass `list(batches)` or the DataLoader itself."
        )
    if not isinstance(data, Iterable):
        raise TypeError(
            f"Expected argument `{name}` to be a tensor, a tuple/dict batch or a re-iterable of batches, "
            f"but got {type(data).__name__}."
        )
    return data


def iterate_batches(data: Any, name: str) -> Iterator[Batch]:
    """Yield the batches of a data argument (one batch for a tensor, tuple or dict).

    Raises:
        ValueError: the data holds no batch.
    """
    if isinstance(data, (Tensor, tuple, Mapping)):
        yield data
        return
    empty = True
    for batch in data:
        empty = False
        yield batch
    if empty:
        raise ValueError(f"Expected argument `{name}` to hold at least one batch, but it is empty.")
