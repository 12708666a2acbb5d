"""Validation and cross-validation folds that keep every patient on one side."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from pneumoscan import CLASS_NAMES


class SplitError(ValueError):
    """Folds that these images cannot make; the message says why, in a user's words."""


def check_folds(labels: np.ndarray, patients: Sequence[str], n_folds: int) -> None:
    """Raise SplitError unless ``n_folds`` stratified folds by patient can be made.

    Every fold holds out at least one patient, and a patient goes to one fold whole, so each
    class needs as many patients as there are folds to be in every fold.
    """
    n_patients = len(set(patients))
    if n_patients < n_folds:
        raise SplitError(f"{n_folds} folds by patient need at least {n_folds} patients; "
                         f"these images come from {n_patients}")
    labels = np.asarray(labels, dtype=np.int64)
    by_class = [(len({p for p, y in zip(patients, labels, strict=True) if y == c}), name)
                for c, name in enumerate(CLASS_NAMES)]
    fewest, name = min(((n, name) for n, name in by_class if n > 0), default=(n_folds, ""))
    if fewest < n_folds:
        raise SplitError(f"{n_folds} stratified folds by patient need at least {n_folds} "
                         f"patients of each class; {name} images come from {fewest}")


def patient_folds(
    labels: np.ndarray, patients: Sequence[str], n_folds: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train_idx, held_out_idx) per fold: stratified by class, grouped by patient."""
    from sklearn.model_selection import StratifiedGroupKFold

    check_folds(labels, patients, n_folds)
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    dummy = np.zeros(len(labels))
    return [
        (np.sort(train_idx), np.sort(held_idx))
        for train_idx, held_idx in splitter.split(dummy, labels, groups=list(patients))
    ]


def validation_folds(val_fraction: float) -> int:
    """K such that one of K stratified folds of whole patients is nearest ``val_fraction``."""
    if not 0 < val_fraction < 0.5:
        raise ValueError(f"val_fraction must be in (0, 0.5), got {val_fraction}")
    candidates = {max(2, math.floor(1 / val_fraction)), max(2, math.ceil(1 / val_fraction))}
    return min(sorted(candidates), key=lambda k: abs(1 / k - val_fraction))


def patient_split(
    labels: np.ndarray, patients: Sequence[str], val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, val_idx) with about ``val_fraction`` of the images, by patient, stratified.

    The split is the first of :func:`validation_folds` folds, so it needs that many patients of
    each class (SplitError otherwise).
    """
    n_folds = validation_folds(val_fraction)
    try:
        return patient_folds(labels, patients, n_folds, seed)[0]
    except SplitError as e:
        raise SplitError(f"a {val_fraction:.0%} validation split is one of {n_folds} such folds: "
                         f"{e}") from None
