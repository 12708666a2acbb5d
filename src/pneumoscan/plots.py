"""Report figures: each function writes one PNG to ``path`` and returns it as a Path.

Figures are built on ``matplotlib.figure.Figure`` directly rather than through pyplot, so no
GUI backend is ever selected, nothing is registered globally, and plotting is safe from
worker threads; every figure is released when the function returns.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import (
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from pneumoscan import CLASS_NAMES
from pneumoscan.evaluate import (
    ECE_BINS,
    calibration_bins,
    expected_calibration_error,
    validate_predictions,
)
from pneumoscan.fileio import atomic_write
from pneumoscan.threshold_rules import format_threshold

DPI = 110
SINGLE = (4.4, 4.0)
WIDE = (8.0, 3.4)
MAX_SAMPLES_PER_CLASS = 5
LEGEND_WRAP = 50  # characters a line in the learning curves' legends
HISTOGRAM_BIN_WIDTH = 1 / 30  # at most; the bins either side of the threshold fit it exactly
COLORS = {"train": "#1f77b4", "val": "#ff7f0e", "NORMAL": "#2ca02c", "PNEUMONIA": "#d62728"}


def _save(fig: Figure, path: str | Path) -> Path:
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))


def _require_both_classes(y: np.ndarray, what: str) -> None:
    if y.min() == y.max():
        raise ValueError(
            f"{what} needs both classes in y_true, got only class {int(y[0])} (shape {y.shape})"
        )


def _rates_at(y: np.ndarray, p: np.ndarray, threshold: float) -> tuple[float, float, float]:
    """(false positive rate, true positive rate, precision) at ``p >= threshold``; NaN if 0/0."""
    pred = p >= threshold
    tp = float(np.sum(pred & (y == 1)))
    fp = float(np.sum(pred & (y == 0)))
    n_pos, n_neg = float(np.sum(y == 1)), float(np.sum(y == 0))
    fpr = fp / n_neg if n_neg else math.nan
    tpr = tp / n_pos if n_pos else math.nan
    precision = tp / (tp + fp) if tp + fp else math.nan
    return fpr, tpr, precision


# --------------------------------------------------------------------------- training


def _history_series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list, list]:
    xs, ys = [], []
    for i, row in enumerate(history):
        value = row.get(key)
        if value is None or not math.isfinite(float(value)):
            continue
        xs.append(row.get("epoch", i + 1))
        ys.append(float(value))
    return xs, ys


# The epoch's figures are not like for like, so the legend says what each line measures.
# train_* come from the optimisation steps: the training objective on augmented images, which
# class weights and label smoothing change (smoothing 0.1 alone keeps it above about 0.20);
# val_* are plain cross-entropy and argmax accuracy on the network's logits, before the
# temperature and the threshold of the run are chosen.
VALIDATION_LABELS = {
    "val_loss": "validation cross-entropy (unweighted, before calibration)",
    "val_accuracy": "validation accuracy at p = 0.5, before calibration",
}
# The config.json fields that change what the training figures measure.
TRAINING_FIELDS = ("class_weights", "label_smoothing", "augment")


def _is_augmented(augment: Mapping[str, Any]) -> bool:
    from pneumoscan.config import AugmentConfig

    return AugmentConfig(**augment).changes_images


def _training_objective_terms(config: Mapping[str, Any]) -> list[str]:
    terms = ["class-weighted"] if config["class_weights"] else []
    if float(config["label_smoothing"]) > 0:
        terms.append(f"label smoothing {float(config['label_smoothing']):g}")
    if _is_augmented(config["augment"]):
        terms.append("augmented")
    return terms


def learning_curve_labels(config: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Legend label of each metrics.jsonl series, worded from the run's ``config`` (its
    config.json) when that names the training fields, and generically otherwise."""
    if config is None or not all(k in config for k in TRAINING_FIELDS):
        return {
            "train_loss": "training objective (the run's weighting, smoothing, augmentation)",
            "train_accuracy": "training accuracy at p = 0.5, on the images as trained",
            **VALIDATION_LABELS,
        }
    terms = _training_objective_terms(config)
    augmented = _is_augmented(config["augment"])
    return {
        "train_loss": f"training objective ({', '.join(terms)})" if terms
        else "training cross-entropy (unweighted, unaugmented)",
        "train_accuracy": "training accuracy at p = 0.5"
        + (", augmented images" if augmented else ""),
        **VALIDATION_LABELS,
    }


def learning_curves(
    history: list[dict], path: str | Path, config: Mapping[str, Any] | None = None
) -> Path:
    """Loss and accuracy per epoch, train vs validation; missing or None values are skipped.
    ``config`` (the run's config.json) words the legend; without it the labels stay generic."""
    if len(history) == 0:
        raise ValueError("history must have at least one row, got 0")
    labels = learning_curve_labels(config)
    fig = Figure(figsize=(WIDE[0], WIDE[1] + 0.8))  # room for the legends under the panels
    for ax, metric in zip(fig.subplots(1, 2), ("loss", "accuracy"), strict=True):
        drawn = False
        for split in ("train", "val"):
            key = f"{split}_{metric}"
            xs, ys = _history_series(history, key)
            if xs:
                label = textwrap.fill(labels[key], LEGEND_WRAP)
                ax.plot(xs, ys, marker="o", markersize=3, color=COLORS[split], label=label)
                drawn = True
        ax.set_title(metric)
        ax.set_xlabel("epoch")
        # Whole epochs only, even for a one-epoch run (min_n_ticks=1), where it would show 0.95.
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.grid(alpha=0.3)
        if drawn:
            # Below the panel: the labels are long, and inside they would hide the curves.
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    return _save(fig, path)


