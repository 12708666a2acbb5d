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
            # Brackets elsewhere hold 95% intervals: the header says these hold the range.
            print(f"{split} over seeds {', '.join(map(str, seeds))}: "
                  "mean +- standard deviation [lowest, highest]")
            for k, v in result[split].items():
                print(f"  {k:12s} {v['mean']:.3f} +- {v['std']:.3f}  "
                      f"[{v['min']:.3f}, {v['max']:.3f}]")
    return result
