"""Soft density: time as ratios to one training epoch, a per-sample loop, and materialized gradients.

All measured side by side in one process (2 CPU cores here):
- ``epoch``: forward + backward + SGD step over the same N examples, batch 256;
- ``loop``: the official approach, one backward per sample and output, then
  ``n_i = Σ_j ρ_ij`` from the gathered normalized gradients (chunked matmul);
- ``materialized``: ``per_sample_jacobian`` on every batch, kept (N×d×P), then the same dense math.

Models: an MLP, a small CNN and a small transformer encoder (torch's own
``nn.TransformerEncoder``), d = 1 and d = 10. Peer baselines (Opacus per-sample
gradients, BackPACK ``BatchGrad``, each followed by the same dense math; one
forward per output row, as both free their stored activations after a backward)
are timed when installed (``pip install '.[bench]'``; they may pull another
torch build); they are never runtime dependencies.

Memory, each figure in a fresh process with data generated batch by batch (a
re-iterable that holds no examples): the peak resident set of ``soft_density``
at N = 1k and N = 16k, and its increase over the resident set before the call
divided by the same increase for one training epoch (batch 256).

Run: ``python benchmarks/density.py [--repeats 3] [--markdown benchmarks/README.md]``
(``make bench`` writes the README table).
"""

import argparse
import copy
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


class Encoder(nn.Module):
    """Two torch TransformerEncoder layers (d_model 32, 4 heads) over 16 tokens, mean-pooled."""

    def __init__(self, d: int) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(x).mean(1))


MODELS = {"mlp": (mlp, (32,)), "cnn": (small_cnn, (1, 16, 16)), "transformer": (Encoder, (16, 32))}


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


def memory_child(name: str, d: int, n: int, batch: int, what: str = "density") -> None:
    """Run in a fresh process: peak resident memory of one ``soft_density`` call (or one training epoch)."""
    make, shape = MODELS[name]
    torch.manual_seed(0)
    model = make(d).eval()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)

    def run(count: int) -> None:
        if what == "density":
            soft_density(model, GeneratedBatches(count, batch, shape))
            return
        for xb in GeneratedBatches(count, batch, shape):
            opt.zero_grad()
            model(xb).square().mean().backward()
            opt.step()
        opt.zero_grad(set_to_none=True)

    run(batch)  # load kernels before measuring
    before = _resident_mb()
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current size
        f.write("5")
    run(n)
    print(json.dumps({"before": before, "peak": _peak_mb()}))


