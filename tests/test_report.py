"""pneumoscan report: one self-contained HTML file, every section present, nothing fetched.

The browser test opens the report in Debian's headless Chromium (installed by
``scripts/setup.sh --test``) and is skipped where it is missing.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from pneumoscan.cli import main
from pneumoscan.fileio import read_json
from pneumoscan.model_io import save_meta
from pneumoscan.report import SECTIONS, gallery_picks
from pneumoscan.run_plots import expected_plots, write_evaluation_plots

CHROMIUM = Path("/usr/bin/chromium")
SECTION_IDS = list(SECTIONS)
# src= or href= pointing anywhere off the page: http(s), protocol-relative, file
REMOTE_REF = re.compile(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:|file:|//)""", re.IGNORECASE)


def _copy_run(trained_run: Path, dest: Path) -> Path:
    # The shared run is read-only for other tests: the report and plots go into a copy.
    return Path(shutil.copytree(trained_run, dest, ignore=shutil.ignore_patterns("report.html")))


def _section(html: str, section_id: str) -> str:
    start = html.index(f'<section id="{section_id}">')
    return html[start : html.index("</section>", start)]


@pytest.fixture(scope="module")
def report_run(trained_run, tmp_path_factory) -> Path:
    run = _copy_run(trained_run, tmp_path_factory.mktemp("report") / "run")
    shutil.rmtree(run / "plots", ignore_errors=True)  # the report draws what is missing
    assert main(["report", str(run)]) == 0
    return run


def test_report_has_every_section_and_embeds_everything(report_run):
    html = (report_run / "report.html").read_text(encoding="utf-8")
    for section_id in SECTION_IDS:
        assert f'<section id="{section_id}">' in html
    assert "Research use only, not a medical device" in html
    assert not REMOTE_REF.search(html), REMOTE_REF.search(html).group(0)
    assert "<script" not in html.lower() and "@import" not in html and "url(" not in html
    sources = re.findall(r'<img[^>]*\ssrc="([^"]*)"', html)
    assert len(sources) >= 10
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    # each section has its content, not only a note
    assert "NORMAL" in _section(html, "data") and "data:image/png" in _section(html, "data")
    assert "<td>image_size</td>" in _section(html, "config")
    assert "<td>environment.torch</td>" in _section(html, "config")  # what the run ran on
    assert "data:image/png" in _section(html, "learning")
    figures = _section(html, "figures")
    assert "95% interval" in figures and "sensitivity" in figures and "validation" in figures
    assert "sensitivity, viral" in figures and "sensitivity, bacterial" in figures
    assert re.search(r"<td>\[0\.\d{3}, [01]\.\d{3}\]</td>", figures)
    assert _section(html, "plots").count("data:image/png") >= 8
    gallery = _section(html, "gradcam")
    assert gallery.count("data:image/png") >= 2 and "P(PNEUMONIA) = " in gallery
    # The run is seed_cnn at 32 px: one cell on its Grad-CAM layer, which the gallery says.
    assert "Grad-CAM on features.block4: a 1 x 1 grid at 32 px" in gallery
    assert "Warning: Grad-CAM&#x27;s layer features.block4 gives a 1 x 1 grid" in gallery
    assert "could not" not in html and "not reachable" not in html


