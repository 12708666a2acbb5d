"""model_io: what a folder without model.json is said to be, and probabilities at extreme logits."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from pneumoscan.errors import PneumoscanError
from pneumoscan.model_io import probabilities, read_meta, stack_probabilities


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


def test_probabilities_are_the_logistic_function_of_the_scaled_margin():
    from scipy.special import expit

    logits = np.random.default_rng(0).normal(0, 8, size=(1000, 2))
    for temperature in (0.5, 1.0, 1.7):
        z = (logits[:, 1] - logits[:, 0]) / temperature
        np.testing.assert_allclose(probabilities(logits, temperature), expit(z), rtol=1e-12,
                                   atol=1e-300)
