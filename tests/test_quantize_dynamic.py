"""quantize-dynamic: the integer reference, the exact limits, bias folding, tables, every refusal.

The reference of DynamicQuantizeMatMul is computed in numpy: A quantized to uint8 as
DynamicQuantizeLinear does (checked against onnxruntime's own DynamicQuantizeLinear), the
product in int64, times ``a_scale · b_scale`` in float32.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnxcompress import executed
from onnxcompress.passes import quantize_dynamic
from onnxcompress.passes.quantize_dynamic import QuantizeDynamic, QuantizeDynamicOptions, stored_codes

from onnxcompress.errors import OptionError
from onnxcompress.options import parse_options
from onnxcompress.pipeline import Pipeline
from onnxcompress.quantization import dynamic_quantize
from onnxcompress.runtime import make_session
from tests.graphs import (
    Builder,
    assert_close,
    assert_left_alone,
    check,
    clone,
    find_node,
    ops,
    random_feeds,
    records,
    run,
)

K, N = 48, 20


def on_int8_grid(k: int, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(w, q, scale)``: a weight whose columns lie on their int8 grid, each reaching ±127."""
    rng = np.random.default_rng(seed)
    q = rng.integers(-127, 128, (k, n))
    q[rng.integers(0, k, n), np.arange(n)] = 127 * rng.choice([-1, 1], n)
    scale = rng.uniform(0.001, 0.02, n).astype(np.float32)
    return (q * scale).astype(np.float32), q, scale


def on_uint8_grid(shape, lo: float, hi: float, seed: int = 0) -> np.ndarray:
    """Values on the uint8 grid DynamicQuantizeLinear picks for them (both ends present)."""
    rng = np.random.default_rng(seed)
    scale = np.float32((np.float32(hi) - np.float32(lo)) / np.float32(255))
    zero_point = int(np.rint(-lo / scale))
    codes = rng.integers(0, 256, shape)
    codes.flat[0], codes.flat[1] = 0, 255
    return ((codes - zero_point) * scale).astype(np.float32)


def reference(x: np.ndarray, q: np.ndarray, b_scale: np.ndarray, bias=None) -> np.ndarray:
    aq, a_scale, a_zero = dynamic_quantize(x)
    acc = (aq.astype(np.int64) - int(a_zero)) @ np.asarray(q, np.int64)
    y = acc.astype(np.float32) * (np.float32(a_scale) * np.asarray(b_scale, np.float32))
    return y if bias is None else y + bias


def matmul_model(w: np.ndarray, bias=None, bias_first=False, x_shape=("B", "T", None), name="mm") -> ir.Model:
    """x[B, T, K] @ W (+ bias) → y."""
    b = Builder()
    x = b.input("x", [d if d is not None else w.shape[0] for d in x_shape])
    h = b.op("MatMul", [x, b.init("W", w)], name=name, output_names=["y" if bias is None else "h"])
    if bias is not None:
        c = b.init("bias", bias)
        h = b.op("Add", [c, h] if bias_first else [h, c], name="add", output_names=["y"])
    return b.model([h])


def gemm_model(w, c=None, trans_a=0, trans_b=0, alpha=1.0, beta=1.0) -> ir.Model:
    k, n = (w.shape[1], w.shape[0]) if trans_b else w.shape
    b = Builder()
    x = b.input("x", [k, "M"] if trans_a else ["M", k])
    inputs = [x, b.init("W", w)] + ([b.init("C", c)] if c is not None else [])
    y = b.op("Gemm", inputs, name="gemm", output_names=["y"], transA=trans_a, transB=trans_b, alpha=alpha, beta=beta)
    return b.model([y])


def apply(model: ir.Model, **options) -> QuantizeDynamic:
    """Run the pass; storage uint8 unless given, so the grid does not depend on this CPU (``auto``
    has its own tests)."""
    p = QuantizeDynamic(QuantizeDynamicOptions(**{"storage": "uint8", **options}))
    p(model)
    return p


