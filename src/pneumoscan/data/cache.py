"""Decode a list of files once, in parallel, into a memory-mapped uint8 array kept on disk.

A later run over the same files at the same size reads the array back instead of decoding again;
any change to a file (its size, times or inode), to the list or to the decoder gives a new
fingerprint, so the cache is rebuilt rather than trusted. Only pixels are kept: files that failed
are decoded again on every load, since most failures are fixed outside the file (pydicom or a
codec installed, a permission granted) and a stored failure would outlive the fix.

Each change leaves the old array behind, so the cache is bounded: when an array is stored or
used, the least recently used others go until the folder holds at most $PNEUMOSCAN_CACHE_GB
(default ``DEFAULT_LIMIT_GB``) gigabytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import signal
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from pneumoscan.console import printable
from pneumoscan.data.decode import decoder_signature, read_gray
from pneumoscan.errors import UnreadableImage
from pneumoscan.fileio import atomic_write, atomic_write_json, read_json
from pneumoscan.progress import progress_bar

_CHUNK = 64  # files per task: large enough to amortise process overhead
DEFAULT_LIMIT_GB = 10.0  # some 40 decoded copies of Kermany's train split at 224 px
_ENTRY_FILE = re.compile(r"^([0-9a-f]{24})\.(npy|json)$")  # what this module writes, only
_TEMP_FILE = re.compile(r"^\.[0-9a-f]{24}\.(npy|json)\..*\.tmp$")  # atomic_write's, mid-write
_STALE_TEMP_S = 24 * 3600.0  # older than any write in progress
_WINDOWS_MAX_WORKERS = 61  # ProcessPoolExecutor refuses more there


class DecodingStopped(Exception):
    """Another thread set ``Steering.stop``: it no longer needs the images (it failed, or was
    interrupted)."""


@dataclass
class Steering:
    """How a thread steers a decode that runs in another (data/background.py).

    ``stop``: set by the steering thread; decoding ends after the chunks in progress, storing
    nothing. ``started``: set here once the decode workers exist, or once the cache answered
    (the workers are forked while the steering thread waits, so that no module is half imported
    by it in their copy of the process).
    """

    stop: threading.Event = field(default_factory=threading.Event)
    started: threading.Event = field(default_factory=threading.Event)


@dataclass
class Decoded:
    images: np.ndarray  # (N, S, S) uint8, possibly a read-only memory map; zeros where unreadable
    ok: np.ndarray  # (N,) bool: which files decoded
    errors: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of the others
    fingerprint: str = ""


def cache_root() -> Path:
    """$PNEUMOSCAN_CACHE, else ~/.cache/pneumoscan (or under $XDG_CACHE_HOME)."""
    base = os.environ.get("PNEUMOSCAN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "pneumoscan"
    )
    return Path(base)


def default_cache_dir() -> Path:
    return cache_root() / "decoded"


def fingerprint(paths: Sequence[Path], size: int) -> str:
    """Changes whenever a file is added, removed, replaced or touched, the size or the decoder."""
    h = hashlib.sha256(f"{decoder_signature()}:{size}".encode())
    for path in paths:
        # fsencode: a name that is not UTF-8 (a Latin-1 "R\xf6ntgen.jpeg") has no str encoding.
        h.update(os.fsencode(path) + b"\0" + _file_identity(path) + b"\n")
    return h.hexdigest()[:24]


def _file_identity(path: Path) -> bytes:
    # Size and mtime alone miss a same-size file replaced with its mtime kept (cp -p, rsync -a,
    # tar): the replacement has a new inode, or at least a new ctime, which no tool sets back.
    try:
        st = os.stat(path)
    except OSError:
        return b"missing"
    return f"{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\0{st.st_ctime_ns}".encode()


def decode_files(
    paths: Sequence[Path],
    size: int,
    *,
    cache_dir: Path | None = None,
    use_cache: bool = True,
    workers: int | None = None,
    progress: bool = True,
    steering: Steering | None = None,
) -> Decoded:
    """Every file as a (size, size) uint8 image, using and filling the on-disk cache.

    ``steering``: another thread's hold on the decoding (its ``stop`` ends it with
    DecodingStopped, storing nothing).
    """
    paths = [Path(p) for p in paths]
    fp = fingerprint(paths, size)
    cache_dir = cache_dir or default_cache_dir()
    array_path, meta_path = cache_dir / f"{fp}.npy", cache_dir / f"{fp}.json"
    if use_cache and array_path.exists() and meta_path.exists():
        try:
            cached = _read_cache(array_path, meta_path, fp, len(paths), size)
        except (OSError, ValueError, KeyError, TypeError, EOFError):
            pass  # a damaged cache is rebuilt below
        else:
            _mark_used(meta_path)
            prune_cache(cache_dir, keep=fp)  # bounds a cache older versions left unbounded
            decoded = _retry_failed(cached, paths, size, workers, array_path, meta_path)
            if steering is not None:
                steering.started.set()  # no worker will be forked any more
            return decoded
    decoded = _decode_all(paths, size, workers, progress, steering)
    decoded.fingerprint = fp
    return _store(decoded, array_path, meta_path) if use_cache else decoded


def _retry_failed(
    cached: Decoded,
    paths: list[Path],
    size: int,
    workers: int | None,
    array_path: Path,
    meta_path: Path,
) -> Decoded:
    """The cache with the files that failed decoded again: they are few, and the user may have
    fixed the reason since (installed pydicom or a codec, granted a permission)."""
    failed = np.flatnonzero(~cached.ok)
    if not len(failed):
        return cached
    retried = _decode_all([paths[i] for i in failed], size, workers, progress=False)
    cached.errors = retried.errors
    if not retried.ok.any():
        return cached
    images = np.array(cached.images)  # copied out of the read-only map, to store the newcomers
    images[failed] = retried.images
    ok = cached.ok.copy()
    ok[failed] = retried.ok
    return _store(Decoded(images, ok, retried.errors, cached.fingerprint), array_path, meta_path)


def _store(decoded: Decoded, array_path: Path, meta_path: Path) -> Decoded:
    """``decoded`` written to the cache and read back memory-mapped, with its errors."""
    # Room first: on a disk the cache has filled, the new array could not be written at all.
    prune_cache(array_path.parent, keep=decoded.fingerprint, room=decoded.images.nbytes)
    try:
        _write_cache(decoded, array_path, meta_path)
        n, size = decoded.images.shape[:2]
        stored = _read_cache(array_path, meta_path, decoded.fingerprint, n, size)
    except OSError:
        return decoded  # an unwritable cache folder only costs speed next time
    stored.errors = decoded.errors
    return stored


def cache_limit_bytes() -> float:
    """$PNEUMOSCAN_CACHE_GB in bytes (a number of gigabytes, 0 or more), else DEFAULT_LIMIT_GB.

    Anything else (a typo, a negative number, nan) gives the default: a slip in the setting
    must neither stop a training run nor empty the cache.
    """
    text = os.environ.get("PNEUMOSCAN_CACHE_GB", "").strip()
    try:
        limit = float(text)
    except ValueError:
        return DEFAULT_LIMIT_GB * 1e9
    return limit * 1e9 if 0.0 <= limit < math.inf else DEFAULT_LIMIT_GB * 1e9


def prune_cache(cache_dir: Path, keep: str = "", limit: float | None = None,
                room: int = 0) -> list[str]:
    """Remove the least recently used cached arrays until those left and ``room`` more bytes
    fit in ``limit`` (default :func:`cache_limit_bytes`); the entry ``keep`` always stays. Only
    files this module writes are touched, and temporary files that writers killed mid-way left
    behind a day ago or more. Returns the fingerprints removed.

    A run that still has a removed array memory-mapped keeps reading it: the file's pages live
    until the map is closed (where the system refuses to delete it, it stays and counts).
    """
    limit = (cache_limit_bytes() if limit is None else limit) - room
    entries: dict[str, list[tuple[Path, os.stat_result]]] = {}
    try:
        names = os.listdir(cache_dir)
    except OSError:
        return []
    for name in names:
        path = cache_dir / name
        try:
            st = path.stat()
        except OSError:
            continue  # removed meanwhile by another run
        match = _ENTRY_FILE.match(name)
        if match:
            entries.setdefault(match.group(1), []).append((path, st))
        elif _TEMP_FILE.match(name) and time.time() - st.st_mtime > _STALE_TEMP_S:
            with contextlib.suppress(OSError):
                path.unlink()
    sizes = {fp: sum(st.st_size for _, st in files) for fp, files in entries.items()}
    last_used = {fp: max(st.st_mtime for _, st in files) for fp, files in entries.items()}
    total = sum(sizes.values())
    removed = []
    for fp in sorted(entries, key=last_used.__getitem__):
        if total <= limit:
            break
        if fp == keep or not _remove_entry(entries[fp]):
            continue
        total -= sizes[fp]
        removed.append(fp)
    return removed


def _remove_entry(files: list[tuple[Path, os.stat_result]]) -> bool:
    """Delete an entry's files; False when one could not be (it then still takes its room)."""
    gone = True
    for path, _ in files:
        try:
            path.unlink(missing_ok=True)
        except OSError:
            gone = False
    return gone


