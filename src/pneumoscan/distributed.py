"""DistributedDataParallel set-up for ``torchrun``: joining the process group, and an is_main flag.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them everything runs as one process.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pneumoscan.errors import PneumoscanError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    """How many processes torchrun started (its WORLD_SIZE); 1 without torchrun."""
    text = os.environ.get("WORLD_SIZE", "").strip() or "1"
    try:
        return max(1, int(text))
    except ValueError:
        raise PneumoscanError(f"WORLD_SIZE={text!r} in the environment is not a number of "
                              "processes; unset it, or start the command with torchrun") from None


def env_is_main() -> bool:
    """Whether this process will be the main one (init_distributed's is_main), before joining:
    a process on its own, or torchrun's RANK 0."""
    return env_world_size() <= 1 or os.environ.get("RANK", "").strip() == "0"


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun set up (NCCL on GPU, gloo on CPU), if there is one."""
    world_size = env_world_size()
    if world_size <= 1:
        return DistInfo()
    info = DistInfo(
        rank=int(os.environ["RANK"]),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        world_size=world_size,
    )
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend)
    return info


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(device_type: str) -> Iterator[DistInfo]:
    """Be in torchrun's process group for the ``with`` block; leave it only if this block joined.

    Several trainings in one process (``train --seeds``) share one group: tearing a gloo group
    down and setting it up again between them can fail to reconnect.
    """
    joined = not dist.is_initialized()
    info = init_distributed(device_type)
    try:
        yield info
    finally:
        if joined:
            cleanup_distributed()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, info: DistInfo):
    """Rank 0's ``obj`` on every rank (used for early-stopping decisions)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
