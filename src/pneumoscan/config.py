"""Training configuration: one small dataclass, and the named recipes that fill it in.

Every command-line flag of ``train`` maps onto one field here, and the resolved config is saved
with every run as ``config.json``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from pneumoscan.errors import PneumoscanError


@dataclass
class AugmentConfig:
    rotation_deg: float = 30.0  # uniform in [-r, r], per image
    zoom: float = 0.2  # each axis independently uniform in [1 - z, 1 + z]
    shift: float = 0.1  # fraction of width and of height, each way
    hflip: bool = False  # chest X-rays are not left-right symmetric: off by default

    @property
    def changes_images(self) -> bool:
        """Whether any range is set; with none, augmentation leaves the images as they are."""
        return bool(self.rotation_deg or self.zoom or self.shift or self.hflip)


# Augmentations by name (``--augment``). The report's is strong for chest X-rays, which are
# taken upright and centred; the light one trained better on a patient-grouped validation split
# at 64 px (see the README's recipe figures).
AUGMENTATIONS: dict[str, AugmentConfig] = {
    "report": AugmentConfig(),  # the dataclass's defaults are the report's: 30 deg, 0.2, 0.1
    "light": AugmentConfig(rotation_deg=10.0, zoom=0.1, shift=0.05),
    "none": AugmentConfig(rotation_deg=0.0, zoom=0.0, shift=0.0),
}


@dataclass
class TrainConfig:
    data: str = "pneumoniamnist"  # folder, or pneumoniamnist[:SIZE]
    out: str = "runs/latest"  # run directory
    recipe: str = "auto"  # the named recipe these fields were resolved from
    model: str = "seed_cnn"  # registry name, or any timm model
    pretrained: str = ""  # "", "timm" (download) or a local weights file (timm models)
    image_size: int = 224  # images are decoded to this square size, in pixels
    in_chans: int = 3  # gray replicated to this many channels (the report fed RGB)
    mean: float = 0.0  # intensity scaling: (x / 255 - mean) / std
    std: float = 1.0  # (0 and 1: the report's plain x / 255)
    epochs: int = 50  # at most: early stopping may end the run sooner
    batch_size: int = 32  # images a step, over all processes under torchrun
    lr: float = 1e-3  # at batch_size (already scaled when the batch was changed)
    optimizer: str = "adam"  # adam | adamw
    adam_eps: float = 1e-7  # Keras' Adam epsilon, kept for the report's recipe
    weight_decay: float = 0.0  # AdamW's decoupled decay (adam takes none)
    schedule: str = "constant"  # constant | onecycle
    warmup_fraction: float = 0.3  # one-cycle: share of steps spent warming up
    warmup_epochs: float = 0.0  # constant schedule: linear warm-up over this many epochs
    label_smoothing: float = 0.0  # share of each target spread over both classes
    class_weights: bool = True  # 'balanced' weights, n / (2 * n_class), from the full train split
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    early_stop_patience: int = 10  # epochs without val-loss improvement; 0 turns it off
    early_stop_min_delta: float = 0.001  # the least fall in val loss that counts
    restore_best: bool = True  # end with the best val-loss weights (else the last ones)
    val_fraction: float = 0.1  # carved from train by patient when there is no usable val/
    seed: int = 0  # weights, augmentation, shuffling and the validation carve
    device: str = "auto"  # auto | cpu | cuda
    compile: bool | None = None  # None: on for CUDA when the run is long enough to pay for it
    cuda_graphs: bool | None = None  # None: on for uncompiled single-GPU CUDA runs
    low_memory: bool = False  # give freed buffers back at once: lower peak, slower (allocator.py)
    threshold_rule: str = "youden"  # youden | sensitivity:X | fixed:X, chosen on validation data
    eval_batch_size: int = 0  # 0: as many images as fit a fixed pixel budget (preprocess.py)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        # Every key must be a field: a misspelt override fails here rather than being dropped.
        d = dict(d)
        augment = AugmentConfig(**d.pop("augment", {}))
        return cls(augment=augment, **d)


# The report's recipe as written: its CNN, optimizer, batch, class weights, augmentation and
# early stopping on validation loss with the best weights restored.
SEED = dict(
    model="seed_cnn",
    image_size=224,
    in_chans=3,
    mean=0.0,
    std=1.0,
    epochs=50,
    batch_size=32,
    lr=1e-3,
    optimizer="adam",
    adam_eps=1e-7,
    weight_decay=0.0,
    schedule="constant",
    label_smoothing=0.0,
    class_weights=True,
    early_stop_patience=10,
    early_stop_min_delta=0.001,
    restore_best=True,
    augment="report",
)

# A standard residual network from scratch with a one-cycle schedule and the last weights: steadier
# than early stopping on a noisy validation loss. Light augmentation and 15 epochs were chosen on
# the patient-grouped hold-out of Kermany's train split (one H200, three seeds each): 0.968
# against 0.964 for 30 epochs and 0.953 for 30 epochs with the report's augmentation; in half the
# time of 30 (benchmarks/README.md).
STRONG = dict(
    model="resnet18",
    image_size=224,
    in_chans=1,
    mean=0.5,
    std=0.25,
    epochs=15,
    batch_size=64,
    lr=2e-3,
    optimizer="adamw",
    adam_eps=1e-8,
    weight_decay=0.05,
    schedule="onecycle",
    label_smoothing=0.1,
    class_weights=True,
    early_stop_patience=0,
    restore_best=False,
    augment="light",
)

# The same network and schedule at 64 px for 6 epochs with the light augmentation: about 6 minutes
# on a 2-core CPU on Kermany's train split, decoding included. Chosen on a patient-grouped
# validation split over 96 px and 10 epochs with the report's augmentation (validation accuracy
# 0.974 against 0.969, three seeds each; the README's recipe figures).
CPU = dict(STRONG, image_size=64, epochs=6, augment="light")

# A first model in under three minutes on a 2-core CPU: timm's ResNet-10-T (one block a stage,
# about half the arithmetic of ResNet-18) for 4 epochs. Chosen on validation over ResNet-18 at
# 48 px for 4 epochs (slower) and ResNet-10-T for 5 epochs (less accurate).
QUICK = dict(CPU, model="resnet10t", epochs=4)

CUDA_GRAPHS_REFUSED = ("--cuda-graphs needs a CUDA GPU and a single process (not torchrun); "
                       "leave it out to choose automatically")

RECIPES: dict[str, dict] = {"seed": SEED, "strong": STRONG, "cpu": CPU, "quick": QUICK}
GPU_RECIPES = ("seed", "strong")  # 224 px: hours on a CPU


def resolve_recipe(name: str, device_type: str) -> str:
    """'auto' picks the strong recipe on a GPU and the CPU one otherwise."""
    if name == "auto":
        return "strong" if device_type == "cuda" else "cpu"
    if name not in RECIPES:
        raise PneumoscanError(f"unknown recipe {name!r}: choose auto, {', '.join(RECIPES)}")
    return name


LARGE_BATCH_WARMUP_EPOCHS = 2.0  # a constant-rate recipe's warm-up when its batch is raised


def build_config(recipe: str, device_type: str, overrides: dict) -> TrainConfig:
    """The recipe's fields, then every override the user gave (None means 'not given').

    A batch other than the recipe's, with no ``lr`` given, scales the recipe's learning rate
    (see ``scaled_lr``); an ``lr`` given is used as it is.
    """
    name = resolve_recipe(recipe, device_type)
    values = dict(RECIPES[name])
    given = {k: v for k, v in overrides.items() if v is not None}
    values.update(given)
    augment = values.get("augment")
    if isinstance(augment, str):  # a name, from a recipe or --augment
        if augment not in AUGMENTATIONS:
            raise PneumoscanError(
                f"unknown augmentation {augment!r}: choose {', '.join(AUGMENTATIONS)}"
            )
        values["augment"] = dataclasses.asdict(AUGMENTATIONS[augment])
    recipe_batch = RECIPES[name]["batch_size"]
    if "lr" not in given and values["batch_size"] != recipe_batch:
        values["lr"] = scaled_lr(RECIPES[name]["lr"], recipe_batch, values["batch_size"])
        larger = values["batch_size"] > recipe_batch
        if larger and values.get("schedule", "constant") == "constant":
            # One-cycle recipes warm up already; a constant rate raised for a larger batch
            # gets a short linear warm-up so the first steps do not throw the weights off.
            values["warmup_epochs"] = LARGE_BATCH_WARMUP_EPOCHS
    values["recipe"] = name
    return TrainConfig.from_dict(values)


def check_pretrained(model: str, pretrained: str, *, source: bool = False) -> None:
    """Refuse --pretrained for seed_cnn; with ``source``, also when the weights cannot be had
    (no such file, or timm's hub out of reach), so that a run fails before decoding."""
    if not pretrained:
        return
    if model == "seed_cnn":
        raise PneumoscanError("--pretrained applies to timm backbones; seed_cnn has no weights")
    if not source:
        return
    if pretrained == "timm":
        from pneumoscan.models.timm_models import require_published_weights

        require_published_weights(model)
    elif not Path(pretrained).is_file():
        raise PneumoscanError(f"{pretrained}: pretrained weights file not found")


def check_batch_per_process(batch_size: int, world_size: int) -> int:
    """The batch each process trains on; BatchNorm needs at least two images in it, and the
    processes' batches must add up to the global one, whose learning rate the run uses."""
    per_process = batch_size // world_size
    if per_process < 2:
        raise PneumoscanError(
            f"--batch-size {batch_size} over {world_size} processes leaves {per_process} "
            f"image(s) a step to each; use --batch-size {2 * world_size} or more"
        )
    if batch_size % world_size:
        fits = [b for b in (per_process * world_size, (per_process + 1) * world_size)
                if b >= 2 * world_size]
        raise PneumoscanError(
            f"the batch of {batch_size} does not split evenly over {world_size} processes; "
            f"give --batch-size {' or '.join(map(str, fits))}"
        )
    return per_process


def scaled_lr(lr: float, recipe_batch: int, batch: int) -> float:
    """The recipe's learning rate carried to another batch size by the square-root rule.

    Adam-family optimizers (every recipe here) keep the same training dynamics when the rate
    grows with the square root of the batch (Malladi et al., 2022, "On the SDEs and Scaling
    Rules for Adaptive Gradient Algorithms"); the linear rule is SGD's.
    """
    return lr * math.sqrt(batch / recipe_batch)


def describe_lr(cfg: TrainConfig) -> str:
    """One line stating the batch and learning rate a run uses, and where the rate came from."""
    recipe = RECIPES.get(cfg.recipe, {})
    base_batch, base_lr = recipe.get("batch_size"), recipe.get("lr")
    line = f"batch {cfg.batch_size}, lr {cfg.lr:.3g}"
    if base_batch and cfg.batch_size != base_batch and math.isclose(
        cfg.lr, scaled_lr(base_lr, base_batch, cfg.batch_size), rel_tol=1e-9
    ):
        line += (f" (the {cfg.recipe} recipe's {base_lr:g} at batch {base_batch}, "
                 "scaled by the square root of the batch ratio")
        line += f", {cfg.warmup_epochs:g} warm-up epochs)" if cfg.warmup_epochs else ")"
    elif base_lr is not None and math.isclose(cfg.lr, base_lr, rel_tol=1e-9):
        line += f" (the {cfg.recipe} recipe's)"
    else:
        line += " (as given)"
    return line
