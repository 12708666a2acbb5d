"""The heap setting that keeps resident memory close to live memory during training."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Free one large block (glibc then raises its mmap threshold), fill the heap with
# activation-sized blocks with small ones between them, free the large ones: the memory
# stays resident unless the thresholds are fixed.
SCRIPT = """
import sys, numpy as np, psutil
from pneumoscan.memory import limit_heap_fragmentation
if sys.argv[1] == "fixed":
    assert limit_heap_fragmentation()
big = np.ones(30_000_000 // 8)
del big
rss = lambda: psutil.Process().memory_info().rss
before = rss()
blocks, pins = [], []
for _ in range(100):
    blocks.append(np.ones(4_000_000 // 8))
    pins.append(np.ones(8_000 // 8))  # small, so always on the heap: it holds the hole open
del blocks
print(rss() - before)
"""


def _retained(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True,
                         check=True)
    return int(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_freed_activation_sized_blocks_go_back_to_the_system():
    assert _retained("default") > 300e6  # the fragmentation this guards against
    assert _retained("fixed") < 50e6
