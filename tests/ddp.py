"""Run a function in 2 CPU processes that Lightning treats as externally launched DDP ranks (gloo).

``ddp_spawn`` leaves the process group alive when its workers exit, and a
gloo thread then sometimes aborts the exiting process ("terminate called
without an active exception"). Here each worker sets the environment Lightning
reads (so ``Trainer(strategy="ddp", devices=2)`` joins instead of launching),
runs the function, and destroys the process group before it returns.
"""

import os
import socket
import sys
from pathlib import Path
from typing import Any, Callable

import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
        LOCAL_RANK=str(rank), NODE_RANK="0",
    )
    try:
        fn(*args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_two_ranks(fn: Callable[..., Any], *args: Any) -> None:
    """Call ``fn(*args)`` in two processes (``fn`` must be importable: a module-level function)."""
    mp.start_processes(_entry, args=(2, _free_port(), fn, args), nprocs=2, join=True, start_method="spawn")
