"""Signals: Ctrl-C around third-party code that would swallow it, and SIGTERM as Ctrl-C."""

from __future__ import annotations

import contextlib
import os
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


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so that a run stops the same way."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` (a KeyboardInterrupt) in this
    process, so that it ends a training run like Ctrl-C: the last complete epoch stays saved.

    A job scheduler, and torchrun's agent, send SIGTERM to the whole process group, data
    loader workers included; the workers have it blocked (:func:`sigterm_blocked`) and are
    shut down by the main process as it unwinds. Outside the main thread, where handlers
    cannot be set, the block runs unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pid = os.getpid()

    def handler(_signum: int, _frame: object) -> None:
        if os.getpid() != pid:  # a forked child that has not set its own handling
            return
        raise Terminated

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def sigterm_blocked() -> Iterator[None]:
    """Block SIGTERM in this thread for the block (a signal sent meanwhile is delivered when
    it ends). Processes forked in the block inherit the mask and keep SIGTERM blocked for
    good: wrap the start of data loader workers in it, so that a SIGTERM to the whole process
    group never kills a worker (torch would then raise "DataLoader worker ... is killed by
    signal" wherever the main process is); the main process stops them as it unwinds."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
