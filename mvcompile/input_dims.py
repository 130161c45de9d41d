"""The unknown dimensions of a model's inputs past the batch: symbolic image height and
width fixed to a resolution, and any other refused with the way to fix it.

``mvcompile optimize`` checks its result against the input model on random inputs, and the
layout rewrites need static shapes. Random inputs can fill a symbolic batch (1, 2, 3), but
not a height, width or sequence length: a guess such as 1 makes a MobileViT reshape a 1×1
feature map into 2×2 patches and fail, which says nothing about the model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import onnx

from mvcompile.analysis import format_shape
from mvcompile.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UnknownDim:
    """Axis ``axis`` (past the batch) of graph input ``input`` has no fixed size."""

    input: str
    axis: int
    shape: list[int | str]  # the input's dims, "?" where unnamed and unknown
    param: str  # its dim_param, or "" when it has none

    @property
    def is_spatial(self) -> bool:
        """Height or width of an [N, C, H, W] input."""
        return len(self.shape) == 4 and self.axis >= 2


def unknown_dims(proto: onnx.ModelProto) -> list[UnknownDim]:
    """Every dimension past the first of every graph input (initializers aside) that is not
    a fixed positive number."""
    initializers = {init.name for init in proto.graph.initializer}
    found = []
    for value in proto.graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        shape = [d.dim_value if d.dim_value > 0 else (d.dim_param or "?") for d in dims]
        found += [UnknownDim(value.name, axis, shape, dims[axis].dim_param)
                  for axis in range(1, len(dims)) if dims[axis].dim_value <= 0]
    return found


def fix_resolution(proto: onnx.ModelProto, resolution: int | None, name: str
                   ) -> onnx.ModelProto:
    """``proto``, or a copy whose [N, C, H, W] inputs with a symbolic H and W take
    ``resolution`` for both (a named one wherever the graph uses its name, as ONNX Runtime's
    ``make_dim_param_fixed`` does; its module imports torch). :class:`UserError` for a symbolic
    H or W without
    ``resolution`` and for an unknown dimension anywhere else past the batch."""
    unknown = unknown_dims(proto)
    other = next((u for u in unknown if not u.is_spatial), None)
    if other is not None:
        raise UserError(_other_dim_message(other, name))
    if not unknown:
        if resolution is not None:
            log.warning("--resolution %d is ignored: the inputs of %s have a fixed height and "
                        "width", resolution, name)
        return proto
    if resolution is None:
        first = unknown[0]
        raise UserError(
            f"Input '{first.input}' of {name} has a symbolic height and width "
            f"{format_shape(first.shape)}. optimize rewrites and checks the model at fixed "
            "sizes: pass --resolution R to fix them (the result then takes R×R images only), "
            "e.g. --resolution 256.")
    fixed = onnx.ModelProto()
    fixed.CopyFrom(proto)
    inputs = {value.name: value for value in fixed.graph.input}
    for u in unknown:
        if u.param:
            _fix_dim_param(fixed.graph, u.param, resolution)
        else:
            inputs[u.input].type.tensor_type.shape.dim[u.axis].dim_value = resolution
    return fixed


def _fix_dim_param(graph: onnx.GraphProto, param: str, size: int) -> None:
    """Every dimension named ``param`` in the shapes ``graph`` and its subgraphs declare
    becomes ``size``."""
    for value in (*graph.input, *graph.output, *graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == param:
                dim.dim_value = size  # clears dim_param
    for node in graph.node:
        for attribute in node.attribute:
            subgraphs = [*attribute.graphs, *([attribute.g] if attribute.HasField("g") else [])]
            for subgraph in subgraphs:
                _fix_dim_param(subgraph, param, size)


def _other_dim_message(dim: UnknownDim, name: str) -> str:
    fix = (f" (`python -m onnxruntime.tools.make_dynamic_shape_fixed --dim_param {dim.param} "
           f"--dim_value SIZE {name} fixed.onnx` does it)" if dim.param else "")
    return (f"Input '{dim.input}' of {name} has shape {format_shape(dim.shape)}, with an unknown "
            f"size at axis {dim.axis}. optimize checks its result on random inputs and fills "
            "only the batch and, with --resolution, the height and width of an [N, C, H, W] "
            f"input: fix that size in the model first{fix}.")
