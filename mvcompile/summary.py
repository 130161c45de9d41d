"""The end-of-build summary tables (text only; the CLI prints them)."""

from __future__ import annotations

from pathlib import Path

from mvcompile.calibration.data import skipped_note
from mvcompile.machine import lacks_int8_dot_product
from mvcompile.pipeline import stage_fired
from mvcompile.table import format_table, human_bytes, human_count

# INT8 / FP32 latency above which the summary explains a slower INT8 (closer ratios are within
# the run-to-run noise of one build's latency runs)
SLOWER = 1.05


def build_summary(report: dict, files: dict[str, Path]) -> str:
    """Model facts, one column per written model, accuracy for INT8, op histogram."""
    m = report["model"]
    head = [("model", f"MobileViT-{m['size'].upper()}, {m['resolution']}x{m['resolution']}, "
                      f"patches {tuple(m['patch_sizes'])}, {m['num_classes']} classes"),
            ("weights", report["weights"]["description"])]
    if report.get("passes"):
        p = report["passes"]
        head.append(("passes", f"{p['pipeline']}: {p['nodes_before']} -> {p['nodes_after']} "
                               f"nodes, max abs diff {p['max_abs_diff']:.1e}"))
    parts = [format_table(head, header=("build", "")), _models_table(report, files)]
    if "int8" in report:
        parts.append(_accuracy_table(report["int8"]))
    hist = report["models"]["onnx"]["op_histogram"]
    parts.append(format_table(list(hist.items()), header=("op (model.onnx)", "count")))
    return "\n\n".join(parts)


def _models_table(report: dict, files: dict[str, Path]) -> str:
    keys = list(report["models"])
    latency = report.get("latency") or {}
    rows = []
    for label, get in (
        ("parameters", lambda s, k: f"{s['parameters']:,}"),
        ("MACs (batch 1)", lambda s, k: human_count(s["macs"])),
        ("nodes", lambda s, k: s["node_count"]),
        ("file size", lambda s, k: human_bytes(s["file_bytes"])),
        ("ORT median latency", lambda s, k: f"{latency[k]['median_ms']:.2f} ms"
         if k in latency else "not measured"),
        ("ORT p90 latency", lambda s, k: f"{latency[k]['p90_ms']:.2f} ms"
         if k in latency else "not measured"),
    ):
        rows.append((label, *(get(report["models"][k], k) for k in keys)))
    ratio = None
    if "int8" in latency and "onnx" in latency:
        ratio = latency["int8"]["median_ms"] / latency["onnx"]["median_ms"]
        rows.append(("INT8 / FP32 latency", "", f"{ratio:.2f}x"))
    rows.append(("file", *(str(files[k]) for k in keys)))
    rows += _artifact_rows(files, keys)
    conditions = latency.get("conditions")
    note = _parameters_note(report) + _coreml_source_note(report)
    if conditions:
        note += f"\n(latency: batch 1, {conditions['threads']} threads, runs interleaved)"
    if conditions and ratio and ratio > SLOWER:
        note += _slow_int8_note(conditions.get("cpu", {}))
    return format_table(rows, header=("", *("FP32" if k == "onnx" else "INT8" for k in keys))
                        ) + note


def _slow_int8_note(cpu: dict) -> str:
    """Why the INT8 model timed slower than FP32 on this machine's ONNX Runtime."""
    if lacks_int8_dot_product(cpu):
        return ("\n(INT8 is slower here: this CPU has no VNNI int8 dot product, so ONNX "
                "Runtime's integer kernels gain little over FP32; README, 'What this machine "
                "can do')")
    return ("\n(INT8 is slower here: in this network ONNX Runtime's integer convolutions and "
            "matmuls gain little over FP32 on this CPU, and its integer Swish (QLinearSigmoid + "
            "QLinearMul), integer adds and the quantize/dequantize steps around the float "
            "LayerNorms and softmaxes cost more than the float ops they replace; README, "
            "'INT8 latency')")


