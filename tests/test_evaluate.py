import argparse
import json
import math
import re
import warnings

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from conftest import load_benchmark
from pneumoscan.evaluate import (
    RATE_KEYS,
    _weighted_rates,
    binary_metrics,
    bootstrap_ci,
    choose_threshold,
    evaluate_predictions,
    expected_calibration_error,
    fit_temperature,
    format_table,
    sensitivity_by_kind,
    summarize_runs,
)
from pneumoscan.model_io import probabilities
from pneumoscan.threshold_rules import parse_threshold_rule

# 10 predictions, threshold 0.5:
#   positives 0.9 0.8 0.7 0.4 0.3 -> tp=3 fn=2
#   negatives 0.6 0.2 0.1 0.1 0.05 -> fp=1 tn=4
Y10 = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0])
P10 = np.array([0.9, 0.8, 0.7, 0.4, 0.3, 0.6, 0.2, 0.1, 0.1, 0.05])


def synthetic(n, seed=0, prevalence=0.4):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prevalence).astype(int)
    prob = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0.0, 1.0)
    return y, prob


def test_hand_counted_case():
    m = binary_metrics(Y10, P10, threshold=0.5)
    assert m["confusion"] == {"tp": 3, "fp": 1, "tn": 4, "fn": 2}
    assert m["n"] == 10
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["sensitivity"] == pytest.approx(3 / 5)
    assert m["specificity"] == pytest.approx(4 / 5)
    assert m["precision"] == pytest.approx(3 / 4)
    assert m["npv"] == pytest.approx(4 / 6)
    assert m["f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 2))
    # pairs (pos > neg): 0.9,0.8,0.7 beat all 5; 0.4 and 0.3 beat 4 (not 0.6) -> 23 of 25
    assert m["roc_auc"] == pytest.approx(23 / 25)
    # ranked: 0.9+ 0.8+ 0.7+ 0.6- 0.4+ 0.3+ -> AP = (1 + 1 + 1 + 4/5 + 5/6) / 5
    assert m["pr_auc"] == pytest.approx((3 + 4 / 5 + 5 / 6) / 5)
    expected_loss = -np.mean(np.where(Y10 == 1, np.log(P10), np.log(1 - P10)))
    assert m["loss"] == pytest.approx(expected_loss)
    assert m["brier"] == pytest.approx(np.mean((P10 - Y10) ** 2))
    assert m["threshold"] == 0.5


def test_hand_counted_ece():
    # 15 bins: both 0.9s fall in bin 13 (observed 0.5 vs predicted 0.9, half the data);
    # both 0.0s in bin 0 (observed 0 vs predicted 0) -> ECE = 0.5 * 0.4
    y = np.array([1, 0, 0, 0])
    p = np.array([0.9, 0.9, 0.0, 0.0])
    assert expected_calibration_error(y, p) == pytest.approx(0.5 * 0.4)
    assert binary_metrics(y, p)["ece"] == pytest.approx(0.2)


def test_threshold_is_inclusive():
    m = binary_metrics(np.array([1, 0]), np.array([0.5, 0.49]), threshold=0.5)
    assert m["confusion"] == {"tp": 1, "fp": 0, "tn": 1, "fn": 0}


def test_result_is_plain_json():
    m = evaluate_predictions(Y10, P10, n_resamples=50)
    text = json.dumps(m, allow_nan=False)
    assert json.loads(text) == m
    for key in ("n", "confusion"):
        assert type(m[key]) in (int, dict)
    assert all(type(m[k]) is float for k in RATE_KEYS)


def test_undefined_figures_are_none_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        only_neg = binary_metrics(np.zeros(4, int), np.array([0.1, 0.2, 0.3, 0.4]))
        only_pos_none_predicted = binary_metrics(np.ones(3, int), np.array([0.1, 0.2, 0.3]))
        ci = bootstrap_ci(np.zeros(4, int), np.array([0.1, 0.2, 0.3, 0.4]), n_resamples=20)
    assert only_neg["sensitivity"] is None
    assert only_neg["precision"] is None  # nothing predicted positive
    assert only_neg["f1"] is None
    assert only_neg["roc_auc"] is None and only_neg["pr_auc"] is None
    assert only_neg["specificity"] == 1.0 and only_neg["npv"] == 1.0
    assert only_pos_none_predicted["specificity"] is None
    assert only_pos_none_predicted["precision"] is None
    assert only_pos_none_predicted["npv"] == 0.0
    assert only_pos_none_predicted["f1"] == 0.0
    assert ci["sensitivity"] is None and ci["roc_auc"] is None and ci["precision"] is None
    assert ci["specificity"] == pytest.approx([0.025 ** (1 / 4), 1.0])  # 4 of 4: exact
    # No positive case but a false alarm: precision is 0, yet F1 (which needs sensitivity) is
    # as undefined as sensitivity, in the figure and in its interval.
    false_alarm = binary_metrics(np.zeros(4, int), np.array([0.1, 0.2, 0.3, 0.9]))
    ci = bootstrap_ci(np.zeros(4, int), np.array([0.1, 0.2, 0.3, 0.9]), n_resamples=20)
    assert false_alarm["precision"] == 0.0 and false_alarm["f1"] is None and ci["f1"] is None


@pytest.mark.parametrize(
    ("y", "prob", "message"),
    [
        (np.zeros((3, 2)), np.zeros((3, 2)), r"shapes \(3, 2\) and \(3, 2\)"),
        (np.zeros(3), np.zeros(4), r"shapes \(3,\) and \(4,\)"),
        (np.zeros(0), np.zeros(0), r"non-empty, got shapes \(0,\)"),
        (np.array([0, 2, 1]), np.zeros(3), r"labels 0/1 only, got values \[2\]"),
        (np.array([0, 1]), np.array([0.5, 1.5]), r"within \[0, 1\].*1\.5"),
        (np.array([0, 1]), np.array([0.5, np.nan]), r"finite"),
    ],
)
def test_input_validation_names_what_it_got(y, prob, message):
    with pytest.raises(ValueError, match=message):
        binary_metrics(y, prob)


def test_bad_threshold_rejected():
    with pytest.raises(ValueError, match=r"threshold must be within \[0, 1\], got 1.5"):
        binary_metrics(Y10, P10, threshold=1.5)


def test_weighted_rates_are_the_figures_of_the_images_repeated():
    """A bootstrap row counts image i w[i] times: its figures are those of np.repeat."""
    y, prob = synthetic(600, seed=3)
    prob = np.round(prob, 2)  # ties, grouped as sklearn groups them
    rng = np.random.default_rng(0)
    weights = np.stack([np.ones(y.size), rng.integers(0, 3, y.size), rng.poisson(1.0, y.size),
                        (y == 1).astype(float)])  # the last: no negatives at all
    batch = _weighted_rates(prob, y == 1, weights, 0.5)
    for i, w in enumerate(weights.astype(int)):
        yy, pp = np.repeat(y, w), np.repeat(prob, w)
        single = binary_metrics(yy, pp, 0.5)
        for key in RATE_KEYS:
            expected = math.nan if single[key] is None else single[key]
            assert batch[key][i] == pytest.approx(expected, abs=1e-12, nan_ok=True), (i, key)
    twice = weights[1].astype(int)
    assert batch["roc_auc"][1] == pytest.approx(
        roc_auc_score(np.repeat(y, twice), np.repeat(prob, twice)))


def test_patient_bootstrap_is_wider_when_a_patients_images_agree():
    """Ten images a patient that all share the patient's fate carry the information of one:
    resampling images would claim ten times the data."""
    rng = np.random.default_rng(5)
    patient_y = np.arange(60) % 2
    patient_p = np.clip(patient_y * 0.3 + rng.uniform(0, 0.7, 60), 0, 1)
    y, prob = np.repeat(patient_y, 10), np.repeat(patient_p, 10)
    groups = np.repeat(np.arange(60), 10)
    by_image = bootstrap_ci(y, prob, n_resamples=400)
    by_patient = bootstrap_ci(y, prob, n_resamples=400, groups=groups)
    for key in ("accuracy", "roc_auc"):
        assert np.diff(by_patient[key]) > 2 * np.diff(by_image[key]), key
    # One image a patient: the same intervals as without groups, draw for draw.
    assert bootstrap_ci(y[::10], prob[::10], n_resamples=200, groups=np.arange(60)) == (
        bootstrap_ci(y[::10], prob[::10], n_resamples=200))
    with pytest.raises(ValueError, match="one entry per image"):
        bootstrap_ci(y, prob, groups=groups[:-1])


def test_bootstrap_contains_estimate_and_narrows_with_n():
    y_small, p_small = synthetic(100, seed=1)
    y_big, p_big = synthetic(2000, seed=1)
    small = bootstrap_ci(y_small, p_small, n_resamples=400)
    big = bootstrap_ci(y_big, p_big, n_resamples=400)
    point = binary_metrics(y_big, p_big)
    for key in RATE_KEYS:
        low, high = big[key]
        assert low <= point[key] <= high, key
        assert high - low < 0.6 * (small[key][1] - small[key][0]), key


def test_bootstrap_is_seeded():
    y, prob = synthetic(300, seed=2)
    a = bootstrap_ci(y, prob, n_resamples=200, seed=7)
    assert a == bootstrap_ci(y, prob, n_resamples=200, seed=7)
    assert a != bootstrap_ci(y, prob, n_resamples=200, seed=8)


def test_bootstrap_level_widens_interval():
    y, prob = synthetic(300, seed=2)
    narrow = bootstrap_ci(y, prob, n_resamples=300, level=0.5)["roc_auc"]
    wide = bootstrap_ci(y, prob, n_resamples=300, level=0.99)["roc_auc"]
    assert wide[0] < narrow[0] < narrow[1] < wide[1]


def test_evaluate_predictions_adds_ci95():
    m = evaluate_predictions(Y10, P10, n_resamples=100, seed=1)
    assert set(m["ci95"]) == set(RATE_KEYS)
    assert m["ci95"] == bootstrap_ci(Y10, P10, n_resamples=100, seed=1)


def test_youden_picks_best_roc_point():
    # at 0.7: sens 3/5, spec 5/5 -> J = 0.6; at 0.3: sens 1, spec 4/5 -> J = 0.8 (best)
    y = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0])
    p = np.array([0.9, 0.8, 0.7, 0.35, 0.3, 0.5, 0.2, 0.1, 0.1, 0.05])
    # Between 0.3 (the ROC point) and the next lower score, 0.2: the same labels.
    assert choose_threshold(y, p, "youden") == pytest.approx(_logit_middle(0.3, 0.2))


