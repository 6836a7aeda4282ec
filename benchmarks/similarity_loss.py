"""Training-step time with the similarity loss ÷ without, batch 64, small CNN (10 classes), from one run.

Step = forward + cross-entropy (+ λ·similarity_loss of the batch and an
augmented copy) + backward + SGD step. Modes: ``pair`` (per-example Jacobians,
target-class output, d = 1), ``pair`` with all 10 outputs, and ``batch`` (the
official form); and, for scale, the bare double-backprop cost of the batch
form without any normalization (two ``create_graph`` gradients and their inner
product). Run: ``python benchmarks/similarity_loss.py [--repeats 5]``.
"""

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import describe_machine, small_cnn, time_side_by_side  # noqa: E402

from lightning_netsim import similarity_loss  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = small_cnn(10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(64, 1, 16, 16), torch.randint(0, 10, (64,))
    x_aug = x + 0.1 * torch.randn_like(x)

    def steps(extra):
        def run() -> None:
            for _ in range(args.steps):
                loss = nn.functional.cross_entropy(model(x), y)
                if extra is not None:
                    loss = loss + 0.1 * extra()
                opt.zero_grad()
                loss.backward()
                opt.step()

        return run

    params = list(model.parameters())

    def floor() -> torch.Tensor:
        """The bare cost of the batch form: two create_graph gradients and their inner product (no normalization)."""
        ga = torch.autograd.grad(model(x).gather(1, y[:, None]).mean(), params, create_graph=True)
        gb = torch.autograd.grad(model(x_aug).gather(1, y[:, None]).mean(), params, create_graph=True)
        return sum((u * v).sum() for u, v in zip(ga, gb))  # type: ignore[return-value]

    t = time_side_by_side(
        {
            "plain": steps(None),
            "double-backprop floor": steps(floor),
            "pair, target (d=1)": steps(lambda: similarity_loss(model, x, x_aug, targets=y, output="target")),
            "pair, full (d=10)": steps(lambda: similarity_loss(model, x, x_aug)),
            "batch, target (d=1)": steps(lambda: similarity_loss(model, x, x_aug, targets=y, output="target", mode="batch")),
            "batch, full (d=10)": steps(lambda: similarity_loss(model, x, x_aug, mode="batch")),
        },
        args.repeats,
    )
    print(f"training step with similarity_loss ÷ without, batch 64, small CNN ({describe_machine()})")
    for name, value in t.items():
        if name != "plain":
            print(f"{name:>22}: {value / t['plain']:.2f}")


if __name__ == "__main__":
    main()
