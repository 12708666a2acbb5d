"""Training throughput: the project's step against a plain eager PyTorch loop, same model.

project: ``pneumoscan.train.TrainStep`` as ``fit`` drives it. The data set is one uint8 tensor on
    the device, batches are gathered by index and augmented there (random affine per image), the
    recipe's optimizer and schedule, channels_last; on CUDA also bf16 autocast, the fused
    optimizer and (by default) torch.compile. No host sync inside the timed steps.
plain: what a typical PyTorch script does. A DataLoader over uint8 images on the host, with
    torchvision's RandomAffine(30, translate=(0.1, 0.1), scale=(0.8, 1.2)) per image, float32,
    default memory format, torch.optim.Adam (not fused), ``loss.item()`` every step;
    num_workers=0 on CPU, 8 workers with pinned memory on CUDA.

Warm-up steps (compilation included) are not timed; on CUDA the clock is read after a
synchronize. The last line printed is one JSON object with the figures and the command.

    python benchmarks/train_speed.py --model seed_cnn --image-size 64 --batch-size 32 --device cpu
    python benchmarks/train_speed.py --data ../shared/data/chest_xray_224 --device cuda
    python benchmarks/train_speed.py --model resnet18 --device cuda --modes graphs --profile 10

``--data DIR`` times whole epochs of the recipe (``seed`` unless told) on DIR's train split
instead of random images.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np

# The profiler's own log (--profile) would print an alarming "gpuGetDeviceCount failed" on
# machines without a GPU; its warnings and errors about itself are not this benchmark's business.
os.environ.setdefault("KINETO_LOG_LEVEL", "5")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout

from pneumoscan.config import RECIPES, TrainConfig, build_config  # noqa: E402
from pneumoscan.device import (  # noqa: E402
    capture_cuda_graphs,
    configure_device,
    resolve_device,
)
from pneumoscan.train import (  # noqa: E402
    TrainStep,
    balanced_class_weights,
    build_model,
    make_optimizer,
    make_scheduler,
    model_input,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="registry or timm name (default: the recipe's)")
    p.add_argument("--recipe", choices=list(RECIPES),
                   help="settings to use (default: seed for seed_cnn or --data, else strong)")
    p.add_argument("--image-size", type=int, help="default: the recipe's (224; cpu, quick: 64)")
    p.add_argument("--batch-size", type=int, help="the project's batch (default: the recipe's)")
    p.add_argument("--plain-batch-size", type=int, help="plain loop batch (default: the same)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--steps", type=int, help="timed steps per loop (default 30; --data: 1 epoch)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the project's model (default: on CUDA only)")
    p.add_argument("--modes", help="time the project's step in each of these modes, comma-"
                   "separated: eager, graphs (CUDA graphs of forward and backward, as fit() "
                   "runs on a GPU), compile, cudagraphs (compiled, mode reduce-overhead); "
                   "overrides --compile")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--data", help="time epochs on this folder's train split, not random images")
    p.add_argument("--skip-plain", action="store_true", help="time the project's step only")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="also profile this many eager steps and print the operators (on CUDA, "
                   "the kernels) that take the time")
    return p.parse_args(argv)


def make_config(args: argparse.Namespace, device: torch.device) -> TrainConfig:
    recipe = args.recipe or ("seed" if args.data or args.model in (None, "seed_cnn") else "strong")
    overrides = {"model": args.model, "image_size": args.image_size,
                 "batch_size": args.batch_size, "device": device.type}
    return build_config(recipe, device.type, overrides)  # None: the recipe's value


def load_images(args, cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, S, S) images and int64 labels: DIR's train split, or random ones."""
    if args.data:
        from pneumoscan.data.dataset import load_data

        data = load_data(args.data, cfg.image_size, val_fraction=cfg.val_fraction,
                         seed=cfg.seed, progress=False)
        return np.ascontiguousarray(data.train.images), data.train.labels
    n = max(1024, 8 * cfg.batch_size, 4 * (args.plain_batch_size or 0))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, cfg.image_size, cfg.image_size), dtype=np.uint8)
    return images, (np.arange(n) % 4 != 0).astype(np.int64)  # about Kermany's 3:1


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# mode: torch.compile's mode (None: not compiled). "graphs" is the eager model with its forward
# and backward captured as CUDA graphs, as fit() runs uncompiled models on a GPU.
COMPILE_MODES = {"eager": None, "graphs": None, "compile": "default",
                 "cudagraphs": "reduce-overhead"}


