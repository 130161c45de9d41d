"""``mvcompile optimize IN.onnx -o OUT.onnx``: our pass pipeline applied to any ONNX model.

Steps: load → the Casts of weights stored as float16/bfloat16 folded to float32 (exact; onnxsim
cannot fold a Cast of bfloat16) → onnxsim → pipeline (each rule reports its match count or why
it refused) → those weights stored so again (:mod:`storage_precision`)
→ check_model + ORT load → numerics against the *input* model on seeded random inputs
(max |Δ| ≤ tolerance) → atomic write (and removal of the external data files that the model
it replaces used and the result does not). Nothing is written if any step fails.

A model with a symbolic batch goes through these steps at batch 1 and at batch 2, and the two
results are generalised back to any batch (:mod:`batch_generalize`), their weights stored in
float16/bfloat16 again (once, on the generalised model) and checked at :data:`VERIFY_BATCHES`;
where that fails, through the steps with its batch as it is.
"""

from __future__ import annotations

import collections
import functools
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from mvcompile import batch_generalize, input_dims, latency, onnx_io, stages
from mvcompile.analysis import graph_inputs, value_dims
from mvcompile.backends._output import check_writable_dir
from mvcompile.errors import UserError, first_line, raise_if_out_of_memory
from mvcompile.passes import storage_precision
from mvcompile.passes.unfold_fold import NOT_STATIC
from mvcompile.pipeline import (
    NO_CANDIDATE,
    PARTIAL,
    OnnxscriptOptimize,
    run_pipeline,
    stage_fired,
)
from mvcompile.table import human_bytes

log = logging.getLogger(__name__)

TARGET_PIPELINES = {"ort": "fp32-foreign", "mobile": "mobile-foreign"}
DEFAULT_TOLERANCE = 1e-4
HALF_ULPS = 4  # float16 outputs may differ by this many units in the last place (output_limit)
ROUNDING_ULPS = 32  # float32/64 outputs: by this many units in the last place of their scale
FILL_VALUE = 1e30  # |values| from here up in an output are mask fills (output_limit)
# The batches at which a model optimized at a fixed batch and generalised back to a symbolic
# one (optimize_proto without --batch) must match the input.
VERIFY_BATCHES = (1, 2, 3)
# Stages whose ORT speed depends on the model: folding the attention head split makes
# MobileViT faster and DeiT and Swin slower (README, foreign-graph table).
MEASURED_STAGES = ("fold_head_split",)
LATENCY_RUNS = 100
# Drop a measured stage only if the model runs at least this much faster without it (fastest
# run of LATENCY_RUNS each); ties keep the transpose-free form, the default.
DROP_MARGIN = 0.03
# storage_note speaks up when the result is this much larger than the input.
SIZE_NOTE_RATIO = 1.1


class NumericsMismatch(UserError):
    """The optimized model's outputs differ from the input's beyond the limit."""


# The stage left out when the result differs from the input: onnxscript's default rules are
# not all sound (FuseSuccessiveClip turns Clip(Clip(x, -1, -0.5), 0, 1), always 0, into
# Clip(x, 0, -0.5), always -0.5); ours are checked rule by rule in tests/.
UNCHECKED_STAGE = "onnxscript_optimize"


def simplify(proto: onnx.ModelProto) -> onnx.ModelProto:
    """onnxsim's simplification; the input unchanged (with a warning) if onnxsim fails."""
    import onnxsim

    try:
        simplified, ok = onnxsim.simplify(proto)
    except Exception as err:  # onnxsim raises bare RuntimeErrors from C++
        log.warning("onnxsim failed (%s); continuing with the unsimplified model", err)
        return proto
    if not ok:
        log.warning("onnxsim could not validate its result; continuing without it")
        return proto
    _drop_new_metadata(simplified, proto, prefix="onnxsim.")
    return simplified


def _drop_new_metadata(result: onnx.ModelProto, source: onnx.ModelProto, prefix: str) -> None:
    """Remove the metadata entries under ``prefix`` that ``result`` has and ``source`` has
    not: onnxsim records its own run there (nodes it renamed or removed, its settings), which
    would describe an intermediate graph in the file optimize writes."""
    kept = {p.key for p in source.metadata_props}
    entries = [p for p in result.metadata_props if p.key in kept or not p.key.startswith(prefix)]
    del result.metadata_props[:]
    result.metadata_props.extend(entries)


def random_inputs(proto: onnx.ModelProto, seed: int = 0, batch: int = 1, signed: bool = False
                  ) -> dict[str, np.ndarray]:
    """:func:`latency.seeded_inputs` for every graph input of ``proto`` (initializers aside)."""
    return latency.seeded_inputs(
        ((value.name, onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type),
          value_dims(value)) for value in graph_inputs(proto)), seed, batch, signed)


