"""SimilarityMixin: a LightningModule that can pull known-similar examples together for the network."""

from typing import Any

import torch
from torch import Tensor

from lightning_netsim.core.enforcement import pair_similarity

__all__ = ["SimilarityMixin"]


class SimilarityMixin:
    r"""Add ``self.similarity_loss(inputs_a, inputs_b, **options)`` to a ``LightningModule``.

    The loss is :func:`~lightning_netsim.similarity_loss` on ``self``; each call
    logs ``netsim/similarity_loss`` and ``netsim/pair_similarity`` through
    ``self.log``. It is safe under DDP: every trainable parameter receives a
    gradient (zero where the loss does not depend on it), so DDP reduces all of
    them even when a step's loss is only the similarity term.

    Example:
        >>> import pytorch_lightning as pl
        >>> from torch import nn
        >>> class Net(SimilarityMixin, pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))
        ...     def forward(self, x):
        ...         return self.net(x)
        ...     def training_step(self, batch, batch_idx):
        ...         x, y = batch
        ...         x_aug = x + 0.1 * torch.randn_like(x)
        ...         task = nn.functional.cross_entropy(self(x), y)
        ...         return task + 0.5 * self.similarity_loss(x, x_aug, targets=y, output="target")
        ...     def configure_optimizers(self):
        ...         return torch.optim.SGD(self.parameters(), lr=0.1)
        >>> net = Net()
        >>> loss = net.similarity_loss(torch.randn(8, 4), torch.randn(8, 4), log=False)
        >>> 0 <= float(loss.detach()) <= 2
        True
    """

    def __init__(self) -> None:
        super().__init__()

    def similarity_loss(self, inputs_a: Any, inputs_b: Any, *, log: bool = True, **options: Any) -> Tensor:
        """``λ``-free similarity loss on ``self``; options as in :func:`~lightning_netsim.similarity_loss`.

        Args:
            inputs_a, inputs_b: paired inputs.
            log: log the loss and the mean pair similarity with ``self.log``.
            **options: ``output_fn``, ``targets``, ``output``, ``mode``, ``direction``, ``params``, ``eps``, ``seed``.
        """
        direction = options.pop("direction", "pull")
        if direction not in ("pull", "push"):
            raise ValueError(f"Expected `direction` to be 'pull' or 'push', but got {direction!r}.")
        rho = pair_similarity(self, inputs_a, inputs_b, **options)  # type: ignore[arg-type]
        loss = (1 - rho).mean() if direction == "pull" else rho.mean()
        trainable = [p for p in self.parameters() if p.requires_grad]  # type: ignore[attr-defined]
        if trainable:  # zero-weighted: every parameter gets a gradient, so DDP reduces them all
            loss = loss + 0.0 * torch.stack([p.reshape(-1)[0].to(loss.dtype) for p in trainable]).sum()
        if log:
            self.log("netsim/similarity_loss", loss.detach())  # type: ignore[attr-defined]
            self.log("netsim/pair_similarity", rho.detach().mean())  # type: ignore[attr-defined]
        return loss
