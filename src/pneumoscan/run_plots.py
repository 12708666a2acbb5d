"""Every figure of a finished run, drawn from what the run directory holds.

Inputs are the files a run leaves behind: ``val_predictions.npz`` and ``test_predictions.npz``
(labels, logits, calibrated prob, paths), ``model.json`` (threshold), ``metrics.jsonl`` and
``config.json`` (what the training figures measured). So the plots can be drawn again at any
time, by ``train`` at its end or by ``report`` later, without the model or the data.
"""

from __future__ import annotations

import json
import sys
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pneumoscan.fileio import read_json
from pneumoscan.run_folder import METRICS

PLOTS_DIR = "plots"
SPLITS = ("val", "test")
SPLIT_TITLES = {"val": "validation", "test": "test"}


@dataclass
class SplitPredictions:
    labels: np.ndarray  # (N,) int, 1 = PNEUMONIA
    prob: np.ndarray  # (N,) calibrated P(PNEUMONIA)
    logits: np.ndarray | None  # (N, 2), before temperature scaling
    paths: list[str]

    @property
    def both_classes(self) -> bool:
        return len(self.labels) > 0 and int(self.labels.min()) != int(self.labels.max())


def predictions_path(run_dir: Path, split: str) -> Path:
    return Path(run_dir) / f"{split}_predictions.npz"


def write_predictions(
    path: Path, *, labels: np.ndarray, prob: np.ndarray, paths: Sequence[str],
    logits: np.ndarray | None = None, **columns: np.ndarray,
) -> None:
    """A predictions file as ``load_split_predictions`` reads it (labels, (N, 2) logits, prob,
    paths), with any further ``columns`` (a fold's number, patients), written atomically.
    Without ``logits`` (an ensemble's or stack's combined probabilities) they are taken as
    (0, log-odds of prob), whose softmax is prob again."""
    from pneumoscan.fileio import atomic_write
    from pneumoscan.model_io import log_odds

    if logits is None:
        z = log_odds(prob)
        logits = np.stack([np.zeros_like(z), z], axis=1).astype(np.float32)
    arrays = {"labels": labels, "logits": logits, "prob": prob,
              "paths": np.array(paths, dtype=str), **columns}

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(path, write)


def load_split_predictions(run_dir: str | Path, split: str) -> SplitPredictions | None:
    """A split's saved predictions, or None when the run has none (or they are unreadable)."""
    path = predictions_path(Path(run_dir), split)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            labels = np.asarray(z["labels"]).astype(np.int64)
            prob = np.asarray(z["prob"], dtype=np.float64)
            logits = np.asarray(z["logits"], dtype=np.float64) if "logits" in z.files else None
            paths = [str(p) for p in z["paths"]] if "paths" in z.files else []
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        # A truncated or empty .npz raises the zip module's errors, not OSError.
        print(f"warning: {path}: unreadable predictions ({e or type(e).__name__})",
              file=sys.stderr)
        return None
    if len(prob) != len(labels) or (logits is not None and logits.shape != (len(labels), 2)):
        print(f"warning: {path}: inconsistent predictions, ignored", file=sys.stderr)
        return None
    return SplitPredictions(labels, prob, logits, paths)


def read_history(run_dir: str | Path) -> list[dict]:
    """The epochs of metrics.jsonl; [] when the run has none (an ensemble, say)."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a torn last line from an interrupted run: keep the complete epochs
    return rows


def read_run_config(run_dir: str | Path) -> dict | None:
    """The run's config.json, or None when it has none or it cannot be read: the learning
    curves then say less about what the training figures measured, but are still drawn."""
    try:
        config = read_json(Path(run_dir) / "config.json")
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def expected_plots(run_dir: str | Path) -> list[Path]:
    """The files write_evaluation_plots would write for this run as it stands now."""
    run_dir = Path(run_dir)
    out = run_dir / PLOTS_DIR
    names = ["learning_curves.png"] if read_history(run_dir) else []
    for split in SPLITS:
        pred = load_split_predictions(run_dir, split)
        if pred is None or len(pred.labels) == 0:
            continue
        if pred.both_classes:
            names += [f"roc_{split}.png", f"pr_{split}.png"]
        names += [f"confusion_{split}.png", f"reliability_{split}.png", f"histogram_{split}.png"]
    return [out / n for n in names]


def write_evaluation_plots(run_dir: str | Path) -> list[Path]:
    """Draw the run's learning curves and, for each split it has predictions for, ROC, PR,
    confusion, reliability and score histogram into ``RUN/plots/``; returns the files written.

    ROC and PR are left out for a split holding only one class (they are undefined there). One
    failing figure is reported on stderr and does not stop the others.
    """
    from pneumoscan import plots

    run_dir = Path(run_dir)
    out = run_dir / PLOTS_DIR
    meta = read_json(run_dir / "model.json")
    threshold = float(meta["threshold"])
    written: list[Path] = []

    def draw(name: str, fn: Callable[[Path], Path]) -> None:
        try:
            written.append(fn(out / name))
        except Exception as e:  # one figure must not cost the others
            print(f"warning: plot {name} failed: {type(e).__name__}: {e}", file=sys.stderr)

    history = read_history(run_dir)
    if history:
        config = read_run_config(run_dir)
        draw("learning_curves.png", lambda p: plots.learning_curves(history, p, config))
    for split in SPLITS:
        pred = load_split_predictions(run_dir, split)
        if pred is not None and len(pred.labels):
            _draw_split(draw, split, pred, threshold)
    return written


def _draw_split(draw, split: str, pred: SplitPredictions, threshold: float) -> None:
    from pneumoscan import plots
    from pneumoscan.model_io import LOGIT_EPS, probabilities

    y, prob = pred.labels, pred.prob
    if pred.both_classes:
        draw(f"roc_{split}.png", lambda p: plots.roc_curve_plot(y, prob, threshold, p))
        draw(f"pr_{split}.png", lambda p: plots.pr_curve_plot(y, prob, threshold, p))
    draw(f"confusion_{split}.png", lambda p: plots.confusion_matrix_plot(y, prob, threshold, p))
    # Before = the network's own softmax (temperature 1); after = the calibrated output. An
    # ensemble's or stack's saved logits are its calibrated log-odds (of probabilities clipped
    # LOGIT_EPS from 0 and 1): one curve, not two alike.
    before = probabilities(pred.logits, 1.0) if pred.logits is not None else prob
    after = None if np.allclose(before, prob, rtol=0, atol=10 * LOGIT_EPS) else prob
    draw(f"reliability_{split}.png", lambda p: plots.reliability_diagram(y, before, after, p))
    draw(f"histogram_{split}.png", lambda p: plots.score_histograms(y, prob, threshold, p))
