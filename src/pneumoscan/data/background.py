"""The data decoded in a thread while the process gets on with the rest of its start-up.

Decoding runs in worker processes, so the thread mostly waits on them; meanwhile the main
thread imports what training needs, joins torchrun's process group and warms the GPU up
(train.warm_up). The two overlap instead of taking turns: on a GPU, where training itself takes
seconds, the decoding is then nearly free.

Three rules keep the thread safe beside the main one:
- the workers are forked while the main thread waits, not while it imports: a worker forked in
  the middle of an import finds that module locked for good, and would hang on needing it;
- Ctrl-C belongs to the main thread: the thread blocks it, and so do the workers forked from it
  until they ignore it (cache._ignore_sigint), so none prints a traceback;
- the thread only decodes: carving validation (scikit-learn) is done in the main thread, so the
  two never import the same package at once.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
import threading
from collections.abc import Callable, Iterator

from pneumoscan.data.cache import Steering
from pneumoscan.data.dataset import (
    READ_OPTIONS,
    DataBundle,
    DecodedSplits,
    arrange,
    is_medmnist,
    read_splits,
)


class PendingData:
    """The data of a run, being loaded: ``result()`` returns it, or raises what loading raised."""

    def __init__(self, decoded: Callable[[], DecodedSplits], arrange_options: dict):
        self._decoded, self._arrange_options = decoded, arrange_options

    def result(self) -> DataBundle:
        return arrange(self._decoded(), **self._arrange_options)


class _DecodingThread(threading.Thread):
    def __init__(self, spec: str, image_size: int, steering: Steering, read_options: dict):
        super().__init__(name="pneumoscan-data")
        self._args, self._steering, self._read_options = (spec, image_size), steering, read_options
        self.outcome: DecodedSplits | BaseException | None = None

    def run(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            self.outcome = read_splits(*self._args, steering=self._steering, **self._read_options)
        except BaseException as e:  # raised in the main thread, where the data is asked for
            self.outcome = e
        finally:
            self._steering.started.set()  # also when no worker was needed, or none could start

    def decoded(self) -> DecodedSplits:
        self.join()
        return self.check()

    def check(self) -> DecodedSplits | None:
        """The outcome so far: raises what reading raised."""
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome


def workers_are_forked() -> bool:
    """Whether decode workers start as copies of this process (Linux's default up to Python
    3.13); elsewhere they start afresh, and only the main thread can have them start with
    Ctrl-C ignored (cache._sigint_ignored_while)."""
    return multiprocessing.get_context().get_start_method() == "fork"


@contextlib.contextmanager
def loading_in_background(spec: str, image_size: int, **options) -> Iterator[PendingData]:
    """``load_data(spec, image_size, **options)`` decoding in a thread for the ``with`` block.

    Returns once the decode workers have started; an error found before (a missing folder, no
    images) is raised at once. The block takes the data with ``.result()``. A block that ends
    without it (an error, Ctrl-C) stops the decoding at its next chunk and waits for the
    thread: no worker outlives the command and no half-decoded array is cached.

    PneumoniaMNIST's download, which nothing could stop half way, and decoding where workers
    are not forked are done by ``.result()`` itself, in the main thread.
    """
    read_options = {k: options.pop(k) for k in READ_OPTIONS if k in options}
    if is_medmnist(spec) or not workers_are_forked():
        yield PendingData(lambda: read_splits(spec, image_size, **read_options), options)
        return
    steering = Steering()
    thread = _DecodingThread(spec, image_size, steering, read_options)
    thread.start()
    try:
        steering.started.wait()
        thread.check()
        yield PendingData(thread.decoded, options)
    finally:
        steering.stop.set()
        thread.join()
