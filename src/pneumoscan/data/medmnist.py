"""PneumoniaMNIST (MedMNIST+): the same Kermany images with official splits, as one .npz file.

The published files and their checksums are used directly, so the ``medmnist`` package and its
dependencies are not needed. Files are cached; offline, a missing file fails at once.
"""

from __future__ import annotations

import hashlib
import re
import urllib.request
import zipfile
import zlib
from pathlib import Path

import numpy as np

from pneumoscan.data.cache import cache_root
from pneumoscan.errors import PneumoscanError
from pneumoscan.fileio import atomic_write

RECORD = "https://zenodo.org/records/10519652/files"
FILES = {  # size -> (file name, md5)
    28: ("pneumoniamnist.npz", "28209eda62fecd6e6a2d98b1501bb15f"),
    64: ("pneumoniamnist_64.npz", "8f4eceb4ccffa70c672198ea285246c6"),
    128: ("pneumoniamnist_128.npz", "05b46931834c231683c68f40c47b2971"),
    224: ("pneumoniamnist_224.npz", "d6a3c71de1b945ea11211b03746c1fe1"),
}
SPLITS = ("train", "val", "test")


def parse_spec(spec: str) -> int | None:
    """'pneumoniamnist' -> None (pick by image size), 'pneumoniamnist:128' -> 128."""
    name, _, size = spec.partition(":")
    if name.lower() != "pneumoniamnist":
        raise ValueError(spec)
    if not size:
        return None
    if not size.isdigit() or int(size) not in FILES:
        raise PneumoscanError(f"{spec}: PneumoniaMNIST comes in sizes {', '.join(map(str, FILES))}")
    return int(size)


def describe(size: int, path: Path) -> str:
    """A run's ``data_source`` for PneumoniaMNIST; ``spec_of`` reads it back."""
    return f"PneumoniaMNIST {size} px ({path})"


_DESCRIPTION = re.compile(r"PneumoniaMNIST (\d+) px \((.*)\)")


def spec_of(source: object) -> str | None:
    """The ``--data`` value that names the file a ``data_source`` describes: 'pneumoniamnist:64'
    for 'PneumoniaMNIST 64 px (/cache/pneumoniamnist_64.npz)'; None for a folder."""
    match = _DESCRIPTION.fullmatch(source) if isinstance(source, str) else None
    return f"pneumoniamnist:{match.group(1)}" if match else None


def public_description(source: str) -> str:
    """``data_source`` without the server's folders: 'PneumoniaMNIST 64 px
    (pneumoniamnist_64.npz)', or a data folder's own name."""
    match = _DESCRIPTION.fullmatch(source)
    if match:
        return describe(int(match.group(1)), Path(Path(match.group(2)).name))
    return Path(source).name


def pick_size(requested: int | None, image_size: int) -> int:
    """The smallest published size at least as large as the training size."""
    if requested:
        return requested
    return next((s for s in sorted(FILES) if s >= image_size), max(FILES))


def cache_dir() -> Path:
    return cache_root() / "medmnist"


def load_npz(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{split: (images (N, S, S) uint8, labels (N,) int64)} from a MedMNIST-format file."""
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {}
            for split in SPLITS:
                images = z[f"{split}_images"]
                labels = z[f"{split}_labels"].reshape(-1).astype(np.int64)
                if images.ndim == 4:  # (N, S, S, C) colour files: keep one channel
                    images = images[..., 0]
                out[split] = (np.ascontiguousarray(images, dtype=np.uint8), labels)
            return out
    # A truncated or damaged file (an interrupted copy) fails in the zip reader or in zlib.
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError, zlib.error) as e:
        raise PneumoscanError(
            f"{path}: not a readable MedMNIST file ({e}); delete it to download it again"
        ) from None


def fetch(size: int) -> Path:
    """The cached file for ``size``, downloading and checking it first if needed."""
    name, md5 = FILES[size]
    path = cache_dir() / name
    if path.exists():
        return path
    from pneumoscan.net import require_network

    require_network(
        "zenodo.org",
        what=f"PneumoniaMNIST ({name})",
        instead="--data DIR (a folder with NORMAL/ and PNEUMONIA/) or place the file at "
        + str(path),
    )
    print(f"downloading {name} to {path}")
    atomic_write(path, lambda tmp: _download(f"{RECORD}/{name}?download=1", tmp, md5))
    return path


def _download(url: str, dest: Path, md5: str) -> None:
    digest = hashlib.md5()
    try:
        with urllib.request.urlopen(url, timeout=30) as response, open(dest, "wb") as f:
            while block := response.read(1 << 20):
                digest.update(block)
                f.write(block)
    except OSError as e:
        raise PneumoscanError(f"download of {url} failed: {e}") from None
    if digest.hexdigest() != md5:
        raise PneumoscanError(f"download of {url} is corrupt (md5 mismatch); try again")
