"""The unknown sizes of a model's inputs past the batch: a symbolic image height and width
fixed to ``--resolution``, and a hint when random inputs cannot fill them.

``mvcompile optimize`` checks its result against the input model on random inputs, which
fill every unknown size like the batch (1, 2, 3). That suits a batch, a sequence length or a
ResNet's image size, but a MobileViT cannot reshape a 1×1 feature map into 2×2 patches, and
the layout rewrites need static shapes anyway: such a model needs its image size fixed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import onnx

from mvcompile.analysis import format_shape, graph_inputs, value_dims
from mvcompile.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UnknownDim:
    """Axis ``axis`` (past the batch) of graph input ``input`` has no fixed size."""

    input: str
    axis: int
    shape: list[int | str]  # the input's dims, "?" where unnamed and unknown
    param: str  # its dim_param, or "" when it has none


def unknown_dims(proto: onnx.ModelProto) -> list[UnknownDim]:
    """Every dimension past the first of every graph input (initializers aside) that has no
    fixed size."""
    found = []
    for value in graph_inputs(proto):
        dims = value.type.tensor_type.shape.dim
        found += [UnknownDim(value.name, axis, value_dims(value), dims[axis].dim_param)
                  for axis in range(1, len(dims)) if not dims[axis].HasField("dim_value")]
    return found


def symbolic_image_sizes(proto: onnx.ModelProto) -> list[UnknownDim]:
    """The unknown height and width of rank-4 inputs whose height and width are both
    unknown and whose channels are known: [N, C, H, W], or [N, H, W, C] where C is known
    and the second axis is not."""
    unknown = unknown_dims(proto)
    spatial = []
    for input_name in dict.fromkeys(u.input for u in unknown):
        mine = {u.axis: u for u in unknown if u.input == input_name}
        if len(mine[next(iter(mine))].shape) != 4:
            continue
        if set(mine) == {2, 3}:
            spatial += [mine[2], mine[3]]
        elif set(mine) == {1, 2}:
            spatial += [mine[1], mine[2]]
    return spatial


def fix_resolution(proto: onnx.ModelProto, resolution: int | None, name: str
                   ) -> onnx.ModelProto:
    """``proto``, or (given ``resolution``) a copy whose image inputs with a symbolic height
    and width (:func:`symbolic_image_sizes`) take ``resolution`` for both. A named size is
    fixed wherever the graph declares it, as ONNX Runtime's ``make_dim_param_fixed`` does
    (whose module imports torch). :class:`UserError` if that name also names another size
    (the batch, say)."""
    if resolution is None:
        return proto
    spatial = symbolic_image_sizes(proto)
    if not spatial:
        log.warning("--resolution %d is ignored: no [N, C, H, W] input of %s has a symbolic "
                    "height and width", resolution, name)
        return proto
    _check_names_only_image_sizes(proto, spatial, name)
    fixed = onnx.ModelProto()
    fixed.CopyFrom(proto)
    inputs = {value.name: value for value in fixed.graph.input}
    for u in spatial:
        if u.param:
            _fix_dim_param(fixed.graph, u.param, resolution)
        else:
            inputs[u.input].type.tensor_type.shape.dim[u.axis].dim_value = resolution
    return fixed


def cannot_run_hint(proto: onnx.ModelProto) -> str:
    """Why random inputs may not run ``proto``, when it has unknown sizes past the batch, and
    how to fix them; "" otherwise."""
    spatial = symbolic_image_sizes(proto)
    if spatial:
        return (f" Input '{spatial[0].input}' has a symbolic height and width "
                f"{format_shape(spatial[0].shape)}, which the check filled like the batch "
                "(1×1 images): pass --resolution R to fix them (e.g. --resolution 256).")
    unknown = unknown_dims(proto)
    if not unknown:
        return ""
    first = unknown[0]
    return (f" Input '{first.input}' has shape {format_shape(first.shape)}, whose unknown size "
            f"at axis {first.axis} the check filled like the batch (1): fix it first with "
            f"{_fix_command(first)}.")


def static_shapes_hint(proto: onnx.ModelProto) -> str:
    """For a model with unknown sizes past the batch: which one, and how to fix it so that
    rewrites that need static shapes can apply; "" if it has none."""
    unknown = unknown_dims(proto)
    if not unknown:
        return ""
    first = unknown[0]
    spatial = symbolic_image_sizes(proto)
    fix = ("--resolution R (e.g. --resolution 256) fixes its height and width" if spatial
           else f"{_fix_command(first)} fixes it")
    return (f"input '{first.input}' has shape {format_shape(first.shape)}, unknown at axis "
            f"{first.axis} (past the batch); {fix}")


def _fix_command(dim: UnknownDim) -> str:
    """ONNX Runtime's tool that fixes ``dim``, as a command line."""
    args = (f"--dim_param {dim.param} --dim_value SIZE" if dim.param else
            f"--input_name {dim.input} --input_shape ...")
    return f"`python -m onnxruntime.tools.make_dynamic_shape_fixed {args} IN OUT`"


def _check_names_only_image_sizes(proto: onnx.ModelProto, spatial: list[UnknownDim],
                                  name: str) -> None:
    """UserError if a name of a symbolic height or width also names a size that is not one."""
    image = {(u.input, u.axis) for u in spatial}
    names = {u.param for u in spatial if u.param}
    for value in proto.graph.input:
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.dim_param in names and (value.name, axis) not in image:
                raise UserError(
                    f"{name} names the height or width of its image input '{dim.dim_param}', "
                    f"and also axis {axis} of input '{value.name}'; --resolution would fix "
                    "both. Export the model with distinct names for the batch and the image "
                    "sizes.")


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
