"""Per-sample Jacobians: ``per_sample_jacobian`` ÷ a per-sample ``autograd.grad`` loop.

The loop is the official code's approach: one backward per sample and output.
Both run in this process, side by side, on 256 samples of a small CNN.

Run: ``python benchmarks/jacobian.py`` (or ``make bench``).
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import describe_machine, small_cnn, time_side_by_side  # noqa: E402

from lightning_netsim import per_sample_jacobian  # noqa: E402


def loop_jacobian(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(x.shape[0]):
        out = model(x[i : i + 1]).reshape(-1)
        grads = [torch.autograd.grad(out[k], params, retain_graph=k + 1 < out.numel()) for k in range(out.numel())]
        rows.append(torch.stack([torch.cat([g.reshape(-1) for g in gs]) for gs in grads]))
    return torch.stack(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.samples, 1, 16, 16)
    print(f"per_sample_jacobian vs per-sample loop, small CNN, N={args.samples} ({describe_machine()})")
    print(f"{'d':>3} {'P':>6} {'ours [s]':>9} {'loop [s]':>9} {'ours/loop':>10}")
    for d in (1, 10):
        model = small_cnn(d).eval()
        ours = per_sample_jacobian(model, x)
        torch.testing.assert_close(ours[:8], loop_jacobian(model, x[:8]), rtol=1e-4, atol=1e-5)
        times = time_side_by_side(
            {"ours": lambda: per_sample_jacobian(model, x), "loop": lambda: loop_jacobian(model, x)},
            repeats=args.repeats,
        )
        print(f"{d:>3} {ours.shape[-1]:>6} {times['ours']:>9.3f} {times['loop']:>9.3f} {times['ours'] / times['loop']:>10.3f}")


if __name__ == "__main__":
    main()