def assert_untouched(model: ir.Model, reason: str, node: str = "mm", **options) -> None:
    assert_left_alone(QuantizeDynamic(QuantizeDynamicOptions(**{"storage": "uint8", **options})), model, reason, node)


def feeds_for(model, seed=1):
    return random_feeds(model, seed=seed, batch=3)


# ---------------------------------------------------------------------------- the grid math


@pytest.mark.parametrize("kind", ["signed", "positive", "negative", "zero"])
def test_dynamic_quantize_matches_onnxruntime(kind):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 37)).astype(np.float32) * 3
    x = {"signed": x, "positive": np.abs(x), "negative": -np.abs(x), "zero": np.zeros_like(x)}[kind]
    b = Builder()
    inp = b.input("x", [4, 37])
    q, s, z = b.op("DynamicQuantizeLinear", [inp], name="dql", num_outputs=3, output_names=["q", "s", "z"])
    q.dtype, s.dtype, z.dtype = ir.DataType.UINT8, ir.DataType.FLOAT, ir.DataType.UINT8
    model = b.model([q, s, z])
    ort_q, ort_s, ort_z = run(model, {"x": x})
    ref_q, ref_s, ref_z = dynamic_quantize(x)
    assert ort_s == ref_s and ort_z == ref_z
    np.testing.assert_array_equal(ort_q, ref_q)


# ---------------------------------------------------------------------------- exact limits


@pytest.mark.parametrize("storage", ["uint8", "int8"])
def test_weight_on_its_grid_gives_the_integer_reference(storage):
    w, q, scale = on_int8_grid(K - 2, N)
    # The extreme activations (codes 0 and 255) meet two zero rows of W and every other code
    # is at most 128: no pair of products can leave int16, so onnxruntime's uint8×int8
    # kernel does not saturate on any CPU either.
    w, q = np.pad(w, ((2, 0), (0, 0))), np.pad(q, ((2, 0), (0, 0)))
    model = matmul_model(w)
    x = np.random.default_rng(1).uniform(-1, 0.0, (2, 3, K)).astype(np.float32)
    x[..., 0], x[0, 0, 1] = -1.0, 1.0  # range [-1, 1]: zero point 128
    p = apply(model, storage=storage)
    assert [r.action for r in records(p)] == ["rewritten"]
    node = find_node(model, "mm")
    assert node.op_type == "DynamicQuantizeMatMul" and node.domain == "com.microsoft"
    assert len(node.inputs) == (4 if storage == "uint8" else 3)
    check(model)
    np.testing.assert_allclose(run(model, {"x": x})[0], reference(x, q, scale), rtol=1e-6, atol=1e-6)


def test_uint8_storage_is_exact_where_int16_pairs_would_overflow():
    w, q, scale = on_int8_grid(64, 8)
    w, q = np.abs(w), np.abs(q)  # every product at its largest and of one sign
    model = matmul_model(w)
    x = on_uint8_grid((2, 3, 64), 0.0, 2.0)
    apply(model)
    np.testing.assert_allclose(run(model, {"x": x})[0], reference(x, q, scale), rtol=1e-6)


def test_int7_storage_is_exact_where_int16_pairs_of_int8_products_would_overflow():
    """Every product at its largest and of one sign: int8 codes of 127 would overflow int16 in
    pairs on a CPU without VNNI; int7 codes (at most 63) cannot, on any CPU."""
    rng = np.random.default_rng(6)
    q = rng.integers(0, 64, (64, 8))
    q[0] = 63  # each column reaches the top of the 7-bit grid
    scale = rng.uniform(0.001, 0.02, 8).astype(np.float32)
    model = matmul_model((q * scale).astype(np.float32))
    x = on_uint8_grid((2, 3, 64), 0.0, 2.0)
    p = apply(model, storage="int7")
    node = find_node(model, "mm")
    assert len(node.inputs) == 3  # int8 codes, no zero point
    assert node.inputs[1].const_value.numpy().dtype == np.int8 and int(np.abs(node.inputs[1].const_value.numpy()).max()) == 63
    assert records(p)[0].detail.startswith("int7 per-column (8 scales), stored as int8")
    np.testing.assert_allclose(run(model, {"x": x})[0], reference(x, q, scale), rtol=1e-6)


