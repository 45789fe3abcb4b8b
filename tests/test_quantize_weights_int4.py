"""quantize-weights-int4: the block layout onnxruntime reads, the exact limit, bias folding,
every refusal and the options."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnxcompress.passes.quantize_weights_int4 import QuantizeWeightsInt4, QuantizeWeightsInt4Options

import onnxcompress
from onnxcompress.errors import CalibrationError, OptionError
from onnxcompress.options import parse_options
from onnxcompress.pipeline import Pipeline
from onnxcompress.quantization import INT4, UINT4, pack_nibbles, quantize_blocks
from tests.graphs import (
    Builder,
    assert_close,
    assert_left_alone,
    check,
    find_node,
    max_rel_diff,
    ops,
    random_feeds,
    records,
    run,
)

K, N = 96, 24


def on_block_grid(k: int, n: int, block: int, symmetric: bool, seed: int = 0) -> np.ndarray:
    """A K×N weight whose blocks of ``block`` rows per column lie on their 4-bit grid, each
    block reaching both ends of it (0 and 15, or -7 and 7)."""
    rng = np.random.default_rng(seed)
    blocks = -(-k // block)
    scale = rng.uniform(0.01, 0.1, (blocks, n)).astype(np.float32)
    if symmetric:
        codes = rng.integers(-7, 8, (blocks, block, n))
        codes[:, 0], codes[:, 1] = -7, 7
        zero = np.zeros((blocks, n))
    else:
        codes = rng.integers(0, 16, (blocks, block, n))
        codes[:, 0], codes[:, 1] = 0, 15
        zero = rng.integers(1, 15, (blocks, n))
    w = (codes - zero[:, None]) * scale[:, None]
    return w.reshape(blocks * block, n)[:k].astype(np.float32)


def matmul_model(w: np.ndarray, bias=None, name="mm") -> ir.Model:
    """x[B, T, K] @ W (+ bias) → y."""
    b = Builder()
    x = b.input("x", ["B", "T", w.shape[0]])
    h = b.op("MatMul", [x, b.init("W", w)], name=name, output_names=["y" if bias is None else "h"])
    if bias is not None:
        h = b.op("Add", [h, b.init("bias", bias)], name="add", output_names=["y"])
    return b.model([h])


def apply(model: ir.Model, **options) -> QuantizeWeightsInt4:
    p = QuantizeWeightsInt4(QuantizeWeightsInt4Options(**options))
    p(model)
    return p


def assert_untouched(model: ir.Model, reason: str, node: str = "mm", **options) -> None:
    assert_left_alone(QuantizeWeightsInt4(QuantizeWeightsInt4Options(**options)), model, reason, node)


# ---------------------------------------------------------------------------- exact limit


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("k, block", [(96, 32), (80, 32), (96, 16), (256, 128), (20, 32)])
def test_weight_on_its_block_grid_reproduces_the_float_matmul(symmetric, k, block):
    w = on_block_grid(k, N, block, symmetric)
    model = matmul_model(w)
    feeds = random_feeds(model, seed=1)
    expected = run(model, feeds)
    p = apply(model, block_size=block, symmetric=symmetric, accuracy_level=0)
    assert [r.action for r in records(p)] == ["rewritten"]
    node = find_node(model, "mm")
    assert node.op_type == "MatMulNBits" and node.domain == "com.microsoft"
    assert len(node.inputs) == (3 if symmetric else 4)
    blocks = -(-k // block)
    assert list(node.inputs[1].const_value.shape) == [N, blocks, block // 2]
    assert list(node.inputs[2].const_value.shape) == [N * blocks]
    if not symmetric:
        assert list(node.inputs[3].const_value.shape) == [N * -(-blocks // 2)]
    check(model)
    assert_close(expected, run(model, feeds), rel=1e-5)


def test_onnxruntime_computes_with_the_dequantized_blocks():
    """Random weights: MatMulNBits at accuracy_level 0 equals the float product by the
    weight that quantize_blocks says the codes stand for."""
    w = np.random.default_rng(2).standard_normal((K, N)).astype(np.float32)
    model = matmul_model(w)
    feeds = random_feeds(model, seed=1)
    dequantized = quantize_blocks(w, 32, UINT4, symmetric=False).dequantize()
    expected = [feeds["x"] @ dequantized]
    apply(model, accuracy_level=0)
    assert_close(expected, run(model, feeds), rel=1e-5)


def test_accuracy_level_4_quantizes_the_activations():
    w = on_block_grid(K, N, 32, False)
    model = matmul_model(w)
    feeds = random_feeds(model, seed=1)
    expected = run(model, feeds)
    p = apply(model)
    assert find_node(model, "mm").attributes.get_int("accuracy_level") == 4
    # int8 activations per block: about 1/127 of the largest |x| per block, not exact
    assert 0 < max_rel_diff(expected, run(model, feeds)) < 2e-2
    assert "uint4 with zero points, blocks of 32 along K (3 per column)" in records(p)[0].detail


def test_block_codes_and_packing():
    w = on_block_grid(40, 3, 16, False)
    blocks = quantize_blocks(w, 16, UINT4, symmetric=False)
    assert blocks.q.shape == (3, 3, 16) and blocks.scale.shape == (3, 3)
    np.testing.assert_allclose(blocks.dequantize(), w, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(pack_nibbles(np.array([[1, 2, 3], [15, 0, 7]])), [[0x21, 0x03], [0x0F, 0x07]])
    signed = quantize_blocks(on_block_grid(40, 3, 16, True), 16, INT4, symmetric=True)
    assert signed.q.min() == -7 and signed.q.max() == 7 and not signed.zero_point.any()


# ---------------------------------------------------------------------------- GPTQ


def correlated_model_and_feeds(k=K, n=N, count=8, seed=3):
    """A MatMul whose inputs are strongly correlated across K (where GPTQ has something to
    move errors along), and calibration feeds for it."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((k, n)) * 0.1).astype(np.float32)
    mix = np.eye(k) + 2.0 * rng.standard_normal((k, k)) / np.sqrt(k)
    feeds = [{"x": (rng.standard_normal((2, 16, k)) @ mix).astype(np.float32)} for _ in range(count)]
    return matmul_model(w), feeds


