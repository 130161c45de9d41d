"""CPU facts in build reports, and the build summary's note when INT8 is slower."""

from __future__ import annotations

from pathlib import Path

import pytest

from mvcompile import machine
from mvcompile.summary import build_summary

ZEN3_FLAGS = "fpu sse sse2 avx avx2 fma bmi2"
SAPPHIRE_FLAGS = "fpu sse avx avx2 avx512f avx512_vnni amx_int8"


def _cpuinfo(tmp_path: Path, flags: str) -> Path:
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: {flags}\n")
    return path


@pytest.mark.parametrize("flags, lacks", [(ZEN3_FLAGS, True), (SAPPHIRE_FLAGS, False)])
def test_cpu_flags_decide_whether_int8_dot_product_is_missing(tmp_path, flags: str,
                                                              lacks: bool) -> None:
    cpu = machine.cpu_summary(_cpuinfo(tmp_path, flags))
    assert cpu["name"] == "Test CPU 9000"
    assert cpu["isa"]["avx2"] is True
    assert cpu["isa"]["avx512_vnni"] is (not lacks)
    assert machine.lacks_int8_dot_product(cpu) is lacks


def test_unknown_cpu_is_not_said_to_lack_anything(tmp_path) -> None:
    cpu = machine.cpu_summary(tmp_path / "absent")
    assert cpu["isa"] == {}
    assert machine.lacks_int8_dot_product(cpu) is False


def _report(int8_ms: float, cpu: dict) -> dict:
    stats = {"parameters": 1, "macs": 1, "node_count": 1, "file_bytes": 1}
    return {
        "model": {"size": "xxs", "resolution": 64, "patch_sizes": [2, 2, 2], "num_classes": 10},
        "weights": {"description": "random"},
        "models": {"onnx": {**stats, "op_histogram": {"Conv": 1}}, "int8": stats},
        "latency": {"onnx": {"median_ms": 10.0, "p90_ms": 11.0},
                    "int8": {"median_ms": int8_ms, "p90_ms": int8_ms},
                    "conditions": {"threads": 2, "cpu": cpu}},
    }


@pytest.mark.parametrize("int8_ms, flags, why", [
    (12.0, ZEN3_FLAGS, "no VNNI int8 dot product"), (8.0, ZEN3_FLAGS, None),
    (12.0, SAPPHIRE_FLAGS, "integer Swish"), (8.0, SAPPHIRE_FLAGS, None),
    (10.2, SAPPHIRE_FLAGS, None)])  # 1.02x FP32's 10 ms: within one build's noise, no note
def test_summary_explains_slow_int8_by_what_the_cpu_lacks(tmp_path, int8_ms: float,
                                                          flags: str, why: str | None) -> None:
    cpu = machine.cpu_summary(_cpuinfo(tmp_path, flags))
    files = {"onnx": tmp_path / "model.onnx", "int8": tmp_path / "model_int8.onnx"}
    text = build_summary(_report(int8_ms, cpu), files)
    assert ("INT8 is slower here" in text) is (why is not None)
    if why is not None:
        assert why in text
    assert ("no VNNI" in text) is (flags == ZEN3_FLAGS and why is not None)


ARM_CPUINFO = ("processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd aes crc32 asimddp\n"
               "CPU implementer\t: 0x41\n")


@pytest.mark.parametrize("flags, arch, bits", [
    (ZEN3_FLAGS, "x86_64", 7), (SAPPHIRE_FLAGS, "x86_64", 8), (None, "x86_64", 7),
    (None, "AMD64", 7), (None, "arm64", 8), (None, "aarch64", 8), ("arm", "aarch64", 8)])
def test_auto_weight_bits_avoid_saturation_only_where_kernels_saturate(
        tmp_path, flags: str | None, arch: str, bits: int) -> None:
    if flags == "arm":  # Linux on ARM: /proc/cpuinfo lists Features, no x86 flags
        path = tmp_path / "cpuinfo"
        path.write_text(ARM_CPUINFO)
    else:
        path = _cpuinfo(tmp_path, flags) if flags else tmp_path / "absent"
    chosen, why = machine.auto_weight_bits(machine.cpu_summary(path), arch)
    assert chosen == bits
    assert why.startswith("auto: ")
    assert ("x86" in why and "not x86" not in why) is (bits == 7)


def test_linux_arm_cpu_is_not_said_to_lack_vnni(tmp_path) -> None:
    path = tmp_path / "cpuinfo"
    path.write_text(ARM_CPUINFO)
    cpu = machine.cpu_summary(path)
    assert cpu["isa"] == {}
    assert machine.lacks_int8_dot_product(cpu) is False


def test_summary_lists_extra_artifacts_per_model_in_its_column(tmp_path) -> None:
    names = {"onnx": "model.onnx", "int8": "model_int8.onnx",
             "onnx_ort": "model.ort", "int8_ort": "model_int8.ort",
             "onnx_ort_operators_config": "model.required_operators.config",
             "onnx_ort_operators_and_types_config":
                 "model.required_operators_and_types.config",
             "int8_coreml": "model_int8.mlpackage", "report": "report.json"}
    files = {key: tmp_path / name for key, name in names.items()}
    lines = build_summary(_report(8.0, {}), files).splitlines()
    ort_row = next(line for line in lines if line.startswith("ORT mobile"))
    assert ort_row.split()[2:] == ["model.ort", "model_int8.ort"]
    configs = next(line for line in lines if line.startswith("ORT operator configs"))
    assert configs.split()[3:6] == ["2", ".config", "files"]
    coreml = next(line for line in lines if line.startswith("Core ML"))
    assert coreml.split()[2:] == ["model_int8.mlpackage"]  # the FP32 cell is empty
    assert not any("report.json" in line for line in lines)
    file_row = next(line for line in lines if line.split()[:2] == ["file", str(files["onnx"])])
    assert max(len(line) for line in lines) == len(file_row)  # the paths set the width
