"""The run folder: unwritable folders fail up front, --overwrite starts clean, run.json tells
the truth about the run (--subset, resumes), damaged checkpoints and finished runs are named."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from _train_util import QUICK, one_thread  # noqa: E402, F401
from _train_util import assert_clean_error as _assert_clean_error
from _train_util import train_cli as _cli
from test_train_data import make_folder  # noqa: E402

from mvcompile.train import checkpoint, cli, loop, outputs  # noqa: E402


def _no_data_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    def load_data(*_: object) -> None:
        pytest.fail("data loaded before the run folder was checked")
    monkeypatch.setattr(loop, "load_data", load_data)


def _earlier_run(run_dir: Path) -> dict[str, bytes]:
    """Stand-ins for every file a run writes, a half-written temporary one and a user's file."""
    run_dir.mkdir(parents=True)
    files = {name: f"old {name}".encode() for name in outputs.RUN_FILES}
    files[".last.pt.x1y2.tmp"] = b"half written"
    files["notes.txt"] = b"mine"
    for name, data in files.items():
        (run_dir / name).write_bytes(data)
    return files


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return make_folder(tmp_path / "data", {"red": 10, "green": 10}, size=(12, 12))


def test_run_folder_under_a_file_fails_before_loading_data(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "somefile.py"
    blocker.write_text("")
    _no_data_loading(monkeypatch)
    result = _cli(*QUICK, "--runs-dir", str(blocker / "runs"))
    _assert_clean_error(result, f"Cannot write the run folder {blocker / 'runs'}",
                        f"{blocker} is a file, not a folder")


def test_checking_the_run_folder_leaves_no_folder_behind_when_the_run_fails(
        tmp_path: Path) -> None:
    result = _cli(*QUICK, "--data", str(tmp_path / "nope"), "--runs-dir",
                  str(tmp_path / "new" / "runs"))
    _assert_clean_error(result, "no such folder")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("resume", [False, True])
def test_unwritable_run_folder_fails_before_any_training(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, resume: bool) -> None:
    """Tests run as root, where chmod does not stop writes: the failure is simulated."""
    run_dir = tmp_path / "runs" / "r"
    args = [*QUICK, "--runs-dir", str(tmp_path / "runs"), "--name", "r"]
    if resume:
        run_dir.mkdir(parents=True)
        checkpoint.save_checkpoint(run_dir / checkpoint.LAST, {"options": {}, "epoch": 1})
        args = ["--resume", str(run_dir), "--epochs", "2"]
    before = sorted(tmp_path.rglob("*"))

    def refused(*_: object, **kw: object) -> None:
        raise PermissionError(13, "Permission denied", kw.get("dir"))

    monkeypatch.setattr(tempfile, "mkstemp", refused)
    _no_data_loading(monkeypatch)
    result = _cli(*args)
    _assert_clean_error(result, f"Cannot write the run folder {run_dir}: Permission denied.")
    assert sorted(tmp_path.rglob("*")) == before


def test_overwrite_deletes_only_the_earlier_runs_files_and_a_ctrl_c_says_nothing_was_saved(
        tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = tmp_path / "runs" / "r"
    _earlier_run(run_dir)

    def interrupted(*_: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.ProgressReporter, "epoch_start", interrupted)
    result = _cli(*QUICK, "--data", str(data), "--runs-dir", str(tmp_path / "runs"),
                  "--name", "r", "--overwrite")
    assert result.exit_code == 130, result.output
    assert "no epoch was saved" in result.output and f"nothing to resume in {run_dir}" in \
        result.output and "--resume" not in result.output
    assert sorted(p.name for p in run_dir.iterdir()) == ["notes.txt", "run.json"]
    assert json.loads((run_dir / "run.json").read_text())["options"]["overwrite"] is True
    resumed = _cli("--resume", str(run_dir))
    _assert_clean_error(resumed, "no such checkpoint")


def test_overwrite_interrupted_before_the_run_starts_keeps_the_earlier_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = tmp_path / "runs" / "r"
    files = _earlier_run(run_dir)

    def interrupted(*_: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "load_data", interrupted)
    result = _cli(*QUICK, "--runs-dir", str(tmp_path / "runs"), "--name", "r", "--overwrite")
    assert result.exit_code == 130, result.output
    assert f"{run_dir} still holds the earlier run" in result.output
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == files


def test_a_fresh_run_refuses_a_folder_with_an_earlier_runs_weights(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "r"
    _earlier_run(run_dir)
    (run_dir / checkpoint.LAST).unlink()
    result = _cli(*QUICK, "--runs-dir", str(tmp_path / "runs"), "--name", "r")
    _assert_clean_error(result, "holds files of an earlier run (best.safetensors",
                        "--overwrite")
    assert (run_dir / outputs.BEST).read_bytes() == b"old best.safetensors"


def test_resume_and_overwrite_together_are_refused(tmp_path: Path) -> None:
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    checkpoint.save_checkpoint(run_dir / checkpoint.LAST, {"options": {}, "epoch": 1})
    result = _cli("--resume", str(run_dir), "--overwrite")
    _assert_clean_error(result, "--resume and --overwrite contradict each other")


def test_a_run_resumed_under_another_name_keeps_off_other_runs_and_brings_its_best(
        tmp_path: Path, data: Path) -> None:
    """--resume A --name B wrote into B although it held another run (its last.pt, metrics
    and run.json replaced, its best.safetensors left: build --weights B built the wrong
    model); into a new folder it left no best.safetensors although the summary named one."""
    runs = tmp_path / "runs"
    first = _cli(*QUICK, "--data", str(data), "--subset", "8", "--runs-dir", str(runs),
                 "--name", "a")
    assert first.exit_code == 0, first.output
    other = _earlier_run(runs / "b")
    into_other = _cli("--resume", str(runs / "a"), "--epochs", "2", "--runs-dir", str(runs),
                      "--name", "b")
    _assert_clean_error(into_other, f"{runs / 'b'} already holds a run")
    assert {p.name: p.read_bytes() for p in (runs / "b").iterdir()} == other
    branched = _cli("--resume", str(runs / "a"), "--epochs", "2", "--runs-dir", str(runs),
                    "--name", "c")
    assert branched.exit_code == 0, branched.output
    assert (runs / "c" / outputs.BEST).is_file() and (runs / "c" / checkpoint.LAST).is_file()
    # the error above says "start over with --overwrite": with --resume under another name,
    # that clears b (it was refused as contradicting --resume, sending the user in a circle)
    replaced = _cli("--resume", str(runs / "a"), "--epochs", "2", "--runs-dir", str(runs),
                    "--name", "b", "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    info = json.loads((runs / "b" / "run.json").read_text())
    assert info["resumes"][-1]["from"] == str(runs / "a" / "last.pt")


def test_run_json_records_the_subset_and_each_resume_and_a_finished_run_says_so(
        tmp_path: Path, data: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    runs = tmp_path / "runs"
    first = _cli(*QUICK, "--data", str(data), "--subset", "8", "--runs-dir", str(runs),
                 "--name", "r")
    assert first.exit_code == 0, first.output
    run_dir = runs / "r"
    info = json.loads((run_dir / "run.json").read_text())
    assert info["data"] == f"{data}: 2 classes, 8 train (--subset of 18) / 2 val (--val-split 0.1)"
    assert (info["train_images"], info["val_images"], info["resumes"]) == (8, 2, [])

    resumed = _cli("--resume", str(run_dir), "--epochs", "2", "--resolution", "128")
    assert resumed.exit_code == 0, resumed.output
    info = json.loads((run_dir / "run.json").read_text())
    assert (info["options"]["epochs"], info["options"]["resolution"]) == (2, 128)
    assert info["model"]["resolution"] == 128 and info["train_images"] == 8
    assert info["resumes"] == [{"from": str(run_dir / "last.pt"), "after_epoch": 1,
                                "changed": {"resolution": [64, 128], "epochs": [1, 2]}}]

    before = (run_dir / "run.json").read_bytes()
    finished = _cli("--resume", str(run_dir))
    assert finished.exit_code == 0, finished.output
    assert (f"{run_dir} has 2 epochs done and --epochs is 2, so nothing was trained; pass "
            "--epochs M (> 2) to train longer" in finished.output)
    assert "epoch 1/" not in finished.output and "epoch 3/" not in finished.output
    assert (run_dir / "run.json").read_bytes() == before
    caplog.clear()
    fewer = _cli("--resume", str(run_dir), "--epochs", "1", "--lr", "0.01")
    assert fewer.exit_code == 0, fewer.output
    assert "has 2 epochs done and --epochs is 1, so nothing was trained" in fewer.output
    # nothing is trained, so the changed recipe (lr) is not warned about
    assert [r for r in caplog.records if "will not reproduce" in r.getMessage()] == []
    monkeypatch.setenv("RANK", "1")  # under torchrun, rank 0 alone says it
    other_rank = _cli("--resume", str(run_dir), "--epochs", "1")
    assert other_rank.exit_code == 0, other_rank.output
    assert "nothing was trained" not in other_rank.output


def test_a_failed_write_after_an_epoch_is_a_clean_error(
        tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def disk_full(*_: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_checkpoint", disk_full)
    result = _cli(*QUICK, "--data", str(data), "--runs-dir", str(tmp_path), "--name", "r")
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert result.output.startswith("epoch 1/1\nError: Cannot write the run folder "
                                    f"{tmp_path / 'r'}: No space left on device.")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "pickled object"])
def test_a_damaged_checkpoint_is_named_without_torchs_unsafe_advice(
        tmp_path: Path, damage: str) -> None:
    last = tmp_path / "r" / checkpoint.LAST
    last.parent.mkdir()
    checkpoint.save_checkpoint(last, {"options": {}, "model": {"w": torch.zeros(4096)}})
    whole = last.read_bytes()
    last.write_bytes({"garbage": bytes(range(256)) * 4, "truncated": whole[:len(whole) // 2],
                      "empty": b"", "pickled object": b"\x80\x04cbuiltins\nobject\n."}[damage])
    result = _cli("--resume", str(last.parent))
    _assert_clean_error(result, f"{last} is not a readable checkpoint (it may be truncated or "
                                "corrupt")
    assert "weights_only" not in result.output and "arbitrary code" not in result.output
    assert "miniz" not in result.output and len(result.output) < 400


def test_an_image_that_fails_to_decode_in_a_worker_is_a_one_line_error(
        tmp_path: Path, data: Path) -> None:
    """A JPEG cut short in its pixel data passes the header check and fails mid-epoch; from a
    DataLoader worker (--workers 1) torch re-raised it with the worker's whole traceback as
    the message."""
    from PIL import Image

    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(data / "red" / "cut.jpg", quality=95)
    whole = (data / "red" / "cut.jpg").read_bytes()
    (data / "red" / "cut.jpg").write_bytes(whole[:len(whole) // 2])
    result = _cli(*QUICK, "--data", str(data), "--runs-dir", str(tmp_path / "runs"),
                  "--workers", "1", "--val-split", "0.5")
    _assert_clean_error(result, "cut.jpg")
    error = next(line for line in result.output.splitlines() if line.startswith("Error: "))
    assert "DataLoader worker" not in result.output and "Original Traceback" not in error
