"""Which images a run trained and validated on, known by their pixels.

A run keeps a short digest of each of its training and validation images (TRAINING_IMAGES), so
that ``evaluate`` notices data that holds them again, whatever the files are now called: a copy
of train/ under another folder's name scores as well as train/ itself, and says nothing about
new patients. The digests are of the decoded pixels at the run's image size; an ensemble's or a
stack's are its members'.
"""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from pneumoscan.fileio import atomic_write
from pneumoscan.run_folder import TRAINING_IMAGES

KEY_BYTES = 16


def pixel_keys(images: np.ndarray, rows: Iterable[int] | None = None) -> list[bytes]:
    """A digest of each image (of ``rows`` only, when given: no copy of them is made).

    Of every 7th row and column: cheap enough for the start of every run (hashing whole images
    took 0.4 s at 224 px). Equal pixels give equal keys; where two images must be told equal
    for sure, compare their pixels as well.
    """
    rows = range(len(images)) if rows is None else rows
    return [hashlib.blake2b(images[i, ::7, ::7].tobytes(), digest_size=KEY_BYTES).digest()
            for i in rows]


def save_training_images(run_dir: Path, image_size: int, keys: list[bytes]) -> None:
    """Keep ``keys`` (``pixel_keys`` of the images the run trained and validated on)."""
    array = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(-1, KEY_BYTES)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, keys=array, image_size=np.int64(image_size))

    atomic_write(run_dir / TRAINING_IMAGES, write)


def training_keys(predictor) -> dict[int, set[bytes]] | None:
    """The keys of the images ``predictor``'s models trained and validated on, by image size;
    None when a model's run does not say (made before runs kept them, or the file is gone)."""
    members = getattr(predictor, "members", None)
    if members is not None:
        found: dict[int, set[bytes]] = {}
        for member in members:
            keys = training_keys(member)
            if keys is None:
                return None
            for size, some in keys.items():
                found.setdefault(size, set()).update(some)
        return found
    try:
        with np.load(Path(predictor.run_dir) / TRAINING_IMAGES, allow_pickle=False) as z:
            keys, size = np.asarray(z["keys"], dtype=np.uint8), int(z["image_size"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # a file cut short
        return None
    return {size: {row.tobytes() for row in keys}}


def count_seen(predictor, images) -> int:
    """How many of ``images`` (an array, or ``{size: array}`` for a stack of several sizes)
    ``predictor`` trained or validated on; 0 when its runs do not say."""
    known = training_keys(predictor)
    if known is None:
        return 0
    by_size = images if isinstance(images, dict) else {predictor.image_size: images}
    seen = np.zeros(len(next(iter(by_size.values()))), dtype=bool)
    for size, array in by_size.items():
        keys = known.get(size, set())
        seen |= np.array([key in keys for key in pixel_keys(array)], dtype=bool)
    return int(seen.sum())
