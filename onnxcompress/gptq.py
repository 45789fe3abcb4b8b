"""GPTQ (Frantar et al. 2023, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"): weights rounded so that the layer's output on the calibration
inputs moves as little as possible, on the block grid MatMulNBits reads
(:func:`quantize_blocks_gptq`), on quantize-qdq's per-channel int8 grid
(:func:`round_gptq`) and onto cluster-weights' k-means codebook (:func:`assign_codebook_gptq`).

Round-to-nearest quantizes every weight on its own. GPTQ quantizes the K rows of a K×N
weight one after another and, after each row, moves the rows not yet quantized so that the
layer's output on the calibration inputs X changes as little as possible: with H = XᵀX + λI
and U the upper Cholesky factor of H⁻¹, row i's error e = (w_i − q_i) / U_ii is taken off
the later rows as U_i,j · e (the optimal brain surgeon update). Updates to rows past the
current chunk are applied at once per chunk (the paper's lazy batch updates), so the Python
loop runs over rows, not over row × later row. A grouped convolution is G independent
layers: every step runs on all G at once.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import scipy.linalg

from onnxcompress.clustering import nearest_entries
from onnxcompress.quantization import Blocks, QType, block_grid, round_half_even

CHUNK_ROWS = 128  # rows whose updates stay inside the chunk; the rest get one matrix product


def input_gram(inputs: Iterable[np.ndarray], k: int) -> np.ndarray:
    """Σ xᵀx over the rows of the layer inputs (each reshaped to (-1, K)): each input's
    product in float32 (a single-precision BLAS call), summed in float64."""
    gram = np.zeros((k, k))
    for x in inputs:
        rows = np.asarray(x, dtype=np.float32).reshape(-1, k)
        gram += rows.T @ rows
    return gram


def conv_positions(size, kernel, strides, pads, dilations) -> tuple[int, int]:
    """Output height and width of a 2-D Conv on an input of spatial ``size``, ``pads`` as the
    Conv attribute (top, left, bottom, right)."""
    return tuple((size[d] + pads[d] + pads[2 + d] - dilations[d] * (kernel[d] - 1) - 1) // strides[d] + 1
                 for d in range(2))


def unit_layout(shape: tuple[int, ...], group: int = 1, transposed: bool = False):
    """(to, back): an array of a unit's weight shape as G×K×N (G groups of K inputs by N
    outputs, the layout GPTQ works on) and back. ``shape`` is a MatMul's K×N, a Gemm's N×K
    when ``transposed`` (transB=1), or a 2-D Conv's N×C/G×kh×kw with ``group`` groups."""
    if len(shape) == 4:
        per_group = shape[0] // group
        return (lambda a: a.reshape(group, per_group, -1).transpose(0, 2, 1),
                lambda u: u.transpose(0, 2, 1).reshape(shape))
    if transposed:
        return lambda a: a.T[None], lambda u: u[0].T
    return lambda a: a[None], lambda u: u[0]


