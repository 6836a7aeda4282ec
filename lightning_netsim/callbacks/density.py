"""DensityMonitor: how many validation examples the network sees as similar to each one, in TensorBoard."""

from collections.abc import Iterable
from typing import Any, Callable, Optional, Union

import pytorch_lightning as pl
import torch
from torch import Tensor

from lightning_netsim.callbacks._base import Kept, NetsimMonitor
from lightning_netsim.core.data import check_data, iterate_batches
from lightning_netsim.core.density import DensityAccumulator
from lightning_netsim.core.distributed import replicated

__all__ = ["DensityMonitor", "density_summary"]


def density_summary(density: Tensor, labels: Optional[Tensor], prefix: str, unique_margin: float) -> dict[str, float]:
    """The scalars DensityMonitor logs for per-example densities ``(N,)`` (and optional labels).

    Example:
        >>> density_summary(torch.tensor([1.0, 2.0, 3.0, 10.0]), None, "netsim", 0.1)["netsim/density/mean"]
        4.0
    """
    values = density.double()
    q = torch.quantile(values, torch.tensor([0.1, 0.5, 0.9], dtype=values.dtype, device=values.device))
    scalars = {
        f"{prefix}/density/mean": float(values.mean()),
        f"{prefix}/density/p10": float(q[0]),
        f"{prefix}/density/p50": float(q[1]),
        f"{prefix}/density/p90": float(q[2]),
        f"{prefix}/density/unique_fraction": float((values < 1 + unique_margin).double().mean()),
    }
    if labels is not None:
        for c in torch.unique(labels).tolist():
            scalars[f"{prefix}/density/class_{c}"] = float(values[labels == c].mean())
    return scalars


class DensityMonitor(NetsimMonitor):
    r"""Log the network-perceived density of the validation examples to TensorBoard.

    The soft density :math:`n_i = \sum_j \rho_{ij}` of each analysed validation
    example (itself included, so an example the network sees as unique has
    :math:`n_i \approx 1`) is computed in linear time: sweep 1 runs on the
    validation batches as they stream past, sweep 2 at the end of the epoch over
    the kept examples. Logged at ``trainer.global_step``:

    - scalars ``<prefix>/density/mean``, ``p10``, ``p50``, ``p90`` and
      ``unique_fraction`` (density below ``1 + unique_margin``), and
      ``<prefix>/density/class_<c>`` when batches carry integer labels;
    - the histogram ``<prefix>/density`` (TensorBoard loggers only).

    Runs during ``fit`` validation and in ``trainer.validate()``, never in the
    sanity check; does not change training (no ``.grad``, modes, RNG or weights
    touched). Under DDP every example counts once and the values equal a
    single-process run.

    Args:
        every_n_epochs: run every n-th training epoch (``validate()`` always runs).
        max_samples: at most this many validation examples (smallest dataset indices).
        reference: ``None`` to count neighbors among the analysed validation
            examples themselves; or a re-iterable of batches (e.g. a ``DataLoader``
            over a subset of the training data) to count the reference examples
            the network sees as similar to each validation example.
        output: ``"full"`` (all outputs), ``"target"``, ``"predicted"``,
            ``"random"`` or a callable ``(module, batch) -> [B, d]``.
        params: parameter or submodule names; default all trainable parameters.
        prefix: tag prefix.
        unique_margin: examples with density below ``1 + unique_margin`` count as unique.

    Example:
        >>> from pytorch_lightning import Trainer
        >>> from pytorch_lightning.loggers import TensorBoardLogger
        >>> monitor = DensityMonitor(max_samples=512, output="target")
        >>> trainer = Trainer(callbacks=[monitor], logger=TensorBoardLogger("runs"))  # doctest: +SKIP
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        max_samples: int = 1024,
        reference: Optional[Iterable[Any]] = None,
        output: Union[str, Callable[..., Tensor]] = "full",
        params: Optional[list[str]] = None,
        prefix: str = "netsim",
        unique_margin: float = 0.1,
    ) -> None:
        super().__init__(
            every_n_epochs=every_n_epochs, max_samples=max_samples, output=output, params=params, prefix=prefix
        )
        if reference is not None:
            check_data(reference, "reference")
        if not isinstance(unique_margin, (int, float)) or unique_margin < 0:
            raise ValueError(f"Expected `unique_margin` to be a number >= 0, but got {unique_margin!r}.")
        self.reference = reference
        self.unique_margin = float(unique_margin)
        self._acc: Optional[DensityAccumulator] = None
        self._kept: list[tuple[Kept, Tensor]] = []

    def start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._acc = DensityAccumulator(pl_module, **self.core_options(pl_module))
        self._kept = []

    def on_kept(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", kept: Kept) -> None:
        assert self._acc is not None
        if self.reference is None:
            normalizers = self._acc.add(kept.batch, name="validation batch")  # sweep 1
        else:
            normalizers = self._acc.normalizers(kept.batch, name="validation batch")
        self._kept.append((kept, normalizers))

    def finish(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        acc, kept, self._acc, self._kept = self._acc, self._kept, None, []
        assert acc is not None
        if self.reference is not None:
            with replicated():  # every rank sweeps the whole reference: no sum over ranks
                for batch in iterate_batches(self.reference, "reference"):
                    acc.add(batch)
                acc.reduce()
        else:
            acc.reduce()  # sums S over ranks
        bar = self.progress(trainer, len(kept), "density")
        counts = []
        for item, normalizers in kept:  # sweep 2
            counts.append(acc.count(item.batch, normalizers, name="validation batch"))
            bar.update(1)
        bar.close()
        device = trainer.strategy.root_device
        indices = torch.cat([item.indices.to(device) for item, _ in kept] + [torch.zeros(0, dtype=torch.long, device=device)])
        density = torch.cat([c.to(device) for c in counts] + [torch.zeros(0, dtype=acc.engine.dtype, device=device)])
        has_labels = self.all_ranks(all(item.labels is not None for item, _ in kept), device)
        if has_labels:
            labels = torch.cat([item.labels.to(device) for item, _ in kept] + [indices.new_zeros(0)]).long()  # type: ignore[union-attr]
        else:
            labels = torch.zeros_like(indices)
        _, density, labels = self.gather_ordered(indices, density, labels)
        if density.numel() == 0:
            return
        scalars = density_summary(density, labels if has_labels else None, self.prefix, self.unique_margin)
        self.log_scalars(trainer, scalars)
        for writer in self.tensorboards(trainer, "histograms"):
            writer.add_histogram(f"{self.prefix}/density", density.detach().cpu(), trainer.global_step)
        self.flush(trainer)
