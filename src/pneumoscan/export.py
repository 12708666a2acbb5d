"""A run as one ONNX file: raw 0..255 gray pixels in, calibrated P(pneumonia) out.

The exported graph does the intensity scaling, channel expansion, temperature and softmax
itself, so a user only has to decode to gray and resize to ``image_size`` square (bilinear,
aspect ratio not kept). Ensembles are exported whole: every member inside one graph, averaging
their calibrated probabilities (or applying the stacker's logistic regression for a stack).

The file is written under a temporary name, checked with onnxruntime against PyTorch in log-odds
on images the model does not saturate on (see ``verify``), and only then renamed into place; a
mismatch fails loudly and leaves nothing behind.
"""

from __future__ import annotations

import inspect
import json
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pneumoscan import CLASS_NAMES
from pneumoscan.data.decode import DRAFT_FACTOR
from pneumoscan.errors import PneumoscanError
from pneumoscan.fileio import atomic_write, check_writable
from pneumoscan.model_io import (
    EnsemblePredictor,
    Predictor,
    load_predictor,
    log_odds,
    update_meta,
)
from pneumoscan.run_folder import refuse_own_file

OPSET = 18  # the torch.export-based exporter's default
INPUT_NAME = "image"
OUTPUT_NAME = "probability"
TOLERANCE = 1e-3  # largest |onnxruntime - PyTorch| log-odds accepted, beyond float32 rounding
LOGIT_LIMIT = 9.0  # log-odds compared up to +-this: P within ~1.2e-4 of 0 or 1
FLOAT32_STEPS = 4  # rounding of the graph's float32 probability allowed for, in steps of 2**-24
REAL_IMAGES = 8  # at most this many of the run's own images are compared, where they exist
SMOOTH_IMAGES = 8


class CalibratedNet(nn.Module):
    """One trained network: (N, 1, S, S) float 0..255 -> (N,) calibrated P(PNEUMONIA)."""

    def __init__(self, predictor: Predictor):
        super().__init__()
        intensity = predictor.meta["intensity"]
        self.model = predictor.model
        self.in_chans = int(predictor.meta["in_chans"])
        self.mean, self.std = float(intensity["mean"]), float(intensity["std"])
        self.temperature = float(predictor.temperature)

    def log_odds(self, pixels: torch.Tensor) -> torch.Tensor:
        # The same arithmetic as preprocess.to_model_input, so the two agree to rounding.
        x = (pixels / 255.0 - self.mean) / self.std
        if self.in_chans > 1:
            x = x.expand(-1, self.in_chans, -1, -1)
        logits = self.model(x)
        return (logits[:, 1] - logits[:, 0]) / self.temperature  # softmax(logits / T)[1]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.log_odds(pixels))


class CalibratedEnsemble(nn.Module):
    """Members' calibrated probabilities, averaged or combined by the stacker's regression.

    Members pass log-odds, not probabilities, between them: a float32 probability near 1 keeps
    only a few significant digits of 1 - p, which put a stack over confident members 0.01 or more
    off in log-odds, where model_io computes in float64.
    """

    def __init__(self, predictor: EnsemblePredictor):
        super().__init__()
        self.members = nn.ModuleList(_wrap(m) for m in predictor.members)
        # model_io.validate_meta has checked the stacker: one coefficient per member.
        self.stacked = predictor.meta["kind"] == "stack"
        if self.stacked:
            stacker = predictor.meta["stacker"]
            self.register_buffer("coef", torch.tensor(stacker["coef"], dtype=torch.float32))
            self.intercept = float(stacker["intercept"])

    def log_odds(self, pixels: torch.Tensor) -> torch.Tensor:
        z = torch.stack([m.log_odds(pixels) for m in self.members], dim=1)
        if self.stacked:
            # model_io.log_odds clips P to [LOGIT_EPS, 1 - LOGIT_EPS]: the same, in log-odds.
            return z.clamp(-STACK_LOGIT_LIMIT, STACK_LOGIT_LIMIT) @ self.coef + self.intercept
        # log-odds of the mean probability: log(mean P) - log(mean (1 - P)), in log space.
        return _logsumexp(_log_sigmoid(z)) - _logsumexp(_log_sigmoid(-z))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.log_odds(pixels))


# model_io.log_odds' clipping of P, as log-odds.
STACK_LOGIT_LIMIT = float(log_odds(np.array([1.0]))[0])


def _log_sigmoid(z: torch.Tensor) -> torch.Tensor:
    # Spelled out rather than F.logsigmoid, so every exporter emits these plain, stable ops.
    return torch.minimum(z, torch.zeros_like(z)) - torch.log(1 + torch.exp(-z.abs()))


