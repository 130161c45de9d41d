"""Training end to end on digits: loss goes down, resume is exact, the weights load into ONNX."""

from __future__ import annotations

import csv
import json
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")

from _train_util import one_thread, start_and_signal  # noqa: E402, F401
from click.testing import CliRunner  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402
from test_train_data import make_folder  # noqa: E402

from mvcompile import onnx_io  # noqa: E402
from mvcompile.cli import main  # noqa: E402
from mvcompile.graphs.factory import create_mobilevit  # noqa: E402
from mvcompile.graphs.mobilevit import MobileViTConfig  # noqa: E402
from mvcompile.train.data import eval_item, load_data  # noqa: E402
from mvcompile.train.loop import train  # noqa: E402
from mvcompile.train.options import TrainOptions  # noqa: E402

TINY = TrainOptions(data="digits", resolution=64, epochs=2, batch_size=32, subset=192,
                    seed=1, name="tiny")


class Recorder:
    """Collects what the loop reports; optionally raises Ctrl-C at the start of an epoch."""

    def __init__(self, interrupt_at: int | None = None) -> None:
        self.losses: list[float] = []
        self.resolutions: set[int] = set()
        self.rows: list[dict] = []
        self.interrupt_at = interrupt_at

    def epoch_start(self, epoch: int, epochs: int, batches: int) -> None:
        if epoch == self.interrupt_at:
            raise KeyboardInterrupt

    def batch_end(self, loss: float, lr: float, resolution: int) -> None:
        self.losses.append(loss)
        self.resolutions.add(resolution)

    def epoch_end(self, row: dict) -> None:
        self.rows.append(row)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Recorder, object]:
    runs = tmp_path_factory.mktemp("runs")
    recorder = Recorder()
    result = train(replace(TINY, runs_dir=str(runs), epochs=4), recorder)
    return result.run_dir, recorder, result


def test_short_training_lowers_the_loss_and_writes_the_run_folder(tiny_run) -> None:
    run_dir, recorder, result = tiny_run
    assert len(recorder.losses) == 4 * 6  # 192 images / 32 per batch, 4 epochs
    assert recorder.resolutions == {64}
    first, last = np.mean(recorder.losses[:4]), np.mean(recorder.losses[-4:])
    assert last < 0.8 * first, (first, last)
    assert {p.name for p in run_dir.iterdir()} == {
        "best.safetensors", "last.safetensors", "last.pt", "metrics.csv", "curves.png",
        "run.json"}
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert all(0.0 <= float(r["val_acc"]) <= 1.0 for r in rows)
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    info = json.loads((run_dir / "run.json").read_text())
    assert info["classes"] == [str(i) for i in range(10)] and len(info["val_items"]) == 359
    assert result.best["val_acc"] == max(r["val_acc"] for r in recorder.rows)


def test_best_checkpoint_loads_into_the_onnx_graph_and_agrees(tiny_run) -> None:
    run_dir, _, result = tiny_run
    cfg = MobileViTConfig.for_size("xxs", resolution=64, num_classes=10)
    model, info = create_mobilevit(cfg, run_dir / "last.safetensors")
    assert info.kind == "checkpoint"
    proto = onnx_io.to_proto(model)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    val = load_data("digits").val
    x = np.stack([eval_item(val, i, 64) for i in range(16)])
    got = session.run(None, {"pixel_values": x})[0]
    with torch.no_grad():
        expected = result.model(torch.from_numpy(x)).numpy()
    assert np.abs(got - expected).max() <= 1e-4
    best = load_file(str(run_dir / "best.safetensors"))
    assert best["classifier.weight"].shape == (10, 320)


