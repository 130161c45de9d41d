"""Publishing a staged folder over an existing one: on an error the old folder stays in place
and no `.mvcompile-old-*` folder is left behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mvcompile.backends import _output
from mvcompile.errors import UserError


def _folders(tmp_path: Path) -> tuple[Path, Path]:
    old, new = tmp_path / "out" / "model.mlpackage", tmp_path / "stage" / "model.mlpackage"
    for folder, text in ((old, "old"), (new, "new")):
        folder.mkdir(parents=True)
        (folder / "data").write_text(text)
    return old, new


@pytest.mark.parametrize("failing_call", [1, 2])  # moving the old one aside / the new one in
def test_a_failed_replace_keeps_the_old_folder_and_leaves_nothing_aside(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing_call: int) -> None:
    old, new = _folders(tmp_path)
    real_replace, calls = os.replace, []

    def replace(src: object, dst: object) -> None:
        calls.append(src)
        if len(calls) == failing_call:
            raise OSError(16, "Device or resource busy")
        real_replace(src, dst)

    monkeypatch.setattr(_output.os, "replace", replace)
    with pytest.raises(UserError, match="Device or resource busy"):
        _output.publish(new, old, "Core ML package")
    assert (old / "data").read_text() == "old"
    assert sorted(p.name for p in old.parent.iterdir()) == ["model.mlpackage"]


def test_a_folder_replaces_the_old_one(tmp_path: Path) -> None:
    old, new = _folders(tmp_path)
    _output.publish(new, old, "Core ML package")
    assert (old / "data").read_text() == "new" and not new.exists()
    assert sorted(p.name for p in old.parent.iterdir()) == ["model.mlpackage"]


def test_a_build_whose_package_cannot_be_replaced_leaves_the_earlier_build_whole(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mvcompile import BuildOptions, build

    options = {"resolution": 64, "latency_runs": 0, "targets": ("onnx", "coreml"),
               "out_dir": str(tmp_path / "o")}
    first = build(BuildOptions(**options))
    before = {p.name: p.read_bytes() for p in first.out_dir.iterdir() if p.is_file()}
    real_replace = os.replace

    def replace(src: object, dst: object) -> None:
        if Path(src) == first.out_dir / "model.mlpackage":  # moving the old package aside
            raise OSError(13, "Permission denied")
        real_replace(src, dst)

    monkeypatch.setattr(_output.os, "replace", replace)
    with pytest.raises(UserError, match="Permission denied"):
        build(BuildOptions(**options, seed=5))
    after = {p.name: p.read_bytes() for p in first.out_dir.iterdir() if p.is_file()}
    assert after == before  # model.onnx and report.json are still the first build's
    assert not [p for p in first.out_dir.iterdir() if p.name.startswith(".")]
