"""torchmetrics wrappers over the core statistics: they keep the examples and call the core.

The statistics need two sweeps over the whole set, so the metrics retain the
inputs given to ``update`` (memory grows with the examples kept; bound it by
what you pass). torchmetrics gathers them across processes; ``compute`` then
runs the core on all of them on every rank, without further collectives.
Under a ``DistributedSampler`` that pads by repeating examples, pass each
example's dataset index as ``indices=`` and every example counts once, in
index order.
"""

from typing import Any, Optional

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from lightning_netsim.core.denoising import denoising_factor
from lightning_netsim.core.density import soft_density
from lightning_netsim.core.distributed import replicated
from lightning_netsim.core.jacobians import OutputFn
from lightning_netsim.core.parameters import ParamSelection

__all__ = ["DenoisingFactor", "SoftDensity"]


class _RetainedInputs(Metric):
    """Keeps the positional inputs of ``update`` (one list state per position) and optional indices."""

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(
        self,
        model: nn.Module,
        *,
        output_fn: Optional[OutputFn] = None,
        params: ParamSelection = None,
        chunk_size: Optional[int] = None,
        batch_size: int = 256,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not isinstance(model, nn.Module):
            raise TypeError(f"Expected `model` to be an nn.Module, but got {type(model).__name__}.")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"Expected `batch_size` to be a positive integer, but got {batch_size!r}.")
        # Held outside the module tree: the model must not become a child of its own metric.
        self._model_ref = (model,)
        self.options = dict(output_fn=output_fn, params=params, chunk_size=chunk_size)
        self.batch_size = batch_size
        self.num_inputs: Optional[int] = None
        self.add_state("indices", default=[], dist_reduce_fx="cat")

    @property
    def model(self) -> nn.Module:
        return self._model_ref[0]

    def update(self, *inputs: Tensor, indices: Optional[Tensor] = None) -> None:
        """Keep a batch.

        Args:
            *inputs: tensors sharing the leading batch dimension; ``output_fn``
                receives them as one tensor (one input) or a tuple.
            indices: optional ``(B,)`` dataset indices of the examples; repeated
                indices (a padded ``DistributedSampler``) count once.
        """
        if not inputs or not all(isinstance(t, Tensor) for t in inputs):
            raise TypeError("Expected `update` to receive one or more tensors, e.g. `metric.update(x)` or `(x, y)`.")
        if self.num_inputs is None:
            self.num_inputs = len(inputs)
            for i in range(len(inputs)):
                self.add_state(f"input_{i}", default=[], dist_reduce_fx="cat")
        if len(inputs) != self.num_inputs:
            raise ValueError(f"Expected {self.num_inputs} tensors in every `update` call, but got {len(inputs)}.")
        size = inputs[0].shape[0] if inputs[0].ndim else 0
        if any(t.ndim == 0 or t.shape[0] != size for t in inputs):
            raise ValueError(
                f"Expected the tensors of `update` to share the leading batch dimension, but got shapes "
                f"{[tuple(t.shape) for t in inputs]}."
            )
        if indices is not None:
            indices = torch.as_tensor(indices, device=inputs[0].device).reshape(-1).long()
            if indices.shape[0] != size:
                raise ValueError(f"Expected `indices` of shape ({size},), but got {tuple(indices.shape)}.")
            if len(getattr(self, "input_0")) > len(self.indices):  # type: ignore[arg-type]
                raise ValueError("Expected `indices` in every `update` call, but earlier calls had none.")
            self.indices.append(indices)  # type: ignore[union-attr]
        elif len(self.indices):  # type: ignore[arg-type]
            raise ValueError("Expected `indices` in every `update` call once it was given in one.")
        for i, t in enumerate(inputs):
            getattr(self, f"input_{i}").append(t.detach())

    def _batches(self) -> tuple[list[Any], Optional[Tensor]]:
        """The kept examples (deduplicated and in index order when indices were given) as batches."""
        if self.num_inputs is None:
            raise ValueError(f"`{type(self).__name__}.compute()` was called before any `update`.")
        columns = [_cat(getattr(self, f"input_{i}")) for i in range(self.num_inputs)]
        indices = _cat(self.indices) if len(self.indices) else None  # type: ignore[arg-type]
        if indices is not None:
            order = torch.argsort(indices, stable=True)
            first = torch.ones_like(order, dtype=torch.bool)
            first[1:] = indices[order][1:] != indices[order][:-1]
            keep = order[first]
            columns, indices = [c[keep.to(c.device)] for c in columns], indices[keep]
        batches = []
        for start in range(0, columns[0].shape[0], self.batch_size):
            parts = tuple(c[start : start + self.batch_size] for c in columns)
            batches.append(parts[0] if len(parts) == 1 else parts)
        return batches, indices


