"""Streamed activation statistics and the calibration methods that read ranges off them.

A :class:`StreamingHistogram` takes a tensor's values batch by batch and keeps a fixed
number of bins, so memory does not grow with the number of calibration samples. The bins
cover ``[-R, R)`` with R a power of two; when a batch exceeds R, R doubles and adjacent bins
merge pairwise, which is exact (bin edges stay edges). Exact zeros, which Relu outputs are
full of, are counted apart so they don't smear over the two bins around 0; the exact
minimum and maximum are kept too.

Calibration methods (:func:`calibrated_range`), each giving ``(lo, hi)``:

- ``minmax``: the exact minimum and maximum seen.
- ``percentile``: the ``p``-th percentile of the values at the top and the ``(100 - p)``-th at
  the bottom (each end read off the histogram, to bin resolution).
- ``entropy``: the TensorRT-style KL threshold: the clipping point whose quantized
  distribution is closest (KL divergence) to the clipped one, on ``|x|`` (symmetric) or on x
  for a tensor with no negative values.
- ``mse``: the range that minimises the expected squared error (rounding inside the range,
  clipping outside) over the histogram: a joint shrink of both ends, then each end alone.
"""

from __future__ import annotations

import math

import numpy as np

from onnxcompress.quantization import QType, affine_params

METHODS = ("minmax", "percentile", "entropy", "mse")


class StreamingHistogram:
    """Fixed-size histogram of one tensor's values, updated batch by batch."""

    def __init__(self, bins: int = 4096):
        if bins < 8 or bins % 4:
            raise ValueError("bins must be a multiple of 4, at least 8")
        self.bins = bins
        self.counts = np.zeros(bins, dtype=np.int64)
        self.radius = 0.0  # R; 0 until the first non-zero value
        self.zeros = 0
        self.total = 0
        self.min = math.inf
        self.max = -math.inf

    @property
    def width(self) -> float:
        return 2.0 * self.radius / self.bins

    def edges(self) -> np.ndarray:
        return np.linspace(-self.radius, self.radius, self.bins + 1)

    def centers(self) -> np.ndarray:
        e = self.edges()
        return 0.5 * (e[:-1] + e[1:])

    def update(self, values: np.ndarray) -> None:
        x = np.asarray(values, dtype=np.float32).ravel()
        if not x.size:
            return
        lo, hi = float(x.min()), float(x.max())
        if not (np.isfinite(lo) and np.isfinite(hi)):  # NaN or inf somewhere: drop those values
            x = x[np.isfinite(x)]
            if not x.size:
                return
            lo, hi = float(x.min()), float(x.max())
        self.total += x.size
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        zeros = x.size - int(np.count_nonzero(x))
        self.zeros += zeros
        peak = max(abs(lo), abs(hi))
        if peak == 0.0:
            return
        if self.radius == 0.0:
            self.radius = 2.0 ** math.ceil(math.log2(peak))
            if self.radius <= peak:
                self.radius *= 2.0
        while peak >= self.radius:
            self._double()
        # Bin i holds [-R + i·w, -R + (i+1)·w); float32 arithmetic, truncation = floor here
        # since the shifted values are non-negative. Zeros land in the middle bin: taken out.
        half = self.bins // 2
        index = (x * np.float32(1.0 / self.width) + np.float32(half)).astype(np.int32)
        np.minimum(index, self.bins - 1, out=index)
        counts = np.bincount(index, minlength=self.bins)
        counts[half] -= zeros
        self.counts += counts

    def _double(self) -> None:
        """R → 2R: old bins 2i, 2i+1 become new bin bins/4 + i (the middle half)."""
        merged = self.counts.reshape(-1, 2).sum(axis=1)
        counts = np.zeros_like(self.counts)
        quarter = self.bins // 4
        counts[quarter:quarter + merged.size] = merged
        self.counts = counts
        self.radius *= 2.0

    def with_zeros(self) -> tuple[np.ndarray, np.ndarray]:
        """(values, counts): bin centres with the exact zeros as one more point at 0."""
        centers = np.append(self.centers(), 0.0)
        counts = np.append(self.counts, self.zeros).astype(np.float64)
        return centers, counts


def calibrated_range(hist: StreamingHistogram, method: str, qtype: QType, percentile: float = 99.99) -> tuple[float, float]:
    """``(lo, hi)`` for the tensor whose statistics ``hist`` holds, by ``method``."""
    if hist.total == 0:
        return 0.0, 0.0
    if method == "minmax" or hist.radius == 0.0:
        return hist.min, hist.max
    if method == "percentile":
        return _percentile_range(hist, percentile)
    if method == "entropy":
        return _entropy_range(hist)
    if method == "mse":
        return _mse_range(hist, qtype)
    raise ValueError(f"unknown calibration method {method!r}; known: {', '.join(METHODS)}")


