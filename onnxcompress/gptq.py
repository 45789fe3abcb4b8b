"""GPTQ (Frantar et al. 2023, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers") on the block grid of :func:`onnxcompress.quantization.quantize_blocks`.

Round-to-nearest quantizes every weight on its own. GPTQ quantizes the K rows of a K×N
weight one after another and, after each row, moves the rows not yet quantized so that the
layer's output on the calibration inputs X changes as little as possible: with H = XᵀX + λI
and U the upper Cholesky factor of H⁻¹, row i's error e = (w_i − q_i) / U_ii is taken off
the later rows as U_i,j · e (the optimal brain surgeon update). Each block's scale and zero
point are set from the rows as they are when the block's first row comes up, so the codes
stay on the same grid MatMulNBits reads. Updates to rows past the current chunk are applied
at once per chunk (the paper's lazy batch updates), so the Python loop runs over rows, not
over row × later row.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

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


def quantize_blocks_gptq(w: np.ndarray, gram: np.ndarray, block_size: int, qtype: QType, symmetric: bool,
                         damp: float = 0.01) -> Blocks:
    """``w`` (K×N) quantized in blocks of ``block_size`` along K by GPTQ against the input
    Gram matrix ``gram`` (K×K, :func:`input_gram`); ``damp`` × the mean of its diagonal is
    added to it. Inputs that are always zero (zero diagonal) get zero weights.

    Exact limit: with a diagonal ``gram`` no error moves between rows, and the codes, scales
    and zero points are those of round-to-nearest (:func:`quantize_blocks`)."""
    k, n = w.shape
    n_blocks = -(-k // block_size)
    rows = n_blocks * block_size
    weights = np.zeros((rows, n))
    weights[:k] = w
    hessian = np.eye(rows)
    hessian[:k, :k] = gram
    dead = np.diag(hessian) == 0
    hessian[dead, dead] = 1.0
    weights[dead] = 0.0
    hessian[np.diag_indices(rows)] += damp * float(np.mean(np.diag(hessian)))
    upper = np.linalg.cholesky(np.linalg.inv(hessian)).T  # H⁻¹ = UᵀU
    codes = np.zeros((rows, n))
    scales = np.zeros((n_blocks, n), dtype=np.float32)
    zero_points = np.zeros((n_blocks, n), dtype=qtype.numpy)
    chunk = block_size * max(1, CHUNK_ROWS // block_size)
    for start in range(0, rows, chunk):
        end = min(start + chunk, rows)
        part, errors = weights[start:end].copy(), np.zeros((end - start, n))
        for i in range(end - start):
            row = start + i
            if row % block_size == 0:
                block = row // block_size
                scales[block], zero_points[block], lo = block_grid(part[i:i + block_size].T, qtype, symmetric)
                scale = scales[block].astype(np.float64)
                zero = zero_points[block].astype(np.float64)
            q = np.clip(round_half_even(part[i] / scale) + zero, lo, qtype.qmax)
            codes[row] = q
            errors[i] = (part[i] - (q - zero) * scale) / upper[row, row]
            part[i + 1:] -= np.outer(upper[row, row + 1:end], errors[i])
        weights[end:] -= upper[start:end, end:].T @ errors
    q = codes.T.reshape(n, n_blocks, block_size).astype(qtype.numpy)
    return Blocks(q, np.ascontiguousarray(scales.T), np.ascontiguousarray(zero_points.T), k)
