"""A small NumPy evaluator for Core ML MIL programs, for checking numerics where Core ML's own
``predict`` is unavailable (Linux).

It runs the ``main`` function op by op. Each op computes in float32 (float64 for reductions of
statistics) and its result is stored in the op's declared output type, so an FP16 program is
rounded to float16 after every op as Core ML stores it (Core ML's kernels may accumulate in
float16, so its results can differ a little more). Ops the evaluator does not know raise
``NotImplementedError`` naming the op type: a check that passes has evaluated every op.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
from coremltools.converters.mil.mil import Program, Var, types

from mvcompile.backends import mil_eval_ops

log = logging.getLogger(__name__)


def evaluate(program: Program, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs of ``program``'s main function, by output name, for input arrays ``feeds``."""
    func = program.functions["main"]
    env: dict[str, np.ndarray] = {}
    for name, var in func.inputs.items():
        if name not in feeds:
            raise KeyError(f"no value for program input {name!r}")
        env[var.name] = np.asarray(feeds[name]).astype(_np_dtype(var))
    for op in func.operations:
        _run(op, env)
    return {var.name: env[var.name] for var in func.outputs}


def _np_dtype(var: Var) -> np.dtype:
    return np.dtype(types.nptype_from_builtin(var.dtype))


def _value(var: Var, env: dict[str, np.ndarray]) -> np.ndarray | None:
    if var.name in env:
        return env[var.name]
    if var.val is not None:
        return np.asarray(var.val)
    raise KeyError(f"MIL var {var.name!r} has no value")


def _run(op: Any, env: dict[str, np.ndarray]) -> None:
    if op.op_type == "const":
        env[op.outputs[0].name] = np.asarray(op.outputs[0].val)
        return
    impl: Callable[..., Any] | None = mil_eval_ops.OPS.get(op.op_type)
    if impl is None:
        raise NotImplementedError(f"the MIL evaluator has no {op.op_type!r} op")
    args = {name: ([_value(v, env) for v in var] if isinstance(var, (list, tuple))
                   else _value(var, env)) for name, var in op.inputs.items()}
    results = impl(**args)
    if not isinstance(results, (list, tuple)):
        results = [results]
    for var, result in zip(op.outputs, results, strict=True):
        env[var.name] = np.asarray(result).astype(_np_dtype(var))
        if tuple(env[var.name].shape) != tuple(var.shape):
            raise AssertionError(f"{op.op_type} {op.name}: evaluated shape "
                                 f"{env[var.name].shape}, declared {tuple(var.shape)}")
