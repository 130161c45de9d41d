"""Range observers for post-training calibration, in the style of torch.ao observers.

Each observer sees activation batches through ``update(x)`` and answers ``compute_range()``
with the real interval [lo, hi] to quantize. Turning a range into (scale, zero_point) is
:func:`mvcompile.calibration.qparams.quant_params`.

- :class:`MinMaxObserver`: lo = min x, hi = max x over all batches.
- :class:`MovingAverageMinMaxObserver`: lo_t = (1−c)·lo_{t−1} + c·min x_t (same for hi).
- :class:`PercentileObserver`: lo, hi = the p and 100−p percentiles of all values seen
  (from a histogram).
- :class:`EntropyObserver`: the clipping threshold T minimising KL(P‖Q) between the histogram P
  of |x| and its 255-level quantized version Q (TensorRT's entropy calibration).
- :class:`MseObserver`: the threshold T minimising E[(x − q_T(x))²] over the histogram.

The histogram observers keep a fixed number of bins over a range that grows by doubling, so
memory stays constant however much data passes through.
"""

from __future__ import annotations

import numpy as np

Range = tuple[float, float]


class MinMaxObserver:
    """Running minimum and maximum."""

    def __init__(self) -> None:
        self.lo = np.inf
        self.hi = -np.inf

    def update(self, x: np.ndarray) -> None:
        if x.size:
            self.lo = min(self.lo, float(x.min()))
            self.hi = max(self.hi, float(x.max()))

    def compute_range(self) -> Range:
        if self.lo > self.hi:
            raise ValueError("observer saw no data")
        return self.lo, self.hi


class MovingAverageMinMaxObserver(MinMaxObserver):
    """Exponential moving average of per-batch min and max, with weight ``averaging_constant``."""

    def __init__(self, averaging_constant: float = 0.01) -> None:
        super().__init__()
        self.c = averaging_constant

    def update(self, x: np.ndarray) -> None:
        if not x.size:
            return
        lo, hi = float(x.min()), float(x.max())
        if self.lo > self.hi:  # first batch
            self.lo, self.hi = lo, hi
        else:
            self.lo += self.c * (lo - self.lo)
            self.hi += self.c * (hi - self.hi)


