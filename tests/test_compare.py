"""pneumoscan compare: two runs on the same images, their difference and its paired interval."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pneumoscan.cli import main
from pneumoscan.compare import compare_predictions, mcnemar_exact_p
from pneumoscan.evaluate import RATE_KEYS


def _two_models(n: int = 300, seed: int = 0):
    """B sees the labels better than A; both share the same hard images (noise in common)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.6).astype(np.int64)
    shared = rng.normal(0, 1.0, n)
    z_a = (2 * y - 1) * 0.8 + shared + rng.normal(0, 0.3, n)
    z_b = (2 * y - 1) * 1.6 + shared + rng.normal(0, 0.3, n)
    patients = [f"p{i // 2}" for i in range(n)]  # two images a patient
    return y, 1 / (1 + np.exp(-z_a)), 1 / (1 + np.exp(-z_b)), patients


def test_a_model_against_itself_differs_by_nothing():
    y, p_a, _, patients = _two_models()
    result = compare_predictions(y, p_a, 0.5, p_a, 0.5, groups=patients, n_resamples=200)
    assert all(result["difference"][k] == 0 for k in RATE_KEYS)
    assert all(result["ci95"][k] == [0.0, 0.0] for k in RATE_KEYS)
    assert all(m == {"a_right_b_wrong": 0, "b_right_a_wrong": 0, "p_value": 1.0}
               for m in result["mcnemar"].values())


def test_the_better_model_is_told_apart_and_the_pairing_narrows_the_interval():
    y, p_a, p_b, patients = _two_models()
    result = compare_predictions(y, p_a, 0.5, p_b, 0.5, groups=patients, n_resamples=500)
    low, high = result["ci95"]["roc_auc"]
    assert 0 < low <= result["difference"]["roc_auc"] <= high
    assert result["difference"]["roc_auc"] == pytest.approx(result["b"]["roc_auc"]
                                                             - result["a"]["roc_auc"])
    # Unpaired, the two models' own intervals overlap far more than the paired one allows.
    from pneumoscan.evaluate import bootstrap_ci

    own_a = bootstrap_ci(y, p_a, 0.5, 500, groups=patients)["roc_auc"]
    own_b = bootstrap_ci(y, p_b, 0.5, 500, groups=patients)["roc_auc"]
    assert high - low < (own_a[1] - own_a[0]) + (own_b[1] - own_b[0])
    m = result["mcnemar"]["accuracy"]
    right_a, right_b = (p_a >= 0.5) == y, (p_b >= 0.5) == y
    assert m["a_right_b_wrong"] == np.sum(right_a & ~right_b)
    assert m["b_right_a_wrong"] == np.sum(right_b & ~right_a)
    assert m["p_value"] < 0.05


def test_mcnemars_exact_p_is_the_two_sided_binomial_one():
    assert mcnemar_exact_p(0, 0) == 1.0
    assert mcnemar_exact_p(1, 1) == 1.0
    assert mcnemar_exact_p(0, 6) == pytest.approx(2 * 0.5**6)  # 0.03125
    assert mcnemar_exact_p(4, 24) == pytest.approx(mcnemar_exact_p(24, 4))


def test_compare_command_prints_and_writes_the_difference(trained_run, synthetic_data, tmp_path,
                                                          capsys):
    out = tmp_path / "compare.json"
    assert main(["compare", str(trained_run), str(trained_run), "--data", str(synthetic_data),
                 "--json", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "95% CI of B - A (patients)" in printed and "+0.000  [+0.000, +0.000]" in printed
    result = json.loads(out.read_text())
    assert result["n"] == 30 and result["mcnemar"]["accuracy"]["p_value"] == 1.0
    assert set(result["ci95"]) == set(RATE_KEYS) and result["a"] == result["b"]
    assert result["run_a"] == result["run_b"] == str(trained_run)  # which run was which
    # No image called differently: every share's interval is marked as too narrow to read.
    assert "accuracy" in printed and printed.count(" *\n") == 3


def test_compare_refuses_a_json_that_is_a_runs_own_file(trained_run, capsys):
    status = main(["compare", str(trained_run), str(trained_run), "--json",
                   str(trained_run / "model.json")])
    assert status == 2 and "is one of the run's own files" in capsys.readouterr().err


def test_a_share_with_few_images_called_differently_is_marked_with_its_exact_test():
    """4 NORMAL images right by B only: the bootstrap's interval of the specificity difference
    excludes 0, yet McNemar's exact p is 0.125; every PNEUMONIA image is called alike, and the
    interval of the sensitivity difference is [0, 0]. Both rows must say not to trust them."""
    from pneumoscan.compare import format_comparison

    y = np.array([0] * 100 + [1] * 100)
    p_b = np.where(y == 1, 0.9, 0.1)
    p_a = p_b.copy()
    p_a[:4] = 0.9  # A calls 4 NORMAL images PNEUMONIA
    result = compare_predictions(y, p_a, 0.5, p_b, 0.5, n_resamples=200)
    assert result["ci95"]["sensitivity"] == [0.0, 0.0]  # what the marking is for
    assert result["mcnemar"]["specificity"] == {"a_right_b_wrong": 0, "b_right_a_wrong": 4,
                                                "p_value": 0.125}
    text = format_comparison(result, "A", "B")
    rows = {line.split()[0]: line for line in text.splitlines() if line[:1].isalpha()}
    assert rows["specificity"].endswith(" *") and rows["sensitivity"].endswith(" *")
    assert "read McNemar's exact p" in text
    with pytest.raises(ValueError, match="n_resamples"):
        compare_predictions(y, p_a, 0.5, p_b, 0.5, n_resamples=0)


def test_the_coverage_benchmark_runs_and_ends_with_its_json_line(capsys):
    from conftest import load_benchmark

    bench = load_benchmark("compare_coverage")
    assert bench.main(["--trials", "3", "--images", "40", "--resamples", "50",
                       "--discordant", "0,4"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # Two models that call every image alike never differ, by either test.
    assert result["false_alarms"]["0"] == {"interval_excludes_0": 0.0, "mcnemar_below_0.05": 0.0}
    assert result["command"].startswith("python benchmarks/compare_coverage.py --trials 3")
