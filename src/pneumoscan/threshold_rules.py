"""Threshold rules as the command line writes them: ``youden``, ``sensitivity:X``, ``fixed:X``.

Kept apart from the metrics (``evaluate.py``, which needs scikit-learn and SciPy) so that the
command line can check a rule while it builds its parser, without importing them.
"""

from __future__ import annotations

import argparse
import math

THRESHOLD_RULE_FORMS = "youden, sensitivity:X (0 < X <= 1), fixed:X (0 <= X <= 1)"


class ThresholdRuleError(ValueError, argparse.ArgumentTypeError):
    """A bad threshold rule; also an ArgumentTypeError so argparse prints its message."""


def split_threshold_rule(text: str) -> tuple[str, float | None]:
    """``"sensitivity:0.95"`` -> ``("sensitivity", 0.95)``; ``"youden"`` -> ``("youden", None)``."""
    raw = str(text).strip().lower()
    name, sep, value = raw.partition(":")
    if raw == "youden":
        return "youden", None
    if sep and name in ("sensitivity", "fixed"):
        try:
            x = float(value)
        except ValueError:
            x = math.nan
        low_ok = x > 0.0 if name == "sensitivity" else x >= 0.0
        if low_ok and x <= 1.0:
            return name, x
    raise ThresholdRuleError(f"bad threshold rule {text!r}: use one of {THRESHOLD_RULE_FORMS}")


def parse_threshold_rule(text: str) -> str:
    """Validate a rule string and return it in canonical form, e.g. ``"sensitivity:0.95"``.

    Suitable as an argparse ``type=``: a bad rule is reported with the valid forms.
    """
    name, value = split_threshold_rule(text)
    return name if value is None else f"{name}:{value!r}"


def format_threshold(threshold: float) -> str:
    """Three decimals, or as many more as it takes not to show 0.000 or 1.000 for a threshold
    that is neither (after temperature scaling a tiny or poor run can put it at 0.99997)."""
    t = float(threshold)
    for digits in range(3, 10):
        text = f"{t:.{digits}f}"
        if not 0 < t < 1 or 0 < float(text) < 1:
            return text
    return text
