"""A trained model on disk: weights as safetensors beside a JSON sidecar that says how to use them.

``model.json`` carries the architecture, image size, channels, class names, intensity scaling,
decision threshold, temperature and data fingerprint, so every later command reads them from the
run rather than having them typed again. Nothing here unpickles anything.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pneumoscan import CLASS_NAMES
from pneumoscan.device import autocast
from pneumoscan.errors import PneumoscanError
from pneumoscan.fileio import atomic_write, atomic_write_json, read_json
from pneumoscan.models import create_model
from pneumoscan.preprocess import eval_batch_size, to_model_input
from pneumoscan.run_folder import CHECKPOINT

FORMAT = "pneumoscan-model"
FORMAT_VERSION = 1
KINDS = ("single", "ensemble", "stack")

# field -> (accepted types, required); checked before anything in model.json is used.
_SCHEMA: dict[str, tuple[tuple[type, ...], bool]] = {
    "format": ((str,), True),
    "format_version": ((int,), True),
    "kind": ((str,), True),
    "architecture": ((str,), False),
    "image_size": ((int,), True),
    "in_chans": ((int,), False),
    "class_names": ((list,), True),
    "intensity": ((dict,), False),
    "threshold": ((float, int), True),
    "threshold_rule": ((str,), False),
    "temperature": ((float, int), True),
    "data_fingerprint": ((str,), False),
    "members": ((list,), False),
    "stacker": ((dict,), False),
    "validation": ((dict, type(None)), False),
}


def validate_meta(meta: Any, where: str) -> dict:
    """Raise a one-line PneumoscanError unless ``meta`` is a well-formed model.json."""

    def bad(reason: str) -> PneumoscanError:
        return PneumoscanError(f"{where}: invalid model.json: {reason}")

    if not isinstance(meta, dict):
        raise bad("not a JSON object")
    for key, (types, required) in _SCHEMA.items():
        if key not in meta:
            if required:
                raise bad(f"missing {key!r}")
            continue
        value = meta[key]
        if isinstance(value, bool) or not isinstance(value, types):
            raise bad(f"{key!r} has the wrong type ({type(value).__name__})")
    if meta["format"] != FORMAT or meta["format_version"] > FORMAT_VERSION:
        raise bad(f"format {meta['format']!r} v{meta['format_version']} is not supported")
    if meta["kind"] not in KINDS:
        raise bad(f"kind must be one of {', '.join(KINDS)}")
    if list(meta["class_names"]) != list(CLASS_NAMES):
        raise bad(f"class_names must be {list(CLASS_NAMES)}")
    if not 0.0 <= float(meta["threshold"]) <= 1.0:
        raise bad("threshold must be within [0, 1]")
    if not 0 < float(meta["temperature"]) < math.inf:
        raise bad("temperature must be positive and finite")
    if not 8 <= meta["image_size"] <= 4096:
        raise bad("image_size must be within [8, 4096]")
    if meta["kind"] == "single":
        for key in ("architecture", "in_chans", "intensity"):
            if key not in meta:
                raise bad(f"missing {key!r}")
        if not 1 <= meta["in_chans"] <= 4:
            raise bad("in_chans must be within [1, 4]")
        scaling = [meta["intensity"].get(k) for k in ("mean", "std")]
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in scaling) or not (
            scaling[1] > 0
        ):
            raise bad("'intensity' needs a finite 'mean' and a positive 'std'")
    else:
        # "." or "" would make the run its own member and recurse without end.
        members = meta.get("members") or []
        if not members or not all(isinstance(m, str) and m not in ("", ".") and "/" not in m
                                  and "\\" not in m and ".." not in m for m in members):
            raise bad("an ensemble or stack needs 'members': sub-folder names of the run")
        if meta["kind"] == "stack":
            reason = _stacker_problem(meta.get("stacker"), len(members))
            if reason:
                raise bad(reason)
    return meta


def _is_finite_number(value: Any) -> bool:
    # bool is an int to Python, but true/false in model.json is no coefficient.
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _stacker_problem(stacker: Any, n_members: int) -> str:
    """Why a stack's ``stacker`` cannot be applied to its members ("" when it can).

    Checked here, once, so that predict, evaluate and export never meet a stacker they would
    crash on (a KeyError or a shape mismatch deep in numpy).
    """
    if not isinstance(stacker, dict):
        return "a stack needs 'stacker': {\"coef\": [...], \"intercept\": x}"
    coef = stacker.get("coef")
    if not (isinstance(coef, list) and len(coef) == n_members
            and all(_is_finite_number(c) for c in coef)):
        return f"'stacker' needs 'coef': a list of {n_members} finite numbers, one per member"
    if not _is_finite_number(stacker.get("intercept")):
        return "'stacker' needs 'intercept': a finite number"
    return ""


def save_model(run_dir: Path, model: nn.Module, meta: dict) -> None:
    """Write model.safetensors (weights and BatchNorm statistics) and model.json atomically."""
    from safetensors.torch import save

    run_dir = Path(run_dir)
    model = getattr(model, "module", model)
    model = getattr(model, "_orig_mod", model)
    # Copies, contiguous and on the CPU: safetensors refuses shared or aliased storage.
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": "single", **meta}
    validate_meta(meta, str(run_dir / "model.json"))
    weights = save(state)
    meta = _keep_export_record(run_dir, meta, weights)
    # As bytes, written here: save_file() reports a full disk as its own error type, not an
    # OSError naming the file, and leaves a temporary file of its own behind if killed.
    atomic_write(run_dir / "model.safetensors", lambda tmp: tmp.write_bytes(weights))
    atomic_write_json(run_dir / "model.json", meta)


def _keep_export_record(run_dir: Path, meta: dict, weights: bytes) -> dict:
    """``meta`` with the run's earlier ONNX export record, when the model saved again is the one
    exported (train --resume of a finished run saves the same weights and calibration)."""
    try:
        earlier = read_json(run_dir / "model.json")
        same_weights = (run_dir / "model.safetensors").read_bytes() == weights
    except (OSError, ValueError):
        return meta
    if not (isinstance(earlier, dict) and "onnx" in earlier and same_weights):
        return meta
    if any(earlier.get(k) != meta.get(k) for k in ("threshold", "temperature", "image_size")):
        return meta
    return {**meta, "onnx": earlier["onnx"]}


def save_meta(run_dir: Path, meta: dict) -> None:
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta}
    validate_meta(meta, str(Path(run_dir) / "model.json"))
    atomic_write_json(Path(run_dir) / "model.json", meta)


def read_meta(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "model.json"
    if not path.is_file():
        raise PneumoscanError(f"{run_dir}: not a run directory ({_not_a_run(Path(run_dir))})")
    try:
        meta = read_json(path)
    except (OSError, ValueError) as e:
        raise PneumoscanError(f"{path}: unreadable ({e})") from None
    return validate_meta(meta, str(path))


def _not_a_run(run_dir: Path) -> str:
    """Why ``run_dir`` has no model.json, and what to name instead where its files tell."""
    if not run_dir.exists():
        return "does not exist"
    if not run_dir.is_dir():
        return "a file, not a folder"
    if (run_dir / CHECKPOINT).is_file():
        return (f"no model.json; its {CHECKPOINT} is an interrupted training run: finish it with "
                f"`pneumoscan train ... --out {run_dir} --resume`")
    seeds = sorted(p for p in run_dir.glob("seed-*") if p.is_dir())
    if seeds:
        done = [p for p in seeds if (p / "model.json").is_file()]
        return (f"no model.json; it holds the seed-N runs of `train --seeds`: name one, "
                f"e.g. {(done or seeds)[0]}")
    if any(p.is_dir() for p in run_dir.glob("fold-*")):
        return ("no model.json; its fold-K folders are from a `cv` run that did not finish "
                "(cv does not resume): run it again with a new --out")
    return "no model.json"


def update_meta(run_dir: Path, **fields) -> dict:
    meta = read_meta(run_dir)
    meta.update(fields)
    save_meta(run_dir, meta)
    return meta


class Predictor:
    """A single trained network: uint8 images in, logits and calibrated probabilities out."""

    def __init__(self, run_dir: Path, meta: dict, model: nn.Module, device: torch.device):
        self.run_dir, self.meta, self.model, self.device = run_dir, meta, model, device
        self.image_size = int(meta["image_size"])
        self.threshold = float(meta["threshold"])
        self.temperature = float(meta["temperature"])

    @property
    def name(self) -> str:
        return self.meta.get("architecture", "model")

    def model_input(self, images: torch.Tensor) -> torch.Tensor:
        intensity = self.meta["intensity"]
        return to_model_input(
            images.to(self.device),
            in_chans=int(self.meta["in_chans"]),
            mean=float(intensity["mean"]),
            std=float(intensity["std"]),
            size=self.image_size,
        )

    def logits(self, images, batch_size: int = 0) -> np.ndarray:
        """(N, 2) float32 logits for (N, H, W) uint8 images (from inputs, those of its size)."""
        images = at_size(images, self.image_size)
        images = torch.as_tensor(np.asarray(images)) if isinstance(images, np.ndarray) else images
        intensity = self.meta["intensity"]
        return batched_logits(
            self.model, images, in_chans=int(self.meta["in_chans"]), mean=float(intensity["mean"]),
            std=float(intensity["std"]), device=self.device, batch_size=batch_size,
            size=self.image_size,
        ).numpy()

    def predict_proba(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """Calibrated probability of PNEUMONIA for each image."""
        return probabilities(self.logits(images), self.temperature)


@torch.no_grad()
def batched_logits(
    model: nn.Module, images: torch.Tensor, *, in_chans: int, mean: float, std: float,
    device: torch.device, batch_size: int = 0, size: int | None = None,
) -> torch.Tensor:
    """(N, 2) float32 logits on the CPU for (N, H, W) uint8 images, as training's validation,
    evaluate, predict and serve all compute them. ``batch_size`` 0: as many images as fit the
    pixel budget of ``preprocess.eval_batch_size``. The model's mode is the caller's."""
    size_in = size or images.shape[-1]
    batch_size = batch_size or eval_batch_size(size_in, device_type=device.type)
    out = []
    for start in range(0, len(images), batch_size):
        x = to_model_input(images[start : start + batch_size].to(device), in_chans=in_chans,
                           mean=mean, std=std, size=size)
        x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device):
            out.append(model(x).float().cpu())
    return torch.cat(out) if out else torch.zeros((0, 2))


class EnsemblePredictor:
    """Several runs combined: the mean of their calibrated probabilities, or a fitted stacker."""

    def __init__(self, run_dir: Path, meta: dict, members: list):
        self.run_dir, self.meta, self.members = run_dir, meta, members
        self.image_size = int(meta["image_size"])
        self.threshold = float(meta["threshold"])
        self.temperature = float(meta["temperature"])

    @property
    def name(self) -> str:
        return f"{self.meta['kind']} of {len(self.members)}"

    def member_probabilities(self, images) -> np.ndarray:
        """(N, M) calibrated probabilities, one column per member."""
        return np.stack([m.predict_proba(images) for m in self.members], axis=1)

    def predict_proba(self, images) -> np.ndarray:
        probs = self.member_probabilities(images)
        if self.meta["kind"] == "stack":
            return stack_probabilities(probs, self.meta["stacker"])
        return probs.mean(axis=1)


# A stack may hold members trained at different image sizes. Each takes its images decoded at
# its own size, as in its cross-validation, where the combiner learned their probabilities: the
# same images decoded at another size and resized differ by a grey level or so, enough to move
# a probability by tenths. Such a predictor takes "inputs", {size: (N, size, size) uint8}, one
# decode per size; any other takes one array (as does a predictor given one: each member then
# resizes it).


def input_sizes(predictor) -> tuple[int, ...]:
    """The image sizes ``predictor``'s networks take, smallest first."""
    members = getattr(predictor, "members", None)
    if members is None:
        return (predictor.image_size,)
    return tuple(sorted({size for m in members for size in input_sizes(m)}))