def make_project_step(cfg: TrainConfig, images: np.ndarray, labels: np.ndarray,
                      device: torch.device, *, mode: str, total_steps: int):
    """fit()'s step as fit() builds it, and the data on the device: (step, images, labels)."""
    configure_device(device)
    torch.manual_seed(cfg.seed)
    train_images = torch.from_numpy(images).to(device)
    train_labels = torch.from_numpy(labels).to(device)
    model = build_model(cfg).to(device).to(memory_format=torch.channels_last)  # as fit() does
    optimizer = make_optimizer(model, cfg, device)
    scheduler = make_scheduler(optimizer, dataclasses.replace(cfg, epochs=1), total_steps)
    weights = balanced_class_weights(np.bincount(labels, minlength=2)).to(device)
    compile_mode = COMPILE_MODES[mode]
    train_model = torch.compile(model, mode=compile_mode) if compile_mode else model
    if mode == "graphs":
        model.train()
        sample = model_input(train_images[: cfg.batch_size], cfg)
        capture_cuda_graphs(model, sample.contiguous(memory_format=torch.channels_last))
    step = TrainStep(train_model, optimizer, scheduler, cfg, weights, device,
                     torch.Generator(device=device).manual_seed(cfg.seed), channels_last=True)
    model.train()
    return step, train_images, train_labels


def time_project(cfg: TrainConfig, images: np.ndarray, labels: np.ndarray, device: torch.device,
                 *, steps: int, warmup: int, mode: str) -> float:
    """Images per second of fit()'s inner loop, timed over ``steps`` after ``warmup``."""
    total = warmup + steps
    step, train_images, train_labels = make_project_step(
        cfg, images, labels, device, mode=mode, total_steps=total)
    batches = _index_batches(len(images), cfg.batch_size, total, device)
    loss_sum = torch.zeros((), device=device)
    for i, idx in enumerate(batches):
        if i == warmup:
            sync(device)
            t0 = time.perf_counter()
        loss, _ = step(train_images[idx], train_labels[idx])
        loss_sum += loss  # kept on the device, as fit() does; read once at the end
    sync(device)
    seconds = time.perf_counter() - t0
    if not math.isfinite(float(loss_sum)):
        raise RuntimeError("project loop: loss is not finite")
    return steps * cfg.batch_size / seconds


def timed_events(events, *, on_gpu: bool) -> list:
    """The profiler's averaged events that carry the step's time, each counted once.

    On a GPU, the kernels (and copies) themselves: an operator's own device time repeats the
    time of the kernels it launched, and torch's own table likewise sums device time over
    device events only. On a CPU, every operator with time of its own.
    """
    from torch.autograd import DeviceType

    if on_gpu:
        return [e for e in events if e.device_type == DeviceType.CUDA
                and not getattr(e, "is_user_annotation", False) and e.self_device_time_total > 0]
    return [e for e in events if e.self_cpu_time_total > 0]


