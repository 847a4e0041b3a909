"""Activation range observers for calibration: min/max, percentile, and an L2-optimal range on a histogram.

Each returns the (scale, zero point) of `act_qparams`: an asymmetric uint8 grid of ACT_QMAX steps. The
histogram observer is what torch.ao's HistogramObserver approximates, in plain tensor ops: counts of every
calibration activation, then the clipping range [lo, hi] that minimises the expected squared error of
rounding to that grid plus clipping outside it. One far outlier then costs its clipping error instead of
coarsening the grid for every other value.
"""

from __future__ import annotations

import math

import torch

ACT_QMAX = 127  # activation scales span 7 bits (the x86 int8 convention: u8*s8 pair sums cannot overflow int16)
HISTOGRAM_BINS = 2048
PERCENTILE_SAMPLES = 1_000_000


def act_qparams(lo: float, hi: float) -> tuple[float, int]:
    """Asymmetric uint8 (7-bit) scale and zero point covering [lo, hi] and zero."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = max((hi - lo) / ACT_QMAX, 1e-8)
    zero_point = int(min(max(round(-lo / scale), 0), ACT_QMAX))
    return scale, zero_point


class RangeObserver:
    """Tracks an activation range from calibration batches; `qparams()` gives (scale, zero point)."""

    def __init__(self, kind: str, percentile: float):
        self.kind, self.percentile = kind, percentile
        self.lo, self.hi = math.inf, -math.inf
        self.los: list[float] = []
        self.his: list[float] = []
        self.histogram = Histogram() if kind == "histogram" else None

    def update(self, t: torch.Tensor) -> None:
        t = t.detach().float().cpu()
        self.lo, self.hi = min(self.lo, float(t.min())), max(self.hi, float(t.max()))
        if self.histogram is not None:
            self.histogram.add(t)
        elif self.kind == "percentile":
            flat = t.reshape(-1)
            if flat.numel() > PERCENTILE_SAMPLES:
                pick = torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))
                flat = flat[pick[:PERCENTILE_SAMPLES]]
            q = torch.quantile(flat, torch.tensor([1 - self.percentile / 100, self.percentile / 100]))
            self.los.append(float(q[0]))
            self.his.append(float(q[1]))

    def qparams(self) -> tuple[float, int]:
        if self.histogram is not None:
            return act_qparams(*self.histogram.best_range())
        if self.kind == "percentile":
            return act_qparams(sum(self.los) / len(self.los), sum(self.his) / len(self.his))
        return act_qparams(self.lo, self.hi)


class Histogram:
    """Counts in equal bins over [lo, hi], a range that always holds zero and widens as batches arrive."""

    def __init__(self, bins: int = HISTOGRAM_BINS):
        self.bins = bins
        self.lo, self.hi = 0.0, 0.0
        self.counts = torch.zeros(bins, dtype=torch.float64)

    def add(self, t: torch.Tensor) -> None:
        flat = t.detach().float().reshape(-1)
        flat = flat[torch.isfinite(flat)]
        if flat.numel() == 0:
            return
        lo, hi = min(self.lo, float(flat.min())), max(self.hi, float(flat.max()))
        if hi <= lo:  # every value so far is zero: nothing to spread over bins yet
            return
        if (lo, hi) != (self.lo, self.hi):
            self.counts = self._rebinned(lo, hi)
            self.lo, self.hi = lo, hi
        self.counts += torch.histc(flat, self.bins, lo, hi).double()

    def _rebinned(self, lo: float, hi: float) -> torch.Tensor:
        """The counts over a wider [lo, hi]: cumulative counts, linear within each old bin, read at the new edges."""
        if self.hi <= self.lo:
            return torch.zeros(self.bins, dtype=torch.float64)
        cumulative = torch.cat([torch.zeros(1, dtype=torch.float64), self.counts.cumsum(0)])
        edges = torch.linspace(lo, hi, self.bins + 1, dtype=torch.float64)
        pos = ((edges - self.lo) / (self.hi - self.lo) * self.bins).clamp(0, self.bins)
        i = pos.floor().long().clamp(max=self.bins - 1)
        at = cumulative[i] + (pos - i) * (cumulative[i + 1] - cumulative[i])
        return at.diff()

    def best_range(self) -> tuple[float, float]:
        """The [lo, hi] on bin edges, holding zero, with the least expected squared error per value.

        Values are taken as uniform within their bin. For a range [a, b] the error is the clipping error of
        the mass below a and above b (exact sums from prefix sums of the bins' moments) plus step^2 / 12 for
        each value inside, step = (b - a) / ACT_QMAX. Every pair of edges is scored; a tie goes to the lowest pair.
        """
        if self.hi <= self.lo or float(self.counts.sum()) == 0.0:
            return self.lo, self.hi
        n, width = self.bins, (self.hi - self.lo) / self.bins
        edges = torch.linspace(self.lo, self.hi, n + 1, dtype=torch.float64)
        centers = (edges[:-1] + edges[1:]) / 2
        counts = self.counts

        def prefix(values: torch.Tensor) -> torch.Tensor:
            return torch.cat([torch.zeros(1, dtype=torch.float64), values.cumsum(0)])

        m0, m1, m2 = prefix(counts), prefix(counts * centers), prefix(counts * (centers**2 + width**2 / 12))
        lower = torch.nonzero(edges <= 0).reshape(-1)  # candidate lo: edges at or below zero
        upper = torch.nonzero(edges >= 0).reshape(-1)  # candidate hi: edges at or above zero
        a, b = edges[lower].reshape(-1, 1), edges[upper].reshape(1, -1)
        below = m2[lower].reshape(-1, 1) - 2 * a * m1[lower].reshape(-1, 1) + a**2 * m0[lower].reshape(-1, 1)
        above = ((m2[n] - m2[upper]) - 2 * b * (m1[n] - m1[upper]) + b**2 * (m0[n] - m0[upper])).reshape(1, -1)
        inside = m0[upper].reshape(1, -1) - m0[lower].reshape(-1, 1)
        step = (b - a) / ACT_QMAX
        error = below.clamp(min=0) + above.clamp(min=0) + inside * step**2 / 12
        best = int(torch.argmin(error.reshape(-1)))
        p, q = divmod(best, len(upper))
        return float(edges[lower[p]]), float(edges[upper[q]])


__all__ = ["HISTOGRAM_BINS", "Histogram", "RangeObserver"]