def max_abs_diff(reference: onnx.ModelProto, candidate: onnx.ModelProto, seed: int = 0,
                 batch: int = 1, reference_outputs: list[np.ndarray] | None = None) -> float:
    """max |Δ| over all outputs of the two models on the same random inputs, symbolic dims
    set to ``batch`` (ORT, no graph optimisations, so the comparison is of the graphs
    themselves). ``reference_outputs``: the reference's, already run on those inputs."""
    return max(output_differences(reference, candidate, seed, batch, reference_outputs),
               default=0.0)


def run_both(reference: onnx.ModelProto, candidate: onnx.ModelProto, seed: int = 0,
             batch: int = 1, reference_outputs: list[np.ndarray] | None = None,
             signed: bool = False) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(reference's outputs, candidate's outputs) on the same random inputs, as
    :func:`max_abs_diff` runs them. ValueError if the candidate's inputs or outputs are named
    otherwise (callers feed and fetch by name) or its outputs have other shapes."""
    for kind, names in (("inputs", lambda m: [v.name for v in graph_inputs(m)]),
                        ("outputs", lambda m: [v.name for v in m.graph.output])):
        if names(candidate) != names(reference):
            raise ValueError(f"the graph's {kind} are named {names(candidate)}, the input "
                             f"model's {names(reference)}")
    feed = random_inputs(reference, seed, batch, signed)
    if reference_outputs is None:
        reference_outputs = run_unoptimized(reference, feed)
    outputs = run_unoptimized(candidate, feed)
    if [a.shape for a in outputs] != [a.shape for a in reference_outputs]:
        raise ValueError(f"output shapes differ at batch {batch}: "
                         f"{[a.shape for a in outputs]} vs {[a.shape for a in reference_outputs]}")
    return reference_outputs, outputs


def output_differences(reference: onnx.ModelProto, candidate: onnx.ModelProto, seed: int = 0,
                       batch: int = 1, reference_outputs: list[np.ndarray] | None = None,
                       signed: bool = False) -> list[float]:
    """:func:`output_difference` for each output, as :func:`run_both` runs them."""
    expected, actual = run_both(reference, candidate, seed, batch, reference_outputs, signed)
    return [output_difference(a, b) for a, b in zip(expected, actual, strict=True)]


def output_limit(expected: np.ndarray, tolerance: float) -> np.ndarray:
    """The largest |Δ| accepted at each element of an output whose input-model values are
    ``expected``: ``tolerance`` · max(1, |value|) (absolute up to 1, relative above), but at
    least a floor set by the output's scale m, its largest finite |value| below
    :data:`FILL_VALUE` (values at the float's range are mask fills, not outputs): a tenth of
    ``tolerance`` · m, or float rounding at m where that is larger (:data:`ROUNDING_ULPS`
    units in the last place for float32 and float64, :data:`HALF_ULPS` for float16). The
    floor is what a rewrite that reorders float arithmetic moves the elements near 0 by, when
    they are the difference of terms near m (a BatchNorm with a running mean far above its
    spread, folded into its conv). Each element has its own limit, not one for the whole
    output: a small score beside a large box coordinate is held to about its own scale.
    0 where the value is not finite (only the same NaN or infinity is accepted there);
    integers: ``tolerance``."""
    if expected.dtype.kind != "f":
        return np.full(expected.shape, tolerance)
    finite = np.isfinite(expected)
    magnitude = np.abs(np.where(finite, expected, 0.0).astype(np.float64))
    scale = magnitude[magnitude < FILL_VALUE]
    largest = float(scale.max()) if scale.size else 0.0
    ulps = HALF_ULPS if expected.dtype == np.float16 else ROUNDING_ULPS
    floor = max(ulps * _ulp(largest, expected.dtype), tolerance * largest / 10)
    return np.where(finite, np.maximum(tolerance * np.maximum(1.0, magnitude), floor), 0.0)


def _ulp(value: float, dtype: np.dtype) -> float:
    """The spacing of floats of ``dtype`` at ``value`` ≥ 0, in float64 (no overflow at the
    type's largest value)."""
    exponent = np.frexp(value)[1]  # value = f·2^e, f in [0.5, 1)
    return float(np.ldexp(1.0, int(exponent) - 1 - np.finfo(dtype).nmant))


def compare_outputs(expected: list[np.ndarray], actual: list[np.ndarray], tolerance: float
                    ) -> tuple[list[float], tuple[float, float] | None]:
    """The max abs difference of each output (:func:`output_difference`), and (|Δ|, limit) at
    the element furthest beyond its :func:`output_limit` in the first output that has one,
    else None."""
    diffs, over = [], None
    for want, got in zip(expected, actual, strict=True):
        diff = element_differences(want, got)
        diffs.append(float(diff.max(initial=0.0)))
        limit = output_limit(want, tolerance)
        beyond = ~(diff <= limit)
        if over is None and beyond.any():
            worst = np.unravel_index(np.argmax(np.where(beyond, diff - limit, -np.inf)),
                                     diff.shape)
            over = float(diff[worst]), float(limit[worst])
    return diffs, over


def output_difference(expected: np.ndarray, actual: np.ndarray) -> float:
    """max |expected − actual| over the elements (:func:`element_differences`); 0 for an
    empty output."""
    return float(element_differences(expected, actual).max(initial=0.0))


def element_differences(expected: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """|expected − actual| at each element: 0 where both hold the same non-finite value (NaN,
    or an infinity of one sign), inf where only one does; for outputs that are not numbers
    (strings), 0 everywhere if they are equal, else inf."""
    if expected.dtype.kind not in "biuf" or actual.dtype.kind not in "biuf":
        return np.full(expected.shape, 0.0 if np.array_equal(expected, actual) else np.inf)
    a, b = expected.astype(np.float64), actual.astype(np.float64)
    same = (a == b) | (np.isnan(a) & np.isnan(b))
    with np.errstate(invalid="ignore"):
        diff = np.abs(a - b)
    return np.where(same, 0.0, np.nan_to_num(diff, nan=np.inf, posinf=np.inf))


def run_unoptimized(proto: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    """All outputs of ``proto`` on ``feed`` in ONNX Runtime with graph optimisations off."""
    return _unoptimized_session(proto).run(None, feed)


def _unoptimized_session(proto: onnx.ModelProto) -> ort.InferenceSession:
    """An ONNX Runtime session of ``proto`` with graph optimisations off."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(onnx_io.to_proto(proto).SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def op_counts(proto: onnx.ModelProto) -> dict[str, int]:
    return dict(collections.Counter(node.op_type for node in proto.graph.node).most_common())


def optimize_proto(proto: onnx.ModelProto, target: str = "ort",
                   tolerance: float = DEFAULT_TOLERANCE, choose_by_latency: bool = False,
                   batch: int | None = None, name: str = "model",
                   resolution: int | None = None) -> tuple[onnx.ModelProto, dict]:
    """Run ``proto`` (``name`` in messages) on random inputs, simplify it, run the pipeline
    for ``target`` and check numerics; raise UserError if the input cannot run, or the result
    is invalid or differs from ``proto`` by more than ``tolerance``.

    With ``choose_by_latency`` (target "ort"), the stages in :data:`MEASURED_STAGES` are kept
    only where ONNX Runtime on this machine runs the result faster than without them. A
    ``batch`` fixes the symbolic batch dimension of the inputs (:func:`fix_batch`), so that
    onnxsim folds the shape arithmetic of dynamic-batch exports and the layout rewrites,
    which need static shapes, can match; the result then takes that batch only. Without
    ``batch``, a model with a symbolic batch is first optimized at fixed batches and
    generalised back to a symbolic batch (:func:`_optimize_generalised`); where that fails,
    it is optimized with its batch as it is.

    ``resolution`` fixes a symbolic height and width of image inputs
    (:func:`input_dims.fix_resolution`); other unknown sizes are filled like the batch.
    """
    if target not in TARGET_PIPELINES:
        raise UserError(f"Unknown target {target!r}; choose one of {sorted(TARGET_PIPELINES)}.")
    _refuse_non_tensors(proto, name)
    sized = input_dims.fix_resolution(proto, resolution, name)
    freed, defaults = _free_overridable(sized)
    result, report = _optimize_sized(freed, target, tolerance, choose_by_latency, batch, name)
    report["resolution"] = resolution if sized is not proto else None
    report["overridable_inputs"] = [t.name for t in defaults]
    if defaults:
        result.graph.initializer.extend(defaults)
        onnx.checker.check_model(result, full_check=True)
        # the sizes of the files, with the defaults (weights, in an export with
        # keep_initializers_as_inputs) that were set aside while optimizing
        report["size"] = {"input": proto.ByteSize(), "optimized": result.ByteSize()}
    return result, report


def _refuse_non_tensors(proto: onnx.ModelProto, name: str) -> None:
    """UserError naming the graph inputs and outputs that are not tensors (sequences, maps,
    optionals): the result is checked on random tensor inputs and compared tensor by tensor."""
    kinds = {"sequence_type": "a sequence", "map_type": "a map", "optional_type": "an optional",
             "sparse_tensor_type": "a sparse tensor"}
    found = [f"{role} {value.name!r} is {kinds.get(value.type.WhichOneof('value'), 'untyped')}"
             for role, values in (("input", graph_inputs(proto)), ("output", proto.graph.output))
             for value in values if value.type.WhichOneof("value") != "tensor_type"]
    if found:
        raise UserError(f"{name}: {'; '.join(found)}. mvcompile optimize checks its result "
                        "against the input on random tensor inputs, output by output, so it "
                        "takes models whose graph inputs and outputs are all tensors. Nothing "
                        "was written.")


def _free_overridable(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, list[onnx.TensorProto]]:
    """``proto`` with the initializers that are also graph inputs (IR ≥ 4: defaults a caller
    may override) taken out, so that they are inputs like any other and neither onnxsim nor
    the passes fold them into constants, and those initializers, to be put back."""
    inputs = {v.name for v in proto.graph.input}
    defaults = [t for t in proto.graph.initializer if t.name in inputs]
    if proto.ir_version < 4 or not defaults:  # IR 3 lists every weight as an input
        return proto, []
    freed = onnx.ModelProto()
    freed.CopyFrom(proto)
    del freed.graph.initializer[:]
    freed.graph.initializer.extend(t for t in proto.graph.initializer if t.name not in inputs)
    log.info("Keeping %d initializers that are also graph inputs as overridable inputs: %s",
             len(defaults), ", ".join(t.name for t in defaults))
    return freed, defaults


def _optimize_sized(proto: onnx.ModelProto, target: str, tolerance: float,
                    choose_by_latency: bool, batch: int | None, name: str
                    ) -> tuple[onnx.ModelProto, dict]:
    """:func:`optimize_proto` on a model with no unknown size past the batch."""
    symbolic = symbolic_batch_inputs(proto)
    if batch and not symbolic:
        log.warning("--batch %d is ignored: the inputs of %s have no symbolic batch", batch, name)
        batch = None
    prepared, stored = _fold_storage(proto)
    expected = _input_outputs(proto, name)
    if symbolic and batch is None:
        generalised = _optimize_generalised(proto, prepared, stored, symbolic, target,
                                            tolerance, choose_by_latency, name, expected)
        if generalised is not None:
            return generalised
    try:
        return _optimize(proto, prepared, stored, symbolic, target, tolerance,
                         choose_by_latency, batch, expected)
    except NumericsMismatch as err:
        log.warning("The result differs from %s (%s); optimizing again without onnxscript's "
                    "optimizer", name, first_line(err).split(" on random inputs")[0])
        result, report = _optimize(proto, prepared, stored, symbolic, target, tolerance,
                                   choose_by_latency, batch, expected,
                                   frozenset({UNCHECKED_STAGE}))
    for stage in report["pipeline"]["stages"]:
        if stage["name"] == UNCHECKED_STAGE:
            stage.clear()
            stage.update(name=UNCHECKED_STAGE, **OnnxscriptOptimize.failed_row(
                "the model it gave differed from the input on random inputs"))
    return result, report


def _fold_storage(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, list[ir.DataType]]:
    """The reduced types that ``proto`` stores weights in (:func:`storage_precision.
    storage_types`, of the input as it is) and ``proto`` with the Casts of those weights
    folded to float32 (:func:`storage_precision.fold_storage_casts`, exact), for onnxsim,
    which cannot constant-fold a Cast of bfloat16; ``proto`` itself where there are none."""
    model = ir.serde.deserialize_model(proto)
    stored = storage_precision.storage_types(model)
    if stored and storage_precision.fold_storage_casts(model):
        return onnx_io.to_proto(model), stored
    return proto, stored


def _optimize(proto: onnx.ModelProto, prepared: onnx.ModelProto, stored: list[ir.DataType],
              symbolic: list[str], target: str, tolerance: float, choose_by_latency: bool,
              batch: int | None, expected: Callable[[int], list[np.ndarray]] | None,
              skip: frozenset[str] = frozenset()) -> tuple[onnx.ModelProto, dict]:
    """:func:`optimize_proto` at ``batch`` (None: as the model is), the pipeline's stages
    ``skip`` left out; ``prepared``, ``stored``: :func:`_fold_storage` of ``proto``;
    ``symbolic``: :func:`symbolic_batch_inputs` of ``proto``; ``expected``: the input's
    outputs by batch (:func:`_input_outputs`). With ``expected`` None the result is neither
    checked nor stored in the types ``stored`` (max_abs_diff NaN): the caller does both."""
    if expected is not None:
        expected(batch or 1)  # the input must run before anything else is done
    at = f" at batch {batch}" if batch else ""
    stages.start(f"Simplifying with onnxsim{at}")
    simplified = simplify(fix_batch(prepared, symbolic, batch) if batch else prepared)
    stages.advance()
    stages.start(f"Rewriting ({target} passes){at}")
    result, pipeline_report = run_pipeline_proto(simplified, TARGET_PIPELINES[target], skip)
    stages.advance()
    choices = []
    if choose_by_latency and target == "ort":
        for stage in MEASURED_STAGES:
            if stage_fired(pipeline_report, stage):
                result, pipeline_report, choice = _keep_if_faster(
                    simplified, result, pipeline_report, stage)
                choices.append(choice)
    if target == "mobile":
        _check_standard_only(result)
    diff, storage = float("nan"), None
    if expected is not None:
        result, diff, storage = _restore_and_check(
            result, stored, lambda model: _check(proto, model, tolerance, batch or 1,
                                                 expected(batch or 1)))
    before, simple, after = op_counts(proto), op_counts(simplified), op_counts(result)
    blocked = _symbolic_batch_blocked(result, pipeline_report)
    unknown_hint = input_dims.static_shapes_hint(proto)
    report = {
        "target": target,
        "nodes": {"input": sum(before.values()), "onnxsim": sum(simple.values()),
                  "optimized": sum(after.values())},
        "transposes": {"input": before.get("Transpose", 0), "onnxsim": simple.get("Transpose", 0),
                       "optimized": after.get("Transpose", 0)},
        "max_abs_diff": diff,
        "size": {"input": proto.ByteSize(), "optimized": result.ByteSize()},
        "storage": storage,
        "measured_choices": choices,
        "pipeline": pipeline_report,
        "batch": batch,
        "batch_generalised": False,
        # what kept rewrites that need static shapes from matching: the symbolic batch
        # alone (--batch fixes it), or an unknown size past it (the hint says how to fix it)
        "symbolic_batch_blocked": bool(symbolic) and batch is None and not unknown_hint
                                  and blocked,
        "unknown_dims_blocked": unknown_hint if blocked else "",
    }
    return result, report


def _optimize_generalised(proto: onnx.ModelProto, prepared: onnx.ModelProto,
                          stored: list[ir.DataType], symbolic: list[str], target: str,
                          tolerance: float, choose_by_latency: bool, name: str,
                          expected: Callable[[int], list[np.ndarray]]
                          ) -> tuple[onnx.ModelProto, dict] | None:
    """``proto`` optimized at batch 1 and at batch 2 (the stages that the first dropped
    for speed left out, so that both run the same rewrites), generalised to any batch
    (:func:`batch_generalize.generalize`), its weights stored in the types ``stored`` again
    (after generalising: a Cast between a batch-dependent constant and its reader would keep
    it from being generalised) and checked at :data:`VERIFY_BATCHES`; the report is batch
    1's, with the final model's counts, size, storage and difference. None (logged) where
    any step fails."""
    expected(1)  # the input must run: its UserError goes to the user, not to a fallback
    try:
        one, report = _optimize(proto, prepared, stored, symbolic, target, tolerance,
                                choose_by_latency, 1, None)
        dropped = frozenset(c["stage"] for c in report["measured_choices"] if not c["kept"])
        two, _ = _optimize(proto, prepared, stored, symbolic, target, tolerance, False, 2,
                           None, dropped)
        result = _generalize(one, two, proto)
        result, diff, storage = _restore_and_check(
            result, stored, lambda model: _check_batches(proto, model, tolerance, expected))
    except (UserError, batch_generalize.NotGeneralizable) as err:
        log.info("Could not optimize %s at a fixed batch and keep its batch symbolic (%s); "
                 "optimizing it with the batch as it is", name, first_line(err))
        return None
    log.info("Optimized %s at batch 1 and 2 and generalised the result to any batch", name)
    after = op_counts(result)
    report.update(batch=None, batch_generalised=True, symbolic_batch_blocked=False,
                  max_abs_diff=diff, storage=storage,
                  size={**report["size"], "optimized": result.ByteSize()},
                  nodes={**report["nodes"], "optimized": sum(after.values())},
                  transposes={**report["transposes"], "optimized": after.get("Transpose", 0)})
    return result, report


def _generalize(one: onnx.ModelProto, two: onnx.ModelProto, proto: onnx.ModelProto
                ) -> onnx.ModelProto:
    """:func:`batch_generalize.generalize`; an unexpected error in it (a bug: the model is
    then optimized with its batch as it is) is logged and raised as NotGeneralizable."""
    try:
        return batch_generalize.generalize(one, two, proto)
    except batch_generalize.NotGeneralizable:
        raise
    except Exception as err:
        log.warning("Generalising the fixed-batch result failed unexpectedly (%s: %s); please "
                    "report this with the input model", type(err).__name__, err, exc_info=True)
        raise batch_generalize.NotGeneralizable(f"{type(err).__name__}: {err}") from err


def _check_batches(proto: onnx.ModelProto, result: onnx.ModelProto, tolerance: float,
                   expected: Callable[[int], list[np.ndarray]]) -> float:
    """The largest max abs output difference of the generalised ``result`` from ``proto``
    (whose outputs by batch ``expected`` gives) at :data:`VERIFY_BATCHES`; UserError unless
    ``result`` passes check_model and, at each batch, runs in ONNX Runtime with outputs of
    ``proto``'s shapes within ``tolerance``."""
    stages.start("Checking the result against the input at batches "
                 + ", ".join(map(str, VERIFY_BATCHES)))
    try:
        onnx.checker.check_model(result, full_check=True)
    except Exception as err:
        raise UserError(f"the generalised model fails check_model ({first_line(err)})") from err
    worst = 0.0
    for batch in VERIFY_BATCHES:
        reference = expected(batch)
        try:
            _, actual = run_both(proto, result, batch=batch, reference_outputs=reference)
        except Exception as err:  # ORT raises several exception types; names, shapes: ValueError
            raise UserError(f"the generalised model fails at batch {batch} "
                            f"({first_line(err)})") from err
        diffs, over = compare_outputs(reference, actual, tolerance)
        worst = max([worst, *diffs])
        if over is not None:
            raise UserError(f"the generalised model differs by {over[0]:.3g} at batch {batch}, "
                            f"above that element's limit {over[1]:.3g}")
    signed = _signed_differences(proto, result, tolerance, VERIFY_BATCHES[0])
    if signed is not None and signed[1] is not None:
        raise UserError(f"the generalised model differs by {signed[1][0]:.3g} on signed "
                        f"inputs, above that element's limit {signed[1][1]:.3g}")
    stages.advance()
    return max([worst, *(signed[0] if signed else [])])


def symbolic_batch_inputs(proto: onnx.ModelProto) -> list[str]:
    """Graph inputs (initializers aside) whose first dimension is not a fixed number."""
    return [value.name for value in graph_inputs(proto) if value.type.tensor_type.shape.dim
            and not value.type.tensor_type.shape.dim[0].HasField("dim_value")]


def fix_batch(proto: onnx.ModelProto, names: list[str], batch: int) -> onnx.ModelProto:
    """A copy of ``proto`` whose inputs ``names`` (:func:`symbolic_batch_inputs`) take
    ``batch`` as their first dimension."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(proto)
    for value in fixed.graph.input:
        if value.name in names:
            value.type.tensor_type.shape.dim[0].dim_value = batch  # clears its dim_param
    return fixed


def _symbolic_batch_blocked(result: onnx.ModelProto, pipeline_report: dict) -> bool:
    """For a model with a symbolic batch: whether it likely kept rewrites from matching
    (``--batch`` would let them): ``result`` still computes shapes at run time (Shape ops), or
    a rule refused for want of a static shape."""
    refusals = [why for stage in pipeline_report["stages"]
                for why in stage.get("refused", {}).values()]
    return (any(node.op_type == "Shape" for node in result.graph.node)
            or any(NOT_STATIC in why for why in refusals))


def run_pipeline_proto(proto: onnx.ModelProto, pipeline: str,
                       skip: frozenset[str] = frozenset()) -> tuple[onnx.ModelProto, dict]:
    """:func:`run_pipeline` on an ONNX proto (which is not modified: the model reads a copy,
    since a renamed initializer would rename the proto's tensor): the rewritten proto and the
    pipeline report."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    model, report = run_pipeline(ir.serde.deserialize_model(copy), pipeline, skip)
    return onnx_io.to_proto(model), report


def _keep_if_faster(simplified: onnx.ModelProto, result: onnx.ModelProto, report: dict,
                    stage: str) -> tuple[onnx.ModelProto, dict, dict]:
    """``result``, unless ORT runs the same pipeline without ``stage`` at least
    :data:`DROP_MARGIN` faster; then that one. Compared on the fastest run of each, which other
    processes on a shared machine can only slow down, never speed up (``python
    benchmarks/bench_foreign.py --choice-stability 6`` repeats the comparison and prints the
    ratios of fastest runs and of medians)."""
    without, without_report = run_pipeline_proto(simplified, TARGET_PIPELINES["ort"],
                                                  frozenset({stage}))
    stages.start(f"Timing with and without {stage}", -(-LATENCY_RUNS // latency.BLOCK))
    stats = latency.time_models(
        {"with": result.SerializeToString(), "without": without.SerializeToString()},
        random_inputs(simplified), runs=LATENCY_RUNS, on_run=stages.advance)
    fastest = {name: s.min_ms for name, s in stats.items()}
    kept = fastest["without"] > (1.0 - DROP_MARGIN) * fastest["with"]
    choice = {"stage": stage, "kept": kept, "min_ms_with": fastest["with"],
              "min_ms_without": fastest["without"]}
    log.info("%s: fastest run %.2f ms with, %.2f ms without; %s", stage, fastest["with"],
             fastest["without"], "kept" if kept else "dropped")
    return (result, report, choice) if kept else (without, without_report, choice)


def _check_standard_only(result: onnx.ModelProto) -> None:
    """``--target mobile`` promises standard ONNX; refuse a result that is not."""
    contrib = collections.Counter(f"{n.domain}.{n.op_type}" for n in result.graph.node
                                  if n.domain not in ("", "ai.onnx"))
    if contrib:
        found = ", ".join(f"{op} x{count}" for op, count in sorted(contrib.items()))
        raise UserError(f"--target mobile writes standard ONNX only, but the result still has "
                        f"{found}, which the input already used and mvcompile cannot turn back "
                        "into standard ops (a model optimized for --target ort?). Optimize the "
                        "original export instead. Nothing was written.")


def _restore_and_check(result: onnx.ModelProto, stored: list[ir.DataType],
                       check: Callable[[onnx.ModelProto], float]
                       ) -> tuple[onnx.ModelProto, float, dict | None]:
    """``result`` with the weights that the input stored in the reduced types ``stored``
    stored so again (:func:`storage_precision.restore_storage`, exact), its max abs difference
    from the input (``check``, which raises UserError if the model fails validation) and the
    restore's report (None when ``stored`` is empty). If the restored model fails validation
    (an op that needs a constant input, say), ``result`` as it is, with the failure in the
    report."""
    storage = None
    if stored:
        model = ir.serde.deserialize_model(result)
        storage = storage_precision.restore_storage(model, stored)
        if storage["restored"]:
            restored = onnx_io.to_proto(model)
            try:
                return restored, check(restored), storage
            except UserError as err:
                why = first_line(err.__cause__ or err)  # the checker's or ORT's words
                log.warning("Storing weights back as %s failed validation (%s); they stay "
                            "float32", ", ".join(storage["types"]), why)
                storage = {**storage, "failed": why, "restored": 0,
                           "restored_bytes": 0,
                           "float32": storage["float32"] + storage["restored"],
                           "float32_bytes": storage["float32_bytes"] + storage["restored_bytes"]}
    return result, check(result), storage


def _check(proto: onnx.ModelProto, result: onnx.ModelProto, tolerance: float, batch: int,
           expected: list[np.ndarray]) -> float:
    """The max abs output difference of ``result`` from ``proto`` (whose outputs on the seeded
    inputs are ``expected``); raise UserError unless ``result`` passes check_model, runs and
    is within ``tolerance``."""
    stages.start("Checking the result against the input")
    try:
        onnx.checker.check_model(result, full_check=True)
    except Exception as err:  # ValidationError, InferenceError
        raise _invalid_input(proto) or _validation_failed(err) from err
    try:
        _, actual = run_both(proto, result, batch=batch, reference_outputs=expected)
    except Exception as err:  # ONNX Runtime cannot run the result, or its names or shapes differ
        raise _validation_failed(err) from err
    diffs, over = compare_outputs(expected, actual, tolerance)
    signed = _signed_differences(proto, result, tolerance, batch)
    if over is None and signed is not None:
        over = signed[1]
        diffs = [*diffs, *signed[0]]
    if over is not None:
        raise NumericsMismatch(
            f"The optimized model differs from the input by {over[0]:.3g} at one output "
            f"element on random inputs, above that element's limit {over[1]:.3g} (--tolerance "
            "times the value where it is above 1, at least a tenth of it times the output's "
            "largest value); nothing was written. Where that is float rounding (outputs "
            "that are differences of much larger terms), a larger --tolerance accepts it; "
            "otherwise please report this with the input model.")
    stages.advance()
    return max(diffs, default=0.0)


def _signed_differences(proto: onnx.ModelProto, result: onnx.ModelProto, tolerance: float,
                        batch: int) -> tuple[list[float], tuple[float, float] | None] | None:
    """The max abs difference of each output on signed inputs (``random_inputs(signed=True)``:
    N(0,1) floats, True booleans), which a rewrite that is wrong only for negative values or on
    an If's other branch fails, and (|Δ|, limit) of the element furthest over its limit
    (:func:`compare_outputs`), if any; None where the input model itself cannot run on them (an
    image model may not: it is checked on pixels already)."""
    feed = random_inputs(proto, 1, batch, signed=True)
    try:
        expected = run_unoptimized(proto, feed)
    except Exception as err:  # ORT raises several types; the input need not take any values
        log.debug("The input model does not run on signed inputs (%s); not checked on them",
                  first_line(err))
        return None
    try:
        _, actual = run_both(proto, result, 1, batch, expected, signed=True)
    except Exception as err:
        raise _validation_failed(err) from err
    return compare_outputs(expected, actual, tolerance)


def _validation_failed(err: Exception) -> UserError:
    return UserError(f"The optimized model failed validation ({type(err).__name__}: {err}); "
                     "nothing was written. Please report this with the input model.")


def _invalid_input(proto: onnx.ModelProto) -> UserError | None:
    """The error to give when the input itself fails onnx.checker's full check (optimize
    writes only models that pass it), else None."""
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as err:  # ValidationError, InferenceError
        return UserError(f"The input model fails onnx.checker's full check ({first_line(err)}), "
                         "and so does the result; optimize writes only models that pass it, so "
                         "nothing was written. Fix the input model (onnx.checker.check_model("
                         "model, full_check=True) says what is wrong).")
    return None


def optimize_file(src: str | Path, dst: str | Path, target: str = "ort",
                  tolerance: float = DEFAULT_TOLERANCE, choose_by_latency: bool = False,
                  batch: int | None = None, resolution: int | None = None) -> dict:
    """:func:`optimize_proto` on a file, then an atomic, validated write to ``dst``
    (:func:`onnx_io.replace_model`: external data files that the model previously at ``dst``
    used are deleted unless the input ``src`` uses them too)."""
    dst = Path(dst)
    if dst.is_dir():
        raise UserError(f"-o {dst} is a folder; pass the path of the .onnx file to write.")
    if dst.suffix.lower() != ".onnx":
        raise UserError(f"-o {dst} does not end in .onnx; optimize writes an ONNX model, so "
                        "name it model.onnx or similar. Nothing was written.")
    check_writable_dir(dst.parent, "optimized model")
    proto = onnx_io.load_model(src)
    # ``proto`` holds the input's external data in memory, so ``dst`` may be ``src``.
    same = dst.exists() and Path(src).samefile(dst)
    keep_models = [] if same else [Path(src)]
    result, report = optimize_proto(proto, target, tolerance, choose_by_latency, batch,
                                    name=str(src), resolution=resolution)
    # optimize_proto has run check_model and ONNX Runtime on ``result``: write it as it is.
    removed = onnx_io.replace_model(dst, onnx_io.to_proto(result), keep_models)
    log.info("Wrote %s", dst)
    report["removed_data_files"] = [str(file) for file in removed]
    return report


def rule_rows(pipeline_report: dict, width: int) -> tuple[list[tuple[str, int, str]], int, bool]:
    """The rows (rule, matches, why not) of optimize's rule table: the rules that matched, and
    those that did not where their whole pattern was found and a condition refused it (the
    reason cut to ``width`` characters with "…"); a rule with no candidate or only part of
    its pattern in the model, or a clean-up rule (``cleanup`` stages) that found nothing to
    clean, says nothing about it. Also returns how many rules were left out so, and whether a
    reason was cut."""
    rows, hidden, cut = [], 0, False
    for stage in pipeline_report["stages"]:
        kinds = stage.get("refusal_kinds", {})
        for rule, count in stage.get("rules", {}).items():
            if count == 0 and (stage.get("cleanup") or kinds.get(rule) in (NO_CANDIDATE, PARTIAL)):
                hidden += 1
                continue
            why = stage.get("refused", {}).get(rule, "") if count == 0 else ""
            cut |= len(why) > width
            rows.append((rule, count, why if len(why) <= width else why[:width - 1] + "…"))
    return rows, hidden, cut


def storage_note(report: dict) -> str | None:
    """What to tell the user when the weights that the input stored as float16/bfloat16 could
    not all be stored so again and the file grew by more than :data:`SIZE_NOTE_RATIO`; None
    otherwise."""
    storage, size = report.get("storage"), report["size"]
    if not storage or size["optimized"] <= SIZE_NOTE_RATIO * size["input"]:
        return None
    types = "/".join(storage["types"])
    if storage.get("failed"):
        why = f"storing them so again failed validation ({storage['failed']})"
    elif storage["float32"]:
        why = (f"{storage['float32']} float32 weights ({human_bytes(storage['float32_bytes'])})"
               f" are not exactly representable as {types} (stored as float32 in the input, "
               "or folded with other constants)")
    else:
        return None
    return (f"the input stores weights as {types}; {why}, so they stay float32: "
            f"{human_bytes(size['input'])} input, {human_bytes(size['optimized'])} written.")


def _input_outputs(proto: onnx.ModelProto, name: str) -> Callable[[int], list[np.ndarray]]:
    """The input's outputs on the seeded random inputs at a batch, which the result is
    compared on: one ONNX Runtime session, each batch run once. UserError if ONNX Runtime
    cannot run the input (nothing to check the result against)."""
    session: list[ort.InferenceSession] = []

    @functools.cache
    def outputs(batch: int) -> list[np.ndarray]:
        try:
            if not session:
                session.append(_unoptimized_session(proto))
            return session[0].run(None, random_inputs(proto, batch=batch))
        except Exception as err:  # ORT raises several exception types for unloadable models
            raise_if_out_of_memory(err)
            raise UserError(f"ONNX Runtime cannot run the input {name} ({first_line(err)})"
                            "; mvcompile optimize checks its result against the input on "
                            "random inputs, so the input must run on them."
                            f"{input_dims.cannot_run_hint(proto)} Nothing was written.") from err

    return outputs
