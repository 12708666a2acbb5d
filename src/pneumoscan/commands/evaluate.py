"""pneumoscan evaluate: a run's figures on a data set, at the run's stored threshold."""

from __future__ import annotations

import argparse
import math
import sys

from pneumoscan.commands.train_options import add_device_option


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run directory")
    p.add_argument(
        "--data",
        help="its test/ split if it has one, otherwise every image in its class folders; "
        "without --data: the test split of the data the run was trained on",
    )
    p.add_argument("--json", metavar="FILE", help="write the figures as one JSON object")
    p.add_argument(
        "--threshold",
        type=fixed_threshold,
        metavar="X",
        help="a probability X (or fixed:X) instead of the run's stored threshold, which was "
        "chosen on validation data",
    )
    add_device_option(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from pneumoscan.fileio import atomic_write_json, check_writable
    from pneumoscan.run_folder import refuse_own_file

    if args.json:  # what would stop the write is said before the work
        refuse_own_file(args.run, args.json, "--json")
        check_writable(args.json)
    metrics = _evaluate(args)
    if args.json:
        atomic_write_json(args.json, metrics)
    return 0


def _evaluate(args: argparse.Namespace) -> dict:
    """Score the run on the data, print the figures and return them."""
    from pneumoscan.device import resolve_device
    from pneumoscan.evaluate import evaluate_predictions, format_table
    from pneumoscan.model_io import load_predictor

    predictor = load_predictor(args.run, resolve_device(args.device))
    threshold = predictor.threshold if args.threshold is None else args.threshold
    spec = args.data if args.data is not None else own_test_data(args.run, predictor.meta)
    split, prob, description = score(args.run, predictor, spec, quiet=args.quiet)
    metrics = evaluate_predictions(split.labels, prob, threshold,
                                   groups=split.patients, paths=split.paths)
    print(f"{args.run} on {description}:")
    print(format_table(metrics))
    return metrics


def score(run: str, predictor, spec: str, *, quiet: bool = False, warn: bool = True):
    """(split, calibrated probabilities, description) of ``predictor`` on ``spec``'s images,
    each decoded at the run's size; a warning where they include images it trained on
    (``warn=False``: the unreadable files left unsaid, said already for another run)."""
    from pneumoscan.data.dataset import load_eval_split
    from pneumoscan.model_io import input_sizes
    from pneumoscan.seen import count_seen

    sizes = input_sizes(predictor)
    data = load_eval_split(spec, sizes[0], progress=not quiet, warn=warn)
    split, images = _at_every_size(data.split, sizes, lambda size: load_eval_split(
        spec, size, progress=not quiet, warn=False).split)
    seen = count_seen(predictor, images)
    if seen:
        print(f"warning: {seen} of {len(split)} images are images {run} was trained or "
              "validated on (the same pixels once decoded, whatever the files are called): "
              "these figures are optimistic", file=sys.stderr)
    elif _trained_on(spec, data.held_out, predictor.meta.get("data_source")):
        # A run made before runs kept their images' digests, or pixels a newer decoder moved:
        # its training folder is still known by its path.
        print(f"warning: {spec} holds the images {run} was trained and validated on: "
              "these figures are optimistic", file=sys.stderr)
    prob = predictor.predict_proba(images)
    _require_finite(prob, run)
    return split, prob, data.description


def _at_every_size(split, sizes: tuple[int, ...], load):
    """``split`` (decoded at ``sizes[0]``) and the predictor's images: its array, or for a stack
    of members of several sizes ``{size: images}``, each size decoded on its own by
    ``load(size)``. A file readable at some sizes only (a faint image blank once reduced) is
    left out of all, and said."""
    import numpy as np

    if len(sizes) == 1:
        return split, split.images
    others = {size: load(size) for size in sizes[1:]}
    common = set(split.paths).intersection(*(set(o.paths) for o in others.values()))

    def kept(s):
        return s.subset(np.array([i for i, p in enumerate(s.paths) if p in common], np.int64))

    lost = len(set(split.paths).union(*(set(o.paths) for o in others.values())) - common)
    if lost:
        print(f"warning: {lost} file(s) could be read at some of the members' image sizes only: "
              "left out", file=sys.stderr)
    split = kept(split)
    return split, {sizes[0]: split.images, **{size: kept(o).images for size, o in others.items()}}


def own_test_data(run: str, meta: dict) -> str:
    """The data ``run`` was trained on, for an evaluate without --data: its test split (never
    used to select anything) is what gets scored. Refused where there is none to score; a
    warning where files were added, removed or resized since the run trained."""
    from pathlib import Path

    from pneumoscan.data import medmnist
    from pneumoscan.data.dataset import data_changed, files_fingerprint
    from pneumoscan.data.discover import discover
    from pneumoscan.errors import PneumoscanError

    source = meta.get("data_source")
    medmnist_spec = medmnist.spec_of(source)
    if medmnist_spec:
        return medmnist_spec  # the file of the size it trained on
    if not isinstance(source, str) or not source or not Path(source).is_dir():
        raise PneumoscanError(f"{run}: no --data given, and the data it was trained on "
                              f"({source or 'not recorded'}) is not there; give --data DIR")
    found = discover(source, need_train=False)
    if not found.get("test"):  # none, or an empty folder
        raise PneumoscanError(f"{run}: no --data given, and the data it was trained on "
                              f"({source}) has no test/ split to score; give --data DIR")
    everything = [sample for samples in found.values() for sample in samples]
    if data_changed(meta.get("data_fingerprint"), files_fingerprint(Path(source), everything)):
        print(f"warning: files in {source} were added, removed or resized since {run} was "
              "trained: its test split may not be the one held out then", file=sys.stderr)
    return source


def fixed_threshold(text: str) -> float:
    """--threshold X or fixed:X: a probability. Rules such as youden choose a threshold on
    validation data, which evaluate does not have: they are set when training."""
    try:
        value = float(text.strip().lower().removeprefix("fixed:"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give a probability X or fixed:X (rules such as youden or "
            "sensitivity:X choose a threshold on validation data: give them to train)"
        ) from None
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise argparse.ArgumentTypeError(f"{text!r}: a threshold is a probability, 0 to 1")
    return value


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
    import os
    from pathlib import Path

    from pneumoscan.data.dataset import is_medmnist

    if not isinstance(trained_on, str) or is_medmnist(spec):
        return False
    folder, source = Path(spec).resolve(), Path(trained_on)

    def same(here: Path) -> bool:
        # The file system decides: another case on macOS, another mount of the same folder.
        try:
            return os.path.samefile(here, source)
        except OSError:  # one of them is gone
            return here == source

    for depth, here in enumerate((folder, *folder.parents)):
        if same(here):
            if depth == 0:
                return not held_out  # with a test/, only that is evaluated: held out
            return folder.relative_to(here).parts[0].lower() in ("train", "val")
    return False
