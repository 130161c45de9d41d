"""Core ML lowering, one ONNX op at a time, on small ONNX-text fixtures.

Each fixture is lowered to MIL, converted by coremltools, and run: with the NumPy MIL
evaluator on Linux (both the lowered program and the program after coremltools' passes), with
the real ``MLModel.predict`` on macOS. Outputs are compared with ONNX Runtime on the same graph.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx.parser
import pytest
from _passes_util import run as run_unoptimised
from onnx import numpy_helper

from mvcompile.backends import coreml, mil_eval, mil_lower

RNG = np.random.default_rng(0)
HEADER = '<ir_version: 10, opset_import: ["" : 24, "com.microsoft" : 1]>'


def make_model(graph_text: str, **initializers: np.ndarray) -> onnx.ModelProto:
    """An ONNX model from ONNX text plus NumPy initializers (named by keyword)."""
    model = onnx.parser.parse_model(f"{HEADER}\n{graph_text}")
    model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in initializers.items())
    return model


def randn(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def check_op(model: onnx.ModelProto, int8_mode: str = "w8a8", tolerance: float = 1e-4
             ) -> collections.Counter:
    """Compare Core ML with ORT on random inputs; return the lowered program's op counts."""
    onnx.checker.check_model(model, full_check=True)
    feed = {i.name: randn(*[d.dim_value for d in i.type.tensor_type.shape.dim])
            for i in model.graph.input}
    expected = run_unoptimised(model, feed)
    options = coreml.CoreMLOptions(precision="fp32", int8_mode=int8_mode, input_type="tensor")
    program = mil_lower.lower(model, batch=1, int8_mode=int8_mode)
    mlmodel = coreml.convert(model, options)
    results = [coreml.run_coreml(mlmodel, feed, options)]  # predict on macOS
    if not coreml.ON_MAC:  # the lowering itself, before coremltools' passes
        results.append(mil_eval.evaluate(program, feed))
    for actual in results:
        for out, want in zip(model.graph.output, expected, strict=True):
            got = actual[out.name]
            assert got.shape == want.shape
            np.testing.assert_allclose(got, want, atol=tolerance, rtol=tolerance)
    return collections.Counter(op.op_type for op in program.functions["main"].operations)


def test_conv_with_pads_strides_groups_and_bias() -> None:
    counts = check_op(make_model("""
        g (float[1,4,9,8] x) => (float[1,6,5,4] y) {
            y = Conv<pads=[1,0,1,1], strides=[2,2], group=2, kernel_shape=[3,3]>(x, w, b)
        }""", w=randn(6, 2, 3, 3), b=randn(6)))
    assert counts["conv"] == 1


def test_same_upper_and_dilated_convs_and_batch_norm() -> None:
    check_op(make_model("""
        g (float[1,3,8,8] x) => (float[1,4,4,4] y, float[1,4,4,4] z) {
            c = Conv<auto_pad="SAME_UPPER", strides=[2,2], kernel_shape=[3,3]>(x, w)
            y = BatchNormalization<epsilon=0.001>(c, gamma, beta, mean, var)
            z = Conv<dilations=[2,2], pads=[0,0,0,0]>(x, w)
        }""", w=randn(4, 3, 3, 3), gamma=randn(4), beta=randn(4), mean=randn(4),
        var=np.abs(randn(4)) + 0.5))


def test_elementwise_ops_broadcast() -> None:
    counts = check_op(make_model("""
        g (float[2,3,4] x, float[3,1] z) => (float[2,3,4] y) {
            s = Sigmoid(x)
            a = Add(s, z)
            m = Mul(a, x)
            d = Sub(m, z)
            q = Div(d, k)
            w1 = Swish(q)
            y = Swish<alpha=0.5>(w1)
        }""", k=np.full((4,), 2.0, np.float32)))
    assert counts["silu"] == 1 and counts["real_div"] == 1 and counts["sub"] == 1


def test_quick_gelu_and_identity() -> None:
    counts = check_op(make_model("""
        g (float[1,4,3,3] x) => (float[1,4,3,3] y) {
            q = com.microsoft.QuickGelu<alpha=1.0>(x)
            y = Identity(q)
        }"""))
    assert counts["silu"] == 1


def test_concat_split_and_slice() -> None:
    check_op(make_model("""
        g (float[2,6,5] x) => (float[2,2,5] a, float[2,4,5] b, float[2,3,2] c, float[2,6,4] d) {
            a, b = Split<axis=1>(x, sizes)
            c = Slice(x, starts, ends, axes, steps)
            e = Slice(x, s2, e2, a2)
            d = Concat<axis=-1>(e, e)
        }""", sizes=np.array([2, 4], np.int64), starts=np.array([5, -1], np.int64),
        ends=np.array([-100, 0], np.int64), axes=np.array([1, 2], np.int64),
        steps=np.array([-2, -3], np.int64), s2=np.array([3], np.int64),
        e2=np.array([100], np.int64), a2=np.array([-1], np.int64)))


