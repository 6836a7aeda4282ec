"""Batches as nested tensors: flatten to leaves, check the batch size, rebuild.

A *batch* is a tensor, or a (nested) tuple, list or dict whose tensors share
the leading batch dimension. Non-tensor leaves (strings, numbers, ``None``)
are carried along unchanged as constants.
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["Batch", "batch_size", "flatten_batch", "prepare_leaves"]

Batch = Any
"""A tensor, or a nested tuple / list / dict holding tensors."""

Rebuild = Callable[[Sequence[Tensor]], Batch]


def flatten_batch(batch: Batch) -> tuple[list[Tensor], Rebuild]:
    """Split a batch into its tensor leaves and a function that rebuilds it.

    Args:
        batch: a tensor or a nested tuple / list / dict of tensors.

    Returns:
        The tensor leaves in a fixed (depth-first) order, and ``rebuild`` which
        takes new leaves in the same order and returns a batch of the same
        structure, with the non-tensor leaves unchanged.

    Example:
        >>> leaves, rebuild = flatten_batch({"x": torch.zeros(2, 3), "y": (torch.ones(2), "tag")})
        >>> [tuple(t.shape) for t in leaves]
        [(2, 3), (2,)]
        >>> rebuild([t + 1 for t in leaves])["y"][1]
        'tag'
    """
    leaves: list[Tensor] = []
    builder = _flatten(batch, leaves)

    def rebuild(new_leaves: Sequence[Tensor]) -> Batch:
        return builder(iter(new_leaves))

    return leaves, rebuild


def _flatten(node: Any, leaves: list[Tensor]) -> Callable[[Any], Any]:
    if isinstance(node, Tensor):
        leaves.append(node)
        return lambda it: next(it)
    if isinstance(node, Mapping):
        keys = list(node.keys())
        children = [_flatten(node[k], leaves) for k in keys]
        kind = type(node) if type(node) is not dict else dict

        def build_map(it: Any) -> Any:
            values = {k: child(it) for k, child in zip(keys, children)}
            return values if kind is dict else _construct(kind, values)

        return build_map
    if isinstance(node, (tuple, list)):
        children = [_flatten(item, leaves) for item in node]
        if isinstance(node, tuple) and hasattr(node, "_fields"):  # namedtuple
            return lambda it: type(node)(*(child(it) for child in children))
        container = type(node) if type(node) in (tuple, list) else list
        return lambda it: container(child(it) for child in children)
    return lambda it: node


def _construct(kind: type, values: dict[Any, Any]) -> Any:
    try:
        return kind(values)
    except TypeError:  # a Mapping subclass without a dict constructor
        return values


def batch_size(leaves: Sequence[Tensor], *, name: str = "inputs") -> int:
    """Return the common leading size of the batch's tensors, or raise.

    Args:
        leaves: the tensor leaves of a batch (see :func:`flatten_batch`).
        name: the argument name to use in error messages.

    Raises:
        ValueError: no tensors, a 0-dimensional tensor, or different leading sizes.

    Example:
        >>> batch_size([torch.zeros(4, 2), torch.zeros(4)])
        4
    """
    if not leaves:
        raise ValueError(
            f"Expected argument `{name}` to be a tensor or a tuple/list/dict of tensors "
            "sharing the leading batch dimension, but it holds no tensor. "
            "Fix: pass the batch as tensors (e.g. `(x, y)`)."
        )
    scalars = [i for i, t in enumerate(leaves) if t.ndim == 0]
    if scalars:
        raise ValueError(
            f"Expected every tensor in `{name}` to have a leading batch dimension, but tensor "
            f"#{scalars[0]} is 0-dimensional, so the batch cannot be split per sample. "
            "Fix: give it a batch dimension (e.g. `t.expand(B)`) or pass it as a Python value."
        )
    sizes = [int(t.shape[0]) for t in leaves]
    if len(set(sizes)) != 1:
        shapes = ", ".join(str(tuple(t.shape)) for t in leaves)
        raise ValueError(
            f"Expected the tensors in `{name}` to share the leading batch dimension, but got "
            f"shapes {shapes}. Fix: pass only per-sample tensors in the batch."
        )
    if sizes[0] == 0:
        raise ValueError(f"Expected a non-empty batch in `{name}`, but its batch dimension is 0.")
    return sizes[0]


def prepare_leaves(leaves: Sequence[Tensor], device: torch.device) -> list[Tensor]:
    """Copy leaves onto ``device`` as normal (non-inference) tensors.

    Must be called under ``torch.inference_mode(False)``: cloning there turns
    tensors made under inference mode into tensors autograd can use, and
    guarantees the caller's tensors are never modified.
    """
    return [t.to(device=device, copy=True) for t in leaves]
