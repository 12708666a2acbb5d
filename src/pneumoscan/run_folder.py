"""Where train, cv and stack write: a new run never lands on top of an earlier one.

A run directory's files belong together (the model, its calibration, its test figures, its
report). Writing a second run into the same folder would leave some of the first run's files
beside the second's, or mix them if the second is interrupted, so the folder is checked before
anything is decoded or written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pneumoscan.errors import PneumoscanError

CHECKPOINT = "checkpoint.pt"  # resume state
METRICS = "metrics.jsonl"  # one line an epoch
TEST_METRICS = "test_metrics.json"  # the test split's figures, when the data has one
VAL_PREDICTIONS = "val_predictions.npz"  # labels and probabilities the threshold came from
TEST_PREDICTIONS = "test_predictions.npz"
OOF_PREDICTIONS = "oof_predictions.npz"  # cv's out-of-fold probabilities
CV_METRICS = "cv_metrics.json"
STACK_METRICS = "stack_metrics.json"
SEEDS_SUMMARY = "seeds_summary.json"  # train --seeds, beside its seed-N runs
TRAINING_IMAGES = "training_images.npz"  # digests of the images a run trained on (seen.py)
RUN_FILES = ("model.json", CHECKPOINT, METRICS)  # a run, finished or not
# Everything train writes into a run folder (temporary files aside).
RUN_CONTENTS = frozenset({"config.json", "model.json", "model.safetensors", "plots",
                          "report.html", CHECKPOINT, METRICS, TEST_METRICS, VAL_PREDICTIONS,
                          TEST_PREDICTIONS, TRAINING_IMAGES})
SUB_RUNS = ("seed-*", "fold-*")  # the per-seed runs of train --seeds, the folds of cv
# What cv and stack write besides: the names no command's output may take inside a run.
OWN_FILES = RUN_CONTENTS | {OOF_PREDICTIONS, CV_METRICS, STACK_METRICS, SEEDS_SUMMARY}


def refuse_own_file(run_dir: str | Path, path: str | Path, option: str) -> None:
    """Refuse an output ``path`` that is one of ``run_dir``'s own files (a fold's or member's
    included), or a run's file in any folder that holds a run (the ensemble above a fold,
    another run): the command would succeed and leave a run that no longer loads."""
    target = Path(path).resolve()
    if target.name not in OWN_FILES:
        return
    if target.is_relative_to(Path(run_dir).resolve()):
        raise PneumoscanError(f"{option} {path}: is one of the run's own files; name a new file")
    # A run's folder, or one holding seed or fold runs whose own file (its summary) is there.
    holds_run = any((target.parent / name).is_file() for name in RUN_FILES)
    if holds_run or (target.exists() and earlier_run_file(target.parent) is not None):
        raise PneumoscanError(f"{option} {path}: is a file of the run in {target.parent}; name "
                              "a new file")


def new_run_folder(parent: Path = Path("runs")) -> Path:
    """The first runs/run-N that did not exist, made now: the folder of a run given no --out.

    Made here rather than once the data has loaded, so that two runs started together cannot
    both take it (``mkdir`` fails for the second).
    """
    parent.mkdir(parents=True, exist_ok=True)
    n = 1
    while True:
        try:
            (parent / f"run-{n}").mkdir()
            return parent / f"run-{n}"
        except FileExistsError:
            n += 1


def earlier_run_file(out: Path, names: tuple[str, ...] = RUN_FILES) -> Path | None:
    """A file of ``names`` showing that ``out`` already holds a run, or seed or fold runs (by
    default any run, finished or not; ("model.json",): a finished one); else None."""
    if not out.is_dir():
        return None
    folders = [out] + sorted(p for pattern in SUB_RUNS for p in out.glob(pattern) if p.is_dir())
    for folder in folders:
        for name in names:
            if (folder / name).is_file():
                return folder / name
    return None


def has_checkpoint(out: Path) -> bool:
    """A resume state in ``out`` or in its seed-N folders (train --seeds)."""
    return (out / CHECKPOINT).is_file() or any(out.glob(f"seed-*/{CHECKPOINT}"))


def files_in_the_way(out: Path, runs: list[Path] | None = None,
                     replaceable: frozenset[str] = frozenset()) -> list[str]:
    """The names a run writes that its folder (``out``, or each of ``runs`` under it: the
    seed-N folders of train --seeds) already holds, though it holds no run: someone's own
    files, which a run would replace. A config.json that a run wrote (it names pneumoscan's
    version) only shows a run stopped before its first checkpoint, and is not in the way; nor
    are ``replaceable`` names (what an interrupted stack left)."""
    found = []
    for folder in runs or [out]:
        if not folder.is_dir() or (runs and any((folder / n).is_file() for n in RUN_FILES)):
            continue  # nothing there yet, or a seed's own run (resumed) and its files
        for name in sorted(OWN_FILES - replaceable):
            path = folder / name
            if os.path.lexists(path) and not _written_by_a_run(path):
                found.append(f"{path.relative_to(out)}{'/' if path.is_dir() else ''}")
    return found


def _written_by_a_run(path: Path) -> bool:
    if path.name != "config.json":
        return False
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "pneumoscan" in config


def check_out_folder(out: str | Path, *, resume: bool | None = None,
                     seeds: list[int] | None = None,
                     replaceable: frozenset[str] = frozenset()) -> None:
    """Refuse, in one line, an output folder that cannot take a new run.

    ``resume``: None for commands that cannot resume; False or True for train (resuming
    continues the run that is there, so an earlier run is expected). ``seeds``: train --seeds,
    whose runs go into OUT/seed-N. ``replaceable``: names in ``out`` the run may replace.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PneumoscanError(f"--out {out}: exists and is not a folder")
    found = earlier_run_file(out)
    # A finished run without a checkpoint (a cv or stack output, a deleted checkpoint) has
    # nothing to resume. An interrupted one may have epochs and no checkpoint yet (on a GPU one
    # is written every 30 s): resuming it starts from epoch 1, as fit() says.
    finished = earlier_run_file(out, ("model.json",))
    if resume and finished and not has_checkpoint(out):
        raise PneumoscanError(
            f"--out {out}: holds a finished run ({finished.relative_to(out)}) but no "
            f"{CHECKPOINT} to resume from (a cv or stack output, or a run whose checkpoint was "
            "deleted); choose another --out"
        )
    if not resume and found:
        resumable = resume is False and (found.parent / CHECKPOINT).is_file()
        hint = "continue it with --resume, " if resumable else ""
        raise PneumoscanError(
            f"--out {out}: already holds a run ({found.relative_to(out)}); {hint}"
            "choose another --out, or delete it first"
        )
    if seeds:  # the runs go into OUT/seed-N, each checked, and the summary beside them
        in_the_way = files_in_the_way(out, [out / f"seed-{seed}" for seed in seeds])
        if found is None and os.path.lexists(out / SEEDS_SUMMARY):
            in_the_way.append(SEEDS_SUMMARY)
    else:
        in_the_way = files_in_the_way(out, replaceable=replaceable) if found is None else []
    if in_the_way:
        raise PneumoscanError(
            f"--out {out}: holds {', '.join(in_the_way)}, which a run would replace; choose "
            "another --out, or move them first"
        )
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise PneumoscanError(f"--out {out}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PneumoscanError(f"--out {out}: cannot write there ({existing} is not writable)")
