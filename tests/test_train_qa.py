"""``mvcompile train`` QA fixes: unreadable images found before training, the closing summary,
notes on odd options, --data FILE, SIGTERM like Ctrl-C, and --init-weights (fine-tuning)."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from _train_util import QUICK, one_thread, start_and_signal  # noqa: E402, F401
from _train_util import assert_clean_error as _assert_clean_error
from _train_util import train_cli as _cli
from click.testing import CliRunner, Result  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402
from test_train_data import make_folder  # noqa: E402

from mvcompile.cli import main  # noqa: E402
from mvcompile.errors import UserError  # noqa: E402
from mvcompile.interrupts import raise_if_terminated  # noqa: E402
from mvcompile.train import cli, loop  # noqa: E402
from mvcompile.train.data import image_problem, load_data, unreadable_images  # noqa: E402
from mvcompile.train.distributed import Dist  # noqa: E402
from mvcompile.train.model import export_state_dict  # noqa: E402
from mvcompile.train.options import TrainOptions, odd_option_notes  # noqa: E402

CPU = Dist(0, 1, 0, torch.device("cpu"))


def _stop_at_first_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C as the first epoch starts: everything before training has run."""
    def interrupted(*_: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.ProgressReporter, "epoch_start", interrupted)


def _summary(output: str) -> dict[str, str]:
    """The rows of the closing summary table, {label: value}."""
    table = output[output.index("mvcompile train  summary"):].splitlines()[2:]
    return dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in table if line.strip())


class Notes:
    """A reporter that keeps the notes (the CLI prints them as yellow Note: lines)."""

    def __init__(self) -> None:
        self.notes: list[str] = []

    def epoch_start(self, epoch: int, epochs: int, batches: int) -> None: ...
    def batch_end(self, loss: float, lr: float, resolution: int) -> None: ...
    def epoch_end(self, row: dict) -> None: ...

    def note(self, message: str) -> None:
        self.notes.append(message)


@pytest.fixture(scope="module")
def two_classes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_folder(tmp_path_factory.mktemp("data2"), {"red": 10, "green": 10}, size=(12, 12))


@pytest.fixture(scope="module")
def source_run(tmp_path_factory: pytest.TempPathFactory, two_classes: Path
               ) -> tuple[Path, Result]:
    """A finished one-epoch run on two classes, through the CLI: (run folder, its result)."""
    runs = tmp_path_factory.mktemp("runs")
    result = _cli(*QUICK, "--data", str(two_classes), "--runs-dir", str(runs), "--name", "src")
    assert result.exit_code == 0, result.output
    return runs / "src", result


# 1. Unreadable images -------------------------------------------------------------------------