def _parameters_note(report: dict) -> str:
    """Why FP32 counts more parameters than INT8 for the same function, when the pass
    pipelines split the attention heads: both drop the key bias (it adds q·b_k to all of a
    query's scores, which softmax ignores) and fold the value bias into the output bias (each
    probability row sums to 1), but FP32's fused ``Attention`` nodes take one [q, k, v] bias,
    whose key and value parts are then stored as zeros, where INT8's per-head form stores the
    query bias alone."""
    models = report["models"]
    if "int8" not in models:
        return ""
    fewer = models["onnx"]["parameters"] - models["int8"]["parameters"]
    passes = report.get("int8", {}).get("passes") or {}
    if fewer <= 0 or not stage_fired(passes, "fold_head_split"):
        return ""
    return (f"\n(FP32 counts {fewer:,} more parameters for the same function: its fused "
            "Attention nodes store a [q, k, v] bias whose key and value parts are zeros (the "
            "key bias, which softmax ignores, is dropped and the value bias folded into the "
            "output bias); INT8 stores the query bias alone)")


def _coreml_source_note(report: dict) -> str:
    """Which graph the FP32 Core ML package was lowered from, where it is not the one whose
    figures the FP32 column gives (the ORT graph)."""
    source = report.get("coreml_sources", {}).get("model.mlpackage")
    if not source or not source["graph"].startswith("the mobile"):
        return ""
    ops = ", ".join(op for op in source["op_histogram"] if op in ("Swish", "Einsum"))
    where = f" ({ops} where the FP32 column's graph has ORT contrib ops)" if ops else ""
    return (f"\n(model.mlpackage is lowered from the mobile pipeline's graph, {source['nodes']} "
            f"nodes of standard ONNX{where}; report.json, coreml_sources)")


_ARTIFACT_KINDS = ((".ort", "ORT mobile"), (".config", "ORT operator configs"),
                   (".mlpackage", "Core ML"))


def _artifact_rows(files: dict[str, Path], keys: list[str]) -> list[tuple[str, ...]]:
    """One row per extra artifact kind, each model's files in its own column. The extra
    artifacts' keys start with their model's key (``onnx_coreml``, ``int8_ort``)."""
    rows = []
    for suffix, label in _ARTIFACT_KINDS:
        cells = [sorted(p.name for k, p in files.items()
                        if k.startswith(f"{key}_") and p.name.endswith(suffix)) for key in keys]
        if any(cells):
            rows.append((label, *(", ".join(c) if len(c) < 2 else f"{len(c)} {suffix} files"
                                  for c in cells)))
    return rows


KEPT_SHOWN = 3  # float-kept layers named in the summary; report.json lists them all


def _kept_float(kept: list[dict[str, str]]) -> str:
    """'none', or the count and the first few names (the full list is in report.json)."""
    if not kept:
        return "none"
    names = ", ".join(k["node"] for k in kept[:KEPT_SHOWN])
    more = ", ... (all in report.json)" if len(kept) > KEPT_SHOWN else ""
    return f"{len(kept)}: {names}{more}"


def _auto_note(why: str) -> str:
    """' (auto: ...)' where --weight-bits auto chose the range, else ''."""
    return f" ({why})" if why.startswith("auto") else ""


def _accuracy_table(int8: dict) -> str:
    q = int8["quantization"]
    rows = [("calibration", q["calibration"]),
            ("method", f"{q['method']}, {q['weight_bits']}-bit weights"
                       + _auto_note(q.get("weight_bits_why", ""))),
            ("quantized ops", ", ".join(q["op_types"])),
            ("kept in float", _kept_float(q["kept_float"]))]
    left_float = q.get("float_matrix_ops") or {}
    if left_float:
        rows.append(("matrix ops in float", ", ".join(f"{op} x{n}" for op, n in
                                                      left_float.items())
                     + " (no ORT integer kernel for a transposed operand)"))
    if q.get("budget_met"):  # a missed budget is an error: nothing is written
        rows.append(("accuracy budget", "met"))
    for name, acc in int8["accuracy"].items():
        line = (f"top-1 agreement {100 * acc['top1_agreement']:.1f}%, "
                f"SQNR {acc['sqnr_db']:.1f} dB")
        if "top1_fp32" in acc:
            line += (f", top-1 FP32 {100 * acc['top1_fp32']:.2f}% / "
                     f"INT8 {100 * acc['top1_int8']:.2f}%")
        if acc.get("skipped"):
            rows.append((f"{name} data", skipped_note(acc["skipped"])))
        rows.append((f"{name} ({acc['images']} images)", line))
        rows += [(f"{name} labels", text) for text in [acc.get("labels"), *acc.get("notes", [])]
                 if text]
    return format_table(rows, header=("INT8", ""))
