"""Similarity enforcement on real digits: does pulling same-class pairs together speed up early training?

scikit-learn's 8×8 digits (1,797 images, shipped with the package: nothing is
downloaded), a small CNN, three arms over several seeds:

- ``task``: cross-entropy alone;
- ``pull``: cross-entropy + λ·mean(1 − ρ) over same-class pairs (the paper's aim),
  through ``SimilarityMixin``;
- ``push``: cross-entropy + λ·mean(ρ) over the same pairs (the sign as written in
  the official code, which decreases the similarity).

Each step draws a batch of training images and, for each, a partner of the same
class; ρ uses the target-class output z_y − mean_{c≠y} z_c. Validation accuracy
is recorded every few steps. Prints mean ± std per arm at chosen steps and the
pull − task and push − task differences with 95% confidence intervals (paired by
seed, t distribution); writes ``digits_similarity.png`` and TensorBoard scalars.

Run: ``python examples/digits_similarity.py [--fast] [--seeds 10] [--steps 150]``.
"""

import argparse
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from lightning_netsim import SimilarityMixin

# two-sided 97.5% quantiles of Student's t for df = 1 .. 30
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


class DigitNet(SimilarityMixin, pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(16 * 4 * 4, 10),
        )

    def forward(self, x):
        return self.net(x)


def load(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))  # one fixed split for all seeds
    val, train = perm[:400], perm[400:]
    return x[train], y[train], x[val], y[val]


def run(arm: str, seed: int, args: argparse.Namespace, data, writer: SummaryWriter) -> list[float]:
    x, y, xv, yv = data
    pl.seed_everything(seed, verbose=False)
    model = DigitNet()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    by_class = [(y == c).nonzero().squeeze(1) for c in range(10)]
    curve = []
    for step in range(args.steps + 1):
        if step % args.every == 0:
            model.eval()
            with torch.no_grad():
                accuracy = float((model(xv).argmax(1) == yv).float().mean())
            model.train()
            curve.append(accuracy)
            writer.add_scalar(f"{arm}/seed{seed}/val_accuracy", accuracy, step)
        if step == args.steps:
            break
        batch = torch.randint(0, len(y), (args.batch,), generator=gen)
        loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
        if arm != "task":
            partner = torch.stack([c[torch.randint(0, len(c), (1,), generator=gen)][0] for c in (by_class[int(t)] for t in y[batch])])
            direction = "pull" if arm == "pull" else "push"
            loss = loss + args.weight * model.similarity_loss(
                x[batch], x[partner], targets=y[batch], output="target", direction=direction, log=False
            )
        opt.zero_grad()
        loss.backward()
        opt.step()
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="tiny run for the test suite (seconds)")
    parser.add_argument("--seeds", type=int, default=10, help="seeds per arm (default 10)")
    parser.add_argument("--steps", type=int, default=150, help="training steps (default 150)")
    parser.add_argument("--every", type=int, default=10, help="validate every n steps (default 10)")
    parser.add_argument("--batch", type=int, default=16, help="examples per step (default 16)")
    parser.add_argument("--lr", type=float, default=0.02, help="SGD learning rate (default 0.02)")
    parser.add_argument("--weight", type=float, default=1.0, help="λ of the similarity term (default 1)")
    parser.add_argument("--report", type=int, nargs="+", default=[20, 50, 100], help="steps to report (default 20 50 100)")
    parser.add_argument("--out", default="digits_similarity.png", help="figure path")
    parser.add_argument("--logdir", default="runs", help="TensorBoard directory (default runs/)")
    args = parser.parse_args()
    if args.fast:
        args.seeds, args.steps, args.report = 2, 20, [10, 20]
    start = time.perf_counter()
    data = load(0)
    writer = SummaryWriter(str(Path(args.logdir) / "digits_similarity"))
    arms = ["task", "pull", "push"]
    curves = {arm: torch.tensor([run(arm, seed, args, data, writer) for seed in range(args.seeds)]) for arm in arms}
    steps = list(range(0, args.steps + 1, args.every))
    for arm in arms:
        for i, step in enumerate(steps):
            writer.add_scalar(f"mean/{arm}/val_accuracy", float(curves[arm][:, i].mean()), step)
    writer.close()

    print(f"\nDigits, small CNN, {args.seeds} seeds, batch {args.batch}, λ = {args.weight}: validation accuracy")
    print(f"  {'step':>5}  " + "  ".join(f"{arm:>13}" for arm in arms) + "  " + "  ".join(f"{d:>22}" for d in ("pull − task [95% CI]", "push − task [95% CI]")))
    t = T975[min(args.seeds - 1, len(T975)) - 1] if args.seeds > 1 else float("nan")
    for step in args.report:
        if step not in steps:
            continue
        i = steps.index(step)
        cells = [f"{float(curves[a][:, i].mean()):.3f} ± {float(curves[a][:, i].std()):.3f}" for a in arms]
        diffs = []
        for arm in ("pull", "push"):
            diff = curves[arm][:, i] - curves["task"][:, i]
            half = t * float(diff.std()) / args.seeds**0.5
            diffs.append(f"{float(diff.mean()):+.3f} [{float(diff.mean()) - half:+.3f}, {float(diff.mean()) + half:+.3f}]")
        print(f"  {step:>5}  " + "  ".join(f"{c:>13}" for c in cells) + "  " + "  ".join(f"{d:>22}" for d in diffs))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no figure (pip install matplotlib)")
    else:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for arm in arms:
            mean, std = curves[arm].mean(0), curves[arm].std(0)
            ax.plot(steps, mean, label=arm)
            ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
        ax.set_xlabel("training step")
        ax.set_ylabel("validation accuracy")
        ax.set_title(f"Digits: mean ± std over {args.seeds} seeds")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.out, dpi=80)
        print(f"figure written to {args.out}")
    print(f"finished in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