class _HistogramObserver:
    """A histogram of values over [−R, R], R doubling as needed (bins merge pairwise)."""

    def __init__(self, bins: int = 2048) -> None:
        if bins % 2:
            raise ValueError("bins must be even")
        self.bins = bins
        self.counts = np.zeros(bins, dtype=np.float64)
        self.limit = 0.0
        self.minmax = MinMaxObserver()

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float32).ravel()
        if not x.size:
            return
        self.minmax.update(x)
        peak = float(np.abs(x).max())
        if self.limit == 0.0:
            self.limit = peak if peak > 0 else 1.0
        while peak > self.limit:
            self._double_range()
        counts, _ = np.histogram(x, bins=self.bins, range=(-self.limit, self.limit))
        self.counts += counts

    def _double_range(self) -> None:
        """[−R, R] → [−2R, 2R]: pairs of bins merge into the middle half."""
        merged = self.counts.reshape(-1, 2).sum(axis=1)
        quarter = self.bins // 4
        self.counts = np.zeros_like(self.counts)
        self.counts[quarter:quarter + self.bins // 2] = merged
        self.limit *= 2.0

    def edges(self) -> np.ndarray:
        return np.linspace(-self.limit, self.limit, self.bins + 1)

    def _clip_to_seen(self, lo: float, hi: float) -> Range:
        seen_lo, seen_hi = self.minmax.compute_range()
        return max(lo, seen_lo), min(hi, seen_hi)


class PercentileObserver(_HistogramObserver):
    """lo, hi = the ``percentile`` and 100−``percentile`` points of the value distribution."""

    def __init__(self, percentile: float = 99.99, bins: int = 2048) -> None:
        super().__init__(bins)
        self.percentile = percentile

    def compute_range(self) -> Range:
        total = self.counts.sum()
        if total == 0:
            raise ValueError("observer saw no data")
        cdf = np.cumsum(self.counts) / total
        edges = self.edges()
        tail = 1.0 - self.percentile / 100.0
        lo = float(edges[np.searchsorted(cdf, tail, side="left")])
        hi = float(edges[np.searchsorted(cdf, 1.0 - tail, side="left") + 1])
        return self._clip_to_seen(lo, hi)


class _ThresholdSearchObserver(_HistogramObserver):
    """Search a symmetric-about-the-data clipping threshold over the histogram.

    Candidates are T_k = k·R/(bins/2) for k in [levels/2, bins/2]; the returned range is
    [max(lo_seen, −T), min(hi_seen, T)].
    """

    levels = 256

    def compute_range(self) -> Range:
        if self.counts.sum() == 0:
            raise ValueError("observer saw no data")
        magnitude = self._magnitude_histogram()
        half = self.bins // 2
        step = max(1, half // 256)
        candidates = range(self.levels // 2, half + 1, step)
        best = min(candidates, key=lambda k: self._loss(magnitude, k))
        threshold = best * self.limit / half
        seen_lo, seen_hi = self.minmax.compute_range()
        if threshold >= max(-seen_lo, seen_hi) - step * self.limit / half:
            return seen_lo, seen_hi  # within one search step of the data: no clipping
        return self._clip_to_seen(-threshold, threshold)

    def _magnitude_histogram(self) -> np.ndarray:
        """Histogram of |x| over [0, R] with bins/2 bins."""
        half = self.bins // 2
        return self.counts[half:] + self.counts[:half][::-1]

    def _loss(self, magnitude: np.ndarray, k: int) -> float:
        raise NotImplementedError


class EntropyObserver(_ThresholdSearchObserver):
    """Minimise KL(P‖Q): P = |x| histogram cut at bin k with the cut-off mass added to its
    last bin; Q = the first k bins merged into 128 levels and spread back over the non-empty
    bins (TensorRT's entropy calibration)."""

    def _loss(self, magnitude: np.ndarray, k: int) -> float:
        reference = magnitude[:k]
        p = reference.copy()
        p[-1] += magnitude[k:].sum()  # P: clipped values pile into the last bin
        starts = np.linspace(0, k, self.levels // 2 + 1).astype(int)[:-1]
        lengths = np.diff(np.append(starts, k))
        occupied = (reference > 0).astype(np.float64)
        mass = np.add.reduceat(reference, starts)  # Q: quantized from the unclipped bins
        count = np.add.reduceat(occupied, starts)
        per_bin = np.divide(mass, count, out=np.zeros_like(mass), where=count > 0)
        q = np.repeat(per_bin, lengths) * occupied  # spread each level over its non-empty bins
        p_sum, q_sum = p.sum(), q.sum()
        if p_sum == 0 or q_sum == 0:
            return np.inf
        p, q = p / p_sum, q / q_sum
        mask = p > 0
        return float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))


class MseObserver(_ThresholdSearchObserver):
    """Minimise Σ_bins count·(x_bin − q_T(x_bin))², q_T = round-to-nearest on 255 levels of
    step 2T/255 with values beyond T clipped."""

    def _loss(self, magnitude: np.ndarray, k: int) -> float:
        half = self.bins // 2
        centers = (np.arange(half) + 0.5) * self.limit / half
        threshold = k * self.limit / half
        step = 2.0 * threshold / (self.levels - 1)
        quantized = np.minimum(np.round(centers / step) * step, threshold)
        return float(np.sum(magnitude * (centers - quantized) ** 2))


OBSERVERS: dict[str, type] = {
    "minmax": MinMaxObserver,
    "moving-average": MovingAverageMinMaxObserver,
    "percentile": PercentileObserver,
    "entropy": EntropyObserver,
    "mse": MseObserver,
}


def make_observer(method: str) -> MinMaxObserver | _HistogramObserver:
    """A fresh observer for ``method`` (one of :data:`OBSERVERS`)."""
    if method not in OBSERVERS:
        raise KeyError(method)
    return OBSERVERS[method]()
