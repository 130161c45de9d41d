"""`mvcompile optimize` on torch exports of transformers' ViT-family models.

For each model (random weights, non-trivial statistics): torch.onnx.export → optimize (onnxsim
+ passes, numerics checked, the head-split fold kept only where its own timing finds it faster,
as `mvcompile optimize` does by default) and a table of node counts, Transposes, max |Δ| and
ORT latency of the onnxsim'd export vs the optimised model, interleaved (batch 1, 2 threads,
medians; a separate measurement from the one that made the choice).

    python benchmarks/bench_foreign.py [--rounds 10] [--apply-all]
    python benchmarks/bench_foreign.py --choice-stability 6

``--choice-stability N`` instead repeats, N times, the comparison `mvcompile optimize` makes
(the same pipeline with and without the head-split fold, 100 interleaved runs each) and prints
the without/with ratio of medians and of fastest runs for each repetition.
"""

from __future__ import annotations

import argparse
import io
import logging

import onnx
import torch

from mvcompile import latency
from mvcompile.optimize import (
    LATENCY_RUNS,
    TARGET_PIPELINES,
    optimize_proto,
    random_inputs,
    run_pipeline_proto,
    simplify,
    stage_fired,
)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights with trained-like statistics (HF's init leaves zero biases, unit norms)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=gen) * 1.5 + 0.5)
            elif tensor.dim() >= 2:
                fan_in = tensor[0].numel()
                tensor.copy_(torch.randn(tensor.shape, generator=gen) / fan_in**0.5)
            elif name.endswith("weight"):
                tensor.copy_(torch.rand(tensor.shape, generator=gen) * 0.8 + 0.6)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.1)
    return model.eval()


def foreign_models(resolution: int = 224) -> dict[str, torch.nn.Module]:
    import transformers as t

    return {
        "MobileViT-XXS": t.MobileViTForImageClassification(t.MobileViTConfig(
            image_size=resolution, hidden_sizes=[64, 80, 96],
            neck_hidden_sizes=[16, 16, 24, 48, 64, 80, 320], expand_ratio=2.0)),
        "MobileViTV2-1.0": t.MobileViTV2ForImageClassification(
            t.MobileViTV2Config(image_size=resolution)),
        "DeiT-tiny": t.ViTForImageClassification(t.ViTConfig(
            hidden_size=192, num_hidden_layers=12, num_attention_heads=3,
            intermediate_size=768, image_size=resolution, patch_size=16)),
        "Swin-tiny": t.SwinForImageClassification(t.SwinConfig(image_size=resolution)),
    }


def export(model: torch.nn.Module, resolution: int) -> onnx.ModelProto:
    """torch.onnx.export: the default (dynamo) exporter, or the TorchScript one (opset 18)
    where dynamo fails (Swin in torch 2.13)."""
    pixels = torch.rand(1, 3, resolution, resolution)
    try:
        return torch.onnx.export(model, (pixels,), dynamo=True, input_names=["pixel_values"],
                                 output_names=["logits"], verbose=False).model_proto
    except Exception as err:  # torch raises many types here; fall back to TorchScript
        logging.warning("dynamo export failed (%s); using the TorchScript exporter",
                        str(err).splitlines()[0] if str(err) else type(err).__name__)
    buffer = io.BytesIO()
    torch.onnx.export(model, (pixels,), buffer, dynamo=False, opset_version=18,
                      input_names=["pixel_values"], output_names=["logits"])
    return onnx.load_from_string(buffer.getvalue())


def choice_stability(repeats: int, resolution: int) -> None:
    print(f"{resolution}x{resolution}: without/with head-split fold, {LATENCY_RUNS} runs each, "
          "interleaved; one row per repetition")
    print("| model | repetition | ratio of medians | ratio of fastest runs |")
    print("|---|---|---|---|")
    for name in ("MobileViT-XXS", "DeiT-tiny"):
        simplified = simplify(export(randomize(foreign_models(resolution)[name]), resolution))
        variants = {k: run_pipeline_proto(simplified, TARGET_PIPELINES["ort"], skip)[0]
                    for k, skip in (("with", frozenset()),
                                    ("without", frozenset({"fold_head_split"})))}
        sessions = {k: latency.make_session(m.SerializeToString()) for k, m in variants.items()}
        feed = random_inputs(simplified)
        for i in range(repeats):
            st = latency.measure_interleaved(sessions, feed, runs=LATENCY_RUNS)
            print(f"| {name} | {i + 1} | {st['without'].median_ms / st['with'].median_ms:.3f} | "
                  f"{st['without'].min_ms / st['with'].min_ms:.3f} |")


def _head_fold(report: dict) -> str:
    """What `mvcompile optimize`'s own timing decided about folding the head split."""
    for choice in report["measured_choices"]:
        return (f"{'kept' if choice['kept'] else 'dropped'} ({choice['min_ms_with']:.2f} vs "
                f"{choice['min_ms_without']:.2f} ms)")
    fired = stage_fired(report["pipeline"], "fold_head_split")
    return "applied, not timed" if fired else "no match"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--apply-all", action="store_true",
                        help="apply every rewrite that matches, as `mvcompile optimize "
                             "--no-measure` does, instead of timing the head-split fold")
    parser.add_argument("--choice-stability", type=int, default=0, metavar="N",
                        help="repeat optimize's with/without-fold timing N times instead")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.choice_stability:
        choice_stability(args.choice_stability, args.resolution)
        return
    rows = []
    for name, model in foreign_models(args.resolution).items():
        exported = export(randomize(model), args.resolution)
        simplified = simplify(exported)
        optimized, report = optimize_proto(exported, "ort",
                                           choose_by_latency=not args.apply_all)
        sessions = {k: latency.make_session(p.SerializeToString())
                    for k, p in (("before", simplified), ("after", optimized))}
        stats = latency.measure_interleaved(sessions, random_inputs(simplified),
                                            runs=10 * args.rounds)
        before, after = stats["before"].median_ms, stats["after"].median_ms
        rows.append((name, report["nodes"]["onnxsim"], report["nodes"]["optimized"],
                     report["transposes"]["onnxsim"], report["transposes"]["optimized"],
                     f"{before:.2f}", f"{after:.2f}", f"{after / before:.2f}",
                     f"{report['max_abs_diff']:.1e}", _head_fold(report)))
    header = ("model", "nodes before", "after", "Transpose before", "after",
              "ORT ms before", "after", "ratio", "max |Δ|", "head split fold")
    print(f"{args.resolution}x{args.resolution}, batch 1, 2 threads, ORT_ENABLE_ALL, "
          f"medians of {10 * args.rounds} runs each, interleaved in blocks")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(map(str, row)) + " |")


if __name__ == "__main__":
    main()
