"""What the monitors share: configuration, the choice of examples, DDP bookkeeping and logging.

A monitor runs on the validation examples as they stream past
(``on_validation_batch_end``) and finishes at ``on_validation_epoch_end``.
Which examples it analyses is decided once per epoch, identically on every
rank: the ``max_samples`` smallest dataset indices that the validation
sampler yields, each counted once even when a ``DistributedSampler`` pads by
repeating examples. Results are gathered in dataset-index order, so they
equal a single-process run. Every rank runs every collective; only rank 0
writes to the loggers.
"""

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor

from lightning_netsim.core.batch import Batch, batch_size, flatten_batch
from lightning_netsim.core.distributed import all_gather_rows, all_reduce_max, world
from lightning_netsim.core.outputs import OUTPUT_CHOICES, find_labels, make_output_fn
from lightning_netsim.errors import UsageError

__all__ = ["Kept", "NetsimMonitor"]


@dataclass
class Kept:
    """Examples of one validation batch that a monitor analyses (already on their device, cloned)."""

    batch: Batch
    indices: Tensor  # (b,) dataset indices
    labels: Optional[Tensor]  # (b,) integer labels, when the batch carries them


class NetsimMonitor(Callback):
    """Base of the monitors. Subclasses implement :meth:`on_kept` and :meth:`finish`.

    Args:
        every_n_epochs: run on the validation of every n-th training epoch
            (``trainer.validate()`` always runs it).
        max_samples: at most this many validation examples per run (the ones
            with the smallest dataset indices).
        output: ``"full"``, ``"target"``, ``"predicted"``, ``"random"`` or a
            callable ``(module, batch) -> [B, d]``; see
            :func:`~lightning_netsim.core.outputs.make_output_fn`.
        params: names of parameters or submodules of the ``LightningModule``
            to take the similarity over; default every trainable parameter.
        prefix: tag prefix of everything logged.
    """

    def __init__(
        self,
        *,
        every_n_epochs: int = 1,
        max_samples: int = 1024,
        output: Union[str, Callable[..., Tensor]] = "full",
        params: Optional[list[str]] = None,
        prefix: str = "netsim",
    ) -> None:
        super().__init__()
        if not isinstance(every_n_epochs, int) or isinstance(every_n_epochs, bool) or every_n_epochs < 1:
            raise ValueError(f"Expected `every_n_epochs` to be an integer >= 1, but got {every_n_epochs!r}.")
        if not isinstance(max_samples, int) or isinstance(max_samples, bool) or max_samples < 2:
            raise ValueError(
                f"Expected `max_samples` to be an integer >= 2 (similarities need pairs), but got {max_samples!r}."
            )
        if not callable(output) and output not in OUTPUT_CHOICES:
            raise ValueError(
                f"Expected `output` to be one of {OUTPUT_CHOICES} or a callable (module, batch) -> [B, d], "
                f"but got {output!r}."
            )
        if params is not None and (isinstance(params, str) or not all(isinstance(p, str) for p in params)):
            raise ValueError(
                f"Expected `params` to be a list of parameter or submodule names, but got {params!r}. "
                "Fix: e.g. `params=['classifier']` or `params=['encoder.0.weight']`."
            )
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"Expected `prefix` to be a non-empty string, but got {prefix!r}.")
        self.every_n_epochs = every_n_epochs
        self.max_samples = max_samples
        self.output = output
        self.params = params
        self.prefix = prefix
        self.output_fn = make_output_fn(output)
        self.runs = 0
        self.last_epoch = -1
        self._active = False
        self._position = 0
        self._keep: Optional[Tensor] = None
        self._global: Optional[Tensor] = None
        self._chosen: Optional[Tensor] = None
        self._warned_tensorboard = False

    # ----------------------------------------------------------------- configuration

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if not trainer.loggers:
            raise UsageError(
                f"{type(self).__name__} logs to the trainer's loggers, but the trainer has none "
                "(`logger=False`). Fix: pass `logger=TensorBoardLogger(...)` to the Trainer, or remove the callback."
            )
        self.selection(pl_module)  # unknown names fail here, not in the middle of validation

    def selection(self, pl_module: torch.nn.Module) -> Optional[list[Any]]:
        """The ``params`` names resolved to parameter names and submodules of ``pl_module``."""
        if self.params is None:
            return None
        parameters, modules = dict(pl_module.named_parameters()), dict(pl_module.named_modules())
        resolved: list[Any] = []
        for name in self.params:
            if name in parameters:
                resolved.append(name)
            elif name in modules:
                resolved.append(modules[name])
            else:
                raise UsageError(
                    f"`params` names {name!r}, which is neither a parameter nor a submodule of "
                    f"{type(pl_module).__name__}. Parameters: {list(parameters)[:10]}..."
                )
        return resolved

    def core_options(self, pl_module: torch.nn.Module) -> dict[str, Any]:
        return {"output_fn": self.output_fn, "params": self.selection(pl_module)}

    # ----------------------------------------------------------------- schedule

    def _should_run(self, trainer: "pl.Trainer") -> bool:
        if trainer.sanity_checking:
            return False
        if trainer.state.fn != "fit":
            return True
        return (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def state_dict(self) -> dict[str, Any]:
        return {"runs": self.runs, "last_epoch": self.last_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.runs = int(state_dict.get("runs", 0))
        self.last_epoch = int(state_dict.get("last_epoch", -1))

    # ----------------------------------------------------------------- which examples

    def _plan(self, trainer: "pl.Trainer") -> None:
        """Decide, identically on every rank, which local positions of the validation stream are kept."""
        device = trainer.strategy.root_device
        rank, size = world()
        local = _sampler_indices(trainer.val_dataloaders)
        if local is None:  # no index information: positions, interleaved across ranks, are the indices
            count = min(_num_examples(trainer.val_dataloaders), self.max_samples)
            local = torch.arange(count) * size + rank
        local = local.to(device)
        parts = all_gather_rows(local)
        everything = torch.cat(parts)
        owner = torch.cat([torch.full((len(p),), r, device=device) for r, p in enumerate(parts)])
        # The first occurrence (in rank order, then position) of each index is the one that counts.
        order = torch.argsort(everything, stable=True)
        first = torch.ones_like(order, dtype=torch.bool)
        first[1:] = everything[order][1:] != everything[order][:-1]
        chosen = order[first][: self.max_samples]
        keep_all = torch.zeros_like(everything, dtype=torch.bool)
        keep_all[chosen] = True
        mine = owner == rank
        self._chosen = torch.sort(everything[chosen]).values  # dataset indices analysed, ascending
        self._keep = keep_all[mine]
        self._global = local
        self._position = 0

    def on_validation_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._active = self._should_run(trainer)
        if self._active:
            self._plan(trainer)
            self.start(trainer, pl_module)

    def on_validation_batch_end(
        self,
        trainer: "pl.Trainer",
        pl_module: "pl.LightningModule",
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self._active or dataloader_idx != 0:
            return
        assert self._keep is not None and self._global is not None
        leaves, rebuild = flatten_batch(batch)
        size = batch_size(leaves, name="batch")
        start, self._position = self._position, self._position + size
        keep = self._keep[start : start + size]
        if keep.numel() < size:  # more examples than the sampler announced: keep none of the extra
            keep = torch.cat([keep, keep.new_zeros(size - keep.numel())])
        if not keep.any():
            return
        rows = keep.nonzero().squeeze(1)
        with torch.inference_mode(False):
            kept_leaves = [t.index_select(0, rows.to(t.device)).clone() for t in leaves]
        kept = rebuild(kept_leaves)
        labels = find_labels(kept)
        self.on_kept(trainer, pl_module, Kept(kept, self._global[start : start + size][rows], labels))

    def on_validation_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not self._active:
            return
        self._active = False
        self.finish(trainer, pl_module)
        self.runs += 1
        self.last_epoch = trainer.current_epoch

    # ----------------------------------------------------------------- subclass hooks

    def start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Called on every rank when a run starts."""

    def on_kept(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", kept: Kept) -> None:
        """Called with the analysed examples of each validation batch (only ranks that have some)."""
        raise NotImplementedError

    def finish(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Called on every rank at the end of a run: finish, gather, log."""
        raise NotImplementedError

    # ----------------------------------------------------------------- results and logging

    def compact(self, indices: Tensor) -> Tensor:
        """Positions ``0 .. M-1`` of dataset indices among the analysed examples (the core's shard spec)."""
        assert self._chosen is not None
        return torch.searchsorted(self._chosen, indices.to(self._chosen.device))

    def fetch(self, kept: list[Kept], wanted: Tensor) -> Any:
        """The analysed examples at compact positions ``wanted`` (in that order), from whichever rank holds them.

        Every rank must call it, and every rank must hold at least one analysed example.
        """
        if not kept:
            raise ValueError(
                f"{type(self).__name__}: a process holds no analysed validation example. Fix: raise "
                "`max_samples` to at least the number of processes."
            )
        device = wanted.device
        leaves_per_item = [flatten_batch(item.batch) for item in kept]
        rebuild = leaves_per_item[0][1]
        positions = torch.cat([self.compact(item.indices).to(device) for item in kept])
        rows = torch.isin(positions, wanted).nonzero().squeeze(1)
        num_leaves = len(leaves_per_item[0][0])
        local = [torch.cat([leaves[i] for leaves, _ in leaves_per_item])[rows.to(leaves_per_item[0][0][i].device)] for i in range(num_leaves)]
        every_position = torch.cat(all_gather_rows(positions[rows]))
        gathered = [torch.cat(all_gather_rows(leaf)) for leaf in local]
        first = {}
        for j, p in enumerate(every_position.tolist()):
            first.setdefault(p, j)
        order = torch.tensor([first[int(p)] for p in wanted.tolist()], dtype=torch.long)
        return rebuild([leaf[order.to(leaf.device)] for leaf in gathered])

    @staticmethod
    def gather_ordered(indices: Tensor, *values: Tensor) -> tuple[Tensor, ...]:
        """All ranks' rows, sorted by dataset index: ``(indices, *values)``. Every rank must call it.

        A rank without rows passes empty tensors of the same dtype and trailing shape.
        """
        every = torch.cat(all_gather_rows(indices))
        order = torch.argsort(every)
        return (every[order], *(torch.cat(all_gather_rows(v))[order.to(v.device)] for v in values))

    @staticmethod
    def all_ranks(flag: bool, device: torch.device) -> bool:
        """Whether ``flag`` holds on every rank (a collective)."""
        return not bool(all_reduce_max(torch.tensor([0 if flag else 1], device=device)).item())

    def log_scalars(self, trainer: "pl.Trainer", scalars: dict[str, float]) -> None:
        """Send scalars to every logger at ``trainer.global_step`` (rank 0)."""
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(scalars, step=trainer.global_step)

    def tensorboards(self, trainer: "pl.Trainer", what: str) -> list[Any]:
        """The ``SummaryWriter`` of every TensorBoard logger (rank 0); warns once when there is none."""
        writers = [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not writers and not self._warned_tensorboard:
            self._warned_tensorboard = True
            rank_zero_warn(
                f"{type(self).__name__}: {what} need a TensorBoardLogger; only scalars are logged to "
                f"{[type(lg).__name__ for lg in trainer.loggers]}. Fix: add `TensorBoardLogger(...)` to the loggers."
            )
        return writers if trainer.is_global_zero else []

    def flush(self, trainer: "pl.Trainer") -> None:
        """Write TensorBoard events now (rank 0): a spawned process may end before the logger flushes."""
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.flush()

    def progress(self, trainer: "pl.Trainer", total: int, desc: str) -> Any:
        """Lightning's tqdm bar for an epoch-end sweep, or a no-op when bars are off or on other ranks."""
        if trainer.progress_bar_callback is None or not trainer.is_global_zero:
            return _NoBar()
        from pytorch_lightning.callbacks.progress.tqdm_progress import Tqdm

        return Tqdm(total=total, desc=f"{self.prefix}: {desc}", leave=False, dynamic_ncols=True)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _dataloader(loaders: Any) -> Any:
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    return loaders


def _sampler_indices(loaders: Any) -> Optional[Tensor]:
    """Dataset indices of the first validation loader's examples on this rank, in order, if known."""
    loader = _dataloader(loaders)
    if loader is None or not isinstance(getattr(loader, "dataset", None), torch.utils.data.Dataset):
        return None
    if isinstance(loader.dataset, torch.utils.data.IterableDataset):
        return None
    sampler = getattr(getattr(loader, "batch_sampler", None), "sampler", None) or getattr(loader, "sampler", None)
    if not isinstance(sampler, Iterable):
        return None
    indices = list(sampler)
    if not all(isinstance(i, int) for i in indices):
        return None
    return torch.tensor(indices, dtype=torch.long)


def _num_examples(loaders: Any) -> int:
    loader = _dataloader(loaders)
    try:
        return len(loader.dataset)  # type: ignore[union-attr]
    except (TypeError, AttributeError):
        return 1 << 62  # unknown length: the first max_samples positions of each rank are candidates
