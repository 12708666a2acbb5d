"""Validation and cross-validation folds that keep every patient on one side."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def patient_folds(
    labels: np.ndarray, patients: Sequence[str], n_folds: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train_idx, held_out_idx) per fold: stratified by class, grouped by patient."""
    from sklearn.model_selection import StratifiedGroupKFold

    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    dummy = np.zeros(len(labels))
    return [
        (np.sort(train_idx), np.sort(held_idx))
        for train_idx, held_idx in splitter.split(dummy, labels, groups=list(patients))
    ]


def patient_split(
    labels: np.ndarray, patients: Sequence[str], val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, val_idx) with about ``val_fraction`` of the images, by patient, stratified."""
    if not 0 < val_fraction < 0.5:
        raise ValueError(f"val_fraction must be in (0, 0.5), got {val_fraction}")
    n_folds = max(2, round(1 / val_fraction))
    return patient_folds(labels, patients, n_folds, seed)[0]
