"""Patient-grouped K-fold cross-validation whose folds are saved as one ensemble run.

The data set is decoded once; each fold trains on its rows of it through an index array (no
copy) and frees its small validation and held-out copies when done, so memory stays flat from
fold to fold. For fold k the held-out fold is predicted untouched: the fold
model's validation split (early stopping, temperature, threshold) is carved by patient from its own
training folds, so every out-of-fold (OOF) probability comes from a model that selected nothing on
that image.

The output folder is itself an ensemble run directory (``model.json`` kind "ensemble", members
``fold-0`` ... ``fold-{K-1}``): ``evaluate``, ``predict``, ``report``, ``serve`` and ``export`` take
it like any run. Its threshold is chosen on the pooled OOF probabilities. That is an
approximation: on a new image the ensemble's probability is the mean over K fold models, while each
OOF probability comes from one model; the mean of calibrated members is usually a little less
extreme, so the pooled threshold is close to, not exactly, the best one for the ensemble. The
pooled threshold-dependent figures (sensitivity, specificity, ...) are measured on the data the
threshold was chosen on and so lean slightly optimistic; ROC AUC, PR AUC, loss and Brier score
do not depend on it, and the per-fold figures use each fold model's own threshold.
"""

from __future__ import annotations

import dataclasses
import gc
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pneumoscan import CLASS_NAMES
from pneumoscan.allocator import low_memory_mode
from pneumoscan.config import TrainConfig
from pneumoscan.data.dataset import DataBundle, Split, few_patients, load_data, test_heading
from pneumoscan.data.split import SplitError, patient_folds, patient_split
from pneumoscan.device import resolve_device
from pneumoscan.environment import run_config
from pneumoscan.errors import PneumoscanError
from pneumoscan.evaluate import (
    choose_threshold,
    evaluate_predictions,
    format_figure,
    format_table,
)
from pneumoscan.fileio import atomic_write_json
from pneumoscan.model_io import (
    EnsemblePredictor,
    load_predictor,
    probabilities,
    read_meta,
    save_meta,
)
from pneumoscan.run_folder import (
    CV_METRICS,
    OOF_PREDICTIONS,
    TEST_METRICS,
    TEST_PREDICTIONS,
    VAL_PREDICTIONS,
)
from pneumoscan.run_plots import write_predictions
from pneumoscan.seen import pixel_keys, save_training_images
from pneumoscan.threshold_rules import format_threshold

THRESHOLD_NOTE = (
    "threshold chosen on the pooled out-of-fold probabilities, each from one fold model; the "
    "ensemble averages all fold models, so this approximates its best threshold"
)


@dataclass
class FoldResult:
    fold: int
    run_dir: Path
    held_out: np.ndarray  # indices into the cross-validated pool
    prob: np.ndarray  # calibrated OOF probabilities of those images
    threshold: float  # the fold model's own, chosen on its inner validation split
    metrics: dict


def fold_name(k: int) -> str:
    return f"fold-{k}"


def make_folds(pool: Split, n_folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train_idx, held_out_idx) per fold: grouped by patient, stratified by class."""
    if n_folds < 2:
        raise PneumoscanError(f"--folds {n_folds}: cross-validation needs at least 2 folds")
    try:
        return patient_folds(pool.labels, pool.patients, n_folds, seed)
    except SplitError as e:
        advice = "use fewer folds or more data" if n_folds > 2 else "more data is needed"
        raise PneumoscanError(f"--folds {n_folds}: {e}; {advice}") from None


def inner_split(
    pool: Split, train_idx: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """The fold model's own (fit_idx, val_idx), carved by patient from its training folds."""
    labels = pool.labels[train_idx]
    patients = [pool.patients[i] for i in train_idx]
    try:
        fit_rel, val_rel = patient_split(labels, patients, val_fraction, seed)
    except SplitError as e:
        raise PneumoscanError(
            f"cannot carve a validation split from a fold's {len(train_idx)} training images "
            f"({e}); use a larger --val-fraction (up to 0.49), fewer folds or more data"
        ) from None
    if len(set(labels[val_rel].tolist())) < 2:  # temperature and threshold need both classes
        raise PneumoscanError(
            f"the validation split carved from {len(train_idx)} training images holds one class "
            "only; use fewer folds, a larger --val-fraction or more data"
        )
    return train_idx[fit_rel], train_idx[val_rel]


