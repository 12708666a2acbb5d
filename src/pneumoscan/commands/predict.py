"""pneumoscan predict: calibrated P(pneumonia) and a label for files, folders or globs.

Every readable file is predicted even when some are not; the command then exits 2 and names
each failed file and why on stderr, one line each.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run directory (a single model or an ensemble)")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="image or DICOM files, folders (searched recursively) or glob patterns")
    p.add_argument("--output", metavar="FILE",
                   help="write the rows to FILE.csv or FILE.json instead of a table on stdout")
    p.add_argument("--cam", metavar="DIR", help="also write Grad-CAM overlays into DIR")
    p.add_argument("--batch-size", type=int, default=32, help="files decoded and predicted at once")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from pneumoscan.errors import PneumoscanError
    from pneumoscan.model_io import load_predictor
    from pneumoscan.predict import (
        expand_paths,
        iter_predictions,
        output_format,
        table_header,
        table_line,
        write_rows,
    )
    from pneumoscan.train import resolve_device

    if args.output:
        output_format(args.output)  # refuse a bad extension before any work
    if args.batch_size < 1:
        raise PneumoscanError(f"--batch-size must be positive, got {args.batch_size}")
    if args.cam:
        _require_gradcam()
    predictor = load_predictor(args.run, resolve_device(args.device))
    inputs = expand_paths(args.paths)
    if not inputs.files and not inputs.missing:
        raise PneumoscanError(f"no image files found in {' '.join(args.paths)}")
    failures = [f"{spec}: {reason}" for spec, reason in inputs.missing]
    if inputs.skipped:
        print(f"pneumoscan predict: skipped {inputs.skipped} non-image file(s) in folders",
              file=sys.stderr)
    cam_paths: list[Path] = []  # predicted files, for the overlays written after predicting
    rows = iter_predictions(predictor, inputs.files, batch_size=args.batch_size,
                            progress=not args.quiet,
                            on_batch=cam_paths.extend if args.cam else None)

    def noting_failures(rows):
        for row in rows:
            if row.error:
                failures.append(f"{row.path}: {row.error}")
            yield row

    rows = noting_failures(rows)
    if args.output:
        count = write_rows(args.output, rows)
        print(f"{count} prediction(s) -> {args.output}", file=sys.stderr)
    else:
        print(table_header())
        for row in rows:
            tqdm.write(table_line(row), file=sys.stdout)
    if args.cam and cam_paths:
        _write_overlays(predictor, cam_paths, Path(args.cam), failures)
    for line in failures:
        print(f"pneumoscan predict: {line}", file=sys.stderr)
    return 2 if failures else 0


def _require_gradcam() -> None:
    """Refuse --cam before predicting anything when Grad-CAM cannot run here."""
    import importlib.util

    from pneumoscan.errors import PneumoscanError

    if importlib.util.find_spec("captum") is None:
        raise PneumoscanError("--cam needs captum: pip install 'pneumoscan[explain]'")


def _write_overlays(predictor, paths: list[Path], out_dir: Path, failures: list[str]) -> None:
    from pneumoscan.explain import write_overlays

    # One call for all files: it batches internally and keeps overlay names unique.
    for path, error in write_overlays(predictor, paths, out_dir):
        if error:
            failures.append(f"{path}: no Grad-CAM overlay ({error})")
    print(f"Grad-CAM overlays -> {out_dir}", file=sys.stderr)
