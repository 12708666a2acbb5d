"""pneumoscan cv: patient-grouped K-fold cross-validation, saved as an ensemble run."""

from __future__ import annotations

import argparse

from pneumoscan.commands.train_options import add_train_options, config_from_args, int_at_least


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_train_options(p, with_out=False)
    p.add_argument("--out", required=True,
                   help="output folder: OUT/fold-K runs, out-of-fold predictions, cv_metrics.json; "
                   "OUT itself becomes an ensemble run of the fold models")
    p.add_argument("--folds", type=int_at_least(2), default=5,
                   help="number of folds K (default 5)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or epoch lines")


def run(args: argparse.Namespace) -> int:
    from pneumoscan.cv import cross_validate
    from pneumoscan.run_folder import check_out_folder

    cfg = config_from_args(args)
    check_out_folder(cfg.out)
    cross_validate(cfg, args.folds, progress=not args.quiet)
    print(f"\nensemble run: {cfg.out} (evaluate, predict, report, serve and export take it)")
    return 0
