"""model_io: what a folder without model.json is said to be, probabilities at extreme logits,
a stack's stacker, and weights or outputs that are not finite."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest

from pneumoscan.cli import main
from pneumoscan.errors import PneumoscanError
from pneumoscan.model_io import (
    Predictor,
    load_predictor,
    probabilities,
    read_meta,
    stack_probabilities,
    validate_meta,
)


def _refusal(run) -> str:
    with pytest.raises(PneumoscanError) as e:
        read_meta(run)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_a_missing_folder_does_not_exist(tmp_path):
    assert _refusal(tmp_path / "nosuchrun") == (
        f"{tmp_path / 'nosuchrun'}: not a run directory (does not exist)"
    )


def test_a_file_is_not_a_folder(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert _refusal(tmp_path / "model.safetensors").endswith("(a file, not a folder)")


def test_an_empty_folder_has_no_model_json(tmp_path):
    assert _refusal(tmp_path) == f"{tmp_path}: not a run directory (no model.json)"


def test_an_interrupted_run_says_how_to_finish_it(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    message = _refusal(tmp_path)
    assert "checkpoint.pt" in message and f"--out {tmp_path} --resume" in message


def test_a_seeds_parent_names_one_of_its_runs(tmp_path):
    for name in ("seed-0", "seed-1"):
        (tmp_path / name).mkdir()
    (tmp_path / "seed-1" / "model.json").write_text("{}")  # seed-0 did not finish
    message = _refusal(tmp_path)
    assert "train --seeds" in message and message.endswith(f"e.g. {tmp_path / 'seed-1'})")


def test_an_unfinished_cv_run_says_so(tmp_path):
    (tmp_path / "fold-0").mkdir()
    (tmp_path / "fold-0" / "model.json").write_text("{}")
    (tmp_path / "fold-1").mkdir()
    message = _refusal(tmp_path)
    assert "fold-K" in message and "cv" in message and "new --out" in message


def test_probabilities_at_extreme_logits_without_overflow_warnings():
    logits = np.array([[0.0, -120.0], [0.0, 120.0], [3.0, -95.0], [0.0, 0.0]], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "overflow encountered in exp" would raise
        p = probabilities(logits, temperature=0.01)  # z of +-12,000: exp(12,000) is inf
        stacked = stack_probabilities(np.array([[1e-9, 1e-9], [1 - 1e-9, 0.999]]),
                                      {"coef": [400.0, 400.0], "intercept": 0.0})
    assert p.dtype == np.float64
    assert p.tolist() == [0.0, 1.0, 0.0, 0.5]
    assert stacked.tolist() == [0.0, 1.0]


def test_logits_that_are_not_finite_give_nan_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = probabilities(np.array([[np.inf, np.inf], [np.nan, 0.0], [0.0, 1.0]]))
    assert np.isnan(p[:2]).all() and np.isfinite(p[2])


def test_probabilities_are_the_logistic_function_of_the_scaled_margin():
    from scipy.special import expit

    logits = np.random.default_rng(0).normal(0, 8, size=(1000, 2))
    for temperature in (0.5, 1.0, 1.7):
        z = (logits[:, 1] - logits[:, 0]) / temperature
        np.testing.assert_allclose(probabilities(logits, temperature), expit(z), rtol=1e-12,
                                   atol=1e-300)


def test_confident_float32_logits_keep_distinct_probabilities():
    # Margins above ~16.6 all rounded to exactly 1.0 in float32, tying confident predictions.
    margins = np.array([17.0, 18.0, 20.0, 25.0, 30.0, 35.0], np.float32)
    logits = np.stack([np.zeros_like(margins), margins], axis=1)
    p = probabilities(logits, temperature=1.0)
    assert p.dtype == np.float64
    assert (p < 1.0).all() and (np.diff(p) > 0).all()
    # 1 - p = exp(-margin), to float64's resolution near 1.
    np.testing.assert_allclose(-np.log1p(-p[:4]), margins[:4], rtol=1e-6)
    assert stack_probabilities(np.array([[0.5]]), {"coef": [1.0], "intercept": 30.0})[0] < 1.0


# --- a stack's stacker, checked with the rest of model.json -------------------------------------

_STACK = {"format": "pneumoscan-model", "format_version": 1, "kind": "stack",
          "members": ["cvA", "cvB"], "image_size": 32, "class_names": ["NORMAL", "PNEUMONIA"],
          "threshold": 0.5, "temperature": 1.0,
          "stacker": {"coef": [1.2, 0.8], "intercept": -0.3}}


def test_a_well_formed_stacker_passes():
    assert validate_meta(dict(_STACK), "model.json") is not None


@pytest.mark.parametrize("stacker, expected", [
    (None, "a stack needs 'stacker'"),
    ("1,1", "'stacker' has the wrong type"),
    ({"intercept": 0.0}, "'coef': a list of 2 finite numbers"),
    ({"coef": [1.0], "intercept": 0.0}, "'coef': a list of 2 finite numbers"),
    ({"coef": [1.0, 1.0, 1.0], "intercept": 0.0}, "'coef': a list of 2 finite numbers"),
    ({"coef": "1,1", "intercept": 0.0}, "'coef': a list of 2 finite numbers"),
    ({"coef": ["1", "1"], "intercept": 0.0}, "'coef': a list of 2 finite numbers"),
    ({"coef": [1.0, True], "intercept": 0.0}, "'coef': a list of 2 finite numbers"),
    ({"coef": [1.0, float("nan")], "intercept": 0.0}, "'coef': a list of 2 finite numbers"),
    ({"coef": [1.0, 1.0]}, "'intercept': a finite number"),
    ({"coef": [1.0, 1.0], "intercept": "0"}, "'intercept': a finite number"),
    ({"coef": [1.0, 1.0], "intercept": float("inf")}, "'intercept': a finite number"),
])
def test_a_stack_without_a_usable_stacker_is_refused_on_reading(tmp_path, stacker, expected):
    """Before, these passed read_meta and ended predict or evaluate in a KeyError traceback."""
    meta = {k: v for k, v in _STACK.items() if k != "stacker"}
    if stacker is not None:
        meta["stacker"] = stacker
    (tmp_path / "model.json").write_text(json.dumps(meta))
    message = _refusal(tmp_path)
    assert message.startswith(f"{tmp_path / 'model.json'}: invalid model.json: ")
    assert expected in message


# --- weights and outputs that are not finite ----------------------------------------------------


@pytest.fixture
def nan_run(trained_run, tmp_path):
    """A copy of the trained run with one NaN weight, as a diverged training run leaves."""
    from safetensors.torch import load_file, save_file

    run = shutil.copytree(trained_run, tmp_path / "nan-run")
    weights = load_file(str(run / "model.safetensors"))
    name = next(k for k, v in weights.items() if v.is_floating_point() and v.ndim == 4)
    weights[name].view(-1)[0] = float("nan")
    save_file(weights, str(run / "model.safetensors"))
    return run


def test_nan_weights_are_refused_on_loading(nan_run):
    with pytest.raises(PneumoscanError) as e:
        load_predictor(nan_run)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"{nan_run / 'model.safetensors'}: weights are not all finite")


def test_predict_with_nan_weights_is_one_line_and_writes_nothing(nan_run, synthetic_data,
                                                                 tmp_path, capsys):
    image = next((synthetic_data / "test").rglob("*.png"))
    out = tmp_path / "pred.json"
    assert main(["predict", str(nan_run), str(image), "--output", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not all finite" in err[0]
    assert not out.exists()


def test_evaluate_refuses_non_finite_probabilities_in_one_line(trained_run, synthetic_data,
                                                                monkeypatch, capsys):
    """Finite weights can still overflow to NaN; evaluate said ValueError in a traceback."""
    def nan_proba(self, images):
        p = np.full(len(images), 0.5)
        p[1] = np.nan
        return p

    monkeypatch.setattr(Predictor, "predict_proba", nan_proba)
    assert main(["evaluate", str(trained_run), "--data", str(synthetic_data), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not finite" in err[0] and "for 1 of 30 images" in err[0], err


def test_model_json_cannot_pass_options_to_the_model(trained_run, tmp_path, monkeypatch):
    """The project never wrote 'model_kwargs', yet it reached the model's constructor: for a
    timm model a bad value was a traceback, and {"pretrained": true} a download."""
    import pneumoscan.model_io as model_io

    run = shutil.copytree(trained_run, tmp_path / "run")
    meta = json.loads((run / "model.json").read_text())
    meta["model_kwargs"] = {"drop_rate": "abc", "pretrained": True}
    (run / "model.json").write_text(json.dumps(meta))
    seen = []
    real = model_io.create_model
    monkeypatch.setattr(model_io, "create_model",
                        lambda name, **kwargs: seen.append(kwargs) or real(name, **kwargs))
    predictor = load_predictor(run)
    assert seen and set(seen[0]) == {"in_chans", "num_classes", "image_size"}
    prob = predictor.predict_proba(np.zeros((1, 32, 32), dtype=np.uint8))
    assert prob.shape == (1,) and np.isfinite(prob).all()


def test_an_architecture_this_installation_does_not_know_names_model_json(trained_run,
                                                                          tmp_path):
    # A run made with a newer timm: the message must point at the run's file, not read as a
    # mistyped --model.
    run = shutil.copytree(trained_run, tmp_path / "run")
    meta = json.loads((run / "model.json").read_text())
    meta["architecture"] = "a_network_from_the_future"
    (run / "model.json").write_text(json.dumps(meta))
    with pytest.raises(PneumoscanError) as refused:
        load_predictor(run)
    assert str(refused.value).startswith(f"{run / 'model.json'}: cannot build the model (")
    assert "a_network_from_the_future" in str(refused.value)
