"""pneumoscan stack: nested-CV figures, refusals, and a self-contained stacked run directory."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from pneumoscan.cli import main
from pneumoscan.cv import OOF_PREDICTIONS
from pneumoscan.model_io import EnsemblePredictor, load_predictor, read_meta, stack_probabilities
from pneumoscan.stack import fit_stack


def _two_complementary_models(n: int = 400, seed: int = 0):
    """OOF probabilities of two models that each know half of the cases and guess on the rest."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.7).astype(np.int64)
    sign = 2.0 * labels - 1
    a_knows = rng.random(n) < 0.5
    noise = rng.normal(0, 1.0, (n, 2))
    z_a = np.where(a_knows, 3.0 * sign, 0.0) + noise[:, 0]
    z_b = np.where(~a_knows, 3.0 * sign, 0.0) + noise[:, 1]
    prob = 1 / (1 + np.exp(-np.stack([z_a, z_b], axis=1)))
    patients = [f"person{i // 2}" for i in range(n)]  # two images a patient
    return prob, labels, patients


def test_stack_beats_the_better_single_model_on_nested_cv():
    prob, labels, patients = _two_complementary_models()
    best_single = max(roc_auc_score(labels, prob[:, j]) for j in range(2))
    fitted = fit_stack(prob, labels, patients, n_folds=5, seed=0)
    assert np.isfinite(fitted.nested_prob).all()
    assert set(fitted.nested_fold.tolist()) == set(range(5))
    assert fitted.metrics["roc_auc"] > best_single + 0.08
    assert fitted.metrics["roc_auc"] == pytest.approx(roc_auc_score(labels, fitted.nested_prob))
    best_accuracy = max(np.mean((prob[:, j] >= 0.5) == labels) for j in range(2))
    assert fitted.metrics["accuracy"] > best_accuracy
    assert all(c > 0 for c in fitted.stacker["coef"])  # both members carry signal


def test_nested_figures_are_not_fitted_on_the_rows_they_score():
    # Many members of pure noise: a combiner scored on its own training rows would look good.
    rng = np.random.default_rng(1)
    n, m = 200, 30
    labels = (rng.random(n) < 0.5).astype(np.int64)
    prob = rng.uniform(0.05, 0.95, (n, m))
    patients = [f"p{i}" for i in range(n)]
    in_sample = roc_auc_score(labels, stack_probabilities(prob, fit_stack(
        prob, labels, patients, n_folds=5).stacker))
    nested = fit_stack(prob, labels, patients, n_folds=5).metrics["roc_auc"]
    assert in_sample > 0.7
    assert nested < 0.62


N_OOF = 60


def _fake_cv_run(out: Path, prob: np.ndarray, labels, patients, seed: int) -> Path:
    """What `pneumoscan cv` leaves, without the training: two untrained seed_cnn fold runs, an
    ensemble model.json over them, and the given out-of-fold predictions (test_cv trains one)."""
    import torch

    from pneumoscan import CLASS_NAMES
    from pneumoscan.cv import save_oof
    from pneumoscan.model_io import save_meta, save_model
    from pneumoscan.models import create_model

    torch.manual_seed(seed)
    for k in range(2):
        model = create_model("seed_cnn", in_chans=1, image_size=32).eval()
        save_model(out / f"fold-{k}", model, {
            "architecture": "seed_cnn", "image_size": 32, "in_chans": 1,
            "class_names": list(CLASS_NAMES), "intensity": {"scale": 1 / 255, "mean": 0.0,
                                                            "std": 1.0},
            "threshold": 0.5, "threshold_rule": "youden", "temperature": 1.0,
        })
    save_meta(out, {"kind": "ensemble", "members": ["fold-0", "fold-1"], "image_size": 32,
                    "class_names": list(CLASS_NAMES), "threshold": 0.5,
                    "threshold_rule": "youden", "temperature": 1.0})
    folds = np.arange(len(labels)) % 2
    # Named as Kermany's files are: pneumonia says its kind, bacterial or viral.
    paths = [f"/data/train/person{i}_{('bacteria', 'virus')[i % 2]}_{i}.jpeg" if label else
             f"/data/train/IM-{i:04d}-0001.jpeg" for i, label in enumerate(labels)]
    save_oof(out / OOF_PREDICTIONS, labels, prob, folds, paths, patients)
    return out