def _mark_used(meta_path: Path) -> None:
    """A cache hit counts as a use: pruning removes the least recently used arrays first."""
    with contextlib.suppress(OSError):
        os.utime(meta_path)


def _read_cache(array_path: Path, meta_path: Path, fp: str, n: int, size: int) -> Decoded:
    """The cached pixels and which files decoded; the others' errors are the caller's to find."""
    meta = read_json(meta_path)
    images = np.load(array_path, mmap_mode="r")
    if images.shape != (n, size, size) or images.dtype != np.uint8:
        raise ValueError("cache shape mismatch")
    ok = np.array(meta["ok"], dtype=bool)
    if ok.shape != (n,):
        raise ValueError("cache length mismatch")
    return Decoded(images=images, ok=ok, fingerprint=fp)


def _write_cache(decoded: Decoded, array_path: Path, meta_path: Path) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a path would make np.save append '.npy' to the name
            np.save(f, decoded.images, allow_pickle=False)

    atomic_write(array_path, write)
    # No errors: a failure is not stored, so that it is retried (see _retry_failed).
    atomic_write_json(meta_path, {"ok": decoded.ok.tolist()})


def _decode_all(paths: list[Path], size: int, workers: int | None, progress: bool,
                steering: Steering | None = None) -> Decoded:
    images = np.zeros((len(paths), size, size), dtype=np.uint8)
    ok = np.zeros(len(paths), dtype=bool)
    errors: list[tuple[str, str]] = []
    starts = range(0, len(paths), _CHUNK)
    chunks = [[paths[i] for i in range(s, min(s + _CHUNK, len(paths)))] for s in starts]
    workers = decode_workers(workers)
    bar = _progress_bar(len(paths), progress)
    if steering is not None and steering.stop.is_set():
        raise DecodingStopped  # before any worker is started
    with contextlib.ExitStack() as stack:
        mapper = map
        if workers > 1 and len(chunks) > 1:
            # Pillow's format plugins, imported before the workers are forked: a worker importing
            # one itself could find it half imported by another thread of this process at the
            # fork, and wait on its lock forever.
            Image.init()
            # The pool's map() hands each chunk's result over once and forgets it: the results
            # are not all held at once beside the output array, which would double the memory.
            pool = ProcessPoolExecutor(max_workers=workers, initializer=_ignore_sigint)
            # Ctrl-C: the chunks not started are dropped, the running ones end, the workers go.
            stack.callback(pool.shutdown, wait=True, cancel_futures=True)
            mapper = pool.map
        with _sigint_ignored_while(mapper is not map):  # map() starts the workers
            results = mapper(_decode_chunk, chunks, [size] * len(chunks))
        if steering is not None:
            steering.started.set()
        for start, (chunk_images, chunk_errors) in zip(starts, results, strict=True):
            if steering is not None and steering.stop.is_set():
                raise DecodingStopped
            end = start + len(chunk_images)
            images[start:end] = chunk_images
            ok[start:end] = True
            for offset, reason in chunk_errors:
                ok[start + offset] = False
                errors.append((str(paths[start + offset]), reason))
            bar.update(len(chunk_images))
    bar.close()
    return Decoded(images=images, ok=ok, errors=errors)


