"""Signals: Ctrl-C around third-party code that would swallow it, and SIGTERM as Ctrl-C."""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing
import os
import signal
import threading
import weakref
from collections.abc import Iterable, Iterator
from multiprocessing.process import BaseProcess


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
        if _hold.depth:  # inside sigterm_blocked(): raised when the block ends
            _hold.pending = True
            return
        _hold.pending = False  # one Terminated for the signals held back and this one
        raise Terminated

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _SigtermHold:
    """How many :func:`sigterm_blocked` blocks are open in the main thread, and whether a
    SIGTERM arrived in one of them."""

    depth = 0
    pending = False


_hold = _SigtermHold()


@contextlib.contextmanager
def sigterm_blocked() -> Iterator[None]:
    """Make the block atomic with respect to SIGTERM, and start children immune to it.

    SIGTERM is blocked in this thread for the block, and a :class:`Terminated` that
    :func:`sigterm_as_interrupt` would raise meanwhile is raised when the block ends instead
    (the signal may have reached Python's own handler just before the mask was set, and
    Python runs handlers between any two bytecodes). So a data loader's iterator is either
    fully built, workers and all, or not started: one cut off half-way has no record of its
    workers, cannot stop them, and its ``__del__`` prints a traceback.

    Processes forked in the block inherit the mask and keep SIGTERM blocked for good: wrap
    the start of data loader workers in it, so that a SIGTERM to the whole process group
    never kills a worker (torch would then raise "DataLoader worker ... is killed by signal"
    wherever the main process is); the main process stops them as it unwinds. Pass such
    children to :func:`kill_at_exit` (or use :func:`sigterm_immune_children`), since
    ``Process.terminate`` cannot stop them.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    _hold.depth += 1
    try:
        yield
    finally:
        _hold.depth -= 1
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    if not _hold.depth and _hold.pending:
        _hold.pending = False
        raise Terminated


_children_to_kill: weakref.WeakSet[BaseProcess] = weakref.WeakSet()
_owner_pid: list[int] = []  # the process that registered the exit hook, once it has


def kill_at_exit(children: Iterable[BaseProcess]) -> None:
    """Kill (SIGKILL) any of ``children`` still alive when this process exits.

    Children started in :func:`sigterm_blocked` ignore ``Process.terminate``. Data loader
    workers that were never told to stop (their iterator was interrupted before it could
    tell them) would then make multiprocessing's own exit hook, which terminates and joins
    every child, wait forever. This hook runs before that one (exit hooks run in reverse
    order of registration), and children stopped normally are long gone by then.
    """
    _children_to_kill.update(children)
    if not _owner_pid:
        _owner_pid.append(os.getpid())
        atexit.register(_kill_leftover_children)


def _kill_leftover_children() -> None:
    if os.getpid() != _owner_pid[0]:
        return
    alive = [child for child in _children_to_kill if child.is_alive()]
    if not alive:
        return
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler raises for killed workers
    for child in alive:
        child.kill()
    for child in alive:
        child.join()


@contextlib.contextmanager
def sigterm_immune_children() -> Iterator[None]:
    """:func:`sigterm_blocked`, and :func:`kill_at_exit` for the children started in the
    block: wrap the start of data loader workers in it."""
    before = set(multiprocessing.active_children())
    try:
        with sigterm_blocked():
            yield
    finally:
        kill_at_exit(set(multiprocessing.active_children()) - before)
