"""quantize-qdq: exact limit on the grid, placement onnxruntime fuses, refusals, fallback."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from onnxcompress.errors import CalibrationError, OptionError
from onnxcompress.executed import INT8_KERNELS, executed_kernels
from onnxcompress.metrics import tensor_drift
from onnxcompress.options import parse_options
from onnxcompress.pass_base import PassContext
from onnxcompress.passes.quantize_qdq import QuantizeQdq, QuantizeQdqOptions
from tests.graphs import Builder, check, ops, random_feeds, refusals, records, run, smooth_feeds


def _pass(feeds, **options) -> QuantizeQdq:
    opts = parse_options(QuantizeQdqOptions, {k: str(v) for k, v in options.items()})
    return QuantizeQdq(opts, PassContext(calibration=feeds))


def _kernels(model) -> list[str]:
    return sorted(op for _, op in executed_kernels(model).values())


def _conv_net(seed=0, relu6=False):
    rng = np.random.default_rng(seed)
    b = Builder()
    x = b.input("x", [1, 3, 12, 12])
    w1 = b.init("w1", rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3)
    b1 = b.init("b1", rng.standard_normal(8).astype(np.float32) * 0.1)
    h = b.op("Conv", [x, w1, b1], name="conv1", pads=[1, 1, 1, 1])
    if relu6:
        h = b.op("Clip", [h, b.init("lo", np.array(0, np.float32)), b.init("hi", np.array(6, np.float32))], name="clip1")
    else:
        h = b.op("Relu", [h], name="relu1")
    w2 = b.init("w2", rng.standard_normal((8, 8, 3, 3)).astype(np.float32) * 0.2)
    g = b.op("Conv", [h, w2], name="conv2", pads=[1, 1, 1, 1])
    s = b.op("Add", [g, h], name="residual")
    p = b.op("GlobalAveragePool", [s], name="pool")
    f = b.op("Flatten", [p], name="flatten")
    wf = b.init("wf", rng.standard_normal((10, 8)).astype(np.float32) * 0.5)
    bf = b.init("bf", rng.standard_normal(10).astype(np.float32) * 0.1)
    y = b.op("Gemm", [f, wf, bf], name="fc", transB=1, output_names=["logits"])
    return b.model([y])


def _feeds(model, count=8, seed=0):
    return [random_feeds(model, seed=seed + i, batch=1) for i in range(count)]


def _sqnr(reference, candidate) -> float:
    return tensor_drift(reference, candidate).sqnr_db


# ---------------------------------------------------------------------------- exact limit


def _on_grid_model():
    """MatMul → Relu → MatMul whose values all lie on the grids quantize-qdq will choose.

    x takes multiples of 1/16 in [0, 15/16]: its uint8 grid (scale 15/16/255) holds them.
    W1 has entries in {0, 1/64}, column 0 all ones: h = relu(x·W1) is a multiple of 1/1024 up to
    255/1024 (reached by x = 15/16 everywhere), so h's grid has exactly that step. W1 and W2 are
    on their per-column int8 grids (max|w| = 127 steps).
    """
    rng = np.random.default_rng(0)
    k, n, m = 17, 6, 4
    w1 = (rng.integers(0, 2, (k, n)) / 64.0).astype(np.float32)
    w1[:, 0] = 1 / 64.0
    w2 = (rng.integers(-127, 128, (n, m)) / 512.0).astype(np.float32)
    w2[0, :] = 127 / 512.0
    b = Builder()
    x = b.input("x", [1, k])
    h = b.op("Relu", [b.op("MatMul", [x, b.init("w1", w1)], name="mm1")], name="relu")
    y = b.op("MatMul", [h, b.init("w2", w2)], name="mm2", output_names=["y"])
    model = b.model([y])
    feeds = [{"x": (rng.integers(0, 16, (1, k)) / 16.0).astype(np.float32)} for _ in range(6)]
    feeds.append({"x": np.full((1, k), 15 / 16.0, np.float32)})
    return model, feeds


@pytest.mark.parametrize("weights", ["int8", "uint8"])
def test_values_on_the_grids_pass_unchanged(weights):
    model, feeds = _on_grid_model()
    before = [run(model, f)[0] for f in feeds]
    pass_ = _pass(feeds, weights=weights)
    assert pass_(model).modified
    check(model)
    # The QDQ graph computes exactly what the float one did …
    for e, f in zip(before, feeds):
        np.testing.assert_allclose(run(model, f)[0], e, rtol=1e-6, atol=1e-7)
    assert _kernels(model).count("QLinearMatMul") == 1 and "MatMulIntegerToFloat" in _kernels(model)
    assert "Relu" not in ops(model)  # folded: uint8 with zero point 0 clamps at 0 the same way
    if weights == "uint8":
        # … and so do onnxruntime's fused u8u8 kernels. (Its u8s8 kernel on x86 CPUs without
        # VNNI adds pairs of products with int16 saturation, which 255·127·2 exceeds: that is
        # what weights=int7 or weights=uint8 are for.)
        for e, f in zip(before, feeds):
            np.testing.assert_allclose(run(model, f, optimize=True)[0], e, rtol=1e-6, atol=1e-7)


def test_the_last_layer_keeps_a_float_output_and_its_bias():
    """x·W + b as the graph output: one MatMulIntegerToFloat, exact for x and W on their grids."""
    rng = np.random.default_rng(1)
    w = (rng.integers(-127, 128, (12, 5)) / 256.0).astype(np.float32)
    w[0, :] = 127 / 256.0  # every column's grid step is 1/256
    bias = rng.standard_normal(5).astype(np.float32)
    b = Builder()
    x = b.input("x", [1, 12])
    y = b.op("Gemm", [x, b.init("w", w.T.copy()), b.init("b", bias)], name="fc", transB=1, output_names=["logits"])
    model = b.model([y])
    feeds = [{"x": (rng.integers(0, 256, (1, 12)) / 64.0).astype(np.float32)} for _ in range(5)]
    feeds.append({"x": np.full((1, 12), 255 / 64.0, np.float32)})  # x's range is exactly [0, 255/64]
    before = [run(model, f)[0] for f in feeds]
    pass_ = _pass(feeds, weights="uint8")
    assert pass_(model).modified
    check(model)
    assert [n.op_type for n in model.graph if n.op_type not in ("QuantizeLinear",)] == ["MatMulIntegerToFloat"]
    assert model.opset_imports["com.microsoft"] == 1
    for e, f in zip(before, feeds):
        np.testing.assert_allclose(run(model, f, optimize=True)[0], e, rtol=1e-6, atol=1e-6)
    assert "bias Add folded" in records(pass_, "rewritten")[0].detail


# ---------------------------------------------------------------------------- placement


def test_conv_net_runs_int8_kernels_and_stays_close():
    model = _conv_net()
    feeds = _feeds(model)
    before = [run(model, f)[0] for f in feeds]
    pass_ = _pass(feeds, weights="uint8")  # int8 weights saturate in u8s8 kernels without VNNI
    assert pass_(model).modified
    check(model)
    kernels = _kernels(model)
    assert kernels.count("QLinearConv") == 2
    # The last Gemm (its output is the graph's) computes in int8 with a float output, bias folded.
    assert {"QLinearAdd", "QLinearGlobalAveragePool", "MatMulIntegerToFloat"} <= set(kernels)
    assert "Gemm" not in ops(model) and "Relu" not in ops(model) and "Add" not in ops(model)[-3:]
    after = [run(model, f, optimize=True)[0] for f in feeds]
    assert _sqnr(before, after) > 38  # measured 40.9 dB
    assert model.graph.outputs[0].name == "logits"
    conv = next(r for r in records(pass_, "rewritten") if r.node == "conv1")
    assert conv.detail.startswith("QLinearConv") and "bias int32" in conv.detail


def test_relu6_is_folded_when_the_grid_stays_inside_the_clip():
    model = _conv_net(relu6=True)
    feeds = _feeds(model)
    assert _pass(feeds)(model).modified
    assert "Clip" not in ops(model)
    assert not {"lo", "hi"} & set(model.graph.initializers)  # the Clip's bounds went with it
    assert _kernels(model).count("QLinearConv") == 2


def test_a_clip_the_grid_exceeds_is_kept():
    b = Builder()
    x = b.input("x", [1, 4])
    w = b.init("w", np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32))
    h = b.op("MatMul", [x, w], name="mm")
    c = b.op("Clip", [h, b.init("lo", np.array(0.1, np.float32)), b.init("hi", np.array(0.5, np.float32))], name="clip")
    y = b.op("MatMul", [c, b.init("w2", np.eye(4, dtype=np.float32))], name="mm2", output_names=["y"])
    model = b.model([y])
    feeds = _feeds(model)
    # The grid must contain 0, so it reaches below the clip's floor of 0.1: the Clip stays.
    assert _pass(feeds, weights="uint8")(model).modified
    assert "Clip" in ops(model)
    out = np.concatenate([run(model, f, optimize=True)[0] for f in feeds])
    step = 0.5 / 255
    assert out.min() >= 0.1 - step and out.max() <= 0.5 + step


def test_data_movement_passes_int8_through():
    rng = np.random.default_rng(0)
    b = Builder()
    x = b.input("x", [1, 4, 6, 6])
    c = b.op("Conv", [x, b.init("w", rng.standard_normal((8, 4, 1, 1)).astype(np.float32))], name="conv")
    m = b.op("MaxPool", [c], name="pool", kernel_shape=[2, 2], strides=[2, 2])
    r = b.op("Reshape", [m, b.init("shape", np.array([1, 72], np.int64))], name="reshape")
    y = b.op("MatMul", [r, b.init("wf", rng.standard_normal((72, 5)).astype(np.float32))], name="fc", output_names=["y"])
    model = b.model([y])
    feeds = _feeds(model)
    assert _pass(feeds)(model).modified
    optimized = executed_kernels(model)
    assert optimized["conv"][1] == "QLinearConv" and optimized["fc"][1] in ("QLinearMatMul", "MatMulIntegerToFloat")
    # MaxPool and Reshape read int8 directly: no DequantizeLinear survives between conv and fc.
    assert sum(op == "DequantizeLinear" for _, op in optimized.values()) == 0


def test_embedding_table_is_stored_on_the_activation_grid():
    rng = np.random.default_rng(0)
    table = rng.standard_normal((50, 8)).astype(np.float32)
    w = rng.standard_normal((8, 3)).astype(np.float32)
    b = Builder()
    ids = b.input("ids", [1, 5], ir.DataType.INT64)
    e = b.op("Gather", [b.init("table", table), ids], name="embed")
    y = b.op("MatMul", [e, b.init("w", w)], name="mm", output_names=["y"])
    model = b.model([y])
    feeds = [{"ids": rng.integers(0, 50, (1, 5)).astype(np.int64)} for _ in range(4)]
    before = [run(model, f)[0] for f in feeds]
    pass_ = _pass(feeds, weights="uint8")
    assert pass_(model).modified
    check(model)
    stored = [v for v in model.graph.initializers.values() if v.const_value.shape == (50, 8)]
    assert len(stored) == 1 and stored[0].const_value.dtype == ir.DataType.UINT8
    assert any("dequantized after the Gather" in r.detail for r in records(pass_, "rewritten"))
    # Rows come back within half a table step; the activation and weight grids add as much again
    # at most, so the output moves by less than a table step per unit of |w|.
    step = float(table.max() - table.min()) / 255
    bound = step * float(np.abs(w).sum(axis=0).max())
    for f, expected in zip(feeds, before):
        assert np.max(np.abs(run(model, f, optimize=True)[0] - expected)) <= bound


def test_per_tensor_weights():
    model = _conv_net()
    assert _pass(_feeds(model), per_channel="false", weights="uint8")(model).modified
    scales = [tuple(v.const_value.shape) for v in model.graph.initializers.values() if v.name.startswith("w1") and v.name.endswith("scale")]
    assert scales == [()]
    assert _kernels(model).count("QLinearConv") == 2


def test_int8_activations_keep_what_onnxruntime_cannot_fuse_in_float():
    model = _conv_net()
    pass_ = _pass(_feeds(model), activations="int8")
    assert pass_(model).modified
    kernels = executed_kernels(model)
    assert kernels["fc"][1] == "MatMulIntegerToFloat"
    fc_zero = next(v for v in model.graph.initializers.values() if v.name == "flatten_out0_zero_point")
    assert fc_zero.const_value.dtype == ir.DataType.INT8
    # Whatever onnxruntime would not fuse with int8 activations is refused with that reason.
    for record in records(pass_, "refused"):
        assert "onnxruntime" in record.detail and kernels[record.node][1] not in INT8_KERNELS


def test_a_bias_too_large_for_int32_raises_the_weight_scale():
    b = Builder()
    x = b.input("x", [1, 2, 4, 4])
    w = b.init("w", np.full((2, 2, 1, 1), 1e-6, np.float32))
    c = b.op("Conv", [x, w, b.init("b", np.array([1e6, 0.1], np.float32))], name="conv")
    y = b.op("Relu", [c], name="relu")
    y = b.op("MatMul", [b.op("Flatten", [y], name="flat"), b.init("wf", np.ones((32, 1), np.float32))], name="fc", output_names=["y"])
    model = b.model([y])
    feeds = _feeds(model)
    pass_ = _pass(feeds)
    assert pass_(model).modified
    assert any("1 weight scales raised" in r.detail for r in records(pass_, "rewritten"))


# ---------------------------------------------------------------------------- refusals


def test_excluded_nodes_and_op_types_stay_float():
    model = _conv_net()
    feeds = _feeds(model)
    pass_ = _pass(feeds, exclude="conv2", exclude_ops="Add")
    assert pass_(model).modified
    assert "excluded by exclude=conv2" in refusals(pass_, "conv2")[0]
    assert "op type Add excluded by exclude_ops" in refusals(pass_, "residual")[0]
    kernels = executed_kernels(model)
    assert kernels["conv2"][1] == "Conv" and kernels["conv1"][1] == "QLinearConv"


def test_hardswish_between_convs_is_not_quantized():
    rng = np.random.default_rng(0)
    b = Builder(opset=17)
    x = b.input("x", [1, 3, 8, 8])
    c = b.op("Conv", [x, b.init("w", rng.standard_normal((4, 3, 3, 3)).astype(np.float32))], name="conv")
    h = b.op("HardSwish", [c], name="hswish")
    s = b.op("Sigmoid", [h], name="sig")
    y = b.op("Conv", [s, b.init("w2", rng.standard_normal((2, 4, 1, 1)).astype(np.float32))], name="conv2")
    out = b.op("Relu", [y], name="relu", output_names=["y"])
    model = b.model([out])
    feeds = _feeds(model)
    pass_ = _pass(feeds)
    assert pass_(model).modified
    kernels = executed_kernels(model)
    assert kernels["conv"][1] == "QLinearConv" and "hswish" not in [r.node for r in pass_.records]


def test_a_unit_onnxruntime_runs_in_float_is_taken_back(monkeypatch):
    """Pretend onnxruntime has no int8 GlobalAveragePool: the pass must keep it float."""
    import onnxcompress.passes.quantize_qdq as module

    real = module.executed_kernels

    def without_pool_kernel(model):
        found = real(model)
        return {k: (d, "GlobalAveragePool" if op == "QLinearGlobalAveragePool" else op) for k, (d, op) in found.items()}

    monkeypatch.setattr(module, "executed_kernels", without_pool_kernel)
    model = _conv_net()
    pass_ = _pass(_feeds(model))
    assert pass_(model).modified
    assert "no int8 kernel" in refusals(pass_, "pool")[0]
    assert executed_kernels(model)["pool"][1] == "GlobalAveragePool"


def test_an_already_quantized_model_is_left_alone():
    model = _conv_net()
    feeds = _feeds(model)
    assert _pass(feeds)(model).modified
    snapshot = ir.to_onnx_text(model)
    again = _pass(feeds)
    assert not again(model).modified
    assert ir.to_onnx_text(model) == snapshot
    assert "already quantized" in again.notes[0] and "QuantizeLinear" in again.notes[0]


def test_no_calibration_data_is_one_clear_error():
    with pytest.raises(CalibrationError, match="--calib"):
        QuantizeQdq()(_conv_net())


def test_matmul_only_leave_leaves_a_model_without_convolutions_alone_and_needs_no_data():
    model, _ = _on_grid_model()
    before = ir.to_proto(model).SerializeToString()
    pass_ = QuantizeQdq(QuantizeQdqOptions(matmul_only="leave"))  # no calibration: not needed
    assert not pass_(model).modified
    assert ir.to_proto(model).SerializeToString() == before
    assert any("matmul_only=leave" in n and "quantize-dynamic" in n for n in pass_.notes)
    assert pass_.candidates(model) == []


def test_matmul_only_leave_quantizes_a_model_with_a_convolution_as_static_does():
    static, leave = _conv_net(), _conv_net()
    feeds = _feeds(static)
    assert _pass(feeds, weights="uint8")(static).modified
    assert _pass(feeds, weights="uint8", matmul_only="leave")(leave).modified
    assert ir.to_proto(leave).graph == ir.to_proto(static).graph


def test_the_int8_preset_gives_a_model_without_convolutions_dynamic_int8():
    import onnxcompress

    model, feeds = _on_grid_model()
    result = onnxcompress.compress(model, "int8", calibration=feeds)
    assert [n.op_type for n in result.model.graph] == ["DynamicQuantizeMatMul", "Relu", "DynamicQuantizeMatMul"]
    passes = {p.name: p for p in result.report.passes}
    assert passes["quantize-qdq"].status == "unchanged"
    conv = onnxcompress.compress(_conv_net(), "int8", calibration=_feeds(_conv_net()))
    assert "QLinearConv" in _kernels(conv.model) and "DynamicQuantizeMatMul" not in ops(conv.model)
    dynamic = next(p for p in conv.report.passes if p.name == "quantize-dynamic")
    assert any("already quantized" in n for n in dynamic.notes)


def test_an_old_opset_is_converted_first():
    model = _conv_net()
    model.opset_imports[""] = 12
    feeds = _feeds(model)
    pass_ = _pass(feeds)
    assert pass_(model).modified
    assert model.opset_imports[""] == 13 and any("opset 12 to 13" in n for n in pass_.notes)
    check(model)


@pytest.mark.parametrize("key,value,message", [
    ("percentile", "40", "must lie in (50, 100]"),
    ("bins", "10", "multiple of 4"),
    ("exclude", "(", "not a valid regular expression"),
    ("exclude_ops", "Conv|2x", "not an op type"),
    ("fallback", "speed=3", "bad drift budget"),
    ("calibration", "median", "must be one of"),
    ("fallback_samples", "0", "at least 1"),
    ("rounding", "stochastic", "must be one of"),
    ("damp", "0", "must lie in (0, 1]"),
])
def test_bad_options(key, value, message):
    with pytest.raises(OptionError, match=message.replace("(", r"\(").replace("]", r"\]").replace("|", r"\|")):
        parse_options(QuantizeQdqOptions, {key: value})


# ---------------------------------------------------------------------------- fallback


def _two_branches():
    """Two MatMuls on two inputs; the second input has one huge outlier in one feed, so its
    uint8 range leaves the ordinary values a level or two: only that MatMul is sensitive."""
    rng = np.random.default_rng(0)
    b = Builder()
    x1, x2 = b.input("x1", [1, 8]), b.input("x2", [1, 8])
    a = b.op("MatMul", [x1, b.init("w1", rng.standard_normal((8, 4)).astype(np.float32))], name="mm1", output_names=["a"])
    w2 = rng.standard_normal((8, 4)).astype(np.float32)
    w2[2] = 0.0  # the outlier's input channel does not reach the output: only its grid hurts
    c = b.op("MatMul", [x2, b.init("w2", w2)], name="mm2", output_names=["c"])
    model = b.model([a, c])
    feeds = [{"x1": rng.standard_normal((1, 8)).astype(np.float32), "x2": rng.standard_normal((1, 8)).astype(np.float32)}
             for _ in range(8)]
    feeds[3]["x2"][0, 2] = 500.0
    return model, feeds


def _drift_db(before, model, feeds) -> float:
    after = [run(model, f, optimize=True) for f in feeds]
    return min(_sqnr([b[i] for b in before], [a[i] for a in after]) for i in range(len(before[0])))


def test_fallback_keeps_the_worst_node_in_float_until_the_budget_holds():
    model, feeds = _two_branches()
    before = [run(model, f) for f in feeds]
    plain, _ = _two_branches()
    assert _pass(feeds, weights="uint8")(plain).modified
    assert _drift_db(before, plain, feeds) < 20

    pass_ = _pass(feeds, weights="uint8", fallback="sqnr=30")
    assert pass_(model).modified
    assert _drift_db(before, model, feeds) >= 30
    reasons = refusals(pass_, "mm2")
    assert reasons and "kept in float by fallback=sqnr=30" in reasons[0]
    kernels = executed_kernels(model)
    assert kernels["mm1"][1] == "MatMulIntegerToFloat" and kernels["mm2"][1] == "MatMul"
    assert any(n.startswith("fallback: 1 of 2 nodes") for n in pass_.notes)


def test_fallback_that_already_holds_keeps_everything_int8():
    model = _conv_net()
    pass_ = _pass(_feeds(model), fallback="sqnr=5")
    assert pass_(model).modified
    assert any(n.startswith("fallback: 0 of") for n in pass_.notes)
    assert not [r for r in pass_.records if "fallback" in r.detail]


# ---------------------------------------------------------------------------- GPTQ rounding


def _smooth_feeds(count, seed):
    return smooth_feeds(count, seed, (1, 3, 12, 12))


def test_gptq_rounding_moves_the_output_less_than_nearest():
    model = _conv_net()
    calibration, held_out = _smooth_feeds(16, 0), _smooth_feeds(8, 100)
    before = [run(model, f)[0] for f in held_out]
    nearest, gptq = model, _conv_net()
    assert _pass(calibration, weights="uint8")(nearest).modified
    pass_ = _pass(calibration, weights="uint8", rounding="gptq")
    assert pass_(gptq).modified
    check(gptq)
    assert _kernels(gptq) == _kernels(nearest)  # the same int8 kernels, other codes
    noise = {name: 10 ** (-_sqnr(before, [run(m, f, optimize=True)[0] for f in held_out]) / 10)
             for name, m in (("nearest", nearest), ("gptq", gptq))}
    assert noise["gptq"] < 0.7 * noise["nearest"], noise  # measured 0.57
    assert any(n == "GPTQ rounding of 3 weights against their inputs on 16 feeds" for n in pass_.notes)
    assert all("(GPTQ)" in r.detail for r in records(pass_, "rewritten") if r.node in ("conv1", "conv2", "fc"))


@pytest.mark.parametrize("weights", ["int8", "uint8"])
def test_gptq_rounding_of_weights_on_the_grid_is_the_nearest_rounding(weights):
    """The exact limit: a weight already on its grid keeps its codes, so the model is the one
    round-to-nearest builds, value for value."""
    model, feeds = _on_grid_model()
    nearest, _ = _on_grid_model()
    assert _pass(feeds, weights=weights, rounding="gptq")(model).modified
    assert _pass(feeds, weights=weights)(nearest).modified
    assert ir.to_onnx_text(model) == ir.to_onnx_text(nearest)
    for f in feeds:
        np.testing.assert_array_equal(run(model, f)[0], run(nearest, f)[0])


def test_gptq_rounding_leaves_a_conv_transpose_to_nearest_with_a_note():
    rng = np.random.default_rng(2)
    b = Builder()
    x = b.input("x", [1, 4, 6, 6])
    h = b.op("ConvTranspose", [x, b.init("wt", rng.standard_normal((4, 3, 3, 3)).astype(np.float32))], name="up")
    h = b.op("Conv", [h, b.init("w", rng.standard_normal((5, 3, 3, 3)).astype(np.float32))], name="conv")
    f = b.op("Flatten", [b.op("GlobalAveragePool", [h], name="pool")], name="flatten")
    y = b.op("MatMul", [f, b.init("wf", rng.standard_normal((5, 2)).astype(np.float32))], name="fc", output_names=["y"])
    model = b.model([y])
    pass_ = _pass(_feeds(model), rounding="gptq")
    assert pass_(model).modified
    assert "up: weight rounded to nearest, not by GPTQ: ConvTranspose is not handled" in pass_.notes
    assert "GPTQ rounding of 2 weights against their inputs on 8 feeds" in pass_.notes
