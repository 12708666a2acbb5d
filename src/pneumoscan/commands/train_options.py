"""Options shared by ``train`` and ``cv``: each maps onto one TrainConfig field."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from pneumoscan.config import (
    AUGMENTATIONS,
    CUDA_GRAPHS_REFUSED,
    RECIPES,
    TrainConfig,
    build_config,
    check_pretrained,
)
from pneumoscan.errors import PneumoscanError
from pneumoscan.run_folder import has_checkpoint
from pneumoscan.threshold_rules import parse_threshold_rule


def add_device_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where to run: auto is a CUDA GPU when there is one, else the CPU")


def int_at_least(low: int, high: int | None = None):
    """An argparse type: a whole number of at least ``low`` (and at most ``high``)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            wanted = f"of at least {low}" if high is None else f"from {low} to {high}"
            raise argparse.ArgumentTypeError(f"expected a whole number {wanted}, got {text!r}")
        return value

    return parse


# Square input sizes the commands take: chest X-ray models work at 28 to 1,024 px; a data set
# decoded at more would not fit in memory (5,216 images at 4,096 px are 87 GB).
IMAGE_SIZE = int_at_least(8, 2048)


# Seeds numpy and scikit-learn accept (0 to 2**32 - 1), with room for cv's seed + fold.
SEED = int_at_least(0, 2**31 - 1)


def float_between(low: float, high: float):
    """An argparse type: a number strictly between ``low`` and ``high``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not low < value < high:  # NaN fails too
            wanted = (f"a number above {low:g}" if high == math.inf
                      else f"a number above {low:g} and below {high:g}")
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
        return value

    return parse


def add_train_options(p: argparse.ArgumentParser, *, with_out: bool = True) -> None:
    p.add_argument(
        "--data",
        default="pneumoniamnist",
        help="folder (class folders, or train/ val/ test/ holding them), or "
        "pneumoniamnist[:SIZE] (downloaded; the default)",
    )
    if with_out:
        p.add_argument("--out", help="run directory (default: a new runs/run-N)")
    p.add_argument(
        "--recipe",
        default="auto",
        choices=["auto", *RECIPES],
        help="auto (the default): strong on a GPU, cpu otherwise; strong: the most accurate, "
        "for a GPU; cpu: the most accurate in minutes on a CPU; quick: a first model in under "
        "3 minutes on a CPU; seed: the original course report's CNN and recipe, as written",
    )
    p.add_argument("--model", help="registry name or any timm model (see `pneumoscan models`); "
                   "default: the recipe's")
    p.add_argument(
        "--pretrained",
        nargs="?",
        const="timm",
        default=None,
        metavar="PATH",
        help="start from timm's weights (from the Hugging Face cache, else the network) or "
        "a local weights file",
    )
    p.add_argument("--image-size", type=IMAGE_SIZE,
                   help="square input size in pixels; default: the recipe's")
    p.add_argument("--epochs", type=int_at_least(1), help="default: the recipe's")
    # BatchNorm needs two images of a batch to train on.
    p.add_argument("--batch-size", type=int_at_least(2),
                   help="images a step (all processes together); default: the recipe's")
    p.add_argument("--lr", type=float_between(0.0, math.inf),
                   help="(peak) learning rate; default: the recipe's, scaled when --batch-size "
                   "changes it")
    p.add_argument(
        "--augment",
        choices=list(AUGMENTATIONS),
        help="training augmentation (rotation in degrees / zoom / shift): "
        + ", ".join(f"{name} {a.rotation_deg:g}/{a.zoom:g}/{a.shift:g}"
                    for name, a in AUGMENTATIONS.items())
        + "; default: the recipe's",
    )
    p.add_argument("--seed", type=SEED, help="random seed (default 0)")
    add_device_option(p)
    p.add_argument(
        "--val-fraction",
        type=float_between(0.0, 0.5),
        help="share of train carved by patient for validation (default 0.1)",
    )
    p.add_argument(
        "--threshold-rule",
        type=parse_threshold_rule,
        help="youden (default), sensitivity:0.95 or fixed:0.5; chosen on validation",
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the model (default: on for long CUDA runs)",
    )
    p.add_argument(
        "--low-memory",
        action="store_true",
        default=None,
        help="hold less memory at the cost of speed: large freed buffers go back to the system "
        "at once, and seed_cnn recomputes its full-resolution layers in backward (the seed "
        "recipe at 224 px on a CPU: 1.6 GiB instead of 2.3 GiB, 1.8 times as long)",
    )
    p.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="replay the model's training step as CUDA graphs (default: on for uncompiled "
        "single-GPU runs)",
    )


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    # Imported here, not at the top: building the parser (and --help) must not wait for torch.
    from pneumoscan.device import resolve_device
    from pneumoscan.distributed import env_world_size
    from pneumoscan.models import check_input_size, create_model

    device_type = resolve_device(args.device).type
    overrides = {
        "data": args.data,
        "out": getattr(args, "out", None),
        "model": args.model,
        "pretrained": args.pretrained,
        "image_size": args.image_size,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "augment": args.augment,
        "seed": args.seed,
        "device": args.device,
        "val_fraction": args.val_fraction,
        "threshold_rule": args.threshold_rule,
        "compile": args.compile,
        "cuda_graphs": args.cuda_graphs,
        "low_memory": args.low_memory,
    }
    # A run resumed from its checkpoint takes its weights from there, not from --pretrained.
    resuming = getattr(args, "resume", False) and args.out is not None and has_checkpoint(
        Path(args.out))
    recipe = args.recipe
    if resuming and recipe == "auto":
        # 'auto' follows the device: a run started on a CPU (cpu recipe) and resumed on a GPU
        # would become a strong run. It goes on as it started, as --device may change.
        recipe = _started_recipe(Path(args.out)) or recipe
    cfg = build_config(recipe, device_type, overrides)
    # Before any image is decoded: what cannot train fails at once.
    if cfg.cuda_graphs and (device_type != "cuda" or env_world_size() > 1):
        raise PneumoscanError(CUDA_GRAPHS_REFUSED)
    check_pretrained(cfg.model, cfg.pretrained, source=not resuming)
    check_input_size(cfg.model, in_chans=cfg.in_chans, image_size=cfg.image_size)
    if not resuming and cfg.pretrained not in ("", "timm"):
        # A weights file is read and fitted to the network now, so that one which does not
        # fit is refused before any image decodes and before --out is touched.
        create_model(cfg.model, in_chans=cfg.in_chans, image_size=cfg.image_size,
                     pretrained=cfg.pretrained)
    return cfg


def _started_recipe(out: Path) -> str | None:
    """The recipe the run in ``out`` (or its first seed-N run) was resolved to, if it says."""
    import json

    for config in (out / "config.json", *sorted(out.glob("seed-*/config.json"))):
        try:
            recipe = json.loads(config.read_text()).get("recipe")
        except (OSError, ValueError, AttributeError):
            continue
        if recipe in RECIPES:
            return recipe
    return None
