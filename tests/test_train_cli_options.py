"""``mvcompile train`` options: bad values fail cleanly, --resume reuses the saved options."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from mvcompile.cli import main
from mvcompile.train.options import TrainOptions, resumed_options

QUICK = ("--data", "digits", "--resolution", "64", "--subset", "128", "--batch-size", "32")


def _cli(*args: str) -> Result:
    return CliRunner().invoke(main, ["train", *args])


@pytest.fixture
def torch_one_thread():
    """torch with one intra-op thread: far faster on a shared, oversubscribed CPU."""
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield torch
    torch.set_num_threads(threads)


@pytest.mark.parametrize(("option", "value"), [
    ("--lr", "0"), ("--lr", "-1"), ("--lr-init", "-1"), ("--lr-min", "-1"), ("--seed", "-1"),
    ("--workers", "-1"), ("--dropout", "1.5"), ("--dropout", "1"),
    ("--classifier-dropout", "2"), ("--label-smoothing", "2"), ("--label-smoothing", "-0.1"),
    ("--weight-decay", "-1"), ("--warmup-steps", "-3"), ("--subset", "0"),
    ("--subset", "-5"), ("--epochs", "0"), ("--batch-size", "0"),
    ("--lr", "nan"), ("--lr-init", "nan"), ("--weight-decay", "nan"), ("--dropout", "nan"),
])
def test_out_of_range_options_fail_before_a_run_folder_exists(tmp_path: Path, option: str,
                                                              value: str) -> None:
    runs = tmp_path / "runs"
    result = _cli(*QUICK, "--epochs", "1", "--runs-dir", str(runs), option, value)
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit)  # handled: no traceback
    assert option in result.output and "Traceback" not in result.output
    assert not runs.exists()


def test_resumed_options_keep_the_saved_ones_unless_given_explicitly(
        caplog: pytest.LogCaptureFixture) -> None:
    saved = vars(TrainOptions(resolution=64, epochs=1, batch_size=32, subset=128, name="t1",
                              runs_dir="/elsewhere", resume=None))
    given = vars(TrainOptions(epochs=2, resume="/tmp/x/t1", runs_dir="/tmp/x"))
    with caplog.at_level(logging.INFO):
        options = resumed_options(saved, given, explicit={"epochs", "resume", "runs_dir"})
    assert (options.resolution, options.batch_size, options.subset) == (64, 32, 128)
    assert (options.epochs, options.resume, options.runs_dir, options.name) == (
        2, "/tmp/x/t1", "/tmp/x", None)
    assert "epochs 1 -> 2" in caplog.text and "resolution" not in caplog.text


def test_resume_with_only_more_epochs_keeps_the_saved_recipe(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, torch_one_thread) -> None:
    torch = torch_one_thread
    runs = tmp_path / "runs"
    first = _cli(*QUICK, "--epochs", "1", "--name", "t1", "--runs-dir", str(runs))
    assert first.exit_code == 0, first.output
    run_dir = runs / "t1"
    with caplog.at_level(logging.WARNING):
        resumed = _cli("--resume", str(run_dir), "--epochs", "2")
    assert resumed.exit_code == 0, resumed.output
    assert "epochs 1 -> 2" in caplog.text
    assert "resolution" not in caplog.text and "batch_size" not in caplog.text
    state = torch.load(run_dir / "last.pt", weights_only=True)
    options = state["options"]
    assert (options["resolution"], options["batch_size"], options["subset"]) == (64, 32, 128)
    assert (state["epoch"], options["epochs"]) == (2, 2)
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert "epoch 2/2" in resumed.output and "epoch 1/2" not in resumed.output
    assert [p.name for p in runs.iterdir()] == ["t1"]


@pytest.mark.parametrize("resume", [False, True])
def test_ctrl_c_names_the_real_run_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          resume: bool) -> None:
    pytest.importorskip("torch")
    from mvcompile.train import checkpoint, loop

    def interrupted(*_: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "train", interrupted)
    run_dir = tmp_path / "runs" / "mine"
    args = ["--runs-dir", str(tmp_path / "runs"), "--name", "mine"]
    if resume:
        run_dir.mkdir(parents=True)
        checkpoint.save_checkpoint(run_dir / checkpoint.LAST, {"options": {}})
        args = ["--resume", str(run_dir)]
    result = _cli(*args)
    assert result.exit_code == 130 and "NAME" not in result.output
    expected = f"--resume {run_dir}" if resume else f"nothing to resume in {run_dir}"
    assert expected in result.output


def test_running_out_of_memory_is_an_error_message(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")
    from mvcompile.train import loop

    def huge_batch(*_: object) -> None:
        torch.empty(2**48)  # 1 PiB: beyond any address space, so refused under any overcommit

    monkeypatch.setattr(loop, "train", huge_batch)
    result = _cli("--runs-dir", str(tmp_path / "runs"), "--name", "big")
    assert result.exit_code == 1, result.output
    assert "Error: Out of memory: 1,024.0 TiB were asked for." in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_ctrl_c_before_training_starts_exits_130_with_a_note(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C while torch was imported or --resume's checkpoint read: click printed 'Aborted!'
    and exited 1."""
    pytest.importorskip("torch")
    from mvcompile.train import cli as train_cli

    def interrupted(*_: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(train_cli, "_options", interrupted)
    result = _cli("--epochs", "1")
    assert result.exit_code == 130, result.output
    assert "Interrupted before training started; nothing was written." in result.output
    assert "Aborted" not in result.output
