"""latency: session thread spinning, measure_interleaved run counts and per-session inputs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from mvcompile import latency


def _relu(elem_type: int) -> bytes:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", elem_type, [4, 4])],
        [helper.make_tensor_value_info("y", elem_type, [4, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def test_interleaved_times_every_session_the_requested_number_of_runs() -> None:
    sessions = {name: latency.make_session(_relu(TensorProto.FLOAT)) for name in "abc"}
    feed = {"x": np.ones((4, 4), np.float32)}
    stats = latency.measure_interleaved(sessions, feed, runs=12, warmup=1, block=5)
    assert {name: s.runs for name, s in stats.items()} == {"a": 12, "b": 12, "c": 12}
    assert all(0 < s.min_ms <= s.median_ms <= s.p90_ms for s in stats.values())


def test_interleaved_gives_each_session_its_own_feed() -> None:
    """An int8 model fed the shared float input would fail, so this passes only when the
    per-session feed is the one used."""
    sessions = {"fp32": latency.make_session(_relu(TensorProto.FLOAT)),
                "int8": latency.make_session(_relu(TensorProto.INT8))}
    feeds = {"int8": {"x": np.full((4, 4), -3, np.int8)}}
    stats = latency.measure_interleaved(sessions, {"x": np.ones((4, 4), np.float32)},
                                        runs=6, warmup=1, feeds=feeds)
    assert stats["int8"].runs == stats["fp32"].runs == 6


def test_time_models_times_each_serialized_model() -> None:
    models = {"a": _relu(TensorProto.FLOAT), "b": _relu(TensorProto.FLOAT)}
    stats = latency.time_models(models, {"x": np.ones((4, 4), np.float32)}, runs=5)
    assert {name: s.runs for name, s in stats.items()} == {"a": 5, "b": 5}


def _config_entry(options, key: str) -> str:
    """The session config entry ``key``, or "" where it was never set."""
    try:
        return options.get_session_config_entry(key)
    except RuntimeError:
        return ""


@pytest.mark.parametrize(("kwargs", "allow", "stop"), [
    ({}, "0", ""),
    ({"spinning": True}, "", ""),
    ({"spinning": True, "stop_spinning_after_run": True}, "", "1"),
])
def test_make_session_sets_the_thread_spinning_it_is_asked_for(monkeypatch, kwargs, allow,
                                                               stop) -> None:
    seen: list = []
    real = latency.ort.InferenceSession

    def recording(model, options, providers):
        seen.append(options)
        return real(model, options, providers=providers)

    monkeypatch.setattr(latency.ort, "InferenceSession", recording)
    session = latency.make_session(_relu(TensorProto.FLOAT), **kwargs)
    assert _config_entry(seen[0], "session.intra_op.allow_spinning") == allow
    assert _config_entry(seen[0], "session.force_spinning_stop") == stop
    x = -np.ones((4, 4), np.float32)
    assert session.run(None, {"x": x})[0].max() == 0.0


def test_make_session_refuses_to_stop_spinning_that_is_off() -> None:
    with pytest.raises(ValueError, match="needs spinning=True"):
        latency.make_session(_relu(TensorProto.FLOAT), stop_spinning_after_run=True)


def test_time_forms_gives_nodes_ratios_and_differences_to_the_first_form() -> None:
    import onnx.parser

    def model(body: str) -> bytes:
        return onnx.parser.parse_model('<ir_version: 10, opset_import: ["" : 18]>\n'
                                       f"g (float[64] x) => (float[64] y) {{ {body} }}"
                                       ).SerializeToString()

    forms = {"relu": model("y = Relu (x)"),
             "max": model("z = Constant <value_float = 0.0> ()\n y = Max (x, z)"),
             "shifted": model("o = Constant <value_float = 0.5> ()\n r = Relu (x)\n"
                              " y = Add (r, o)")}
    feed = {"x": np.linspace(-1, 1, 64, dtype=np.float32)}
    timings = latency.time_forms(forms, feed, runs=10)
    assert [t.nodes for t in timings.values()] == [1, 2, 3]
    assert timings["relu"].ratio == 1.0 and timings["max"].max_diff == 0.0
    assert timings["shifted"].max_diff == 0.5
    assert all(t.median_ms > 0 for t in timings.values())
