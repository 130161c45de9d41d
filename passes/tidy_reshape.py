"""Remove the Reshapes that the layout rewrites leave redundant.

The unfold/fold and head-split rewrites put a Reshape around the ops they emit whatever the
neighbouring shapes; where the neighbour already has that shape, the Reshape is a no-op; with
one attention head, the head sum reduces an axis of size 1. Three rules, run after those
rewrites so that one ``mvcompile optimize`` run reaches the fixed point (onnxsim on the result
would otherwise remove them on a second run):

    Reduce{Sum,Mean,Max,Min}(x, axes) → Reshape(x, S without axes)   when S[a] = 1 for a in axes
    Reshape(Reshape(x, s1), s2) → Reshape(x, s2')     (onnxscript's ``ReshapeReshape``)
    Reshape(x, s) → x                  when x's static shape S satisfies resolve(s, S) = S

(a reduction over axes of size 1 only drops them: keepdims=1 keeps them, so it is x itself.)

``resolve`` applies ONNX's Reshape semantics: with ``allowzero`` = 0 a 0 in s copies the
input dimension at that index, and one −1 takes numel(x) / (product of the others). The second
rule is exact because a Reshape only depends on the element count of its input, which the
inner Reshape keeps: s2' is s2 with its 0 (copy of the intermediate dimension) turned into
the output's static dimension or, when s2 has no −1, into −1.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchResult, RewriteRuleClassBase, RewriteRuleSet
from onnxscript.rewriter.rules.common import reshape_reshape_rule


def resolve_reshape(target: list[int], shape: list[int], allowzero: bool) -> list[int] | None:
    """The output shape of ``Reshape`` of a tensor of static ``shape`` to ``target`` (ONNX
    semantics, see the module docstring); None where the target is invalid for it."""
    dims = list(target)
    for i, dim in enumerate(dims):
        if dim == 0 and not allowzero:
            if i >= len(shape):
                return None
            dims[i] = shape[i]
    unknown = [i for i, dim in enumerate(dims) if dim == -1]
    if len(unknown) > 1 or any(dim < -1 for dim in dims):
        return None
    if unknown:
        known = math.prod(dim for dim in dims if dim != -1)
        if known == 0 or math.prod(shape) % known:
            return None
        dims[unknown[0]] = math.prod(shape) // known
    return dims if math.prod(dims) == math.prod(shape) else None


class NoOpReshape(RewriteRuleClassBase):
    """``Reshape(x, s)`` → ``x`` where it gives x its own static shape (an Identity, which
    the pipeline's identity elimination then removes)."""

    def __init__(self) -> None:
        super().__init__(name="noop_reshape")

    def pattern(self, op, x, shape):
        return op.Reshape(x, shape)

    def check(self, context, x, shape) -> MatchResult:
        result = MatchResult()
        if x.shape is None or not x.shape.is_static():
            return result.fail(f"shape of '{x.name}' is not static.")
        if shape.const_value is None:
            return result.fail(f"target shape '{shape.name}' is not a constant.")
        allowzero = bool(context.nodes[0].attributes.get_int("allowzero", 0))
        current = [int(dim) for dim in x.shape]
        target = [int(dim) for dim in np.asarray(shape.const_value.numpy()).reshape(-1)]
        resolved = resolve_reshape(target, current, allowzero)
        if resolved != current:
            return result.fail(f"reshapes {current} to {resolved or target}.")
        return result

    def rewrite(self, op, x, shape):
        return op.Identity(x)


class SingletonReduce(RewriteRuleClassBase):
    """``Reduce<op>(x, axes)`` over axes of size 1 (opset ≥ 18 form, axes an input) →
    ``Reshape`` to x's shape without those axes (keepdims=0), or ``Identity`` (keepdims=1)."""

    def __init__(self, op_type: str) -> None:
        super().__init__(name=f"singleton_{op_type.lower()}")
        self.op_type = op_type

    def pattern(self, op, x, axes):
        return getattr(op, self.op_type)(x, axes, _outputs=["reduced"])

    def check(self, context, x, axes, reduced) -> MatchResult:
        result = MatchResult()
        if x.shape is None or not x.shape.is_static():
            return result.fail(f"shape of '{x.name}' is not static.")
        if axes.const_value is None:
            return result.fail(f"axes '{axes.name}' are not a constant.")
        rank = len(x.shape)
        if rank == 0:
            return result.fail(f"'{x.name}' is a scalar: it has no axes to reduce.")
        picked = {int(a) % rank for a in np.asarray(axes.const_value.numpy()).reshape(-1)}
        if not picked:
            return result.fail("reduces no axis, or all of them (empty axes).")
        if any(x.shape[a] != 1 for a in picked):
            return result.fail(f"reduces axes {sorted(picked)} of shape {list(x.shape)}, not "
                               "all of size 1.")
        node = reduced.producer()
        self._keepdims = node.attributes.get_int("keepdims", 1)
        self._shape = [int(d) for i, d in enumerate(x.shape) if i not in picked]
        return result

    def rewrite(self, op, x, axes, reduced):
        if self._keepdims:
            return op.Identity(x)
        return op.Reshape(x, op.initializer(ir.tensor(self._shape, dtype=ir.DataType.INT64,
                                                      name=f"{reduced.name}/shape")))


# Reduce<op>(x, axes) over size-1 axes  ->  Reshape(x, shape without them) | Identity(x)
singleton_reduce_rules = [SingletonReduce.rule(op_type)
                          for op_type in ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin")]

# Reshape(x, s) with resolve(s, shape(x)) == shape(x)  ->  Identity(x)
noop_reshape_rule = NoOpReshape.rule()

# In this order: a reduction's Reshape can merge with the next, which may then be a no-op.
rules = RewriteRuleSet([*singleton_reduce_rules, reshape_reshape_rule, noop_reshape_rule])