def cross_validate(
    cfg: TrainConfig,
    n_folds: int,
    *,
    progress: bool = True,
    after_fold: Callable[[FoldResult], None] | None = None,
) -> dict:
    """Run K-fold cross-validation as ``cfg`` says and leave an ensemble run in ``cfg.out``.

    ``after_fold`` is called with each finished fold (the memory benchmark measures there).
    Returns the contents of cv_metrics.json, plus "test" when the data has a test split.
    """
    out = Path(cfg.out)
    if n_folds < 2:  # before decoding anything
        raise PneumoscanError(f"--folds {n_folds}: cross-validation needs at least 2 folds")
    low_memory_mode(cfg.low_memory)
    data = load_data(cfg.data, cfg.image_size, seed=cfg.seed, progress=progress,
                     validation="pool")
    pool = data.train  # train and any val/, un-carved; the test split is never touched here
    folds = make_folds(pool, n_folds, cfg.seed)
    # Every fold's own validation split, carved before any fold trains (one that cannot be
    # carved then fails the run at once, with nothing written).
    inner = [inner_split(pool, train_idx, cfg.val_fraction, cfg.seed + k)
             for k, (train_idx, _) in enumerate(folds)]
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    atomic_write_json(out / "config.json", run_config(
        {"cv": {"folds": n_folds, "seed": cfg.seed}, **cfg.to_dict()}, device.type))
    _describe(data, n_folds)

    results: list[FoldResult] = []
    for k, (_, held_idx) in enumerate(folds):
        fit_idx, val_idx = inner[k]
        print(f"\n== {fold_name(k)} ({k + 1} of {n_folds}): train on {len(fit_idx)} images, "
              f"validate on {len(val_idx)}, predict {len(held_idx)} held out")
        if thin := few_patients(pool.labels[val_idx], [pool.patients[i] for i in val_idx]):
            print(f"warning: {fold_name(k)}'s validation {thin}", file=sys.stderr)
        result = run_fold(cfg, data, k, inner[k], held_idx, progress=progress)
        results.append(result)
        if after_fold is not None:
            after_fold(result)

    summary, meta = _pool_folds(cfg, data, pool, results)
    if data.test is not None:
        summary["test"] = evaluate_ensemble_on_test(out, meta, data.test, device,
                                                    data.test_overlap)
    save_meta(out, meta)  # last: model.json marks the run finished, its test figures written
    return summary


