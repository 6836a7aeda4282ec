"""Which outputs the similarity is taken over: the full outputs, or a scalar projection for classifiers."""

from collections.abc import Callable
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from lightning_netsim.core.batch import Batch
from lightning_netsim.core.jacobians import OutputFn, default_output_fn

__all__ = [
    "OUTPUT_CHOICES",
    "OutputChoice",
    "PredictedOutput",
    "RandomProjection",
    "TargetOutput",
    "find_labels",
    "make_output_fn",
    "target_projection",
]

OUTPUT_CHOICES = ("full", "target", "predicted", "random")
OutputChoice = Union[str, Callable[[nn.Module, Any], Tensor]]
_LABEL_KEYS = ("y", "label", "labels", "target", "targets")


def find_labels(batch: Batch) -> Optional[Tensor]:
    """Integer labels ``(B,)`` of a batch, when it carries them.

    Found as the second element of a tuple / list batch, or under one of the
    keys ``y``, ``label``, ``labels``, ``target``, ``targets`` of a dict batch.

    Example:
        >>> find_labels((torch.zeros(3, 2), torch.tensor([0, 2, 1])))
        tensor([0, 2, 1])
        >>> find_labels((torch.zeros(3, 2), torch.zeros(3))) is None
        True
    """
    candidate: Any = None
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        candidate = batch[1]
    elif isinstance(batch, dict):
        candidate = next((batch[k] for k in _LABEL_KEYS if k in batch), None)
    if isinstance(candidate, Tensor) and candidate.ndim == 1 and not candidate.is_floating_point():
        if not candidate.is_complex() and candidate.dtype != torch.bool:
            return candidate
    return None


def target_projection(logits: Tensor, labels: Tensor) -> Tensor:
    r"""``(B,)``: :math:`z_y - \operatorname{mean}_{c \ne y} z_c`, the margin of the class ``y``.

    Example:
        >>> target_projection(torch.tensor([[3.0, 1.0, 0.0]]), torch.tensor([0]))
        tensor([2.5000])
    """
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(
            f"Expected logits of shape [B, C] with C >= 2 classes for a class projection, but got shape "
            f"{tuple(logits.shape)}. Fix: use `output=\"full\"` for regression outputs."
        )
    chosen = logits.gather(1, labels.long().reshape(-1, 1)).squeeze(1)
    return chosen - (logits.sum(1) - chosen) / (logits.shape[1] - 1)


def _logits(model: nn.Module, batch: Batch) -> Tensor:
    out = default_output_fn(model, batch)
    return out.reshape(out.shape[0], -1)


def make_output_fn(output: OutputChoice, *, seed: int = 0) -> Optional[OutputFn]:
    """An ``output_fn`` for a named choice, or the callable itself.

    - ``"full"``: every output of ``model(batch[0])`` (``None``: the default);
    - ``"target"``: :func:`target_projection` with the batch's labels (:func:`find_labels`);
    - ``"predicted"``: the same with the predicted class (argmax of the outputs);
    - ``"random"``: the outputs projected on a fixed random unit vector drawn
      from ``seed`` with its own generator (the global RNG is untouched);
    - a callable ``(model, batch) -> [B, d]``: used as is.

    Example:
        >>> fn = make_output_fn("predicted")
        >>> fn(nn.Linear(3, 4), torch.zeros(2, 3)).shape
        torch.Size([2])
    """
    if callable(output):
        return output
    if output not in OUTPUT_CHOICES:
        raise ValueError(f"Expected `output` to be one of {OUTPUT_CHOICES} or a callable, but got {output!r}.")
    if output == "full":
        return None
    if output == "target":
        return TargetOutput()
    if output == "predicted":
        return PredictedOutput()
    return RandomProjection(seed)


class TargetOutput:
    """``output_fn``: :func:`target_projection` of the outputs with the batch's labels (picklable)."""

    def __call__(self, model: nn.Module, batch: Batch) -> Tensor:
        labels = find_labels(batch)
        if labels is None:
            raise ValueError(
                "Expected `output=\"target\"` batches to carry integer labels (a tuple `(x, y)` or a "
                "dict with key 'y', 'label(s)' or 'target(s)'). Fix: use `output=\"predicted\"`."
            )
        return target_projection(_logits(model, batch), labels)


class PredictedOutput:
    """``output_fn``: :func:`target_projection` with the predicted class (picklable)."""

    def __call__(self, model: nn.Module, batch: Batch) -> Tensor:
        logits = _logits(model, batch)
        return target_projection(logits, logits.detach().argmax(1))


class RandomProjection:
    """``output_fn``: the outputs projected on a fixed random unit vector drawn from ``seed`` (picklable).

    The vector comes from its own generator: the global RNG is never touched.
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._directions: dict[tuple[int, torch.dtype, torch.device], Tensor] = {}

    def __call__(self, model: nn.Module, batch: Batch) -> Tensor:
        logits = _logits(model, batch)
        key = (logits.shape[1], logits.dtype, logits.device)
        if key not in self._directions:
            gen = torch.Generator().manual_seed(self.seed)
            v = torch.randn(logits.shape[1], generator=gen, dtype=torch.float64)
            self._directions[key] = (v / v.norm()).to(dtype=logits.dtype, device=logits.device)
        return logits @ self._directions[key]