def profile_project(cfg: TrainConfig, images: np.ndarray, labels: np.ndarray,
                    device: torch.device, *, steps: int, warmup: int, rows: int = 15) -> list[dict]:
    """The operators (on CUDA: the kernels) that take the eager step's time, largest first.

    Eager, so that every kernel is seen by name (inside CUDA graphs and compiled code they are
    the same work, fused or launched together). Times are each operator's own, per step.
    """
    from torch.profiler import ProfilerActivity, profile

    total = warmup + steps
    step, train_images, train_labels = make_project_step(
        cfg, images, labels, device, mode="eager", total_steps=total)
    batches = list(_index_batches(len(images), cfg.batch_size, total, device))
    for idx in batches[:warmup]:
        step(train_images[idx], train_labels[idx])
    sync(device)
    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities, record_shapes=on_gpu) as prof:
        for idx in batches[warmup:]:
            step(train_images[idx], train_labels[idx])
        sync(device)
    if on_gpu:
        print_operators_by_shape(prof, steps, rows)
    key = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    events = timed_events(prof.key_averages(), on_gpu=on_gpu)
    whole = sum(getattr(e, key) for e in events) or 1.0
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    table = [{"op": e.key[:90], "calls_per_step": round(e.count / steps, 1),
              "ms_per_step": round(getattr(e, key) / steps / 1000, 3),
              "share": round(getattr(e, key) / whole, 4)} for e in events[:rows]]
    where = "GPU kernel and copy" if on_gpu else "CPU operator"
    print(f"profile: eager step, batch {cfg.batch_size}, {steps} steps, {whole / steps / 1000:.1f} "
          f"ms of {where} time a step; the largest, each its own time:")
    for row in table:
        print(f"  {row['share']:6.1%} {row['ms_per_step']:9.3f} ms {row['calls_per_step']:6.1f}x  "
              f"{row['op']}")
    return table


def print_operators_by_shape(prof, steps: int, rows: int) -> None:
    """On a GPU: the operators whose kernels take the step's time, each with its input shapes,
    which tell the layers apart (the kernels' own names rarely do)."""
    from torch.autograd import DeviceType

    events = [e for e in prof.key_averages(group_by_input_shape=True)
              if e.device_type == DeviceType.CPU and e.self_device_time_total > 0]
    whole = sum(e.self_device_time_total for e in events) or 1.0
    events.sort(key=lambda e: e.self_device_time_total, reverse=True)
    print(f"profile: the operators that launched the step's kernels, by input shape "
          f"({whole / steps / 1000:.1f} ms a step):")
    for e in events[:rows]:
        shapes = ", ".join(str(list(s)) for s in e.input_shapes if s)[:110]
        print(f"  {e.self_device_time_total / whole:6.1%} "
              f"{e.self_device_time_total / steps / 1000:9.3f} ms {e.count / steps:5.1f}x  "
              f"{e.key} {shapes}")


def _index_batches(n: int, batch: int, count: int, device: torch.device):
    """``count`` full batches of indices, a fresh permutation each time the data runs out."""
    made = 0
    while made < count:
        perm = torch.randperm(n).to(device)
        for start in range(0, n - batch + 1, batch):
            if made == count:
                return
            yield perm[start : start + batch]
            made += 1


