"""The ONNX Runtime forms of a MobileViT attention core and of its residual + LayerNorm, timed.

Why the ``fp32`` pipeline emits one com.microsoft ``Attention`` per layer and keeps
``Add`` + ``LayerNormalization``: each alternative that ORT 1.31's CPU execution provider runs
is timed here on MobileViT's own shapes, interleaved in one process (batch 1, 2 threads,
ORT_ENABLE_ALL, spinning off), with its max abs difference to the first form.

Attention, for G patch-pixel groups of N tokens of width d and 4 heads (y = softmax(QKᵀ)V with
[Q K V] = xW + b; the 1/√(d/h) scale is folded into W and b as the pipeline does):

- com.microsoft.Attention: the whole core, QKV projection included, in one node;
- ONNX Attention (opset 23) after MatMul + Add + Split;
- com.microsoft.MultiHeadAttention on separate Q, K, V (ORT's CPU flash-attention path);
- unfused: MatMul, Split, Reshape/Transpose per head, MatMul, Softmax, MatMul, Transpose back,
  as torch.onnx.export writes it (the peer's form).

Residual + LayerNorm, y = LN(x + s + b) over the last axis of [G·N, d] tokens:

- Add, Add, LayerNormalization (ours);
- com.microsoft.SkipLayerNormalization, with the sum as its second use (what ORT's own fusion
  makes of the peer's graph).

    python benchmarks/attention_forms.py [--rounds 20]
"""

from __future__ import annotations

import argparse

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from mvcompile import latency

HEADS = 4
SHAPES = ((4, 256, 64), (4, 64, 80))  # XXS stage 3 and stage 4 at 256²: (G, N, d)


def _model(nodes: list[onnx.NodeProto], inits: dict[str, np.ndarray],
           inputs: dict[str, tuple[int, ...]]) -> bytes:
    graph = helper.make_graph(
        nodes, "form",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(a, n) for n, a in inits.items()])
    model = helper.make_model(graph, ir_version=10, opset_imports=[
        helper.make_opsetid("", 24), helper.make_opsetid("com.microsoft", 1)])
    return model.SerializeToString()


def attention_forms(g: int, n: int, d: int, rng: np.random.Generator) -> dict[str, bytes]:
    """The four attention forms on x [g, n, d]; weights shared."""
    hd = d // HEADS
    inits = {"w": (rng.standard_normal((d, 3 * d)) / np.sqrt(d)).astype(np.float32),
             "b": (0.1 * rng.standard_normal(3 * d)).astype(np.float32)}
    x = {"x": (g, n, d)}
    project = [helper.make_node("MatMul", ["x", "w"], ["xw"]),
               helper.make_node("Add", ["xw", "b"], ["qkv"]),
               helper.make_node("Split", ["qkv"], ["q", "k", "v"], axis=-1, num_outputs=3)]
    heads = {"split_shape": np.array([g, n, HEADS, hd], np.int64),
             "merge_shape": np.array([g, n, d], np.int64)}
    unfused = project + [
        helper.make_node("Reshape", [t, "split_shape"], [f"{t}4"]) for t in "qkv"] + [
        helper.make_node("Transpose", ["q4"], ["qh"], perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["k4"], ["kh"], perm=[0, 2, 3, 1]),
        helper.make_node("Transpose", ["v4"], ["vh"], perm=[0, 2, 1, 3]),
        helper.make_node("MatMul", ["qh", "kh"], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "vh"], ["yh"]),
        helper.make_node("Transpose", ["yh"], ["y4"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["y4", "merge_shape"], ["y"])]
    return {
        "com.microsoft.Attention (ours)": _model([helper.make_node(
            "Attention", ["x", "w", "b"], ["y"], domain="com.microsoft", num_heads=HEADS,
            scale=1.0)], inits, x),
        "ONNX Attention (opset 23)": _model(project + [helper.make_node(
            "Attention", ["q", "k", "v"], ["y"], q_num_heads=HEADS, kv_num_heads=HEADS,
            scale=1.0)], inits, x),
        "com.microsoft.MultiHeadAttention": _model(project + [helper.make_node(
            "MultiHeadAttention", ["q", "k", "v"], ["y"], domain="com.microsoft",
            num_heads=HEADS, scale=1.0)], inits, x),
        "unfused (peer's form)": _model(unfused, {**inits, **heads}, x),
    }


def norm_forms(rows: int, d: int, rng: np.random.Generator) -> dict[str, bytes]:
    """LN(x + s + b) with the sum x + s + b also an output (the next residual needs it)."""
    inits = {"gamma": (1 + 0.1 * rng.standard_normal(d)).astype(np.float32),
             "beta": (0.1 * rng.standard_normal(d)).astype(np.float32),
             "bias": (0.1 * rng.standard_normal(d)).astype(np.float32)}
    io = {"x": (1, rows, d), "s": (1, rows, d)}
    ours = [helper.make_node("Add", ["x", "s"], ["xs"]),
            helper.make_node("Add", ["xs", "bias"], ["sum"]),
            helper.make_node("LayerNormalization", ["sum", "gamma", "beta"], ["ln"],
                             axis=-1, epsilon=1e-5),
            helper.make_node("Add", ["ln", "sum"], ["y"])]
    skip = [helper.make_node("SkipLayerNormalization", ["x", "s", "gamma", "beta", "bias"],
                             ["ln", "", "", "sum"], domain="com.microsoft", epsilon=1e-5),
            helper.make_node("Add", ["ln", "sum"], ["y"])]
    return {"Add, Add, LayerNormalization (ours)": _model(ours, inits, io),
            "com.microsoft.SkipLayerNormalization": _model(skip, inits, io)}


def time_forms(title: str, forms: dict[str, bytes], feed: dict[str, np.ndarray],
               rounds: int) -> None:
    """One table: each form's median, its ratio to the first form, and its max |Δ| to it."""
    print(f"\n{title}")
    print("| form | nodes | median µs | × ours | max |Δ| vs ours |")
    print("|---|---|---|---|---|")
    for name, t in latency.time_forms(forms, feed, 10 * rounds).items():
        print(f"| {name} | {t.nodes} | {1000 * t.median_ms:.0f} | {t.ratio:.2f} | "
              f"{t.max_diff:.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print("ORT CPU, ORT_ENABLE_ALL, batch 1, 2 threads, spinning off; "
          f"medians of {10 * args.rounds} runs each, interleaved in blocks")
    for g, n, d in SHAPES:
        x = {"x": rng.standard_normal((g, n, d)).astype(np.float32)}
        time_forms(f"Attention core, {g} groups × {n} tokens × {d} channels, {HEADS} heads",
                   attention_forms(g, n, d, rng), x, args.rounds)
    for g, n, d in SHAPES:
        feed = {k: rng.standard_normal((1, g * n, d)).astype(np.float32) for k in "xs"}
        time_forms(f"Residual + LayerNorm, {g * n} tokens × {d} channels",
                   norm_forms(g * n, d, rng), feed, args.rounds)


if __name__ == "__main__":
    main()
