"""Fit time with and without DensityMonitor (default settings, and d = 1), as ratios from one run.

A small CNN on 1×16×16 inputs, 2,000 training and 1,000 validation examples,
batch 100, 3 epochs (validation after each). Both runs are timed side by side,
repeats interleaved. Run: ``python benchmarks/callback_overhead.py [--repeats 3]``.
"""

import argparse
import sys
from pathlib import Path
import tempfile

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import describe_machine, small_cnn, time_side_by_side  # noqa: E402

from lightning_netsim import DensityMonitor  # noqa: E402


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = small_cnn(10)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def data(n: int, seed: int) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 1, 16, 16, generator=gen), torch.randint(0, 10, (n,), generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=100)


def fit(callbacks: list, root: str) -> None:
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        max_epochs=3,
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
        logger=TensorBoardLogger(root),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(Net(), data(2000, 0), data(1000, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    root = tempfile.mkdtemp()
    t = time_side_by_side(
        {
            "plain": lambda: fit([], root),
            "default": lambda: fit([DensityMonitor()], root),
            "target": lambda: fit([DensityMonitor(output="target")], root),
        },
        args.repeats,
    )
    print(f"fit, 3 epochs, 2000 train / 1000 val examples, 10 classes ({describe_machine()})")
    print(f"plain fit {t['plain']:.2f} s")
    print(f"with DensityMonitor() (d = 10 outputs): {t['default']:.2f} s, ratio {t['default'] / t['plain']:.2f}")
    print(f"with DensityMonitor(output='target') (d = 1): {t['target']:.2f} s, ratio {t['target'] / t['plain']:.2f}")


if __name__ == "__main__":
    main()