def _logsumexp(x: torch.Tensor) -> torch.Tensor:
    """log(sum(exp(x))) over dim 1, shifted by the largest term so nothing underflows."""
    top = x.max(dim=1, keepdim=True).values
    return top[:, 0] + torch.log(torch.exp(x - top).sum(dim=1))


def _wrap(predictor) -> nn.Module:
    if isinstance(predictor, EnsemblePredictor):
        return CalibratedEnsemble(predictor)
    return CalibratedNet(predictor)


def preprocessing_note(image_size: int) -> str:
    # Exactly what read_gray does, so that other code feeding the graph sees the same pixels;
    # the reduced-scale figures are those measured for DRAFT_FACTOR (see decode.py).
    s = image_size
    return (
        "decode to 8-bit gray (colour to luma, alpha dropped; EXIF orientation applied; "
        "16-bit gray scaled linearly from its significant bits: the PNG sBIT depth, else the "
        "smallest of 8, 10, 12, 14, 16 bits that holds the largest value; DICOM through its "
        "modality LUT, then its VOI LUT or window, that output range mapped linearly to "
        "0..255, MONOCHROME1 inverted; every rule in the pneumoscan README, 'Decoding, "
        "exactly'); "
        f"resize to {s}x{s} (Pillow bilinear, antialiased, aspect ratio not kept); a JPEG at "
        f"least {2 * DRAFT_FACTOR * s} px on its shorter side is first decoded by libjpeg at "
        f"1/2, 1/4 or 1/8 scale, never below {DRAFT_FACTOR * s} px, which changes the resized "
        "pixels by under 0.2 gray levels on average and at most 4; "
        f"feed float32 pixel values 0..255 shaped (N, 1, {s}, {s}); "
        "scaling, channels, temperature and softmax happen inside the graph"
    )


def export_onnx(run_dir: str | Path, onnx_path: str | Path) -> dict:
    """Export a run to ``onnx_path``, verify it with onnxruntime, record it in model.json.

    Returns the ``onnx`` entry written into model.json, plus the largest log-odds difference
    measured (``max_abs_difference``) and what it was measured on (``compared``).
    """
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise PneumoscanError(
            f"export needs onnx and onnxruntime ({e.name} is missing): "
            "pip install 'pneumoscan[export]'"
        ) from None
    run_dir, onnx_path = Path(run_dir), Path(onnx_path)
    given = onnx_path
    if onnx_path.is_symlink():  # written through, as cp would: the link keeps pointing there
        onnx_path = onnx_path.resolve()
    refuse_own_file(run_dir, onnx_path, "--onnx")  # a run whose weights became ONNX is dead
    if onnx_path.suffix.lower() != ".onnx":
        # An existing file of that name (an X-ray, a CSV) would be replaced: name the model so.
        where = f" (a link to {onnx_path})" if onnx_path != given else ""
        raise PneumoscanError(f"--onnx {given}{where}: name the file FILE.onnx")
    check_writable(onnx_path)
    recorded = _can_record(run_dir)
    predictor = load_predictor(run_dir, "cpu")
    size = predictor.image_size
    _check_member_sizes(predictor, size)
    wrapper = _wrap(predictor).eval()
    entry = {
        "file": str(onnx_path.resolve()),
        "input": {"name": INPUT_NAME, "shape": ["N", 1, size, size], "dtype": "float32",
                  "range": [0, 255]},
        "output": {"name": OUTPUT_NAME, "shape": ["N"],
                   "meaning": f"calibrated probability of {CLASS_NAMES[1]}"},
        "preprocessing": preprocessing_note(size),
        "threshold": predictor.threshold,
        "opset": OPSET,
    }
    worst, compared = 0.0, ""

    def write(tmp: Path) -> None:
        nonlocal worst, compared
        # Exported in a private folder: an exporter may write side files (external weights)
        # named after its output; the final file is one self-contained model.
        with tempfile.TemporaryDirectory(prefix="pneumoscan-onnx-") as work:
            raw = Path(work) / "model.onnx"
            _torch_export(wrapper, raw, size)
            _save_with_metadata(raw, tmp, entry, predictor)
        worst, compared = verify(tmp, predictor, name=onnx_path)

    atomic_write(onnx_path, write)
    if recorded:
        update_meta(run_dir, onnx=entry)
    return {**entry, "max_abs_difference": worst, "compared": f"log-odds on {compared}",
            "recorded": recorded}


def _can_record(run_dir: Path) -> bool:
    """Whether the export can be noted in the run's model.json; a run kept where it may not be
    written (a read-only share) is exported all the same, its ONNX file carrying the same
    metadata."""
    try:
        check_writable(run_dir / "model.json")
    except OSError:
        return False
    return True


