"""Keep the process's resident memory close to what it really uses.

glibc raises its mmap threshold each time a large block is freed, after which activation-sized
blocks (hundreds of kB to tens of MB) come from the heap and fragment it: a training run at 224 px
then holds several hundred MB it no longer uses. Fixing the threshold keeps such blocks in their
own mappings, returned to the system when freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 128 * 1024  # glibc's own starting value, kept fixed


def limit_heap_fragmentation() -> bool:
    """Fix glibc's mmap and trim thresholds; a no-op (False) off Linux/glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    return bool(mallopt(M_TRIM_THRESHOLD, MMAP_THRESHOLD) == 1 and ok)
