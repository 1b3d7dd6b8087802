"""Process-group helpers so that training loops run unchanged alone or under ``torchrun``.

``torchrun`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; without them everything degrades to
a single process with no process group.
"""

from __future__ import annotations

import datetime
import gc
import os
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist

__all__ = [
    "init", "shutdown", "rank", "world_size", "is_main", "barrier", "all_reduce_sum", "all_reduce_mean", "broadcast_object", "shard_rows", "on_main_first",
]


def init(backend: str | None = None) -> torch.device:
    """Join the ``torchrun`` process group if launched by it; return this process's device.

    NCCL on CUDA, gloo on the CPU. Safe to call twice.
    """
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and backend != "gloo"
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # two hours, not NCCL's ten minutes: ranks wait in a barrier while rank 0 alone evaluates (video recipe)
        dist.init_process_group(backend or ("nccl" if use_cuda else "gloo"), timeout=datetime.timedelta(hours=2))
    if torch.cuda.is_available() and (not dist.is_initialized() or dist.get_backend() == "nccl"):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def shutdown() -> None:
    """Leave the process group; exiting without it can abort the process ("terminate called ...")."""
    if dist.is_initialized():
        gc.collect()  # drop DDP reducers and pending work that still reference the group
        dist.barrier()
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    return all_reduce_sum(t) / world_size()


def broadcast_object(obj: object) -> object:
    """Rank 0's ``obj`` on every rank (e.g. a run directory named after the start time)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard_rows(rows: torch.Tensor) -> torch.Tensor:
    """This rank's share of a global batch of row indices (strided, so ranks interleave)."""
    return rows[rank() :: world_size()]


@contextmanager
def on_main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. builds a cache), the others wait and then reuse its output."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()
