"""pneumoscan evaluate: a run's figures on a data set, at the run's stored threshold."""

from __future__ import annotations

import argparse
import math
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run directory")
    p.add_argument(
        "--data",
        default="pneumoniamnist",
        help="its test/ split if it has one, otherwise every image in its class folders",
    )
    p.add_argument("--json", metavar="FILE", help="write the figures as one JSON object")
    p.add_argument(
        "--threshold",
        type=fixed_threshold,
        metavar="X",
        help="a probability X (or fixed:X) instead of the run's stored threshold, which was "
        "chosen on validation data",
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--quiet", action="store_true")


def run(args: argparse.Namespace) -> int:
    from pneumoscan.data.dataset import load_eval_split
    from pneumoscan.device import resolve_device
    from pneumoscan.evaluate import evaluate_predictions, format_table
    from pneumoscan.fileio import atomic_write_json
    from pneumoscan.model_io import load_predictor

    predictor = load_predictor(args.run, resolve_device(args.device))
    threshold = predictor.threshold if args.threshold is None else args.threshold
    data = load_eval_split(args.data, predictor.image_size, progress=not args.quiet)
    if _trained_on(args.data, data.held_out, predictor.meta.get("data_source")):
        print(f"warning: {args.data} holds the images {args.run} was trained and validated on: "
              "these figures are optimistic", file=sys.stderr)
    prob = predictor.predict_proba(data.split.images)
    _require_finite(prob, args.run)
    metrics = evaluate_predictions(data.split.labels, prob, threshold,
                                   groups=data.split.patients, paths=data.split.paths)
    print(f"{args.run} on {data.description}:")
    print(format_table(metrics))
    if args.json:
        atomic_write_json(args.json, metrics)
    return 0


def fixed_threshold(text: str) -> float:
    """--threshold X or fixed:X: a probability. Rules such as youden choose a threshold on
    validation data, which evaluate does not have: they are set when training."""
    try:
        value = float(text.removeprefix("fixed:"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give a probability X or fixed:X (rules such as youden or "
            "sensitivity:X choose a threshold on validation data: give them to train)"
        ) from None
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise argparse.ArgumentTypeError(f"{text!r}: a threshold is a probability, 0 to 1")
    return value


def _require_finite(prob, run: str) -> None:
    """One line instead of a traceback from the metrics when the model's output is NaN or inf
    (finite weights can still overflow)."""
    import numpy as np

    from pneumoscan.errors import PneumoscanError

    bad = int(np.count_nonzero(~np.isfinite(prob)))
    if bad:
        raise PneumoscanError(
            f"{run}: the model's probability is not finite (NaN or infinity) for {bad} of "
            f"{len(prob)} images; its weights or its model.json are damaged"
        )


def _trained_on(spec: str, held_out: bool, trained_on: object) -> bool:
    """Whether evaluating ``spec`` means scoring the run's own training images: its training
    folder when that has no test/ (then every image is evaluated), or its train/ or val/."""
    from pathlib import Path

    if not isinstance(trained_on, str) or spec.lower().startswith("pneumoniamnist"):
        return False
    folder, source = Path(spec).resolve(), Path(trained_on)
    if folder == source:
        return not held_out  # with a test/, only that is evaluated: held out
    inside = source in folder.parents
    return inside and folder.relative_to(source).parts[0].lower() in ("train", "val")
