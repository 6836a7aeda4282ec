"""A network trained on very noisy labels becomes far more accurate than its labels (the paper's headline).

Synthetic multimodal registration: each example is a pair of 16×16 images of one
scene (a few Gaussian blobs) in two modalities: the scene itself, and a
non-monotone intensity map (4v(1.2 − v)) of a copy shifted by a sub-pixel
displacement in [−3, 3]² px. The target is that displacement; the training
labels carry Gaussian noise (σ = 2 px per axis by default). A small CNN
regresses the displacement with Lightning, with DensityMonitor, DenoisingMonitor
and NeighborMonitor writing to TensorBoard under ``runs/``.

At the end it prints the label-noise RMS, the network's RMSE against the true
displacements, their ratio, the mean denoising factor of test examples against
the training set, the error it predicts (σ·sqrt(D)) beside the measured one, and
their per-example correlation.

Run: ``python examples/registration_denoising.py [--fast] [--noise 2.0] [--train 8000] [--epochs 10]``.
"""

import argparse
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_netsim import DenoisingMonitor, DensityMonitor, NeighborMonitor, denoising_factor, predicted_noise

SIZE = 16


def render(centers: torch.Tensor, amplitudes: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """``(n, SIZE, SIZE)`` sums of Gaussian blobs, drawn analytically (exact sub-pixel positions)."""
    yy, xx = torch.meshgrid(torch.arange(SIZE).float(), torch.arange(SIZE).float(), indexing="ij")
    grid = torch.stack([xx, yy], -1)
    diff = grid[None, None] - centers[:, :, None, None, :]
    blobs = amplitudes[:, :, None, None] * torch.exp(-(diff**2).sum(-1) / (2 * widths[:, :, None, None] ** 2))
    return blobs.sum(1).clamp(max=1.5)


def make_pairs(n: int, seed: int, max_shift: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x (n, 2, SIZE, SIZE), displacement (n, 2))`` for ``n`` random scenes."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.rand(n, 3, 2, generator=gen) * (SIZE - 6) + 3
    amplitudes = torch.rand(n, 3, generator=gen) * 0.6 + 0.4
    widths = torch.rand(n, 3, generator=gen) * 1.0 + 1.5
    displacement = (torch.rand(n, 2, generator=gen) * 2 - 1) * max_shift
    first = render(centers, amplitudes, widths)
    shifted = render(centers + displacement[:, None, :], amplitudes, widths)
    second = 4 * shifted * (1.2 - shifted)  # non-monotone: the modalities do not share intensities
    return torch.stack([first, second], 1), displacement


class Registration(pl.LightningModule):
    def __init__(self, lr: float = 3e-3, total_steps: int = 1000) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(2, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, noisy = batch
        loss = nn.functional.mse_loss(self(x), noisy)
        self.log("train/mse_noisy_labels", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, true = batch
        self.log("val/rmse_true_px", nn.functional.mse_loss(self(x), true).sqrt())

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.hparams.lr, total_steps=self.hparams.total_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="tiny run for the test suite (seconds)")
    parser.add_argument("--noise", type=float, default=2.0, help="label-noise σ in px per axis (default 2)")
    parser.add_argument("--train", type=int, default=8000, help="training pairs (default 8000)")
    parser.add_argument("--test", type=int, default=512, help="test pairs (default 512)")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs (default 10)")
    parser.add_argument("--logdir", default="runs", help="TensorBoard directory (default runs/)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.fast:
        args.train, args.test, args.epochs = 512, 64, 2
    start = time.perf_counter()
    pl.seed_everything(args.seed, verbose=False)
    x_train, d_train = make_pairs(args.train, seed=args.seed)
    noise = args.noise * torch.randn(d_train.shape, generator=torch.Generator().manual_seed(args.seed + 1))
    x_test, d_test = make_pairs(args.test, seed=args.seed + 2)
    batch = 64
    train = DataLoader(TensorDataset(x_train, d_train + noise), batch_size=batch, shuffle=True)
    val = DataLoader(TensorDataset(x_test, d_test), batch_size=256)
    steps = args.epochs * len(train)
    model = Registration(total_steps=steps)
    every = max(1, args.epochs // 2)
    monitors = [
        DensityMonitor(every_n_epochs=every, max_samples=256),
        DenoisingMonitor(every_n_epochs=every, max_samples=128, noise_std=args.noise),
        NeighborMonitor(every_n_epochs=every, max_samples=256, num_queries=6, k=6),
    ]
    logger = TensorBoardLogger(args.logdir, name="registration_denoising")
    trainer = pl.Trainer(
        max_epochs=args.epochs, accelerator="cpu", devices=1, logger=logger, callbacks=monitors,
        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
        num_sanity_val_steps=0, log_every_n_steps=20,
    )
    trainer.fit(model, train, val)
    model.eval()

    with torch.no_grad():
        error = model(x_test) - d_test
    label_rms = float(noise.pow(2).mean().sqrt())
    network_rmse = float(error.pow(2).mean().sqrt())
    # How much of the training labels' noise the network averages at each test example.
    reference = [x_train[i : i + 256] for i in range(0, len(x_train), 256)]
    factor = denoising_factor(model, [x_test[i : i + 256] for i in range(0, len(x_test), 256)], reference=reference)
    predicted = predicted_noise(factor, args.noise)  # per-axis standard deviation left after averaging
    measured = error.pow(2).mean(1).sqrt()  # per-example RMS over the two axes
    corr = float(torch.corrcoef(torch.stack([predicted.float(), measured.float()]))[0, 1])
    rows = [
        ("label-noise RMS (px per axis)", f"{label_rms:.3f}"),
        ("network RMSE vs true displacement (px per axis)", f"{network_rmse:.3f}"),
        ("ratio label noise / network error", f"{label_rms / network_rmse:.2f}×"),
        ("mean denoising factor tr(D)/d (test vs training set)", f"{float(factor.mean()):.5f}"),
        ("predicted error σ·sqrt(D) (RMS over test)", f"{float(predicted.pow(2).mean().sqrt()):.3f}"),
        ("measured error (RMS over test)", f"{float(measured.pow(2).mean().sqrt()):.3f}"),
        ("correlation, per-example predicted vs measured error", f"{corr:+.3f}"),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"\nRegistration with noisy labels: {args.train} training pairs, σ = {args.noise} px, {args.epochs} epochs")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    print(f"\nfinished in {time.perf_counter() - start:.0f} s; TensorBoard logs in {Path(logger.log_dir)}")
    print(f"look at them with: tensorboard --logdir {args.logdir}")


if __name__ == "__main__":
    main()