# --------------------------------------------------------------------------- ranking curves


def roc_curve_plot(y_true: Any, prob: Any, threshold: float, path: str | Path) -> Path:
    """ROC curve with its AUC, the chance diagonal, and the operating point at ``threshold``."""
    y, p = validate_predictions(y_true, prob)
    _require_both_classes(y, "roc_curve_plot")
    fpr, tpr, _ = roc_curve(y, p)
    op_fpr, op_tpr, _ = _rates_at(y, p, threshold)
    fig = Figure(figsize=SINGLE)
    ax = fig.subplots()
    ax.plot(fpr, tpr, color=COLORS["train"], label=f"ROC (AUC = {roc_auc_score(y, p):.3f})")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance")
    ax.plot(op_fpr, op_tpr, "o", color="black", label=f"threshold {format_threshold(threshold)}")
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def pr_curve_plot(y_true: Any, prob: Any, threshold: float, path: str | Path) -> Path:
    """Precision-recall curve with average precision, the prevalence baseline and the operating
    point at ``threshold`` (left out when nothing is predicted positive there)."""
    y, p = validate_predictions(y_true, prob)
    _require_both_classes(y, "pr_curve_plot")
    precision, recall, _ = precision_recall_curve(y, p)
    _, op_recall, op_precision = _rates_at(y, p, threshold)
    fig = Figure(figsize=SINGLE)
    ax = fig.subplots()
    ap = average_precision_score(y, p)
    ax.step(recall, precision, where="post", color=COLORS["train"], label=f"AP = {ap:.3f}")
    ax.axhline(y.mean(), linestyle="--", color="grey", linewidth=1, label="prevalence")
    if not math.isnan(op_precision):
        ax.plot(op_recall, op_precision, "o", color="black",
                label=f"threshold {format_threshold(threshold)}")
    ax.set_xlabel("recall (sensitivity)")
    ax.set_ylabel("precision")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    return _save(fig, path)


# --------------------------------------------------------------------------- decisions


def confusion_matrix_plot(y_true: Any, prob: Any, threshold: float, path: str | Path) -> Path:
    """2x2 confusion matrix: each cell shows its count and its share of the actual class."""
    y, p = validate_predictions(y_true, prob)
    pred = (p >= threshold).astype(np.int64)
    counts = np.array([[np.sum((y == a) & (pred == b)) for b in (0, 1)] for a in (0, 1)])
    row_totals = counts.sum(axis=1, keepdims=True)
    rates = np.divide(counts, row_totals, out=np.zeros(counts.shape), where=row_totals > 0)
    fig = Figure(figsize=SINGLE)
    ax = fig.subplots()
    ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    for a in (0, 1):
        for b in (0, 1):
            share = f"{rates[a, b]:.1%}" if row_totals[a, 0] else "n/a"
            ax.text(
                b,
                a,
                f"{counts[a, b]}\n{share}",
                ha="center",
                va="center",
                color="white" if rates[a, b] > 0.5 else "black",
            )
    ax.set_xticks([0, 1], labels=list(CLASS_NAMES))
    ax.set_yticks([0, 1], labels=list(CLASS_NAMES))
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(f"threshold {format_threshold(threshold)}")
    return _save(fig, path)


def _reliability_line(ax: Any, y: np.ndarray, p: np.ndarray, n_bins: int, label: str, color: str):
    bins = calibration_bins(y, p, n_bins)
    filled = bins["count"] > 0
    ece = expected_calibration_error(y, p, n_bins)
    ax.plot(
        bins["mean_prob"][filled],
        bins["frac_pos"][filled],
        marker="o",
        markersize=4,
        color=color,
        label=f"{label} (ECE = {ece:.3f})",
    )


def reliability_diagram(
    y_true: Any,
    prob_before: Any,
    prob_after: Any | None,
    path: str | Path,
    n_bins: int = ECE_BINS,
) -> Path:
    """Observed positive rate against mean predicted probability per equal-width bin, before
    and (when ``prob_after`` is given) after temperature scaling."""
    y, before = validate_predictions(y_true, prob_before)
    fig = Figure(figsize=SINGLE)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfect")
    first = "before scaling" if prob_after is not None else "model output"
    _reliability_line(ax, y, before, n_bins, first, COLORS["train"])
    if prob_after is not None:
        _, after = validate_predictions(y, prob_after)
        _reliability_line(ax, y, after, n_bins, "after scaling", COLORS["val"])
    ax.set_xlabel(f"mean predicted P({CLASS_NAMES[1]}) per bin")
    ax.set_ylabel(f"fraction {CLASS_NAMES[1]}")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def _bins_in(span: float, width: float) -> int:
    return max(1, math.ceil(span / width - 1e-9))