def _percentile_range(hist: StreamingHistogram, p: float) -> tuple[float, float]:
    centers, counts = hist.with_zeros()
    order = np.argsort(centers, kind="stable")
    values, cumulative = centers[order], np.cumsum(counts[order])
    total = cumulative[-1]
    lo = values[np.searchsorted(cumulative, total * (1.0 - p / 100.0), side="left")]
    hi = values[min(np.searchsorted(cumulative, total * p / 100.0, side="left"), len(values) - 1)]
    # Bin centres can lie outside what was seen; the exact extremes bound the range.
    return max(float(lo), hist.min), min(float(hi), hist.max)


def _entropy_range(hist: StreamingHistogram, levels: int = 128) -> tuple[float, float]:
    """KL-optimal threshold on |x| (or on x when nothing is negative)."""
    half = hist.bins // 2
    positive = hist.counts[half:].astype(np.float64)
    one_sided = hist.min >= 0.0
    magnitude = positive if one_sided else positive + hist.counts[:half][::-1]
    if one_sided:
        levels = 2 * levels - 1  # the whole grid serves one side
    used = int(np.nonzero(magnitude)[0].max()) + 1
    threshold_bin = _kl_threshold(magnitude[:used], levels)
    t = threshold_bin * hist.width
    if one_sided:
        return 0.0, min(t, hist.max)
    return max(-t, hist.min), min(t, hist.max)


def _kl_threshold(counts: np.ndarray, levels: int) -> int:
    """The number of bins to keep (TensorRT's entropy calibration), at least ``levels``.

    For i kept bins, P is the first i bins with the mass beyond them added to the last kept
    one, and Q the kept bins merged into ``levels`` groups (bin j in group ⌊j·levels/i⌋)
    spread back evenly over each group's non-empty bins; the score is KL(P‖Q), infinite when Q
    misses mass P has (only possible at the last bin). Within a group every non-empty bin
    has the same q, so the sum over a group needs only its Σc, Σc·log c and non-empty count:
    prefix sums give all of them for every candidate at once, O(levels) per candidate.
    """
    n = counts.size
    if n <= levels:
        return n
    step = max(1, (n - levels) // 256)  # at most ~256 candidates: bounded time per tensor
    kept = np.arange(levels, n + 1, step)
    counts = counts.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        c_log_c = np.where(counts > 0, counts * np.log(np.where(counts > 0, counts, 1.0)), 0.0)
    prefix = [np.concatenate([[0.0], np.cumsum(a)]) for a in (counts, c_log_c, (counts > 0).astype(np.float64))]
    starts = (np.arange(levels + 1)[None, :] * kept[:, None] + levels - 1) // levels  # group g: [starts_g, starts_g+1)
    mass, mass_log, occupied = (a[starts[:, 1:]] - a[starts[:, :-1]] for a in prefix)
    total = prefix[0][-1]
    clipped = prefix[0][kept]  # Q's total mass
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = mass / np.maximum(occupied, 1)  # q·Q of each non-empty bin of the group
        log_mean = np.log(np.where(mass > 0, mean, 1.0))
        log_ratio = math.log(total) - np.log(np.where(clipped > 0, clipped, 1.0))  # log N − log Q
        # N·KL = Σ_g Σ_j c_j (log c_j − log m_g − (log N − log Q)), then the last bin's correction
        scaled = np.sum(np.where(mass > 0, mass_log - mass * (log_mean + log_ratio[:, None]), 0.0), axis=1)
        last = counts[kept - 1]
        last_log_mean = log_mean[:, -1]
        beyond = total - clipped
        scaled -= np.where(last > 0, c_log_c[kept - 1] - last * (last_log_mean + log_ratio), 0.0)
        outlier = last + beyond
        scaled += np.where(outlier > 0, outlier * (np.log(np.where(outlier > 0, outlier, 1.0)) - last_log_mean - log_ratio), 0.0)
    kl = scaled / total
    kl[((last == 0) & (beyond > 0)) | (clipped == 0)] = math.inf
    return int(kept[int(np.argmin(kl))]) if np.isfinite(kl).any() else n


def _mse_range(hist: StreamingHistogram, qtype: QType, steps: int = 120) -> tuple[float, float]:
    values, counts = hist.with_zeros()
    keep = counts > 0
    values, counts = values[keep], counts[keep]

    def error(lo: float, hi: float) -> float:
        scale, zero_point = affine_params(lo, hi, qtype)
        q = np.clip(np.rint(values / scale) + zero_point, qtype.qmin, qtype.qmax)
        return float(np.sum(counts * ((q - zero_point) * scale - values) ** 2))

    shares = np.geomspace(1e-3, 1.0, steps)  # long tails put the optimum far below the maximum
    lo, hi = hist.min, hist.max
    shrink = min(shares, key=lambda a: error(a * lo, a * hi))
    lo, hi = shrink * lo, shrink * hi
    if hist.min < 0:
        lo = min(shares * hist.min, key=lambda v: error(v, hi))
    if hist.max > 0:
        hi = min(shares * hist.max, key=lambda v: error(lo, v))
    return float(min(lo, 0.0)), float(max(hi, 0.0))