def _damage(folder: Path) -> dict[str, Path]:
    """One file of each kind of damage in ``folder``/red (replacing good images)."""
    good = (folder / "red" / "0.png").read_bytes()
    files = {"garbage": folder / "red" / "1.png", "empty": folder / "red" / "2.png",
             "truncated": folder / "red" / "3.png", "text": folder / "red" / "4.jpg"}
    files["garbage"].write_bytes(bytes(range(256)))
    files["empty"].write_bytes(b"")
    files["truncated"].write_bytes(good[:len(good) // 2])
    files["text"].write_text("not a picture")
    return files


def test_image_problem_finds_damaged_files_and_passes_good_ones(tmp_path: Path) -> None:
    folder = make_folder(tmp_path, {"red": 6}, size=(32, 32))
    files = _damage(folder)
    Image.fromarray(np.zeros((4, 4), np.float32), mode="F").save(folder / "red" / "f.tif")
    assert image_problem(folder / "red" / "0.png") is None
    assert image_problem(folder / "red" / "5.png") is None
    for path in files.values():
        assert image_problem(path), path
    assert "floating-point" in image_problem(folder / "red" / "f.tif")
    done: list[int] = []
    bad = unreadable_images(sorted((folder / "red").iterdir()), done.append, every=3)
    assert [Path(p).name for p, _ in bad] == ["1.png", "2.png", "3.png", "4.jpg", "f.tif"]
    assert done == [3, 6, 8]


def test_unreadable_images_stop_the_run_before_training_with_one_list(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_folder(tmp_path / "data", {"red": 12, "green": 12}, size=(12, 12))
    for i in range(8):  # with _damage, 12 bad files: ten are listed, then a count
        (data / "green" / f"{i}.png").write_bytes(b"")
    files = _damage(data)

    def no_training(*_: object) -> None:
        pytest.fail("training started despite unreadable images")

    monkeypatch.setattr(loop, "train_epoch", no_training)
    result = _cli(*QUICK, "--data", str(data), "--runs-dir", str(tmp_path / "runs"))
    _assert_clean_error(result, "12 of the 25 images cannot be read; training has not started",
                        "... and 2 more", "Remove or replace them")
    listed = [line for line in result.output.splitlines() if line.startswith(f"  {data}")]
    assert len(listed) == 10
    assert f"{files['empty']}: not an image Pillow can read" in result.output
    assert not (tmp_path / "runs").exists()


def test_a_slow_image_check_shows_a_progress_bar(capsys: pytest.CaptureFixture,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    reporter = cli.ProgressReporter()
    for done in (0, 200, 400, 500):  # a quick check: no bar
        reporter.images_checked(done, 500)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(cli, "CHECK_BAR_AFTER_S", 0.0)
    for done in (0, 200, 400, 500):
        reporter.images_checked(done, 500)
    assert "checking images" in capsys.readouterr().err and reporter.bar is None


def test_a_folder_of_good_images_passes_the_check(two_classes: Path) -> None:
    data = load_data(str(two_classes))
    loop.check_images(data, CPU, Notes())  # no error


# 2. The closing summary -----------------------------------------------------------------------

def test_the_summary_names_the_run_its_files_and_a_build_command_that_works(
        source_run: tuple[Path, Result], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
        ) -> None:
    run_dir, result = source_run
    rows = _summary(result.output)
    assert rows["run folder"] == str(run_dir)
    assert rows["epochs"].startswith("1 of 1, ") and rows["epochs"].endswith(" s")
    assert re.fullmatch(r"\d+\.\d\d% at epoch 1", rows["best val acc"])
    assert rows["files"] == ("best.safetensors, last.safetensors, last.pt, run.json, "
                             "metrics.csv, curves.png")
    command = shlex.split(rows["next"])
    assert command[:4] == ["mvcompile", "build", "--weights", str(run_dir / "best.safetensors")]
    monkeypatch.chdir(tmp_path)
    built = CliRunner().invoke(main, [*command[1:], "--latency-runs", "0"])
    assert built.exit_code == 0, built.output
    assert (tmp_path / "out" / "src" / "model.onnx").is_file()


def test_the_summary_of_a_resumed_run_says_where_it_resumed(source_run: tuple[Path, Result],
                                                             tmp_path: Path) -> None:
    run_dir, _ = source_run
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in run_dir.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    result = _cli("--resume", str(copy), "--epochs", "2")
    assert result.exit_code == 0, result.output
    assert _summary(result.output)["epochs"].startswith("2 of 2 (resumed after epoch 1: 1 now, ")


# 3. Odd options -------------------------------------------------------------------------------

def test_odd_options_are_noted_before_training(two_classes: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _stop_at_first_epoch(monkeypatch)
    result = _cli(*QUICK, "--data", str(two_classes), "--runs-dir", str(tmp_path),
                  "--lr", "0.001", "--lr-min", "0.01", "--lr-init", "0.005", "--subset", "500",
                  "--amp")
    assert result.exit_code == 130, result.output
    for note in ("Note: --lr-init 0.005 is above --lr 0.001",
                 "Note: --lr-min 0.01 is above --lr 0.001",
                 "Note: --subset 500 is more than the 18 training images; the whole training "
                 "set is used.",
                 "Note: --amp has no effect here: bfloat16 autocast is used only on CUDA"):
        assert note in result.output, result.output


def test_ordinary_options_get_no_notes(two_classes: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    _stop_at_first_epoch(monkeypatch)
    result = _cli(*QUICK, "--data", str(two_classes), "--runs-dir", str(tmp_path),
                  "--subset", "18")
    assert result.exit_code == 130 and "Note:" not in result.output, result.output


def test_option_notes_know_when_they_apply() -> None:
    assert odd_option_notes(TrainOptions(amp=True), cuda=True) == []
    assert odd_option_notes(TrainOptions(lr_init=0.01, warmup_steps=0), cuda=False) == []
    assert len(odd_option_notes(TrainOptions(lr_init=0.01, lr_min=0.01), cuda=True)) == 2


@pytest.mark.parametrize(("name", "example"), [
    ("exp/run1", "--runs-dir {runs}/exp --name run1"), ("..", None), ("../x", "--name x"),
    ("a\\b", "--name b"),
])
def test_a_name_with_a_path_is_refused(tmp_path: Path, name: str, example: str | None) -> None:
    runs = tmp_path / "runs"
    result = _cli(*QUICK, "--runs-dir", str(runs), "--name", name)
    _assert_clean_error(result, f"--name {name!r} is a run name, not a path",
                        "pass that folder as --runs-dir")
    if example:
        assert example.format(runs=runs) in result.output
    assert list(tmp_path.iterdir()) == []


# 4. --data FILE -------------------------------------------------------------------------------

def test_data_that_is_a_file_says_so(tmp_path: Path) -> None:
    archive = tmp_path / "flowers.zip"
    archive.write_bytes(b"PK")
    result = _cli(*QUICK, "--data", str(archive), "--runs-dir", str(tmp_path / "runs"))
    _assert_clean_error(result, f"--data {archive} is a file, not a folder (an archive: "
                                "unpack it first)", "one subfolder of images per class",
                        "`digits`")
    assert "no such folder" not in result.output
    assert not (tmp_path / "runs").exists()
    image = make_folder(tmp_path / "d", {"a": 1}) / "a" / "0.png"
    result = _cli(*QUICK, "--data", str(image), "--runs-dir", str(tmp_path / "runs"))
    _assert_clean_error(result, f"--data {image} is a file, not a folder. --data wants")


# 5. SIGTERM -----------------------------------------------------------------------------------

@pytest.mark.parametrize("rank", [None, "1"])
def test_sigterm_stops_like_ctrl_c_with_status_143(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   rank: str | None) -> None:
    received: list[int] = []
    before = signal.signal(signal.SIGTERM, lambda signum, _: received.append(signum))
    try:
        def terminated(*_: object) -> None:
            os.kill(os.getpid(), signal.SIGTERM)
            raise_if_terminated()  # as the loop does between batches
            pytest.fail("SIGTERM did not stop the run")

        monkeypatch.setattr(loop, "train", terminated)
        if rank is not None:
            monkeypatch.setenv("RANK", rank)
        result = _cli("--runs-dir", str(tmp_path), "--name", "r")
        assert result.exit_code == 143, result.output
        assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
        if rank is None:
            assert f"Interrupted before the first epoch ended; no epoch was saved, so there is " \
                   f"nothing to resume in {tmp_path / 'r'}" in result.output
        else:  # under torchrun only rank 0 says it
            assert "Interrupted" not in result.output
        assert received == []  # our handler took the signal, and then put this one back
        os.kill(os.getpid(), signal.SIGTERM)
        assert received == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, before)


def test_sigterm_mid_run_keeps_the_last_epoch_and_says_how_to_resume(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "data", {"red": 12, "green": 12}, size=(12, 12))
    cmd = [sys.executable, "-m", "mvcompile.train", "--data", str(data), *QUICK,
           "--epochs", "100", "--workers", "2", "--runs-dir", str(tmp_path), "--name", "run"]
    last = tmp_path / "run" / "last.pt"
    code, err, _ = start_and_signal(cmd, last, signal.SIGTERM, 0.5)
    assert code == 143, err[-2000:]
    assert f"Interrupted. The last complete epoch is saved; continue with --resume " \
           f"{tmp_path / 'run'}" in err
    assert "Traceback" not in err and "killed by signal" not in err, err[-2000:]
    assert 1 <= torch.load(last, weights_only=True)["epoch"] < 100


class _WorkerSignalMask(torch.utils.data.Dataset):
    """Item i: the signals that the data loader worker serving it has blocked."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> list[int]:
        return sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, []))


def test_training_data_workers_start_with_sigterm_blocked() -> None:
    """Job schedulers and torchrun's agent send SIGTERM to the whole process group: the
    workers must not die of it under the main process (torch would raise "DataLoader worker
    ... is killed by signal" wherever the main process is), which stops them as it unwinds."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    loader = loop.WorkersKeepRunning(_WorkerSignalMask(), batch_size=None, num_workers=2)
    masks = list(loader)
    assert all(int(signal.SIGTERM) in mask for mask in masks), masks
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before  # the main process: as before
    plain = torch.utils.data.DataLoader(_WorkerSignalMask(), batch_size=None, num_workers=2)
    assert not any(int(signal.SIGTERM) in mask for mask in plain)  # what the subclass adds


# 6. --init-weights ----------------------------------------------------------------------------

def _prepare(options: TrainOptions) -> tuple[loop.Run, Notes]:
    notes = Notes()
    return loop.prepare(options, CPU, notes), notes


def test_init_weights_from_a_run_folder_loads_every_tensor(
        source_run: tuple[Path, Result], two_classes: Path, tmp_path: Path) -> None:
    run_dir, _ = source_run
    options = TrainOptions(data=str(two_classes), resolution=64, epochs=1, batch_size=4,
                           runs_dir=str(tmp_path), name="ft", init_weights=str(run_dir))
    run, notes = _prepare(options)
    best = load_file(str(run_dir / "best.safetensors"))
    mine = export_state_dict(run.model)
    assert mine.keys() == best.keys()
    assert all(np.array_equal(mine[k], best[k]) for k in best)
    assert notes.notes == [f"{run_dir} is a mvcompile train run folder; using its "
                           "best.safetensors (the best validation epoch)."]
    info = json.loads((tmp_path / "ft" / "run.json").read_text())
    assert info["options"]["init_weights"] == str(run_dir)
    assert info["init_weights"] == {"from": str((run_dir / "best.safetensors").resolve()),
                                    "tensors": len(best), "classifier": "loaded"}


def test_init_weights_trained_otherwise_is_noted(source_run: tuple[Path, Result],
                                                tmp_path: Path) -> None:
    """The checkpoint's header: patch config A at 64 with classes green, red; this run: patch
    config B at 128 with two other classes, so the kept head maps to other classes."""
    run_dir, _ = source_run
    data = make_folder(tmp_path / "data", {"cat": 4, "dog": 4}, size=(12, 12))
    options = TrainOptions(data=str(data), resolution=128, patch_config="B", epochs=1,
                           batch_size=4, runs_dir=str(tmp_path), name="ft",
                           init_weights=str(run_dir / "best.safetensors"))
    _, notes = _prepare(options)
    assert notes.notes == [
        "--init-weights was trained with --patch-config A; this run uses B.",
        "--init-weights was trained at --resolution 64; this run trains at 128.",
        "--init-weights names other classes (green, red) than the data (cat, dog); its "
        "classifier is kept and retrained, index by index."]


def test_init_weights_with_another_class_count_reinitialises_the_head(
        source_run: tuple[Path, Result], tmp_path: Path) -> None:
    run_dir, _ = source_run
    data = make_folder(tmp_path / "data", {"a": 4, "b": 4, "c": 4}, size=(12, 12))
    weights = run_dir / "best.safetensors"
    options = TrainOptions(data=str(data), resolution=64, epochs=1, batch_size=4,
                           runs_dir=str(tmp_path), name="ft3", init_weights=str(weights))
    run, notes = _prepare(options)
    best = load_file(str(weights))
    mine = export_state_dict(run.model)
    assert mine["classifier.weight"].shape == (3, 320)
    assert all(np.array_equal(mine[k], best[k]) for k in best if not k.startswith("classifier"))
    assert notes.notes == ["--init-weights: its classifier has 2 classes and the data 3; the "
                           "classifier is re-initialised and trained from scratch."]
    info = json.loads((tmp_path / "ft3" / "run.json").read_text())
    assert info["init_weights"]["classifier"] == "its classifier has 2 classes and the data 3"


def test_init_weights_from_a_hugging_face_folder(two_classes: Path, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from conftest import build_random
    from mvcompile.graphs.mobilevit import MobileViTConfig
    from mvcompile.reference import hf_model

    cfg = MobileViTConfig.for_size("xxs", resolution=64, num_classes=1000)
    _, weights = build_random(cfg, seed=5)
    hf_model(cfg, weights).save_pretrained(tmp_path / "hf")
    options = TrainOptions(data=str(two_classes), resolution=64, epochs=1, batch_size=4,
                           runs_dir=str(tmp_path), name="hf", init_weights=str(tmp_path / "hf"))
    run, notes = _prepare(options)
    mine = export_state_dict(run.model)
    name = "mobilevit.encoder.layer.4.transformer.layer.0.attention.attention.query.weight"
    np.testing.assert_array_equal(mine[name], weights[name])
    assert notes.notes == ["--init-weights: its classifier has 1000 classes and the data 2; "
                           "the classifier is re-initialised and trained from scratch."]
    stem = "mobilevit.conv_stem.convolution.weight"
    np.testing.assert_array_equal(mine[stem], weights[stem])  # no preprocessor config: RGB


def test_init_weights_trained_on_bgr_take_rgb(two_classes: Path, tmp_path: Path) -> None:
    """Apple's folders flip RGB to BGR in preprocessor_config.json; training reads RGB, so
    the stem conv's input channels are reversed, with a note."""
    pytest.importorskip("transformers")
    from conftest import build_random
    from mvcompile.graphs.mobilevit import MobileViTConfig
    from mvcompile.reference import hf_model

    cfg = MobileViTConfig.for_size("xxs", resolution=64, num_classes=1000)
    _, weights = build_random(cfg, seed=6)
    hf_model(cfg, weights).save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "preprocessor_config.json").write_text(
        '{"image_processor_type": "MobileViTImageProcessor", "do_flip_channel_order": true}')
    options = TrainOptions(data=str(two_classes), resolution=64, epochs=1, batch_size=4,
                           runs_dir=str(tmp_path), name="bgr", init_weights=str(tmp_path / "hf"))
    run, notes = _prepare(options)
    stem = "mobilevit.conv_stem.convolution.weight"
    np.testing.assert_array_equal(export_state_dict(run.model)[stem], weights[stem][:, ::-1])
    assert any("trained on BGR images" in note for note in notes.notes), notes.notes


def test_init_weights_that_do_not_match_name_the_tensors(
        source_run: tuple[Path, Result], two_classes: Path, tmp_path: Path) -> None:
    run_dir, _ = source_run
    tensors = load_file(str(run_dir / "best.safetensors"))
    tensors["mobilevit.conv_stem.convolution.weight"] = np.zeros((16, 3, 5, 5), np.float32)
    tensors["extra.weight"] = np.zeros(3, np.float32)
    del tensors["mobilevit.conv_1x1_exp.normalization.bias"]
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad))
    args = [*QUICK, "--data", str(two_classes), "--runs-dir", str(tmp_path / "runs")]
    result = _cli(*args, "--init-weights", str(bad))
    _assert_clean_error(result, f"--init-weights {bad} does not match MobileViT-XXS: 1 missing, "
                        "1 unexpected and 1 mis-shaped tensors",
                        "missing: mobilevit.conv_1x1_exp.normalization.bias",
                        "unexpected: extra.weight",
                        "shape: mobilevit.conv_stem.convolution.weight: checkpoint "
                        "[16, 3, 5, 5], model [16, 3, 3, 3]")
    assert not (tmp_path / "runs").exists()
    del tensors["classifier.bias"]  # a head without its bias is not "no head"
    save_file(tensors, str(bad))
    no_bias = _cli(*args, "--init-weights", str(bad))
    _assert_clean_error(no_bias, "missing: classifier.bias")
    other_size = _cli(*args, "--size", "xs", "--init-weights", str(run_dir))
    _assert_clean_error(other_size, "does not match MobileViT-XS",
                        "It looks like MobileViT-XXS weights: pass --size xxs.")
    missing = _cli(*args, "--init-weights", str(tmp_path / "nope.safetensors"))
    _assert_clean_error(missing, "no such file or folder")


def test_init_weights_is_refused_with_resume_and_kept_when_a_fine_tuned_run_resumes(
        source_run: tuple[Path, Result], two_classes: Path, tmp_path: Path) -> None:
    run_dir, _ = source_run
    refused = _cli("--resume", str(run_dir), "--init-weights", str(run_dir))
    _assert_clean_error(refused, "--init-weights starts a new run from weights; --resume "
                                 "continues a run")
    first = _cli(*QUICK, "--data", str(two_classes), "--runs-dir", str(tmp_path), "--name",
                 "ft", "--init-weights", str(run_dir))
    assert first.exit_code == 0, first.output
    assert _summary(first.output)["started from"] == str(run_dir)
    record = json.loads((tmp_path / "ft" / "run.json").read_text())["init_weights"]
    resumed = _cli("--resume", str(tmp_path / "ft"), "--epochs", "2")
    assert resumed.exit_code == 0, resumed.output
    info = json.loads((tmp_path / "ft" / "run.json").read_text())
    assert info["init_weights"] == record and info["options"]["init_weights"] == str(run_dir)
    assert info["resumes"][0]["changed"] == {"epochs": [1, 2]}


def test_a_library_resume_of_a_fine_tuned_run_does_not_reload_the_weights(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_loading(*_: object) -> None:
        pytest.fail("--init-weights loaded into a resumed run")

    monkeypatch.setattr(loop, "load_init_weights", no_loading)
    options = replace(TrainOptions(), init_weights="x", resume="somewhere")
    assert loop._init_weights(torch.nn.Linear(1, 1), options, None, [], Notes()) is None


def test_the_library_refuses_a_name_with_a_path_too() -> None:
    with pytest.raises(UserError, match="run name, not a path"):
        loop._check_options(TrainOptions(name="a/b"))


def test_init_weights_without_a_classifier_keeps_the_fresh_head(
        source_run: tuple[Path, Result], two_classes: Path, tmp_path: Path) -> None:
    run_dir, _ = source_run
    tensors = load_file(str(run_dir / "best.safetensors"))
    backbone = {k: v for k, v in tensors.items() if not k.startswith("classifier.")}
    save_file(backbone, str(tmp_path / "backbone.safetensors"))
    options = TrainOptions(data=str(two_classes), resolution=64, epochs=1, batch_size=4,
                           runs_dir=str(tmp_path), name="bb",
                           init_weights=str(tmp_path / "backbone.safetensors"))
    run, notes = _prepare(options)
    assert notes.notes == ["--init-weights: the checkpoint has no classifier; the classifier "
                           "is re-initialised and trained from scratch."]
    mine = export_state_dict(run.model)
    assert all(np.array_equal(mine[k], v) for k, v in backbone.items())


@pytest.mark.parametrize("rank", [None, "1"])
def test_only_rank_0_prints_the_summary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        rank: str | None) -> None:
    def finished(options: TrainOptions, _reporter: object) -> loop.TrainResult:
        return loop.TrainResult(options.run_dir(), [], {"epoch": 0, "val_acc": -1.0}, None)

    monkeypatch.setattr(loop, "train", finished)
    if rank is not None:
        monkeypatch.setenv("RANK", rank)
    result = _cli("--runs-dir", str(tmp_path), "--name", "r", "--epochs", "1")
    assert result.exit_code == 0, result.output
    if rank is None:
        assert _summary(result.output) == {"run folder": str(tmp_path / "r"),
                                           "epochs": "0 of 1, 0 s", "files": "none"}
    else:
        assert "summary" not in result.output


def test_the_torchrun_entry_point_takes_v_too() -> None:
    """``torchrun -m mvcompile.train -v`` (no mvcompile group before it) logs at info level."""
    proc = subprocess.run([sys.executable, "-m", "mvcompile.train", "--data", "/nonexistent",
                           "-v"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "No such option" not in proc.stderr, proc.stderr
    assert "Error: " in proc.stderr and "Traceback" not in proc.stderr


def test_with_ema_the_summary_reports_the_ema_weights_accuracy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The files hold the EMA weights, so 'last val acc' is theirs, the trained model's
    given beside it."""
    history = [{"epoch": 1, "val_acc": 0.92, "ema_val_acc": 0.69, "seconds": 1.0}]

    def finished(options: TrainOptions, _reporter: object) -> loop.TrainResult:
        return loop.TrainResult(options.run_dir(), history, {"epoch": 1, "val_acc": 0.69}, None)

    monkeypatch.setattr(loop, "train", finished)
    result = _cli("--runs-dir", str(tmp_path), "--name", "r", "--epochs", "1",
                  "--ema-decay", "0.999")
    assert result.exit_code == 0, result.output
    summary = _summary(result.output)
    assert summary["best val acc"] == "69.00% at epoch 1 (EMA weights)"
    assert summary["last val acc"] == "69.00% (EMA weights; the trained weights 92.00%)"


@pytest.mark.parametrize("option", ["--resume", "--init-weights", "--data", "--runs-dir"])
def test_an_empty_path_is_refused_not_taken_as_absent(option: str, tmp_path: Path) -> None:
    """--resume "$RUN" with RUN unset must not start a new 300-epoch run."""
    result = _cli(option, "", "--runs-dir" if option != "--runs-dir" else "--name",
                  str(tmp_path) if option != "--runs-dir" else "r")
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{option}': is empty" in result.output
    assert not list(tmp_path.iterdir())


def test_init_weights_whose_config_builds_another_network_are_refused(two_classes: Path,
                                                                      tmp_path: Path) -> None:
    """A Hugging Face folder with GELU activations loads into our SiLU network shape for
    shape; fine-tuning it would start from another function."""
    pytest.importorskip("transformers")
    from conftest import build_random
    from mvcompile.graphs.mobilevit import MobileViTConfig
    from mvcompile.reference import hf_model

    cfg = MobileViTConfig.for_size("xxs", resolution=64, num_classes=1000)
    _, weights = build_random(cfg, seed=7)
    hf_model(cfg, weights).save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    options = TrainOptions(data=str(two_classes), resolution=64, epochs=1, batch_size=4,
                           runs_dir=str(tmp_path), name="gelu", init_weights=str(tmp_path / "hf"))
    with pytest.raises(UserError, match="hidden_act = 'gelu'"):
        _prepare(options)


def test_a_diverging_run_stops_with_an_error_and_leaves_a_folder_it_can_start_again(
        tmp_path: Path) -> None:
    """--lr 1e4 makes the loss NaN: drawing curves.png crashed with a traceback after the
    weights were written and before last.pt, so the folder could be neither resumed nor run
    again. Now the run stops before writing the epoch, and the same command runs again."""
    args = ("--data", "digits", "--lr", "1e4", "--resolution", "64", "--epochs", "2",
            "--subset", "64", "--batch-size", "16", "--runs-dir", str(tmp_path), "--name", "n")
    _assert_clean_error(_cli(*args), "Training diverged", "epoch 1 is nan", "lower")
    assert [p.name for p in (tmp_path / "n").iterdir()] == ["run.json"]
    _assert_clean_error(_cli(*args), "Training diverged")  # not "holds files of an earlier run"
    usage = _cli(*args[:2], "--lr", "inf")
    assert usage.exit_code == 2 and "'--lr': must be a finite number" in usage.output


def test_curves_skip_values_that_are_not_finite(tmp_path: Path) -> None:
    from mvcompile.train.plot import write_curves

    history = [{"epoch": 1, "train_loss": 2.0, "val_loss": float("nan"), "val_acc": 0.5},
               {"epoch": 2, "train_loss": float("inf"), "val_loss": 1.0, "val_acc": 0.6}]
    write_curves(tmp_path / "curves.png", history)
    assert Image.open(tmp_path / "curves.png").size == (960, 320)


def test_a_relative_data_folder_is_saved_absolute_and_other_classes_refuse_a_resume(
        tmp_path: Path, monkeypatch) -> None:
    """--data saved as typed ('ds') made a resume from another folder fail on an option the
    user never passed, or train on another folder of that name, silently, with other
    classes."""
    make_folder(tmp_path / "ds", {"cat": 4, "dog": 4})
    make_folder(tmp_path / "elsewhere" / "ds", {"x": 4, "y": 4})
    monkeypatch.chdir(tmp_path)
    result = _cli("--data", "ds", *QUICK, "--runs-dir", str(tmp_path / "runs"), "--name", "r")
    assert result.exit_code == 0, result.output
    run_json = json.loads((tmp_path / "runs" / "r" / "run.json").read_text())
    assert run_json["options"]["data"] == str(tmp_path / "ds")
    monkeypatch.chdir(tmp_path / "elsewhere")
    resumed = _cli("--resume", str(tmp_path / "runs" / "r"), "--epochs", "2")
    assert resumed.exit_code == 0, resumed.output  # the saved absolute path: cat and dog
    _assert_clean_error(_cli("--resume", str(tmp_path / "runs" / "r"), "--epochs", "3",
                             "--data", "ds"), "trained on the classes cat, dog", "has x, y")
