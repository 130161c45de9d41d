"""ONNX Runtime CPU latency: medians of repeated single-batch runs."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from mvcompile.errors import UserError

BLOCK = 5  # consecutive calls per session in interleaved timing


@dataclass(frozen=True)
class LatencyStats:
    """Latency over ``runs`` timed calls, in milliseconds."""

    median_ms: float
    p90_ms: float
    min_ms: float
    runs: int

    @property
    def throughput(self) -> float:
        """Inferences per second at the median latency."""
        return 1000.0 / self.median_ms

    @classmethod
    def from_samples(cls, seconds: list[float]) -> LatencyStats:
        ms = np.asarray(seconds) * 1000.0
        return cls(float(np.median(ms)), float(np.percentile(ms, 90)), float(ms.min()), len(ms))


def make_session(model: bytes | str, threads: int = 2,
                 level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                 spinning: bool = False, stop_spinning_after_run: bool = False
                 ) -> ort.InferenceSession:
    """A CPU session with ``threads`` intra-op threads and one inter-op thread.

    Spinning is off by default: after each run ONNX Runtime's worker threads busy-wait for
    more work, and when several sessions are timed interleaved on a 2-core machine those
    threads steal the CPU from the next session: identical graphs then time differently by
    position (``python benchmarks/ort_quirks.py``, table 1). ``spinning=True`` is ORT's
    default, right for timing one session alone (``mvcompile bench``).

    ``spinning=True, stop_spinning_after_run=True`` (ORT's ``session.force_spinning_stop``)
    keeps ORT's default behaviour inside a run, where workers spin between the parallel
    sections of consecutive nodes instead of sleeping and being woken for each one, but parks
    them when the run returns, so that they do not compete with the next session either.
    """
    if stop_spinning_after_run and not spinning:
        raise ValueError("stop_spinning_after_run needs spinning=True: without spinning "
                         "there is nothing to stop")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = level
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    elif stop_spinning_after_run:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
                "tensor(double)": np.float64, "tensor(int64)": np.int64,
                "tensor(int32)": np.int32, "tensor(int16)": np.int16, "tensor(int8)": np.int8,
                "tensor(uint64)": np.uint64, "tensor(uint32)": np.uint32,
                "tensor(uint16)": np.uint16, "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
                "tensor(string)": np.object_}


def numpy_dtype(ort_type: str) -> type:
    """The numpy type of an ONNX Runtime input type string such as "tensor(int64)";
    UserError for a type no input can be made of here (bfloat16, float8, sequences...)."""
    if ort_type not in _NUMPY_TYPES:
        raise UserError(f"Inputs of type {ort_type} cannot be generated (supported: "
                        f"{', '.join(t[7:-1] for t in _NUMPY_TYPES)}).")
    return _NUMPY_TYPES[ort_type]


def seeded_inputs(specs: Iterable[tuple[str, type, Sequence[int | str | None]]], seed: int = 0,
                  batch: int = 1, signed: bool = False) -> dict[str, np.ndarray]:
    """{name: array} for (name, dtype, dims) specs: U[0,1) for floating-point inputs (pixel
    values), zeros for integer and boolean ones, empty strings for string ones; dims that are
    not integers become ``batch``. ``signed``: N(0,1) floats and True booleans instead, the
    values the first kind never holds (integers stay 0: any other value may be an index out
    of range)."""
    rng = np.random.default_rng(seed)
    feed = {}
    for name, dtype, dims in specs:
        shape = [d if isinstance(d, int) else batch for d in dims]
        if np.issubdtype(dtype, np.floating):
            values = rng.standard_normal(shape) if signed else rng.uniform(0.0, 1.0, shape)
            feed[name] = values.astype(dtype)
        elif np.dtype(dtype) == np.object_:
            feed[name] = np.full(shape, "", dtype=object)
        elif np.dtype(dtype) == np.bool_:
            feed[name] = np.full(shape, signed, dtype)
        else:
            feed[name] = np.zeros(shape, dtype)
    return feed


def random_feed(session: ort.InferenceSession, batch: int = 1, seed: int = 0
                ) -> dict[str, np.ndarray]:
    """:func:`seeded_inputs` for every input of ``session``."""
    return seeded_inputs(((i.name, numpy_dtype(i.type), i.shape) for i in session.get_inputs()),
                         seed, batch)


def measure(session: ort.InferenceSession, feed: dict[str, np.ndarray], runs: int = 30,
            warmup: int = 5, on_run: Callable[[], None] | None = None) -> LatencyStats:
    """Time ``runs`` calls of ``session.run`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        session.run(None, feed)
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        samples.append(time.perf_counter() - start)
        if on_run is not None:
            on_run()
    return LatencyStats.from_samples(samples)


def measure_interleaved(sessions: dict[str, ort.InferenceSession], feed: dict[str, np.ndarray],
                        runs: int = 30, warmup: int = 5, block: int = BLOCK,
                        on_run: Callable[[], None] | None = None,
                        feeds: dict[str, dict[str, np.ndarray]] | None = None
                        ) -> dict[str, LatencyStats]:
    """Time several sessions in alternating blocks of ``block`` calls, so that they see the
    same machine load; compare their medians as ratios.

    Blocks rather than single calls: after a call, ONNX Runtime's worker threads spin for a
    while, and a single call of another session interleaved there would compete with them.
    The first call of each block is discarded for the same reason. ``feeds`` gives a session
    its own inputs instead of ``feed`` (for contenders whose inputs differ in type).
    """
    feeds = {name: (feeds or {}).get(name, feed) for name in sessions}
    for name, session in sessions.items():
        for _ in range(warmup):
            session.run(None, feeds[name])
    samples: dict[str, list[float]] = {name: [] for name in sessions}
    while min(len(s) for s in samples.values()) < runs:
        for name, session in sessions.items():
            session.run(None, feeds[name])  # settles the thread pool after the previous one
            for _ in range(min(block, runs - len(samples[name]))):
                start = time.perf_counter()
                session.run(None, feeds[name])
                samples[name].append(time.perf_counter() - start)
        if on_run is not None:
            on_run()
    return {name: LatencyStats.from_samples(s) for name, s in samples.items()}


def time_models(models: dict[str, bytes], feed: dict[str, np.ndarray], runs: int = 30,
                threads: int = 2, on_run: Callable[[], None] | None = None
                ) -> dict[str, LatencyStats]:
    """Latency of each serialized model, timed with :func:`measure_interleaved` so that all
    of them see the same machine load; ``on_run`` is called after each round of blocks."""
    sessions = {name: make_session(blob, threads=threads) for name, blob in models.items()}
    return measure_interleaved(sessions, feed, runs=runs, on_run=on_run)


@dataclass(frozen=True)
class FormTiming:
    """One form of a computation timed against the first (:func:`time_forms`)."""

    nodes: int
    median_ms: float
    ratio: float  # median / the first form's
    max_diff: float  # max |first output − the first form's|


def time_forms(forms: dict[str, bytes], feed: dict[str, np.ndarray], runs: int
               ) -> dict[str, FormTiming]:
    """Serialized models that compute the same thing, timed interleaved
    (:func:`measure_interleaved`, spinning off), each with its node count and its first
    output's max abs difference to the first form's."""
    import onnx

    sessions = {name: make_session(blob) for name, blob in forms.items()}
    outputs = {name: s.run(None, feed)[0] for name, s in sessions.items()}
    stats = measure_interleaved(sessions, feed, runs=runs)
    first = next(iter(forms))
    return {name: FormTiming(len(onnx.load_from_string(blob).graph.node),
                             stats[name].median_ms,
                             stats[name].median_ms / stats[first].median_ms,
                             float(np.abs(outputs[name] - outputs[first]).max()))
            for name, blob in forms.items()}
