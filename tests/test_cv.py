"""pneumoscan cv: patient-grouped folds, honest out-of-fold predictions, an ensemble run."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from pneumoscan.cli import main
from pneumoscan.cv import inner_split, load_oof, make_folds
from pneumoscan.data.dataset import Split
from pneumoscan.data.decode import read_gray
from pneumoscan.errors import PneumoscanError
from pneumoscan.model_io import EnsemblePredictor, load_predictor, read_meta

FOLDS = 3


@pytest.fixture(scope="module")
def cv_data(tmp_path_factory) -> Path:
    from pneumoscan.data.synthetic import write_synthetic_dataset

    return write_synthetic_dataset(tmp_path_factory.mktemp("cvdata"), n_train=48, n_test=12,
                                   size=32)


@pytest.fixture(scope="module")
def cv_run(cv_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cv") / "cv"
    with pytest.MonkeyPatch.context() as mp:  # the autouse cache fixture is per test
        mp.setenv("PNEUMOSCAN_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        status = main(["cv", "--data", str(cv_data), "--folds", str(FOLDS), "--out", str(out),
                       "--recipe", "cpu", "--model", "seed_cnn", "--image-size", "32",
                       "--epochs", "1", "--val-fraction", "0.2", "--quiet"])
    assert status == 0
    return out


def _pool(n_patients: int = 60, seed: int = 0) -> Split:
    """Patients with 1-3 images each, about three pneumonia patients to one normal."""
    rng = np.random.default_rng(seed)
    labels, patients = [], []
    for p in range(n_patients):
        label = int(p % 4 != 0)
        for _ in range(rng.integers(1, 4)):
            labels.append(label)
            patients.append(f"person{p}")
    n = len(labels)
    return Split(images=np.zeros((n, 4, 4), np.uint8), labels=np.array(labels),
                 patients=patients, paths=[f"img{i}.png" for i in range(n)])


def test_folds_keep_each_patient_in_one_fold_and_are_stratified():
    pool = _pool()
    folds = make_folds(pool, 5, seed=3)
    held = np.concatenate([h for _, h in folds])
    assert sorted(held.tolist()) == list(range(len(pool)))  # every image held out exactly once
    overall = pool.labels.mean()
    seen: dict[str, int] = {}
    for k, (train_idx, held_idx) in enumerate(folds):
        assert not set(train_idx) & set(held_idx)
        train_patients = {pool.patients[i] for i in train_idx}
        held_patients = {pool.patients[i] for i in held_idx}
        assert not train_patients & held_patients
        for p in held_patients:
            assert seen.setdefault(p, k) == k, f"patient {p} in folds {seen[p]} and {k}"
        assert abs(pool.labels[held_idx].mean() - overall) < 0.15
        # the fold model's own validation split comes from its training folds, by patient
        fit_idx, val_idx = inner_split(pool, train_idx, 0.2, seed=k)
        assert set(fit_idx) | set(val_idx) == set(train_idx)
        assert not {pool.patients[i] for i in fit_idx} & {pool.patients[i] for i in val_idx}
        assert set(pool.labels[val_idx].tolist()) == {0, 1}


def test_make_folds_refuses_bad_fold_counts():
    with pytest.raises(PneumoscanError, match="at least 2"):
        make_folds(_pool(), 1, seed=0)
    with pytest.raises(PneumoscanError, match="at least 10 patients; these images come from 6"):
        make_folds(_pool(n_patients=6), 10, seed=0)


def test_cv_report_says_its_figures_and_threshold_are_out_of_fold(cv_run, tmp_path):
    run = Path(shutil.copytree(cv_run, tmp_path / "cv"))
    assert main(["report", str(run)]) == 0
    html = (run / "report.html").read_text(encoding="utf-8")
    figures = html[html.index('<section id="figures">'):html.index('<section id="plots">')]
    assert "<th>out-of-fold</th>" in figures and "chosen on the out-of-fold predictions" in figures
    data = html[html.index('<section id="data">'):html.index('<section id="config">')]
    # All the training images, as cross-validation used them: no validation carved apart.
    assert "Cross-validated: every training image was held out once" in data
    assert "carved by patient" not in data
    # The plots and the gallery of its "val" predictions are out-of-fold ones, not validation.
    rest = html[html.index('<section id="plots">'):]
    assert "ROC curve, out-of-fold" in rest
    assert "validation" not in rest.lower()


def test_a_folds_report_shows_its_own_splits_not_the_datas(cv_run, tmp_path):
    """The report of a fold re-carved validation from the whole pool: train, val and test
    counts the fold never had (it trained on its training folds and saw no test split)."""
    fold = Path(shutil.copytree(cv_run / "fold-0", tmp_path / "fold-0"))
    assert main(["report", str(fold)]) == 0
    html = (fold / "report.html").read_text(encoding="utf-8")
    data = html[html.index('<section id="data">'):html.index('<section id="config">')]
    assert "Fold 0 of a cross-validation run" in data
    n_val = read_meta(fold)["validation"]["n"]
    assert "<td>val</td>" in data and f"<td>{n_val}</td>" in data
    assert "<td>test</td>" not in data and "<td>train</td>" not in data


def test_cv_saves_every_fold_as_a_full_run(cv_run):
    for k in range(FOLDS):
        fold = cv_run / f"fold-{k}"
        assert (fold / "model.safetensors").is_file() and (fold / "config.json").is_file()
        assert read_meta(fold)["kind"] == "single"
        assert not (fold / "checkpoint.pt").exists()  # resume state cv never uses: 134 MB each


def test_oof_predictions_cover_every_training_image_exactly_once(cv_run, cv_data):
    oof = load_oof(cv_run)
    expected = {os.path.abspath(p) for p in (cv_data / "train").rglob("*.png")}
    paths = [str(p) for p in oof["paths"]]
    assert len(paths) == len(set(paths)) == len(expected)
    assert set(paths) == expected
    assert set(oof["fold"].tolist()) == set(range(FOLDS))
    assert ((oof["prob"] >= 0) & (oof["prob"] <= 1)).all()
    for path, label in zip(paths, oof["labels"], strict=True):
        assert Path(path).parent.name == ("PNEUMONIA" if label == 1 else "NORMAL")
    patient_fold: dict[str, int] = {}
    for patient, fold in zip(oof["patients"], oof["fold"], strict=True):
        assert patient_fold.setdefault(str(patient), int(fold)) == int(fold)


def test_fold_models_never_select_on_their_held_out_images(cv_run):
    oof = load_oof(cv_run)
    for k in range(FOLDS):
        with np.load(cv_run / f"fold-{k}" / "val_predictions.npz") as val:
            val_paths = {os.path.abspath(str(p)) for p in val["paths"]}
        held = {str(p) for p, f in zip(oof["paths"], oof["fold"], strict=True) if f == k}
        assert val_paths and not val_paths & held


def test_folds_train_on_rows_of_one_shared_pool_never_on_their_held_out_images(
    cv_data, tmp_path, monkeypatch, capsys
):
    # Memory stays flat because no fold copies its training images out of the pool; and the
    # rows a fold trains on are neither its held-out images nor its own validation images.
    import pneumoscan.train
    from pneumoscan.config import build_config
    from pneumoscan.cv import cross_validate

    calls = []
    real_fit = pneumoscan.train.fit

    def recording_fit(cfg, train, val, run_dir, **kw):
        calls.append((train.images, kw["train_rows"].copy(), set(val.paths)))
        return real_fit(cfg, train, val, run_dir, **kw)

    monkeypatch.setattr(pneumoscan.train, "fit", recording_fit)
    cfg = build_config("cpu", "cpu", {
        "data": str(cv_data), "out": str(tmp_path / "cv"), "model": "seed_cnn",
        "image_size": 32, "epochs": 1, "val_fraction": 0.2, "device": "cpu",
    })
    cross_validate(cfg, FOLDS, progress=False)
    oof = load_oof(tmp_path / "cv")
    assert len(calls) == FOLDS
    pool_images = calls[0][0]
    out = capsys.readouterr().out
    for k, (images, rows, val_paths) in enumerate(calls):
        assert images is pool_images and len(images) == len(oof["labels"])
        held = np.flatnonzero(oof["fold"] == k)
        assert len(rows) and not set(rows.tolist()) & set(held.tolist())
        trained = {os.path.abspath(str(oof["paths"][i])) for i in rows}
        assert not trained & {os.path.abspath(p) for p in val_paths}
        assert len(rows) + len(val_paths) + len(held) == len(images)
        # Each fold's heading counts what it trains on, its validation apart.
        assert (f"fold-{k} ({k + 1} of {FOLDS}): train on {len(rows)} images, validate on "
                f"{len(val_paths)}, predict {len(held)} held out") in out


def test_cv_metrics_has_each_fold_and_the_pooled_figures(cv_run):
    metrics = json.loads((cv_run / "cv_metrics.json").read_text())
    assert [f["fold"] for f in metrics["folds"]] == list(range(FOLDS))
    assert sum(f["n"] for f in metrics["folds"]) == metrics["pooled"]["n"] == 48
    for figures in [f["metrics"] for f in metrics["folds"]] + [metrics["pooled"]]:
        assert {"sensitivity", "specificity", "roc_auc", "ci95"} <= set(figures)
    assert metrics["pooled"]["threshold"] == metrics["threshold"]
    # The synthetic files are named as Kermany's: every fold counts its bacterial and viral
    # cases, and together the folds count each pneumonia of the pool once.
    pooled = metrics["pooled"]["sensitivity_by_kind"]
    assert set(pooled) == {"bacterial", "viral"}
    for kind, figures in pooled.items():
        per_fold = [f["metrics"].get("sensitivity_by_kind", {}).get(kind, {}).get("n", 0)
                    for f in metrics["folds"]]
        assert sum(per_fold) == figures["n"]


def test_the_output_is_an_ensemble_run_of_the_folds(cv_run):
    meta = read_meta(cv_run)
    assert meta["kind"] == "ensemble"
    assert meta["members"] == [f"fold-{k}" for k in range(FOLDS)]
    assert meta["temperature"] == 1.0 and meta["image_size"] == 32
    assert meta["validation"]["n"] == 48
    predictor = load_predictor(cv_run)
    assert isinstance(predictor, EnsemblePredictor) and len(predictor.members) == FOLDS
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32), dtype=np.uint8)
    mean = np.mean([m.predict_proba(images) for m in predictor.members], axis=0)
    np.testing.assert_allclose(predictor.predict_proba(images), mean)


def test_an_ensemble_knows_its_folds_training_images_by_their_pixels(cv_run, cv_data,
                                                                    tmp_path, capsys):
    """Each fold keeps the digests of the images it trained and validated on: every pool image
    is one of them for some fold, however the folder holding it is named."""
    from pneumoscan.seen import count_seen, training_keys

    predictor = load_predictor(cv_run)
    pool = shutil.copytree(cv_data / "train", tmp_path / "renamed")
    capsys.readouterr()
    assert main(["evaluate", str(cv_run), "--data", str(pool), "--quiet"]) == 0
    n = len(list(pool.rglob("*.png")))
    assert f"{n} of {n} images are images {cv_run} was trained or validated on" in (
        capsys.readouterr().err)
    test = np.stack([read_gray(p, 32) for p in sorted((cv_data / "test").rglob("*.png"))])
    assert count_seen(predictor, test) == 0
    # A fold's own digests leave out its held-out fold.
    oof = load_oof(cv_run)
    fold0 = training_keys(predictor.members[0])[32]
    held = np.stack([read_gray(p, 32) for p, f in zip(oof["paths"], oof["fold"], strict=True)
                     if f == 0])
    assert count_seen(predictor.members[0], held) == 0 and len(fold0) == n - len(held)


def test_the_ensemble_is_evaluated_on_test_and_evaluate_agrees(cv_run, cv_data, tmp_path):
    saved = json.loads((cv_run / "test_metrics.json").read_text())
    assert saved["n"] == 12
    with np.load(cv_run / "test_predictions.npz") as z:
        assert z["logits"].shape == (12, 2) and z["prob"].shape == (12,)
    out = tmp_path / "eval.json"
    assert main(["evaluate", str(cv_run), "--data", str(cv_data), "--json", str(out),
                 "--device", "cpu", "--quiet"]) == 0
    figures = json.loads(out.read_text())
    assert figures["n"] == 12
    assert figures["threshold"] == pytest.approx(read_meta(cv_run)["threshold"])
    assert figures["brier"] == pytest.approx(saved["brier"], abs=1e-6)


def test_predict_accepts_the_ensemble_run(cv_run, cv_data, tmp_path):
    files = sorted((cv_data / "test").rglob("*.png"))[:3]
    out = tmp_path / "predictions.json"
    status = main(["predict", str(cv_run), *map(str, files), "--output", str(out),
                   "--device", "cpu", "--quiet"])
    assert status == 0
    text = out.read_text()
    assert all(f.name in text for f in files)


def test_cv_refuses_one_fold_and_needs_out(cv_data, tmp_path, capsys):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as exc:  # argparse refuses it, before anything is decoded
        main(["cv", "--data", str(cv_data), "--folds", "1", "--out", str(out)])
    assert exc.value.code == 2
    assert "--folds: expected a whole number of at least 2" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(SystemExit) as exc:
        main(["cv", "--data", str(cv_data)])
    assert exc.value.code == 2


def test_a_fold_too_small_to_carve_validation_fails_before_anything_is_written(tmp_path, capsys):
    from conftest import write_image

    rng = np.random.default_rng(0)
    for i in range(8):
        write_image(tmp_path / "data" / "NORMAL" / f"IM-{i:04d}-0001.png",
                    rng.integers(0, 256, (40, 40), dtype=np.uint8))
    for i in range(6):
        write_image(tmp_path / "data" / "PNEUMONIA" / f"person{i}_virus_{i}.png",
                    rng.integers(0, 256, (40, 40), dtype=np.uint8))
    out = tmp_path / "cv"
    status = main(["cv", "--data", str(tmp_path / "data"), "--folds", "2", "--out", str(out),
                   "--image-size", "32", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert "cannot carve a validation split from a fold's" in err and "--val-fraction" in err
    assert not out.exists()  # not even a config.json: no fold had started


def test_an_earlier_cv_run_in_out_is_refused_and_left_as_it_was(cv_data, tmp_path, capsys):
    out = tmp_path / "cv"
    (out / "fold-2").mkdir(parents=True)  # as a 3-fold run leaves it
    (out / "fold-2" / "model.json").write_text("{}")
    (out / "config.json").write_text("{}")
    status = main(["cv", "--data", str(cv_data), "--folds", "2", "--out", str(out),
                   "--image-size", "32", "--epochs", "1", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1
    assert "already holds a run (fold-2/model.json)" in err and "--resume" not in err
    assert sorted(p.name for p in out.rglob("*")) == ["config.json", "fold-2", "model.json"]
    assert (out / "config.json").read_text() == "{}"
