"""pneumoscan explain: Grad-CAM overlays (where the evidence for PNEUMONIA lies) for files.

Every readable file gets ``OUT/<stem>_gradcam.png`` (a line says which) even when some are not;
the command then exits 2 and names each failed file and why on stderr, one line each.
"""

from __future__ import annotations

import argparse
import sys

from pneumoscan.commands.train_options import add_device_option
from pneumoscan.console import printable


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run directory (a single model or an ensemble)")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="image or DICOM files, folders (searched recursively) or glob patterns")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the overlay PNGs")
    add_device_option(p)


def run(args: argparse.Namespace) -> int:
    from pneumoscan.device import resolve_device
    from pneumoscan.errors import PneumoscanError
    from pneumoscan.explain import write_overlays
    from pneumoscan.model_io import load_predictor
    from pneumoscan.predict import expand_paths

    predictor = load_predictor(args.run, resolve_device(args.device))
    inputs = expand_paths(args.paths)
    failures = [f"{spec}: {reason}" for spec, reason in inputs.missing]
    if inputs.skipped:
        print(f"pneumoscan explain: skipped {inputs.skipped} non-image file(s) in folders",
              file=sys.stderr)
    if not inputs.files and not failures:
        raise PneumoscanError("no image files found in the paths given")
    results = write_overlays(predictor, inputs.files, args.out)
    failures += [f"{r.path}: {r.error}" for r in results if r.error is not None]
    for r in results:  # which overlay is whose: names may be numbered
        if r.file is not None:
            print(printable(f"{r.path}  -> {r.file}"))
    written = sum(r.error is None for r in results)
    print(f"{written} Grad-CAM overlay(s) -> {args.out}")
    for line in failures:
        print(printable(f"pneumoscan explain: {line}"), file=sys.stderr)
    return 2 if failures else 0
