"""pneumoscan demo: the whole path on a small SYNTHETIC data set, in about a minute on a CPU."""

from __future__ import annotations

import argparse
from pathlib import Path

from pneumoscan.commands.train_options import add_device_option, int_at_least
from pneumoscan.errors import PneumoscanError
from pneumoscan.run_folder import RUN_CONTENTS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="folder for the data, run and figures")
    p.add_argument("--epochs", type=int_at_least(1), default=8, help="training epochs")
    add_device_option(p)


def run(args: argparse.Namespace) -> int:
    from pneumoscan.cli import main
    from pneumoscan.data.synthetic import SYNTHETIC_NOTE
    from pneumoscan.device import resolve_device

    resolve_device(args.device)  # "--device cuda" without a GPU: refused before anything changes
    out = Path(args.out)
    data = out / "data"
    if not (data / "SYNTHETIC.txt").exists():
        _write_demo_data(data)
    print(f"== {SYNTHETIC_NOTE}\n== data: {data}")
    run_dir = out / "run"
    _replace_earlier_demo_run(run_dir, data)
    steps = [
        [
            "train",
            "--data",
            str(data),
            "--out",
            str(run_dir),
            "--recipe",
            "cpu",
            "--image-size",
            "64",
            "--epochs",
            str(args.epochs),
            "--batch-size",
            "32",
            "--device",
            args.device,
        ],
        [
            "evaluate",
            str(run_dir),
            "--data",
            str(data),
            "--json",
            str(out / "evaluate.json"),
            "--device",
            args.device,
        ],
        ["eda", "--data", str(data), "--out", str(out / "eda"), "--image-size", "64"],
    ]
    if _ships("report"):
        steps.append(["report", str(run_dir)])
    for argv in steps:
        print(f"\n== pneumoscan {' '.join(argv)}")
        status = main(argv)
        if status:
            return status
    print(f"\n== done: {SYNTHETIC_NOTE}. Next: train on real data (see README).")
    return 0


def _write_demo_data(data: Path) -> None:
    """The synthetic set, into DATA only where nothing else is: never among a user's images.

    Written beside it and renamed into place, so an interrupted demo leaves no half set that
    the next one would take for its own (SYNTHETIC.txt marks a whole one).
    """
    from pneumoscan.data.synthetic import write_synthetic_dataset
    from pneumoscan.fileio import staged_folder

    if data.exists() and (not data.is_dir() or any(data.iterdir())):
        raise PneumoscanError(f"{data}: holds files that are not the demo's synthetic data "
                              "(no SYNTHETIC.txt); give the demo another --out")
    with staged_folder(data) as staging:  # an empty DATA (checked above) is replaced
        write_synthetic_dataset(staging, n_train=240, n_test=80, size=96)


def _replace_earlier_demo_run(run_dir: Path, data: Path) -> None:
    """A second demo trains afresh: the run an earlier demo left on its own data goes first.

    Only a folder holding a run's files alone, trained on the demo's data, is replaced; one
    holding anything else is left for ``train`` to refuse.
    """
    import json
    import shutil

    try:
        earlier = json.loads((run_dir / "config.json").read_text())
        names = {p.name for p in run_dir.iterdir() if not p.name.endswith(".tmp")}
    except (OSError, ValueError):
        return
    on_demo_data = isinstance(earlier, dict) and (
        Path(str(earlier.get("data"))).resolve() == data.resolve())
    if on_demo_data and names <= RUN_CONTENTS:
        shutil.rmtree(run_dir)


def _ships(verb: str) -> bool:
    """Whether this installation has the command (one built without report's extras may not)."""
    import importlib.util

    return importlib.util.find_spec(f"pneumoscan.commands.{verb}") is not None
