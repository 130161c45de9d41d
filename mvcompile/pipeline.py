"""Graph-pass pipelines as data, run through ``onnx_ir.passes.PassManager``.

A pipeline is a list of :class:`Stage`. A stage is a named pass factory; rule-set stages are
wrapped in :class:`RuleSetPass`, which applies one rule at a time (in list order) and records
how many times each rule fired and, for rules that never fired, why their best candidate was
refused. :func:`run_pipeline` returns the rewritten model and that report.

Pipelines:

- ``fp32``: tuned for ONNX Runtime (what ``mvcompile build`` measures). Emits ORT contrib ops
  where they are measured faster: QuickGelu for Swish, FusedMatMul(transA/transB) for the
  transposed matmuls, Attention for each attention core. No Transpose node in our MobileViT.
- ``mobile``: standard ONNX opset 24 only, for Core ML / ORT-mobile targets: Swish,
  SpaceToDepth/DepthToSpace, Einsum; no Transpose, every tensor rank ≤ 5.
- ``int8``: what ``--int8`` quantizes: the ``fp32`` pipeline without the Swish fusion, the
  fused Attention and the Gather fold (the INT8 graph must still lower to Core ML).
- ``fp32-foreign`` / ``mobile-foreign``: the same plus fusions that exported graphs need
  (LayerNorm, GELU), onnxscript's general clean-ups and, last, the removal of the no-op and
  chained Reshapes the rewrites leave; used by ``mvcompile optimize``.
"""

from __future__ import annotations

import collections
import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common
import onnxscript.optimizer
import onnxscript.rewriter
from onnxscript.rewriter import MatchingTracer, MatchStatus, RewriteRule, RewriteRuleSet

from mvcompile import onnx_io
from mvcompile.analysis import op_key
from mvcompile.errors import first_line
from mvcompile.passes import (
    commute_resize,
    fold_head_split,
    fuse_clips,
    fuse_conv_bn,
    fuse_gelu,
    fuse_layer_norm,
    fuse_swish,
    im2col,
    restore_interface,
    tidy_reshape,
    unfold_fold,
)
from mvcompile.passes._reasons import NOTHING_TO_DO

log = logging.getLogger(__name__)


# How far a rule that never fired got, least to most informative: no node matched the
# pattern's root; part of the pattern matched; the whole pattern matched and a condition (or
# the replacement) refused it. Only the last says something about the model's graph.
NO_CANDIDATE, PARTIAL, PATTERN_FOUND = "no_candidate", "partial", "pattern_found"
_KIND_RANK = {NO_CANDIDATE: 0, PARTIAL: 1, PATTERN_FOUND: 2}
# onnxscript's reason for a whole match whose intermediate values are used outside it
_OTHER_USES = "Matched nodes have other uses"


class RuleSetPass(ir.passes.InPlacePass):
    """Apply a rule set one rule at a time, recording match counts and refusals."""

    def __init__(self, name: str, rule_set: RewriteRuleSet, cleanup: bool = False) -> None:
        """``cleanup``: the rules tidy up after others (their refusals say nothing about the
        model: most Reshapes are not no-ops), which the report records for its readers."""
        super().__init__()
        self.name = name
        self.rule_set = rule_set
        self.cleanup = cleanup
        self.counts: dict[str, int] = {}
        self.refusals: dict[str, str] = {}
        self.refusal_kinds: dict[str, str] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        total, this_call = 0, {}
        for rule in self.rule_set.rules:
            single = RewriteRuleSet([rule])
            count = single.apply_to_model(model)
            self.counts[rule.name] = self.counts.get(rule.name, 0) + count
            this_call[rule.name] = this_call.get(rule.name, 0) + count
            total += count
            # Why not, before later rules rewrite: a traced dry run, skipped where a variant of
            # the same name has matched or has already found its whole pattern.
            if (count == 0 and not self.counts[rule.name]
                    and self.refusal_kinds.get(rule.name) != PATTERN_FOUND):
                self._record_refusal(rule.name, *_why_not(single, model))
        for name, count in this_call.items():  # one line per name: commuted variants share it
            log.info("%s: %s matched %d time(s)", self.name, name, count)
        for name, count in self.counts.items():  # commuted variants share a name
            if count:
                self.refusals.pop(name, None)
                self.refusal_kinds.pop(name, None)
        return ir.passes.PassResult(model, modified=total > 0)

    def _record_refusal(self, name: str, kind: str, why: str) -> None:
        """Keep the most informative refusal of the variants named ``name`` (commuted
        variants share a name): the first of those with the highest kind rank."""
        if name in self.refusal_kinds and _KIND_RANK[kind] <= _KIND_RANK[self.refusal_kinds[name]]:
            return
        self.refusals[name], self.refusal_kinds[name] = why, kind
        log.info("%s: %s did not apply (%s): %s", self.name, name, kind, why)

    def report(self) -> dict:
        return {"rules": dict(self.counts), "refused": dict(self.refusals),
                "refusal_kinds": dict(self.refusal_kinds), "cleanup": self.cleanup}


