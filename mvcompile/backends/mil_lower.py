"""ONNX graph → Core ML MIL program, node by node, with coremltools' MIL builder.

The driver here fixes the input shapes (Core ML needs static shapes; only the batch dimension
may be symbolic in the ONNX model and ``batch`` fixes it), refuses graphs with ops that have no
lowering (listing every one), then walks the nodes in order and calls the op's lowering from
:data:`mvcompile.backends.mil_ops.LOWERINGS`. ONNX constants stay NumPy arrays until an op
needs them, so shape-like inputs (Reshape's shape, Split's sizes, ...) are read as values.

INT8 (QDQ graphs) is lowered in one of two modes (:mod:`mvcompile.backends.mil_quant`):
``w8a8`` (iOS17 quantize/dequantize on activations, constexpr int8 weights) or
``weight-only`` (iOS16 constexpr int8 weights, activations in float).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import coremltools as ct
import numpy as np
import onnx
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Function, Program, Var
from onnx import helper, numpy_helper

from mvcompile.backends import mil_ops
from mvcompile.errors import UserError

log = logging.getLogger(__name__)

INT8_MODES = ("w8a8", "weight-only")
MAX_RANK = 5  # Core ML tensors have rank at most 5
BATCH_FLAG = "--coreml-batch"
_ONNX_TO_NP = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16}


@dataclass
class LowerContext:
    """State shared by the op lowerings: ONNX tensor name → MIL Var or NumPy constant."""

    env: dict[str, Var | np.ndarray]
    int8_mode: str
    opset: int
    passthrough: set[str] = field(default_factory=set)  # weight-only: Q outputs kept float

    def value(self, name: str) -> Var | np.ndarray | None:
        """The Var or constant for input ``name`` ('' is an omitted optional input)."""
        if not name:
            return None
        return self.env[name]

    def const(self, name: str, node: onnx.NodeProto, what: str) -> np.ndarray | None:
        """A constant input, or :class:`UserError` naming the node when it is computed."""
        value = self.value(name)
        if value is None or isinstance(value, np.ndarray):
            return value
        if value.val is not None and not value.op.op_type.startswith("constexpr"):
            return np.asarray(value.val)
        raise UserError(f"{node.op_type} node {node.name!r}: its {what} ({name}) is computed at "
                        "run time; the Core ML lowering needs it constant.")


def sanitize(name: str) -> str:
    """A Core ML feature name: letters, digits and '_' (what coremltools would rename to)."""
    clean = re.sub(r"\W", "_", name)
    return clean if clean[:1].isalpha() or clean[:1] == "_" else f"_{clean}"


def unsupported_nodes(graph: onnx.GraphProto) -> list[tuple[str, str]]:
    """(op type, node name) for every node with no Core ML lowering, in graph order."""
    return [(f"{n.domain + '.' if n.domain not in ('', 'ai.onnx') else ''}{n.op_type}", n.name)
            for n in graph.node if mil_ops.lookup(n) is None]


def check_supported(graph: onnx.GraphProto) -> None:
    missing = unsupported_nodes(graph)
    if missing:
        listing = "; ".join(f"{op} (node {name!r})" for op, name in missing)
        supported = ", ".join(sorted(mil_ops.supported_op_types()))
        raise UserError(f"The Core ML lowering has no conversion for {len(missing)} node(s): "
                        f"{listing}. Supported ONNX ops: {supported}. Nothing was written.")


def input_shapes(graph: onnx.GraphProto, batch: int | None) -> dict[str, tuple[int, ...]]:
    """Static shapes of the graph inputs; a symbolic batch (axis 0) becomes ``batch``."""
    inits = {init.name for init in graph.initializer}
    shapes = {}
    for inp in graph.input:
        if inp.name in inits:
            continue
        tensor = inp.type.tensor_type
        if tensor.elem_type not in _ONNX_TO_NP:
            raise UserError(f"Input {inp.name!r} has element type "
                            f"{onnx.TensorProto.DataType.Name(tensor.elem_type)}; the Core ML "
                            "lowering takes float32 or float16 inputs.")
        shapes[inp.name] = tuple(_fixed_dim(inp.name, axis, dim, batch)
                                 for axis, dim in enumerate(tensor.shape.dim))
        if len(shapes[inp.name]) > MAX_RANK:
            raise UserError(f"Input {inp.name!r} has rank {len(shapes[inp.name])}; Core ML "
                            f"tensors have rank at most {MAX_RANK}.")
    return shapes


def _fixed_dim(name: str, axis: int, dim: onnx.TensorShapeProto.Dimension,
               batch: int | None) -> int:
    if dim.HasField("dim_value"):
        return dim.dim_value
    label = dim.dim_param or "unknown"
    if axis == 0 and batch is not None:
        return batch
    if axis == 0:
        raise UserError(f"Input {name!r} has a dynamic batch dimension ({label!r}) and Core ML "
                        f"needs it fixed: set it with {BATCH_FLAG} N (for example "
                        f"{BATCH_FLAG} 1).")
    raise UserError(f"Input {name!r} has a dynamic dimension {label!r} at axis {axis}; Core ML "
                    f"needs every dimension fixed, and {BATCH_FLAG} only sets the batch (axis "
                    "0). Export the model with a fixed size (mvcompile build --resolution R).")


def lower(proto: onnx.ModelProto, batch: int | None = 1, int8_mode: str = "w8a8") -> Program:
    """The MIL program (function ``main``) computing the same outputs as ``proto``."""
    if int8_mode not in INT8_MODES:
        raise UserError(f"Unknown Core ML int8 mode {int8_mode!r}; choose one of "
                        f"{', '.join(INT8_MODES)}.")
    graph = proto.graph
    check_supported(graph)
    shapes = input_shapes(graph, batch)
    target = deployment_target(graph, int8_mode)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    dtypes = {i.name: _ONNX_TO_NP[i.type.tensor_type.elem_type] for i in graph.input
              if i.name in shapes}
    placeholders = {sanitize(name): mb.placeholder(shape=shape, dtype=_mil_dtype(dtypes[name]))
                    for name, shape in shapes.items()}
    program = Program()
    with Function(placeholders, opset_version=target) as func:
        env: dict[str, Var | np.ndarray] = {name: func.inputs[sanitize(name)] for name in shapes}
        env.update({i.name: numpy_helper.to_array(i) for i in graph.initializer})
        ctx = LowerContext(env, int8_mode, opset)
        for node in graph.node:
            _lower_node(ctx, node)
        func.set_outputs([_named_output(ctx, out.name) for out in graph.output])
    program.add_function("main", func)
    return program


def _lower_node(ctx: LowerContext, node: onnx.NodeProto) -> None:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    try:
        outputs = mil_ops.lookup(node)(ctx, node, attrs)
    except UserError:
        raise
    except (ValueError, TypeError, AssertionError, NotImplementedError) as err:
        raise UserError(f"Cannot lower {node.op_type} node {node.name!r} to Core ML: "
                        f"{err}") from err
    for name, value in zip(node.output, outputs, strict=False):
        if not name:
            continue
        if isinstance(value, Var) and value.rank > MAX_RANK:
            raise UserError(f"{node.op_type} node {node.name!r} produces {name} of rank "
                            f"{value.rank}; Core ML tensors have rank at most {MAX_RANK}.")
        ctx.env[name] = value


def _named_output(ctx: LowerContext, name: str) -> Var:
    value = ctx.env[name]
    if not isinstance(value, Var) or value.val is not None:
        raise UserError(f"Graph output {name!r} is a constant, not computed from the inputs; "
                        "Core ML needs outputs that depend on an input.")
    return mb.identity(x=value, name=sanitize(name))


def deployment_target(graph: onnx.GraphProto, int8_mode: str) -> ct.target:
    """iOS17 for W8A8 activations (MIL quantize/dequantize); iOS16 otherwise."""
    quantized = any(n.op_type == "QuantizeLinear" for n in graph.node)
    return ct.target.iOS17 if quantized and int8_mode == "w8a8" else ct.target.iOS16


def _mil_dtype(dtype: type) -> object:
    from coremltools.converters.mil.mil import types

    return types.fp16 if dtype == np.float16 else types.fp32