class AugmentedImages(torch.utils.data.TensorDataset):
    """A TensorDataset of uint8 images with a torchvision transform applied per image."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform):
        super().__init__(images, labels)
        self.transform = transform

    def __getitem__(self, i):
        image, label = super().__getitem__(i)
        return self.transform(image.unsqueeze(0)), label


def time_plain(cfg: TrainConfig, images: np.ndarray, labels: np.ndarray, device: torch.device,
               *, batch_size: int, steps: int, warmup: int) -> float:
    """Images per second of a typical eager PyTorch loop on the same model and data."""
    from torchvision import transforms

    torch.manual_seed(cfg.seed)
    a = cfg.augment  # the recipe's numbers; torchvision zooms both axes alike
    augment = transforms.RandomAffine(a.rotation_deg, translate=(a.shift, a.shift),
                                      scale=(1 - a.zoom, 1 + a.zoom))
    dataset = AugmentedImages(torch.from_numpy(images), torch.from_numpy(labels), augment)
    # Every core for the loader on a GPU machine: per-image augmentation there must not be
    # what holds the plain loop back.
    workers = min(16, os.cpu_count() or 1) if device.type == "cuda" else 0
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=workers,
        pin_memory=device.type == "cuda", persistent_workers=workers > 0,
    )
    model = build_model(cfg).to(device)
    # The recipe's optimizer and loss, written as a plain script would: not fused, no schedule.
    optimizer_class = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    optimizer = optimizer_class(model.parameters(), lr=cfg.lr, eps=cfg.adam_eps,
                                weight_decay=cfg.weight_decay)
    weights = balanced_class_weights(np.bincount(labels, minlength=2)).to(device)
    model.train()

    done, running, t0 = 0, 0.0, 0.0
    if warmup == 0:
        sync(device)
        t0 = time.perf_counter()
    while done < warmup + steps:
        for x, y in loader:  # the clock runs from the end of the last warm-up step
            x, y = x.to(device), y.to(device)
            x = (x.float() / 255 - cfg.mean) / cfg.std
            if cfg.in_chans > 1:
                x = x.expand(-1, cfg.in_chans, -1, -1)
            loss = F.cross_entropy(model(x), y, weight=weights,
                                   label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            running += loss.item()
            done += 1
            if done == warmup:
                sync(device)
                t0 = time.perf_counter()
            if done == warmup + steps:
                break
    sync(device)
    return steps * batch_size / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cfg = make_config(args, device)
    plain_batch = args.plain_batch_size or cfg.batch_size
    compile_model = device.type == "cuda" if args.compile is None else args.compile
    modes = (args.modes or ("compile" if compile_model else "eager")).split(",")
    if unknown := set(modes) - set(COMPILE_MODES):
        raise SystemExit(f"--modes: unknown {', '.join(sorted(unknown))}; "
                         f"choose from {', '.join(COMPILE_MODES)}")
    if device.type != "cuda" and {"graphs", "cudagraphs"} & set(modes):
        raise SystemExit("--modes graphs and cudagraphs need a CUDA GPU")
    images, labels = load_images(args, cfg)
    n = len(images)
    if n < max(cfg.batch_size, plain_batch):
        raise SystemExit(f"{n} images: fewer than one batch")
    project_steps = args.steps or (n // cfg.batch_size if args.data else 30)
    plain_steps = args.steps or (n // plain_batch if args.data else 30)
    print(f"{cfg.model} ({cfg.recipe} recipe), {cfg.image_size} px, {n} images, device "
          f"{device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")

    by_mode = {}
    for mode in modes:
        t0 = time.perf_counter()
        by_mode[mode] = time_project(cfg, images, labels, device, steps=project_steps,
                                     warmup=args.warmup, mode=mode)
        print(f"project: batch {cfg.batch_size}, {project_steps} steps, {mode}: "
              f"{by_mode[mode]:,.1f} images/s ({time.perf_counter() - t0:.0f} s with warm-up)",
              flush=True)
    best_mode = max(by_mode, key=by_mode.get)
    project = by_mode[best_mode]
    plain = None
    if not args.skip_plain:
        plain = time_plain(cfg, images, labels, device, batch_size=plain_batch,
                           steps=plain_steps, warmup=args.warmup)
        print(f"plain:   batch {plain_batch}, {plain_steps} steps: {plain:,.1f} images/s")
        print(f"ratio:   {project / plain:.2f}x ({best_mode})")

    profile = None
    if args.profile:
        profile = profile_project(cfg, images, labels, device, steps=args.profile,
                                  warmup=args.warmup)

    result = {
        "model": cfg.model,
        "image_size": cfg.image_size,
        "batch_size": cfg.batch_size,
        "device": str(device),
        "project_images_per_s": round(project, 1),
        "plain_images_per_s": round(plain, 1) if plain else None,
        "ratio": round(project / plain, 2) if plain else None,
        "torch": torch.__version__,
        "command": shlex.join(["python", "benchmarks/train_speed.py", *(argv or sys.argv[1:])]),
        "recipe": cfg.recipe,
        "plain_batch_size": plain_batch,
        "mode": best_mode,
        "modes": {m: round(v, 1) for m, v in by_mode.items()},
        "steps": project_steps,
        "threads": torch.get_num_threads(),
    }
    if profile is not None:
        result["profile"] = profile
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
    if args.data:  # whole epochs of the train split, as a run would see them
        result["train_images"] = n
        result["project_epoch_s"] = round(n / project, 2)
        if plain:
            result["plain_epoch_s"] = round(n / plain, 2)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