def test_gptq_moves_the_output_less_than_round_to_nearest():
    model, feeds = correlated_model_and_feeds()
    held_out = correlated_model_and_feeds(seed=3, count=16)[1][8:]
    expected = [run(model, f)[0] for f in held_out]

    def error(pipeline):
        result = onnxcompress.compress(model, pipeline, calibration=feeds)
        assert sum(n.op_type == "MatMulNBits" for n in result.model.graph) == 1
        return sum(float(np.linalg.norm(run(result.model, f)[0] - e)) for f, e in zip(held_out, expected)), result

    rtn, _ = error("quantize-weights-int4{accuracy_level=0}")
    gptq, result = error("quantize-weights-int4{accuracy_level=0,method=gptq}")
    assert gptq < 0.8 * rtn
    (entry,) = [p for p in result.report.passes if p.name == "quantize-weights-int4"]
    assert "GPTQ on the calibration inputs" in entry.records[0].detail


def test_gptq_per_node_and_the_codes_onnxruntime_reads():
    """method per node; the GPTQ node's MatMulNBits computes with the blocks GPTQ chose."""
    from onnxcompress.gptq import input_gram, quantize_blocks_gptq

    model, feeds = correlated_model_and_feeds()
    w = find_node(model, "mm").inputs[1].const_value.numpy()
    gram = input_gram([f["x"] for f in feeds], K)
    dequantized = quantize_blocks_gptq(w, gram, 32, UINT4, symmetric=False).dequantize()
    result = onnxcompress.compress(model, "quantize-weights-int4{accuracy_level=0,@mm{method=gptq}}",
                                   calibration=feeds)
    assert_close([feeds[0]["x"] @ dequantized], run(result.model, feeds[0]), rel=1e-5)


def test_gptq_without_calibration_is_one_clear_error():
    model, _ = correlated_model_and_feeds()
    before = ir.to_proto(model).SerializeToString()
    with pytest.raises(CalibrationError, match="method=gptq needs calibration data"):
        onnxcompress.compress(model, "quantize-weights-int4{method=gptq}")
    assert ir.to_proto(model).SerializeToString() == before


# ---------------------------------------------------------------------------- bias folding


def test_bias_add_is_folded_into_matmulnbits():
    w = on_block_grid(K, N, 32, False)
    bias = np.random.default_rng(3).standard_normal(N).astype(np.float32)
    model = matmul_model(w, bias)
    feeds = random_feeds(model, seed=1)
    expected = run(model, feeds)
    p = apply(model, accuracy_level=0)
    assert ops(model) == ["MatMulNBits"]
    node = find_node(model, "mm")
    assert node.inputs[4] is None and node.inputs[5].name == "bias"
    assert model.graph.outputs[0].name == "y" and "bias Add 'add' folded" in records(p)[0].detail
    check(model)
    assert_close(expected, run(model, feeds), rel=1e-5)


def test_gemm_trans_b_and_c():
    w = on_block_grid(K, N, 32, True)
    c = np.random.default_rng(4).standard_normal(N).astype(np.float32)
    b = Builder()
    x = b.input("x", ["M", K])
    y = b.op("Gemm", [x, b.init("W", np.ascontiguousarray(w.T)), b.init("C", c)], name="gemm",
             output_names=["y"], transB=1)
    model = b.model([y])
    feeds = random_feeds(model, seed=1)
    expected = run(model, feeds)
    p = apply(model, symmetric=True, accuracy_level=0)
    assert ops(model) == ["MatMulNBits"] and "Gemm C as bias" in records(p)[0].detail
    check(model)
    assert_close(expected, run(model, feeds), rel=1e-5)


