"""GPTQ on the MatMulNBits block grid and on quantize-qdq's per-channel grid: the exact limits
(round-to-nearest when no input is correlated with another; weights on the grid keep their
codes), what it buys on correlated inputs, its edge cases, and the Gram matrix of a Conv's
patches."""

from __future__ import annotations

import numpy as np
import pytest

from onnxcompress.gptq import input_gram, quantize_blocks_gptq, round_weight_gptq
from onnxcompress.quantization import INT4, INT8_NARROW, UINT4, UINT8_CENTRED, quantize_blocks

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


def test_inputs_that_are_always_zero_are_rounded_to_nearest():
    """The data says nothing about an input that is always zero: its weights are rounded to
    the nearest code of their block, not zeroed (held-out inputs may not be zero)."""
    k, n = 32, 8
    x = correlated_inputs(400, k, seed=6)
    x[:, 5] = 0.0
    gram = input_gram([x], k)
    w = np.random.default_rng(7).standard_normal((k, n))
    blocks = quantize_blocks_gptq(w, gram, 16, INT4, symmetric=True)
    out = blocks.dequantize()
    assert np.isfinite(out).all()
    scale = blocks.scale[:, 0]  # row 5 lies in the first block of every column
    codes = np.clip(np.round(w[5] / scale.astype(np.float64)), -7, 7)  # symmetric int4: [-7, 7]
    np.testing.assert_array_equal(out[5], codes.astype(np.float32) * scale)
    assert np.any(out[5] != 0.0)


def test_input_gram_sums_over_feeds_and_leading_axes():
    rng = np.random.default_rng(8)
    feeds = [rng.standard_normal((2, 5, 6)).astype(np.float32) for _ in range(3)]
    rows = np.concatenate([f.reshape(-1, 6) for f in feeds]).astype(np.float64)
    np.testing.assert_allclose(input_gram(feeds, 6), rows.T @ rows, rtol=1e-5)


# ---------------------------------------------------------------------------- quantize-qdq's grid


def _conv_output_energy(weight, x, **attrs) -> np.ndarray:
    """Σ y² per output channel of the Conv (no bias) onnxruntime computes."""
    from tests.graphs import conv_model, run

    model = conv_model(weight, size=x.shape[2:], bias=False, **attrs)
    y = run(model, {"x": x})[0].astype(np.float64)
    return (y ** 2).sum(axis=(0, 2, 3))


@pytest.mark.parametrize("attrs", [
    {},
    {"strides": [2, 2], "pads": [1, 0, 2, 1]},
    {"dilations": [2, 1], "pads": [2, 1, 2, 1], "group": 2},
    {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
    {"auto_pad": "SAME_LOWER", "strides": [2, 3]},
    {"auto_pad": "VALID", "group": 4},
])
def test_conv_gram_is_the_gram_of_the_patches_onnxruntime_convolves(attrs):
    """For every filter w_n of group g: Σ y_n² = w_nᵀ G_g w_n, the defining identity of the
    patches' Gram matrix, against onnxruntime's own Conv (strides, pads, dilations, groups,
    auto_pad); the rows it sums are the output positions onnxruntime computes."""
    from onnxcompress.qdq_rounding import _unit_gram
    from tests.graphs import conv_model, run

    rng = np.random.default_rng(0)
    group = attrs.get("group", 1)
    weight = rng.standard_normal((8, 8 // group, 3, 2)).astype(np.float32)
    x = rng.standard_normal((2, 8, 9, 11)).astype(np.float32)
    node = next(iter(conv_model(weight, size=x.shape[2:], bias=False, **attrs).graph))
    gram, rows = _unit_gram(node, x)
    assert gram.shape == (group, weight[0].size, weight[0].size)
    y = run(conv_model(weight, size=x.shape[2:], bias=False, **attrs), {"x": x})[0]
    assert rows == y.shape[0] * y.shape[2] * y.shape[3]
    per_group = weight.reshape(group, 8 // group, -1)
    quadratic = np.einsum("gnk,gkl,gnl->gn", per_group, gram, per_group).reshape(-1)
    np.testing.assert_allclose(quadratic, _conv_output_energy(weight, x, **attrs), rtol=1e-5)


def _nearest(w, scale, axis, qtype=INT8_NARROW, zero=0):
    from onnxcompress.quantization import quantize

    return quantize(w, scale, zero, qtype, axis)


@pytest.mark.parametrize("qtype, zero", [(INT8_NARROW, 0), (UINT8_CENTRED, 128)])
def test_per_channel_gptq_with_a_diagonal_gram_is_round_to_nearest(qtype, zero):
    rng = np.random.default_rng(3)
    w = rng.standard_normal((40, 12))
    scale = np.abs(w).max(axis=0) / 127
    gram = np.diag(rng.uniform(0.5, 2.0, 40))
    codes = round_weight_gptq(w, gram, scale, 1, zero, qtype)
    np.testing.assert_array_equal(codes, _nearest(w, scale, 1, qtype, zero))
    # a grouped Conv (4 groups of 2 filters) with one diagonal Gram matrix per group
    conv = rng.standard_normal((8, 3, 2, 2))
    filters = np.abs(conv).reshape(8, -1).max(axis=1) / 127
    grams = np.stack([np.diag(rng.uniform(0.5, 2.0, 12)) for _ in range(4)])
    codes = round_weight_gptq(conv, grams, filters, 0, zero, qtype, group=4)
    np.testing.assert_array_equal(codes, _nearest(conv, filters, 0, qtype, zero))


def test_weights_already_on_the_grid_keep_their_codes():
    rng = np.random.default_rng(4)
    codes = rng.integers(-127, 128, (32, 6))
    scale = rng.uniform(0.01, 0.1, 6)
    w = codes * scale
    gram = input_gram([correlated_inputs(500, 32, seed=5)], 32)
    np.testing.assert_array_equal(round_weight_gptq(w, gram, scale, 1, 0, INT8_NARROW), codes)
    tensor = round_weight_gptq(codes * 0.05, gram, np.float32(0.05), None, 0, INT8_NARROW)  # per tensor
    np.testing.assert_array_equal(tensor, codes)


@pytest.mark.parametrize("group", [1, 4])
def test_per_channel_gptq_moves_the_output_less_than_round_to_nearest(group):
    """On correlated inputs, a Conv's output error on held-out patches: below 0.8 of nearest."""
    rng = np.random.default_rng(6)
    k = 4 * 3 * 3
    mix = np.eye(k) + 2.0 * rng.standard_normal((k, k)) / np.sqrt(k)
    train, held = (rng.standard_normal((group, 3000, k)) @ mix for _ in range(2))
    w = rng.standard_normal((8 * group, 4, 3, 3))
    scale = np.abs(w).reshape(len(w), -1).max(axis=1) / 127
    grams = np.einsum("gpk,gpl->gkl", train, train)
    gptq = round_weight_gptq(w, grams, scale, 0, 0, INT8_NARROW, group=group) * scale[:, None, None, None]
    rtn = _nearest(w, scale, 0) * scale[:, None, None, None]

    def error(q):
        delta = (w - q).reshape(group, 8, k)
        return np.linalg.norm(np.einsum("gpk,gnk->gpn", held, delta))

    assert error(gptq) < 0.8 * error(rtn)
