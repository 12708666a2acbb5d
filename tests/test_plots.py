import json

import numpy as np
import pytest
from PIL import Image

from pneumoscan import plots


def predictions(n=300, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.6).astype(int)
    prob = np.clip(rng.normal(0.3 + 0.4 * y, 0.2), 0.0, 1.0)
    return y, prob


def assert_png(path, written):
    assert written == path
    assert path.stat().st_size > 0
    with Image.open(path) as img:
        assert img.format == "PNG"
        img.verify()
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_learning_curves(tmp_path):
    history = [
        {
            "epoch": 1,
            "train_loss": 0.7,
            "train_accuracy": 0.6,
            "val_loss": 0.65,
            "val_accuracy": 0.62,
        },
        {"epoch": 2, "train_loss": 0.5, "train_accuracy": 0.75, "val_loss": None},
        {"epoch": 3, "train_loss": 0.4, "train_accuracy": 0.8},
    ]
    path = tmp_path / "curves.png"
    assert_png(path, plots.learning_curves(history, path))


def test_learning_curves_train_only(tmp_path):
    path = tmp_path / "curves.png"
    assert_png(path, plots.learning_curves([{"epoch": 1, "train_loss": 0.7}], path))
    with pytest.raises(ValueError, match="got 0"):
        plots.learning_curves([], tmp_path / "empty.png")


@pytest.mark.parametrize(
    "plot",
    [
        plots.roc_curve_plot,
        plots.pr_curve_plot,
        plots.confusion_matrix_plot,
        plots.score_histograms,
    ],
)
def test_threshold_plots(tmp_path, plot):
    y, prob = predictions()
    path = tmp_path / "sub" / "fig.png"  # parent directories are created
    assert_png(path, plot(y, prob, 0.5, path))


def test_pr_curve_without_predicted_positives(tmp_path):
    y, prob = predictions()
    path = tmp_path / "pr.png"
    assert_png(path, plots.pr_curve_plot(y, prob * 0.5, 0.9, path))


def test_confusion_matrix_with_one_class(tmp_path):
    path = tmp_path / "cm.png"
    assert_png(path, plots.confusion_matrix_plot(np.zeros(4, int), np.full(4, 0.2), 0.5, path))


def test_roc_needs_both_classes(tmp_path):
    with pytest.raises(ValueError, match=r"both classes.*shape \(3,\)"):
        plots.roc_curve_plot(np.ones(3, int), np.full(3, 0.5), 0.5, tmp_path / "roc.png")
    assert list(tmp_path.iterdir()) == []


def test_plots_validate_inputs(tmp_path):
    with pytest.raises(ValueError, match=r"shapes \(3,\) and \(4,\)"):
        plots.score_histograms(np.zeros(3, int), np.zeros(4), 0.5, tmp_path / "h.png")


def test_reliability_diagram(tmp_path):
    y, prob = predictions()
    sharp = 1 / (1 + np.exp(-6 * (prob - 0.5)))
    path = tmp_path / "rel.png"
    assert_png(path, plots.reliability_diagram(y, sharp, prob, path))
    other = tmp_path / "only" / "rel.png"
    assert_png(other, plots.reliability_diagram(y, sharp, None, other, n_bins=10))


def test_class_balance(tmp_path):
    counts = {
        "train": {"NORMAL": 1341, "PNEUMONIA": 3875},
        "val": {"NORMAL": 8, "PNEUMONIA": 8},
        "test": {"NORMAL": 234},
    }
    path = tmp_path / "balance.png"
    assert_png(path, plots.class_balance(counts, path))


def test_sample_grid(tmp_path):
    rng = np.random.default_rng(0)
    images = {
        "NORMAL": [rng.integers(0, 256, (32, 40), dtype=np.uint8) for _ in range(7)],
        "PNEUMONIA": [rng.integers(0, 256, (24, 24, 1), dtype=np.uint8)],
        "EMPTY": [],
    }
    path = tmp_path / "grid.png"
    assert_png(path, plots.sample_grid(images, path, title="samples"))


def test_sample_grid_rejects_colour(tmp_path):
    bad = {"NORMAL": [np.zeros((8, 8, 3), np.uint8)]}
    with pytest.raises(ValueError, match=r"NORMAL\[0\].*got shape \(8, 8, 3\)"):
        plots.sample_grid(bad, tmp_path / "grid.png")
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("matplotlib.figure.Figure.savefig", fail)
    y, prob = predictions()
    with pytest.raises(OSError, match="disk full"):
        plots.score_histograms(y, prob, 0.5, tmp_path / "h.png")
    assert list(tmp_path.iterdir()) == []


