"""A logistic-regression stack over cross-validated runs, with figures no combiner has seen.

The combiner is fitted on the members' out-of-fold (OOF) log-odds. Its reported figures come from
nested cross-validation over those OOF rows, grouped by patient: the combiner is fitted on K-1
folds' rows and predicts the held-out fold's, and the predictions are pooled. The threshold is
chosen on those pooled nested predictions; the final combiner is then fitted on every OOF row.
Like any figure measured where its threshold was chosen, the threshold-dependent rates lean
slightly optimistic; ROC AUC, PR AUC, loss and Brier score do not depend on the threshold.
As in ``cv``, each OOF row comes from one fold model while a member predicts new images with the
mean of its fold models, so the combiner is fitted on slightly more spread-out inputs than it
later sees.

The output is a run directory of kind "stack" that holds copies of its members (each member's
``model.json`` and fold runs, without resume checkpoints), so nothing in it refers outside it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pneumoscan import CLASS_NAMES
from pneumoscan.cv import CV_METRICS, OOF_PREDICTIONS, load_oof
from pneumoscan.data.split import SplitError, patient_folds
from pneumoscan.environment import run_config
from pneumoscan.errors import PneumoscanError
from pneumoscan.evaluate import (
    choose_threshold,
    evaluate_predictions,
    format_figure,
    format_table,
)
from pneumoscan.fileio import atomic_write_json, staged_folder
from pneumoscan.model_io import log_odds, read_meta, save_meta, stack_probabilities
from pneumoscan.run_folder import CHECKPOINT, METRICS, STACK_METRICS, VAL_PREDICTIONS
from pneumoscan.run_plots import write_predictions
from pneumoscan.threshold_rules import format_threshold

NESTED_PREDICTIONS = VAL_PREDICTIONS  # nested-CV predictions, in the single-run format
_SKIP_ON_COPY = (CHECKPOINT,)  # resume state: several times the weights, never needed here


@dataclass
class StackFit:
    stacker: dict  # {"coef": [...], "intercept": x}, fitted on every row
    nested_prob: np.ndarray  # each row predicted by a combiner that did not see its fold
    nested_fold: np.ndarray
    threshold: float
    metrics: dict  # of nested_prob at threshold, with 95% bootstrap intervals


def fit_combiner(member_prob: np.ndarray, labels: np.ndarray) -> dict:
    """A logistic regression on the members' log-odds, as ``model_io.stack_probabilities`` reads."""
    from sklearn.linear_model import LogisticRegression

    lr = LogisticRegression(C=1.0, max_iter=1000)
    lr.fit(log_odds(member_prob), labels)
    return {"coef": [float(c) for c in lr.coef_[0]], "intercept": float(lr.intercept_[0])}