def conv_gram(x: np.ndarray, weight_shape: tuple[int, ...], group: int, strides, pads, dilations) -> np.ndarray:
    """Σ pᵀp over the patches p a 2-D Conv reads from ``x`` (N×C×H×W), one K×K matrix per
    group (G×K×K, K = C/G·kh·kw, ordered as the weight's C/G×kh×kw): the Gram matrix of the
    layer as a MatMul of its patches. ``pads`` as the Conv attribute (top, left, bottom, right)."""
    _, c_per_group, kh, kw = weight_shape
    out_h, out_w = conv_positions(x.shape[2:], (kh, kw), strides, pads, dilations)
    x = np.pad(np.asarray(x, dtype=np.float32), ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    batch = x.shape[0]
    cols = np.empty((batch, x.shape[1], kh, kw, out_h, out_w), dtype=np.float32)
    for i in range(kh):
        for j in range(kw):
            top, left = i * dilations[0], j * dilations[1]
            cols[:, :, i, j] = x[:, :, top:top + strides[0] * (out_h - 1) + 1:strides[0],
                                 left:left + strides[1] * (out_w - 1) + 1:strides[1]]
    k = c_per_group * kh * kw
    patches = cols.reshape(batch, group, k, out_h * out_w).transpose(1, 2, 0, 3).reshape(group, k, -1)
    return np.matmul(patches, patches.transpose(0, 2, 1)).astype(np.float64)


def _inverse_factor(gram: np.ndarray, damp: float) -> np.ndarray:
    """U, the upper Cholesky factor of (H + λI)⁻¹ for G×K×K Gram matrices H, with λ =
    ``damp`` × the mean of the diagonals of all G. An input that is always zero on the
    calibration data (zero row and column) gets diagonal entry 1: no error moves onto or off
    its weights, which are rounded to nearest (the data says nothing about them, and zeroing
    them would break the layer on inputs where they are not zero). One λ for the
    whole layer: a group whose inputs are nearly always zero (a channel ReLU rarely lets
    through) is damped towards round-to-nearest instead of fitted to a few values.

    With J the reversal of the K axes and J·H·J = L·Lᵀ, U = J·L⁻¹·J: one Cholesky
    factorisation and one triangular inverse, no general inverse."""
    hessian = np.array(gram, dtype=np.float64)
    diagonal = np.einsum("gkk->gk", hessian)  # a view: writes go into hessian
    diagonal[diagonal == 0] = 1.0
    diagonal += damp * diagonal.mean()
    upper = np.empty_like(hessian)
    for g, h in enumerate(hessian):
        lower = scipy.linalg.cholesky(h[::-1, ::-1], lower=True)
        inverse, info = scipy.linalg.lapack.dtrtri(lower, lower=1)
        if info:
            raise np.linalg.LinAlgError(f"the damped Gram matrix is singular (dtrtri info {info})")
        upper[g] = inverse[::-1, ::-1]
    return upper


def _optimal_brain_rounding(weights: np.ndarray, upper: np.ndarray, round_rows: Callable[[int, np.ndarray], np.ndarray],
                            chunk: int) -> None:
    """Round ``weights`` (G×K×N, float64, changed in place) row by row: ``round_rows(row,
    pending)`` gets the rows from ``row`` to the end of its chunk as they stand and returns
    row ``row`` on the grid (G×N); its error moves onto the later rows."""
    _, k, n = weights.shape
    for start in range(0, k, chunk):
        end = min(start + chunk, k)
        part = weights[:, start:end].copy()
        errors = np.zeros((weights.shape[0], end - start, n))
        for i in range(end - start):
            row = start + i
            rounded = round_rows(row, part[:, i:])
            errors[:, i] = (part[:, i] - rounded) / upper[:, row, row][:, None]
            part[:, i + 1:] -= upper[:, row, row + 1:end][:, :, None] * errors[:, i][:, None, :]
            part[:, i] = rounded
        weights[:, start:end] = part
        weights[:, end:] -= np.matmul(upper[:, start:end, end:].transpose(0, 2, 1), errors)


def round_gptq(w: np.ndarray, gram: np.ndarray, scale: np.ndarray, zero_point: int, qtype: QType,
               damp: float = 0.01) -> np.ndarray:
    """Codes (G×K×N, ``qtype``) of ``w`` (G×K×N: G groups of a K×N weight) on the fixed grid
    (q − zero_point) · scale, ``scale`` G×N (one per output column) or G×1, chosen by GPTQ
    against the Gram matrices ``gram`` (G×K×K, :func:`input_gram`, :func:`conv_gram`).
    Inputs that are always zero are rounded to nearest.

    Exact limit: with a diagonal ``gram`` no error moves between rows and the codes are those
    of round-to-nearest; weights already on the grid keep their codes whatever the gram."""
    upper = _inverse_factor(gram, damp)
    weights = np.array(w, dtype=np.float64)
    scale = np.asarray(scale, dtype=np.float64)
    codes = np.zeros(weights.shape, dtype=qtype.numpy)

    def nearest(row: int, pending: np.ndarray) -> np.ndarray:
        q = np.clip(round_half_even(pending[:, 0] / scale) + zero_point, qtype.qmin, qtype.qmax)
        codes[:, row] = q
        return (q - zero_point) * scale

    _optimal_brain_rounding(weights, upper, nearest, CHUNK_ROWS)
    return codes


def assign_codebook_gptq(w: np.ndarray, gram: np.ndarray, codebook: np.ndarray, scales: np.ndarray,
                         damp: float = 0.01) -> np.ndarray:
    """Indices (G×K×N, int64) into the sorted ``codebook`` for ``w`` (G×K×N: G groups of a
    K×N weight), weight (g, k, n) standing for ``codebook[index] · scales[g, n]`` (``scales``
    G×N, ones for one codebook per tensor), chosen row by row by GPTQ against ``gram``
    (G×K×K) instead of each weight on its own. Weights that are exact zeros (pruned) stay on
    the codebook's 0.0 entry and no other weight goes to it, as in :func:`nearest_entries`.

    Exact limit: with a diagonal ``gram`` no error moves between rows and the indices are
    those of the nearest entries; weights already on the codebook keep their entries."""
    upper = _inverse_factor(gram, damp)
    weights = np.array(w, dtype=np.float64)
    zeros = weights == 0
    entries = np.asarray(codebook, dtype=np.float64)
    scales = np.asarray(scales, dtype=np.float64)
    indices = np.zeros(weights.shape, dtype=np.int64)
    has_zero = bool(zeros.any())

    def nearest(row: int, pending: np.ndarray) -> np.ndarray:
        values = pending[:, 0] / scales
        chosen = nearest_entries(values.ravel(), entries, zeros[:, row].ravel() if has_zero else None)
        indices[:, row] = chosen.reshape(values.shape)
        return entries[indices[:, row]] * scales

    _optimal_brain_rounding(weights, upper, nearest, CHUNK_ROWS)
    return indices


def output_error(delta: np.ndarray, gram: np.ndarray) -> float:
    """Σ_g tr(Δ_gᵀ·H_g·Δ_g): the squared change of the layer's output on the calibration
    inputs that a weight change ``delta`` (G×K×N) causes, with ``gram`` = H (G×K×K)."""
    d = np.asarray(delta, dtype=np.float64)
    return float(np.einsum("gkn,gkn->", d, np.matmul(gram, d)))


def quantize_blocks_gptq(w: np.ndarray, gram: np.ndarray, block_size: int, qtype: QType, symmetric: bool,
                         damp: float = 0.01) -> Blocks:
    """``w`` (K×N) quantized in blocks of ``block_size`` along K by GPTQ against the input
    Gram matrix ``gram`` (K×K, :func:`input_gram`); ``damp`` × the mean of its diagonal is
    added to it. Inputs that are always zero (zero diagonal) are rounded to nearest. Each block's
    scale and zero point are set from the rows as they are when the block's first row comes
    up, so the codes stay on the same grid MatMulNBits reads.

    Exact limit: with a diagonal ``gram`` no error moves between rows, and the codes, scales
    and zero points are those of round-to-nearest (:func:`quantize_blocks`)."""
    k, n = w.shape
    n_blocks = -(-k // block_size)
    rows = n_blocks * block_size
    weights = np.zeros((1, rows, n))
    weights[0, :k] = w
    hessian = np.eye(rows)[None].copy()
    hessian[0, :k, :k] = gram
    upper = _inverse_factor(hessian, damp)
    codes = np.zeros((rows, n))
    scales = np.zeros((n_blocks, n), dtype=np.float32)
    zero_points = np.zeros((n_blocks, n), dtype=qtype.numpy)
    grid = {}

    def on_block_grid(row: int, pending: np.ndarray) -> np.ndarray:
        if row % block_size == 0:
            block = row // block_size
            scales[block], zero_points[block], grid["lo"] = block_grid(pending[0, :block_size].T, qtype, symmetric)
            grid["scale"], grid["zero"] = scales[block].astype(np.float64), zero_points[block].astype(np.float64)
        q = np.clip(round_half_even(pending[0, 0] / grid["scale"]) + grid["zero"], grid["lo"], qtype.qmax)
        codes[row] = q
        return ((q - grid["zero"]) * grid["scale"])[None]

    _optimal_brain_rounding(weights, upper, on_block_grid, block_size * max(1, CHUNK_ROWS // block_size))
    q = codes.T.reshape(n, n_blocks, block_size).astype(qtype.numpy)
    return Blocks(q, np.ascontiguousarray(scales.T), np.ascontiguousarray(zero_points.T), k)


def round_weight_gptq(w: np.ndarray, gram: np.ndarray, scale, axis: int | None, zero_point: int, qtype: QType,
                      group: int = 1, damp: float = 0.01) -> np.ndarray:
    """Codes of a unit's weight on quantize-qdq's grid, by :func:`round_gptq`: a MatMul's
    K×N weight (``axis`` 1: one scale per column, or None) with a K×K ``gram``, or a 2-D
    Conv's N×C/G×kh×kw weight (``axis`` 0: one scale per filter, or None) with the G×K×K
    ``gram`` of :func:`conv_gram`. Same shape and layout as ``w``."""
    to_units, from_units = unit_layout(w.shape, group)
    units = to_units(w)
    outputs = w.shape[1] if w.ndim == 2 else w.shape[0]
    scales = np.broadcast_to(np.asarray(scale, dtype=np.float64), (outputs,)).reshape(units.shape[0], units.shape[2])
    return from_units(round_gptq(units, gram if gram.ndim == 3 else gram[None], scales, zero_point, qtype, damp))
