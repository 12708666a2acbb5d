"""pneumoscan export: ONNX that matches PyTorch, carries its preprocessing, and is written whole.

The trained run is conftest's session fixture ``trained_run`` (seed_cnn, 32 px, synthetic data).
"""

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import onnx  # noqa: E402

from pneumoscan import export as export_module  # noqa: E402
from pneumoscan.cli import main  # noqa: E402
from pneumoscan.data.decode import read_gray  # noqa: E402
from pneumoscan.model_io import load_predictor, read_meta, save_meta  # noqa: E402


@pytest.fixture
def run_copy(trained_run, tmp_path):
    """export writes into model.json: work on a copy so other tests see the run unchanged."""
    return shutil.copytree(trained_run, tmp_path / "run")


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    """(run copy, ONNX file, what the command printed): one export shared by the read-only tests."""
    import contextlib
    import io

    base = tmp_path_factory.mktemp("export")
    run = shutil.copytree(trained_run, base / "run")
    out = base / "out" / "model.onnx"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["export", str(run), "--onnx", str(out)]) == 0
    return run, out, printed.getvalue()


def _onnx_proba(path, images_uint8: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"image": images_uint8[:, None].astype(np.float32)})
    return out


def test_onnx_matches_pytorch(exported, synthetic_data):
    run, out, printed = exported
    predictor = load_predictor(run)
    files = sorted((synthetic_data / "test").rglob("*.png"))[:7]
    real = np.stack([read_gray(f, predictor.image_size) for f in files])
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 256, (3, predictor.image_size, predictor.image_size), dtype=np.uint8)
    for images in (real, noise, real[:1]):
        got = _onnx_proba(out, images)
        assert got.shape == (len(images),)
        np.testing.assert_allclose(got, predictor.predict_proba(images), atol=1e-4)
    assert "matches PyTorch" in printed


def test_one_self_contained_file(exported):
    _run, out, _ = exported
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx"]  # no side files
    model = onnx.load(str(out), load_external_data=False)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def test_preprocessing_is_documented(exported):
    run, out, _ = exported
    model = onnx.load(str(out))
    props = {p.key: p.value for p in model.metadata_props}
    assert "resize to 32x32" in props["pneumoscan.preprocessing"]
    assert json.loads(props["pneumoscan.input"])["shape"] == ["N", 1, 32, 32]
    assert float(props["pneumoscan.threshold"]) == pytest.approx(read_meta(run)["threshold"])
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, 32, 32]
    entry = read_meta(run)["onnx"]
    assert entry["file"] == str(out.resolve())
    assert entry["input"]["name"] == "image" and "0..255" in entry["preprocessing"]


def test_ensemble_is_exported_whole(trained_run, tmp_path):
    ensemble = tmp_path / "ens"
    ensemble.mkdir()
    for name in ("m0", "m1"):
        shutil.copytree(trained_run, ensemble / name)
    # Members that differ, so averaging is tested: +2 in calibrated log-odds for m1.
    _shift_pneumonia_logit(ensemble / "m1", 2.0 * read_meta(trained_run)["temperature"])
    meta = read_meta(trained_run)
    save_meta(ensemble, {"kind": "ensemble", "members": ["m0", "m1"],
                         "class_names": meta["class_names"], "image_size": meta["image_size"],
                         "threshold": meta["threshold"], "temperature": 1.0})
    out = tmp_path / "ens.onnx"
    assert main(["export", str(ensemble), "--onnx", str(out)]) == 0
    predictor = load_predictor(ensemble)
    images = np.random.default_rng(2).integers(0, 256, (4, 32, 32), dtype=np.uint8)
    per_member = predictor.member_probabilities(images)
    assert np.ptp(per_member, axis=1).min() > 0.01  # the two members disagree
    np.testing.assert_allclose(_onnx_proba(out, images), predictor.predict_proba(images),
                               atol=1e-4)


def _shift_pneumonia_logit(run, amount: float) -> None:
    """Add ``amount`` to the last layer's PNEUMONIA bias, whatever the model learned."""
    from safetensors.torch import load_file, save_file

    weights = load_file(str(run / "model.safetensors"))
    last_bias = [k for k, v in weights.items() if k.endswith("bias") and v.shape == (2,)][-1]
    weights[last_bias] = weights[last_bias] + weights[last_bias].new_tensor([0.0, amount])
    save_file(weights, str(run / "model.safetensors"))


def test_mismatch_fails_loudly_and_writes_nothing(run_copy, tmp_path, monkeypatch, capsys):
    out = tmp_path / "model.onnx"
    before = (run_copy / "model.json").read_text()
    monkeypatch.setattr(export_module, "TOLERANCE", -1.0)  # no export can pass this check
    assert main(["export", str(run_copy), "--onnx", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "differ from PyTorch" in err[0]
    assert not out.exists() and not list(tmp_path.glob(".model.onnx.*"))
    assert (run_copy / "model.json").read_text() == before


def test_not_a_run_is_one_line(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--onnx", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a run directory" in err[0]
