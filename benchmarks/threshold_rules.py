"""Threshold rules chosen on validation, scored on a hold-out: which rule transfers best.

    python benchmarks/threshold_rules.py RUN [RUN ...]

Each RUN is a run directory of `pneumoscan train --data HOLDOUT` (benchmarks/holdout.py), which
leaves the calibrated probabilities of its validation split (`val_predictions.npz`) and of the
hold-out (`test_predictions.npz`). Each rule picks its threshold from the validation
probabilities alone; the hold-out's accuracy and balanced accuracy at that threshold are printed
per run and as means over the runs, then one JSON line with the figures and the command.

Rules: the project's (`youden`, `sensitivity:0.95`, `fixed:0.5`, through
`pneumoscan.evaluate.choose_threshold`) and two references that only live here: the equal-error
point (sensitivity = specificity), and Youden's threshold averaged (in logit space) over 200
bootstrap resamples of the validation split, which smooths the argmax over a noisy ROC.
(Youden's threshold moved to the middle of the score gap below its ROC point, once a reference
here, is now the project's own: ``choose_threshold``.)
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_curve

from pneumoscan.evaluate import choose_threshold


def equal_error(y: np.ndarray, p: np.ndarray) -> float:
    fpr, tpr, thresholds = roc_curve(y, p, drop_intermediate=False)
    return float(np.clip(thresholds[np.argmin(np.abs(tpr - (1 - fpr)))], 0.0, 1.0))


def bootstrap_youden(y: np.ndarray, p: np.ndarray, resamples: int = 200) -> float:
    rng = np.random.default_rng(0)
    logits = []
    for _ in range(resamples):
        i = rng.integers(0, len(y), len(y))
        if np.unique(y[i]).size == 2:
            t = np.clip(choose_threshold(y[i], p[i], "youden"), 1e-6, 1 - 1e-6)
            logits.append(np.log(t / (1 - t)))
    return float(1 / (1 + np.exp(-np.mean(logits))))


RULES = {
    "youden": lambda y, p: choose_threshold(y, p, "youden"),
    "sensitivity:0.95": lambda y, p: choose_threshold(y, p, "sensitivity:0.95"),
    "fixed:0.5": lambda y, p: 0.5,
    "equal-error (reference)": equal_error,
    "bootstrap youden (reference)": bootstrap_youden,
}


def scores(y: np.ndarray, p: np.ndarray, threshold: float) -> tuple[float, float]:
    predicted = p >= threshold
    sensitivity, specificity = predicted[y == 1].mean(), (~predicted[y == 0]).mean()
    return float((predicted == y).mean()), float((sensitivity + specificity) / 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    table: dict[str, list[tuple[float, float]]] = {name: [] for name in RULES}
    used = []
    for run in args.runs:
        try:
            val, test = (np.load(run / f) for f in ("val_predictions.npz",
                                                    "test_predictions.npz"))
        except OSError as e:
            print(f"{run}: skipped ({e.strerror or e})", file=sys.stderr)
            continue
        used.append(str(run))
        cells = []
        for name, rule in RULES.items():
            threshold = rule(val["labels"], val["prob"])
            acc, bal = scores(test["labels"], test["prob"], threshold)
            table[name].append((acc, bal))
            cells.append(f"{name.split()[0]} {threshold:.3f}: {acc:.3f}/{bal:.3f}")
        print(f"{run.name}: " + "; ".join(cells))
    if not used:
        print("no run with val_predictions.npz and test_predictions.npz", file=sys.stderr)
        return 2
    print(f"\nhold-out accuracy / balanced accuracy, mean of {len(used)} runs:")
    means = {}
    for name, rows in table.items():
        acc, bal = np.mean(rows, axis=0)
        means[name] = {"accuracy": round(float(acc), 4), "balanced_accuracy": round(float(bal), 4)}
        print(f"  {name:30s} {acc:.4f}  {bal:.4f}")
    command = "python benchmarks/threshold_rules.py " + " ".join(map(shlex.quote, argv))
    print(json.dumps({"runs": len(used), "rules": means, "command": command}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