def decode_workers(requested: int | None) -> int:
    """The decode processes: as asked, else one a core; Windows takes at most 61 (its limit)."""
    workers = requested or os.cpu_count() or 1
    return min(workers, _WINDOWS_MAX_WORKERS) if os.name == "nt" else workers


@contextlib.contextmanager
def _sigint_ignored_while(starting_workers: bool):
    """Start the decode workers with Ctrl-C ignored: a process inherits that from its parent
    (even when started afresh, as macOS does), so it is ignored while the worker still imports
    numpy and Pillow, before ``_ignore_sigint`` runs; otherwise each printed a traceback. A
    Ctrl-C in these few milliseconds is lost; any later one stops the pool as before."""
    if not starting_workers or threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set a signal handler
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _ignore_sigint() -> None:
    """In each decode worker: Ctrl-C reaches the whole process group, and a worker killed by
    it mid-chunk left the pool's shutdown racing the main process's (a traceback, a hang).
    The main process alone handles it and stops the pool. A worker forked from a thread that
    blocks Ctrl-C (background.py) starts with it blocked: ignored first, it is unblocked, and
    one that came meanwhile is dropped."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # SIGTERM to the whole process group (a job scheduler's) ends a worker quietly; the main
    # process's own handler (cli.Terminated) is not the worker's to run.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if hasattr(signal, "pthread_sigmask"):  # not on Windows
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _decode_chunk(paths: list[Path], size: int) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """One array for the chunk (zeros where unreadable) and the (offset, reason) of failures."""
    out = np.zeros((len(paths), size, size), dtype=np.uint8)
    errors = []
    for offset, path in enumerate(paths):
        try:
            out[offset] = read_gray(path, size)
        except UnreadableImage as e:
            errors.append((offset, e.reason))
    return out, errors


def _progress_bar(total: int, enabled: bool):
    return progress_bar(total, "decode", "img", enabled=enabled)


def describe_errors(errors: Sequence[tuple[str, str]], limit: int = 20) -> str:
    """A warning naming each unreadable file (up to ``limit``) and how many there were."""
    lines = [f"skipped {len(errors)} unreadable file(s):"]
    lines += [printable(f"  {path}: {reason}") for path, reason in errors[:limit]]
    if len(errors) > limit:
        lines.append(f"  ... and {len(errors) - limit} more")
    return "\n".join(lines)