@pytest.mark.parametrize("grid, top", [("int7", 63), ("int8", 127)])
def test_auto_storage_stores_the_grid_the_fast_kernel_runs_exactly(monkeypatch, grid, top):
    monkeypatch.setattr(quantize_dynamic, "exact_u8s8_grid", lambda: grid)
    w, _, _ = on_int8_grid(K, N)
    model = matmul_model(w)
    p = QuantizeDynamic(QuantizeDynamicOptions())
    p(model)
    codes = find_node(model, "mm").inputs[1].const_value.numpy()
    assert codes.dtype == np.int8 and int(np.abs(codes).max()) == top
    assert len(find_node(model, "mm").inputs) == 3  # no zero point
    assert records(p)[0].detail.startswith(f"{grid} per-column ({N} scales), stored as int8")


def test_auto_storage_reproduces_the_storage_it_stands_for():
    w = np.random.default_rng(8).standard_normal((K, N)).astype(np.float32)
    by_auto, explicit = matmul_model(w), matmul_model(w)
    QuantizeDynamic(QuantizeDynamicOptions(storage="auto"))(by_auto)
    QuantizeDynamic(QuantizeDynamicOptions(storage=stored_codes("auto")))(explicit)
    assert ir.to_proto(by_auto).SerializeToString() == ir.to_proto(explicit).SerializeToString()


def test_input_and_weight_on_their_grids_give_the_float_product():
    w, _, _ = on_int8_grid(K, N, seed=2)
    model = matmul_model(w)
    x = on_uint8_grid((2, 3, K), -1.3, 2.1, seed=4)
    expected = (x.astype(np.float64) @ w.astype(np.float64)).astype(np.float32)
    apply(model)
    assert_close([expected], run(model, {"x": x}), rel=1e-5)


def test_per_tensor_scale():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((K, N)).astype(np.float32)
    model = matmul_model(w)
    x = rng.standard_normal((2, 3, K)).astype(np.float32)
    p = apply(model, per_channel=False)
    scale = np.float32(np.abs(w).max() / 127)
    q = np.clip(np.rint(w / scale), -127, 127)
    np.testing.assert_allclose(run(model, {"x": x})[0], reference(x, q, np.full(N, scale)), rtol=1e-6, atol=1e-6)
    assert "per-tensor (1 scale)" in records(p)[0].detail


def test_random_weights_stay_within_the_quantization_error():
    rng = np.random.default_rng(6)
    w = rng.standard_normal((K, N)).astype(np.float32)
    model = matmul_model(w)
    x = rng.standard_normal((2, 3, K)).astype(np.float32)
    before = run(model, {"x": x})[0]
    apply(model)
    after = run(model, {"x": x})[0]
    # |error| ≤ Σ|x|·(half a weight step) + Σ|w|·(half an activation step), per output
    _, a_scale, _ = dynamic_quantize(x)
    w_step = np.abs(w).max(axis=0) / 127
    bound = (0.5 * (np.abs(x) @ np.ones((K, N)) * w_step + a_scale * np.abs(w).sum(axis=0))
             + 0.25 * K * a_scale * w_step + 1e-5)
    assert np.all(np.abs(after - before) <= bound)


# ---------------------------------------------------------------------------- bias folding


def _unfolded(model: ir.Model) -> ir.Model:
    """The folded model with its bias moved back into a separate Add."""
    copy = clone(model)
    node = next(n for n in copy.graph if n.op_type == "DynamicQuantizeMatMul")
    bias = node.inputs[4]
    out = node.outputs[0]
    name = out.name
    node.resize_inputs(4)
    uses = list(out.uses())
    add = ir.node("Add", [out, bias], name="unfolded_add")
    copy.graph.insert_after(node, add)
    for use in uses:
        use.node.replace_input_with(use.idx, add.outputs[0])
    copy.graph.outputs[:] = [add.outputs[0] if v is out else v for v in copy.graph.outputs]
    out.name, add.outputs[0].name = "mm_out", name
    add.outputs[0].type, add.outputs[0].shape = out.type, out.shape
    return copy


