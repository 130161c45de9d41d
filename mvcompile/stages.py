"""Long library work announced to whoever listens: the CLI draws it as progress bars.

The library calls :func:`start` and :func:`advance`; a command that wants bars wraps the call
in :func:`reporting_to` with a listener (:class:`StageListener`). Without one,
stages are only logged. A context variable rather than a parameter, so that functions deep in
a call chain (a timing inside a measured choice inside a fixed-batch attempt) report without
every caller passing a listener along.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Protocol

log = logging.getLogger(__name__)


class StageListener(Protocol):
    """What long work is reported to: the builder's ``Progress``; the CLI draws bars."""

    def start(self, label: str, total: int) -> None: ...
    def advance(self, n: int = 1) -> None: ...
    def finish(self) -> None: ...


_LISTENER: ContextVar[StageListener | None] = ContextVar("mvcompile_stage_listener",
                                                         default=None)


@contextmanager
def reporting_to(listener: StageListener) -> Iterator[None]:
    """Send the stages started inside the block to ``listener``; close its last one after."""
    token = _LISTENER.set(listener)
    try:
        yield
    finally:
        listener.finish()
        _LISTENER.reset(token)


def start(label: str, total: int = 1) -> None:
    """A new stage of ``total`` steps (1: a single step, done at the next :func:`advance`)."""
    log.info("%s", label)
    listener = _LISTENER.get()
    if listener is not None:
        listener.start(label, total)


def advance(n: int = 1) -> None:
    listener = _LISTENER.get()
    if listener is not None:
        listener.advance(n)
