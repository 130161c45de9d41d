"""A MobileViT 3×3 convolution, direct and as Winograd F(2×2, 3×3) in ONNX ops, timed on ORT.

Why the passes leave the dense 3×3 convolutions (the MobileViT blocks' local ``conv_kxk`` and
``fusion`` convs, a fifth of the network's multiply-adds) as ``Conv``: Winograd's algorithm
does them with 2.25× fewer multiply-adds, but written in the ops that ONNX Runtime runs, its
transforms cost what it saves. Each form is timed interleaved in one process (ORT CPU,
ORT_ENABLE_ALL, batch 1, 2 threads, spinning off), each followed by the Swish that follows
every such conv in MobileViT, with its max abs difference to the direct form.

Winograd F(2×2, 3×3) (Lavin & Gray, 2016) on 4×4 input tiles d with stride 2, for each tile:

    Y = Aᵀ [ Σ_c (G g_kc Gᵀ) ⊙ (Bᵀ d_c B) ] A

with the 4×4 input transform Bᵀ, the 4×3 filter transform G (done once, offline) and the 2×4
output transform Aᵀ. Over the 16 tile positions ij the sum over c is 16 matrix products
M_ij [K, T] = U_ij [K, C] · V_ij [C, T], T = HW/4 tiles: 16·K·C·HW/4 multiply-adds against
9·K·C·HW direct.

- direct: ``Conv`` (ORT runs it in its NCHWc layout);
- Winograd, grouped conv: V by a depthwise ``Conv`` with 16 outputs per channel (4×4 kernel
  Bᵀ⊗Bᵀ, stride 2), ``FusedMatMul`` with ``transBatchB`` to reach V's [C,16,T] layout, a
  ``Gemm`` by Aᵀ⊗Aᵀ (bias in C) and ``DepthToSpace``;
- Winograd, 3-D conv: Pad, ``SpaceToDepth`` to (by,bx,c) blocks, V by a 1×2×2 ``Conv`` over
  [4, C, H/2+1, W/2+1] straight into [16, C, T], a batched ``MatMul`` and Aᵀ⊗Aᵀ as a 1×2×2
  stride-2 ``ConvTranspose``, then the bias ``Add``.

    python benchmarks/conv_forms.py [--rounds 30]
"""

from __future__ import annotations

import argparse

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from mvcompile import latency

B_T = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float64)
G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float64)
A_T = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float64)
# (C in, K out, H = W): XXS's and S's stage-3 fusion and local convs at 256², S's stage-4 fusion
SHAPES = ((96, 48, 32), (48, 48, 32), (192, 96, 32), (96, 96, 32), (256, 128, 16))


def _model(nodes: list[onnx.NodeProto], inits: dict[str, np.ndarray], c: int, h: int) -> bytes:
    swish = [helper.make_node("Sigmoid", ["conv"], ["sig"]),
             helper.make_node("Mul", ["conv", "sig"], ["y"])]
    graph = helper.make_graph(
        nodes + swish, "conv3x3",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, h, h])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(a, n) for n, a in inits.items()])
    return helper.make_model(graph, ir_version=10, opset_imports=[
        helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]).SerializeToString()


def filter_transform(w: np.ndarray) -> np.ndarray:
    """U_ij = (G g Gᵀ)_ij for every (k, c): [16, K, C]."""
    k, c = w.shape[:2]
    return np.einsum("iu,kcuv,jv->ijkc", G, w.astype(np.float64), G).reshape(16, k, c)


def direct(w: np.ndarray, b: np.ndarray, h: int) -> bytes:
    conv = helper.make_node("Conv", ["x", "w", "b"], ["conv"], pads=[1, 1, 1, 1])
    return _model([conv], {"w": w, "b": b}, w.shape[1], h)


