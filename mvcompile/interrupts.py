"""Signals: Ctrl-C around third-party code that would swallow it, and SIGTERM as Ctrl-C."""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing
import multiprocessing.util  # noqa: F401 - registers its exit hook before kill_at_exit's
import os
import signal
import threading
import weakref
from collections.abc import Iterable, Iterator
from multiprocessing.process import BaseProcess


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Hold back SIGINT and SIGTERM until the block ends, then hand each to the handler that
    was in place (so :class:`KeyboardInterrupt`, or :class:`Terminated` for SIGTERM under the
    CLI; a signal the process ignores stays ignored).

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

    def note(signum: int, _frame: object) -> None:
        received.append(signum)

    # A signal the process ignores stays ignored; the others are noted and delivered after.
    previous = {signum: signal.signal(signum, note) for signum in (signal.SIGINT, signal.SIGTERM)
                if signal.getsignal(signum) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    for signum in (signal.SIGTERM, signal.SIGINT):
        if signum in received:
            _deliver(signum, previous[signum])


def _deliver(signum: int, handler: object) -> None:
    """Run the handler that was in place for ``signum`` (Python's own for SIGINT raises
    KeyboardInterrupt, :func:`sigterm_as_interrupt`'s raises :class:`Terminated`, an
    application's does what it does); for the default action, raise as Ctrl-C would."""
    if callable(handler):
        handler(signum, None)
    elif handler == signal.SIG_DFL:
        raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt


# Exit statuses for a process stopped by a signal, as shells report them (128 + the signal).
SIGINT_STATUS = 128 + signal.SIGINT  # 130
SIGPIPE_STATUS = 128 + signal.SIGPIPE  # 141
SIGTERM_STATUS = 128 + signal.SIGTERM  # 143


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so that a run stops the same way."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` at once, as Ctrl-C raises
    KeyboardInterrupt, so that a command stopped by ``timeout``, ``kill`` or a job scheduler
    removes its staged outputs as it does for Ctrl-C (without a handler Python dies at once,
    leaving them). For the commands that have no worker processes; training records the
    signal instead (:func:`sigterm_as_stop_request`). Outside the main thread the block runs
    unchanged."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(_signum: int, _frame: object) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _SigtermState:
    """Whether a SIGTERM arrived within :func:`sigterm_as_stop_request`."""

    received = False


_sigterm = _SigtermState()


@contextlib.contextmanager
def sigterm_as_stop_request() -> Iterator[None]:
    """Within the block, SIGTERM asks this process to stop: :func:`stop_requested` turns
    true, and :func:`raise_if_terminated` raises :class:`Terminated` (a KeyboardInterrupt),
    so that a training run, which checks between batches, ends like Ctrl-C with the last
    complete epoch saved. More SIGTERMs change nothing (``timeout``, Slurm and torchrun's
    agent may each deliver one to the process and one to its group).

    The handler only records the signal because Python runs it between any two bytecodes,
    destructors included: raised in a data loader iterator's ``__del__`` (one runs as every
    epoch ends), the exception was printed, dropped, and the run went on; raised half-way
    through starting the workers, it left an iterator that could not stop them.

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
        if os.getpid() == pid:  # not a forked child that has not set its own handling
            _sigterm.received = True

    _sigterm.received = False
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _sigterm.received = False


def stop_requested() -> bool:
    """Whether a SIGTERM arrived within :func:`sigterm_as_stop_request` (False elsewhere)."""
    return _sigterm.received


def raise_if_terminated() -> None:
    """Raise :class:`Terminated` if :func:`stop_requested`; call it where stopping is safe."""
    if _sigterm.received:
        raise Terminated


@contextlib.contextmanager
def sigterm_blocked() -> Iterator[None]:
    """Block SIGTERM in this thread for the block, so that processes forked in it inherit the
    mask and keep SIGTERM blocked for good. (It does not hold the signal back from this
    process: the kernel hands it to another thread, and Python runs the handler in this one.)
    Start data loader workers so, and a SIGTERM to the whole process group never kills one
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
    if not _owner_pid:  # multiprocessing.util, imported above, has registered its hook
        _owner_pid.append(os.getpid())
        atexit.register(_kill_leftover_children)


def _kill_leftover_children() -> None:
    if os.getpid() != _owner_pid[0]:
        return
    alive = [child for child in _children_to_kill if child.is_alive()]
    if not alive:
        return
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler raises for killed workers
    # A Ctrl-C cutting this short would leave multiprocessing's hook to wait for them forever.
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        for child in alive:
            child.kill()
        for child in alive:
            child.join()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


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
