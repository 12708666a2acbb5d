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
    from pneumoscan.errors import PneumoscanError
    from pneumoscan.evaluate import evaluate_predictions, format_table
    from pneumoscan.fileio import atomic_write_json
    from pneumoscan.model_io import load_predictor
    from pneumoscan.train import resolve_device

    predictor = load_predictor(args.run, resolve_device(args.device))
    threshold = predictor.threshold
    if args.threshold:
        if not args.threshold.startswith("fixed:"):
            raise PneumoscanError(
                "--threshold takes fixed:X here; other rules need validation data"
            )
        threshold = float(args.threshold.split(":", 1)[1])
    data = load_eval_split(args.data, predictor.image_size, progress=not args.quiet)
    if not data.held_out and _same_source(args.data, predictor.meta.get("data_source")):
        print(f"warning: {args.data} is the very data {args.run} was trained on and has no "
              "test/ folder: these figures include its training and validation images and are "
              "optimistic", file=sys.stderr)
    prob = predictor.predict_proba(data.split.images)
    _require_finite(prob, args.run)
    metrics = evaluate_predictions(data.split.labels, prob, threshold,
                                   groups=data.split.patients)
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


def _same_source(spec: str, trained_on: object) -> bool:
    """Whether the folder ``spec`` is the one a run recorded as its training data."""
    from pathlib import Path

    if not isinstance(trained_on, str) or spec.lower().startswith("pneumoniamnist"):
        return False
    return Path(spec).resolve() == Path(trained_on)