def fit_stack(
    member_prob: np.ndarray,
    labels: np.ndarray,
    patients: list[str],
    *,
    n_folds: int = 5,
    seed: int = 0,
    threshold_rule: str = "youden",
    paths: list[str] | None = None,
) -> StackFit:
    """Nested-CV figures of a stack over ``member_prob`` (N, M), then the combiner on all rows.
    ``paths`` (the images') add the sensitivity by kind of pneumonia to the figures."""
    member_prob = np.asarray(member_prob, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if member_prob.ndim != 2 or member_prob.shape[0] != labels.shape[0]:
        raise ValueError(f"member_prob must be (N, M) with N = {len(labels)}, "
                         f"got shape {member_prob.shape}")
    try:
        folds = patient_folds(labels, patients, n_folds, seed)
    except SplitError as e:
        raise PneumoscanError(f"--folds {n_folds}: {e}; use fewer folds") from None
    nested = np.full(len(labels), np.nan)
    fold_of = np.full(len(labels), -1, dtype=np.int64)
    for k, (fit_idx, held_idx) in enumerate(folds):
        if len(set(labels[fit_idx].tolist())) < 2:
            raise PneumoscanError("a nested fold has only one class; use fewer --folds")
        stacker = fit_combiner(member_prob[fit_idx], labels[fit_idx])
        nested[held_idx] = stack_probabilities(member_prob[held_idx], stacker)
        fold_of[held_idx] = k
    threshold = choose_threshold(labels, nested, threshold_rule)
    metrics = evaluate_predictions(labels, nested, threshold, groups=patients, paths=paths)
    return StackFit(fit_combiner(member_prob, labels), nested, fold_of, threshold, metrics)


def aligned_oof(runs: list[Path]) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """(member_prob (N, M), labels, patients, paths), rows matched by image path.

    Refuses runs whose OOF predictions cover different images, or disagree on a label.
    """
    oofs = [load_oof(run) for run in runs]
    first = oofs[0]
    paths = [str(p) for p in first["paths"]]
    if len(set(paths)) != len(paths):
        raise PneumoscanError(f"{runs[0]}: {OOF_PREDICTIONS} lists an image twice")
    reference = set(paths)
    columns = []
    for run, oof in zip(runs, oofs, strict=True):
        row_of = {str(p): i for i, p in enumerate(oof["paths"])}
        if set(row_of) != reference:
            only_here = len(set(row_of) - reference)
            only_first = len(reference - set(row_of))
            raise PneumoscanError(
                f"{run}: its out-of-fold predictions are for other images than {runs[0]}'s "
                f"({only_here} only here, {only_first} only there); stack runs of the same data"
            )
        order = np.array([row_of[p] for p in paths])
        if not np.array_equal(oof["labels"][order], first["labels"]):
            raise PneumoscanError(f"{run}: labels differ from {runs[0]}'s for the same images")
        columns.append(oof["prob"][order])
    patients = [str(p) for p in first["patients"]]
    return np.stack(columns, axis=1), first["labels"].astype(np.int64), patients, paths


def unfinished_stack(out: Path) -> set[str]:
    """The names an interrupted stack left in ``out``, which a new stack there may replace: its
    config.json (written first, naming its members), its nested predictions and metrics, and
    the members it lists that are whole copies of a cv run as ``copy_member`` makes them. Empty
    when ``out`` holds a model.json (a stack writes it last) or no stack's config.json."""
    try:
        config = json.loads((out / "config.json").read_text(encoding="utf-8"))
        members = config["stack"]["members"] if "pneumoscan" in config else None
    except (OSError, ValueError, TypeError, KeyError):
        return set()
    if (out / "model.json").exists() or not isinstance(members, list):
        return set()
    copies = {m for m in members if isinstance(m, str) and re.fullmatch(r"[A-Za-z0-9_-]+", m)
              and _is_member_copy(out / m)}
    return {"config.json", NESTED_PREDICTIONS, STACK_METRICS} | copies


def _is_member_copy(folder: Path) -> bool:
    """A folder as copy_member leaves it: a cv run's model.json and out-of-fold predictions,
    without the resume state or epochs of a run trained there. Anything else there (someone's
    own run or files, made since under that name) is not a stack's to replace."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    try:
        kind = json.loads((folder / "model.json").read_text(encoding="utf-8")).get("kind")
    except (OSError, ValueError, AttributeError):
        return False
    return (kind == "ensemble" and (folder / OOF_PREDICTIONS).is_file()
            and not any((folder / name).exists() for name in (CHECKPOINT, METRICS)))


def member_names(runs: list[Path]) -> list[str]:
    """Sub-folder names for the members: each run's folder name, made safe and distinct.

    Only letters, digits, '_' and '-' are kept, so a name can neither climb out of the stack's
    folder ('..') nor take the name of one of its own files; "plots" is the report's folder,
    and fold-N and seed-N folders are read as runs of their own ("member-fold-0" instead).
    """
    taken = {"plots"}
    names: list[str] = []
    for run in runs:
        base = re.sub(r"[^A-Za-z0-9_-]+", "-", Path(run).resolve().name).strip("-") or "member"
        if re.match(r"(fold|seed)-", base):  # the sub-run folders of cv and train --seeds
            base = f"member-{base}"
        name, k = base, 2
        while name in taken:
            name, k = f"{base}-{k}", k + 1
        taken.add(name)
        names.append(name)
    return names


def build_stack(
    runs: list[str | Path],
    out: str | Path,
    *,
    n_folds: int = 5,
    seed: int = 0,
    threshold_rule: str | None = None,
) -> dict:
    """Stack cv runs into the run directory ``out``; returns the contents of stack_metrics.json."""
    runs = [Path(r) for r in runs]
    out = Path(out)
    if len(runs) < 2:
        raise PneumoscanError("stack needs at least two cross-validated runs")
    for run in runs:
        load_oof(run)  # a one-line refusal for anything that is not a cv output, before any work
        # The members are copied into --out, each under its folder's name: an --out that holds
        # a run would have that run replaced by its copy.
        if out.resolve() == run.resolve() or run.resolve() in out.resolve().parents or (
                out.resolve() in run.resolve().parents):
            raise PneumoscanError(
                f"--out {out}: must not be one of the runs, inside one, or a folder that holds "
                f"one ({run}); choose a new folder for the stack")
    if len({r.resolve() for r in runs}) != len(runs):
        raise PneumoscanError("the same run is named twice")
    names = member_names(runs)
    leftovers = unfinished_stack(out)
    for name, run in zip(names, runs, strict=True):
        if os.path.lexists(out / name) and name not in leftovers:
            raise PneumoscanError(
                f"--out {out}: holds {name}{'/' if (out / name).is_dir() else ''}, which the "
                f"copy of {run} would replace; choose another --out, or move it first")
    metas = [read_meta(run) for run in runs]
    rule = threshold_rule or metas[0].get("threshold_rule", "youden")

    member_prob, labels, patients, paths = aligned_oof(runs)
    fitted = fit_stack(member_prob, labels, patients, n_folds=n_folds, seed=seed,
                       threshold_rule=rule, paths=paths)
    members = {
        name: {
            "run": str(run.resolve()),
            "threshold": float(meta["threshold"]),
            "oof": evaluate_predictions(labels, member_prob[:, i], float(meta["threshold"]),
                                        groups=patients, paths=paths),
        }
        for i, (name, run, meta) in enumerate(zip(names, runs, metas, strict=True))
    }
    summary = {
        "stack": fitted.metrics,
        "members": members,
        "stacker": fitted.stacker,
        "features": "log-odds of each member's calibrated out-of-fold probability",
        "nested_folds": n_folds,
        "seed": seed,
        "threshold": fitted.threshold,
        "threshold_rule": rule,
        "note": "stack figures: nested cross-validation over the OOF rows, grouped by patient; "
                "the threshold is chosen on those nested predictions",
    }

    out.mkdir(parents=True, exist_ok=True)
    for stale in leftovers - set(names) - {"config.json", NESTED_PREDICTIONS, STACK_METRICS}:
        shutil.rmtree(out / stale)  # the interrupted stack's copy of a run this one leaves out
    # Before the members: it names what this stack writes, so that a stack interrupted before
    # its model.json is known by its own leftovers, which the next stack here replaces.
    atomic_write_json(out / "config.json", run_config({
        "stack": {"runs": [str(r.resolve()) for r in runs], "members": names,
                  "nested_folds": n_folds, "seed": seed, "threshold_rule": rule},
    }))
    for name, run in zip(names, runs, strict=True):
        copy_member(run, out / name)
    write_predictions(out / NESTED_PREDICTIONS, labels=labels, prob=fitted.nested_prob,
                      paths=paths, fold=fitted.nested_fold, patients=np.array(patients, dtype=str))
    atomic_write_json(out / STACK_METRICS, summary)
    save_meta(out, {  # last: a crash before this leaves no half-made run behind a model.json
        "kind": "stack",
        "members": names,
        # The largest; predict, evaluate and serve decode for each member at its own
        # (model_io.read_inputs), Grad-CAM resizes from this one.
        "image_size": max(int(m["image_size"]) for m in metas),
        "class_names": list(CLASS_NAMES),
        "threshold": float(fitted.threshold),
        "threshold_rule": rule,
        "temperature": 1.0,  # the combiner's output is a probability already
        "stacker": fitted.stacker,
        "data_fingerprint": metas[0].get("data_fingerprint", ""),
        **({"data_source": metas[0]["data_source"]} if "data_source" in metas[0] else {}),
        "validation": fitted.metrics,
    })
    print(format_comparison(summary))
    return summary


def copy_member(run: Path, dest: Path) -> None:
    """A cv run's model.json, OOF predictions and member runs, copied into ``dest``."""
    meta = read_meta(run)
    copying = (run, dest)  # what is being copied, for the error line
    with staged_folder(dest) as staging:  # no half copy is left in --out
        try:
            for sub in meta.get("members", []):
                copying = (run / sub, dest / sub)
                shutil.copytree(run / sub, staging / sub, symlinks=False,
                                ignore=shutil.ignore_patterns(*_SKIP_ON_COPY))
            for name in ("model.json", "model.safetensors", OOF_PREDICTIONS, CV_METRICS,
                         "config.json"):
                if (run / name).is_file():
                    copying = (run / name, dest / name)
                    shutil.copy2(run / name, staging / name)
        except (OSError, shutil.Error) as e:  # unreadable, a full disk
            source, target, reason = *copying, (getattr(e, "strerror", None) or str(e)).lower()
            if isinstance(e, shutil.Error):  # copytree's list of every file it could not copy
                first_source, first_target, why = e.args[0][0]
                source, target = first_source, dest / Path(first_target).relative_to(staging)
                reason = re.match(r"(?:\[Errno \d+\] )?([^:]*)", why).group(1).lower()
            raise PneumoscanError(f"cannot copy {source} to {target} ({reason})") from None


def format_comparison(summary: dict) -> str:
    lines = [f"stack of {len(summary['members'])}: nested {summary['nested_folds']}-fold "
             "cross-validation over the out-of-fold predictions (threshold "
             f"{format_threshold(summary['threshold'])} by {summary['threshold_rule']}):",
             format_table(summary["stack"]), "", "members (pooled out-of-fold, own thresholds):"]
    for name, member in summary["members"].items():
        lines.append(_comparison_line(name, member["oof"], with_ci=True))
    lines.append(_comparison_line("stack", summary["stack"], with_ci=False))
    lines.append("stacker coefficients (per member log-odds): "
                 + ", ".join(f"{c:.3f}" for c in summary["stacker"]["coef"])
                 + f"; intercept {summary['stacker']['intercept']:.3f}")
    return "\n".join(lines)


def _comparison_line(name: str, m: dict, *, with_ci: bool) -> str:
    ci = (m.get("ci95") or {}).get("roc_auc") if with_ci else None
    ci_text = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
    return (f"  {name}: roc_auc {format_figure(m['roc_auc'])}{ci_text}  "
            f"sensitivity {format_figure(m['sensitivity'])}  "
            f"specificity {format_figure(m['specificity'])}  "
            f"accuracy {format_figure(m['accuracy'])}")
