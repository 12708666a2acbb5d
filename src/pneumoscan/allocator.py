"""Low-memory mode: give large freed buffers back to the operating system at once (glibc).

glibc serves allocations under 32 MB from its heap and keeps them when freed, for reuse. A
training step's activations come in many such sizes, so the heap fragments and a run holds
hundreds of megabytes more than it uses: the seed recipe at 224 px on a CPU peaks at 2.3 GB
where its live data never exceed 1.9 GB. With every allocation of 1 MB or more given its own
mapping, unmapped when freed, resident memory follows what is live; the price is fresh, zeroed
pages on every step (that run takes about 1.75 times as long).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

M_MMAP_THRESHOLD = -3  # mallopt's parameter number in glibc's malloc.h
THRESHOLD_BYTES = 1 << 20


def return_large_buffers(threshold: int = THRESHOLD_BYTES) -> bool:
    """Map allocations of ``threshold`` bytes and more one by one. False where not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(threshold)))
    except (OSError, AttributeError, TypeError):  # no C library found, or not glibc (no mallopt)
        return False


@functools.cache  # once a process: each call after the first would warn again
def low_memory_mode(enabled: bool) -> None:
    """``--low-memory``: switch the allocator, or say why it cannot be."""
    if enabled and not return_large_buffers():
        # The report's CNN still recomputes its stem in backward (train.py): only part of it.
        print("warning: --low-memory cannot give freed memory back to the system here (that "
              "needs glibc's allocator); it still saves what the model itself can",
              file=sys.stderr)