def run_fold(
    cfg: TrainConfig,
    data: DataBundle,
    k: int,
    inner: tuple[np.ndarray, np.ndarray],
    held_idx: np.ndarray,
    *,
    progress: bool = True,
) -> FoldResult:
    """Train fold ``k`` into OUT/fold-k (a full run dir) and predict its held-out images.

    ``inner`` is the fold's (fit_idx, val_idx): its training folds split by ``inner_split``.
    """
    from pneumoscan.pipeline import finish_run
    from pneumoscan.train import CHECKPOINT, fit, predict_logits

    pool = data.train
    fold_dir = Path(cfg.out) / fold_name(k)
    fold_cfg = dataclasses.replace(cfg, out=str(fold_dir), seed=cfg.seed + k)
    fold_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(fold_dir / "config.json", run_config(
        {"cv": {"fold": k}, **fold_cfg.to_dict()}, resolve_device(cfg.device).type))
    fit_idx, val_idx = inner
    # The fold trains on its rows of the pool (fit_idx), not on a copy of them: with the
    # pool itself that would be two training sets in memory. finish_run() reads val and test only.
    bundle = DataBundle(
        train=pool,
        val=pool.subset(val_idx),
        test=None,  # the ensemble, not each fold, is evaluated on test
        source=data.source,
        notes=[f"cross-validation fold {k}: validation carved by patient from its training folds"],
        fingerprint=data.fingerprint,
        # As train does: class weights from the training folds before validation was carved.
        train_counts=np.bincount(pool.labels[np.concatenate(inner)], minlength=len(CLASS_NAMES)),
    )
    result = fit(fold_cfg, pool, bundle.val, fold_dir, train_rows=fit_idx,
                 class_counts=bundle.train_counts, progress=progress)
    # Before finish_run's model.json, which marks the fold's run finished.
    save_training_images(fold_dir, cfg.image_size, pixel_keys(pool.images, np.concatenate(inner)))
    finish_run(fold_cfg, bundle, result.model, fold_dir, result.history, result.best_epoch)
    # A fold's checkpoint (weights, optimizer state: 134 MB for ResNet-18) serves only to resume
    # an interrupted fit, which cv does not do; the fold's model is in its model.safetensors.
    (fold_dir / CHECKPOINT).unlink(missing_ok=True)
    meta = read_meta(fold_dir)

    held = pool.subset(held_idx)
    device = next(result.model.parameters()).device
    logits = predict_logits(result.model, torch.from_numpy(held.images), fold_cfg, device).numpy()
    prob = probabilities(logits, float(meta["temperature"]))
    metrics = evaluate_predictions(held.labels, prob, float(meta["threshold"]), seed=k,
                                   groups=held.patients, paths=held.paths)

    # Free this fold's copies and tensors before the next fold allocates its own.
    del result, bundle, held, logits
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return FoldResult(k, fold_dir, held_idx, prob, float(meta["threshold"]), metrics)


def _pool_folds(cfg: TrainConfig, data: DataBundle, pool: Split,
                results: list[FoldResult]) -> tuple[dict, dict]:
    """OOF predictions and pooled figures, written; their summary, and the ensemble's model.json
    to write once its test figures are."""
    out = Path(cfg.out)
    n = len(pool)
    prob = np.full(n, np.nan)
    fold_of = np.full(n, -1, dtype=np.int64)
    for r in results:
        prob[r.held_out] = r.prob
        fold_of[r.held_out] = r.fold
    assert (fold_of >= 0).all(), "every image is held out by exactly one fold"

    threshold = choose_threshold(pool.labels, prob, cfg.threshold_rule)
    pooled = evaluate_predictions(pool.labels, prob, threshold, groups=pool.patients,
                                  paths=pool.paths)
    paths = pool.paths  # absolute (dataset.py): stack matches cv runs started from other folders
    save_oof(out / OOF_PREDICTIONS, pool.labels, prob, fold_of, paths, pool.patients)
    # The pooled out-of-fold predictions, in a single run's format: the threshold came from them.
    write_predictions(out / VAL_PREDICTIONS, labels=pool.labels, prob=prob, paths=paths)

    summary = {
        "folds": [
            {"fold": r.fold, "run": fold_name(r.fold), "n": len(r.held_out),
             "threshold": r.threshold, "metrics": r.metrics}
            for r in results
        ],
        "pooled": pooled,
        "threshold": float(threshold),
        "threshold_rule": cfg.threshold_rule,
        "threshold_note": THRESHOLD_NOTE,
        "seed": cfg.seed,
    }
    atomic_write_json(out / CV_METRICS, summary)
    meta = {
        "kind": "ensemble",
        "members": [fold_name(r.fold) for r in results],
        "image_size": cfg.image_size,
        "class_names": list(CLASS_NAMES),
        "threshold": float(threshold),
        "threshold_rule": cfg.threshold_rule,
        "threshold_note": THRESHOLD_NOTE,
        "temperature": 1.0,  # members are calibrated one by one; their mean is not rescaled
        "data_fingerprint": data.fingerprint,
        "data_source": data.source,
        "validation": pooled,
    }
    print("\n" + format_fold_table(summary["folds"]))
    print(f"\npooled out-of-fold ({n} images; threshold {format_threshold(threshold)} by "
          f"{cfg.threshold_rule}, chosen on these predictions):")
    print(format_table(pooled))
    return summary, meta


