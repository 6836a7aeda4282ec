"""Quick start: train a small network with Lightning, then ask which inputs it treats as alike.

The paper's 1-D toy problem: ``alpha ~ U[0, 1]``, input ``(cos 2πα, sin 2πα)``,
target ``sin(2π f α)``. After training, the per-sample Jacobians give the
network's similarity ``rho_ij`` between examples, and its soft neighbor count
``n_i = Σ_j rho_ij``. Prints a summary and writes TensorBoard logs under ``runs/``.

Run: ``make demo`` or ``python examples/quickstart.py --help``.
"""

import argparse
import math

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_netsim import per_sample_jacobian, similarity


def make_data(n: int, frequency: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    alpha = torch.rand(n, generator=generator)
    x = torch.stack([torch.cos(2 * math.pi * alpha), torch.sin(2 * math.pi * alpha)], dim=1)
    y = torch.sin(2 * math.pi * frequency * alpha).unsqueeze(1)
    return alpha, x, y


class Regressor(pl.LightningModule):
    def __init__(self, hidden: int = 64, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train/mse", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frequency", type=float, default=2.0, help="f in sin(2π f α)")
    parser.add_argument("--train-size", type=int, default=1024)
    parser.add_argument("--analysis-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--logdir", default="runs")
    args = parser.parse_args()

    pl.seed_everything(0, verbose=False)
    generator = torch.Generator().manual_seed(0)
    _, x, y = make_data(args.train_size, args.frequency, generator)
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    model = Regressor()
    logger = TensorBoardLogger(args.logdir, name="quickstart")
    trainer = pl.Trainer(
        max_epochs=args.epochs, logger=logger, enable_checkpointing=False, enable_model_summary=False,
        enable_progress_bar=False, log_every_n_steps=8,
    )
    trainer.fit(model, loader)

    # The network's view of similarity on fresh examples, sorted by alpha.
    alpha, xa, ya = make_data(args.analysis_size, args.frequency, generator)
    order = torch.argsort(alpha)
    alpha, xa, ya = alpha[order], xa[order], ya[order]
    model.eval()
    jac = per_sample_jacobian(model, xa)  # [N, 1, P]
    rho = similarity(jac)  # [N, N]
    density = rho.sum(1)  # soft neighbor count, self included
    curvature = (2 * math.pi * args.frequency) ** 2 * torch.sin(2 * math.pi * args.frequency * alpha).abs()
    with torch.no_grad():
        rmse = (model(xa) - ya).pow(2).mean().sqrt().item()

    print(f"\nTrained on {args.train_size} examples of sin(2π·{args.frequency:g}·α): test RMSE {rmse:.4f}")
    print(f"Similarity over {args.analysis_size} test examples ({jac.shape[-1]} parameters):")
    print(f"  mean off-diagonal similarity      {(rho.sum() - rho.trace()).item() / (len(rho) ** 2 - len(rho)):+.3f}")
    print(f"  soft density  mean / p10 / p90   {density.mean():.1f} / {density.quantile(0.1):.1f} / {density.quantile(0.9):.1f}")
    corr = torch.corrcoef(torch.stack([density, curvature]))[0, 1].item()
    print(f"  corr(density, |target curvature|) {corr:+.3f}  (the paper predicts fewer neighbors where the target bends, i.e. < 0)")
    print("\n  alpha bin   mean density   mean |curvature|")
    bins = torch.linspace(0, 1, 9)
    for lo, hi in zip(bins[:-1], bins[1:]):
        mask = (alpha >= lo) & (alpha < hi)
        if mask.any():
            print(f"  [{lo:.3f}, {hi:.3f})  {density[mask].mean():>10.1f}   {curvature[mask].mean():>14.1f}")

    writer = logger.experiment
    step = trainer.global_step
    writer.add_histogram("netsim/density", density, step)
    writer.add_scalar("netsim/density/mean", density.mean().item(), step)
    writer.add_image("netsim/similarity_matrix", ((rho + 1) / 2).unsqueeze(0), step)
    writer.flush()
    print(f"\nTensorBoard logs in {logger.log_dir}\n  tensorboard --logdir {args.logdir}")


if __name__ == "__main__":
    main()
