"""Shared fixtures: building our MobileViT and running it in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from mvcompile import onnx_io
from mvcompile.cli import main
from mvcompile.graphs.mobilevit import MobileViTConfig, build_graph
from mvcompile.graphs.random_weights import RandomWeights


def build_random(cfg: MobileViTConfig, seed: int = 0) -> tuple[ir.Model, dict[str, np.ndarray]]:
    """Our graph with seeded random weights, and those weights by name."""
    source = RandomWeights(seed)
    return build_graph(cfg, source), source.tensors


def quantized_mobile(cfg: MobileViTConfig) -> onnx.ModelProto:
    """INT8 QDQ of ``cfg``'s mobile-pipeline graph (random weights), calibrated on 8 of the
    bundled photos: the model the backend tests lower."""
    from mvcompile.calibration.data import bundled_photos
    from mvcompile.calibration.quantize import QuantizeOptions, quantize
    from mvcompile.pipeline import run_pipeline

    model = run_pipeline(build_random(cfg)[0], "mobile")[0]
    return onnx_io.to_proto(quantize(model, bundled_photos(cfg.resolution, 8),
                                     QuantizeOptions())[0])


def ort_run(model: ir.Model, pixels: np.ndarray) -> np.ndarray:
    """Run the validated model in ONNX Runtime (CPU, default optimisations)."""
    proto = onnx_io.to_proto(model)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: pixels})[0]


def random_pixels(batch: int, resolution: int, seed: int = 1) -> np.ndarray:
    """Images in the MobileViT input convention: RGB, [0, 1], NCHW float32."""
    rng = np.random.default_rng(seed)
    return rng.uniform(0.0, 1.0, (batch, 3, resolution, resolution)).astype(np.float32)


@pytest.fixture
def xxs64() -> MobileViTConfig:
    return MobileViTConfig.for_size("xxs", resolution=64)


@pytest.fixture
def unsound_clip_fusion(monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxscript's optimizer with its own default rules, whose Clip fusion is wrong where the
    ranges do not overlap (``Clip(Clip(x, -1, -0.5), 0, 1)``, always 0, becomes
    ``Clip(x, 0, -0.5)``, always -0.5): a known-unsound rewrite for the tests of the numerics
    check, which the pipeline otherwise avoids (passes/fuse_clips.py)."""
    import onnxscript.rewriter

    from mvcompile.passes import fuse_clips
    monkeypatch.setattr(fuse_clips, "onnxscript_default_rules",
                        lambda: onnxscript.rewriter._DEFAULT_REWRITE_RULES)


def run(*args: str) -> tuple[int, str]:
    """Invoke the CLI in-process. An exception that escaped the command (which a user would
    see as a traceback) is re-raised, so every CLI test also checks "no traceback"."""
    result = CliRunner().invoke(main, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"uncaught {type(result.exception).__name__} for {args}: "
                             f"{result.exception}\n{result.output}") from result.exception
    return result.exit_code, result.output


def assert_clean_failure(code: int, output: str, *phrases: str) -> None:
    """A handled failure: non-zero exit and a message containing ``phrases``."""
    assert code != 0
    assert "Error" in output or "Usage" in output, output
    for phrase in phrases:
        assert phrase in output, output


class StageRecorder:
    """A :class:`mvcompile.stages.StageListener` that records what it is told: ``calls``
    (("start", label, total) and ("advance", n), in order) and how often it was finished."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.finished = 0

    def start(self, label: str, total: int) -> None:
        self.calls.append(("start", label, total))

    def advance(self, n: int = 1) -> None:
        self.calls.append(("advance", n))

    def finish(self) -> None:
        self.finished += 1

    @property
    def started(self) -> list[tuple[str, int]]:
        """(label, total) of each stage, in order."""
        return [(call[1], call[2]) for call in self.calls if call[0] == "start"]

    @property
    def advanced(self) -> dict[str, int]:
        """Steps advanced in each stage, by label."""
        totals: dict[str, int] = {}
        label = None
        for call in self.calls:
            if call[0] == "start":
                label = call[1]
                totals[label] = 0
            else:
                totals[label] += call[1]
        return totals
