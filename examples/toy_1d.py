"""The paper's 1-D toy problem: does the network see fewer neighbors where the target varies faster?

α ~ U[0, 1], input (cos 2πα, sin 2πα), target sin(2π f α) (plus optional noise),
for f in 1, 2, 4, 8. An MLP is trained with Lightning for each f; then the soft
density n_i = Σ_j ρ_ij of every training example against the training set is
set against α and against the local curvature of the target,
|d²/dα² sin(2π f α)| = (2π f)² |sin(2π f α)|.

Prints the fit (RMSE), the mean density per f, and the Spearman correlation
between density and curvature within each f; writes ``toy_1d.png`` (density
and curvature against α, one panel per f) when matplotlib is installed.

Run: ``python examples/toy_1d.py [--fast] [--noise 0.0] [--out toy_1d.png]``.
"""

import argparse
import math
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_netsim import soft_density


class Toy(pl.LightningModule):
    def __init__(self, width: int = 64, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(2, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1))

    def forward(self, x):
        return self.net(x).squeeze(-1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train/mse", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ranks = [torch.argsort(torch.argsort(v)).double() for v in (a, b)]
    return float(torch.corrcoef(torch.stack(ranks))[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="tiny run for the test suite (seconds)")
    parser.add_argument("--samples", type=int, default=1000, help="training examples per frequency (default 1000)")
    parser.add_argument("--steps", type=int, default=3000, help="full-batch Adam steps per frequency (default 3000)")
    parser.add_argument("--noise", type=float, default=0.0, help="label noise σ (default 0)")
    parser.add_argument("--frequencies", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--out", default="toy_1d.png", help="figure path (default toy_1d.png)")
    parser.add_argument("--logdir", default="runs", help="TensorBoard directory (default runs/)")
    args = parser.parse_args()
    if args.fast:
        args.samples, args.steps, args.frequencies = 200, 50, [1, 4]
    start = time.perf_counter()
    results = {}
    for f in args.frequencies:
        pl.seed_everything(f, verbose=False)
        gen = torch.Generator().manual_seed(f)
        alpha = torch.rand(args.samples, generator=gen)
        x = torch.stack([torch.cos(2 * math.pi * alpha), torch.sin(2 * math.pi * alpha)], 1)
        clean = torch.sin(2 * math.pi * f * alpha)
        y = clean + args.noise * torch.randn(args.samples, generator=gen)
        model = Toy()
        trainer = pl.Trainer(
            max_steps=args.steps, accelerator="cpu", devices=1, logger=TensorBoardLogger(args.logdir, name=f"toy_1d_f{f}"),
            enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False, log_every_n_steps=50,
        )
        trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=args.samples))
        model.eval()
        with torch.no_grad():
            rmse = float((model(x) - clean).pow(2).mean().sqrt())
        density = soft_density(model, [x[i : i + 250] for i in range(0, len(x), 250)])
        curvature = (2 * math.pi * f) ** 2 * torch.sin(2 * math.pi * f * alpha).abs()
        results[f] = dict(alpha=alpha, density=density, curvature=curvature, rmse=rmse, rho=spearman(density, curvature))

    print(f"\n1-D toy problem: {args.samples} examples, {args.steps} steps, noise σ = {args.noise}")
    print(f"  {'f':>3}  {'fit RMSE':>9}  {'mean density':>13}  {'density / N':>11}  {'Spearman(density, curvature)':>29}")
    for f, r in results.items():
        mean = float(r["density"].mean())
        print(f"  {f:>3}  {r['rmse']:>9.4f}  {mean:>13.1f}  {mean / args.samples:>11.3f}  {r['rho']:>+29.3f}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no figure (pip install matplotlib)")
    else:
        fig, axes = plt.subplots(len(results), 1, figsize=(7, 2.2 * len(results)), sharex=True)
        for ax, (f, r) in zip(axes if len(results) > 1 else [axes], results.items()):
            order = torch.argsort(r["alpha"])
            ax.plot(r["alpha"][order], r["density"][order], ".", ms=2, label="soft density")
            ax.set_ylabel(f"f = {f}\ndensity")
            twin = ax.twinx()
            twin.plot(r["alpha"][order], r["curvature"][order], color="tab:red", lw=0.8, alpha=0.6)
            twin.set_ylabel("|curvature|", color="tab:red")
        axes[-1].set_xlabel("α") if len(results) > 1 else axes.set_xlabel("α")
        fig.suptitle("Network-perceived density (dots) and target curvature (red) against α")
        fig.tight_layout()
        fig.savefig(args.out, dpi=90)
        print(f"figure written to {Path(args.out)}")
    print(f"finished in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