def test_mvcompile_build_loads_the_trained_weights(tiny_run, tmp_path: Path) -> None:
    run_dir, _, _ = tiny_run
    result = CliRunner().invoke(main, [
        "build", "--size", "xxs", "--weights", str(run_dir / "best.safetensors"),
        "--num-classes", "10", "--resolution", "64", "--latency-runs", "0",
        "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "model.onnx").is_file()


def test_resume_continues_exactly_where_the_run_stopped(tmp_path: Path) -> None:
    make_folder(tmp_path / "data" / "train", {"red": 12, "green": 12})
    make_folder(tmp_path / "data" / "val", {"red": 2, "green": 2})
    opts = replace(TINY, data=str(tmp_path / "data"), runs_dir=str(tmp_path), ema_decay=0.9,
                   dropout=0.1, epochs=3, subset=None, resolution=128, batch_size=4)
    straight = Recorder()
    train(replace(opts, name="straight"), straight)
    with pytest.raises(KeyboardInterrupt):
        train(replace(opts, name="stopped"), Recorder(interrupt_at=3))
    stopped = tmp_path / "stopped"
    assert torch.load(stopped / "last.pt", weights_only=True)["epoch"] == 2
    resumed = Recorder()
    train(replace(opts, name="stopped", resume=str(stopped)), resumed)
    assert resumed.losses == straight.losses[-len(resumed.losses):]
    assert straight.resolutions == {64, 128}
    a = load_file(str(tmp_path / "straight" / "last.safetensors"))
    b = load_file(str(stopped / "last.safetensors"))
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    rows = list(csv.DictReader((stopped / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert list(tmp_path.rglob("*.tmp")) == []


def test_resume_uses_the_learning_rates_and_weight_decay_given_again(tmp_path: Path) -> None:
    """The checkpoint's optimizer state brought back the old weight decay and peak rate, so a
    resumed --lr-min 1e-4 ended at 4e-4 and --weight-decay stayed 0.01 (run.json said not)."""
    opts = replace(TINY, runs_dir=str(tmp_path), subset=64, batch_size=16)
    train(opts, Recorder())
    run_dir = tmp_path / "tiny"
    train(replace(opts, resume=str(run_dir), epochs=3, lr=5e-4, lr_min=1e-4,
                  weight_decay=0.5), Recorder())
    state = torch.load(run_dir / "last.pt", weights_only=False)
    group = state["optimizer"]["param_groups"][0]
    assert state["epoch"] == 3
    assert group["weight_decay"] == 0.5 and group["initial_lr"] == 5e-4
    assert group["lr"] == pytest.approx(1e-4)  # the end of the new cosine: --lr-min


def test_a_ctrl_c_while_an_epoch_is_written_waits_for_its_checkpoint(tmp_path: Path,
                                                                     monkeypatch) -> None:
    """Ctrl-C between last.safetensors and last.pt left the weights and metrics.csv one epoch
    ahead of the checkpoint that --resume and the summary go by."""
    from mvcompile.train import checkpoint as checkpoint_module

    save = checkpoint_module.save_checkpoint

    def interrupted_save(path, state) -> None:
        os.kill(os.getpid(), signal.SIGINT)  # as if pressed just before last.pt is written
        save(path, state)

    monkeypatch.setattr(checkpoint_module, "save_checkpoint", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        train(replace(TINY, runs_dir=str(tmp_path), subset=64, batch_size=16), Recorder())
    run_dir = tmp_path / "tiny"
    assert torch.load(run_dir / "last.pt", weights_only=False)["epoch"] == 1
    assert [r["epoch"] for r in csv.DictReader((run_dir / "metrics.csv").open())] == ["1"]


def _cli(*args: str) -> object:
    return CliRunner().invoke(main, ["train", *args])


def test_resume_from_another_size_fails_clearly(tiny_run) -> None:
    run_dir, _, _ = tiny_run
    result = _cli("--resume", str(run_dir), "--size", "xs", "--resolution", "64")
    assert result.exit_code == 1
    assert "trained as MobileViT-XXS" in result.output and "MobileViT-XS," in result.output
    assert isinstance(result.exception, SystemExit)  # handled: no traceback


def test_starting_over_an_existing_run_is_refused(tiny_run) -> None:
    run_dir, _, _ = tiny_run
    result = _cli("--runs-dir", str(run_dir.parent), "--name", run_dir.name)
    assert result.exit_code == 1 and "--resume" in result.output


def test_invalid_base_resolution_is_a_user_error(tmp_path: Path) -> None:
    result = _cli("--resolution", "96", "--runs-dir", str(tmp_path))
    assert result.exit_code == 1 and "multiple of 64" in result.output


@pytest.mark.parametrize(("counts", "message"), [
    ({}, "is empty for training"), ({"solo": 4}, "only one class"),
])
def test_bad_data_folders_fail_cleanly_from_the_cli(tmp_path: Path, counts: dict, message: str
                                                    ) -> None:
    data = make_folder(tmp_path / "data", counts) if counts else tmp_path
    result = _cli("--data", str(data), "--runs-dir", str(tmp_path / "runs"))
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and message in result.output
    assert isinstance(result.exception, SystemExit)  # handled: no traceback


def test_ctrl_c_leaves_the_last_complete_checkpoint_intact(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "data", {"red": 12, "green": 12})
    cmd = [sys.executable, "-m", "mvcompile.train", "--data", str(data), "--resolution", "64",
           "--epochs", "100", "--batch-size", "4", "--runs-dir", str(tmp_path), "--name", "run"]
    last = tmp_path / "run" / "last.pt"
    # 0.7 s: into a later epoch, possibly in the middle of writing a checkpoint
    code, err, out = start_and_signal(cmd, last, signal.SIGINT, 0.7)
    assert code == 130, err[-2000:]
    assert "Interrupted" in err and "Traceback" not in err
    assert f"--resume {tmp_path / 'run'}" in err and "NAME" not in err
    state = torch.load(last, weights_only=True)
    assert 1 <= state["epoch"] < 100
    # the summary table of what was saved, read back from last.pt
    assert f"{state['epoch']} of 100 saved, then interrupted" in out, out
    assert f"mvcompile train --resume {tmp_path / 'run'}" in out
    assert f"{state['history'][-1]['val_acc']:.2%}" in out
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    assert len(rows) in (state["epoch"], state["epoch"] + 1)  # metrics precede last.pt
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]
