"""Streamed histograms and the calibration ranges read off them."""

from __future__ import annotations

import numpy as np
import pytest

from onnxcompress.histogram import StreamingHistogram, calibrated_range
from onnxcompress.quantization import UINT8, affine_params


def _hist(batches, bins=4096):
    h = StreamingHistogram(bins)
    for batch in batches:
        h.update(batch)
    return h


def test_minmax_is_exact_over_batches():
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal(1000).astype(np.float32) * (i + 1) for i in range(6)]
    lo, hi = calibrated_range(_hist(batches), "minmax", UINT8)
    everything = np.concatenate(batches)
    assert (lo, hi) == (float(everything.min()), float(everything.max()))


def test_growing_range_merges_bins_exactly():
    rng = np.random.default_rng(1)
    small = rng.uniform(-0.3, 0.3, 5000).astype(np.float32)
    large = rng.uniform(-7.0, 7.0, 5000).astype(np.float32)
    streamed = _hist([small, large])  # R grows from 0.5 to 8 after the first batch
    at_once = _hist([np.concatenate([small, large])])
    assert streamed.radius == at_once.radius == 8.0
    np.testing.assert_array_equal(streamed.counts, at_once.counts)


def test_memory_does_not_grow_with_samples():
    h = StreamingHistogram(256)
    rng = np.random.default_rng(2)
    for _ in range(50):
        h.update(rng.standard_normal(2000).astype(np.float32))
    assert h.counts.shape == (256,) and h.total == 100_000


def test_zeros_are_counted_apart():
    x = np.array([0, 0, 0, 1.5, 2.5], np.float32)
    h = _hist([x], bins=64)
    assert h.zeros == 3 and h.counts.sum() == 2


def test_percentile_matches_numpy_to_bin_width():
    x = np.random.default_rng(3).standard_normal(200_000).astype(np.float32)
    h = _hist(np.array_split(x, 9))
    lo, hi = calibrated_range(h, "percentile", UINT8, percentile=99.9)
    want_lo, want_hi = np.percentile(x, [0.1, 99.9])
    assert abs(lo - want_lo) <= h.width and abs(hi - want_hi) <= h.width


def _expected_error(x, lo, hi):
    scale, zp = affine_params(lo, hi, UINT8)
    q = np.clip(np.rint(x / scale) + zp, 0, 255)
    return float(np.mean(((q - zp) * scale - x) ** 2))


def test_mse_range_is_the_brute_force_optimum():
    x = np.abs(np.random.default_rng(4).laplace(size=100_000)).astype(np.float32)
    lo, hi = calibrated_range(_hist([x]), "mse", UINT8)
    best = min(_expected_error(x, 0.0, t) for t in np.linspace(0.5, float(x.max()), 400))
    assert lo == 0.0 and hi < float(x.max())
    assert _expected_error(x, lo, hi) <= 1.01 * best
    assert _expected_error(x, lo, hi) < _expected_error(x, 0.0, float(x.max()))


def test_entropy_clips_the_tail_of_a_non_negative_tensor():
    rng = np.random.default_rng(5)
    x = np.maximum(rng.standard_normal(100_000), 0).astype(np.float32)
    lo, hi = calibrated_range(_hist([x]), "entropy", UINT8)
    assert lo == 0.0 and 2.0 < hi < float(x.max())


def test_unknown_method_and_bad_bins():
    with pytest.raises(ValueError, match="unknown calibration method"):
        calibrated_range(_hist([np.ones(4, np.float32)]), "median", UINT8)
    with pytest.raises(ValueError, match="multiple of 4"):
        StreamingHistogram(10)


def _kl_threshold_by_definition(counts: np.ndarray, levels: int) -> int:
    """TensorRT's rule written out: for each candidate i, KL(P‖Q) with P the first i bins plus
    the tail's mass on the last one and Q the i bins merged into ``levels`` groups, each
    group's mass spread evenly over its non-empty bins."""
    n = counts.size
    best, best_kl = n, np.inf
    for i in range(levels, n + 1, max(1, (n - levels) // 256)):
        p = counts[:i].astype(np.float64)
        p[-1] += counts[i:].sum()
        clipped = counts[:i].astype(np.float64)
        q = np.zeros(i)
        for g in range(levels):
            members = np.nonzero((np.arange(i) * levels) // i == g)[0]
            filled = members[clipped[members] > 0]
            if filled.size:
                q[filled] = clipped[members].sum() / filled.size
        p, q = p / p.sum(), q / q.sum()
        support = p > 0
        kl = np.inf if np.any(q[support] == 0) else float(np.sum(p[support] * np.log(p[support] / q[support])))
        if kl < best_kl:
            best, best_kl = i, kl
    return best


@pytest.mark.parametrize("shape", ["normal", "heavy", "sparse"])
def test_entropy_threshold_is_the_kl_minimiser_by_definition(shape):
    from onnxcompress.histogram import _kl_threshold

    rng = np.random.default_rng(7)
    for trial in range(3):
        n = int(rng.integers(300, 1500))
        if shape == "normal":
            counts = np.histogram(np.abs(rng.standard_normal(50_000)), bins=n)[0]
        elif shape == "heavy":
            counts = np.histogram(rng.exponential(size=50_000) ** 2, bins=n)[0]
        else:
            counts = rng.integers(0, 4, n) * (rng.random(n) < 0.2)
        for levels in (128, 255):
            assert _kl_threshold(counts.astype(np.float64), levels) == _kl_threshold_by_definition(counts, levels)