def test_an_ensembles_reliability_diagram_has_one_curve_not_two_alike(monkeypatch, tmp_path):
    """An ensemble's (or stack's) saved logits are its calibrated log-odds: "before" and "after"
    scaling would be the same curve, the second hiding the first."""
    from pneumoscan import run_plots
    from pneumoscan.model_io import log_odds

    rng = np.random.default_rng(0)
    y = np.arange(40) % 2
    prob = rng.uniform(0.05, 0.95, 40)
    z = np.log(prob / (1 - prob))
    seen = {}
    monkeypatch.setattr(plots, "reliability_diagram",
                        lambda y, before, after, p: seen.update(after=after))

    def draw(name, make):
        if name.startswith("reliability"):
            make(tmp_path / name)

    calibrated = np.stack([np.zeros_like(z), z], axis=1)
    run_plots._draw_split(draw, "test", run_plots.SplitPredictions(y, prob, calibrated, []), 0.5)
    assert seen["after"] is None
    # Confident members: the saved log-odds are those of probabilities clipped to 1e-6 from 0
    # and 1 (model_io.log_odds), which the curve cannot show, yet it was drawn twice.
    sure = prob.copy()
    sure[:4] = [0.0, 1e-9, 1.0, 1 - 1e-9]
    clipped = np.stack([np.zeros_like(z), log_odds(sure)], axis=1)
    run_plots._draw_split(draw, "test", run_plots.SplitPredictions(y, sure, clipped, []), 0.5)
    assert seen["after"] is None
    sharper = np.stack([np.zeros_like(z), 2 * z], axis=1)  # a single model, temperature 2
    run_plots._draw_split(draw, "test", run_plots.SplitPredictions(y, prob, sharper, []), 0.5)
    assert seen["after"] is prob


# --------------------------------------------------------------------------- what the figures say


@pytest.fixture
def drawn(monkeypatch):
    """The figures the plot functions save, to read their axes back."""
    figures = []
    save = plots._save

    def keep(fig, path):
        figures.append(fig)
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    return figures


def legend_texts(ax):
    # Long labels are wrapped onto two lines in the legend: read them back as one.
    return [t.get_text().replace("\n", " ") for t in ax.get_legend().get_texts()]


STRONG_RUN = {  # the fields of a config.json that word the labels, as the strong recipe sets them
    "class_weights": True,
    "label_smoothing": 0.1,
    "augment": {"rotation_deg": 10.0, "zoom": 0.1, "shift": 0.05, "hflip": False},
}
HISTORY = [
    {"epoch": e, "train_loss": 0.2 + 0.5 / e, "train_accuracy": 0.9,
     "val_loss": 0.1 + 0.3 / e, "val_accuracy": 0.95}
    for e in (1, 2, 3)
]


def test_learning_curves_say_what_each_line_measures(tmp_path, drawn):
    """The training objective (weighted, smoothed, on augmented images) and the validation
    cross-entropy are different quantities; validation below training means nothing by itself."""
    plots.learning_curves(HISTORY, tmp_path / "curves.png", STRONG_RUN)
    loss_ax, accuracy_ax = drawn[0].axes
    assert legend_texts(loss_ax) == [
        "training objective (class-weighted, label smoothing 0.1, augmented)",
        "validation cross-entropy (unweighted, before calibration)",
    ]
    assert legend_texts(accuracy_ax) == [
        "training accuracy at p = 0.5, augmented images",
        "validation accuracy at p = 0.5, before calibration",
    ]


