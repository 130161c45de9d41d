"""Give a rewritten graph back the input and output names it had before the passes.

Callers address a model's inputs and outputs by name (``session.run(["logits"], {"x": ...})``),
so a pass pipeline must not rename them. Some passes do: onnx_ir's IdentityEliminationPass,
for ``z = Identity(y)`` with both y and z graph outputs, drops the Identity and lists the one
value twice, as ``[z, z]``; onnxscript's optimizer renames a graph input that is also a graph
output (``x`` becomes ``x_orig``, read by ``x = Identity(x_orig)``). This pass, given the names
recorded before the pipeline, restores them:

- input i gets its name back: ``inputs'[i].name = inputs[i]``;
- output i that names a graph input becomes that input itself (``(x) => (x, ...)``);
- output i whose value is not a graph input and is listed under no other recorded name is
  renamed in place;
- any other output i (a value listed under two names, or a graph input under another name) is
  copied: ``outputs[i] = Identity(v)``, a new value with the recorded name and v's type and
  shape;
- output i whose recorded name an earlier output j had (the model listed one value twice, as
  ``(y, y)``) becomes that output again: ``outputs[i] = outputs[j]``.

A value that holds a recorded name in the meantime is renamed first (``name_1``, ...).
An ``Identity`` left with no use (one that copied a graph input to an output, once the output
is that input again) is removed. The graph computes the same function, under the interface it
had; nothing else changes.
"""

from __future__ import annotations

import collections
import logging

import onnx_ir as ir

log = logging.getLogger(__name__)


def interface_names(model: ir.Model) -> tuple[list[str], list[str]]:
    """(input names, output names) of ``model``'s main graph, in order."""
    graph = model.graph
    return [v.name or "" for v in graph.inputs], [v.name or "" for v in graph.outputs]


def restore_interface(model: ir.Model, inputs: list[str], outputs: list[str]) -> int:
    """Restore the recorded ``inputs`` and ``outputs`` names of ``model`` (see the module
    docstring); return how many were changed back. The counts must match the model's."""
    graph = model.graph
    if len(graph.inputs) != len(inputs) or len(graph.outputs) != len(outputs):
        raise ValueError(f"the graph has {len(graph.inputs)} inputs and {len(graph.outputs)} "
                         f"outputs, {len(inputs)} and {len(outputs)} before the passes")
    restored = 0
    for value, name in zip(graph.inputs, inputs, strict=True):
        if value.name != name:
            _free_name(graph, name, keep=value)
            value.name = name
            restored += 1
    by_name = {v.name: v for v in graph.inputs}
    wanted: dict[int, set[str]] = collections.defaultdict(set)  # value → its recorded names
    for value, name in zip(graph.outputs, outputs, strict=True):
        wanted[id(value)].add(name)
    given: dict[str, ir.Value] = {}  # recorded name → the output value that now has it
    for i, (value, name) in enumerate(zip(list(graph.outputs), outputs, strict=True)):
        if name in given:  # the model listed one value twice, as (y, y): list it again
            restored += given[name] is not value
            graph.outputs[i] = given[name]
            continue
        given[name] = value
        if value.name == name:
            continue
        restored += 1
        if name in by_name:
            graph.outputs[i] = by_name[name]
        elif len(wanted[id(value)]) == 1 and not value.is_graph_input():
            _free_name(graph, name, keep=value)
            value.name = name
        else:
            _free_name(graph, name, keep=None)
            graph.outputs[i] = _identity_copy(graph, value, name)
        given[name] = graph.outputs[i]
    if restored:
        log.info("Restored %d graph input/output names that the passes changed", restored)
        _remove_unused_identities(graph)
    return restored


def _remove_unused_identities(graph: ir.Graph) -> None:
    """Remove the Identity nodes of ``graph`` whose output nothing reads."""
    for node in reversed(list(graph)):
        output = node.outputs[0] if node.op_type == "Identity" and not node.domain else None
        if output is not None and not output.uses() and not output.is_graph_output():
            graph.remove(node, safe=True)


def _identity_copy(graph: ir.Graph, value: ir.Value, name: str) -> ir.Value:
    """A new value ``name`` = Identity(``value``), appended to ``graph``."""
    node = ir.node("Identity", [value], outputs=[ir.Value(name=name, type=value.type,
                                                          shape=value.shape)])
    graph.append(node)
    return node.outputs[0]


def _free_name(graph: ir.Graph, name: str, keep: ir.Value | None) -> None:
    """Rename any value of ``graph`` other than ``keep`` that is called ``name``."""
    values = [*graph.inputs, *graph.initializers.values(),
              *(out for node in graph for out in node.outputs)]
    taken = {v.name for v in values}
    for value in values:
        if value.name == name and value is not keep:
            suffix = 1
            while f"{name}_{suffix}" in taken:
                suffix += 1
            value.name = f"{name}_{suffix}"  # an initializer's entry follows (onnx_ir)
            taken.add(value.name)
