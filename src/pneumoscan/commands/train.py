"""pneumoscan train: one run, or one run per seed with a summary."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import time
from pathlib import Path

from pneumoscan.commands.train_options import SEED, add_train_options, config_from_args
from pneumoscan.errors import PneumoscanError


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_train_options(p)
    p.add_argument(
        "--seeds",
        help="comma-separated seeds: one run per seed in OUT/seed-N, "
        "then OUT/seeds_summary.json (mean, std, range of each figure)",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue an interrupted run from OUT/checkpoint.pt"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars or epoch lines")


def run(args: argparse.Namespace) -> int:
    from pneumoscan.distributed import env_world_size
    from pneumoscan.run_folder import new_run_folder

    if args.out is None:  # each run its own folder: none is written over
        if args.resume:
            raise PneumoscanError("--resume: give --out, the folder of the run to continue")
        if env_world_size() > 1:  # the processes could not agree on a new folder's name
            raise PneumoscanError("under torchrun, give --out: the run's folder")
        made = new_run_folder()
        print(f"run directory: {made} (--out chooses another)")
        args.out = str(made)
        try:
            return _train(args)
        except BaseException:
            if not any(made.iterdir()):  # refused before it wrote anything: leave no folder
                made.rmdir()
            raise
    return _train(args)


def _train(args: argparse.Namespace) -> int:
    from pneumoscan.config import check_batch_per_process
    from pneumoscan.device import resolve_device
    from pneumoscan.distributed import agree_to_start, env_world_size, process_group

    # What the command line alone decides, refused alike by every process at once.
    cfg = config_from_args(args)
    seeds = _parse_seeds(args.seeds) if args.seeds else None
    if seeds and args.seed is not None:
        raise PneumoscanError("--seed and --seeds: give one of them")
    # Under torchrun the batch is split across the processes: each needs two images or more.
    check_batch_per_process(cfg.batch_size, env_world_size())
    # What each machine decides for itself (its --out, its --data) comes after joining the
    # group, so that a process which refuses tells the others: they would otherwise wait in
    # their first collective for torch's timeout (30 minutes), without a word.
    with process_group(resolve_device(cfg.device).type) as dist_info, \
            contextlib.ExitStack() as stack:
        try:
            data = _checked_start(cfg, args, seeds, stack, dist_info.is_main)
        except (PneumoscanError, OSError):
            agree_to_start(False, dist_info)
            raise
        agree_to_start(True, dist_info)
        from pneumoscan.pipeline import train_run

        if not seeds:
            data.imports_done()
            train_run(cfg, resume=args.resume, progress=not args.quiet,
                      process_started=_process_started(), data=data)
            return 0
        summaries = []
        # One process group for all the seeds' trainings under torchrun; rank 0 alone speaks.
        for i, seed in enumerate(seeds):
            seed_cfg = dataclasses.replace(cfg, seed=seed, out=str(Path(cfg.out) / f"seed-{seed}"))
            if dist_info.is_main:
                print(f"== seed {seed} -> {seed_cfg.out}")
            summaries.append(train_run(seed_cfg, resume=args.resume, progress=not args.quiet,
                                       warn=i == 0))
    if dist_info.is_main:
        from pneumoscan.seeds import write_seed_summary

        write_seed_summary(Path(cfg.out), seeds, summaries)
    return 0


def _checked_start(cfg, args: argparse.Namespace, seeds: list[int] | None,
                   stack: contextlib.ExitStack, is_main: bool):
    """The checks of this machine's --out, and for one run its data loading in the background
    (entered on ``stack``, and returned; None for --seeds, whose runs load their own)."""
    from pneumoscan.allocator import low_memory_mode
    from pneumoscan.data.background import loading_in_background
    from pneumoscan.data.dataset import training_data_options
    from pneumoscan.run_folder import check_out_folder

    check_out_folder(cfg.out, resume=args.resume, seeds=seeds)
    low_memory_mode(cfg.low_memory)  # before anything large is allocated
    if seeds:
        return None
    options = training_data_options(cfg, not args.quiet, is_main)
    # The images decode while the rest of training's modules import (scikit-learn's alone
    # takes 1-2 s) and the GPU warms up.
    return stack.enter_context(loading_in_background(cfg.data, cfg.image_size, **options))


def _process_started() -> float | None:
    age = process_age_s()
    return None if age is None else time.perf_counter() - age


def process_age_s() -> float | None:
    """Seconds since this process started (Linux's /proc); None where that cannot be read.

    Importing torch and the model libraries can take seconds on a cold start, a share of a
    short GPU run worth showing.
    """
    import os

    try:
        with open("/proc/self/stat") as f:
            # Field 22 is the start time in clock ticks after boot; the command name (field 2,
            # in parentheses) may hold spaces, so count from its closing parenthesis.
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        age = uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
    return age if 0 <= age < 86_400 else None


def _parse_seeds(text: str) -> list[int]:
    try:
        seeds = [SEED(s) for s in text.split(",") if s.strip()]
    except argparse.ArgumentTypeError as e:
        raise PneumoscanError(f"--seeds {text!r}: {e}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise PneumoscanError(f"--seeds {text!r}: expected distinct integers, e.g. 0,1,2")
    return seeds