def _check_member_sizes(predictor, size: int) -> None:
    for member in getattr(predictor, "members", []):
        if member.image_size != size:
            raise PneumoscanError(
                f"{member.run_dir}: member image size {member.image_size} differs from the "
                f"ensemble's {size}; one ONNX input cannot serve both"
            )
        _check_member_sizes(member, size)


def _torch_export(wrapper: nn.Module, path: Path, size: int) -> None:
    """torch.export-based ONNX; the TorchScript exporter if that one cannot trace the model."""
    example = (torch.rand(2, 1, size, size) * 255,)
    names = {"input_names": [INPUT_NAME], "output_names": [OUTPUT_NAME], "opset_version": OPSET}
    has_dynamo = "dynamo" in inspect.signature(torch.onnx.export).parameters  # torch >= 2.5
    dynamo_error: Exception | None = None
    with torch.no_grad():
        if has_dynamo:
            try:
                batch = torch.export.Dim("N", min=1, max=65536)
                torch.onnx.export(wrapper, example, str(path), **names, dynamo=True,
                                  verbose=False, dynamic_shapes={"pixels": {0: batch}})
                return
            except Exception as e:  # any tracing failure: try the other exporter
                dynamo_error = e
        legacy = {"dynamo": False} if has_dynamo else {}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # it is the fallback
                torch.onnx.export(wrapper, example, str(path), **names, **legacy,
                                  dynamic_axes={INPUT_NAME: {0: "N"}, OUTPUT_NAME: {0: "N"}})
        except Exception as e:
            first = f"{_brief(dynamo_error)}; then " if dynamo_error else ""
            raise PneumoscanError(f"ONNX export failed: {first}{_brief(e)}") from e


def _brief(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:160] if lines else ''}"


def _save_with_metadata(raw: Path, path: Path, entry: dict, predictor) -> None:
    import onnx

    model = onnx.load(str(raw))  # external data, if any, is read back in
    props = {
        "pneumoscan.preprocessing": entry["preprocessing"],
        "pneumoscan.input": json.dumps(entry["input"]),
        "pneumoscan.output": json.dumps(entry["output"]),
        "pneumoscan.class_names": json.dumps(list(CLASS_NAMES)),
        "pneumoscan.threshold": repr(float(predictor.threshold)),
        "pneumoscan.image_size": str(predictor.image_size),
        "pneumoscan.kind": predictor.meta["kind"],
        "pneumoscan.architecture": predictor.meta.get("architecture", predictor.name),
    }
    onnx.helper.set_model_props(model, props)
    model.doc_string = "pneumoscan: calibrated probability of pneumonia from a chest X-ray"
    onnx.checker.check_model(model)
    onnx.save_model(model, str(path), save_as_external_data=False)


def verify(
    path: str | Path, predictor, *, seed: int = 0, name: str | Path | None = None
) -> tuple[float, str]:
    """Compare onnxruntime with PyTorch in log-odds; raise above TOLERANCE.

    Returns the largest difference (beyond float32 rounding) and what it was measured on;
    ``name`` is the file named in errors, when ``path`` is a temporary one.

    Probabilities cannot show a wrong graph: on inputs that saturate the model (uniform noise
    gives P ~ 1e-17) both are ~0, however wrong the graph. So the inputs are ones the model does
    not saturate on (a few of the run's own validation or test images where they still exist, and
    smooth images with the training intensity statistics), and the comparison is in log-odds,
    where a graph that scales or shifts the input wrongly shows as it does on real X-rays.
    """
    import onnxruntime as ort

    name = path if name is None else name
    images, compared = _check_images(predictor, np.random.default_rng(seed))
    expected = _log_odds(predictor.predict_proba(images))
    # The model's bytes, not its path: onnxruntime takes only a path that is valid UTF-8.
    session = ort.InferenceSession(path.read_bytes(), providers=["CPUExecutionProvider"])
    worst = 0.0
    for batch in (images[:1], images):  # two batch sizes: the batch axis must really be dynamic
        (got,) = session.run(None, {INPUT_NAME: batch[:, None].astype(np.float32)})
        if got.shape != (len(batch),):
            raise PneumoscanError(
                f"{name}: ONNX output has shape {got.shape}, expected ({len(batch)},)"
            )
        excess = _log_odds_excess(got, expected[: len(batch)])
        worst = max(worst, float(np.max(excess)))
    if not worst <= TOLERANCE:
        raise PneumoscanError(
            f"{name}: ONNX log-odds differ from PyTorch by {worst:.2e} (more than "
            f"{TOLERANCE:.0e}) on {compared}; the export is not written"
        )
    return worst, compared


