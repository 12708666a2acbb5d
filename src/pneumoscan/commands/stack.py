"""pneumoscan stack: a logistic-regression stack over cross-validated runs."""

from __future__ import annotations

import argparse

from pneumoscan.commands.train_options import SEED, int_at_least
from pneumoscan.threshold_rules import parse_threshold_rule


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help="output folders of `pneumoscan cv` over the same images")
    p.add_argument("--out", required=True, help="the stacked run directory to write")
    p.add_argument("--folds", type=int_at_least(2), default=5,
                   help="folds of the nested cross-validation that measures the stack (default 5)")
    p.add_argument("--seed", type=SEED, default=0, help="random seed of the nested folds")
    p.add_argument("--threshold-rule", type=parse_threshold_rule,
                   help="youden, sensitivity:0.95 or fixed:0.5 (default: the first run's rule)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pneumoscan.run_folder import check_out_folder
    from pneumoscan.stack import build_stack, unfinished_stack

    check_out_folder(args.out, replaceable=frozenset(unfinished_stack(Path(args.out))))
    build_stack(args.runs, args.out, n_folds=args.folds, seed=args.seed,
                threshold_rule=args.threshold_rule)
    print(f"\nstacked run: {args.out} (evaluate, predict, report, serve and export take it)")
    return 0
