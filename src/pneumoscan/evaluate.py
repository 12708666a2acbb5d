"""Metrics, bootstrap intervals, operating thresholds and temperature scaling for binary scores.

Class 1 (PNEUMONIA) is the positive class throughout; ``prob`` is always the probability of it.
Every result is made of plain Python numbers, lists, dicts and ``None`` so that it can be
written as JSON as-is; ``None`` marks a figure that is undefined on the given data.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from pneumoscan import CLASS_NAMES
from pneumoscan.data.discover import pneumonia_kind
from pneumoscan.threshold_rules import format_threshold, split_threshold_rule

RATE_KEYS = (
    "accuracy",
    "sensitivity",
    "specificity",
    "precision",
    "npv",
    "f1",
    "roc_auc",
    "pr_auc",
)

ECE_BINS = 15
PROB_EPS = 1e-15  # keeps log loss finite for a confidently wrong probability of exactly 0 or 1

_BOOTSTRAP_CHUNK = 128  # resamples per vectorised batch: bounds memory at ~chunk * n floats
_LOG_T_BOUNDS = (math.log(1e-2), math.log(1e2))


# --------------------------------------------------------------------------- input checks


def _check_labels(y: np.ndarray) -> np.ndarray:
    if not (np.issubdtype(y.dtype, np.number) or y.dtype == bool):
        raise ValueError(f"y_true must hold labels 0/1, got dtype {y.dtype}")
    values = np.unique(y)
    bad = values[~np.isin(values, (0, 1))]
    if bad.size:
        raise ValueError(f"y_true must hold labels 0/1 only, got values {bad[:5].tolist()}")
    return y.astype(np.int64)


def _check_probs(p: np.ndarray) -> np.ndarray:
    if not np.issubdtype(p.dtype, np.number) or np.iscomplexobj(p):
        raise ValueError(f"prob must hold real probabilities, got dtype {p.dtype}")
    p = p.astype(np.float64)
    bad = ~np.isfinite(p) | (p < 0) | (p > 1)
    if bad.any():
        raise ValueError(
            f"prob must be finite and within [0, 1], got {int(bad.sum())} value(s) outside, "
            f"e.g. {p[bad][:3].tolist()}"
        )
    return p


def validate_predictions(y_true: Any, prob: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(y_true, prob)`` as int64 / float64 arrays; ValueError naming what was wrong otherwise."""
    y = np.asarray(y_true)
    p = np.asarray(prob)
    if y.ndim != 1 or p.ndim != 1 or y.shape != p.shape:
        raise ValueError(
            f"y_true and prob must be 1-D arrays of the same length, "
            f"got shapes {y.shape} and {p.shape}"
        )
    if y.size == 0:
        raise ValueError("y_true and prob must be non-empty, got shapes (0,) and (0,)")
    return _check_labels(y), _check_probs(p)


def _check_threshold(threshold: float) -> float:
    t = float(threshold)
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"threshold must be within [0, 1], got {threshold!r}")
    return t


def _check_logits(logits: Any) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] != 2 or z.shape[0] == 0:
        raise ValueError(f"logits must have shape (N, 2) with N > 0, got shape {z.shape}")
    if not np.isfinite(z).all():
        raise ValueError(f"logits must be finite, got {int((~np.isfinite(z)).sum())} non-finite")
    return z


def _both_classes(y: np.ndarray) -> bool:
    return bool(y.min() == 0 and y.max() == 1)


def _none_if_nan(x: float) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


# --------------------------------------------------------------------------- point metrics


def calibration_bins(y_true: Any, prob: Any, n_bins: int = ECE_BINS) -> dict[str, np.ndarray]:
    """Equal-width bins over the probability of class 1 in [0, 1].

    Returns ``edges`` (n_bins + 1), and per bin ``count``, ``mean_prob`` and ``frac_pos``
    (NaN for empty bins). Bins are half-open [lo, hi) except the last, which includes 1.
    """
    y, p = validate_predictions(y_true, prob)
    if int(n_bins) < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins!r}")
    edges = np.linspace(0.0, 1.0, int(n_bins) + 1)
    idx = np.searchsorted(edges[1:-1], p, side="right")
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_prob = np.bincount(idx, weights=p, minlength=n_bins) / count
        frac_pos = np.bincount(idx, weights=y, minlength=n_bins) / count
    return {"edges": edges, "count": count, "mean_prob": mean_prob, "frac_pos": frac_pos}


