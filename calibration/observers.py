"""Range observers for post-training calibration, in the style of torch.ao observers.

Each observer sees activation batches through ``update(x)`` and answers ``compute_range()``
with the real interval [lo, hi] to quantize. Turning a range into (scale, zero_point) is
:func:`mvcompile.calibration.qparams.quant_params`.

- :class:`MinMaxObserver`: lo = min x, hi = max x over all batches.
- :class:`MovingAverageMinMaxObserver`: lo_t = (1−c)·lo_{t−1} + c·min x_t (same for hi).
- :class:`PercentileObserver`: lo, hi = the p and 100−p percentiles of all values seen
  (from a histogram).
- :class:`EntropyObserver`: the clipping threshold T minimising KL(P‖Q) between the histogram P
  and its 255-level quantized version Q (TensorRT's entropy calibration, on the uint8 grid).
- :class:`MseObserver`: the threshold T minimising E[(x − q_T(x))²] over the histogram.

The histogram observers keep a fixed number of bins over a range that grows by doubling, so
memory stays constant however much data passes through.
"""

from __future__ import annotations

import abc

import numpy as np

Range = tuple[float, float]


def batch_range(x: np.ndarray) -> Range:
    """(min x, max x) of a non-empty batch; NaN or ±inf is refused, since no finite range
    holds it and one such value would poison every later range."""
    lo, hi = float(x.min()), float(x.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError(f"observed values include NaN or infinity (min {lo}, max {hi})")
    return lo, hi


class MinMaxObserver:
    """Running minimum and maximum."""

    def __init__(self) -> None:
        self.lo = np.inf
        self.hi = -np.inf

    def update(self, x: np.ndarray) -> None:
        if x.size:
            lo, hi = batch_range(x)
            self.lo = min(self.lo, lo)
            self.hi = max(self.hi, hi)

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
        lo, hi = batch_range(x)
        if self.lo > self.hi:  # first batch
            self.lo, self.hi = lo, hi
        else:
            self.lo += self.c * (lo - self.lo)
            self.hi += self.c * (hi - self.hi)


MIN_LIMIT = 1e-30  # the smallest histogram half-range: 2048 bins stay distinct in float32


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
        if self.limit == 0.0:  # below MIN_LIMIT, float32 bin edges would not be distinct
            self.limit = max(peak, MIN_LIMIT) if peak > 0 else 1.0
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


class _ThresholdSearchObserver(_HistogramObserver, abc.ABC):
    """Search the clipping threshold T that minimises a loss between the observed histogram
    and its uint8 quantization over [lo, hi] = [max(lo_seen, −T), min(hi_seen, T)].

    The loss sees the grid the activations are really quantized on: 255 steps over [lo, hi],
    asymmetric (post-Swish activations are nearly one-sided). Candidates are
    T_k = k·R/(bins/2), k from 255 (so that [lo, hi] spans at least one bin per level) to
    bins/2 (no clipping, always included), in about 256 steps.
    """

    levels = 256

    def __init__(self, bins: int = 4096) -> None:
        super().__init__(bins)

    def compute_range(self) -> Range:
        if self.counts.sum() == 0:
            raise ValueError("observer saw no data")
        seen_lo, seen_hi = self.minmax.compute_range()
        # The quantized range always contains 0 (qparams.quant_params), so search on that.
        lo0, hi0 = min(seen_lo, 0.0), max(seen_hi, 0.0)
        half = self.bins // 2
        step = max(1, half // 256)
        ks = list(range(min(self.levels - 1, half), half + 1, step))
        if ks[-1] != half:
            ks.append(half)  # the whole histogram, no clipping, is always a candidate
        ranges = [(max(lo0, -k * self.limit / half), min(hi0, k * self.limit / half))
                  for k in ks]
        losses = [self._loss(*r) for r in ranges]
        if not np.isfinite(min(losses)):
            return seen_lo, seen_hi
        best = ranges[int(np.argmin(losses))]
        if best[1] - best[0] >= (hi0 - lo0) - step * self.limit / half:
            return seen_lo, seen_hi  # within one search step of the data: no clipping
        return best

    def _centers(self) -> np.ndarray:
        edges = self.edges()
        return (edges[:-1] + edges[1:]) / 2

    @abc.abstractmethod
    def _loss(self, lo: float, hi: float) -> float:
        """How badly the uint8 grid over [lo, hi] represents the histogram."""


class EntropyObserver(_ThresholdSearchObserver):
    """Minimise KL(P‖Q) (TensorRT's entropy calibration, on the asymmetric uint8 grid):
    P = the histogram restricted to [lo, hi] with the clipped mass added to its end bins;
    Q = the in-range bins merged into 255 levels and spread back over the non-empty bins."""

    def _loss(self, lo: float, hi: float) -> float:
        first, last = self._bin(lo), self._bin(hi) + 1
        reference = self.counts[first:last]
        if reference.size < 2:
            return np.inf
        p = reference.copy()
        p[0] += self.counts[:first].sum()  # P: clipped values pile into the end bins
        p[-1] += self.counts[last:].sum()
        n_levels = min(self.levels - 1, reference.size)
        starts = np.linspace(0, reference.size, n_levels + 1).astype(int)[:-1]
        lengths = np.diff(np.append(starts, reference.size))
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

    def _bin(self, value: float) -> int:
        index = int((value + self.limit) / (2 * self.limit) * self.bins)
        return min(max(index, 0), self.bins - 1)


class MseObserver(_ThresholdSearchObserver):
    """Minimise Σ_bins count·(x_bin − q(x_bin))², q = uint8 round-to-nearest on 255 steps of
    (hi − lo)/255 over [lo, hi], values outside clipped."""

    def _loss(self, lo: float, hi: float) -> float:
        centers = self._centers()
        step = max(hi - lo, 1e-12) / (self.levels - 1)
        quantized = np.clip(np.round((centers - lo) / step), 0, self.levels - 1) * step + lo
        return float(np.sum(self.counts * (centers - quantized) ** 2))


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
