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


class _SigtermState:
    """SIGTERMs received within :func:`sigterm_as_stop_request`."""

    received = 0


_sigterm = _SigtermState()


@contextlib.contextmanager
def sigterm_as_stop_request() -> Iterator[None]:
    """Within the block, SIGTERM asks this process to stop: the next
    :func:`raise_if_terminated` raises :class:`Terminated` (a KeyboardInterrupt), so that a
    training run, which calls it between batches, ends like Ctrl-C with the last complete
    epoch saved. A second SIGTERM raises at once, wherever the process is.

    The first one is only recorded because Python runs a signal's handler between any two
    bytecodes, destructors included: raised in a data loader iterator's ``__del__`` (one runs
    as every epoch ends), the exception was printed, dropped, and the run went on; raised
    half-way through starting the workers, it left an iterator that could not stop them.

    A job scheduler, and torchrun's agent, send SIGTERM to the whole process group, data
    loader workers included; the workers have it blocked (:func:`sigterm_immune_children`)
    and are shut down by the main process as it unwinds. Outside the main thread, where
    handlers cannot be set, the block runs unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pid = os.getpid()

    def handler(_signum: int, _frame: object) -> None:
        if os.getpid() != pid:  # a forked child that has not set its own handling
            return
        _sigterm.received += 1
        if _sigterm.received > 1:
            raise Terminated

    _sigterm.received = 0
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _sigterm.received = 0


def raise_if_terminated() -> None:
    """Raise :class:`Terminated` if a SIGTERM arrived within :func:`sigterm_as_stop_request`;
    call it where stopping is safe. Elsewhere it does nothing."""
    if _sigterm.received:
        raise Terminated


@contextlib.contextmanager
def sigterm_blocked() -> Iterator[None]:
    """Block SIGTERM in this thread for the block (a signal sent meanwhile is delivered when
    it ends). Processes forked in the block inherit the mask and keep SIGTERM blocked for
    good, so that a SIGTERM to the whole process group never kills a data loader worker
    (torch would then raise "DataLoader worker ... is killed by signal" wherever the main
    process is); the main process stops them as it unwinds. ``Process.terminate`` cannot
    stop such children: use :func:`sigterm_immune_children`, which kills them at exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


_children_to_kill: weakref.WeakSet[BaseProcess] = weakref.WeakSet()
_owner_pid: list[int] = []  # the process that registered the exit hook, once it has


def kill_at_exit(children: Iterable[BaseProcess]) -> None:
    """Kill (SIGKILL) any of ``children`` still alive when this process exits.

    Children started in :func:`sigterm_blocked` ignore ``Process.terminate``. Data loader
    workers that were never told to stop (their iterator was cut off by Ctrl-C before it
    could tell them) or that hang would then make multiprocessing's own exit hook, which
    terminates and joins every child, wait forever. This hook runs before that one (exit
    hooks run in reverse order of registration), and children stopped normally are long
    gone by then.
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
