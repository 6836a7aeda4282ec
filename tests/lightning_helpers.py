"""A small Lightning classifier on generated data, and readers for TensorBoard event files."""

from pathlib import Path
from typing import Optional

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

NUM_CLASSES = 3


def blobs(n: int, seed: int = 0) -> TensorDataset:
    """Three Gaussian blobs in 4-D with integer labels."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % NUM_CLASSES
    centers = torch.randn(NUM_CLASSES, 4, generator=gen) * 2
    x = centers[labels] + torch.randn(n, 4, generator=gen)
    return TensorDataset(x, labels)


class Classifier(pl.LightningModule):
    def __init__(self, hidden: int = 16, dropout: float = 0.1, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(4, hidden), nn.Tanh(), nn.Dropout(dropout), nn.Linear(hidden, NUM_CLASSES)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class BlobData(pl.LightningDataModule):
    def __init__(self, n_train: int = 64, n_val: int = 101, batch_size: int = 16) -> None:
        super().__init__()
        self.n_train, self.n_val, self.batch_size = n_train, n_val, batch_size

    def train_dataloader(self):
        return DataLoader(blobs(self.n_train, seed=0), batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(blobs(self.n_val, seed=1), batch_size=self.batch_size)


def trainer_kwargs(tmp_path: Path, **overrides) -> dict:
    kwargs = dict(
        default_root_dir=str(tmp_path),
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=2,
        deterministic=True,
        log_every_n_steps=1,
    )
    kwargs.update(overrides)
    return kwargs


def read_events(log_dir: str | Path) -> tuple[dict[str, list[tuple[int, float]]], dict[str, list]]:
    """``(scalars, histograms)`` from the TensorBoard event files under ``log_dir``: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list[tuple[int, float]]] = {}
    histograms: dict[str, list] = {}
    for path in sorted(Path(log_dir).rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0})
        acc.Reload()
        tags = acc.Tags()
        for tag in tags.get("scalars", []):
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
        for tag in tags.get("histograms", []):
            histograms.setdefault(tag, []).extend(acc.Histograms(tag))
    return scalars, histograms


def val_tensor(n_val: int = 101, limit: Optional[int] = None) -> torch.Tensor:
    x = blobs(n_val, seed=1).tensors[0]
    return x if limit is None else x[:limit]


def image_blobs(n: int, seed: int = 0) -> TensorDataset:
    """1×8×8 images: a class template plus noise, with integer labels."""
    gen = torch.Generator().manual_seed(seed)
    templates = torch.randn(NUM_CLASSES, 1, 8, 8, generator=torch.Generator().manual_seed(42))
    labels = torch.arange(n) % NUM_CLASSES
    x = templates[labels] + 0.7 * torch.randn(n, 1, 8, 8, generator=gen)
    return TensorDataset(x, labels)


class ImageClassifier(Classifier):
    def __init__(self, lr: float = 0.05) -> None:
        super().__init__(lr=lr)
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(256, NUM_CLASSES))


class ImageData(BlobData):
    def train_dataloader(self):
        return DataLoader(image_blobs(self.n_train, seed=0), batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(image_blobs(self.n_val, seed=1), batch_size=self.batch_size)
