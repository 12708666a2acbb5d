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
