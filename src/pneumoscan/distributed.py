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
    """How many processes torchrun started (its WORLD_SIZE); 1 without torchrun. Above 1, this
    process's ranks must be there too: a stray WORLD_SIZE is refused before anything decodes."""
    world_size = max(1, _env_number("WORLD_SIZE", "1", "a number of processes"))
    if world_size > 1:
        env_ranks(world_size)
    return world_size


def env_ranks(world_size: int) -> tuple[int, int]:
    """This process's RANK and LOCAL_RANK under torchrun, checked."""
    rank = _env_number("RANK", None, "a process's rank")
    local_rank = _env_number("LOCAL_RANK", "0", "a process's rank on its machine")
    if not 0 <= rank < world_size or local_rank < 0:
        raise PneumoscanError(f"RANK={rank} and LOCAL_RANK={local_rank} in the environment do not "
                              f"fit WORLD_SIZE={world_size}; start the command with torchrun")
    return rank, local_rank


def _env_number(name: str, default: str | None, meaning: str) -> int:
    text = os.environ.get(name, "").strip() or default
    if text is None:  # WORLD_SIZE is set by hand, or left over from another launcher
        raise PneumoscanError(f"WORLD_SIZE is set in the environment but {name} is not; unset "
                              "WORLD_SIZE, or start the command with torchrun")
    try:
        return int(text)
    except ValueError:
        raise PneumoscanError(f"{name}={text!r} in the environment is not {meaning}; unset it, "
                              "or start the command with torchrun") from None


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun set up (NCCL on GPU, gloo on CPU), if there is one."""
    world_size = env_world_size()
    if world_size <= 1:
        return DistInfo()
    rank, local_rank = env_ranks(world_size)
    info = DistInfo(rank=rank, local_rank=local_rank, world_size=world_size)
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


def gather_objects(obj, info: DistInfo) -> list:
    """Every process's ``obj``, in rank order (``[obj]`` alone without torchrun)."""
    if not info.enabled:
        return [obj]
    out: list = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def agree_to_start(ok: bool, info: DistInfo) -> None:
    """Tell the other processes whether this one's checks passed, and hear theirs: a process
    that stops before training would otherwise leave the others waiting in their first
    collective for torch's timeout (30 minutes), without a word."""
    if not info.enabled:
        return
    flag = torch.tensor([float(ok)])
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    ready = int(all_reduce_sum(flag, info).item())
    if ok and ready < info.world_size:
        raise PneumoscanError(f"{info.world_size - ready} of the {info.world_size} processes "
                              "stopped before training (their output says why): this one stops "
                              "too")


def is_peer_gone(e: BaseException) -> bool:
    """Whether ``e`` is torch failing to reach the other processes of the group (one ended,
    or never came)."""
    if isinstance(e, getattr(dist, "DistNetworkError", ())):
        return False  # this process's own network (a port in use), not another's absence
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e)
    return any(sign in text for sign in ("Connection closed by peer", "Connection reset by peer",
                                         "Broken pipe"))
