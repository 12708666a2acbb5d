"""pneumoscan explain: Grad-CAM overlays (where the evidence for PNEUMONIA lies) for files.

A first line says which layer the maps come from and how coarse its grid is (with a warning on
stderr when a 1 x 1 grid leaves the maps no location). Every readable file then gets
``OUT/<stem>_gradcam.png`` and a line naming it, with the calibrated probability and label as
``predict`` gives them, even when some files are not readable; the command then exits 2 and names
each failed file and why on stderr, one line each.
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
    from pneumoscan.explain import gradcam_problem
    from pneumoscan.fileio import check_writable_folder
    from pneumoscan.model_io import load_predictor
    from pneumoscan.predict import expand_paths

    check_writable_folder(args.out)  # one line now, not one a file after the work
    predictor = load_predictor(args.run, resolve_device(args.device))
    if problem := gradcam_problem(predictor):  # before any line that promises overlays
        raise PneumoscanError(problem)
    inputs = expand_paths(args.paths)
    failures = [f"{spec}: {reason}" for spec, reason in inputs.missing]
    if inputs.skipped:
        print(f"pneumoscan explain: skipped {inputs.skipped} non-image file(s) in folders",
              file=sys.stderr)
    if not inputs.files and not failures:
        raise PneumoscanError("no image files found in the paths given")
    if inputs.files:
        _say_grid(predictor)
    written = 0
    for line, failure in _explained(predictor, inputs.files, args.out):
        if line:
            print(printable(line))
            written += 1
        if failure:
            failures.append(failure)
    print(f"{written} Grad-CAM overlay(s) -> {args.out}")
    for line in failures:
        print(printable(f"pneumoscan explain: {line}"), file=sys.stderr)
    return 2 if failures else 0


def _say_grid(predictor) -> None:
    """The layer and grid the maps are upsampled from, once, before the files' lines."""
    from pneumoscan.explain import grid_note, grid_warning

    print(grid_note(predictor))
    if warning := grid_warning(predictor):
        print(f"warning: {warning}", file=sys.stderr)


def _explained(predictor, files, out_dir):
    """(line, failure) for each file, in order: the line names its overlay (None when none was
    written), the failure says what went wrong (None when nothing did).

    Predicted as ``predict`` does (its decoding and batches), each batch's overlays written
    before its rows come back, so the probability beside an overlay is the one predict gives.
    """
    from pneumoscan.explain import OverlaysByBatch
    from pneumoscan.predict import iter_predictions

    overlays = OverlaysByBatch(predictor, out_dir)
    for row in iter_predictions(predictor, files, progress=False, on_batch=overlays.write):
        overlay = overlays.take(row.path)
        if overlay is None:  # unreadable: no overlay was attempted
            yield None, f"{row.path}: {row.error}"
        elif overlay.file is None:
            yield None, f"{row.path}: {overlay.error}"
        else:
            yield _overlay_line(row, overlay), (f"{row.path}: {row.error}" if row.error else None)


def _overlay_line(row, overlay) -> str:
    """``PATH  -> OVERLAY`` and what the model says of the file: the probability and label as
    predict gives them, and a word for an all-blue map, which would otherwise look broken."""
    from pneumoscan.explain import NO_EVIDENCE

    line = f"{row.path}  -> {overlay.file}"
    if row.error:  # a probability that is not finite: the failure line says so
        return line
    line += f"  P(PNEUMONIA) {row.probability:.4f} {row.label}"
    return line + (f"; {NO_EVIDENCE} (an all-blue map)" if overlay.blank else "")
