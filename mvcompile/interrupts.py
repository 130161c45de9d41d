"""Ctrl-C around third-party code that would swallow it."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Hold back SIGINT until the block ends, then raise :class:`KeyboardInterrupt`.

    ``import coremltools`` takes seconds and tries optional imports (sklearn, torch) under
    bare ``except:`` clauses, which catch the KeyboardInterrupt of a Ctrl-C pressed meanwhile:
    the build would then run on to the end. Here the signal is only noted during the block and
    re-raised after it. Outside the main thread (where signal handlers cannot be set) the block
    runs unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, _frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt
