"""Helpers shared by the per-pass tests: parse ONNX text, run a rule set, compare with ORT."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
import onnxruntime as ort

from mvcompile import onnx_io
from mvcompile.pipeline import RuleSetPass


def parse(text: str, initializers: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """An ONNX-text model plus numpy initializers, shape-inferred."""
    proto = onnx.parser.parse_model(text)
    for name, array in (initializers or {}).items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(array, name))
    return onnx.shape_inference.infer_shapes(proto)


def apply(proto: onnx.ModelProto, name: str, rule_set) -> tuple[onnx.ModelProto, RuleSetPass]:
    model = ir.serde.deserialize_model(proto)
    pass_ = RuleSetPass(name, rule_set)
    pass_(model)
    ir.passes.common.RemoveUnusedNodesPass()(model)
    return onnx_io.to_proto(model), pass_


def ops(proto: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in proto.graph.node]


def run(proto: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def assert_same_outputs(before: onnx.ModelProto, after: onnx.ModelProto,
                        feed: dict[str, np.ndarray], atol: float = 1e-5) -> None:
    """``after`` is valid (full check, ORT loads it) and computes what ``before`` does."""
    onnx.checker.check_model(after, full_check=True)
    for expected, actual in zip(run(before, feed), run(after, feed), strict=True):
        np.testing.assert_allclose(actual, expected, rtol=0, atol=atol)