@pytest.mark.parametrize("bias_first", [False, True])
def test_bias_add_is_folded_and_changes_nothing(bias_first):
    w, _, _ = on_int8_grid(K, N)
    bias = np.random.default_rng(7).standard_normal(N).astype(np.float32)
    model = matmul_model(w, bias, bias_first)
    feeds = feeds_for(model)
    p = apply(model)
    assert ops(model) == ["DynamicQuantizeMatMul"]
    assert model.graph.outputs[0].name == "y"
    assert "bias Add 'add' folded" in records(p)[0].detail
    check(model)
    assert_close(run(_unfolded(model), feeds), run(model, feeds), rel=1e-6)


def test_bias_add_is_not_folded_when_the_product_is_read_elsewhere():
    w, _, _ = on_int8_grid(K, N)
    b = Builder()
    x = b.input("x", ["B", K])
    h = b.op("MatMul", [x, b.init("W", w)], name="mm", output_names=["h"])
    y = b.op("Add", [h, b.init("bias", np.ones(N, np.float32))], name="add", output_names=["y"])
    model = b.model([y, h])  # h is also a graph output
    feeds = feeds_for(model)
    before = run(model, feeds)
    p = apply(model)
    assert ops(model) == ["DynamicQuantizeMatMul", "Add"]
    assert "folded" not in records(p)[0].detail
    check(model)
    assert_close(before, run(model, feeds), rel=2e-2)


def test_gemm_trans_b_with_c():
    w, q, scale = on_int8_grid(K, N)
    c = np.random.default_rng(8).standard_normal(N).astype(np.float32)
    model = gemm_model(np.ascontiguousarray(w.T), c, trans_b=1)
    x = np.random.default_rng(9).standard_normal((5, K)).astype(np.float32)
    p = apply(model)
    assert ops(model) == ["DynamicQuantizeMatMul"] and "Gemm C as bias" in records(p)[0].detail
    check(model)
    np.testing.assert_allclose(run(model, {"x": x})[0], reference(x, q, scale, c), rtol=1e-5, atol=1e-5)