def expected_calibration_error(y_true: Any, prob: Any, n_bins: int = ECE_BINS) -> float:
    """Binary ECE: ``sum_b (n_b / n) * |mean(y in b) - mean(prob in b)|``.

    Bins are equal-width over the probability of class 1 (not over the confidence of the
    predicted class, as in the multi-class form of Guo et al. 2017).
    """
    bins = calibration_bins(y_true, prob, n_bins)
    filled = bins["count"] > 0
    gap = np.abs(bins["frac_pos"][filled] - bins["mean_prob"][filled])
    return float(np.sum(bins["count"][filled] * gap) / np.sum(bins["count"]))


def _rates(y: np.ndarray, pred: np.ndarray) -> dict[str, float | None]:
    nan = np.nan
    return {
        "accuracy": float(accuracy_score(y, pred)),
        "sensitivity": _none_if_nan(recall_score(y, pred, zero_division=nan)),
        "specificity": _none_if_nan(recall_score(y, pred, pos_label=0, zero_division=nan)),
        "precision": _none_if_nan(precision_score(y, pred, zero_division=nan)),
        "npv": _none_if_nan(precision_score(y, pred, pos_label=0, zero_division=nan)),
        # F1 weighs sensitivity in: without a positive case it is as undefined as sensitivity
        # (scikit-learn would say 0 as soon as there is a false positive).
        "f1": _none_if_nan(f1_score(y, pred, zero_division=nan)) if y.any() else None,
    }


def _ranking(y: np.ndarray, p: np.ndarray) -> dict[str, float | None]:
    if not _both_classes(y):
        return {"roc_auc": None, "pr_auc": None}
    return {
        "roc_auc": float(roc_auc_score(y, p)),
        "pr_auc": float(average_precision_score(y, p)),
    }


def binary_metrics(y_true: np.ndarray, prob: np.ndarray, threshold: float = 0.5) -> dict:
    """All figures for predictions ``prob >= threshold`` against ``y_true``.

    Keys: n, the RATE_KEYS, loss (log loss, probabilities clipped to [1e-15, 1 - 1e-15]),
    brier, ece (binary form, 15 equal-width bins over prob of class 1: see
    :func:`expected_calibration_error`), threshold and confusion {tp, fp, tn, fn}.
    Rates with a zero denominator and AUCs on single-class data are ``None``.
    """
    y, p = validate_predictions(y_true, prob)
    t = _check_threshold(threshold)
    pred = (p >= t).astype(np.int64)
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(y, pred, labels=[0, 1]).ravel())
    return {
        "n": int(y.size),
        **_rates(y, pred),
        **_ranking(y, p),
        "loss": float(log_loss(y, np.clip(p, PROB_EPS, 1 - PROB_EPS), labels=[0, 1])),
        "brier": float(brier_score_loss(y, p, pos_label=1)),
        "ece": expected_calibration_error(y, p),
        "threshold": t,
        "confusion": {"tp": tp, "fp": fp, "tn": tn, "fn": fn},
    }


# --------------------------------------------------------------------------- bootstrap


def _divide(num: np.ndarray, den: np.ndarray | float) -> np.ndarray:
    num = np.asarray(num, dtype=np.float64)
    den = np.broadcast_to(np.asarray(den, dtype=np.float64), num.shape)
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _weighted_rates(
    p: np.ndarray, positive: np.ndarray, weights: np.ndarray, threshold: float
) -> dict[str, np.ndarray]:
    """Every RATE_KEYS figure for each row of ``weights`` (B, n): image i counted weights[b, i]
    times, as in a bootstrap resample (NaN where undefined, as :func:`binary_metrics` has None).

    The scores never change between resamples, only how often each image is drawn, so one sort
    serves every row.
    """
    pred = p >= threshold
    n_pos = weights @ positive
    n_neg = weights @ ~positive
    tp = weights @ (pred & positive)
    fp = weights @ (pred & ~positive)
    fn, tn = n_pos - tp, n_neg - fp
    roc_auc, pr_auc = _weighted_ranking(p, positive, weights, n_pos, n_neg)
    return {
        "accuracy": _divide(tp + tn, n_pos + n_neg),
        "sensitivity": _divide(tp, n_pos),
        "specificity": _divide(tn, n_neg),
        "precision": _divide(tp, tp + fp),
        "npv": _divide(tn, tn + fn),
        "f1": np.where(n_pos > 0, _divide(2 * tp, 2 * tp + fp + fn), np.nan),
        "roc_auc": roc_auc,
        "pr_auc": pr_auc,
    }


