"""The data loaded in a thread while the process gets on with the rest of its start-up.

Decoding runs in worker processes, so this thread mostly waits on them; meanwhile the main
thread imports what training needs, joins torchrun's process group and warms the GPU up
(train.warm_up). The two overlap instead of taking turns: on a GPU, where training itself takes
seconds, the decoding is then nearly free.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from pneumoscan.data.dataset import DataBundle, load_data


class PendingData(Protocol):
    def result(self) -> DataBundle: ...


class _LoadWhenAsked:
    def __init__(self, load: Callable[[], DataBundle]):
        self._load = load

    def result(self) -> DataBundle:
        return self._load()


def workers_are_forked() -> bool:
    """Whether decode workers start as copies of this process (Linux's default)."""
    return multiprocessing.get_context().get_start_method() == "fork"


@contextlib.contextmanager
def loading_in_background(spec: str, image_size: int, **options) -> Iterator[PendingData]:
    """``load_data(spec, image_size, **options)`` in a thread, for the ``with`` block.

    The block takes the data with ``.result()``, which raises what loading raised. A block that
    ends without it (an error, Ctrl-C) stops the decoding at its next chunk and waits for the
    thread, so no worker outlives the command and no half-decoded array is cached.

    Only where decode workers are forked (Linux): elsewhere they start afresh, and only the main
    thread can have them start with Ctrl-C ignored (cache.py), so there the data loads when
    ``.result()`` asks for it.
    """
    if not workers_are_forked():
        yield _LoadWhenAsked(lambda: load_data(spec, image_size, **options))
        return
    stop = threading.Event()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pneumoscan-data") as pool:
        future = pool.submit(load_data, spec, image_size, stop=stop, **options)
        try:
            yield future
        finally:
            stop.set()