def test_report_draws_the_evaluation_plots(report_run):
    plots = report_run / "plots"
    for name in ["learning_curves.png"] + [
        f"{kind}_{split}.png" for split in ("val", "test")
        for kind in ("roc", "pr", "confusion", "reliability", "histogram")
    ]:
        assert (plots / name).is_file() and (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(p.is_file() for p in expected_plots(report_run))


def test_train_leaves_every_evaluation_plot(trained_run):
    expected = {p.name for p in expected_plots(trained_run)}
    assert {"learning_curves.png", "roc_val.png", "roc_test.png", "histogram_test.png"} <= expected
    assert all((trained_run / "plots" / name).is_file() for name in expected)


def test_plots_tolerate_a_single_class_split(trained_run, tmp_path):
    run = _copy_run(trained_run, tmp_path / "run")
    shutil.rmtree(run / "plots", ignore_errors=True)
    with np.load(run / "test_predictions.npz") as z:
        saved = {k: z[k] for k in z.files}
    saved["labels"] = np.ones_like(saved["labels"])
    np.savez(run / "test_predictions.npz", **saved)
    names = {p.name for p in write_evaluation_plots(run)}
    assert {"confusion_test.png", "reliability_test.png", "histogram_test.png"} <= names
    assert "roc_test.png" not in names and "pr_test.png" not in names
    assert {"roc_val.png", "pr_val.png", "learning_curves.png"} <= names
    assert main(["report", str(run)]) == 0
    assert "only one class" in (run / "report.html").read_text(encoding="utf-8")


def test_report_without_data_or_image_files_still_writes(trained_run, tmp_path):
    run = _copy_run(trained_run, tmp_path / "run")
    config = read_json(run / "config.json")
    config["data"] = str(tmp_path / "moved-away")
    (run / "config.json").write_text(json.dumps(config))
    meta = read_json(run / "model.json")
    meta["data_source"] = config["data"]
    (run / "model.json").write_text(json.dumps(meta))
    for split in ("val", "test"):
        with np.load(run / f"{split}_predictions.npz") as z:
            saved = {k: z[k] for k in z.files}
        saved["paths"] = np.array([str(tmp_path / "gone" / f"{i}.png")
                                   for i in range(len(saved["labels"]))])
        np.savez(run / f"{split}_predictions.npz", **saved)
    assert main(["report", str(run)]) == 0
    html = (run / "report.html").read_text(encoding="utf-8")
    assert all(f'<section id="{s}">' in html for s in SECTION_IDS)
    assert "not reachable" in _section(html, "data")
    assert "<td>test</td>" in _section(html, "data")  # counts from the saved predictions
    assert "no longer at the paths" in _section(html, "gradcam")


def test_report_reads_the_runs_own_data_from_any_working_directory(
    trained_run, synthetic_data, tmp_path, monkeypatch
):
    """config.json keeps --data as typed; the report reads the resolved source in model.json,
    not a folder of the same name where it is made, and says when those images changed."""
    from pneumoscan.data.synthetic import write_synthetic_dataset

    run = _copy_run(trained_run, tmp_path / "run")
    config = read_json(run / "config.json")
    config["data"] = "xrays"  # as if trained with a relative --data
    (run / "config.json").write_text(json.dumps(config))
    elsewhere = tmp_path / "elsewhere"
    write_synthetic_dataset(elsewhere / "xrays", n_train=20, n_test=4, size=32)  # a decoy
    monkeypatch.chdir(elsewhere)
    assert main(["report", str(run)]) == 0
    data = _section((run / "report.html").read_text(encoding="utf-8"), "data")
    assert str(Path(synthetic_data).resolve()) in data and "elsewhere" not in data
    assert "not the ones the model was trained on" not in data

    copy = shutil.copytree(synthetic_data, tmp_path / "copy")
    png = sorted((copy / "train").rglob("*.png"))[0]
    png.write_bytes(png.read_bytes() + b"\0")  # a file rewritten since training
    meta = read_json(run / "model.json")
    meta["data_source"] = str(copy)
    (run / "model.json").write_text(json.dumps(meta))
    assert main(["report", str(run)]) == 0
    data = _section((run / "report.html").read_text(encoding="utf-8"), "data")
    assert str(copy) in data and "not the ones the model was trained on" in data


def test_report_of_an_ensemble_run(trained_run, tmp_path):
    ensemble = tmp_path / "ensemble"
    _copy_run(trained_run, ensemble / "m0")
    meta = read_json(ensemble / "m0" / "model.json")
    save_meta(ensemble, {"kind": "ensemble", "members": ["m0"], "image_size": meta["image_size"],
                         "class_names": meta["class_names"], "threshold": meta["threshold"],
                         "temperature": 1.0})
    shutil.copy(ensemble / "m0" / "test_predictions.npz", ensemble / "test_predictions.npz")
    assert main(["report", str(ensemble)]) == 0  # no config, metrics or figures of its own
    html = (ensemble / "report.html").read_text(encoding="utf-8")
    assert all(f'<section id="{s}">' in html for s in SECTION_IDS)
    assert "An ensemble run has no learning curves" in _section(html, "learning")
    assert "no config.json" in _section(html, "config")
    assert _section(html, "gradcam").count("data:image/png") >= 2  # through the ensemble
    assert (ensemble / "plots" / "roc_test.png").is_file()


def test_report_of_a_non_run_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path) in err[0] and "model.json" in err[0]