def histogram_edges(threshold: float, width: float = HISTOGRAM_BIN_WIDTH) -> np.ndarray:
    """Bin edges over [0, 1] at most ``width`` apart with ``threshold`` itself an edge, so every
    bar lies wholly on one side of the threshold line.

    np.histogram's bins are [a, b) save the last, [a, b]: a score equal to the threshold lands
    right of the line, as ``p >= threshold`` predicts PNEUMONIA. At threshold 1 a last bin
    [1, 1 + width] holds the scores of exactly 1, the only ones predicted PNEUMONIA there.
    """
    t = float(threshold)
    if not 0.0 < t <= 1.0:  # 0 is an edge already; outside [0, 1] no bar crosses the line
        return np.linspace(0.0, 1.0, _bins_in(1.0, width) + 1)
    top = 1.0 if t < 1.0 else 1.0 + width
    below = np.linspace(0.0, t, _bins_in(t, width) + 1)  # linspace ends exactly on t
    above = np.linspace(t, top, _bins_in(top - t, width) + 1)
    return np.concatenate([below, above[1:]])


def score_histograms(y_true: Any, prob: Any, threshold: float, path: str | Path) -> Path:
    """Distribution of P(PNEUMONIA) for each actual class, with the threshold marked: the
    threshold is a bin edge, so the NORMAL bars right of the line are the false positives."""
    y, p = validate_predictions(y_true, prob)
    fig = Figure(figsize=SINGLE)
    ax = fig.subplots()
    edges = histogram_edges(threshold)
    for cls, name in enumerate(CLASS_NAMES):
        scores = p[y == cls]
        if scores.size:
            # The count on the wrong side of the line, which a bar too narrow to see (a
            # threshold near 0 or 1) would hide: the false positives or the false negatives.
            called_positive = int(np.sum(scores >= threshold))
            wrong = called_positive if cls == 0 else scores.size - called_positive
            side = "at or above" if cls == 0 else "below"
            ax.hist(
                scores,
                bins=edges,
                alpha=0.55,
                color=COLORS[name],
                label=f"{name} (n={scores.size}; {wrong} {side} the threshold)",
            )
    ax.axvline(
        threshold, color="black", linestyle="--", linewidth=1,
        label=f"threshold {format_threshold(threshold)}",
    )
    ax.set_xlabel(f"predicted P({CLASS_NAMES[1]})")
    ax.set_ylabel("images")
    ax.set_xlim(0.0, edges[-1])
    ax.legend(fontsize=8)
    return _save(fig, path)


# --------------------------------------------------------------------------- data


def class_balance(counts: dict[str, dict[str, int]], path: str | Path) -> Path:
    """Grouped bars: one group per split, one bar per class, each labelled with its count."""
    if not counts:
        raise ValueError("counts must name at least one split, got {}")
    splits = list(counts)
    classes = list(dict.fromkeys(c for split in splits for c in counts[split]))
    width = 0.8 / max(len(classes), 1)
    fig = Figure(figsize=(max(4.0, 1.4 * len(splits) + 1.5), 3.6))
    ax = fig.subplots()
    x = np.arange(len(splits))
    for i, cls in enumerate(classes):
        heights = [int(counts[s].get(cls, 0)) for s in splits]
        bars = ax.bar(
            x + (i - (len(classes) - 1) / 2) * width,
            heights,
            width,
            label=cls,
            color=COLORS.get(cls),
        )
        ax.bar_label(bars, fontsize=7)
    ax.set_xticks(x, labels=splits)
    ax.set_ylabel("images")
    ax.margins(y=0.12)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _as_gray(image: Any, where: str) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim != 2:
        raise ValueError(f"{where} must be a 2-D grey image (H, W), got shape {img.shape}")
    return img


def sample_grid(
    images_by_class: dict[str, list[np.ndarray]], path: str | Path, title: str | None = None
) -> Path:
    """One row per class showing up to 5 of its uint8 grey images (H, W) on a 0-255 scale."""
    if not images_by_class:
        raise ValueError("images_by_class must name at least one class, got {}")
    rows = list(images_by_class)
    cols = max(1, min(MAX_SAMPLES_PER_CLASS, max(len(v) for v in images_by_class.values())))
    fig = Figure(figsize=(1.6 * cols + 0.4, 1.7 * len(rows) + (0.4 if title else 0.0)))
    axes = np.asarray(fig.subplots(len(rows), cols, squeeze=False))
    for r, cls in enumerate(rows):
        images = list(images_by_class[cls])[:MAX_SAMPLES_PER_CLASS]
        for c in range(cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(images):
                ax.imshow(_as_gray(images[c], f"{cls}[{c}]"), cmap="gray", vmin=0, vmax=255)
            else:
                ax.axis("off")
        axes[r, 0].set_ylabel(cls)
        if not images:
            axes[r, 0].axis("on")
            axes[r, 0].text(0.5, 0.5, "no images", ha="center", va="center", fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)