def _weighted_ranking(
    p: np.ndarray, positive: np.ndarray, weights: np.ndarray, n_pos: np.ndarray,
    n_neg: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """ROC AUC and average precision per row of ``weights``: sklearn's step/trapezoid
    definitions (ties grouped at distinct scores) on the images as each row counts them."""
    order = np.argsort(-p, kind="stable")
    sorted_p, is_pos = p[order], positive[order]
    w = weights[:, order]
    # Running counts at the last image of each distinct score (ties move together).
    ends = np.flatnonzero(np.append(sorted_p[:-1] != sorted_p[1:], True))
    tps = np.cumsum(w * is_pos, axis=1)[:, ends]
    fps = np.cumsum(w * ~is_pos, axis=1)[:, ends]
    zero = np.zeros((w.shape[0], 1))
    prev_tps = np.concatenate([zero, tps[:, :-1]], axis=1)
    prev_fps = np.concatenate([zero, fps[:, :-1]], axis=1)
    roc_auc = _divide(((fps - prev_fps) * (tps + prev_tps) / 2.0).sum(axis=1), n_pos * n_neg)
    precision = np.divide(tps, tps + fps, out=np.zeros_like(tps), where=tps + fps > 0)
    pr_auc = _divide(((tps - prev_tps) * precision).sum(axis=1), n_pos)
    # Undefined with one class only, as binary_metrics has it (sklearn would give AP 1).
    return roc_auc, np.where((n_pos > 0) & (n_neg > 0), pr_auc, np.nan)


def _resample_weights(
    rng: np.random.Generator, groups: np.ndarray, group_strata: np.ndarray, rows: int
) -> np.ndarray:
    """(rows, n) counts: each row a bootstrap resample of the groups (patients), drawn with
    replacement within each stratum (class) and keeping its number of groups; an image counts
    as often as its group was drawn."""
    counts = np.zeros((rows, group_strata.size))
    for stratum in np.unique(group_strata):
        members = np.flatnonzero(group_strata == stratum)
        k = members.size
        counts[:, members] = rng.multinomial(k, np.full(k, 1.0 / k), size=rows)
    return counts[:, groups]


def _group_codes(groups: Any, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each image's group as 0..G-1, and each group's stratum: its class, or 2 for a group
    holding both classes. Without groups every image is its own."""
    if groups is None:
        return np.arange(y.size), y.astype(np.int64)
    groups = np.asarray(groups)
    if groups.shape != y.shape:
        raise ValueError(f"groups must have one entry per image: shapes {groups.shape} and "
                         f"{y.shape}")
    _, codes = np.unique(groups, return_inverse=True)
    positives = np.bincount(codes, weights=y)
    sizes = np.bincount(codes)
    strata = np.where(positives == 0, 0, np.where(positives == sizes, 1, 2))
    return codes, strata


def percentile_interval(values: np.ndarray, level: float) -> list[float] | None:
    """The ``level`` percentile interval of ``values``, NaN (undefined) left out; None if all
    are."""
    defined = values[~np.isnan(values)]
    if defined.size == 0:
        return None
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(defined, [tail, 100.0 - tail])
    return [float(low), float(high)]


def resampled_rates(
    y: np.ndarray, scored: Sequence[tuple[np.ndarray, float]], groups: Any, n_resamples: int,
    seed: int,
) -> list[dict[str, np.ndarray]]:
    """Every RATE_KEYS figure of each (probabilities, threshold) of ``scored`` in the same
    ``n_resamples`` bootstrap resamples of ``groups`` (see ``bootstrap_ci``): one ``{key:
    (n_resamples,) array}`` per entry, NaN where undefined. One draw serves every entry, which
    pairs them: two models' figures in a resample are those of the same patients."""
    if int(n_resamples) != n_resamples or n_resamples < 1:
        raise ValueError(f"n_resamples must be a whole number >= 1, got {n_resamples!r}")
    codes, strata = _group_codes(groups, y)
    rng = np.random.default_rng(seed)
    positive = y == 1
    chunks: list[list[dict[str, np.ndarray]]] = [[] for _ in scored]
    for start in range(0, int(n_resamples), _BOOTSTRAP_CHUNK):
        weights = _resample_weights(rng, codes, strata,
                                    min(_BOOTSTRAP_CHUNK, int(n_resamples) - start))
        for chunk, (p, t) in zip(chunks, scored, strict=True):
            chunk.append(_weighted_rates(p, positive, weights, t))
    return [{key: np.concatenate([c[key] for c in chunk]) for key in RATE_KEYS}
            for chunk in chunks]


def bootstrap_ci(
    y_true: np.ndarray,
    prob: np.ndarray,
    threshold: float = 0.5,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    groups: Any = None,
) -> dict[str, list[float] | None]:
    """Percentile intervals ``[low, high]`` for every RATE_KEYS figure.

    Stratified bootstrap over ``groups`` (patient ids; default: each image its own): the
    patients of each class are resampled with replacement, keeping their number, and each
    brings all of their images. A patient's images are not independent of each other (the same
    chest, often the same day), so resampling images alone would give intervals too narrow.
    Resamples in which a figure is undefined (e.g. no predicted positives for precision) are
    left out of its interval; ``None`` when it is undefined in all of them.
    """
    y, p = validate_predictions(y_true, prob)
    t = _check_threshold(threshold)
    if not 0.0 < float(level) < 1.0:
        raise ValueError(f"level must be within (0, 1), got {level!r}")
    (rates,) = resampled_rates(y, [(p, t)], groups, n_resamples, seed)
    intervals = {key: percentile_interval(rates[key], float(level)) for key in RATE_KEYS}
    codes, _ = _group_codes(groups, y)
    positive = y == 1
    correct = (p >= t) == positive
    for key, counted in _proportion_denominators(positive, p >= t).items():
        hits = correct[counted]
        if hits.size and (hits.all() or not hits.any()):
            # Every resample gives this rate as 0 or 1 too: the bootstrap's interval would be
            # [1, 1], as if 50 of 50 were certainty. The exact interval of the sample says how
            # far the rate could be from it, counting patients (fewer than images) as the draws.
            patients = np.unique(codes[counted]).size
            intervals[key] = _exact_interval_at_boundary(bool(hits.all()), patients, float(level))
    return intervals


def _proportion_denominators(positive: np.ndarray, pred: np.ndarray) -> dict[str, np.ndarray]:
    """The rates that are shares of correct calls, each with the images its denominator counts."""
    return {"accuracy": np.ones_like(positive), "sensitivity": positive,
            "specificity": ~positive, "precision": pred, "npv": ~pred}


def _exact_interval_at_boundary(all_correct: bool, n: int, level: float) -> list[float] | None:
    """Clopper-Pearson's interval for n of n (or 0 of n) correct: [(a/2)^(1/n), 1] (or
    [0, 1 - (a/2)^(1/n)]), a = 1 - level; None where n is 0."""
    if n == 0:
        return None
    bound = ((1.0 - level) / 2.0) ** (1.0 / n)
    return [bound, 1.0] if all_correct else [0.0, 1.0 - bound]


def evaluate_predictions(
    y_true: np.ndarray,
    prob: np.ndarray,
    threshold: float = 0.5,
    n_resamples: int = 1000,
    seed: int = 0,
    groups: Any = None,
    paths: Sequence[str] | None = None,
) -> dict:
    """:func:`binary_metrics` plus ``ci95``: 95% bootstrap intervals of RATE_KEYS, resampling
    ``groups`` (patients) where given (:func:`bootstrap_ci`); with the images' ``paths``, also
    ``sensitivity_by_kind`` where their names say the kind of pneumonia."""
    metrics = binary_metrics(y_true, prob, threshold)
    metrics["ci95"] = bootstrap_ci(y_true, prob, threshold, n_resamples, seed, level=0.95,
                                   groups=groups)
    if paths is not None:
        by_kind = sensitivity_by_kind(y_true, prob, threshold, [pneumonia_kind(p) for p in paths],
                                      groups, n_resamples, seed)
        if by_kind:
            metrics["sensitivity_by_kind"] = by_kind
    return metrics


def sensitivity_by_kind(
    y_true: Any, prob: Any, threshold: float, kinds: Sequence[str], groups: Any = None,
    n_resamples: int = 1000, seed: int = 0,
) -> dict[str, dict]:
    """Sensitivity within each kind of pneumonia (``kinds``: one per image, '' where unknown),
    with its 95% interval by the same patient bootstrap: ``{kind: {n, sensitivity, ci95}}``.

    Viral pneumonia is often subtler on an X-ray than bacterial: one sensitivity over both can
    hide a model that misses most of the rarer kind.
    """
    y, p = validate_predictions(y_true, prob)
    kinds = np.asarray(kinds, dtype=str)
    if kinds.shape != y.shape:
        raise ValueError(f"kinds must have one entry per image: shapes {kinds.shape} and "
                         f"{y.shape}")
    result = {}
    for kind in sorted(set(kinds[y == 1]) - {""}):
        rows = (y == 1) & (kinds == kind)
        ci = bootstrap_ci(y[rows], p[rows], threshold, n_resamples, seed, level=0.95,
                          groups=None if groups is None else np.asarray(groups)[rows])
        result[str(kind)] = {
            "n": int(rows.sum()),
            "sensitivity": float(np.mean(p[rows] >= threshold)),
            "ci95": ci["sensitivity"],
        }
    return result


# --------------------------------------------------------------------------- thresholds


def choose_threshold(y_true: np.ndarray, prob: np.ndarray, rule: str = "youden") -> float:
    """Operating threshold (predict positive iff ``prob >= threshold``) chosen by ``rule``.

    - ``youden``: the ROC threshold maximising sensitivity + specificity - 1 (the highest
      one among ties); 0.5 when no threshold beats chance;
    - ``sensitivity:X``: the highest ROC threshold whose sensitivity is at least X;
    - ``fixed:X``: X itself.

    A ROC threshold is one validation image's score; the threshold returned lies in the middle
    of the gap between it and the next lower score (0 below the lowest), which classifies the
    validation images alike. On the score itself, that image's label would turn on the last
    bits of its probability, which a batch of another size moves by 1e-8.
    """
    name, value = split_threshold_rule(rule)
    if name == "fixed":
        assert value is not None
        return float(value)
    y, p = validate_predictions(y_true, prob)
    if not _both_classes(y):
        raise ValueError(
            f"rule {rule!r} needs both classes in y_true, got only class {int(y[0])} "
            f"(shape {y.shape})"
        )
    fpr, tpr, thresholds = roc_curve(y, p, drop_intermediate=False)
    score = tpr - fpr if name == "youden" else tpr >= value
    best = int(np.argmax(score))  # first maximum: the highest such threshold
    if name == "youden" and score[best] <= 0:
        return 0.5  # scores that carry no information: no threshold beats chance
    below = thresholds[best + 1] if best + 1 < len(thresholds) else 0.0
    return _middle(float(min(thresholds[best], 1.0)), float(below))


def _middle(high: float, low: float) -> float:
    """The middle of (low, high) in logit space, where probabilities near 0 and 1 are spread
    out as the model's scores are; in probability space where that leaves the gap (a bound at
    0 or 1, or two scores float64 cannot tell apart there)."""
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):  # inf - inf: NaN
        z = (np.log(high) - np.log1p(-high) + np.log(low) - np.log1p(-low)) / 2
        middle = float(1 / (1 + np.exp(-z)))
    return middle if low < middle < high else (high + low) / 2


# --------------------------------------------------------------------------- temperature


def _nll(margin: np.ndarray, sign: np.ndarray, temperature: float) -> float:
    return float(np.mean(np.logaddexp(0.0, -sign * margin / temperature)))


def fit_temperature(logits: np.ndarray, y_true: np.ndarray) -> float:
    """Temperature T > 0 minimising the validation NLL of ``softmax(logits / T)`` (Guo et al.).

    Searched over log T in [log 0.01, log 100]; returns 1.0 when no T lowers the NLL
    (e.g. all logit differences are zero).
    """
    z = _check_logits(logits)
    y = np.asarray(y_true)
    if y.shape != (z.shape[0],):
        raise ValueError(
            f"y_true must have shape ({z.shape[0]},) to match logits {z.shape}, got {y.shape}"
        )
    y = _check_labels(y)
    margin = z[:, 1] - z[:, 0]
    sign = 2.0 * y - 1.0
    result = minimize_scalar(
        lambda log_t: _nll(margin, sign, math.exp(log_t)),
        bounds=_LOG_T_BOUNDS,
        method="bounded",
    )
    best = math.exp(float(result.x))
    if not (result.success and _nll(margin, sign, best) < _nll(margin, sign, 1.0)):
        return 1.0
    return best


def temperature_at_limit(temperature: float) -> bool:
    """Whether :func:`fit_temperature` stopped at (within a factor of 2 of) an end of its range:
    validation then either separates the classes perfectly (T -> 0; with large margins the
    search stops short of the end, where the loss is already nil) or carries no signal
    (T -> infinity), and the calibrated probabilities mean little."""
    log_t = math.log(temperature)
    return any(abs(log_t - end) < math.log(2) for end in _LOG_T_BOUNDS)


# --------------------------------------------------------------------------- reporting


def format_figure(value: Any, digits: int = 3) -> str:
    """A figure as the tables print it: 3 decimals, integers as they are, None as n/a."""
    if value is None:
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return f"{float(value):.{digits}f}"


def _confusion_lines(confusion: Mapping[str, int]) -> list[str]:
    neg, pos = CLASS_NAMES
    width = max(len(neg), len(pos), 5) + 2
    head = f"{'actual / predicted':<22}{neg:>{width}}{pos:>{width}}"
    row_neg = f"{neg:<22}{confusion['tn']:>{width}}{confusion['fp']:>{width}}"
    row_pos = f"{pos:<22}{confusion['fn']:>{width}}{confusion['tp']:>{width}}"
    return ["", head, row_neg, row_pos]


def format_table(metrics: dict) -> str:
    """Plain-text report: one row per figure (value, and ``[low, high]`` when ``ci95`` has it),
    then the confusion matrix, then the threshold. All fractions are shown to 3 decimals."""
    ci = metrics.get("ci95") or {}
    names = ["n", *RATE_KEYS, "loss", "brier", "ece"]
    width = max(len(k) for k in names) + 2
    lines = [f"{'figure':<{width}}{'value':>8}  {'95% CI' if ci else ''}".rstrip()]
    for key in names:
        if key not in metrics:
            continue
        row = f"{key:<{width}}{format_figure(metrics[key]):>8}"
        interval = ci.get(key)
        if interval is not None:
            row += f"  [{format_figure(interval[0])}, {format_figure(interval[1])}]"
        lines.append(row)
    if "confusion" in metrics:
        lines += _confusion_lines(metrics["confusion"])
    if "threshold" in metrics:
        lines += ["", f"{'threshold':<{width}}{format_threshold(metrics['threshold']):>8}"]
    by_kind = metrics.get("sensitivity_by_kind") or {}
    if by_kind:
        lines += ["", "sensitivity by kind of pneumonia (from the file names):"]
        labels = {kind: f"{kind} ({figures['n']})" for kind, figures in by_kind.items()}
        label_width = max(width - 2, *(len(label) + 2 for label in labels.values()))
        for kind, figures in by_kind.items():
            interval = figures.get("ci95")
            ci_text = (f"  [{format_figure(interval[0])}, {format_figure(interval[1])}]"
                       if interval else "")
            lines.append(f"  {labels[kind]:<{label_width}}"
                         f"{format_figure(figures['sensitivity']):>8}{ci_text}")
    return "\n".join(lines)


def _numeric_items(metrics: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, float]]:
    for key, value in metrics.items():
        if isinstance(value, Mapping):
            yield from _numeric_items(value, f"{prefix}{key}.")
        elif isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
            yield f"{prefix}{key}", float(value)


def summarize_runs(runs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """``{key: {mean, std, min, max}}`` over several runs (e.g. seeds) of metric dicts.

    Nested numbers are keyed with dots (``confusion.tp``); lists such as ``ci95`` intervals and
    ``None`` values are skipped. ``std`` is the sample standard deviation (0.0 for one value).
    """
    if len(runs) == 0:
        raise ValueError("summarize_runs needs at least one metrics dict, got 0")
    values: dict[str, list[float]] = {}
    for run in runs:
        for key, value in _numeric_items(run):
            values.setdefault(key, []).append(value)
    summary = {}
    for key, vals in values.items():
        arr = np.asarray(vals)
        summary[key] = {
            "mean": float(arr.mean()),
            "std": float(arr.std(ddof=1)) if arr.size > 1 else 0.0,
            "min": float(arr.min()),
            "max": float(arr.max()),
        }
    return summary
