"""A first look at a data set: counts and balance per split, sizes, intensities, samples."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from pneumoscan import CLASS_NAMES
from pneumoscan.data.dataset import DataBundle
from pneumoscan.fileio import atomic_write_json, atomic_write_text

SAMPLES_PER_CLASS = 5


def original_size(path: str) -> tuple[int, int] | None:
    """(width, height) from the file header, without decoding pixels."""
    from PIL import ExifTags, Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            # As decoding turns it upright: orientations 5 to 8 swap width and height. (A PNG
            # whose EXIF is not in its header would be decoded whole to find it: not for a size.)
            turned = (im.format != "PNG" or "exif" in im.info) and im.getexif().get(
                ExifTags.Base.Orientation, 1) in (5, 6, 7, 8)
            return im.size[::-1] if turned else im.size
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
        pass
    try:
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True)
        return int(ds.Columns), int(ds.Rows)
    except Exception:  # not DICOM either: the size is simply unknown
        return None


def summarize(data: DataBundle) -> dict:
    """Counts, balance, original sizes and intensity statistics, per split and class."""
    summary: dict = {
        "source": data.source,
        "notes": data.notes,
        "skipped": len(data.skipped),
        "decoded_size": int(data.train.images.shape[-1]),  # where mean and std were taken
        "splits": {},
    }
    for name, split in data.splits().items():
        entry: dict = {"n": len(split), "classes": {}}
        for label, cls in enumerate(CLASS_NAMES):
            idx = np.flatnonzero(split.labels == label)
            # Patients, not images, are what validation, folds and intervals draw: files whose
            # names carry no patient id count as one patient each.
            stats: dict = {"n": int(len(idx)),
                           "patients": len({split.patients[i] for i in idx})}
            if len(idx):
                mean, std = _intensity(split.images, idx)
                stats["intensity_mean"] = round(mean, 2)
                stats["intensity_std"] = round(std, 2)
            sizes = [s for s in (original_size(split.paths[i]) for i in idx) if s]
            if sizes:
                w, h = np.array(sizes).T
                stats["width"] = {
                    "min": int(w.min()),
                    "median": int(np.median(w)),
                    "max": int(w.max()),
                }
                stats["height"] = {
                    "min": int(h.min()),
                    "median": int(np.median(h)),
                    "max": int(h.max()),
                }
            entry["classes"][cls] = stats
        summary["splits"][name] = entry
    return summary


def _intensity(images: np.ndarray, idx: np.ndarray, chunk: int = 64) -> tuple[float, float]:
    """The mean of the images' mean grey levels, and the standard deviation of all their
    pixels: a chunk of images at a time, as a float64 copy of a whole class at 224 px would
    take 1.5 GB."""
    means, total, total_sq, count = [], 0.0, 0.0, 0
    for start in range(0, len(idx), chunk):
        rows = idx[start : start + chunk]
        block = images[rows].reshape(len(rows), -1).astype(np.float64)
        means.append(block.mean(axis=1))
        total += float(block.sum())
        total_sq += float(np.einsum("ij,ij->", block, block))
        count += block.size
    pixel_mean = total / count
    return float(np.concatenate(means).mean()), max(total_sq / count - pixel_mean**2, 0.0) ** 0.5


def format_summary(summary: dict) -> str:
    lines = [f"data: {summary['source']}", *[f"  {n}" for n in summary["notes"]]]
    header = (
        f"{'split':6s} {'class':10s} {'images':>7s} {'patients':>8s} {'share':>6s} {'mean':>6s} "
        f"{'std':>6s}  size (w x h, median [min-max])"
    )
    lines += [header, "-" * len(header)]
    for name, entry in summary["splits"].items():
        for cls, s in entry["classes"].items():
            share = s["n"] / max(entry["n"], 1)
            size = ""
            if "width" in s:
                w, h = s["width"], s["height"]
                size = (
                    f"{w['median']} x {h['median']} [{w['min']}-{w['max']} x {h['min']}-{h['max']}]"
                )
            mean, std = (f"{s[k]:6.1f}" if k in s else f"{'-':>6s}"  # none for no images
                         for k in ("intensity_mean", "intensity_std"))
            lines.append(f"{name:6s} {cls:10s} {s['n']:7d} {s['patients']:8d} {share:6.1%} "
                         f"{mean} {std}  {size}")
    lines.append(f"mean, std: grey levels (0-255) of the images decoded at "
                 f"{summary['decoded_size']} px; size: the files' own, in pixels")
    if summary["skipped"]:
        lines.append(f"skipped {summary['skipped']} unreadable file(s)")
    return "\n".join(lines)


EDA_FILES = ("class_balance.png", "sample_grid.png", "eda.json", "eda.txt")


def run_eda(data: DataBundle, out: Path, *, seed: int = 0, title_note: str = "") -> dict:
    """Write class_balance.png, sample_grid.png, eda.json and eda.txt into ``out``."""
    from pneumoscan.plots import class_balance, sample_grid

    out = Path(out)
    summary = summarize(data)
    counts = {name: split.class_counts() for name, split in data.splits().items()}
    rng = np.random.default_rng(seed)
    samples = {}
    for label, cls in enumerate(CLASS_NAMES):
        idx = np.flatnonzero(data.train.labels == label)
        pick = rng.choice(idx, size=min(SAMPLES_PER_CLASS, len(idx)), replace=False)
        samples[cls] = [data.train.images[i] for i in pick]
    title = "training samples" + (f" ({title_note})" if title_note else "")
    text = format_summary(summary)
    out.mkdir(parents=True, exist_ok=True)
    # All four files are written aside and then moved in together: a run that fails half way
    # (a full disk) leaves an earlier eda's files as they were, not half of each.
    with tempfile.TemporaryDirectory(dir=out, prefix=".eda-") as staging:
        staged = Path(staging)
        try:
            class_balance(counts, staged / "class_balance.png")
            sample_grid(samples, staged / "sample_grid.png", title=title)
            atomic_write_json(staged / "eda.json", summary)
            atomic_write_text(staged / "eda.txt", text + "\n")
        except OSError as e:  # named as the file it was to become, not its staging copy
            raise OSError(e.errno, e.strerror, str(out / Path(e.filename or "").name)) from None
        for name in EDA_FILES:
            os.replace(staged / name, out / name)
    print(text)
    print(f"wrote {out / 'class_balance.png'}, {out / 'sample_grid.png'}, {out / 'eda.json'}, "
          f"{out / 'eda.txt'}")
    return summary