def _why_not(rule_set: RewriteRuleSet, model: ir.Model) -> tuple[str, str]:
    """The refusal kind (:data:`NO_CANDIDATE`, :data:`PARTIAL`, :data:`PATTERN_FOUND`) and
    failure reason of the rule's best partial match (a dry run with a tracer). The whole
    pattern was found when a condition or the replacement failed, or when the matched nodes
    have other uses (which onnxscript reports as a failed match); a condition that found
    nothing to do (:data:`NOTHING_TO_DO`) counts as no candidate."""
    tracer = MatchingTracer()
    rule_set.apply_to_model(model, tracer=tracer)
    matches = [m for found in tracer.best_matches_map.values() for m in found]
    best = [m for m in matches if m.status != MatchStatus.SUCCESS]
    if not best and matches:
        # The tracer keeps the best-scoring entry per node: a match (SUCCESS) outranks the
        # replacement failure that followed it, and the rule still did not apply.
        return PATTERN_FOUND, "replacement failed after a full match"
    if not best:
        return NO_CANDIDATE, "no candidate subgraph in this model"
    reason = best[0].match_result.reason or "pattern did not match"
    if reason.startswith(NOTHING_TO_DO):
        return NO_CANDIDATE, reason
    found = best[0].status != MatchStatus.NO_MATCH or reason.startswith(_OTHER_USES)
    return PATTERN_FOUND if found else PARTIAL, f"{best[0].status.name.lower()}: {reason}"


class OnnxscriptOptimize(ir.passes.FunctionalPass):
    """onnxscript.optimizer.optimize: constant folding, its default rewrite rules (which
    include BN folding and Reshape/Transpose collapsing) and dead-code removal, on a copy;
    with :mod:`passes.fuse_clips`' rules in place of its two Clip fusions, which are wrong for
    ranges that do not overlap (and which no check on random inputs sees inside an If or Loop
    body that those inputs never run).

    Its rules lack some of our checks (its BN fold takes BatchNormalization-7's [C, H, W]
    statistics and mixed-type BatchNormalization-15): if it raises, or turns a model that
    passes onnx.checker into one that does not, the model goes on without it and the report
    says why.
    """

    RULE = "onnxscript_optimizer"

    def __init__(self) -> None:
        super().__init__()
        self.failure: str | None = None
        self.rewrites = 0  # what its rules rewrote in the result (constant folding aside)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        # A copy that shares no tensor with ``model`` (a clone does: renaming an initializer
        # in it, as optimize_ir's NameFixPass may, would rename the original's too).
        trial = ir.serde.deserialize_model(onnx_io.to_proto(model))
        rules = _CountingRuleSet(fuse_clips.onnxscript_default_rules())
        try:
            with _default_rewrite_rules(rules):
                onnxscript.optimizer.optimize_ir(trial)
            _check_still_valid(model, trial)
        except Exception as err:  # onnxscript's rules raise ValueError, TypeError and others
            while err.__cause__ is not None:  # onnx_ir wraps the rule's error in PassErrors
                err = err.__cause__
            self.failure = first_line(err)
            log.warning("onnxscript's optimizer failed (%s); going on without it", self.failure)
            # ``model`` is untouched; a functional pass returns a new object, and a clone
            # (sharing its tensors) is enough, since the pass manager drops ``model``.
            return ir.passes.PassResult(model.clone(), modified=False)
        self.rewrites = rules.applied
        changed = len(list(trial.graph)) != len(list(model.graph))
        return ir.passes.PassResult(trial, modified=changed)

    def report(self) -> dict:
        """How many rewrites its rules made, a row like a rule's (nothing when none); where it
        failed, :meth:`failed_row`."""
        if self.failure is not None:
            return self.failed_row(self.failure)
        if not self.rewrites:
            return {}
        return {"rules": {self.RULE: self.rewrites}, "refused": {}, "refusal_kinds": {},
                "cleanup": False}

    @classmethod
    def failed_row(cls, why: str) -> dict:
        """The stage's report when it was left out because of ``why``: a refused rule row,
        like :meth:`RuleSetPass.report`."""
        return {"rules": {cls.RULE: 0}, "refused": {cls.RULE: f"failed, so skipped: {why}"},
                "refusal_kinds": {cls.RULE: PATTERN_FOUND}, "cleanup": False}


