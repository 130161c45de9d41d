"""The CPU a measurement ran on: its model name and the vector extensions that decide which
ONNX Runtime kernels run (AVX2, AVX-512, VNNI; without VNNI, x86 integer kernels multiply
uint8·int8 pairs through int16 and are at best about 2× the FP32 ones)."""

from __future__ import annotations

import platform
from pathlib import Path

ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
X86_MACHINES = ("x86_64", "amd64", "i386", "i686", "x86")


def cpu_summary(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict:
    """``{"name", "isa": {flag: bool}}`` from /proc/cpuinfo; ``isa`` is empty where that file
    does not exist (macOS, Windows) or lists no x86 ``flags`` (ARM)."""
    if not cpuinfo.exists():
        return {"name": platform.processor() or platform.machine() or "unknown", "isa": {}}
    lines = cpuinfo.read_text().splitlines()
    name = next((line.split(":", 1)[1].strip() for line in lines
                 if line.startswith("model name")), platform.machine() or "unknown")
    flags_line = next((line for line in lines if line.startswith("flags")), None)
    if flags_line is None:  # ARM lists "Features", none of which are x86 extensions
        return {"name": name, "isa": {}}
    flags = set(flags_line.split(":", 1)[-1].split())
    return {"name": name, "isa": {flag: flag in flags for flag in ISA_FLAGS}}


def lacks_int8_dot_product(cpu: dict) -> bool:
    """True for an x86 CPU known (from its flags) to have no VNNI/AMX int8 dot product."""
    isa = cpu.get("isa") or {}
    return bool(isa) and not any(isa.get(flag) for flag in INT8_DOT_FLAGS)


def auto_weight_bits(cpu: dict, arch: str | None = None) -> tuple[int, str]:
    """``(bits, why)``: the INT8 weight range ``--weight-bits auto`` picks on this CPU.

    x86 integer kernels without an int8 dot product (VNNI/AMX) add pairs of u8·s8 products
    in int16 (``vpmaddubsw``), which saturates when 255·127 + 255·127 > 32767; weights
    in [-63, 63] (7 bits) keep every pair sum in range. With VNNI (``vpdpbusd`` accumulates
    in int32), on ARM and elsewhere nothing saturates and 8 bits halve the weight rounding
    error. An x86 CPU whose flags cannot be read (macOS, Windows) is treated as lacking VNNI.
    """
    arch = (arch if arch is not None else platform.machine()).lower()
    if arch not in X86_MACHINES:
        return 8, f"auto: an {arch or 'unknown'} CPU, not x86, so nothing saturates"
    if not cpu.get("isa"):
        return 7, "auto: an x86 CPU whose flags could not be read, so VNNI is not assumed"
    if lacks_int8_dot_product(cpu):
        return 7, "auto: this x86 CPU lacks VNNI, so its u8·s8 kernels saturate with 8 bits"
    return 8, "auto: this CPU has an int8 dot product (VNNI), which does not saturate"
