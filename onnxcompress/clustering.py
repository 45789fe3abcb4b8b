"""Weight sharing by k-means (Han et al., Deep Compression): a small codebook per weight tensor.

:func:`cluster_values` fits ``clusters`` shared values to an array's elements and returns the
codebook and each element's index. Exact zeros (from pruning) are not clustered: they get a
codebook entry of their own that is exactly 0.0, so pruned weights stay pruned.

The fit is scikit-learn's ``KMeans`` on a fine histogram of the values (bin centres weighted
by their counts), which costs the same for 10⁴ and 10⁷ weights, then one Lloyd step on the
full data: each centroid becomes the mean of the weights nearest to it. In one dimension the
nearest centroid is found by ``searchsorted`` on the midpoints between sorted centroids, so
no n×k distance matrix is ever built.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
from sklearn.cluster import KMeans

Init = Literal["linear", "kmeans++", "density"]
INITS: tuple[str, ...] = ("linear", "kmeans++", "density")
# Histogram bins for the fit, per cluster (at least MIN_FIT_BINS): far narrower than any cluster.
FIT_BINS_PER_CLUSTER = 64
MIN_FIT_BINS = 4096


@dataclasses.dataclass(frozen=True)
class Clustered:
    """An array as a codebook and one index per element: ``codebook[indices]`` rebuilds it."""

    codebook: np.ndarray  # sorted ascending, same dtype as the input
    indices: np.ndarray  # uint8 (up to 256 entries) or uint16, the input's shape

    def rebuild(self) -> np.ndarray:
        return self.codebook[self.indices]

    @property
    def index_bits(self) -> int:
        """Bits per weight of a fixed-width index into the codebook."""
        return max(1, int(np.ceil(np.log2(len(self.codebook)))))

    def entropy_bits(self) -> float:
        """Shannon entropy of the indices (bits per weight): what Huffman coding approaches."""
        counts = np.bincount(self.indices.ravel(), minlength=len(self.codebook))
        p = counts[counts > 0] / self.indices.size
        return float(-(p * np.log2(p)).sum()) if p.size > 1 else 0.0


def cluster_values(array: np.ndarray, clusters: int, init: Init = "linear", seed: int = 0) -> Clustered:
    """Share ``clusters`` values among the elements of ``array`` (float), by k-means.

    Exact zeros take one of the ``clusters`` entries, exactly 0.0, when there are any; the
    other elements are clustered into the remaining entries. ``init`` seeds the centroids:
    ``linear`` evenly over [min, max] (keeps the rare large weights, the paper's choice),
    ``density`` at evenly spaced quantiles, ``kmeans++`` scikit-learn's seeding (``seed``).

    Exact limit: when the nonzero elements take at most that many distinct values, the
    codebook holds exactly those values and ``rebuild()`` returns the array bit for bit.
    """
    if clusters < 2:
        raise ValueError(f"clusters must be at least 2, got {clusters}")
    flat = array.ravel()
    zero = flat == 0
    has_zeros = bool(zero.any())
    values = flat[~zero] if has_zeros else flat
    room = clusters - 1 if has_zeros else clusters
    centroids = _few_distinct(values, room)
    if centroids is None:
        centroids = _mean_of_nearest(values, _fit(values, room, init, seed))
    codebook = np.sort(np.concatenate([[0.0], centroids]) if has_zeros else centroids).astype(array.dtype)
    indices = _nearest(flat, codebook)
    if has_zeros:  # an exact zero is never assigned to a nonzero centroid, nor a nonzero weight to 0
        zero_index = int(np.flatnonzero(codebook == 0)[0])
        indices[zero] = zero_index
        misplaced = ~zero & (indices == zero_index)
        if misplaced.any():
            indices[misplaced] = _nearest_nonzero(flat[misplaced], codebook, zero_index)
    dtype = np.uint8 if len(codebook) <= 256 else np.uint16
    return Clustered(codebook, indices.astype(dtype).reshape(array.shape))


def _few_distinct(values: np.ndarray, room: int) -> np.ndarray | None:
    """The distinct values when there are at most ``room`` of them (the exact case), else None."""
    if values.size == 0:
        return np.zeros(0, np.float64)
    lo, hi = float(values.min()), float(values.max())
    if lo == hi:
        return np.array([lo])
    occupied = np.count_nonzero(np.histogram(values.astype(np.float64), bins=4 * room, range=(lo, hi))[0])
    if occupied > room:  # more occupied bins than entries: certainly more distinct values
        return None
    distinct = np.unique(values)
    return distinct.astype(np.float64) if distinct.size <= room else None


def _fit(values: np.ndarray, k: int, init: Init, seed: int) -> np.ndarray:
    """k centroids fitted by scikit-learn's KMeans on the values' histogram."""
    lo, hi = float(values.min()), float(values.max())
    bins = max(MIN_FIT_BINS, FIT_BINS_PER_CLUSTER * k)
    counts, edges = np.histogram(values.astype(np.float64), bins=bins, range=(lo, hi))
    keep = counts > 0
    centres = ((edges[:-1] + edges[1:]) / 2)[keep].reshape(-1, 1)
    weights = counts[keep].astype(np.float64)
    k = min(k, len(centres))
    if init == "linear":
        start = np.linspace(lo, hi, k).reshape(-1, 1)
    elif init == "density":
        start = np.quantile(values, (np.arange(k) + 0.5) / k).reshape(-1, 1)
        start = np.unique(start).reshape(-1, 1) if len(np.unique(start)) < k else start
    else:
        start = "k-means++"
    k = len(start) if not isinstance(start, str) else k
    fitted = KMeans(k, init=start, n_init=1, max_iter=300, tol=1e-7, random_state=seed).fit(centres, sample_weight=weights)
    return np.sort(fitted.cluster_centers_.ravel())


def _mean_of_nearest(values: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """One Lloyd step on the full data: the mean of the values nearest to each centroid
    (clusters left empty are dropped)."""
    assigned = _nearest(values, centroids)
    counts = np.bincount(assigned, minlength=len(centroids))
    sums = np.bincount(assigned, weights=values, minlength=len(centroids))
    used = counts > 0
    return np.sort(sums[used] / counts[used])


def _nearest(values: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """Index of the nearest entry of a sorted codebook for each value (ties go to the lower)."""
    midpoints = (codebook[:-1].astype(np.float64) + codebook[1:]) / 2
    return np.searchsorted(midpoints, values, side="left").astype(np.int64)


def _nearest_nonzero(values: np.ndarray, codebook: np.ndarray, zero_index: int) -> np.ndarray:
    """For nonzero values that landed on the zero entry: the nearer of its two neighbours."""
    below, above = zero_index - 1, zero_index + 1
    if below < 0:
        return np.full(values.shape, above)
    if above >= len(codebook):
        return np.full(values.shape, below)
    pick_above = np.abs(values - codebook[above]) < np.abs(values - codebook[below])
    return np.where(pick_above, above, below)