def evaluate_ensemble_on_test(
    run_dir: Path, meta: dict, test: Split, device: torch.device, overlap: str = ""
) -> dict:
    """The figures on the test split of the ensemble ``meta`` describes (its model.json, not
    yet written); nothing is selected on them."""
    members = [load_predictor(run_dir / name, device) for name in meta["members"]]
    predictor = EnsemblePredictor(run_dir, meta, members)
    prob = predictor.predict_proba(test.images)
    metrics = evaluate_predictions(test.labels, prob, float(meta["threshold"]),
                                   groups=test.patients, paths=test.paths)
    write_predictions(run_dir / TEST_PREDICTIONS, labels=test.labels, prob=prob,
                      paths=test.paths)
    atomic_write_json(run_dir / TEST_METRICS, metrics)
    print("\n" + test_heading(f"test, ensemble of {len(predictor.members)} fold models",
                              overlap))
    print(format_table(metrics))
    return metrics


def save_oof(
    path: Path,
    labels: np.ndarray,
    prob: np.ndarray,
    fold: np.ndarray,
    paths: list[str],
    patients: list[str],
) -> None:
    write_predictions(path, labels=labels, prob=prob, paths=paths, fold=fold,
                      patients=np.array(patients, dtype=str))


def load_oof(run_dir: str | Path) -> dict[str, np.ndarray]:
    """A cv run's OOF predictions; a one-line error when the run has none."""
    path = Path(run_dir) / OOF_PREDICTIONS
    if not path.is_file():
        raise PneumoscanError(
            f"{run_dir}: not a cross-validation run (no {OOF_PREDICTIONS}); "
            "make one with `pneumoscan cv`"
        )
    try:
        with np.load(path, allow_pickle=False) as z:
            oof = {key: z[key] for key in ("labels", "prob", "fold", "paths", "patients")}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise PneumoscanError(f"{path}: unreadable out-of-fold predictions ({e})") from None
    n = len(oof["labels"])
    if any(len(v) != n for v in oof.values()) or not np.isfinite(oof["prob"]).all():
        raise PneumoscanError(f"{path}: inconsistent out-of-fold predictions")
    return oof


def format_fold_table(folds: list[dict]) -> str:
    """One line a fold: n, ROC AUC with its interval, sensitivity, specificity, threshold."""
    lines = [f"{'fold':<6}{'n':>6}  {'roc_auc':>7}  {'95% CI':<15}{'sens':>7}{'spec':>7}"
             f"{'thr':>7}"]
    for f in folds:
        m = f["metrics"]
        ci = (m.get("ci95") or {}).get("roc_auc")
        ci_text = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "n/a"
        lines.append(f"{f['fold']:<6}{f['n']:>6}  {format_figure(m['roc_auc']):>7}  {ci_text:<15}"
                     f"{format_figure(m['sensitivity']):>7}{format_figure(m['specificity']):>7}"
                     f"{format_threshold(f['threshold']):>7}")
    return "\n".join(lines)


def _describe(data: DataBundle, n_folds: int) -> None:
    print(f"data: {data.source}")
    counts = ", ".join(f"{k} {v}" for k, v in data.train.class_counts().items())
    print(f"  cross-validated: {len(data.train)} images ({counts}), "
          f"{len(set(data.train.patients))} patients, {n_folds} folds by patient")
    if data.test is not None:
        print(f"  test: {len(data.test)} images, evaluated once at the end")
    for note in data.notes:
        print(f"  {note}")