def read_inputs(predictor, source, **options):
    """``read_gray(source, size, **options)`` at each of ``predictor``'s input sizes: one array,
    or inputs, ``{size: image}``, where it takes several."""
    from pneumoscan.data.decode import read_gray

    sizes = input_sizes(predictor)
    if len(sizes) == 1:
        return read_gray(source, sizes[0], **options)
    return {size: read_gray(source, size, **options) for size in sizes}


def stack_inputs(decoded: list):
    """One batch of what ``read_inputs`` returned: ``np.stack``, per size for inputs."""
    if decoded and isinstance(decoded[0], dict):
        return {size: np.stack([d[size] for d in decoded]) for size in decoded[0]}
    return np.stack(decoded)


def at_size(images, size: int):
    """The images a network of ``size`` takes: its own from inputs, else those given."""
    return images[size] if isinstance(images, dict) else images


def probabilities(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Probability of class 1 from (N, 2) logits, after temperature scaling, as float64.

    Computed in float64 even for float32 logits: in float32 every margin above ~16.6 rounds to
    exactly 1.0, so confident predictions would tie and distort ROC AUC, thresholds and log loss.
    """
    logits = np.asarray(logits, dtype=np.float64)
    with np.errstate(invalid="ignore"):  # inf - inf: NaN, which the callers report in one line
        z = (logits[:, 1] - logits[:, 0]) / temperature
    return _sigmoid(z)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-z)) in float64, without a RuntimeWarning for very negative z.

    exp(-z) overflows to inf only where the true value is below the smallest float64, and
    1 / (1 + inf) is then exactly 0: the overflow gives the right answer, so it is silenced
    rather than avoided. float64 keeps probabilities below 1.0 up to z of ~36.7, where float32
    stops at ~16.6.
    """
    z = np.asarray(z, dtype=np.float64)
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-z))


