"""Helpers shared by the `mvcompile train` tests (they need torch: import after importorskip)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result

from mvcompile.cli import main

# A one-epoch run on a few images at 64², for tests of everything but the learning.
QUICK = ("--resolution", "64", "--epochs", "1", "--batch-size", "4", "--no-multiscale")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: far faster than two on a shared, oversubscribed CPU. Import it
    into a test module to apply it there."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train_cli(*args: str) -> Result:
    """``mvcompile train ARGS`` in-process."""
    return CliRunner().invoke(main, ["train", *args])


def assert_clean_error(result: Result, *phrases: str) -> None:
    """Exit status 1 with an 'Error: ' line holding each phrase (notes may come first), and
    no traceback."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)  # handled: no traceback
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert errors and "Traceback" not in result.output, result.output
    for phrase in phrases:
        assert phrase in result.output, result.output


def _default_sigint() -> None:
    """In the child before exec: SIGINT as a terminal's Ctrl-C delivers it. A shell starts
    background jobs (`cmd &`, nohup) with SIGINT ignored, which the child would inherit, and
    then Python installs no KeyboardInterrupt handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_and_signal(cmd: list[str], last: Path, signum: int, wait_s: float
                     ) -> tuple[int, str, str]:
    """Start ``cmd`` (a training run), send ``signum`` ``wait_s`` after its first checkpoint
    ``last`` appears, and return its exit status, stderr and stdout."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=_default_sigint)
    deadline = time.monotonic() + 120
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(wait_s)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    return proc.returncode, err, out
