"""Files -> calibrated predictions, in bounded memory: one row per file, errors included.

Paths may be files, folders (walked recursively, hidden entries skipped, symlinked folders not
followed so a link loop cannot recurse) or glob patterns. Files are decoded and predicted a batch
at a time, and rows are yielded as each batch finishes, so thousands of files cost the memory of
one batch. An unreadable file gives a row with ``error`` set; every other file is still predicted.
"""

from __future__ import annotations

import csv
import glob
import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

import numpy as np

from pneumoscan import CLASS_NAMES
from pneumoscan.console import printable
from pneumoscan.data.decode import IMAGE_SUFFIXES, looks_like_image
from pneumoscan.data.discover import walk_files
from pneumoscan.errors import PneumoscanError, UnreadableImage
from pneumoscan.fileio import atomic_write
from pneumoscan.progress import progress_bar

FIELDS = ("path", "probability", "label", "threshold", "error")
# With --cam only, after FIELDS so that readers of the documented columns are unaffected: the
# overlay written for the row, since numbered names (x-2_gradcam.png) do not say which file.
CAM_FIELD = "cam"
_GLOB_CHARS = frozenset("*?[")
NOT_FINITE = "the model's probability is not finite (NaN or infinity)"
_DECODE_THREADS = 4  # Pillow and pydicom release the GIL while decoding


@dataclass
class Row:
    path: str
    probability: float | None  # calibrated P(PNEUMONIA); None when the file could not be read
    label: str  # PNEUMONIA if probability >= threshold, else NORMAL; "" on error
    threshold: float
    error: str  # "" when the prediction worked, otherwise why the file could not be read
    cam: str | None = None  # the Grad-CAM overlay written for it (predict --cam), else None

    def as_dict(self, fields: Sequence[str] = FIELDS) -> dict:
        record = asdict(self)
        return {name: record[name] for name in fields}


@dataclass
class Inputs:
    files: list[Path]  # in the order given, duplicates removed
    missing: list[tuple[str, str]]  # (argument, reason) for paths and globs that found nothing
    skipped: int  # files inside folders that are not images (README.txt and the like)


def label_for(probability: float, threshold: float) -> str:
    return CLASS_NAMES[1] if probability >= threshold else CLASS_NAMES[0]


def expand_paths(specs: Sequence[str | Path]) -> Inputs:
    """Files named by ``specs``: files as given, folders walked, globs expanded."""
    files: dict[str, Path] = {}  # real path -> first name given: one row per file
    missing: list[tuple[str, str]] = []
    skipped = 0
    for spec in specs:
        text = os.fspath(spec)
        if os.path.lexists(text):
            targets = [text]
        elif _GLOB_CHARS & set(text):
            targets = _glob(text)
            if not targets:
                missing.append((text, "no files match this pattern"))
                continue
        else:
            missing.append((text, "no such file or folder"))
            continue
        walked: list[Path] = []  # this argument's folders: 'dir/**' is the folder walked once
        for target in targets:
            if any(Path(target).is_relative_to(done) for done in walked):
                continue  # a file or folder the walk of a folder above it has taken or skipped
            if os.path.isdir(target):
                walked.append(Path(target))
                found, n_skipped = _walk_folder(Path(target))
                skipped += n_skipped
                for path in found:
                    files.setdefault(os.path.realpath(path), path)
            else:
                # Named explicitly (or by a glob): always tried, so a bad one is reported.
                files.setdefault(os.path.realpath(target), Path(target))
    return Inputs(list(files.values()), missing, skipped)


def _glob(pattern: str) -> list[str]:
    """The pattern's matches, sorted; with ``**``, none reached through a folder symlink.

    glob's ``**`` follows folder symlinks, and one that points back to a parent repeats the
    tree until the path is too long; bash's ``**`` does not follow them either. (A walked
    folder follows them, each real folder once: ``discover.walk_files``.) A plain ``*`` passes
    through one, as a shell's does (it cannot loop). The pattern's fixed part, before its first
    wildcard, is taken as given.
    """
    matches = sorted(glob.glob(pattern, recursive=True))
    parts = Path(pattern).parts
    if "**" not in parts:
        return matches
    fixed = next((i for i, part in enumerate(parts) if _GLOB_CHARS & set(part)), 0)
    kept = []
    for match in matches:
        found = Path(match).parts
        below = (Path(*found[: i + 1]) for i in range(fixed, len(found)))
        if not any(p.is_symlink() and p.is_dir() for p in below):
            kept.append(match)
    return kept


def _walk_folder(root: Path) -> tuple[list[Path], int]:
    found, skipped = [], 0
    for path in walk_files(root):
        if path.suffix.lower() in IMAGE_SUFFIXES or looks_like_image(path):
            found.append(path)
        else:
            skipped += 1
    return found, skipped