class _CountingRuleSet(RewriteRuleSet):
    """A rule set that adds up the rewrites it applies over every call (onnxscript's
    optimizer applies its rules a few times and only logs each count)."""

    def __init__(self, rules: tuple[RewriteRule, ...]) -> None:
        super().__init__(list(rules))
        self.applied = 0

    def apply_to_model(self, model: ir.Model, **kwargs) -> int:
        count = super().apply_to_model(model, **kwargs)
        self.applied += count
        return count


@contextlib.contextmanager
def _default_rewrite_rules(rules: RewriteRuleSet) -> Iterator[None]:
    """Make ``rules`` the rewrite rules that ``onnxscript.optimizer.optimize_ir`` applies
    (it reads ``onnxscript.rewriter._DEFAULT_REWRITE_RULES`` and takes no rules argument)."""
    saved = onnxscript.rewriter._DEFAULT_REWRITE_RULES
    onnxscript.rewriter._DEFAULT_REWRITE_RULES = rules
    try:
        yield
    finally:
        onnxscript.rewriter._DEFAULT_REWRITE_RULES = saved


def _check_still_valid(before: ir.Model, after: ir.Model) -> None:
    """Raise onnx.checker's error if ``after`` fails the full check and ``before`` passes it
    (a model that was invalid already is judged at the end of ``optimize``)."""
    try:
        onnx.checker.check_model(onnx_io.to_proto(after), full_check=True)
    except Exception:  # ValidationError, or InferenceError from the full check
        try:
            onnx.checker.check_model(onnx_io.to_proto(before), full_check=True)
        except Exception:  # noqa: BLE001 - the input fails it too
            return
        raise


@dataclass(frozen=True)
class Stage:
    """One named step of a pipeline."""

    name: str
    make: Callable[[], ir.passes.PassBase]


def _rules(name: str, factory: Callable[[], RewriteRuleSet], cleanup: bool = False) -> Stage:
    return Stage(name, lambda: RuleSetPass(name, factory(), cleanup))


def _core(target: str, swish: bool = True, layout: str | None = None,
          ort_only: bool = False) -> list[Stage]:
    """The shared stages; ``layout`` overrides the target of the unfold/fold rewrite;
    ``ort_only`` adds forms that only ONNX Runtime runs (our Core ML lowering does not take
    them, so the INT8 graph, which also goes to Core ML, goes without): the fused Attention op
    and the row-Gather fold."""
    layout = layout or target
    heads = fold_head_split.FUSED_TARGET if ort_only else target
    return [
        # Static shapes first: unfold_fold decides matches by simulating shapes.
        Stage("infer_shapes", common.ShapeInferencePass),
        # Before unfold_fold: folding BN leaves the conv after a fold as a plain 1x1 Conv
        # that unfold_fold can absorb.
        _rules("fuse_conv_bn", lambda: fuse_conv_bn.rules),
        *([_rules("fuse_swish", lambda: fuse_swish.rules(target))] if swish else []),
        # Before unfold_fold: a Resize between a 1x1 conv and its unfold/fold chain (transformers'
        # interpolation path) moves across the conv so that unfold_fold can absorb it.
        _rules("commute_resize", commute_resize.rules),
        _rules("unfold_fold", lambda: unfold_fold.rules(layout, gather_fold=ort_only)),
        _rules("im2col", im2col.rules),
        _rules("fold_head_split", lambda: fold_head_split.rules(heads)),
    ]


_CLEANUP = [
    Stage("remove_unused_nodes", common.RemoveUnusedNodesPass),
    Stage("remove_unused_opsets", common.RemoveUnusedOpsetsPass),
    Stage("topological_sort", common.TopologicalSortPass),
    Stage("infer_shapes_final", common.ShapeInferencePass),
]