def test_split_into_equal_outputs() -> None:
    counts = check_op(make_model("""
        g (float[1,4,9] x) => (float[1,4,3] a, float[1,4,3] b, float[1,4,3] c) {
            a, b, c = Split<axis=-1, num_outputs=3>(x)
        }"""))
    assert counts["split"] == 1


def test_layer_norm_over_one_and_two_axes() -> None:
    check_op(make_model("""
        g (float[2,5,8] x) => (float[2,5,8] y, float[2,5,8] z) {
            y = LayerNormalization<axis=-1, epsilon=0.00001>(x, g1, b1)
            z = LayerNormalization<axis=1>(x, g2, b2)
        }""", g1=randn(8), b1=randn(8), g2=randn(5, 8), b2=randn(5, 8)))


def test_matmul_batched_and_with_constant() -> None:
    counts = check_op(make_model("""
        g (float[2,3,4,5] x, float[2,3,5,6] z) => (float[2,3,4,6] y, float[2,3,4,7] w) {
            y = MatMul(x, z)
            w = MatMul(x, c)
        }""", c=randn(5, 7)))
    assert counts["matmul"] == 2


@pytest.mark.parametrize(("equation", "shapes", "transposes"), [
    ("ghnd,ghmd->ghnm", [(1, 4, 16, 8), (1, 4, 16, 8)], 0),  # attention scores q·kᵀ
    ("bcn,cd->bnd", [(4, 8, 16), (8, 12)], 0),  # unfold + 1x1 conv
    ("cd,bnd->bcn", [(12, 8), (4, 16, 8)], 0),  # 1x1 conv + fold
    ("bij,bjk->bik", [(2, 3, 4), (2, 4, 5)], 0),
    ("ij,kj->ik", [(3, 4), (5, 4)], 0),
    ("abc,cbd->adb", [(2, 3, 4), (4, 3, 5)], None),  # needs reordering
    ("ab,cb->bca", [(2, 3), (4, 3)], None),  # no contraction left after batching b
])
def test_einsum_becomes_one_matmul(equation: str, shapes: list, transposes: int | None
                                   ) -> None:
    a, b = (f"float[{','.join(map(str, s))}]" for s in shapes)
    lhs, out = equation.split("->")
    ta, tb = lhs.split(",")
    sizes = {c: d for t, s in zip((ta, tb), shapes, strict=True) for c, d in zip(t, s,
                                                                                  strict=True)}
    y = f"float[{','.join(str(sizes[c]) for c in out)}]"
    counts = check_op(make_model(f"""
        g ({a} p, {b} q) => ({y} y) {{
            y = Einsum<equation="{equation}">(p, q)
        }}"""))
    assert counts["matmul"] == 1
    if transposes is not None:
        assert counts["transpose"] == transposes


def test_fused_matmul_transposed_forms() -> None:
    counts = check_op(make_model("""
        g (float[2,5,4] x, float[2,6,5] z) => (float[2,4,6] y) {
            y = com.microsoft.FusedMatMul<transA=1, transB=1, alpha=0.5>(x, z)
        }"""))
    assert counts["matmul"] == 1 and counts["transpose"] == 0


def test_gemm_forms() -> None:
    counts = check_op(make_model("""
        g (float[3,8] x, float[8,3] xt, float[8,4] bt) => (float[3,5] y, float[3,5] z,
                                                           float[3,4] w) {
            y = Gemm<transB=1>(x, w1, b1)
            z = Gemm<transA=1, alpha=0.5, beta=2.0>(xt, w2, b2)
            w = Gemm(x, bt, c3)
        }""", w1=randn(5, 8), b1=randn(5), w2=randn(8, 5), b2=randn(1, 5), c3=randn(3, 4)))
    assert counts["linear"] == 2 and counts["matmul"] == 1


def test_softmax_reshape_transpose_flatten() -> None:
    check_op(make_model("""
        g (float[2,3,4,5] x) => (float[2,60] y, float[8,15] z) {
            s = Softmax<axis=-1>(x)
            t = Transpose<perm=[0,2,1,3]>(s)
            r = Reshape(t, shape)
            y = Flatten<axis=1>(r)
            z = Flatten<axis=2>(t)
        }""", shape=np.array([0, -1, 5], np.int64)))


def test_space_to_depth_and_depth_to_space() -> None:
    counts = check_op(make_model("""
        g (float[1,3,4,6] x, float[1,8,2,3] z) => (float[1,12,2,3] a, float[1,2,4,6] b,
                                                  float[1,2,4,6] c) {
            a = SpaceToDepth<blocksize=2>(x)
            b = DepthToSpace<blocksize=2, mode="DCR">(z)
            c = DepthToSpace<blocksize=2, mode="CRD">(z)
        }"""))
    assert counts["space_to_depth"] == 1 and counts["depth_to_space"] == 1
    assert counts["pixel_shuffle"] == 1