def winograd_grouped(w: np.ndarray, b: np.ndarray, h: int) -> bytes:
    """V [C·16, T] by a depthwise conv, products over transposed batches, DepthToSpace."""
    k, c = w.shape[:2]
    t = (h // 2) ** 2
    b_kernel = np.einsum("iu,jv->ijuv", B_T, B_T).reshape(16, 1, 4, 4)
    a_matrix = np.einsum("pi,qj->pqij", A_T, A_T).reshape(4, 16)
    nodes = [
        helper.make_node("Conv", ["x", "bt"], ["v"], group=c, strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Reshape", ["v", "v_shape"], ["v3"]),  # [C, 16, T]
        helper.make_node("FusedMatMul", ["u", "v3"], ["m"], domain="com.microsoft",
                         transBatchB=1),  # [16, K, T]
        helper.make_node("Reshape", ["m", "m_shape"], ["m2"]),
        helper.make_node("Gemm", ["at", "m2", "bias"], ["y2"]),  # [(p,q), K·T]
        helper.make_node("Reshape", ["y2", "y_shape"], ["y4"]),
        helper.make_node("DepthToSpace", ["y4"], ["conv"], blocksize=2, mode="DCR")]
    inits = {"bt": np.tile(b_kernel, (c, 1, 1, 1)), "u": filter_transform(w),
             "at": a_matrix, "bias": np.repeat(b, t),
             "v_shape": np.array([c, 16, t], np.int64),
             "m_shape": np.array([16, k * t], np.int64),
             "y_shape": np.array([1, 4 * k, h // 2, h // 2], np.int64)}
    return _model(nodes, _float32(inits), c, h)


def winograd_3d(w: np.ndarray, b: np.ndarray, h: int) -> bytes:
    """V [16, C, T] by a 3-D conv over SpaceToDepth blocks, output by a 3-D ConvTranspose."""
    k, c = w.shape[:2]
    n = h // 2
    # V[ij, c, y, x] = Σ B_T[i, 2a+by]·B_T[j, 2e+bx]·E[(by,bx), c, y+a, x+e]
    v_kernel = np.einsum("iaY,jeX->ijYXae", B_T.reshape(4, 2, 2), B_T.reshape(4, 2, 2))
    # Y[k, 2y+p, 2x+q] = Σ_ij A_T[p, i]·A_T[q, j]·M[ij, k, y, x]
    y_kernel = np.einsum("pi,qj->ijpq", A_T, A_T)
    nodes = [
        helper.make_node("Pad", ["x", "pads"], ["xp"]),
        helper.make_node("SpaceToDepth", ["xp"], ["e"], blocksize=2),
        helper.make_node("Reshape", ["e", "e_shape"], ["e5"]),  # [1, 4, C, n+1, n+1]
        helper.make_node("Conv", ["e5", "vk"], ["v5"]),  # [1, 16, C, n, n]
        helper.make_node("Reshape", ["v5", "v_shape"], ["v"]),
        helper.make_node("MatMul", ["u", "v"], ["m"]),  # [16, K, T]
        helper.make_node("Reshape", ["m", "m_shape"], ["m5"]),
        helper.make_node("ConvTranspose", ["m5", "yk"], ["y5"], strides=[1, 2, 2]),
        helper.make_node("Reshape", ["y5", "y_shape"], ["y4"]),
        helper.make_node("Add", ["y4", "bias"], ["conv"])]
    inits = {"pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64),
             "e_shape": np.array([1, 4, c, n + 1, n + 1], np.int64),
             "vk": v_kernel.reshape(16, 4, 1, 2, 2), "v_shape": np.array([16, c, n * n], np.int64),
             "u": filter_transform(w), "m_shape": np.array([1, 16, k, n, n], np.int64),
             "yk": y_kernel.reshape(16, 1, 1, 2, 2), "y_shape": np.array([1, k, h, h], np.int64),
             "bias": b.reshape(k, 1, 1)}
    return _model(nodes, _float32(inits), c, h)


def _float32(inits: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {n: a if a.dtype == np.int64 else a.astype(np.float32) for n, a in inits.items()}


def time_shape(c: int, k: int, h: int, rounds: int, rng: np.random.Generator) -> None:
    w = (rng.standard_normal((k, c, 3, 3)) * np.sqrt(2 / (9 * c))).astype(np.float32)
    b = (0.1 * rng.standard_normal(k)).astype(np.float32)
    forms = {"direct Conv": direct(w, b, h), "Winograd, grouped conv": winograd_grouped(w, b, h),
             "Winograd, 3-D conv": winograd_3d(w, b, h)}
    feed = {"x": rng.standard_normal((1, c, h, h)).astype(np.float32)}
    for name, t in latency.time_forms(forms, feed, 10 * rounds).items():
        print(f"| {c}→{k}, {h}² | {name} | {t.nodes} | {1000 * t.median_ms:.0f} | "
              f"{t.ratio:.2f} | {t.max_diff:.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print("ORT CPU, ORT_ENABLE_ALL, batch 1, 2 threads, spinning off; 3×3 conv + Swish; "
          f"medians of {10 * args.rounds} runs each, interleaved in blocks\n")
    print("| conv | form | nodes | median µs | × direct | max |Δ| vs direct |")
    print("|---|---|---|---|---|---|")
    for c, k, h in SHAPES:
        time_shape(c, k, h, args.rounds, rng)


if __name__ == "__main__":
    main()
