"""Writing files so that a crash never leaves a half-written one behind."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once: os.umask is process-wide and not thread-safe to probe


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it into place.

    The rename is atomic on POSIX, so readers see either the old file or the new one.
    """
    path = Path(path)
    tmp_path = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{clip_name(path.name, 200)}.", suffix=".tmp",
                                   dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        write(tmp_path)
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; give what open() would
        # Through a writable handle: Windows cannot flush a file opened for reading only.
        with open(tmp_path, "r+b") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except OSError as e:
        if tmp_path is not None:
            tmp_path.unlink(missing_ok=True)
        # Name the file the caller asked for, not the temporary one (a full disk names none).
        named = e.filename and not str(e.filename).endswith(".tmp")
        raise OSError(e.errno, e.strerror or str(e), e.filename if named else str(path)) from e
    except BaseException:
        if tmp_path is not None:
            tmp_path.unlink(missing_ok=True)
        raise
    return path


@contextlib.contextmanager
def staged_folder(dest: Path) -> Iterator[Path]:
    """A fresh, empty folder beside ``dest`` to fill; once filled it takes ``dest``'s place.

    On any failure (a full disk, Ctrl-C) it is removed, so no half-written folder is left
    for a later run to take for a whole one; an OSError naming a file in it names that file's
    place under ``dest`` instead.
    """
    staging = dest.with_name(f".{dest.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
        if dest.exists():
            shutil.rmtree(dest)
        staging.rename(dest)
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, OSError) and e.filename and Path(e.filename).is_relative_to(staging):
            where = dest / Path(e.filename).relative_to(staging)
            raise OSError(e.errno, e.strerror, str(where)) from None
        raise


def clip_name(name: str, max_bytes: int) -> str:
    """``name`` cut to at most ``max_bytes`` of UTF-8, on a character boundary.

    File names may take 255 bytes: a temporary name built from a long one would not fit. Bytes
    of a name that is not UTF-8 (os.fsdecode's lone surrogates) are kept.
    """
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) <= max_bytes:
        return name
    cut = max_bytes
    while cut > 0 and raw[cut] & 0xC0 == 0x80:  # not inside a character's continuation bytes
        cut -= 1
    return raw[:cut].decode("utf-8", "surrogateescape")


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def check_writable(path: str | Path) -> None:
    """Raise now the OSError that writing ``path`` later would meet for its folder (a file
    where a folder is needed, a folder that may not be written in, a read-only file system),
    leaving nothing behind. A full disk shows only when the file is written."""
    path = Path(path)
    folder = path.parent
    while not os.path.lexists(folder) and folder != folder.parent:
        folder = folder.parent  # atomic_write makes the folders missing below this one
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    if not folder.is_dir():  # a file where a folder is needed: the command line names it
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path))
    try:
        with tempfile.TemporaryFile(dir=folder):  # gone when closed, on every system
            pass
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), str(folder)) from None


def check_writable_folder(folder: str | Path) -> None:
    """``check_writable`` for the files a command will write into ``folder``."""
    check_writable(Path(folder) / "file")


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)
