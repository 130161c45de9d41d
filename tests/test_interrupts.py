"""Ctrl-C held back around code that would swallow it, then raised."""

from __future__ import annotations

import os
import signal

import pytest

from mvcompile.interrupts import deferred_interrupt


def test_sigint_inside_the_block_is_raised_after_it() -> None:
    handler = signal.getsignal(signal.SIGINT)
    finished = False
    with pytest.raises(KeyboardInterrupt), deferred_interrupt():
        try:
            os.kill(os.getpid(), signal.SIGINT)
        except BaseException:  # what a bare `except:` in a third-party import would do
            pytest.fail("the interrupt reached the block")
        finished = True
    assert finished  # the block ran to its end before the interrupt was raised
    assert signal.getsignal(signal.SIGINT) is handler  # the earlier handler is back


def test_a_block_without_sigint_is_left_alone() -> None:
    with deferred_interrupt():
        value = 1
    assert value == 1