def _cat(state: Any) -> Tensor:
    """A list state before synchronization, or the tensor torchmetrics made of it after."""
    return torch.cat(state) if isinstance(state, list) else state


class SoftDensity(_RetainedInputs):
    r"""Soft neighbor count :math:`n_i = \sum_j \rho_{ij}` of every example kept by ``update``.

    Calls :func:`~lightning_netsim.soft_density` on the kept examples (each
    counts itself once). ``compute`` returns ``(N,)`` densities in the order of
    the ``update`` calls, or of ``indices`` when given.

    Args:
        model: the network (kept by reference, not as a submodule).
        reference: a fixed reference set (tensor or re-iterable of batches);
            default the kept examples themselves.
        output_fn, params, chunk_size: as in :func:`~lightning_netsim.per_sample_jacobian`.
        eps: cut-off of the pseudo-inverse normalizers.
        batch_size: examples per batch when sweeping the kept examples.
        **kwargs: passed to ``torchmetrics.Metric``.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))
        >>> metric = SoftDensity(net)
        >>> x = torch.randn(10, 2)
        >>> metric.update(x[:6]); metric.update(x[6:])
        >>> torch.allclose(metric.compute(), soft_density(net, x))
        True
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        reference: Any = None,
        output_fn: Optional[OutputFn] = None,
        params: ParamSelection = None,
        chunk_size: Optional[int] = None,
        eps: Optional[float] = None,
        batch_size: int = 256,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            model, output_fn=output_fn, params=params, chunk_size=chunk_size, batch_size=batch_size, **kwargs
        )
        self.reference = reference
        self.eps = eps

    def compute(self) -> Tensor:
        batches, _ = self._batches()
        with replicated():
            return soft_density(self.model, batches, reference=self.reference, eps=self.eps, **self.options)


class DenoisingFactor(_RetainedInputs):
    r"""Denoising factor :math:`\operatorname{tr}(D_i)/d` of every example kept by ``update``.

    Calls :func:`~lightning_netsim.denoising_factor` on the kept examples
    (quadratic in their number unless ``sketch_dim`` is set).

    Args:
        model: the network (kept by reference, not as a submodule).
        reference: a fixed reference set; default the kept examples.
        full: return ``(N, d, d)`` matrices :math:`D_i` instead of ``(N,)``.
        sketch_dim, seed: random-projection sketch of the Jacobians.
        output_fn, params, chunk_size: as in :func:`~lightning_netsim.per_sample_jacobian`.
        batch_size: examples per batch when sweeping the kept examples.
        **kwargs: passed to ``torchmetrics.Metric``.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))
        >>> metric = DenoisingFactor(net)
        >>> x = torch.randn(10, 2)
        >>> metric.update(x)
        >>> torch.allclose(metric.compute(), denoising_factor(net, x))
        True
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        reference: Any = None,
        full: bool = False,
        sketch_dim: Optional[int] = None,
        seed: int = 0,
        output_fn: Optional[OutputFn] = None,
        params: ParamSelection = None,
        chunk_size: Optional[int] = None,
        batch_size: int = 256,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            model, output_fn=output_fn, params=params, chunk_size=chunk_size, batch_size=batch_size, **kwargs
        )
        self.reference, self.full, self.sketch_dim, self.seed = reference, full, sketch_dim, seed

    def compute(self) -> Tensor:
        batches, _ = self._batches()
        with replicated():
            return denoising_factor(
                self.model,
                batches,
                reference=self.reference,
                full=self.full,
                sketch_dim=self.sketch_dim,
                seed=self.seed,
                **self.options,
            )
