"""Two models on the same images: is one better than the other, or is the difference noise?

Each model is scored at its own threshold. The difference of every rate (B - A) gets a 95%
interval from a paired bootstrap over patients: each resample draws the patients once, and
both models are scored on that same draw, so what the two share (hard images, easy ones)
cancels out of the difference. An interval that holds 0 means the images cannot tell the two
apart.

The bootstrap needs images the two call differently. Where only a few are (fewer than
FEW_DISCORDANT among a share's images: all of them for accuracy, the PNEUMONIA ones for
sensitivity, the NORMAL ones for specificity), every resample holds those few or fewer and the
interval comes out too narrow, [+0.000, +0.000] where there are none: in simulations of two
equal models with 4 such images it left out 0 in 11% of cases and with 8 in 8%, not 5%
(benchmarks/compare_coverage.py). Those rows are marked,
and McNemar's exact test on the images they call differently is given for each: it takes a
patient's X-rays as independent, which they are not, but it is exact where the bootstrap fails.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pneumoscan.evaluate import (
    RATE_KEYS,
    evaluate_predictions,
    format_figure,
    percentile_interval,
    resampled_rates,
    validate_predictions,
)
from pneumoscan.threshold_rules import format_threshold

FEW_DISCORDANT = 12  # images called differently, below which a share's interval is too narrow


def compare_predictions(
    y_true: Any, prob_a: Any, threshold_a: float, prob_b: Any, threshold_b: float, *,
    groups: Any = None, n_resamples: int = 1000, seed: int = 0,
) -> dict:
    """``{"n", "a": figures, "b": figures, "difference": {rate: b - a}, "ci95": {rate: [low,
    high]}, "mcnemar": {share: {"a_right_b_wrong", "b_right_a_wrong", "p_value"}}}`` for two
    models' calibrated probabilities of the same images (``groups``: their patients); McNemar
    for accuracy (every image), sensitivity (PNEUMONIA) and specificity (NORMAL)."""
    y, p_a = validate_predictions(y_true, prob_a)
    _, p_b = validate_predictions(y_true, prob_b)
    a = evaluate_predictions(y, p_a, threshold_a, n_resamples, seed, groups=groups)
    b = evaluate_predictions(y, p_b, threshold_b, n_resamples, seed, groups=groups)
    rates_a, rates_b = resampled_rates(y, [(p_a, threshold_a), (p_b, threshold_b)], groups,
                                       n_resamples, seed)
    positive = y == 1
    right_a, right_b = (p_a >= threshold_a) == positive, (p_b >= threshold_b) == positive
    shares = {"accuracy": np.ones_like(positive), "sensitivity": positive,
              "specificity": ~positive}
    mcnemar = {}
    for key, counted in shares.items():
        only_a = int(np.sum(right_a & ~right_b & counted))
        only_b = int(np.sum(right_b & ~right_a & counted))
        mcnemar[key] = {"a_right_b_wrong": only_a, "b_right_a_wrong": only_b,
                        "p_value": mcnemar_exact_p(only_a, only_b)}
    return {
        "n": int(y.size),
        "a": a,
        "b": b,
        "difference": {k: None if a[k] is None or b[k] is None else b[k] - a[k]
                       for k in RATE_KEYS},
        "ci95": {k: percentile_interval(rates_b[k] - rates_a[k], 0.95) for k in RATE_KEYS},
        "mcnemar": mcnemar,
    }


def mcnemar_exact_p(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: the discordant images, split as a fair coin would."""
    from scipy.stats import binomtest

    n = only_a + only_b
    return 1.0 if n == 0 else float(binomtest(only_a, n, 0.5).pvalue)


def format_comparison(result: dict, name_a: str, name_b: str) -> str:
    """Both runs' rates side by side, B - A with its interval, and McNemar's lines; a share
    whose images the two call differently too rarely for its interval is marked."""
    width = max(len(k) for k in RATE_KEYS) + 2
    lines = [f"A: {name_a}", f"B: {name_b}", f"{result['n']} images, each model at its own "
             f"threshold (A {format_threshold(result['a']['threshold'])}, "
             f"B {format_threshold(result['b']['threshold'])})", "",
             f"{'figure':<{width}}{'A':>8}{'B':>8}{'B - A':>9}  95% CI of B - A (patients)"]
    few = [k for k, m in result["mcnemar"].items()
           if m["a_right_b_wrong"] + m["b_right_a_wrong"] < FEW_DISCORDANT]
    for key in RATE_KEYS:
        diff, ci = result["difference"][key], result["ci95"][key]
        ci_text = f"  [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else ""
        diff_text = "n/a" if diff is None else f"{diff:+.3f}"
        lines.append(f"{key:<{width}}{format_figure(result['a'][key]):>8}"
                     f"{format_figure(result['b'][key]):>8}{diff_text:>9}{ci_text}"
                     + (" *" if key in few else ""))
    lines.append("")
    for key, m in result["mcnemar"].items():
        lines.append(f"{key}: right by A only {m['a_right_b_wrong']}, by B only "
                     f"{m['b_right_a_wrong']}; McNemar's exact p = {m['p_value']:.3g}")
    if few:
        lines.append(f"* fewer than {FEW_DISCORDANT} of its images are called differently by the "
                     "two: the bootstrap's interval is too narrow with so few, read McNemar's "
                     "exact p (which takes images as independent) instead")
    return "\n".join(lines)
