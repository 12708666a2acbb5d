"""pneumoscan evaluate: a run's figures on a data set, at the run's stored threshold."""

from __future__ import annotations

import argparse
import sys

from pneumoscan.threshold_rules import parse_threshold_rule


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
        type=parse_threshold_rule,
        metavar="RULE",
        help="fixed:X overrides the run's stored threshold (chosen on validation)",
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--quiet", action="store_true")


def run(args: argparse.Namespace) -> int:
    from pneumoscan.data.dataset import load_eval_split
    from pneumoscan.device import resolve_device
    from pneumoscan.errors import PneumoscanError
    from pneumoscan.evaluate import evaluate_predictions, format_table
    from pneumoscan.fileio import atomic_write_json
    from pneumoscan.model_io import load_predictor

    predictor = load_predictor(args.run, resolve_device(args.device))
    threshold = predictor.threshold
    if args.threshold:
        if not args.threshold.startswith("fixed:"):
            raise PneumoscanError(
                "--threshold takes fixed:X here; other rules need validation data"
            )
        threshold = float(args.threshold.split(":", 1)[1])
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
