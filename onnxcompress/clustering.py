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

import base64
import dataclasses
import math
from typing import Literal

import numpy as np

Init = Literal["linear", "kmeans++", "density"]
INITS: tuple[str, ...] = ("linear", "kmeans++", "density")
# Histogram bins for the fit, per cluster (at least MIN_FIT_BINS): far narrower than any cluster.
FIT_BINS_PER_CLUSTER = 64
MIN_FIT_BINS = 4096
NEAREST_CELLS_PER_ENTRY = 8  # table cells per codebook entry in _nearest


@dataclasses.dataclass(frozen=True)
class Clustered:
    """An array as a codebook and one index per element: ``codebook[indices]`` rebuilds it,
    times ``scales`` along ``axis`` when the codebook is shared by scaled channels."""

    codebook: np.ndarray  # sorted ascending, same dtype as the input
    indices: np.ndarray  # uint8 (up to 256 entries) or uint16, the input's shape
    scales: np.ndarray | None = None  # one per slice along ``axis``, same dtype as the input
    axis: int = 0

    def rebuild(self) -> np.ndarray:
        shared = self.codebook[self.indices]
        return shared if self.scales is None else shared * self.broadcast_scales()

    def broadcast_scales(self) -> np.ndarray:
        """The scales shaped to multiply the indices' shape along ``axis``."""
        shape = [1] * self.indices.ndim
        shape[self.axis] = -1
        return self.scales.reshape(shape)

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
    data = values.astype(np.float64)  # once: the histograms, the search and the means all read float64
    centroids = _few_distinct(data, room)
    if centroids is None:
        centroids = _mean_of_nearest(data, _fit(data, room, init, seed))
    codebook = np.sort(np.concatenate([[0.0], centroids]) if has_zeros else centroids).astype(array.dtype)
    indices = nearest_entries(flat, codebook, zero if has_zeros else None)
    dtype = np.uint8 if len(codebook) <= 256 else np.uint16
    return Clustered(codebook, indices.astype(dtype).reshape(array.shape))


def cluster_channels(array: np.ndarray, axis: int, clusters: int, init: Init = "linear", seed: int = 0) -> Clustered:
    """One codebook shared by every slice of ``array`` along ``axis`` (output channels), each
    slice divided by its own root-mean-square (of its nonzero elements) before the k-means
    and multiplied by it after.

    Every channel keeps about the same relative error whatever its magnitude, as per-channel
    quantization scales give, for ``array.shape[axis]`` more values instead of one codebook
    per channel. Zeros stay exactly zero. A slice with no nonzero element gets scale 1.
    """
    axis = axis % array.ndim
    moved = np.moveaxis(array, axis, 0).reshape(array.shape[axis], -1).astype(np.float64)
    nonzero = np.count_nonzero(moved, axis=1)
    rms = np.sqrt(np.square(moved).sum(axis=1) / np.maximum(nonzero, 1))
    scales = np.where(nonzero > 0, rms, 1.0).astype(array.dtype)
    shape = [1] * array.ndim
    shape[axis] = -1
    shared = cluster_values((array / scales.reshape(shape)).astype(array.dtype), clusters, init, seed)
    return Clustered(shared.codebook, shared.indices, scales, axis)


# Tensor metadata of a weight clustered with scaled channels, so that pack can find its
# indices: the codebook and the scales (base64 of their little-endian bytes, in the weight's
# dtype) and the axis.
CODEBOOK_KEY = "onnxcompress.codebook"
SCALES_KEY = "onnxcompress.codebook_scales"
AXIS_KEY = "onnxcompress.codebook_axis"


def codebook_metadata(clustered: Clustered) -> dict[str, str]:
    """The tensor metadata of a weight clustered with scaled channels (empty otherwise)."""
    if clustered.scales is None:
        return {}
    return {CODEBOOK_KEY: _base64(clustered.codebook), SCALES_KEY: _base64(clustered.scales),
            AXIS_KEY: str(clustered.axis)}


def from_codebook_metadata(array: np.ndarray, metadata) -> Clustered | None:
    """The codebook, scales and indices of ``array`` read back from its tensor metadata, when
    the metadata is there, well-formed, and rebuilds ``array`` bit for bit; else None."""
    try:
        codebook = _from_base64(metadata[CODEBOOK_KEY], array.dtype)
        scales = _from_base64(metadata[SCALES_KEY], array.dtype)
        axis = int(metadata[AXIS_KEY])
    except (KeyError, ValueError, TypeError):
        return None
    if not 0 <= axis < array.ndim or scales.size != array.shape[axis] or not 0 < codebook.size <= 256:
        return None
    if np.any(np.diff(codebook) < 0) or not np.all(np.isfinite(codebook)) or not np.all(scales != 0):
        return None
    shape = [1] * array.ndim
    shape[axis] = -1
    normalized = array / scales.reshape(shape)  # a NaN lands on the last entry; the check below catches it
    indices = _nearest(normalized.ravel(), codebook).astype(np.uint8).reshape(array.shape)
    found = Clustered(codebook, indices, scales, axis)
    bits = np.dtype(f"<u{array.dtype.itemsize}")  # bit for bit: -0.0 is not 0.0
    rebuilt = np.ascontiguousarray(found.rebuild().astype(array.dtype))
    return found if np.array_equal(rebuilt.view(bits), np.ascontiguousarray(array).view(bits)) else None