def test_gemm_without_c():
    w, q, scale = on_int8_grid(K, N)
    model = gemm_model(w)
    x = np.random.default_rng(9).standard_normal((5, K)).astype(np.float32)
    apply(model)
    np.testing.assert_allclose(run(model, {"x": x})[0], reference(x, q, scale), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------- sharing


def test_shared_weight_is_quantized_once():
    w, _, _ = on_int8_grid(K, N)
    b = Builder()
    x = b.input("x", ["B", K])
    weight = b.init("W", w)
    y1 = b.op("MatMul", [x, weight], name="mm1", output_names=["y1"])
    y2 = b.op("MatMul", [b.op("Relu", [x], name="relu"), weight], name="mm2", output_names=["y2"])
    model = b.model([y1, y2])
    feeds = feeds_for(model)
    before = run(model, feeds)
    p = apply(model)
    assert [r.action for r in records(p)] == ["rewritten", "rewritten"]
    assert "shared by 2 nodes" in records(p)[0].detail
    assert sorted(model.graph.initializers) == ["W_quantized", "W_scale", "W_zero_point"]
    check(model)
    assert_close(before, run(model, feeds), rel=2e-2)


def test_weight_shared_with_another_kind_of_node_is_refused():
    w, _, _ = on_int8_grid(K, N)
    b = Builder()
    x = b.input("x", ["B", K])
    weight = b.init("W", w)
    y = b.op("MatMul", [x, weight], name="mm", output_names=["y"])
    z = b.op("Mul", [weight, weight], name="square", output_names=["z"])
    assert_untouched(b.model([y, z]), "is also read by 'square' (Mul)")


def test_weight_read_transposed_and_not_is_refused():
    w = np.ones((K, K), np.float32)
    b = Builder()
    x = b.input("x", ["B", K])
    weight = b.init("W", w)
    y1 = b.op("MatMul", [x, weight], name="mm", output_names=["y1"])
    y2 = b.op("Gemm", [x, weight], name="gemm", output_names=["y2"], transB=1)
    assert_untouched(b.model([y1, y2]), "read both transposed", tables=False)


# ---------------------------------------------------------------------------- refusals


def test_attention_product_of_two_activations_is_refused():
    b = Builder()
    q = b.input("q", ["B", 4, 8])
    k = b.input("k", ["B", 8, 4])
    y = b.op("MatMul", [q, b.op("Relu", [k], name="relu")], name="mm", output_names=["y"])
    assert_untouched(b.model([y]), "is not constant (computed by Relu 'relu')")


def test_weight_not_2d_is_refused():
    assert_untouched(matmul_model(np.ones((2, K, N), np.float32), x_shape=(2, 3, K)), "is 3-D [2, 48, 20]")


def test_float16_weight_is_refused():
    b = Builder()
    x = b.input("x", ["B", K], ir.DataType.FLOAT16)
    y = b.op("MatMul", [x, b.init("W", np.ones((K, N), np.float16))], name="mm", output_names=["y"])
    assert_untouched(b.model([y], ir.DataType.FLOAT16), "is FLOAT16; only FLOAT (float32)")


@pytest.mark.parametrize(
    "attrs, reason",
    [
        ({"trans_a": 1}, "transA=1"),
        ({"alpha": 2.0}, "alpha=2"),
        ({"beta": 0.5, "c": np.ones(N, np.float32)}, "beta=0.5"),
        ({"c": np.ones((1, N), np.float32)}, "Gemm C 'C' is FLOAT [1, 20]"),
    ],
)
def test_gemm_refusals(attrs, reason):
    assert_untouched(gemm_model(np.ones((K, N), np.float32), **attrs), reason, node="gemm")


def test_excluded_and_small_weights_are_refused():
    w, _, _ = on_int8_grid(K, N)
    assert_untouched(matmul_model(w, name="head/mm"), "excluded by exclude=^head/", node="head/mm", exclude="^head/")
    assert_untouched(matmul_model(w), f"has {K * N:,} elements, fewer than min_elements=1,000", min_elements=1000)


def test_weight_that_would_grow_is_refused():
    assert_untouched(matmul_model(np.ones((1, N), np.float32), x_shape=("B", "T", 1)),
                     "would not shrink: the 1×20 weight takes 120 bytes quantized, 80 as float")


def test_already_quantized_model_is_left_alone():
    b = Builder()
    x = b.input("x", ["B", K])
    q, s, z = b.op("DynamicQuantizeLinear", [x], name="dql", num_outputs=3)
    deq = b.op("DequantizeLinear", [q, s, z], name="dq")
    y = b.op("MatMul", [deq, b.init("W", np.ones((K, N), np.float32))], name="mm", output_names=["y"])
    model = b.model([y])
    snapshot = ir.to_onnx_text(model)
    p = QuantizeDynamic()
    assert not p(model).modified
    assert ir.to_onnx_text(model) == snapshot and not p.records
    assert "already quantized (1 DynamicQuantizeLinear, 1 DequantizeLinear)" in p.notes[0]


# ---------------------------------------------------------------------------- tables


def embedding_model(table: np.ndarray, axis: int = 0, constant_ids: bool = False) -> ir.Model:
    b = Builder()
    if constant_ids:
        ids = b.init("ids", np.array([[0, 3], [2, -1]], np.int64))
    else:
        ids = b.input("ids", ["B", "T"], ir.DataType.INT64)
    y = b.op("Gather", [b.init("table", table), ids], name="embed", output_names=["y"], axis=axis)
    if constant_ids:
        h = b.op("Add", [y, b.input("x", [2, 2, table.shape[1]])], name="add")
        y = b.op("Relu", [h], name="relu", output_names=["z"])
    return b.model([y], ir.DataType.from_numpy(table.dtype))


def on_row_grid(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """A table whose rows lie on their uint8 affine grid (codes 0 and 255 in every row)."""
    rng = np.random.default_rng(seed)
    lo, hi = -rng.uniform(0.1, 1, rows), rng.uniform(0.1, 1, rows)
    scale = ((hi - lo) / 255).astype(np.float32)
    zero_point = np.rint(-lo / scale)
    codes = rng.integers(0, 256, (rows, cols))
    codes[:, 0], codes[:, 1] = 0, 255
    return ((codes - zero_point[:, None]) * scale[:, None]).astype(np.float32)


@pytest.mark.parametrize("cols", [384, 100, 8])
def test_table_on_its_row_grid_is_reproduced(cols):
    table = on_row_grid(30, cols)
    model = embedding_model(table)
    ids = np.array([[0, 5, 29], [-1, 7, 7]], np.int64)
    p = apply(model)
    node = find_node(model, "embed")
    assert node.op_type == "GatherBlockQuantized" and node.domain == "com.microsoft"
    assert node.inputs[0].const_value.dtype == ir.DataType.UINT8
    assert f"table 30×{cols}" in records(p)[0].detail
    check(model)
    np.testing.assert_allclose(run(model, {"ids": ids})[0], table[ids], rtol=1e-6, atol=1e-7)


def test_random_table_stays_within_half_a_step_per_row():
    table = np.random.default_rng(1).standard_normal((50, 64)).astype(np.float32)
    model = embedding_model(table)
    ids = np.arange(50, dtype=np.int64).reshape(5, 10)
    apply(model)
    step = (np.maximum(table.max(1), 0) - np.minimum(table.min(1), 0)) / 255
    error = np.abs(run(model, {"ids": ids})[0] - table[ids])
    assert np.all(error <= 0.5 * step[ids][..., None] * 1.001 + 1e-7)


def test_tables_false_leaves_gathers_alone():
    model = embedding_model(on_row_grid(30, 16))
    assert not apply(model, tables=False).records
    assert ops(model) == ["Gather"]


def test_table_refusals():
    assert_untouched(embedding_model(on_row_grid(30, 16), axis=1), "Gather axis=1", node="embed")
    assert_untouched(embedding_model(on_row_grid(30, 16), constant_ids=True), "indices 'ids' are constant",
                     node="embed")
    assert_untouched(embedding_model(np.ones((30, 16), np.int64)), "is INT64; only FLOAT", node="embed")
    assert_untouched(embedding_model(np.ones(30, np.float32)), "is 1-D [30], only 2-D tables", node="embed")
    assert_untouched(embedding_model(np.ones((30, 1), np.float32)), "would not shrink: table 'table'", node="embed")


def test_tied_table_and_weight_are_both_refused():
    table = on_row_grid(30, 16)
    b = Builder()
    ids = b.input("ids", ["B"], ir.DataType.INT64)
    weight = b.init("table", table)
    h = b.op("Gather", [weight, ids], name="embed")
    y = b.op("Gemm", [h, weight], name="gemm", output_names=["y"], transB=1)
    model = b.model([y])
    assert_untouched(model, "is also read by 'gemm' (Gemm)", node="embed")
    assert_untouched(model, "is also read by 'embed' (Gather)", node="gemm")


# ---------------------------------------------------------------------------- whole-model checks


def test_runs_optimized_and_declares_the_domain():
    w, _, _ = on_int8_grid(K, N)
    model = matmul_model(w, np.ones(N, np.float32))
    feeds = feeds_for(model)
    assert apply(model).records
    assert model.opset_imports["com.microsoft"] == 1
    plain = run(model, feeds)
    optimized = make_session(model).run(None, feeds)
    assert_close(plain, optimized, rel=1e-6)


def test_candidates_list_what_would_be_rewritten():
    w, _, _ = on_int8_grid(K, N)
    model = matmul_model(w)
    found = QuantizeDynamic(QuantizeDynamicOptions(storage="uint8")).candidates(model)
    assert [(c.node, c.op_type) for c in found] == [("mm", "MatMul")]
    assert "3,840 → 1,060 bytes" in found[0].what
    assert ops(model) == ["MatMul"]


def test_records_state_the_sizes():
    w, _, _ = on_int8_grid(K, N)
    model = matmul_model(w)
    p = apply(model)
    assert records(p)[0].detail == (
        "int8 per-column (20 scales), stored as uint8, weight 48×20: 3,840 → 1,060 bytes (8.83 bits per weight)")
    assert p.notes == ["quantized 1 MatMul/Gemm weights to int8 and 0 Gather tables"]


# ---------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    "values, message",
    [
        ({"min_elements": "-1"}, "min_elements' must be 0 or more"),
        ({"exclude": "("}, "not a valid regular expression"),
        ({"storage": "int4"}, "must be one of auto|uint8|int8"),
        ({"per_channel": "maybe"}, "must be true or false"),
    ],
)
def test_bad_options(values, message):
    with pytest.raises(OptionError, match=message):
        parse_options(QuantizeDynamicOptions, values)


def test_pipeline_text_round_trips():
    text = "lift-constants,quantize-dynamic{per_channel=false,storage=int8,tables=false}"
    assert str(Pipeline.parse(text)) == text


def on_int4_block_grid(rows: int, cols: int, block: int, seed: int = 0) -> np.ndarray:
    """A table whose blocks lie on their symmetric int4 grid (a code of ±7 in every block)."""
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.01, 0.1, (rows, cols // block, 1))
    codes = rng.integers(-7, 8, (rows, cols // block, block))
    codes[..., 0] = 7
    return (codes * scale).reshape(rows, cols).astype(np.float32)


@pytest.mark.parametrize("block", [16, 32])
def test_int4_table_on_its_block_grid_is_reproduced(block):
    table = on_int4_block_grid(30, 64, block)
    model = embedding_model(table)
    ids = np.array([[0, 5, 29], [-1, 7, 7]], np.int64)
    p = apply(model, table_bits=4, table_block=block)
    node = find_node(model, "embed")
    assert node.op_type == "GatherBlockQuantized" and node.attributes.get_int("bits") == 4
    assert tuple(node.inputs[0].const_value.shape) == (30, 32)  # two codes per byte
    assert f"int4 in blocks of {block}" in records(p)[0].detail
    check(model)
    np.testing.assert_allclose(run(model, {"ids": ids})[0], table[ids], rtol=1e-6, atol=1e-7)


def test_random_int4_table_stays_within_half_a_step_per_block():
    table = np.random.default_rng(2).standard_normal((50, 64)).astype(np.float32)
    model = embedding_model(table)
    ids = np.arange(50, dtype=np.int64).reshape(5, 10)
    apply(model, table_bits=4)
    step = np.abs(table.reshape(50, 2, 32)).max(-1) / 7
    error = np.abs(run(model, {"ids": ids})[0] - table[ids]).reshape(5, 10, 2, 32)
    assert np.all(error <= 0.5 * step[ids][..., None] * 1.001 + 1e-7)


def test_int4_table_refusals_and_options():
    assert_untouched(embedding_model(on_row_grid(30, 48)), "do not split into blocks of table_block=32",
                     node="embed", table_bits=4)
    with pytest.raises(OptionError, match="table_bits' must be 8 or 4"):
        QuantizeDynamic.Options(table_bits=2)
    with pytest.raises(OptionError, match="table_block' must be a power of two"):
        QuantizeDynamic.Options(table_block=24)


@pytest.mark.parametrize("saturating, grid", [(True, "int7"), (False, "int8")])
def test_the_exact_u8s8_grid_is_int7_only_where_int8_codes_saturate(monkeypatch, saturating, grid):
    monkeypatch.setattr(executed, "saturating_u8s8", lambda: saturating)
    assert executed.exact_u8s8_grid() == grid
