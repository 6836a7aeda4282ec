"""Soft density: time as ratios to one training epoch, a per-sample loop, and materialized gradients.

All measured side by side in one process (2 CPU cores here):
- ``epoch``: forward + backward + SGD step over the same N examples, batch 256;
- ``loop``: the official approach, one backward per sample and output, then
  ``n_i = Σ_j ρ_ij`` from the gathered normalized gradients (chunked matmul);
- ``materialized``: ``per_sample_jacobian`` on every batch, kept (N×d×P), then the same dense math.

Then peak memory at N = 1k and N = 16k, each in a fresh process: the data are
generated batch by batch (a re-iterable that holds no examples), so what grows
with N is the algorithm's own memory. Reported: the process's peak resident
set, and its increase over the resident set just before the call.

Run: ``python benchmarks/density.py [--samples 2048] [--memory-samples 1000 16000]``.
"""

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import describe_machine, small_cnn, time_side_by_side  # noqa: E402

from lightning_netsim import normalized_jacobian, per_sample_jacobian, soft_density  # noqa: E402


def mlp(d: int) -> nn.Module:
    return nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, d))


def dense_density(jhat: torch.Tensor) -> torch.Tensor:
    flat = jhat.flatten(1)
    return flat @ flat.sum(0) / jhat.shape[1]


MODELS = {"mlp": (mlp, (32,)), "cnn": (small_cnn, (1, 16, 16))}


class GeneratedBatches:
    """``n`` examples in batches, generated on the fly from a seed: nothing is held between sweeps."""

    def __init__(self, n: int, batch: int, shape: tuple[int, ...]) -> None:
        self.n, self.batch, self.shape = n, batch, shape

    def __iter__(self):
        for i, start in enumerate(range(0, self.n, self.batch)):
            gen = torch.Generator().manual_seed(i)
            yield torch.randn(min(self.batch, self.n - start), *self.shape, generator=gen)


def _resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def memory_child(name: str, d: int, n: int, batch: int) -> None:
    """Run in a fresh process: peak resident memory of one ``soft_density`` call."""
    make, shape = MODELS[name]
    torch.manual_seed(0)
    model = make(d).eval()
    soft_density(model, GeneratedBatches(batch, batch, shape))  # load kernels before measuring
    before = _resident_mb()
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current size
        f.write("5")
    soft_density(model, GeneratedBatches(n, batch, shape))
    print(json.dumps({"before": before, "peak": _peak_mb()}))


def _peak_mb() -> float:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def measure_memory(name: str, d: int, n: int, batch: int) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--memory-child", name, str(d), str(n), "--batch", str(batch)]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--memory-samples", type=int, nargs=2, default=(1000, 16000))
    parser.add_argument("--memory-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        name, d, n = args.memory_child
        memory_child(name, int(d), int(n), args.batch)
        return
    n, b = args.samples, args.batch
    print(f"soft_density, N={n}, batch {b} ({describe_machine()})")
    print(f"{'model':>5} {'d':>3} {'P':>7} {'epoch [s]':>10} {'ours/epoch':>11} {'ours/loop':>10} {'ours/materialized':>18}")
    for name, (make, shape) in MODELS.items():
        for d in (1, 10):
            torch.manual_seed(0)
            model = make(d).eval()
            x = torch.randn(n, *shape)
            batches = [x[i : i + b] for i in range(0, n, b)]
            opt = torch.optim.SGD(model.parameters(), lr=0.0)

            def epoch() -> None:
                for xb in batches:
                    opt.zero_grad()
                    model(xb).square().mean().backward()
                    opt.step()
                opt.zero_grad(set_to_none=True)

            def loop() -> torch.Tensor:
                params = list(model.parameters())
                rows = []
                for i in range(n):
                    out = model(x[i : i + 1]).reshape(-1)
                    grads = [torch.autograd.grad(out[k], params, retain_graph=k + 1 < d) for k in range(d)]
                    rows.append(torch.stack([torch.cat([g.reshape(-1) for g in gs]) for gs in grads]))
                return dense_density(normalized_jacobian(torch.stack(rows)))

            def materialized() -> torch.Tensor:
                return dense_density(torch.cat([normalized_jacobian(per_sample_jacobian(model, xb)) for xb in batches]))

            ours = lambda: soft_density(model, batches)  # noqa: E731
            torch.testing.assert_close(ours(), materialized(), rtol=1e-3, atol=1e-2)
            t = time_side_by_side({"epoch": epoch, "ours": ours, "loop": loop, "materialized": materialized}, args.repeats)
            p = sum(q.numel() for q in model.parameters())
            print(
                f"{name:>5} {d:>3} {p:>7} {t['epoch']:>10.3f} {t['ours'] / t['epoch']:>11.2f} "
                f"{t['ours'] / t['loop']:>10.3f} {t['ours'] / t['materialized']:>18.3f}"
            )

    small, large = args.memory_samples
    print(f"\npeak memory of soft_density, N={small} vs N={large} (fresh process each; data generated per batch)")
    print(f"{'model':>5} {'d':>3} {'peak MB (small)':>16} {'peak MB (large)':>16} {'peak ratio':>11} {'extra MB (small)':>17} {'extra MB (large)':>17}")
    for name in MODELS:
        for d in (1, 10):
            a, b = (measure_memory(name, d, n, args.batch) for n in (small, large))
            extra_a, extra_b = a["peak"] - a["before"], b["peak"] - b["before"]
            print(
                f"{name:>5} {d:>3} {a['peak']:>16.1f} {b['peak']:>16.1f} {b['peak'] / a['peak']:>11.3f} "
                f"{extra_a:>17.1f} {extra_b:>17.1f}"
            )


if __name__ == "__main__":
    main()