def _log_odds(prob: np.ndarray) -> np.ndarray:
    """log(p / (1 - p)) in float64, limited to +-LOGIT_LIMIT.

    Beyond the limit a float32 probability no longer resolves the log-odds (1 - p is a few
    float32 steps below 1), so there both sides count as equally saturated.
    """
    p = np.asarray(prob, dtype=np.float64)
    with np.errstate(divide="ignore"):  # p of exactly 0 or 1: +-inf, then clipped
        z = np.log(p) - np.log1p(-p)
    return np.clip(np.nan_to_num(z, nan=np.inf), -LOGIT_LIMIT, LOGIT_LIMIT)


def _log_odds_excess(got: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """|ONNX - PyTorch| log-odds, less what float32 rounding of the ONNX probability explains.

    The graph's output is a float32 probability, rounded by up to a few steps of 2**-24 near 1:
    in log-odds that is about FLOAT32_STEPS * 2**-24 / (1 - p), up to ~1e-3 at LOGIT_LIMIT.
    NaN from the graph counts as an infinite difference.
    """
    p = 1.0 / (1.0 + np.exp(-expected))
    rounding = FLOAT32_STEPS * 2.0**-24 / (1.0 - p)
    difference = np.abs(_log_odds(got) - expected)
    return np.where(np.isfinite(got), np.maximum(difference - rounding, 0.0), np.inf)


def _check_images(predictor, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """(N, S, S) uint8 images the model should not saturate on, and a phrase naming them."""
    size = predictor.image_size
    real = _run_images(predictor, size, REAL_IMAGES)
    mean, std = _intensity(predictor)
    smooth = _smooth_images(rng, SMOOTH_IMAGES, size, mean, std)
    compared = f"{SMOOTH_IMAGES} smooth images at the training intensity mean and spread"
    if len(real):
        compared = f"{len(real)} of the run's validation/test images and {compared}"
        return np.concatenate([real, smooth]), compared
    return smooth, compared


def _run_images(predictor, size: int, limit: int) -> np.ndarray:
    """Up to ``limit`` images named in the run's saved predictions that can still be read.

    Spread over the list (it is often sorted by class), from the run and then its members; none
    when the files have moved, which only leaves the smooth images.
    """
    from pneumoscan.data.decode import read_gray
    from pneumoscan.errors import UnreadableImage

    found: list[np.ndarray] = []
    for paths in _saved_prediction_paths(predictor):
        existing = [p for p in paths if Path(p).is_file()]
        if not existing:
            continue
        picks = np.unique(np.linspace(0, len(existing) - 1, min(limit, len(existing))).astype(int))
        for i in picks:
            try:
                found.append(read_gray(existing[i], size))
            except UnreadableImage:
                continue  # damaged since training: the others serve
        if len(found) >= limit:
            break
    return np.stack(found[:limit]) if found else np.zeros((0, size, size), np.uint8)


def _saved_prediction_paths(predictor):
    """The image paths of each predictions file a run (or one of its members) saved."""
    from pneumoscan.run_plots import SPLITS, load_split_predictions

    for split in SPLITS:
        saved = load_split_predictions(predictor.run_dir, split)  # None: missing or unreadable
        if saved is not None:
            yield saved.paths
    for member in getattr(predictor, "members", []):
        yield from _saved_prediction_paths(member)


def _intensity(predictor) -> tuple[float, float]:
    """The training intensity mean and std (0..1 scale) of the run, or of its first model."""
    while isinstance(predictor, EnsemblePredictor):
        predictor = predictor.members[0]
    intensity = predictor.meta["intensity"]
    return float(intensity["mean"]), float(intensity["std"])


def _smooth_images(rng: np.random.Generator, n: int, size: int, mean: float, std: float):
    """Smooth random fields whose pixels have about the training mean and std.

    Low-frequency like an X-ray, unlike uniform noise, and with a spread of brightness: images
    all at the mean would hide a wrong std, which scales only the departure from the mean.
    """
    coarse = torch.from_numpy(rng.standard_normal((n, 1, 4, 4)))
    field = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear",
                                            align_corners=True)[:, 0].numpy()
    field -= field.mean(axis=(1, 2), keepdims=True)
    field /= field.std(axis=(1, 2), keepdims=True) + 1e-12
    level = mean + std * np.linspace(-0.5, 0.5, n)[:, None, None]
    return np.clip(np.rint(255.0 * (level + std * field)), 0, 255).astype(np.uint8)
