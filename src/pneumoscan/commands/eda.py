"""pneumoscan eda: a data set's balance, sizes, intensities and a sample grid."""

from __future__ import annotations

import argparse
from pathlib import Path

from pneumoscan.commands.train_options import IMAGE_SIZE


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="pneumoniamnist", help="folder or pneumoniamnist[:SIZE]")
    p.add_argument("--out", required=True, help="folder for the PNGs, eda.json and eda.txt")
    p.add_argument("--image-size", type=IMAGE_SIZE, default=224,
                   help="decoding size for the statistics")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from pneumoscan.data.dataset import load_data
    from pneumoscan.eda import run_eda
    from pneumoscan.fileio import check_writable_folder

    check_writable_folder(args.out)  # before the decoding, not after it
    data = load_data(args.data, args.image_size, progress=not args.quiet,
                     validation="as_given")
    note = "SYNTHETIC" if (Path(args.data) / "SYNTHETIC.txt").exists() else ""
    run_eda(data, Path(args.out), title_note=note)
    return 0