def test_gallery_picks_each_confusion_cell_most_confident_first():
    labels = np.array([1, 1, 1, 0, 0, 0, 1, 0])
    prob = np.array([0.9, 0.6, 0.2, 0.8, 0.1, 0.3, 0.95, 0.05])
    picks = gallery_picks(labels, prob, threshold=0.5, per_cell=2)
    assert picks == {
        "true positives": [6, 0],
        "false positives": [3],
        "false negatives": [2],
        "true negatives": [7, 4],
    }


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's /usr/bin/chromium "
                    "(scripts/setup.sh --test installs it)")
def test_report_renders_in_headless_chromium(report_run, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    from PIL import Image

    errors: list[str] = []
    shot = tmp_path / "report.png"
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"],
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto((report_run / "report.html").resolve().as_uri())
            page.wait_for_load_state("load")
            for section_id in SECTION_IDS:
                assert page.locator(f"section#{section_id}").is_visible(), section_id
            broken = page.evaluate(
                "Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0)"
                ".length"
            )
            assert broken == 0
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert errors == []
    assert all(u.startswith(("file:", "data:")) for u in requests), requests
    assert shot.stat().st_size > 50_000
    with Image.open(shot) as im:
        assert im.format == "PNG" and im.width >= 1000 and im.height > 3000
        pixels = np.asarray(im.convert("L"), dtype=np.float32)
    assert pixels.std() > 10.0  # not blank


def test_the_report_says_which_epoch_the_weights_come_from():
    from pneumoscan.report import describe_epochs

    assert describe_epochs({"epochs_trained": 1}) == "1 epoch trained."
    assert describe_epochs({"epochs_trained": 6, "weights_from_epoch": 6}) == "6 epochs trained."
    restored = describe_epochs({"epochs_trained": 6, "weights_from_epoch": 2})
    assert restored.startswith("6 epochs trained; the model holds the weights of epoch 2")


def test_a_run_folder_name_that_is_not_utf8_is_shown_not_a_traceback(synthetic_data, tmp_path,
                                                                     capsys):
    """Linux file names are bytes: one that is not UTF-8 reaches Python as a surrogate, which a
    UTF-8 report.html cannot hold (UnicodeEncodeError before), nor safetensors' or
    onnxruntime's path arguments (every later command called the weights invalid)."""
    import os

    run = tmp_path / os.fsdecode(b"run\xff")
    assert main(["train", "--data", str(synthetic_data), "--out", str(run), "--recipe", "cpu",
                 "--model", "seed_cnn", "--image-size", "32", "--epochs", "1", "--quiet"]) == 0
    assert main(["report", str(run)]) == 0
    assert "run\\xff" in (run / "report.html").read_text(encoding="utf-8")
    image = sorted((synthetic_data / "test" / "NORMAL").iterdir())[0]
    assert main(["predict", str(run), str(image)]) == 0
    assert main(["export", str(run), "--onnx", str(run / "model.onnx")]) == 0
    assert "Traceback" not in capsys.readouterr().err


def test_a_figure_that_cannot_be_drawn_is_not_blamed_on_the_data(trained_run, tmp_path,
                                                                 monkeypatch, capsys):
    import errno

    import pneumoscan.plots as plots

    def full(*args, **kwargs):
        raise OSError(errno.EFBIG, "File too large", "/tmp/grid.png")

    monkeypatch.setattr(plots, "sample_grid", full)
    run = _copy_run(trained_run, tmp_path / "run")
    assert main(["report", str(run)]) == 0
    err = capsys.readouterr().err
    assert "the data's figures could not be drawn" in err and "not reachable" not in err
