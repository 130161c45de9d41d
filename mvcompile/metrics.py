"""Accuracy figures for comparing a quantized model with its FP32 original.

- top-1 agreement = mean_i [argmax f(x_i) = argmax g(x_i)]
- output SQNR (dB) = 10·log10( Σ f(x)² / Σ (f(x) − g(x))² )
- top-1 accuracy = mean_i [argmax f(x_i) = y_i]
"""

from __future__ import annotations

import numpy as np


def top1_agreement(reference: np.ndarray, candidate: np.ndarray) -> float:
    return float(np.mean(reference.argmax(-1) == candidate.argmax(-1)))


def sqnr_db(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio; +inf when identical."""
    noise = float(np.sum((reference.astype(np.float64) - candidate) ** 2))
    signal = float(np.sum(reference.astype(np.float64) ** 2))
    if noise == 0.0:
        return float("inf")
    return 10.0 * np.log10(signal / noise) if signal > 0 else float("-inf")


def top1_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(logits.argmax(-1) == labels))