def iter_predictions(
    predictor,
    paths: Sequence[Path],
    *,
    batch_size: int = 32,
    progress: bool = True,
    on_batch=None,
) -> Iterator[Row]:
    """Rows in the order of ``paths``, predicted ``batch_size`` files at a time.

    ``on_batch(decoded_paths)`` is called after each batch with the files that were predicted,
    before their rows are yielded (used to write Grad-CAM overlays without holding every image).
    The progress bar is drawn only when stderr is a terminal: redirected, it would fill the file
    with carriage-return lines between the one-line-per-failed-file messages.
    """
    if batch_size < 1:
        raise PneumoscanError(f"--batch-size must be positive, got {batch_size}")
    from pneumoscan.model_io import stack_inputs

    threshold = float(predictor.threshold)
    bar = progress_bar(len(paths), "predict", "img", enabled=progress)
    with bar, ThreadPoolExecutor(_DECODE_THREADS) as pool:
        for start in range(0, len(paths), batch_size):
            batch = list(paths[start : start + batch_size])
            decoded = list(pool.map(lambda p: _decode(p, predictor), batch))
            good = [i for i, d in enumerate(decoded) if not isinstance(d, str)]
            prob = np.zeros(0)
            if good:
                prob = predictor.predict_proba(stack_inputs([decoded[i] for i in good]))
            by_index = dict(zip(good, prob, strict=True))
            if on_batch is not None and good:
                on_batch([batch[i] for i in good])
            for i, path in enumerate(batch):
                if i in by_index and math.isfinite(by_index[i]):
                    p = float(by_index[i])
                    yield Row(str(path), p, label_for(p, threshold), threshold, "")
                elif i in by_index:
                    # NaN would print as NORMAL and make the JSON output invalid: report it.
                    yield Row(str(path), None, "", threshold, NOT_FINITE)
                else:
                    yield Row(str(path), None, "", threshold, decoded[i])
            bar.update(len(batch))


def _decode(path: Path, predictor):
    """The file as ``predictor`` takes it (model_io.read_inputs), or why it cannot be read."""
    from pneumoscan.model_io import read_inputs

    try:
        return read_inputs(predictor, path)
    except UnreadableImage as e:
        return e.reason


def predict_files(predictor, paths: Sequence[Path], *, batch_size: int = 32) -> list[Row]:
    """Every row at once: for library callers with a modest number of files."""
    return list(iter_predictions(predictor, paths, batch_size=batch_size, progress=False))


# --- output ------------------------------------------------------------------------------------


def output_format(path: str | Path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in (".csv", ".json"):
        raise PneumoscanError(f"--output {path}: name a .csv or .json file")
    return suffix[1:]


def write_rows(path: str | Path, rows: Iterable[Row], *, cam: bool = False) -> int:
    """Stream rows into a CSV or JSON file (by extension), atomically. Returns the row count.

    ``cam``: add the ``cam`` column (each row's overlay file) after the documented ones.
    """
    fmt = output_format(path)
    fields = (*FIELDS, CAM_FIELD) if cam else FIELDS
    count = 0

    def write(tmp: Path) -> None:
        nonlocal count
        # surrogateescape: a file name that is not UTF-8 (R\xf6ntgen.jpeg in Latin-1) arrives
        # from os.fsdecode with lone surrogates; the CSV gets its original bytes back. JSON
        # escapes them itself (json.loads and os.fsencode give the bytes back).
        with open(tmp, "w", encoding="utf-8", errors="surrogateescape", newline="") as f:
            count = (_write_csv if fmt == "csv" else _write_json)(f, rows, fields)

    atomic_write(path, write)
    return count


def _write_csv(f: IO[str], rows: Iterable[Row], fields: Sequence[str]) -> int:
    writer = csv.DictWriter(f, fieldnames=fields)
    writer.writeheader()
    count = 0
    for row in rows:
        record = row.as_dict(fields)
        # Full precision, so the label can be re-derived from the file exactly.
        record["probability"] = "" if row.probability is None else repr(row.probability)
        for field in ("path", "cam"):
            if record.get(field):
                record[field] = spreadsheet_safe(record[field])
        writer.writerow(record)
        count += 1
    return count


def spreadsheet_safe(path: str) -> str:
    """``path``, led by ./ when a spreadsheet would read it as a formula (=, +, -, @, tab, CR).

    A CSV of results is often opened in Excel or LibreOffice, where a file named
    ``=HYPERLINK(...).png`` shows as a live link instead of its name. ./ names the same file
    for every program that opens it, where the usual leading apostrophe would not. Absolute
    paths never start so.
    """
    return os.path.join(os.curdir, path) if path.startswith(_FORMULA_STARTS) else path


_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _write_json(f: IO[str], rows: Iterable[Row], fields: Sequence[str]) -> int:
    # Written one object at a time, so the file is a JSON list without the list in memory.
    f.write("[")
    count = 0
    for row in rows:
        f.write(",\n  " if count else "\n  ")
        f.write(json.dumps(row.as_dict(fields)))
        count += 1
    f.write("\n]\n" if count else "]\n")
    return count


def table_header(cam: bool = False) -> str:
    return f"{'probability':>11}  {'label':<9}  path" + ("  -> Grad-CAM overlay" if cam else "")


def table_line(row: Row) -> str:
    if row.error:
        line = f"{'-':>11}  {'ERROR':<9}  {row.path}  ({row.error})"
    else:
        overlay = f"  -> {row.cam}" if row.cam else ""
        line = f"{row.probability:>11.4f}  {row.label:<9}  {row.path}{overlay}"
    return printable(line)
