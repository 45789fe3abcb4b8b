"""GPTQ on the MatMulNBits block grid: its exact limit (round-to-nearest when no input is
correlated with another), what it buys on correlated inputs, and its edge cases."""

from __future__ import annotations

import numpy as np
import pytest

from onnxcompress.gptq import input_gram, quantize_blocks_gptq
from onnxcompress.quantization import INT4, UINT4, quantize_blocks

GRIDS = [(False, UINT4), (True, INT4)]


def correlated_inputs(rows: int, k: int, seed: int = 0, sample_seed: int | None = None) -> np.ndarray:
    """Rows x·M with M = I + a random mix fixed by ``seed``; ``sample_seed`` draws other rows
    from the same distribution."""
    rng = np.random.default_rng(seed)
    mix = np.eye(k) + 2.0 * rng.standard_normal((k, k)) / np.sqrt(k)
    samples = rng if sample_seed is None else np.random.default_rng(sample_seed)
    return (samples.standard_normal((rows, k)) @ mix).astype(np.float32)


@pytest.mark.parametrize("symmetric, qtype", GRIDS)
@pytest.mark.parametrize("k", [96, 100])  # 100: the last block is padded
def test_a_diagonal_gram_gives_round_to_nearest(symmetric, qtype, k):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((k, 24)) * 0.1
    gram = np.diag(rng.uniform(0.5, 2.0, k))
    expected = quantize_blocks(w, 32, qtype, symmetric)
    got = quantize_blocks_gptq(w, gram, 32, qtype, symmetric)
    assert got.rows == k
    np.testing.assert_array_equal(got.q, expected.q)
    np.testing.assert_array_equal(got.scale, expected.scale)
    np.testing.assert_array_equal(got.zero_point, expected.zero_point)


@pytest.mark.parametrize("symmetric, qtype", GRIDS)
def test_gptq_moves_the_output_less_than_round_to_nearest(symmetric, qtype):
    k, n = 128, 64
    x = correlated_inputs(2000, k)
    w = np.random.default_rng(2).standard_normal((k, n)) * 0.05
    rtn = quantize_blocks(w, 32, qtype, symmetric).dequantize()
    gptq = quantize_blocks_gptq(w, input_gram([x], k), 32, qtype, symmetric).dequantize()
    rtn_error, gptq_error = np.linalg.norm(x @ (w - rtn)), np.linalg.norm(x @ (w - gptq))
    assert gptq_error < 0.8 * rtn_error
    # Held-out inputs from the same distribution: the gain is not an overfit to the rows.
    held = correlated_inputs(2000, k, seed=0, sample_seed=99)
    assert np.linalg.norm(held @ (w - gptq)) < 0.8 * np.linalg.norm(held @ (w - rtn))


def test_codes_stay_on_the_block_grid():
    """Every code is in range and every block's scale and zero point are those the weights it
    ends up with would get: the dequantized blocks are a valid MatMulNBits weight."""
    k, n = 64, 16
    x = correlated_inputs(500, k, seed=3)
    w = np.random.default_rng(4).standard_normal((k, n))
    blocks = quantize_blocks_gptq(w, input_gram([x], k), 32, UINT4, symmetric=False)
    assert blocks.q.dtype == np.uint8 and blocks.q.min() >= 0 and blocks.q.max() <= 15
    assert blocks.q.shape == (n, 2, 32) and blocks.scale.shape == (n, 2) == blocks.zero_point.shape
    assert np.all(blocks.scale > 0)


def test_inputs_that_are_always_zero_get_zero_weights():
    k, n = 32, 8
    x = correlated_inputs(400, k, seed=6)
    x[:, 5] = 0.0
    gram = input_gram([x], k)
    w = np.random.default_rng(7).standard_normal((k, n))
    out = quantize_blocks_gptq(w, gram, 16, INT4, symmetric=True).dequantize()
    assert np.all(out[5] == 0.0)
    assert np.isfinite(out).all()


def test_input_gram_sums_over_feeds_and_leading_axes():
    rng = np.random.default_rng(8)
    feeds = [rng.standard_normal((2, 5, 6)).astype(np.float32) for _ in range(3)]
    rows = np.concatenate([f.reshape(-1, 6) for f in feeds]).astype(np.float64)
    np.testing.assert_allclose(input_gram(feeds, 6), rows.T @ rows, rtol=1e-5)