def _logit_middle(a: float, b: float) -> float:
    z = (np.log(a / (1 - a)) + np.log(b / (1 - b))) / 2
    return float(1 / (1 + np.exp(-z)))


def test_threshold_is_no_validation_score():
    """The threshold was one validation image's probability: that image's label then turned
    on bits that a batch of another size moves (1e-8), and predict said NORMAL for it alone
    and PNEUMONIA in a folder."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    p = np.clip(0.3 * y + rng.random(300) * 0.7, 0, 1)
    for rule in ("youden", "sensitivity:0.9"):
        t = choose_threshold(y, p, rule)
        gap = np.abs(p - t).min()
        assert gap > 1e-6, (rule, gap)
        # The same labels as at the ROC point itself (the lowest score at or above t).
        at_point = p[p >= t].min()
        assert ((p >= t) == (p >= at_point)).all()
    # Probabilities of exactly 0 and 1 (a temperature at its limit): no warning, the middle.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert choose_threshold(np.array([0, 0, 1, 1]), np.array([0.0, 0.0, 1.0, 1.0])) == 0.5
    # Scores at the ends: a bound of 1 or 0 leaves the middle in probability space.
    assert choose_threshold(np.array([0, 1, 1]), np.array([0.2, 1.0, 1.0])) == pytest.approx(0.6)
    assert choose_threshold(np.array([1, 1, 0]), np.array([0.4, 0.9, 0.0]),
                            "sensitivity:1.0") == pytest.approx(0.2)


def test_youden_perfect_separation_stays_in_unit_interval():
    t = choose_threshold(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 1.0]))
    assert t == pytest.approx(0.5)
    t = choose_threshold(np.array([1, 0]), np.array([0.5, 0.5]))  # J = 0 everywhere
    assert t == 0.5


def test_sensitivity_rule_picks_highest_qualifying_threshold():
    y = np.array([1] * 20 + [0] * 5)
    p = np.concatenate([np.linspace(0.99, 0.6, 20), [0.7, 0.5, 0.4, 0.3, 0.2]])
    # 19 of 20 positives (sensitivity 0.95) lie at or above the 19th-highest positive score
    t = choose_threshold(y, p, "sensitivity:0.95")
    assert t == pytest.approx(_logit_middle(p[18], p[19]))  # between it and the next lower
    assert binary_metrics(y, p, t)["sensitivity"] == pytest.approx(0.95)
    assert choose_threshold(y, p, "sensitivity:1.0") == pytest.approx(_logit_middle(0.6, 0.5))


def test_fixed_rule():
    assert choose_threshold(Y10, P10, "fixed:0.42") == 0.42


@pytest.mark.parametrize(
    "rule", ["", "yoden", "fixed", "fixed:", "fixed:1.5", "sensitivity:0", "sensitivity:x"]
)
def test_bad_rules_list_valid_forms(rule):
    with pytest.raises(ValueError, match=r"youden, sensitivity:X .*fixed:X") as err:
        choose_threshold(Y10, P10, rule)
    assert "\n" not in str(err.value)


def test_parse_threshold_rule_canonical_and_argparse_friendly():
    assert parse_threshold_rule(" Youden ") == "youden"
    assert parse_threshold_rule("sensitivity:.95") == "sensitivity:0.95"
    assert parse_threshold_rule("fixed:0") == "fixed:0.0"
    parser = argparse.ArgumentParser(prog="x", exit_on_error=False)
    parser.add_argument("--rule", type=parse_threshold_rule)
    with pytest.raises(argparse.ArgumentError, match="sensitivity:X"):
        parser.parse_args(["--rule", "bogus"])


def test_choose_threshold_needs_both_classes():
    with pytest.raises(ValueError, match=r"both classes.*shape \(3,\)"):
        choose_threshold(np.ones(3, int), np.array([0.2, 0.5, 0.9]))


def overconfident_logits(n=4000, seed=0):
    rng = np.random.default_rng(seed)
    margin = rng.normal(0.0, 1.5, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-margin))).astype(int)  # calibrated at T = 1
    logits = np.stack([np.zeros(n), margin], axis=1) * 5.0  # then made over-confident
    return logits, y


def test_temperature_scaling_fixes_overconfidence():
    logits, y = overconfident_logits()
    t = fit_temperature(logits, y)
    assert 4.0 < t < 6.5
    before = binary_metrics(y, probabilities(logits, 1.0))
    after = binary_metrics(y, probabilities(logits, t))
    assert after["loss"] < before["loss"]
    assert after["ece"] < before["ece"]


def test_temperature_returns_one_when_nothing_to_gain():
    assert fit_temperature(np.zeros((6, 2)), np.array([0, 1, 0, 1, 0, 1])) == 1.0


def test_probabilities_are_the_tempered_softmax():
    logits = np.array([[0.0, 0.0], [1.0, 3.0], [1000.0, -1000.0]])
    p = probabilities(logits, 2.0)
    shifted = logits / 2.0 - (logits / 2.0).max(axis=1, keepdims=True)
    softmax = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(p, softmax[:, 1])


@pytest.mark.parametrize("shape", [(5,), (5, 3), (0, 2)])
def test_logit_shape_errors_name_shape(shape):
    with pytest.raises(ValueError, match=r"\(N, 2\).*got shape " + re.escape(str(shape))):
        fit_temperature(np.zeros(shape), np.zeros(shape[0], dtype=int))


def test_temperature_argument_errors():
    with pytest.raises(ValueError, match=r"shape \(2,\) to match logits \(2, 2\), got \(3,\)"):
        fit_temperature(np.zeros((2, 2)), np.zeros(3))


def test_ece_small_when_calibrated_large_when_overconfident():
    rng = np.random.default_rng(0)
    prob = rng.random(20000)
    y = (rng.random(20000) < prob).astype(int)
    assert expected_calibration_error(y, prob) < 0.02
    logit = np.log(prob / (1 - prob))
    overconfident = 1 / (1 + np.exp(-5 * logit))
    assert expected_calibration_error(y, overconfident) > 0.1


def test_format_table():
    text = format_table(evaluate_predictions(Y10, P10, n_resamples=50))
    lines = text.splitlines()
    sens = next(line for line in lines if line.startswith("sensitivity"))
    assert "0.600" in sens and sens.count("[") == 1
    assert any(line.startswith("loss") and "[" not in line for line in lines)
    assert any("NORMAL" in line and "PNEUMONIA" in line for line in lines)
    assert lines[-1].startswith("threshold") and lines[-1].endswith("0.500")
    plain = format_table(binary_metrics(np.zeros(3, int), np.array([0.1, 0.2, 0.3])))
    assert "[" not in plain and "n/a" in plain


def test_summarize_runs():
    runs = [
        {"accuracy": 0.8, "roc_auc": None, "confusion": {"tp": 2}, "ci95": {"f1": [0.1, 0.2]}},
        {"accuracy": 0.9, "roc_auc": 0.7, "confusion": {"tp": 4}, "ci95": {"f1": [0.1, 0.3]}},
    ]
    s = summarize_runs(runs)
    assert s["accuracy"]["mean"] == pytest.approx(0.85)
    assert s["accuracy"]["std"] == pytest.approx(math.sqrt(0.005))
    assert (s["accuracy"]["min"], s["accuracy"]["max"]) == (0.8, 0.9)
    assert s["roc_auc"] == {"mean": 0.7, "std": 0.0, "min": 0.7, "max": 0.7}
    assert s["confusion.tp"]["mean"] == 3.0
    assert not any(key.startswith("ci95") for key in s)
    with pytest.raises(ValueError, match="got 0"):
        summarize_runs([])


def test_threshold_rules_benchmark_scores_rules_chosen_on_validation(tmp_path, capsys):

    bench = load_benchmark("threshold_rules")
    rng = np.random.default_rng(0)
    runs = []
    for k in range(2):  # two runs: noisy scores, the positives shifted up
        run = tmp_path / f"run{k}"
        run.mkdir()
        for name in ("val_predictions.npz", "test_predictions.npz"):
            y = (rng.random(300) < 0.7).astype(np.int64)
            prob = 1 / (1 + np.exp(-(2.5 * y - 1.0 + rng.normal(0, 1, 300))))
            np.savez(run / name, labels=y, prob=prob)
        runs.append(run)
    assert bench.main([str(r) for r in runs] + [str(tmp_path / "missing")]) == 0
    out = capsys.readouterr()
    assert "missing: skipped" in out.err
    result = json.loads(out.out.strip().splitlines()[-1])
    assert result["runs"] == 2
    # fixed:0.5 is scored by hand on the hold-outs
    expected = np.mean([((np.load(r / "test_predictions.npz")["prob"] >= 0.5)
                         == np.load(r / "test_predictions.npz")["labels"]).mean() for r in runs])
    assert result["rules"]["fixed:0.5"]["accuracy"] == pytest.approx(expected, abs=1e-4)
    for figures in result["rules"].values():
        assert 0.5 < figures["accuracy"] <= 1 and 0.5 < figures["balanced_accuracy"] <= 1


@pytest.mark.parametrize("threshold, shown", [
    (0.5, "0.500"), (0.137, "0.137"), (0.99997, "0.99997"), (0.9996, "0.9996"),
    (0.0004, "0.0004"), (1.0, "1.000"), (0.0, "0.000"), (0.1, "0.100"), (0.01, "0.010"),
])
def test_a_threshold_is_never_shown_as_0_or_1_when_it_is_neither(threshold, shown):
    from pneumoscan.threshold_rules import format_threshold

    assert format_threshold(threshold) == shown
    table = format_table({"threshold": threshold})
    assert table.splitlines()[-1].split()[-1] == shown


def test_a_temperature_at_the_end_of_its_range_is_flagged():
    from pneumoscan.evaluate import temperature_at_limit

    separable = np.array([[0.0, 9.0], [9.0, 0.0]] * 10)  # every margin right and large
    assert temperature_at_limit(fit_temperature(separable, np.array([1, 0] * 10)))
    backwards = np.array([[0.0, 1.0], [1.0, 0.0]] * 10)  # every margin wrong
    assert temperature_at_limit(fit_temperature(backwards, np.array([0, 1] * 10)))
    assert not temperature_at_limit(1.0) and not temperature_at_limit(0.1)


def test_sensitivity_by_kind_finds_the_kind_a_model_misses():
    # Every bacterial case found, most viral ones missed: one sensitivity (0.6) hides that.
    y = np.array([1] * 10 + [0] * 5)
    kinds = ["bacterial"] * 6 + ["viral"] * 4 + [""] * 5
    prob = np.array([0.9] * 6 + [0.8, 0.2, 0.1, 0.3] + [0.1] * 5)
    patients = [f"p{i // 2}" for i in range(15)]
    figures = sensitivity_by_kind(y, prob, 0.5, kinds, groups=patients, n_resamples=200)
    assert list(figures) == ["bacterial", "viral"]
    assert figures["bacterial"]["n"] == 6 and figures["bacterial"]["sensitivity"] == 1.0
    assert figures["viral"]["n"] == 4 and figures["viral"]["sensitivity"] == 0.25
    low, high = figures["viral"]["ci95"]
    assert 0.0 <= low <= 0.25 <= high <= 1.0 and low < high
    # 6 of 6 found, from 3 patients: the exact interval of 3 of 3.
    assert figures["bacterial"]["ci95"] == pytest.approx([0.025 ** (1 / 3), 1.0])
    with pytest.raises(ValueError, match="one entry per image"):
        sensitivity_by_kind(y, prob, 0.5, kinds[:-1])


def test_figures_by_kind_only_where_the_names_say_it():
    y, prob = np.array([1, 1, 0, 0]), np.array([0.9, 0.2, 0.1, 0.3])
    named = ["/x/person1_bacteria_1.jpeg", "/x/person2_virus_2.jpeg", "/x/IM-0001-0001.jpeg",
             "/x/IM-0002-0001.jpeg"]
    metrics = evaluate_predictions(y, prob, 0.5, n_resamples=20, paths=named)
    assert metrics["sensitivity_by_kind"]["viral"]["sensitivity"] == 0.0
    text = format_table(metrics)
    assert "sensitivity by kind of pneumonia" in text and "viral (1)" in text
    plain = evaluate_predictions(y, prob, 0.5, n_resamples=20, paths=["a.png"] * 4)
    assert "sensitivity_by_kind" not in plain and "by kind" not in format_table(plain)


def test_a_rate_of_all_correct_gets_the_exact_interval_not_one_point():
    # 50 of 50 NORMAL images called NORMAL: every bootstrap resample says 1.0 too, and its
    # interval was [1, 1]. Clopper-Pearson's for 50 of 50 is [0.025^(1/50), 1] = [0.929, 1].
    y = np.array([0] * 50 + [1] * 60)
    p = np.r_[np.full(50, 0.1), np.linspace(0.2, 0.9, 60)]
    ci = bootstrap_ci(y, p, 0.5)
    assert ci["specificity"] == pytest.approx([0.025 ** (1 / 50), 1.0])
    assert ci["sensitivity"][0] < ci["sensitivity"][1] < 1.0  # inside: the bootstrap's own
    # Patients are the draws: 50 NORMAL images of 25 patients are 25 of 25.
    groups = np.r_[np.repeat(np.arange(25), 2), 100 + np.arange(60)]
    assert bootstrap_ci(y, p, 0.5, groups=groups)["specificity"] == pytest.approx(
        [0.025 ** (1 / 25), 1.0])
    # None of the NORMAL images right: [0, 1 - 0.025^(1/50)].
    assert bootstrap_ci(y, 1 - p, 0.5)["specificity"] == pytest.approx(
        [0.0, 1 - 0.025 ** (1 / 50)])