def test_learning_curve_labels_follow_the_config():
    plain = {"class_weights": False, "label_smoothing": 0.0,
             "augment": {"rotation_deg": 0.0, "zoom": 0.0, "shift": 0.0, "hflip": False}}
    labels = plots.learning_curve_labels(plain)
    assert labels["train_loss"] == "training cross-entropy (unweighted, unaugmented)"
    assert labels["train_accuracy"] == "training accuracy at p = 0.5"
    seed = dict(STRONG_RUN, label_smoothing=0.0)  # the report's recipe: weights, no smoothing
    assert plots.learning_curve_labels(seed)["train_loss"] == (
        "training objective (class-weighted, augmented)")
    flips_only = dict(plain, augment=dict(plain["augment"], hflip=True))
    assert plots.learning_curve_labels(flips_only)["train_loss"] == (
        "training objective (augmented)")
    # No config (or one from before these fields): say what kind of figure it is, not more.
    for unknown in (None, {"model": "seed_cnn"}):
        labels = plots.learning_curve_labels(unknown)
        assert labels["train_loss"].startswith("training objective (")
        assert labels["val_loss"].startswith("validation cross-entropy")
        assert labels["val_accuracy"] == "validation accuracy at p = 0.5, before calibration"


@pytest.mark.parametrize("epochs", [1, 3, 4])
def test_learning_curves_tick_whole_epochs(tmp_path, drawn, epochs):
    history = [dict(HISTORY[0], epoch=e) for e in range(1, epochs + 1)]
    plots.learning_curves(history, tmp_path / "curves.png")
    for ax in drawn[0].axes:
        low, high = ax.get_xlim()
        shown = [t for t in ax.get_xticks() if low <= t <= high]
        assert shown and all(float(t).is_integer() for t in shown), shown


def test_learning_curves_are_worded_from_the_runs_config(tmp_path, monkeypatch):
    from pneumoscan import run_plots
    from pneumoscan.run_folder import METRICS

    (tmp_path / METRICS).write_text("".join(json.dumps(row) + "\n" for row in HISTORY))
    (tmp_path / "model.json").write_text(json.dumps({"threshold": 0.5}))
    seen = []
    monkeypatch.setattr(plots, "learning_curves",
                        lambda history, path, config=None: seen.append(config) or path)
    (tmp_path / "config.json").write_text(json.dumps({"pneumoscan": "0.1.0", **STRONG_RUN}))
    run_plots.write_evaluation_plots(tmp_path)
    (tmp_path / "config.json").write_text("{torn")
    run_plots.write_evaluation_plots(tmp_path)  # still drawn, with the generic labels
    assert seen == [{"pneumoscan": "0.1.0", **STRONG_RUN}, None]


def histogram_bars(ax):
    """{legend label: [(left, right, height), ...]} of each class's histogram (hist puts the
    label on the first bar, not on the container)."""
    return {
        bars.patches[0].get_label(): [
            (b.get_x(), b.get_x() + b.get_width(), b.get_height()) for b in bars
        ]
        for bars in ax.containers
    }


def test_histogram_bars_right_of_the_threshold_are_the_predicted_positives(tmp_path, drawn):
    y, prob = predictions()
    threshold = 0.45  # between two of the 30 equal bins' edges (0.433 and 0.467)
    plots.score_histograms(y, prob, threshold, tmp_path / "h.png")
    bars = histogram_bars(drawn[0].axes[0])
    for cls, name in enumerate(plots.CLASS_NAMES):
        (label,) = [k for k in bars if k.startswith(f"{name} ")]
        for left, right, _ in bars[label]:
            assert right <= threshold + 1e-12 or left >= threshold, (left, right)
        right_of_line = sum(h for left, _, h in bars[label] if left >= threshold)
        assert right_of_line == np.sum(prob[y == cls] >= threshold)  # NORMAL: false positives
    # A bar too narrow to see at a threshold near 0 or 1 would hide them: the legend counts.
    wrong = np.sum(prob[y == 0] >= threshold)
    assert any(k.startswith(f"NORMAL (n={np.sum(y == 0)}; {wrong} at or above the threshold)")
               for k in bars)


@pytest.mark.parametrize("threshold", [0.0, 1e-4, 0.45, 0.5, 0.99997, 1.0])
def test_histogram_edges_put_the_threshold_on_an_edge(threshold):
    edges = plots.histogram_edges(threshold)
    assert edges[0] == 0.0 and edges[-1] >= 1.0
    assert threshold in edges
    assert np.all(np.diff(edges) > 0) and np.all(np.diff(edges) <= 1 / 30 + 1e-12)
    # Scores on the threshold and at 0 and 1 are counted on the side p >= threshold puts them.
    scores = np.array([0.0, threshold, np.nextafter(threshold, 0.0), 1.0, 0.3, 0.7])
    counts, _ = np.histogram(scores, bins=edges)
    right = edges[:-1] >= threshold
    assert counts[right].sum() == np.sum(scores >= threshold)
