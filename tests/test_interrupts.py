"""Ctrl-C held back around code that would swallow it, then raised; SIGTERM held back while
data loader workers start, and workers immune to it killed at exit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from mvcompile.interrupts import (
    Terminated,
    deferred_interrupt,
    raise_if_terminated,
    sigterm_as_stop_request,
    stop_requested,
)


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


# SIGTERM around the start of data loader workers ------------------------------------------

def test_sigterms_are_recorded_and_raised_where_the_work_checks_for_them() -> None:
    """Not raised wherever Python happens to be (in a destructor, Python prints such an
    exception and drops it); more than one changes nothing (``timeout`` and job schedulers
    signal the process and then its group)."""
    before = signal.getsignal(signal.SIGTERM)
    with sigterm_as_stop_request():
        raise_if_terminated()  # nothing received: goes on
        assert not stop_requested()
        for _ in range(3):
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before kill returns
        assert stop_requested()
        with pytest.raises(Terminated):
            raise_if_terminated()
    assert not stop_requested()  # outside the block, the signals are forgotten
    raise_if_terminated()
    assert signal.getsignal(signal.SIGTERM) is before


_CUT_OFF_LOADER = """
import signal, sys
import torch
from torch.utils.data import dataloader
from mvcompile.interrupts import Terminated, raise_if_terminated, sigterm_as_stop_request
from mvcompile.train.loop import WorkersKeepRunning

build_rest = dataloader._MultiProcessingDataLoaderIter._reset

def sigterm_mid_start(self, *args, **kwargs):  # the workers run, their bookkeeping does not
    signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
    return build_rest(self, *args, **kwargs)

dataloader._MultiProcessingDataLoaderIter._reset = sigterm_mid_start
with sigterm_as_stop_request():
    batches = iter(WorkersKeepRunning(torch.arange(4), batch_size=2, num_workers=2))
    try:
        raise_if_terminated()
    except Terminated:
        print("terminated after", next(batches).tolist())
"""


def test_a_sigterm_while_workers_start_neither_half_builds_the_loader_nor_hangs_exit() -> None:
    """Cut off half-way by a raising handler, torch's iterator could not stop its workers (its
    ``__del__`` printed an AttributeError traceback) and, as they ignore ``terminate``,
    multiprocessing's exit hook waited for them forever."""
    done = subprocess.run([sys.executable, "-c", _CUT_OFF_LOADER], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "terminated after [0, 1]"
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr


_STRAY_WORKER = """
import multiprocessing, time
from mvcompile.interrupts import sigterm_immune_children

with sigterm_immune_children():
    worker = multiprocessing.Process(target=time.sleep, args=(600,), daemon=True)
    worker.start()
print(worker.pid)
"""


def test_children_immune_to_sigterm_are_killed_when_the_process_exits() -> None:
    done = subprocess.run([sys.executable, "-c", _STRAY_WORKER], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    with pytest.raises(ProcessLookupError):
        os.kill(int(done.stdout), 0)  # gone (a sleeping orphan would still be there)


def test_ctrl_c_while_the_cli_loads_is_a_note_not_a_traceback(monkeypatch, capsys) -> None:
    """The mvcompile command imports the CLI (onnx, ONNX Runtime: about a second) inside a
    Ctrl-C handler; before, a Ctrl-C then printed a traceback."""
    import builtins

    from mvcompile import _entry

    real_import = builtins.__import__

    def interrupted_import(name, *args, **kwargs):
        if name == "mvcompile.cli":
            raise KeyboardInterrupt
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", interrupted_import)
    with pytest.raises(SystemExit) as exit_info:
        _entry.main()
    assert exit_info.value.code == 130
    assert "Interrupted; no output was written." in capsys.readouterr().err


# SIGTERM and a closed pipe in the other commands -----------------------------------------

CLI = [sys.executable, "-c", "from mvcompile._entry import main; main()"]


def test_a_sigterm_during_build_removes_its_staging_folder(tmp_path) -> None:
    """Python's default SIGTERM ends the process at once; the staged outputs were left in a
    hidden folder beside the output for good."""
    import time

    proc = subprocess.Popen([*CLI, "build", "--resolution", "64", "--latency-runs", "0",
                             "--targets", "onnx,ort", "-o", str(tmp_path / "out")],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".mvcompile-stage-*")) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    assert list(tmp_path.glob(".mvcompile-stage-*")), "the build never staged its outputs"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert "Terminated; no output was written." in stderr and "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []


def test_sigterm_inside_a_deferred_block_is_raised_after_it_as_terminated() -> None:
    finished = False
    with pytest.raises(Terminated), deferred_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        finished = True
    assert finished


def test_a_reader_that_closes_the_pipe_ends_the_command_quietly(tmp_path) -> None:
    """`mvcompile info M | head -1`: the rest of the table meets a closed pipe."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Relu", [f"x{i}"], [f"x{i + 1}"]) for i in range(300)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x0", TensorProto.FLOAT,
                                                                         [1])],
                              [helper.make_tensor_value_info("x300", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    import onnx

    onnx.save(model, str(tmp_path / "m.onnx"))
    proc = subprocess.Popen([*CLI, "info", str(tmp_path / "m.onnx")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, bufsize=0)
    proc.stdout.close()  # before the table is written: every write finds the pipe closed
    stderr = proc.stderr.read()
    assert proc.wait(timeout=120) == 141, stderr
    assert "Error" not in stderr and "Traceback" not in stderr and "Exception" not in stderr


def test_an_ignored_sigterm_stays_ignored_inside_a_deferred_block() -> None:
    """A Python-API caller whose process ignores SIGTERM got Terminated out of build()'s
    coremltools import; now the block leaves an ignored signal ignored."""
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with deferred_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_deferred_sigterm_goes_to_the_applications_own_handler() -> None:
    calls: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, _frame: calls.append(signum))
    try:
        with deferred_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            assert calls == []  # held back inside the block
        assert calls == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)
