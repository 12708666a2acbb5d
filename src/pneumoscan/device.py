"""The device a model runs on, and what makes it fast there.

Choosing the device (``--device``), and on a GPU: bf16 autocast, cuDNN's search for the fastest
convolutions, CUDA graphs, and whether ``torch.compile`` pays for its warm-up.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn

from pneumoscan.config import CUDA_GRAPHS_REFUSED, TrainConfig
from pneumoscan.distributed import DistInfo
from pneumoscan.errors import PneumoscanError

# Compilation costs 30-50 s on a GPU and saves at most a third of the step time, so it pays
# only for runs of about three minutes or more of eager training: about this many images at
# 224 px (ResNet-18 trains some 12,000 images/s eager on an H200-class GPU).
COMPILE_MIN_IMAGES_224 = 2_000_000

# Images at 224 px (smaller ones counted by their area) that take a 2-core CPU about an hour
# or more: ResNet-18 trains some 7 images/s there, the report's CNN some 23.
CPU_HOURS_WORK_224 = 50_000


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise PneumoscanError("--device cuda: no CUDA GPU is available here; use --device cpu")
    if name not in ("cpu", "cuda"):
        raise PneumoscanError(f"unknown device {name!r}: choose auto, cpu or cuda")
    return torch.device(name)


def configure_device(device: torch.device) -> None:
    """Let cuDNN pick the fastest convolution for each shape (the shapes never change)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def autocast(device: torch.device):
    """bf16 on a GPU; full precision on the CPU (these CPUs have no fast bf16)."""
    if device.type == "cuda":
        # No cast cache: CUDA-graphed models need none (and CNN weights are cast once anyway).
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()


def sync(device: torch.device) -> None:
    """Wait for the GPU, so that a clock read next measures the work queued before."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def capture_cuda_graphs(model: nn.Module, sample: torch.Tensor) -> None:
    """Capture the model's training forward and backward as CUDA graphs, in place.

    In training mode ``model(x)`` then replays the graphs (one launch instead of hundreds: the
    step stops waiting on Python at small batches); in eval mode it runs as before. A graph
    holds one input shape, so the caller feeds full batches only. The capture runs three
    warm-up passes, which would move BatchNorm's running statistics: they are put back.
    """
    buffers = [b.detach().clone() for b in model.buffers()]
    # The capture warms up on a side stream, then every step's backward runs on the main one:
    # torch warns once about each (no current context for cuBLAS in the warm-up thread; the
    # gradient accumulators made on the side stream). Both are expected here and harmless.
    quiet = getattr(torch.autograd.graph, "set_warn_on_accumulate_grad_stream_mismatch", None)
    if quiet is not None:
        quiet(False)
    with autocast(sample.device), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*no current CUDA context")
        torch.cuda.make_graphed_callables(model, (sample,))
    with torch.no_grad():
        for live, saved in zip(model.buffers(), buffers, strict=True):
            live.copy_(saved)


def release_cuda_graphs(model: nn.Module) -> None:
    model.__dict__.pop("forward", None)  # the class's own forward again


def work_224(cfg: TrainConfig, train_images: int) -> float:
    """The images a run trains on, counted as 224 px images by their area."""
    return cfg.epochs * train_images * (cfg.image_size / 224) ** 2


def should_compile(cfg: TrainConfig, device: torch.device, train_images: int) -> bool:
    if cfg.compile is not None:
        return cfg.compile
    return device.type == "cuda" and work_224(cfg, train_images) >= COMPILE_MIN_IMAGES_224


def should_graph(cfg: TrainConfig, device: torch.device, dist_info: DistInfo, compiled: bool,
                 batch: int, shard: int) -> bool:
    """CUDA graphs for uncompiled single-process GPU runs.

    Not with torch.compile (its own graphs are its business) nor under torchrun, where
    DistributedDataParallel's gradient hooks must run between the graphed passes.
    """
    if cfg.cuda_graphs and (device.type != "cuda" or dist_info.enabled):
        raise PneumoscanError(CUDA_GRAPHS_REFUSED)
    wanted = device.type == "cuda" if cfg.cuda_graphs is None else cfg.cuda_graphs
    return wanted and not compiled and not dist_info.enabled and shard >= batch