# ---------------------------------------------------------------------------- sizes


def test_a_384_wide_weight_shrinks_more_than_6x():
    model = matmul_model(np.random.default_rng(5).standard_normal((384, 384)).astype(np.float32))
    p = apply(model)
    assert records(p)[0].detail == (
        "uint4 with zero points, blocks of 32 along K (12 per column), weight 384×384: "
        "589,824 → 94,464 bytes (5.12 bits per weight)")
    stored = sum(v.const_value.nbytes for v in model.graph.initializers.values())
    assert stored == 94_464


def test_candidates_list_what_would_be_rewritten():
    model = matmul_model(on_block_grid(K, N, 32, False))
    found = QuantizeWeightsInt4().candidates(model)
    assert [(c.node, c.op_type) for c in found] == [("mm", "MatMul")]
    assert "9,216 → 1,488 bytes" in found[0].what
    assert ops(model) == ["MatMul"]


# ---------------------------------------------------------------------------- refusals


def test_small_k_padded_to_a_block_that_would_grow_is_refused():
    b = Builder()
    x = b.input("x", ["B", 2])
    y = b.op("MatMul", [x, b.init("W", np.ones((2, N), np.float32))], name="mm", output_names=["y"])
    assert_untouched(b.model([y]), "would not shrink: the 2×24 weight in blocks of 32 takes 504 bytes "
                                   "quantized, 192 as float")


def test_attention_product_is_refused():
    b = Builder()
    q = b.input("q", ["B", 4, 8])
    k = b.input("k", ["B", 8, 4])
    y = b.op("MatMul", [q, b.op("Transpose", [k], name="t", perm=[0, 1, 2])], name="mm", output_names=["y"])
    assert_untouched(b.model([y]), "is not constant (computed by Transpose 't')")


def test_weight_refusals():
    b = Builder()
    x = b.input("x", ["B", 3, K])
    y = b.op("MatMul", [x, b.init("W", np.ones((3, K, N), np.float32))], name="mm", output_names=["y"])
    assert_untouched(b.model([y]), "is 3-D [3, 96, 24]")
    assert_untouched(matmul_model(np.ones((K, N), np.float32), name="lm_head"), "excluded by exclude=head",
                     node="lm_head", exclude="head")
    assert_untouched(matmul_model(np.ones((K, N), np.float32)), "fewer than min_elements=4,096", min_elements=4096)


@pytest.mark.parametrize("attrs, reason", [({"transA": 1}, "transA=1"), ({"alpha": 0.5}, "alpha=0.5")])
def test_gemm_refusals(attrs, reason):
    b = Builder()
    x = b.input("x", [K, "M"] if attrs.get("transA") else ["M", K])
    y = b.op("Gemm", [x, b.init("W", np.ones((K, N), np.float32))], name="gemm", output_names=["y"], **attrs)
    assert_untouched(b.model([y]), reason, node="gemm")


def test_shared_weight_read_by_another_kind_of_node_is_refused():
    b = Builder()
    x = b.input("x", ["B", K])
    weight = b.init("W", np.ones((K, N), np.float32))
    y = b.op("MatMul", [x, weight], name="mm", output_names=["y"])
    z = b.op("ReduceSum", [weight], name="sum", output_names=["z"], keepdims=0)
    assert_untouched(b.model([y, z]), "is also read by 'sum' (ReduceSum)")


def test_already_quantized_model_is_left_alone():
    w = on_block_grid(K, N, 32, False)
    model = matmul_model(w)
    apply(model)
    snapshot = ir.to_onnx_text(model)
    p = QuantizeWeightsInt4()
    assert not p(model).modified and ir.to_onnx_text(model) == snapshot
    assert "already quantized (1 MatMulNBits)" in p.notes[0]


# ---------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    "values, message",
    [
        ({"block_size": "24"}, "block_size' must be a power of two, 16 or more"),
        ({"block_size": "8"}, "block_size' must be a power of two, 16 or more"),
        ({"accuracy_level": "5"}, "accuracy_level' must be 0, 1, 2, 3 or 4"),
        ({"min_elements": "-3"}, "min_elements' must be 0 or more"),
        ({"exclude": "[a"}, "not a valid regular expression"),
        ({"damp": "0"}, "damp' must be in \\(0, 1\\]"),
        ({"method": "awq"}, "method"),
    ],
)
def test_bad_options(values, message):
    with pytest.raises(OptionError, match=message):
        parse_options(QuantizeWeightsInt4Options, values)


def test_pipeline_text_round_trips():
    text = "lift-constants,quantize-weights-int4{block_size=128,symmetric=true,accuracy_level=0}"
    assert str(Pipeline.parse(text)) == text
