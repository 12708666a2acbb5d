"""pneumoscan export: ONNX that matches PyTorch, carries its preprocessing, and is written whole.

The trained run is conftest's session fixture ``trained_run`` (seed_cnn, 32 px, synthetic data).
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import onnx  # noqa: E402

from pneumoscan import export as export_module  # noqa: E402
from pneumoscan.cli import main  # noqa: E402
from pneumoscan.data.decode import read_gray  # noqa: E402
from pneumoscan.errors import PneumoscanError  # noqa: E402
from pneumoscan.model_io import Predictor, load_predictor, read_meta, save_meta  # noqa: E402


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


@pytest.mark.parametrize("name", ["model.safetensors", "model.json", "report.html"])
def test_onnx_never_replaces_one_of_the_runs_own_files(name, run_copy, capsys):
    """--onnx RUN/model.safetensors succeeded and left weights that were ONNX: a dead run."""
    before = {p.name: p.read_bytes() for p in run_copy.iterdir() if p.is_file()}
    assert main(["export", str(run_copy), "--onnx", str(run_copy / name)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is one of the run's own files" in err[0]
    assert {p.name: p.read_bytes() for p in run_copy.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("target", ["ensemble/model.json", "other/model.safetensors"])
def test_onnx_never_replaces_another_runs_files(target, trained_run, tmp_path, capsys):
    """Exporting a fold into its ensemble's folder as model.json (or onto another run's
    weights) succeeded and left that run unable to load."""
    ensemble, other = tmp_path / "ensemble", tmp_path / "other"
    shutil.copytree(trained_run, ensemble / "fold-0")
    (ensemble / "model.json").write_text(json.dumps({"kind": "ensemble", "members": ["fold-0"]}))
    shutil.copytree(trained_run, other)
    path = tmp_path / target
    before = path.read_bytes()
    assert main(["export", str(ensemble / "fold-0"), "--onnx", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"is a file of the run in {path.parent}" in err[0], err
    assert path.read_bytes() == before


def test_a_run_that_cannot_be_written_is_exported_unrecorded(run_copy, tmp_path, monkeypatch,
                                                            capsys):
    """A run on a read-only share wrote (or replaced) the ONNX file, then failed on its
    model.json with exit 2."""
    real = export_module.check_writable

    def read_only_run(path):
        if path.parent == run_copy:
            raise PermissionError(13, "Permission denied", str(path))
        real(path)

    monkeypatch.setattr(export_module, "check_writable", read_only_run)
    before = (run_copy / "model.json").read_text()
    out = tmp_path / "model.onnx"
    assert main(["export", str(run_copy), "--onnx", str(out)]) == 0
    assert out.is_file() and (run_copy / "model.json").read_text() == before
    assert "does not record this export" in capsys.readouterr().err


def test_onnx_through_a_symlink_is_written_where_it_points(run_copy, tmp_path):
    """A link current.onnx -> versions/v1.onnx was replaced by a file, and model.json named
    v1.onnx, which still held the old model."""
    (tmp_path / "versions").mkdir()
    target = tmp_path / "versions" / "v1.onnx"
    target.write_bytes(b"old")
    link = tmp_path / "current.onnx"
    link.symlink_to(Path("versions") / "v1.onnx")
    assert main(["export", str(run_copy), "--onnx", str(link)]) == 0
    assert link.is_symlink() and target.read_bytes() != b"old"
    assert read_meta(run_copy)["onnx"]["file"] == str(target.resolve())


def test_not_a_run_is_one_line(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--onnx", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a run directory" in err[0]


class _DetailAndLevel(nn.Module):
    """A stand-in classifier that, like a trained one, is sure of itself on uniform noise.

    Its log-odds fall with the image's fine detail (a Laplacian's mean size) and rise with its
    brightness: uniform noise gives P ~ 1e-23, real and smooth images a P well inside (0, 1).
    """

    def __init__(self):
        super().__init__()
        self.edges = nn.Conv2d(1, 1, 3, bias=False)
        self.head = nn.Linear(2, 2)
        with torch.no_grad():
            self.edges.weight.copy_(torch.tensor([[[[0.0, 1, 0], [1, -4, 1], [0, 1, 0]]]]))
            self.head.weight.copy_(torch.tensor([[0.0, 0.0], [-12.0, 4.0]]))
            self.head.bias.copy_(torch.tensor([0.0, 3.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        detail = self.edges(x).abs().mean(dim=(1, 2, 3))
        level = x.mean(dim=(1, 2, 3))
        return self.head(torch.stack([detail, level], dim=1))


@pytest.fixture
def noise_sure_run(run_copy, monkeypatch):
    """The run copy, served by _DetailAndLevel: export_onnx loads that instead of its weights."""
    meta = {**read_meta(run_copy), "temperature": 1.0}
    predictor = Predictor(run_copy, meta, _DetailAndLevel().eval(), torch.device("cpu"))
    monkeypatch.setattr(export_module, "load_predictor", lambda run, device: predictor)
    return run_copy, predictor


def test_a_wrong_intensity_scaling_in_the_graph_is_caught(noise_sure_run, tmp_path,
                                                          monkeypatch):
    """The check compared probabilities on uniform noise, which saturates a model: a graph with
    its std scaled by 1.5 passed with a difference of ~1e-15 there."""
    run, predictor = noise_sure_run
    noise = np.random.default_rng(0).integers(0, 256, (5, 32, 32), dtype=np.uint8)
    assert predictor.predict_proba(noise).max() < 1e-15  # saturated: probabilities say nothing
    entry = export_module.export_onnx(run, tmp_path / "good.onnx")  # the true graph passes
    assert entry["max_abs_difference"] <= export_module.TOLERANCE
    assert entry["compared"].startswith("log-odds on 8 of the run's validation/test images")

    real_init = export_module.CalibratedNet.__init__

    def wrong_std(self, predictor):
        real_init(self, predictor)
        self.std *= 1.5

    monkeypatch.setattr(export_module.CalibratedNet, "__init__", wrong_std)
    out = tmp_path / "bad.onnx"
    with pytest.raises(PneumoscanError) as e:
        export_module.export_onnx(run, out)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{out}: ONNX log-odds differ")
    assert "validation/test images" in message and "smooth images" in message
    assert not out.exists()


def test_without_the_runs_images_smooth_images_still_catch_it(noise_sure_run, tmp_path,
                                                               monkeypatch):
    run, _ = noise_sure_run
    for name in ("val_predictions.npz", "test_predictions.npz"):
        (run / name).unlink(missing_ok=True)  # as when the data has moved: no real images
    real_init = export_module.CalibratedNet.__init__

    def shifted_mean(self, predictor):
        real_init(self, predictor)
        self.mean += 0.05

    monkeypatch.setattr(export_module.CalibratedNet, "__init__", shifted_mean)
    with pytest.raises(PneumoscanError, match=r"log-odds differ .* on 8 smooth images"):
        export_module.export_onnx(run, tmp_path / "bad.onnx")


def test_a_stack_over_confident_members_matches_in_log_odds(trained_run, synthetic_data,
                                                            tmp_path):
    """Members sure of PNEUMONIA: passed between members as float32 probabilities, 1 - P kept only
    a few float32 steps, and the graph was ~0.05 off in the stack's log-odds; as log-odds, not."""
    meta = read_meta(trained_run)
    files = sorted((synthetic_data / "test").rglob("*.png"))[:4]
    images = np.stack([read_gray(f, meta["image_size"]) for f in files])
    p = load_predictor(trained_run).predict_proba(images)
    base = np.mean(np.log(p / (1 - p)))  # about 0: the tiny model has learned little
    # 1 - P of 20.5 float32 steps (2**-24): rounding to 20 or 21 moves log-odds by 0.024.
    target = np.log(2.0**24 / 20.5)
    common = {"class_names": meta["class_names"], "image_size": meta["image_size"],
              "threshold": 0.5, "temperature": 1.0}
    stack = tmp_path / "stack"
    for name in ("cvA", "cvB"):
        for k in range(2):
            fold = shutil.copytree(trained_run, stack / name / f"fold-{k}")
            _shift_pneumonia_logit(fold, (target - base) * meta["temperature"])
        save_meta(stack / name, {"kind": "ensemble", "members": ["fold-0", "fold-1"], **common})
    save_meta(stack, {"kind": "stack", "members": ["cvA", "cvB"], **common,
                      "stacker": {"coef": [1.0, 1.0], "intercept": -2 * target + 0.3}})
    predictor = load_predictor(stack)
    p = predictor.member_probabilities(images)
    member_log_odds = np.log(p / (1 - p))
    assert np.abs(member_log_odds - target).max() < 0.05  # confident, below the 1e-6 clipping
    entry = export_module.export_onnx(stack, tmp_path / "stack.onnx")
    assert entry["max_abs_difference"] <= export_module.TOLERANCE
    got = _onnx_proba(tmp_path / "stack.onnx", images).astype(np.float64)
    expected = predictor.predict_proba(images)
    assert 0.2 < expected.min() and expected.max() < 0.8  # the stack itself is unsaturated
    np.testing.assert_allclose(np.log(got / (1 - got)), np.log(expected / (1 - expected)),
                               atol=1e-4)


def test_onnx_is_written_only_to_a_name_ending_onnx(run_copy, tmp_path, capsys):
    """--onnx scan.jpeg replaced the X-ray with a 19 MB model and said nothing."""
    xray = tmp_path / "scan.jpeg"
    xray.write_bytes(b"\xff\xd8\xff an X-ray")
    assert main(["export", str(run_copy), "--onnx", str(xray)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "name the file FILE.onnx" in err[0]
    assert xray.read_bytes() == b"\xff\xd8\xff an X-ray"


def test_resuming_a_finished_run_keeps_its_export_record(run_copy, synthetic_data, tmp_path):
    """train --resume of a run that had finished saves the same model again, and dropped
    model.json's record of the ONNX file exported from it."""
    out = tmp_path / "model.onnx"
    assert main(["export", str(run_copy), "--onnx", str(out)]) == 0
    record = read_meta(run_copy)["onnx"]
    assert main(["train", "--data", str(synthetic_data), "--out", str(run_copy), "--recipe",
                 "cpu", "--model", "seed_cnn", "--image-size", "32", "--epochs", "2",
                 "--resume", "--quiet"]) == 0
    assert read_meta(run_copy)["onnx"] == record
