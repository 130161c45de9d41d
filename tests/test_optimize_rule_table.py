"""optimize's rule table: matched rules and informative refusals; the rest in one line."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from _passes_util import apply, parse
from onnxscript.rewriter import RewriteRuleClassBase, RewriteRuleSet

from conftest import run
from mvcompile.cli import RULES_HIDDEN
from mvcompile.optimize import rule_rows
from mvcompile.passes import fuse_swish
from mvcompile.pipeline import NO_CANDIDATE, PARTIAL, PATTERN_FOUND, PIPELINES, RuleSetPass


def _swish(opset: int, body: str = "s = Sigmoid (x)\n y = Mul (x, s)",
           outputs: str = "float[2,5] y", inputs: str = "float[2,5] x") -> onnx.ModelProto:
    return parse(f'<ir_version: 10, opset_import: ["" : {opset}]>\n'
                 f"g ({inputs}) => ({outputs}) {{ {body} }}")


def _rule_count(pipeline: str) -> int:
    """How many rules the rule-set stages of ``pipeline`` hold (commuted variants once)."""
    return sum(len({rule.name for rule in stage.make().rule_set.rules})
               for stage in PIPELINES[pipeline] if isinstance(stage.make(), RuleSetPass))


@pytest.mark.parametrize(("model", "kind"), [
    (_swish(18), PATTERN_FOUND),  # the whole pattern, refused by the opset check
    (_swish(24, outputs="float[2,5] y, float[2,5] s"), PATTERN_FOUND),  # Sigmoid used elsewhere
    (_swish(24, "s = Sigmoid (x)\n y = Mul (z, s)", inputs="float[2,5] x, float[2,5] z"),
     PARTIAL),  # the Mul matches, its Sigmoid takes another input
    (_swish(24, "y = Relu (x)"), NO_CANDIDATE),
])
def test_refusals_say_how_far_the_rule_got(model: onnx.ModelProto, kind: str) -> None:
    _, pass_ = apply(model, "fuse_swish", fuse_swish.rules("mobile"))
    assert pass_.counts["fuse_swish_mobile"] == 0
    assert pass_.report()["refusal_kinds"] == {"fuse_swish_mobile": kind}


def test_table_shows_matches_and_informative_refusals_only(tmp_path: Path) -> None:
    """--target mobile on an opset-18 Swish: the Swish fusion found its pattern and refused
    (opset 18), which the table shows with the reason; every other rule has no pattern here
    and is counted in one line."""
    src = tmp_path / "swish.onnx"
    onnx.save(_swish(18), str(src))
    code, output = run("optimize", str(src), "-o", str(tmp_path / "o.onnx"), "--target",
                       "mobile")
    assert code == 0, output
    lines = output.splitlines()
    table = lines[lines.index(next(line for line in lines if line.startswith("rule "))):]
    assert table[2].startswith("fuse_swish_mobile") and "Swish needs opset 24" in table[2]
    assert table[3] == f"{_rule_count('mobile-foreign') - 1} other rules: {RULES_HIDDEN}"
    assert "fold_bn_into_conv" not in output and "ReshapeReshape" not in output


def test_table_without_any_match_or_refusal_is_one_line(tmp_path: Path) -> None:
    src = tmp_path / "relu.onnx"
    onnx.save(_swish(24, "y = Relu (x)"), str(src))
    code, output = run("optimize", str(src), "-o", str(tmp_path / "o.onnx"))
    assert code == 0, output
    assert f"{_rule_count('fp32-foreign')} rules: {RULES_HIDDEN}" in output
    assert "why not" not in output and "logs in full why each rule did not apply" in output


def test_rule_rows_keep_matched_and_found_and_count_the_rest() -> None:
    """A clean-up rule's refusal (most Reshapes are not no-ops) is left out too."""
    report = {"stages": [
        {"name": "a", "rules": {"fired": 3, "found": 0, "partial": 0, "none": 0},
         "refused": {"found": "condition_failed: " + "x" * 20, "partial": "no_match: y",
                     "none": "no candidate subgraph in this model"},
         "refusal_kinds": {"found": PATTERN_FOUND, "partial": PARTIAL, "none": NO_CANDIDATE}},
        {"name": "infer_shapes"},
        {"name": "tidy", "rules": {"tidied": 2, "untidy": 0}, "cleanup": True,
         "refused": {"untidy": "condition_failed: not a no-op"},
         "refusal_kinds": {"untidy": PATTERN_FOUND}}]}
    rows, hidden, cut = rule_rows(report, width=12)
    assert rows == [("fired", 3, ""), ("found", 0, "condition_f…"), ("tidied", 2, "")]
    assert (hidden, cut) == (3, True)
    assert rule_rows(report, width=100)[2] is False


class _GivesUp(RewriteRuleClassBase):
    """Matches any Relu, then its rewrite produces nothing: a replacement failure."""

    def pattern(self, op, x):
        return op.Relu(x)

    def rewrite(self, op, x):
        return None


def test_a_replacement_that_fails_after_a_full_match_counts_as_pattern_found() -> None:
    rules = RewriteRuleSet([_GivesUp.rule()])
    _, pass_ = apply(_swish(24, "y = Relu (x)"), "gives_up", rules)
    assert pass_.counts == {"_GivesUp": 0}
    assert pass_.report()["refusal_kinds"] == {"_GivesUp": PATTERN_FOUND}
    assert pass_.report()["refused"] == {"_GivesUp": "replacement failed after a full match"}


def test_onnxscript_optimizer_failing_is_a_row_and_the_rest_goes_on(tmp_path: Path) -> None:
    """onnxscript's own BN fold raised on BatchNormalization-7's [C, H, W] statistics, and
    optimize ended in a traceback; now its stage is skipped, with the reason in the table."""
    from test_pass_fuse_conv_bn import bn7_spatial0_model

    src, out = tmp_path / "bn7.onnx", tmp_path / "o.onnx"
    onnx.save(bn7_spatial0_model(), str(src))
    code, output = run("optimize", str(src), "-o", str(out), "--no-measure")
    assert code == 0, output
    row = next(line for line in output.splitlines() if line.startswith("onnxscript_optimizer"))
    assert "failed, so skipped: operands could not be broadcast" in row
    assert "has shape [3, 5, 5], not [3]" in output  # our own fold refused it, with the reason
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)


def test_onnxscript_optimizers_rewrites_are_a_row(tmp_path: Path) -> None:
    """A Clip pair that onnxscript's optimizer fuses (with passes/fuse_clips' rule): the row
    says it rewrote once; it used to be left out, the table reading "no full pattern"."""
    src, out = tmp_path / "clips.onnx", tmp_path / "o.onnx"
    onnx.save(parse('<ir_version: 10, opset_import: ["" : 18]>\n'
                    "g (float[4] x) => (float[4] y) { a = Constant <value_float = 0.0> ()\n"
                    " b = Constant <value_float = 1.0> ()\n t = Clip (x, a, b)\n"
                    " y = Clip (t, a, b) }"), str(src))
    code, output = run("optimize", str(src), "-o", str(out), "--no-measure")
    assert code == 0, output
    row = next(line for line in output.splitlines() if line.startswith("onnxscript_optimizer"))
    assert row.split()[1] == "1", output
    assert [n.op_type for n in onnx.load(str(out)).graph.node] == ["Clip"]
