"""Several seeds of one recipe: how much each figure moves from seed to seed."""

from __future__ import annotations

from pathlib import Path

from pneumoscan.evaluate import summarize_runs
from pneumoscan.fileio import atomic_write_json
from pneumoscan.run_folder import SEEDS_SUMMARY

FIGURES = (
    "accuracy",
    "sensitivity",
    "specificity",
    "precision",
    "npv",
    "roc_auc",
    "pr_auc",
    "f1",
    "loss",
    "brier",
    "ece",
)


def write_seed_summary(out: Path, seeds: list[int], summaries: list[dict]) -> dict:
    """OUT/seeds_summary.json: per split, each figure's mean, std, min and max over seeds."""
    result: dict = {"seeds": seeds}
    for split in ("validation", "test"):
        rows = [
            {k: s[split][k] for k in FIGURES if s.get(split, {}).get(k) is not None}
            for s in summaries
            if split in s
        ]
        if rows:
            result[split] = summarize_runs(rows)
    atomic_write_json(out / SEEDS_SUMMARY, result)
    for split in ("validation", "test"):
        if split in result:
            print(f"{split} over seeds {', '.join(map(str, seeds))}:")
            for k, v in result[split].items():
                print(
                    f"  {k:12s} {v['mean']:.4f} +- {v['std']:.4f}  [{v['min']:.4f}, {v['max']:.4f}]"
                )
    return result