def _base64(array: np.ndarray) -> str:
    return base64.b64encode(array.astype(array.dtype.newbyteorder("<")).tobytes()).decode("ascii")


def _from_base64(text: str, dtype: np.dtype) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text, validate=True), np.dtype(dtype).newbyteorder("<")).astype(dtype)


def _few_distinct(values: np.ndarray, room: int) -> np.ndarray | None:
    """The distinct values (float64) when there are at most ``room`` of them (the exact case), else None."""
    if values.size == 0:
        return np.zeros(0, np.float64)
    lo, hi = float(values.min()), float(values.max())
    if lo == hi:
        return np.array([lo])
    occupied = np.count_nonzero(np.histogram(values, bins=4 * room, range=(lo, hi))[0])
    if occupied > room:  # more occupied bins than entries: certainly more distinct values
        return None
    distinct = np.unique(values)
    return distinct if distinct.size <= room else None


def _fit(values: np.ndarray, k: int, init: Init, seed: int) -> np.ndarray:
    """k centroids fitted by scikit-learn's KMeans on the values' histogram."""
    from sklearn.cluster import KMeans  # imported here: unpacking an archive needs this module, not scikit-learn
    lo, hi = float(values.min()), float(values.max())
    bins = max(MIN_FIT_BINS, FIT_BINS_PER_CLUSTER * k)
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
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
    """Index of the nearest entry of a sorted codebook for each value (ties go to the lower):
    the number of midpoints below it, as ``searchsorted`` counts them.

    A binary search per value is the slow part of clustering and of packing clustered weights,
    so the count is read off a table of NEAREST_CELLS_PER_ENTRY equal cells per entry over the
    midpoints' range (the count below each cell, plus one comparison with the next midpoint),
    then checked against the two midpoints around it; the few values the check rejects (a cell
    holding two midpoints, rounding at a cell's edge, NaN) are searched.
    """
    midpoints = (codebook[:-1].astype(np.float64) + codebook[1:]) / 2
    span = float(midpoints[-1] - midpoints[0]) if midpoints.size else 0.0
    if not (math.isfinite(span) and span > 0):
        return np.searchsorted(midpoints, values, side="left").astype(np.int64)
    cells, lo = NEAREST_CELLS_PER_ENTRY * codebook.size, float(midpoints[0])
    scale = cells / span
    below = np.searchsorted(midpoints, lo + np.arange(cells) / scale, side="left")
    table = np.concatenate(([0], below, [midpoints.size]))  # under the range, its cells, over it
    position = (values - lo) * scale + 1  # Python floats: float32 values stay float32
    np.clip(position, 0, cells + 1, out=position)
    with np.errstate(invalid="ignore"):  # NaN: any cell, the check below sends it to the search
        cell = np.maximum(position.astype(np.intp), 0)
    index = table[cell]
    upper = np.append(midpoints, np.inf)
    index += values > upper[index]
    lower = np.concatenate(([-np.inf], midpoints))
    wrong = ~((values > lower[index]) & (values <= upper[index]))
    if wrong.any():
        index[wrong] = np.searchsorted(midpoints, values[wrong], side="left")
    return index


def nearest_entries(values: np.ndarray, codebook: np.ndarray, zeros: np.ndarray | None = None) -> np.ndarray:
    """Index of the nearest entry of a sorted ``codebook`` for each value; where ``zeros``
    (a mask of the weights that are exact zeros, pruned) is given and the codebook holds 0.0,
    those take the zero entry and no other value does (it goes to the nearer neighbour)."""
    indices = _nearest(values, codebook)
    hits = np.flatnonzero(codebook == 0)
    if zeros is not None and hits.size:
        zero_index = int(hits[0])
        indices[zeros] = zero_index
        misplaced = ~zeros & (indices == zero_index)
        if misplaced.any():
            indices[misplaced] = _nearest_nonzero(values[misplaced], codebook, zero_index)
    return indices


def _nearest_nonzero(values: np.ndarray, codebook: np.ndarray, zero_index: int) -> np.ndarray:
    """For nonzero values that landed on the zero entry: the nearer of its two neighbours."""
    below, above = zero_index - 1, zero_index + 1
    if below < 0:
        return np.full(values.shape, above)
    if above >= len(codebook):
        return np.full(values.shape, below)
    pick_above = np.abs(values - codebook[above]) < np.abs(values - codebook[below])
    return np.where(pick_above, above, below)
