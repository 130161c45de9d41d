"""The CPU a measurement ran on: its model name and the vector extensions that decide which
ONNX Runtime kernels run (AVX2, AVX-512, VNNI; without VNNI, x86 integer kernels multiply
uint8·int8 pairs through int16 and are at best about 2× the FP32 ones)."""

from __future__ import annotations

import platform
from pathlib import Path

ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def cpu_summary(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict:
    """``{"name", "isa": {flag: bool}}`` from /proc/cpuinfo; ``isa`` is empty where that file
    does not exist (macOS, Windows)."""
    if not cpuinfo.exists():
        return {"name": platform.processor() or platform.machine() or "unknown", "isa": {}}
    lines = cpuinfo.read_text().splitlines()
    name = next((line.split(":", 1)[1].strip() for line in lines
                 if line.startswith("model name")), platform.machine() or "unknown")
    flags_line = next((line for line in lines if line.startswith("flags")), "")
    flags = set(flags_line.split(":", 1)[-1].split())
    return {"name": name, "isa": {flag: flag in flags for flag in ISA_FLAGS}}


def lacks_int8_dot_product(cpu: dict) -> bool:
    """True for an x86 CPU known (from its flags) to have no VNNI/AMX int8 dot product."""
    isa = cpu.get("isa") or {}
    return bool(isa) and not any(isa.get(flag) for flag in INT8_DOT_FLAGS)
