"""Shared helpers for the benchmarks: side-by-side timing with interleaved repeats."""

import time
from collections.abc import Callable

import torch
from torch import nn


def small_cnn(d_out: int) -> nn.Module:
    """A small CNN for 1×16×16 inputs (about 7k parameters)."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 24),
        nn.ReLU(),
        nn.Linear(24, d_out),
    )


def time_side_by_side(fns: dict[str, Callable[[], object]], repeats: int = 3) -> dict[str, float]:
    """Median wall time of each function, repeats interleaved so drifts hit all alike."""
    for fn in fns.values():  # warm-up
        fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: sorted(values)[len(values) // 2] for name, values in samples.items()}


def describe_machine() -> str:
    return f"torch {torch.__version__}, {torch.get_num_threads()} threads"
