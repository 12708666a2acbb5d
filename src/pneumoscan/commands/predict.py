"""pneumoscan predict: calibrated P(pneumonia) and a label for files, folders or globs.

Every readable file is predicted even when some are not; the command then exits 2 and names
each failed file and why on stderr, one line each.
"""

from __future__ import annotations

import argparse
import sys

from pneumoscan.commands.train_options import add_device_option, int_at_least
from pneumoscan.console import printable


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run directory (a single model or an ensemble)")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="image or DICOM files, folders (searched recursively) or glob patterns")
    p.add_argument("--output", metavar="FILE",
                   help="write the rows to FILE.csv or FILE.json instead of a table on stdout")
    p.add_argument("--cam", metavar="DIR",
                   help="also write Grad-CAM overlays into DIR; a last column, cam, names each")
    p.add_argument("--batch-size", type=int_at_least(1), default=32,
                   help="files decoded and predicted at once")
    add_device_option(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from pneumoscan.device import resolve_device
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

    if args.output:
        from pneumoscan.run_folder import refuse_own_file

        output_format(args.output)  # refuse a bad extension before any work
        refuse_own_file(args.run, args.output, "--output")
    if args.cam:
        from pneumoscan.fileio import check_writable_folder

        _require_gradcam()
        check_writable_folder(args.cam)  # before the table's header is printed
    predictor = load_predictor(args.run, resolve_device(args.device))
    if args.cam:
        from pneumoscan.explain import OverlaysByBatch, gradcam_problem, grid_warning

        if problem := gradcam_problem(predictor):
            raise PneumoscanError(f"--cam: {problem}")
        if coarse := grid_warning(predictor):
            print(f"warning: --cam: {coarse}", file=sys.stderr)
    inputs = expand_paths(args.paths)
    failures = [f"{spec}: {reason}" for spec, reason in inputs.missing]
    if not inputs.files:
        if not inputs.missing:
            raise PneumoscanError(f"no image files found in {' '.join(args.paths)}")
        # Nothing to predict: an --output file from an earlier call is left as it was.
        for line in failures:
            print(printable(f"pneumoscan predict: {line}"), file=sys.stderr)
        return 2
    if inputs.skipped:
        print(f"pneumoscan predict: skipped {inputs.skipped} non-image file(s) in folders",
              file=sys.stderr)
    cams = OverlaysByBatch(predictor, args.cam) if args.cam else None
    rows = iter_predictions(predictor, inputs.files, batch_size=args.batch_size,
                            progress=not args.quiet,
                            on_batch=None if cams is None else cams.write)

    def noting_failures(rows):
        for row in rows:
            if row.error:
                failures.append(f"{row.path}: {row.error}")
            if cams is not None:
                # on_batch wrote this batch's overlays before yielding its rows.
                overlay = cams.take(row.path)
                row.cam = None if overlay is None or overlay.file is None else str(overlay.file)
                if overlay is not None and overlay.error:
                    failures.append(f"{row.path}: no Grad-CAM overlay ({overlay.error})")
            yield row

    rows = noting_failures(rows)
    if args.output:
        count = write_rows(args.output, rows, cam=cams is not None)
        print(f"{count} prediction(s) -> {args.output}", file=sys.stderr)
    else:
        print(table_header(cam=cams is not None))
        for row in rows:
            tqdm.write(table_line(row), file=sys.stdout)
    if cams is not None and cams.written:
        print(f"Grad-CAM overlays -> {args.cam}", file=sys.stderr)
    for line in failures:
        print(printable(f"pneumoscan predict: {line}"), file=sys.stderr)
    return 2 if failures else 0


def _require_gradcam() -> None:
    """Refuse --cam before predicting anything when Grad-CAM cannot run here."""
    import importlib.util

    from pneumoscan.errors import PneumoscanError

    if importlib.util.find_spec("captum") is None:
        raise PneumoscanError("--cam needs captum: pip install 'pneumoscan[explain]'")
