"""pneumoscan compare: two runs on the same images, each at its own threshold; the difference
of every figure with a 95% interval from a paired bootstrap over patients (compare.py)."""

from __future__ import annotations

import argparse
import sys

from pneumoscan.commands.train_options import add_device_option


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_a", metavar="RUN_A", help="the first run (A)")
    p.add_argument("run_b", metavar="RUN_B", help="the second run (B); differences are B - A")
    p.add_argument("--data", help="its test/ split if it has one, otherwise every image in its "
                   "class folders; without --data: the test split of the data RUN_A was "
                   "trained on")
    p.add_argument("--json", metavar="FILE", help="write the comparison as one JSON object")
    add_device_option(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from pneumoscan.commands.evaluate import own_test_data, score
    from pneumoscan.compare import compare_predictions, format_comparison
    from pneumoscan.device import resolve_device
    from pneumoscan.errors import PneumoscanError
    from pneumoscan.fileio import atomic_write_json, check_writable
    from pneumoscan.model_io import load_predictor
    from pneumoscan.run_folder import refuse_own_file

    if args.json:  # what would stop the write is said before the work
        for run in (args.run_a, args.run_b):
            refuse_own_file(run, args.json, "--json")
        check_writable(args.json)
    device = resolve_device(args.device)
    a, b = load_predictor(args.run_a, device), load_predictor(args.run_b, device)
    spec = args.data if args.data is not None else own_test_data(args.run_a, a.meta)
    split_a, prob_a, description = score(args.run_a, a, spec, quiet=args.quiet)
    split_b, prob_b, _ = score(args.run_b, b, spec, quiet=True, warn=False)
    # Each run decodes at its own size: a file readable at one size only is left out of both.
    common = sorted(set(split_a.paths) & set(split_b.paths))
    lost = len(set(split_a.paths) | set(split_b.paths)) - len(common)
    if lost:
        print(f"warning: {lost} file(s) could be read at one run's image size only: left out "
              "of both", file=sys.stderr)
    if not common:
        raise PneumoscanError(f"{spec}: no image both runs could read")
    rows_a = {p: i for i, p in enumerate(split_a.paths)}
    rows_b = {p: i for i, p in enumerate(split_b.paths)}
    take_a = np.array([rows_a[p] for p in common])
    take_b = np.array([rows_b[p] for p in common])
    result = compare_predictions(
        split_a.labels[take_a], prob_a[take_a], a.threshold, prob_b[take_b], b.threshold,
        groups=[split_a.patients[i] for i in take_a])
    print(f"on {description}" + (f", {len(common)} of them read by both" if lost else "") + ":")
    print(format_comparison(result, args.run_a, args.run_b))
    if args.json:
        atomic_write_json(args.json, {"run_a": args.run_a, "run_b": args.run_b, "data": spec,
                                      **result})
    return 0
