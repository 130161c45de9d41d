"""Seeded random weights with realistic statistics, for models built without a checkpoint.

Trained MobileViT weights are not all-zero biases and unit BatchNorm statistics; tests that
compare numerics against another implementation only mean something if every tensor is
non-trivial. Each role gets a distribution close to what training produces:

- conv / linear weights: He-normal, W ~ N(0, 2/fan_in) (linear: N(0, 1/fan_in));
- BatchNorm γ ~ U(0.6, 1.4), β ~ N(0, 0.1²), running mean μ ~ N(0, 0.2²), running var
  σ² ~ U(0.5, 2.0);
- LayerNorm γ ~ U(0.7, 1.3), β ~ N(0, 0.05²); linear biases ~ N(0, 0.05²).
"""

from __future__ import annotations

import numpy as np

DEFAULT_SEED = 0


class RandomWeights:
    """A :class:`~mvcompile.graphs.mobilevit.ParamSource` drawing from one seeded generator.

    The order of requests is the graph's construction order, which is fixed, so the same seed
    always gives the same tensors.
    """

    def __init__(self, seed: int = DEFAULT_SEED) -> None:
        self.seed = seed
        self._rng = np.random.default_rng(seed)
        self.tensors: dict[str, np.ndarray] = {}

    def __call__(self, name: str, shape: tuple[int, ...], role: str) -> np.ndarray:
        array = _draw(self._rng, shape, role).astype(np.float32)
        self.tensors[name] = array
        return array


def _draw(rng: np.random.Generator, shape: tuple[int, ...], role: str) -> np.ndarray:
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    if role == "conv":
        return rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
    if role == "linear_weight":
        return rng.normal(0.0, np.sqrt(1.0 / fan_in), shape)
    if role == "bn_weight":
        return rng.uniform(0.6, 1.4, shape)
    if role == "bn_bias":
        return rng.normal(0.0, 0.1, shape)
    if role == "bn_mean":
        return rng.normal(0.0, 0.2, shape)
    if role == "bn_var":
        return rng.uniform(0.5, 2.0, shape)
    if role == "ln_weight":
        return rng.uniform(0.7, 1.3, shape)
    if role in ("ln_bias", "linear_bias"):
        return rng.normal(0.0, 0.05, shape)
    raise ValueError(f"unknown parameter role {role!r}")