@pytest.fixture(scope="module")
def cv_runs(tmp_path_factory) -> list[Path]:
    """Two cross-validated runs over the same images, whose models err on different cases."""
    base = tmp_path_factory.mktemp("stack")
    prob, labels, patients = _two_complementary_models(N_OOF)
    return [_fake_cv_run(base / f"cv-seed{j}", prob[:, j], labels, patients, seed=j)
            for j in range(2)]


def test_stack_refuses_a_run_that_is_not_a_cv_output(cv_runs, tmp_path, capsys):
    single = cv_runs[0] / "fold-0"  # a complete single run, but not cross-validated
    assert main(["stack", str(cv_runs[0]), str(single), "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and OOF_PREDICTIONS in err and str(single) in err
    assert not (tmp_path / "s").exists()


def test_stack_refuses_runs_over_different_images(cv_runs, tmp_path, capsys):
    other = shutil.copytree(cv_runs[1], tmp_path / "other")
    with np.load(other / OOF_PREDICTIONS) as z:
        oof = {k: z[k] for k in z.files}
    with open(other / OOF_PREDICTIONS, "wb") as f:
        np.savez(f, **{k: v[1:] for k, v in oof.items()})  # one image fewer
    assert main(["stack", str(cv_runs[0]), str(other), "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "other images" in err


@pytest.mark.parametrize("where", ["a run", "inside a run", "the runs' folder"])
def test_stack_out_must_leave_the_runs_alone(where, cv_runs, tmp_path, capsys):
    """The members are copied into --out under their folders' names: an --out holding a run
    would have that run replaced by a copy of a few of its files."""
    copies = [shutil.copytree(r, tmp_path / "runs" / r.name) for r in cv_runs]
    before = {p: p.read_bytes() for p in (tmp_path / "runs").rglob("*") if p.is_file()}
    out = {"a run": copies[0], "inside a run": copies[0] / "stack",
           "the runs' folder": tmp_path / "runs"}[where]
    assert main(["stack", *map(str, copies), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "must not be one of the runs" in err or "already holds a run" in err, err
    after = {p: p.read_bytes() for p in (tmp_path / "runs").rglob("*") if p.is_file()}
    assert after == before


def test_stacked_run_is_self_contained_loads_and_predicts(cv_runs, tmp_path, capsys):
    copies = [shutil.copytree(r, tmp_path / "members" / r.name) for r in cv_runs]
    out = tmp_path / "stacked"
    assert main(["stack", *map(str, copies), "--out", str(out), "--folds", "3"]) == 0
    printed = capsys.readouterr().out
    assert "nested 3-fold" in printed
    shutil.rmtree(tmp_path / "members")  # nothing in the stack may refer to its sources

    meta = read_meta(out)
    assert meta["kind"] == "stack" and meta["members"] == [r.name for r in cv_runs]
    assert len(meta["stacker"]["coef"]) == 2
    assert not [p for p in out.rglob("*") if p.is_symlink()]
    assert not list(out.rglob("checkpoint.pt"))
    predictor = load_predictor(out)
    assert isinstance(predictor, EnsemblePredictor) and len(predictor.members) == 2
    assert all(len(m.members) == 2 for m in predictor.members)  # each member: its 2 fold models
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32), dtype=np.uint8)
    prob = predictor.predict_proba(images)
    assert prob.shape == (5,) and ((prob >= 0) & (prob <= 1)).all()
    expected = stack_probabilities(predictor.member_probabilities(images), meta["stacker"])
    np.testing.assert_allclose(prob, expected)

    metrics = json.loads((out / "stack_metrics.json").read_text())
    assert metrics["stack"]["n"] == N_OOF and "ci95" in metrics["stack"]
    assert set(metrics["members"]) == set(meta["members"])
    assert all("ci95" in m["oof"] for m in metrics["members"].values())
    assert meta["threshold"] == pytest.approx(metrics["threshold"])


def test_stack_report_names_each_member_and_where_its_threshold_came_from(cv_runs, tmp_path):
    copies = [shutil.copytree(r, tmp_path / r.name) for r in cv_runs]
    for run, model in zip(copies, ("seed_cnn", "resnet10t"), strict=True):
        (run / "config.json").write_text(json.dumps({
            "data": str(tmp_path / "gone"), "model": model, "recipe": "cpu", "image_size": 32,
            "epochs": 1, "seed": 0, "cv": {"folds": 2, "seed": 0}}))
    out = tmp_path / "stacked"
    assert main(["stack", *map(str, copies), "--out", str(out), "--folds", "3"]) == 0
    assert main(["report", str(out)]) == 0
    html = (out / "report.html").read_text(encoding="utf-8")
    config = html[html.index('<section id="config">'):html.index('<section id="learning">')]
    # Both model families, each under its own member's name (not the first member's alone).
    for run, model in zip(copies, ("seed_cnn", "resnet10t"), strict=True):
        assert f"member_settings.{run.name}.model" in config and model in config
    assert f"member_settings.{copies[1].name}.folds" in config
    figures = html[html.index('<section id="figures">'):html.index('<section id="plots">')]
    assert "out-of-fold" in figures and "nested out-of-fold predictions" in figures
    assert "chosen on validation data" not in figures
    learning = html[html.index('<section id="learning">'):html.index('<section id="figures">')]
    assert "A stack run has no learning curves" in learning
    # Kermany-style names: the stack's nested figures and each member's give each kind apart.
    assert "sensitivity, viral" in figures
    metrics = json.loads((out / "stack_metrics.json").read_text())
    members = [m["oof"] for m in metrics["members"].values()]
    assert all(set(m["sensitivity_by_kind"]) == {"bacterial", "viral"} for m in members)


def test_nested_folds_a_class_cannot_fill_are_a_user_error():
    # 11 rows, 3 of them PNEUMONIA: 5 nested folds cannot each hold a PNEUMONIA patient.
    from pneumoscan.errors import PneumoscanError

    labels = np.array([0] * 8 + [1] * 3)
    prob = np.random.default_rng(0).random((11, 2))
    patients = [f"p{i}" for i in range(11)]
    with pytest.raises(PneumoscanError, match="--folds 5: .*PNEUMONIA images come from 3"):
        fit_stack(prob, labels, patients, n_folds=5)


def test_stack_folds_below_two_is_a_usage_error(cv_runs, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["stack", *map(str, cv_runs), "--out", str(tmp_path / "s"), "--folds", "1"])
    assert exc.value.code == 2
    assert "--folds: expected a whole number of at least 2" in capsys.readouterr().err


def test_member_names_are_distinct_and_safe():
    """Folder names that repeat, clash with a made-up suffix, hold '..' or name the report's
    folder still give one distinct, plain sub-folder name per member."""
    from pneumoscan.stack import member_names

    runs = [Path("p/cv-2"), Path("q/cv"), Path("r/cv"), Path("cv..a"), Path("s/plots"),
            Path("t/..."), Path("u/config.json")]
    names = member_names(runs)
    assert len(set(names)) == len(names) == len(runs)
    assert names[:3] == ["cv-2", "cv", "cv-3"]
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+", n) for n in names), names
    assert "plots" not in names and "config.json" not in names


def test_stack_with_repeated_folder_names_keeps_each_model_with_its_coefficient(
        cv_runs, tmp_path, capsys):
    """Two members named alike once made one member's copy overwrite the other's, leaving a
    coefficient fitted on one model applied to another."""
    a = shutil.copytree(cv_runs[0], tmp_path / "p" / "cv-2")
    b = shutil.copytree(cv_runs[1], tmp_path / "q" / "cv")
    c = shutil.copytree(cv_runs[1], tmp_path / "r" / "cv")
    with np.load(c / OOF_PREDICTIONS) as z:  # a third member with predictions of its own
        oof = {k: z[k] for k in z.files}
    oof["prob"] = np.clip(oof["prob"] * 0.9 + 0.05, 0, 1)
    with open(c / OOF_PREDICTIONS, "wb") as f:
        np.savez(f, **oof)
    out = tmp_path / "s"
    assert main(["stack", str(a), str(b), str(c), "--out", str(out), "--folds", "3"]) == 0
    capsys.readouterr()
    meta = read_meta(out)
    assert len(set(meta["members"])) == 3
    metrics = json.loads((out / "stack_metrics.json").read_text())
    assert len(metrics["members"]) == 3
    for name, source in zip(meta["members"], (a, b, c), strict=True):
        copied = (out / name / OOF_PREDICTIONS).read_bytes()
        assert copied == (source / OOF_PREDICTIONS).read_bytes()


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_stack_refuses_damaged_out_of_fold_predictions_in_one_line(
        damage, cv_runs, tmp_path, capsys):
    bad = shutil.copytree(cv_runs[0], tmp_path / "bad")
    data = (bad / OOF_PREDICTIONS).read_bytes()
    (bad / OOF_PREDICTIONS).write_bytes(data[: len(data) // 2] if damage == "truncated" else b"")
    assert main(["stack", str(bad), str(cv_runs[1]), "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unreadable out-of-fold predictions" in err, err
    assert not (tmp_path / "s").exists()


def test_a_full_disk_while_copying_members_is_one_line_and_leaves_no_partial_copy(
        cv_runs, small_disk, capsys):
    # copytree's error is the list of every file it could not copy: printed whole before.
    out = small_disk / "st"
    assert main(["stack", *map(str, cv_runs), "--out", str(out), "--folds", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"cannot copy {cv_runs[0]}{os.sep}" in err and f" to {out}{os.sep}" in err
    assert "(no space left on device)" in err and "partial" not in err
    assert not list(out.glob(".*.partial"))


def test_a_folder_in_out_named_like_a_member_is_refused_not_replaced(cv_runs, tmp_path,
                                                                     capsys):
    """The members are copied to OUT/<run folder name>: a folder of that name already there
    (someone's notes, another trained run) was deleted without a word."""
    out = tmp_path / "s"
    notes = out / cv_runs[0].name / "notes.txt"
    notes.parent.mkdir(parents=True)
    notes.write_text("mine")
    assert main(["stack", *map(str, cv_runs), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"holds {cv_runs[0].name}/" in err, err
    assert notes.read_text() == "mine" and not (out / "model.json").exists()


def test_an_interrupted_stack_is_replaced_by_the_next_one(cv_runs, tmp_path, monkeypatch,
                                                          capsys):
    """A stack stopped before its model.json (Ctrl-C while copying a member) leaves its files;
    the same command again must not take them for someone's own and refuse."""
    import pneumoscan.stack as stack_module

    out = tmp_path / "s"
    real_write = stack_module.atomic_write_json

    def interrupted(path, value):
        if Path(path).name == "stack_metrics.json":  # members and predictions are written
            raise KeyboardInterrupt
        real_write(path, value)

    monkeypatch.setattr(stack_module, "atomic_write_json", interrupted)
    assert main(["stack", *map(str, cv_runs), "--out", str(out)]) == 130
    assert (out / "val_predictions.npz").is_file() and not (out / "model.json").exists()
    monkeypatch.setattr(stack_module, "atomic_write_json", real_write)
    capsys.readouterr()
    assert main(["stack", *map(str, cv_runs), "--out", str(out)]) == 0, capsys.readouterr().err
    assert read_meta(out)["kind"] == "stack"


def test_a_stacks_leftover_names_replace_only_its_own_copies(cv_runs, tmp_path, capsys):
    """An interrupted stack's config.json names its members; a folder made since under one of
    those names (someone's notes, a run trained there) is not a copy to replace or delete."""
    out = tmp_path / "s"
    assert main(["stack", *map(str, cv_runs), "--out", str(out)]) == 0
    (out / "model.json").unlink()  # as if stopped before its last file
    shutil.rmtree(out / cv_runs[0].name)
    notes = out / cv_runs[0].name / "notes.txt"
    notes.parent.mkdir()
    notes.write_text("mine")
    assert main(["stack", *map(str, cv_runs), "--out", str(out)]) == 2
    assert f"holds {cv_runs[0].name}/" in capsys.readouterr().err
    assert notes.read_text() == "mine"
    # A run named like cv's folds is a member under another name, not one of the stack's folds.
    fold_named = shutil.copytree(cv_runs[1], tmp_path / "fold-7")
    out2 = tmp_path / "s2"
    assert main(["stack", str(cv_runs[0]), str(fold_named), "--out", str(out2)]) == 0
    assert read_meta(out2)["members"] == [cv_runs[0].name, "member-fold-7"]
