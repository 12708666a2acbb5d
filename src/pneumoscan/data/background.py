"""The data decoded in a thread while the process gets on with the rest of its start-up.

Decoding runs in worker processes, so the thread mostly waits on them; meanwhile the main
thread imports what training needs, joins torchrun's process group and warms the GPU up
(train.warm_up). The two overlap instead of taking turns: on a GPU, where training itself takes
seconds, the decoding is then nearly free.

Four rules keep the thread safe beside the main one:
- the workers are forked while the main thread waits, not while it imports: a worker forked in
  the middle of an import finds that module locked for good, and would hang on needing it;
- Ctrl-C belongs to the main thread: the thread blocks it, and so do the workers forked from it
  until they ignore it (cache._ignore_sigint), so none prints a traceback;
- the thread carves validation (scikit-learn, seconds of work on Kermany's split) only once the
  main thread has done its own imports (``imports_done``): the two never import one package at
  once;
- the main thread waits for the thread on an event, not in ``join()``: on Python 3.11 a Ctrl-C
  in ``join()`` marks a thread finished that still runs (cpython issue 90882), and the command
  would leave it writing the decode cache.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
import threading
from collections.abc import Callable, Iterator

from pneumoscan.data.cache import DecodingStopped, Steering
from pneumoscan.data.dataset import (
    READ_OPTIONS,
    DataBundle,
    arrange,
    is_medmnist,
    read_splits,
)
from pneumoscan.data.medmnist import parse_spec


class PendingData:
    """The data of a run, being loaded: ``result()`` returns it, or raises what loading raised."""

    def __init__(self, load: Callable[[], DataBundle], imports_done: Callable[[], None]):
        self._load, self._imports_done = load, imports_done

    def imports_done(self) -> None:
        """The main thread has imported what it needs: validation may be carved beside it."""
        self._imports_done()

    def result(self) -> DataBundle:
        return self._load()


class _LoadingThread(threading.Thread):
    def __init__(self, spec: str, image_size: int, read_options: dict, arrange_options: dict):
        super().__init__(name="pneumoscan-data")
        self._args, self._read_options, self._arrange_options = (
            (spec, image_size), read_options, arrange_options)
        self.steering = Steering()
        self.may_import = threading.Event()  # set by the main thread once its imports are done
        self.finished = threading.Event()
        self._outcome: DataBundle | BaseException | None = None

    def run(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            decoded = read_splits(*self._args, steering=self.steering, **self._read_options)
            self.may_import.wait()
            if self.steering.stop.is_set():
                raise DecodingStopped
            self._outcome = arrange(decoded, **self._arrange_options)
        except BaseException as e:  # raised in the main thread, where the data is asked for
            self._outcome = e
        finally:
            self.steering.started.set()  # also when no worker was needed, or none could start
            self.finished.set()

    def raise_failure(self) -> None:
        """Raise what loading raised, if it has already failed."""
        if isinstance(self._outcome, BaseException):
            raise self._outcome

    def result(self) -> DataBundle:
        self.may_import.set()  # a main thread waiting for the data imports nothing meanwhile
        self.finished.wait()
        self.raise_failure()
        bundle, self._outcome = self._outcome, None  # the run holds it, this thread need not
        return bundle

    def stop(self) -> None:
        """End the loading early and wait for the thread."""
        self.steering.stop.set()
        self.may_import.set()
        self.finished.wait()
        self.join()


def workers_are_forked() -> bool:
    """Whether decode workers start as copies of this process (Linux's default up to Python
    3.13); elsewhere they start afresh, and only the main thread can have them start with
    Ctrl-C ignored (cache._sigint_ignored_while)."""
    return multiprocessing.get_context().get_start_method() == "fork"


@contextlib.contextmanager
def loading_in_background(spec: str, image_size: int, **options) -> Iterator[PendingData]:
    """``load_data(spec, image_size, **options)`` in a thread, for the ``with`` block.

    Returns once the decode workers have started; an error found before (a missing folder, no
    images) is raised at once. The block says ``imports_done()`` and takes the data with
    ``.result()``. A block that ends without it (an error, Ctrl-C) stops the decoding at its
    next chunk and waits for the thread: no worker outlives the command and no half-decoded
    array is cached.

    PneumoniaMNIST's download, which nothing could stop half way, and decoding where workers
    are not forked are done by ``.result()`` itself, in the main thread.
    """
    read_options = {k: options.pop(k) for k in READ_OPTIONS if k in options}
    if is_medmnist(spec) or not workers_are_forked():
        if is_medmnist(spec):
            parse_spec(spec)  # a size it does not come in is said at once
        yield PendingData(lambda: arrange(read_splits(spec, image_size, **read_options),
                                          **options), lambda: None)
        return
    thread = _LoadingThread(spec, image_size, read_options, options)
    try:
        thread.start()
        thread.steering.started.wait()
        thread.raise_failure()
        yield PendingData(thread.result, thread.may_import.set)
    finally:
        if thread.ident is not None:  # started
            thread.stop()
