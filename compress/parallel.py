"""Data parallelism under `torchrun` / `accelerate launch`: the few collective steps the stages need.

Both launchers describe the job in the environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT);
`init` joins that process group (gloo on CPU, NCCL on GPU, each rank on its own `cuda:LOCAL_RANK`). With
one process every function here is a no-op, so the same code and command run with or without a launcher.
Every process computes the same calibration windows, RNG draws and decisions; only the data-parallel
sums differ per rank, and `all_sum` makes them identical everywhere.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

# Rank 0 may build a level database or a teacher cache while the others wait at a barrier: hours, not
# the default 30 minutes.
TIMEOUT = timedelta(hours=float(os.environ.get("COMPRESS_DIST_TIMEOUT_HOURS", "24")))


def init(device: torch.device | str) -> torch.device:
    """Join the launcher's process group if there is one; returns this rank's device."""
    device = torch.device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    if device.type == "cuda" and device.index is None and world() > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world() > 1:
        dist.barrier()


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over the processes in place (and return it)."""
    if world() > 1:
        dist.all_reduce(t)
    return t


def shard(items: list[int]) -> list[int]:
    """This rank's share of `items` (round robin)."""
    return items[rank() :: world()]


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the body first (building shared files); the others run it after, finding them built."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()
