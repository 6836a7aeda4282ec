"""DenoisingMonitor: how much label noise the network averages away, and which labels disagree with their neighbors."""

from typing import Callable, Optional, Union

import pytorch_lightning as pl
import torch
from torch import Tensor

from lightning_netsim.callbacks._base import Kept, NetsimMonitor
from lightning_netsim.callbacks._render import as_images, markdown_table, neighbor_grid
from lightning_netsim.core.denoising import denoising_factor, neighbor_consistency
from lightning_netsim.core.outputs import find_labels

__all__ = ["DenoisingMonitor"]


class DenoisingMonitor(NetsimMonitor):
    r"""Log the denoising factor and the neighbor consistency of the validation examples.

    With :math:`D_i` the denoising factor (DESIGN §2.3; label noise of variance
    :math:`\sigma^2` leaves about :math:`\sigma^2 D_i` after the network's kernel
    averaging), each run logs:

    - ``<prefix>/denoising/mean``: mean of :math:`\operatorname{tr}(D_i)/d`;
    - ``<prefix>/denoising/effective_neighbors``: mean of :math:`d / \operatorname{tr}(D_i)`;
    - ``<prefix>/consistency/mean``: mean distance of each prediction from what its
      network-neighbors predict;
    - ``<prefix>/uncertainty/mean`` when ``noise_std`` is given: mean of
      :math:`\sigma \sqrt{\operatorname{tr}(D_i)/d}`;
    - histograms ``<prefix>/denoising`` and ``<prefix>/consistency``;
    - ``<prefix>/label_noise_candidates`` when batches carry labels and the outputs
      are the full class scores: the examples whose label disagrees most with their
      neighbors' labels (a text table, and an image strip for image inputs).

    Exact (quadratic in ``max_samples``) unless ``sketch_dim`` is set. Same rules
    as :class:`DensityMonitor`.

    Args:
        every_n_epochs, max_samples, output, params, prefix: as in :class:`DensityMonitor`.
        noise_std: the label-noise level σ, for the predicted uncertainty.
        num_candidates: rows of the label-noise table.
        sketch_dim: random-projection sketch of the Jacobians for the denoising factor.

    Example:
        >>> monitor = DenoisingMonitor(noise_std=2.0, max_samples=256)
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        max_samples: int = 512,
        noise_std: Optional[float] = None,
        num_candidates: int = 8,
        sketch_dim: Optional[int] = None,
        output: Union[str, Callable[..., Tensor]] = "full",
        params: Optional[list[str]] = None,
        prefix: str = "netsim",
    ) -> None:
        super().__init__(
            every_n_epochs=every_n_epochs, max_samples=max_samples, output=output, params=params, prefix=prefix
        )
        if noise_std is not None and (not isinstance(noise_std, (int, float)) or noise_std < 0):
            raise ValueError(f"Expected `noise_std` to be a number >= 0 or None, but got {noise_std!r}.")
        if not isinstance(num_candidates, int) or isinstance(num_candidates, bool) or num_candidates < 1:
            raise ValueError(f"Expected `num_candidates` to be an integer >= 1, but got {num_candidates!r}.")
        if sketch_dim is not None and (not isinstance(sketch_dim, int) or sketch_dim < 1):
            raise ValueError(f"Expected `sketch_dim` to be a positive integer or None, but got {sketch_dim!r}.")
        self.noise_std, self.num_candidates, self.sketch_dim = noise_std, num_candidates, sketch_dim
        self._kept: list[Kept] = []
        self.last_values: Optional[dict[str, Tensor]] = None  # the latest per-example values, for inspection

    def start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._kept = []

    def on_kept(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", kept: Kept) -> None:
        self._kept.append(kept)

    def finish(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        kept, self._kept = self._kept, []
        assert self._chosen is not None
        device = trainer.strategy.root_device
        options = self.core_options(pl_module)
        batches = [item.batch for item in kept]
        local_pos = torch.cat([self.compact(item.indices) for item in kept]) if kept else torch.zeros(0, dtype=torch.long, device=device)
        factor_full = denoising_factor(pl_module, batches, full=True, sketch_dim=self.sketch_dim, shard=local_pos, **options)
        d = factor_full.shape[-1]
        factor = factor_full.diagonal(dim1=-2, dim2=-1).sum(-1) / d
        consistency = neighbor_consistency(pl_module, batches, shard=local_pos, **options)
        has_labels = self.all_ranks(all(item.labels is not None for item in kept), device)
        by_labels = None
        if has_labels and self.output == "full":
            by_labels = neighbor_consistency(pl_module, batches, targets=find_labels, shard=local_pos, **options)
        self.last_values = {"denoising": factor.cpu(), "consistency": consistency.cpu()}
        positive = factor > 0
        scalars = {
            f"{self.prefix}/denoising/mean": float(factor.mean()),
            f"{self.prefix}/denoising/effective_neighbors": float((1 / factor[positive]).mean()) if positive.any() else 0.0,
            f"{self.prefix}/consistency/mean": float(consistency.mean()),
        }
        if self.noise_std is not None:
            scalars[f"{self.prefix}/uncertainty/mean"] = float((self.noise_std * factor.clamp_min(0).sqrt()).mean())
        self.log_scalars(trainer, scalars)
        step = trainer.global_step
        writers = self.tensorboards(trainer, "histograms and the label-noise table")
        for writer in writers:
            writer.add_histogram(f"{self.prefix}/denoising", factor.detach().cpu(), step)
            writer.add_histogram(f"{self.prefix}/consistency", consistency.detach().cpu(), step)
        if by_labels is not None:
            self.last_values["label_consistency"] = by_labels.cpu()
            worst = torch.argsort(by_labels, descending=True)[: self.num_candidates]
            examples = self.fetch(kept, worst.to(device))
            labels = find_labels(examples)
            rows = [
                [int(self._chosen[int(p)]), "" if labels is None else int(labels[j]), f"{float(by_labels[p]):.4f}", f"{float(factor[p]):.4f}"]
                for j, p in enumerate(worst.tolist())
            ]
            table = markdown_table(["index", "label", "label consistency (distance)", "denoising factor"], rows)
            images = as_images(examples)
            for writer in writers:
                writer.add_text(f"{self.prefix}/label_noise_candidates", table, step)
                if images is not None:
                    strip = neighbor_grid(images, images[:, None][:, :0], torch.zeros(len(images), 0), labels)
                    writer.add_image(f"{self.prefix}/label_noise_candidates", strip, step)
        self.flush(trainer)