def _foreign(target: str) -> list[Stage]:
    return [
        # Constant-fold and canonicalise exported graphs before matching our patterns.
        Stage("onnxscript_optimize", OnnxscriptOptimize),
        _rules("fuse_layer_norm", lambda: fuse_layer_norm.rules),
        _rules("fuse_gelu", lambda: fuse_gelu.rules(standard_only=target == "mobile")),
        *_core(target, ort_only=target == "ort"),
        # The rewrites above leave Reshapes that are no-ops or chained; removing them here
        # lets one optimize run reach the fixed point (a second run finds nothing to do).
        Stage("infer_shapes_tidy", common.ShapeInferencePass),
        _rules("tidy_reshape", lambda: tidy_reshape.rules, cleanup=True),
        Stage("remove_identities", common.IdentityEliminationPass),
    ]


PIPELINES: dict[str, list[Stage]] = {
    "fp32": [*_core("ort", ort_only=True), *_CLEANUP],
    "mobile": [*_core("mobile"), *_CLEANUP],
    # The graph that gets quantized for ONNX Runtime: Swish stays Sigmoid·Mul, which QDQ
    # turns into integer QLinearSigmoid + QLinearMul, so the conv stages stay integer
    # (op-set timings: README "Measured results").
    "int8": [*_core("ort", swish=False), *_CLEANUP],
    # Measured alternative for ORT (benchmarks/bench_fp32.py): unfold/fold with one Transpose
    # per direction instead of FusedMatMul's transpose flags.
    "fp32-transpose": [*_core("ort", layout="ort-transpose", ort_only=True), *_CLEANUP],
    "fp32-foreign": [*_foreign("ort"), *_CLEANUP],
    "mobile-foreign": [*_foreign("mobile"), *_CLEANUP],
}


def run_pipeline(model: ir.Model, name: str = "fp32", skip: frozenset[str] = frozenset()
                 ) -> tuple[ir.Model, dict]:
    """Run pipeline ``name``, less the stages named in ``skip``, on ``model`` (changed in place
    unless a stage copies it, as onnxscript_optimize does); return the result and a JSON-able
    report: ``{"pipeline", "nodes_before", "nodes_after", "stages":
    [{"name", "rules", "refused", "refusal_kinds", "cleanup"} or {"name", "skipped": True}]}``
    (``refusal_kinds``: :data:`NO_CANDIDATE`, :data:`PARTIAL` or :data:`PATTERN_FOUND` per
    rule in ``refused``; ``cleanup``: see :class:`RuleSetPass`).
    """
    if name not in PIPELINES:
        raise KeyError(f"unknown pipeline {name!r}; choose one of {sorted(PIPELINES)}")
    unknown = skip - {stage.name for stage in PIPELINES[name]}
    if unknown:
        raise KeyError(f"pipeline {name!r} has no stage {sorted(unknown)}")
    before = _op_counts(model)
    interface = restore_interface.interface_names(model)
    chosen = [stage for stage in PIPELINES[name] if stage.name not in skip]
    passes = [stage.make() for stage in chosen]
    result = ir.passes.PassManager(passes, steps=1)(model)
    # Some passes rename graph inputs or outputs (see restore_interface); callers use names.
    restore_interface.restore_interface(result.model, *interface)
    stages = [{"name": stage.name, "skipped": True} for stage in PIPELINES[name]
              if stage.name in skip]
    for stage, pass_ in zip(chosen, passes, strict=True):
        entry = {"name": stage.name}
        if isinstance(pass_, RuleSetPass | OnnxscriptOptimize):
            entry.update(pass_.report())
        stages.append(entry)
    after = _op_counts(result.model)
    report = {"pipeline": name, "nodes_before": sum(before.values()),
              "nodes_after": sum(after.values()), "ops_before": before, "ops_after": after,
              "stages": stages}
    return result.model, report


def stage_fired(pipeline_report: dict, stage: str) -> bool:
    """Whether any rule of ``stage`` matched in a :func:`run_pipeline` report."""
    return any(sum(s.get("rules", {}).values()) for s in pipeline_report.get("stages", [])
               if s["name"] == stage)


def _op_counts(model: ir.Model) -> dict[str, int]:
    """{op type: count}, most frequent first, named as :func:`mvcompile.analysis.op_key` names
    them."""
    return dict(collections.Counter(op_key(node.domain, node.op_type)
                                    for node in model.graph).most_common())