def test_pooling_and_reductions() -> None:
    check_op(make_model("""
        g (float[2,4,5,6] x) => (float[2,4,1,1] a, float[2,5,6] b, float[2,4,5,1] c) {
            a = GlobalAveragePool(x)
            b = ReduceSum<keepdims=0>(x, ax1)
            c = ReduceMean(x, ax2)
        }""", ax1=np.array([1], np.int64), ax2=np.array([-1], np.int64)))


def _qdq_conv_model() -> onnx.ModelProto:
    """x → Q/DQ (uint8) → Conv(DQ int8 per-channel weight, DQ int32 bias) → Q/DQ → y."""
    w = randn(4, 3, 3, 3)
    w_scale = (np.abs(w).reshape(4, -1).max(1) / 127).astype(np.float32)
    x_scale = np.float32(4.0 / 255)
    return make_model("""
        g (float[1,3,6,6] x) => (float[1,4,6,6] y) {
            xq = QuantizeLinear(x, xs, xz)
            xd = DequantizeLinear(xq, xs, xz)
            wd = DequantizeLinear<axis=0>(wq, ws, wz)
            bd = DequantizeLinear<axis=0>(bq, bs, bz)
            c = Conv<pads=[1,1,1,1]>(xd, wd, bd)
            cq = QuantizeLinear(c, cs, cz)
            y = DequantizeLinear(cq, cs, cz)
        }""", xs=x_scale, xz=np.uint8(128),
        wq=np.round(w / w_scale[:, None, None, None]).astype(np.int8), ws=w_scale,
        wz=np.zeros(4, np.int8), bq=RNG.integers(-500, 500, 4).astype(np.int32),
        bs=(x_scale * w_scale).astype(np.float32), bz=np.zeros(4, np.int32),
        cs=np.float32(0.1), cz=np.uint8(128))


def test_qdq_lowers_to_int8_ops_w8a8() -> None:
    counts = check_op(_qdq_conv_model(), "w8a8", tolerance=0.1 + 1e-4)  # ≤ one output step
    assert counts["quantize"] == 2 and counts["dequantize"] == 2
    assert counts["constexpr_affine_dequantize"] == 1


def test_qdq_weight_only_keeps_activations_float() -> None:
    model = _qdq_conv_model()
    feed = {"x": randn(1, 3, 6, 6)}
    options = coreml.CoreMLOptions(precision="fp32", int8_mode="weight-only",
                                   input_type="tensor")
    mlmodel = coreml.convert(model, options)
    counts = coreml.program_summary(mlmodel._mil_program)["ops"]
    assert "quantize" not in counts and counts["constexpr_affine_dequantize"] == 1
    reference = run_unoptimised(coreml.reference_model(model, "weight-only")[0], feed)[0]
    np.testing.assert_allclose(coreml.run_coreml(mlmodel, feed, options)["y"], reference,
                               atol=1e-4, rtol=1e-4)


def test_a_scalar_int8_constant_is_folded() -> None:
    """An INT8 build without passes quantizes the attention's scalar scale; Core ML's
    constexpr_affine_dequantize takes no rank-0 data ("axis needs to be in the range")."""
    counts = check_op(make_model("""
        g (float[2,3] x) => (float[2,3] y) {
            s = DequantizeLinear(sq, ss, sz)
            y = Mul(x, s)
        }""", sq=np.int8(64), ss=np.float32(0.25 / 64), sz=np.int8(0)))
    assert counts["constexpr_affine_dequantize"] == 0


def test_flatten_with_negative_axes() -> None:
    """ONNX axes run over [-r, r]: -1 keeps the last dim, -3 the last three."""
    check_op(make_model("""
        g (float[2,3,4,5] x) => (float[24,5] y, float[2,60] z) {
            y = Flatten<axis=-1>(x)
            z = Flatten<axis=-3>(x)
        }"""))


def test_gemm_bias_per_row_and_int8_weight_with_alpha() -> None:
    """C [M, 1] adds per row even when M == N; with a constexpr int8 weight, α scales x·Wᵀ
    and not β·C."""
    w = randn(4, 8)
    scale = (np.abs(w).max(axis=1) / 127).astype(np.float32)
    counts = check_op(make_model("""
        g (float[4,4] a, float[3,8] x) => (float[4,4] y, float[3,4] z) {
            y = Gemm(a, b, c)
            w = DequantizeLinear<axis=0>(wq, ws, wz)
            z = Gemm<transB=1, alpha=0.5, beta=2.0>(x, w, bias)
        }""", b=randn(4, 4), c=randn(4, 1), wq=np.round(w / scale[:, None]).astype(np.int8),
        ws=scale, wz=np.zeros(4, np.int8), bias=randn(4)), tolerance=1e-3)
    assert counts["linear"] == 1 and counts["matmul"] == 1


def test_an_output_of_another_shape_is_refused_not_reshaped() -> None:
    from mvcompile.errors import UserError

    with pytest.raises(UserError, match=r"shape \[60, 1\], ONNX Runtime's \[12, 5\]"):
        coreml._as_shape(np.zeros((60, 1)), (12, 5), "y")
    assert coreml._as_shape(np.zeros((1000,)), (1, 1000), "y").shape == (1, 1000)