LOGIT_EPS = 1e-6  # probabilities are clipped to [eps, 1 - eps] before taking log-odds


def log_odds(prob: np.ndarray) -> np.ndarray:
    """log(p / (1 - p)) in float64, P clipped to [LOGIT_EPS, 1 - LOGIT_EPS] first: the stack's
    features, at fitting (stack.py) and at prediction alike."""
    p = np.clip(np.asarray(prob, dtype=np.float64), LOGIT_EPS, 1 - LOGIT_EPS)
    return np.log(p / (1 - p))


def stack_probabilities(member_probs: np.ndarray, stacker: dict) -> np.ndarray:
    """A logistic regression over the members' log-odds (its coefficients live in model.json)."""
    coef = np.asarray(stacker["coef"], dtype=np.float64)
    z = log_odds(member_probs) @ coef + float(stacker["intercept"])
    return _sigmoid(z)


def load_predictor(run_dir: str | Path, device: str | torch.device = "cpu"):
    """A ready-to-use Predictor (or EnsemblePredictor) for a run directory."""
    run_dir = Path(run_dir)
    meta = read_meta(run_dir)
    device = torch.device(device) if not isinstance(device, torch.device) else device
    if meta["kind"] != "single":
        members = [load_predictor(run_dir / m, device) for m in meta["members"]]
        return EnsemblePredictor(run_dir, meta, members)
    try:
        model = create_model(
            meta["architecture"],
            in_chans=int(meta["in_chans"]),
            num_classes=len(CLASS_NAMES),
            image_size=int(meta["image_size"]),
        )
    except (TypeError, ValueError, PneumoscanError) as e:
        # An image size the model refuses, or a name this installation does not know (a run
        # made with a newer timm): the run's file is at fault, not a command-line option.
        raise PneumoscanError(f"{run_dir / 'model.json'}: cannot build the model ({e})") from None
    weights = run_dir / "model.safetensors"
    try:
        model.load_state_dict(_read_weights(weights))
    except RuntimeError as e:  # names or shapes that are not this architecture's
        reason = (str(e).splitlines() or [""])[0]
        raise PneumoscanError(
            f"{weights}: weights do not fit {meta['architecture']!r} ({reason})"
        ) from None
    model.to(device, memory_format=torch.channels_last).eval()  # as trained: faster on both
    return Predictor(run_dir, meta, model, device)


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    if not path.is_file():
        raise PneumoscanError(f"{path}: missing model weights")
    try:
        # Read here, not by load_file(), which takes only a folder whose name is valid UTF-8.
        weights = load(path.read_bytes())
    except (SafetensorError, OSError, ValueError) as e:
        raise PneumoscanError(f"{path}: not a valid safetensors file ({e})") from None
    _check_finite(path, weights)
    return weights


def _check_finite(path: Path, weights: dict[str, torch.Tensor]) -> None:
    """Refuse NaN or infinite weights (a diverged or damaged run): they would predict NaN for
    every image, which prints as a NORMAL label and cannot be written as JSON."""
    for name, tensor in weights.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise PneumoscanError(
                f"{path}: weights are not all finite (NaN or infinity in {name!r}); "
                "the model cannot predict"
            )
