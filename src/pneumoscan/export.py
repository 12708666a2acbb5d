"""A run as one ONNX file: raw 0..255 gray pixels in, calibrated P(pneumonia) out.

The exported graph does the intensity scaling, channel expansion, temperature and softmax
itself, so a user only has to decode to gray and resize to ``image_size`` square (bilinear,
aspect ratio not kept). Ensembles are exported whole: every member inside one graph, averaging
their calibrated probabilities (or applying the stacker's logistic regression for a stack).

The file is written under a temporary name, checked with onnxruntime against PyTorch on random
inputs, and only then renamed into place; a mismatch fails loudly and leaves nothing behind.
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
from pneumoscan.fileio import atomic_write
from pneumoscan.model_io import EnsemblePredictor, Predictor, load_predictor, update_meta

OPSET = 18  # the torch.export-based exporter's default
INPUT_NAME = "image"
OUTPUT_NAME = "probability"
TOLERANCE = 1e-4  # largest |onnxruntime - PyTorch| probability accepted


class CalibratedNet(nn.Module):
    """One trained network: (N, 1, S, S) float 0..255 -> (N,) calibrated P(PNEUMONIA)."""

    def __init__(self, predictor: Predictor):
        super().__init__()
        intensity = predictor.meta["intensity"]
        self.model = predictor.model
        self.in_chans = int(predictor.meta["in_chans"])
        self.mean, self.std = float(intensity["mean"]), float(intensity["std"])
        self.temperature = float(predictor.temperature)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # The same arithmetic as preprocess.to_model_input, so the two agree to rounding.
        x = (pixels / 255.0 - self.mean) / self.std
        if self.in_chans > 1:
            x = x.expand(-1, self.in_chans, -1, -1)
        logits = self.model(x) / self.temperature
        return torch.softmax(logits, dim=1)[:, 1]


class CalibratedEnsemble(nn.Module):
    """Members' calibrated probabilities, averaged or combined by the stacker's regression."""

    def __init__(self, predictor: EnsemblePredictor):
        super().__init__()
        self.members = nn.ModuleList(_wrap(m) for m in predictor.members)
        stacker = predictor.meta.get("stacker") if predictor.meta["kind"] == "stack" else None
        self.stacked = stacker is not None
        if self.stacked:
            coef = torch.tensor(stacker["coef"], dtype=torch.float32)
            if coef.numel() != len(predictor.members):
                raise PneumoscanError("stacker coefficients do not match the number of members")
            self.register_buffer("coef", coef)
            self.intercept = float(stacker["intercept"])

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([m(pixels) for m in self.members], dim=1)
        if not self.stacked:
            return probs.mean(dim=1)
        p = probs.clamp(1e-6, 1 - 1e-6)  # as model_io.stack_probabilities
        return torch.sigmoid(torch.log(p / (1 - p)) @ self.coef + self.intercept)


def _wrap(predictor) -> nn.Module:
    if isinstance(predictor, EnsemblePredictor):
        return CalibratedEnsemble(predictor)
    return CalibratedNet(predictor)


def preprocessing_note(image_size: int) -> str:
    # Exactly what read_gray does, so that other code feeding the graph sees the same pixels;
    # the reduced-scale figures are those measured for DRAFT_FACTOR (see decode.py).
    s = image_size
    return (
        "decode to 8-bit gray (16-bit gray scaled linearly from its significant bits: the PNG "
        "sBIT depth, else the smallest of 8, 10, 12, 14, 16 bits that holds the largest value); "
        f"resize to {s}x{s} (Pillow bilinear, antialiased, aspect ratio not kept); a JPEG at "
        f"least {2 * DRAFT_FACTOR * s} px on its shorter side is first decoded by libjpeg at "
        f"1/2, 1/4 or 1/8 scale, never below {DRAFT_FACTOR * s} px, which changes the resized "
        "pixels by under 0.2 gray levels on average and at most 4; "
        f"feed float32 pixel values 0..255 shaped (N, 1, {s}, {s}); "
        "scaling, channels, temperature and softmax happen inside the graph"
    )


def export_onnx(run_dir: str | Path, onnx_path: str | Path) -> dict:
    """Export a run to ``onnx_path``, verify it with onnxruntime, record it in model.json.

    Returns the ``onnx`` entry written into model.json, plus the largest difference measured.
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
    worst = 0.0

    def write(tmp: Path) -> None:
        nonlocal worst
        # Exported in a private folder: an exporter may write side files (external weights)
        # named after its output; the final file is one self-contained model.
        with tempfile.TemporaryDirectory(prefix="pneumoscan-onnx-") as work:
            raw = Path(work) / "model.onnx"
            _torch_export(wrapper, raw, size)
            _save_with_metadata(raw, tmp, entry, predictor)
        worst = verify(tmp, predictor)

    atomic_write(onnx_path, write)
    update_meta(run_dir, onnx=entry)
    return {**entry, "max_abs_difference": worst}


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


def verify(path: str | Path, predictor, *, seed: int = 0) -> float:
    """Largest |onnxruntime - PyTorch| probability over random images; raises above TOLERANCE."""
    import onnxruntime as ort

    size = predictor.image_size
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    worst = 0.0
    for batch in (1, 5):  # two batch sizes: the batch axis must really be dynamic
        images = rng.integers(0, 256, size=(batch, size, size), dtype=np.uint8)
        expected = predictor.predict_proba(images)
        (got,) = session.run(None, {INPUT_NAME: images[:, None].astype(np.float32)})
        if got.shape != (batch,):
            raise PneumoscanError(f"{path}: ONNX output has shape {got.shape}, expected ({batch},)")
        worst = max(worst, float(np.max(np.abs(got.astype(np.float64) - expected))))
    if not worst <= TOLERANCE:
        raise PneumoscanError(
            f"{path}: ONNX probabilities differ from PyTorch by {worst:.2e} "
            f"(more than {TOLERANCE:.0e}); the export is not written"
        )
    return worst
