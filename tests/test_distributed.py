"""Two CPU processes (gloo) give the same statistics as one process, with N not divisible by 2."""

import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_netsim import denoising_factor, nearest_neighbors, neighbor_consistency, neighbor_counts, soft_density
from lightning_netsim.metrics import DenoisingFactor, SoftDensity

N = 11


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)).double()


def _data() -> torch.Tensor:
    return torch.randn(N, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))


def _statistics(data, shard, indices=None) -> dict[str, torch.Tensor]:
    model, queries = _model(), _data()[:3]
    metrics = {"metric_soft": SoftDensity(model, batch_size=4), "metric_denoising": DenoisingFactor(model)}
    for metric in metrics.values():
        for i, batch in enumerate(data):
            metric.update(batch, indices=None if indices is None else indices[i])
    # Every rank holds the same 3 queries: global indices make them count once.
    query_shard = None if shard is None else torch.arange(3)
    sims, index = nearest_neighbors(model, queries, data, k=4, shard=shard, query_shard=query_shard)
    return {
        "soft": soft_density(model, data, shard=shard),
        "hard": neighbor_counts(model, data, threshold=0.3, shard=shard),
        "denoising": denoising_factor(model, data, shard=shard),
        "sketch": denoising_factor(model, data, sketch_dim=32, shard=shard),
        "consistency": neighbor_consistency(model, data, shard=shard),
        "nn_sims": sims,
        "nn_index": index.double(),
        **{name: metric.compute() for name, metric in metrics.items()},
    }


def _worker(rank: int, world: int, port: int, out: str) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        x = _data()
        # DistributedSampler layout without shuffling: pads by repeating the first examples.
        sampler = torch.utils.data.DistributedSampler(range(N), num_replicas=world, rank=rank, shuffle=False)
        order = torch.tensor(list(sampler))
        local = x[order]
        batches = [local[i : i + 2] for i in range(0, len(local), 2)]
        results = _statistics(batches, shard=N, indices=[order[i : i + 2] for i in range(0, len(local), 2)])
        torch.save(results, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path) -> None:
    expected = _statistics([_data()[i : i + 3] for i in range(0, N, 3)], shard=None)
    out = str(tmp_path / "result")
    mp.start_processes(_worker, args=(2, _free_port(), out), nprocs=2, join=True, start_method="spawn")
    for rank in range(2):
        got = torch.load(f"{out}.{rank}")
        for name, value in expected.items():
            assert got[name].shape == value.shape, name
            torch.testing.assert_close(got[name], value, rtol=0, atol=1e-10, msg=f"{name} on rank {rank}")