def _peak_mb() -> float:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def measure_memory(name: str, d: int, n: int, batch: int, what: str = "density") -> dict[str, float]:
    cmd = [sys.executable, __file__, "--memory-child", name, str(d), str(n), what, "--batch", str(batch)]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--memory-samples", type=int, nargs=2, default=(1000, 16000))
    parser.add_argument("--markdown", help="also write the tables to this Markdown file")
    parser.add_argument("--memory-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        name, d, n, what = args.memory_child
        memory_child(name, int(d), int(n), args.batch, what)
        return
    n, b = args.samples, args.batch
    peers = _peers()
    header = ["model", "d", "P", "epoch [s]", "ours ÷ epoch", "ours ÷ loop", "ours ÷ materialized"] + [f"ours ÷ {p}" for p in peers]
    rows = []
    print(f"soft_density, N={n}, batch {b} ({describe_machine()})")
    print(" | ".join(header))
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
            fns = {"epoch": epoch, "ours": ours, "loop": loop, "materialized": materialized}
            usable = {}
            for q, f in peers.items():
                try:
                    f(model, batches[:1])
                    usable[q] = lambda f=f: f(model, batches)
                except Exception:  # noqa: BLE001 - a peer that does not support this model
                    pass
            fns.update(usable)
            t = time_side_by_side(fns, args.repeats)
            p = sum(q.numel() for q in model.parameters())
            row = [name, d, p, f"{t['epoch']:.3f}", f"{t['ours'] / t['epoch']:.2f}", f"{t['ours'] / t['loop']:.3f}",
                   f"{t['ours'] / t['materialized']:.3f}"] + [f"{t['ours'] / t[q]:.3f}" if q in t else "unsupported" for q in peers]
            rows.append(row)
            print(" | ".join(str(v) for v in row))

    small, large = args.memory_samples
    memory_header = ["model", "d", f"peak MB, N={small}", f"peak MB, N={large}", "peak ratio", f"extra MB, N={large}",
                     "extra MB, training epoch", "extra ÷ training epoch"]
    memory_rows = []
    print(f"\npeak memory (fresh process each; data generated per batch)")
    print(" | ".join(memory_header))
    for name in MODELS:
        for d in (1, 10):
            a, c = (measure_memory(name, d, m, args.batch) for m in (small, large))
            train = measure_memory(name, d, large, args.batch, "train")
            extra, extra_train = c["peak"] - c["before"], train["peak"] - train["before"]
            row = [name, d, f"{a['peak']:.1f}", f"{c['peak']:.1f}", f"{c['peak'] / a['peak']:.3f}", f"{extra:.1f}",
                   f"{extra_train:.1f}", f"{extra / max(extra_train, 1e-9):.2f}"]
            memory_rows.append(row)
            print(" | ".join(str(v) for v in row))
    if args.markdown:
        _write_markdown(Path(args.markdown), header, rows, memory_header, memory_rows, n, b, peers)


def _peers() -> dict:
    """Peer per-sample-gradient engines, when installed (optional, never runtime dependencies)."""
    found: dict = {}
    try:
        import opacus  # noqa: F401
    except ImportError:
        pass
    else:
        found["opacus"] = _opacus_density
    try:
        import backpack  # noqa: F401
    except ImportError:
        pass
    else:
        found["backpack"] = _backpack_density
    return found


def _opacus_density(model: nn.Module, batches: list) -> torch.Tensor:
    from opacus import GradSampleModule

    model = copy.deepcopy(model)  # the peers attach hooks of their own
    mode = model.training
    with torch.no_grad():
        d = model(batches[0][:1]).shape[1]
    wrapped = GradSampleModule(model)
    wrapped.train()  # Opacus records activations in training mode only (these models have no dropout/BN)
    rows = []
    for xb in batches:
        per_row = []
        for k in range(d):  # Opacus consumes the stored activations: one forward per output row
            wrapped.zero_grad(set_to_none=True)
            wrapped(xb)[:, k].sum().backward()
            per_row.append(torch.cat([p.grad_sample.flatten(1) for p in model.parameters()], 1))
        rows.append(torch.stack(per_row, 1))
    wrapped._close()
    model.train(mode)
    for p in model.parameters():
        p.grad = None
    return dense_density(normalized_jacobian(torch.cat(rows)))


def _backpack_density(model: nn.Module, batches: list) -> torch.Tensor:
    from backpack import backpack, extend
    from backpack.extensions import BatchGrad

    extended = extend(copy.deepcopy(model))  # extend() changes the model in place
    with torch.no_grad():
        d = extended(batches[0][:1]).shape[1]
    rows = []
    for xb in batches:
        per_row = []
        for k in range(d):  # BackPACK frees what it stored after each backward: one forward per row
            extended.zero_grad()
            with backpack(BatchGrad()):
                extended(xb)[:, k].sum().backward()
            per_row.append(torch.cat([p.grad_batch.flatten(1) for p in extended.parameters()], 1))
        rows.append(torch.stack(per_row, 1))
    return dense_density(normalized_jacobian(torch.cat(rows)))


def _write_markdown(path: Path, header, rows, memory_header, memory_rows, n: int, b: int, peers: dict) -> None:
    def table(head, body) -> str:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(str(v) for v in r) + " |" for r in body])

    missing = [p for p in ("opacus", "backpack") if p not in peers]
    text = f"""# Benchmarks

Written by `python benchmarks/density.py --markdown benchmarks/README.md` (`make bench`);
{describe_machine()}, one run, medians of interleaved repeats. Ratios below 1 mean ours is faster.

## Soft density, N = {n}, batch {b}

`epoch`: forward + backward + SGD step over the same examples. `loop`: one backward per
example and output (the official code's approach), then the dense math. `materialized`:
`torch.func` per-sample Jacobians of every batch, kept, then the dense math.
{"Peer baselines not installed here: " + ", ".join(missing) + "." if missing else ""}

{table(header, rows)}

## Memory

Peak resident set of `soft_density` in a fresh process, data generated per batch; "extra"
is the increase over the resident set before the call, compared with the same increase
for one training epoch over N = {memory_rows and memory_header[3].split('=')[1]} examples.

{table(memory_header, memory_rows)}
"""
    path.write_text(text)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
