"""correct-bias: after the correction, int8 weights leave no mean output error on the data.

Exact limit: for Gemm, MatMul and an unpadded 1x1 Conv, the per-channel mean output error of
the model with fake-quantized weights over the calibration feeds is ~0 (float rounding) after
correct-bias; a padded 3x3 Conv gets most of it removed; weights already on the grid are left
alone.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

import onnxcompress
from onnxcompress.errors import CalibrationError, OptionError
from onnxcompress.options import parse_options
from onnxcompress.pass_base import PassContext
from onnxcompress.passes.correct_bias import CorrectBias, CorrectBiasOptions
from onnxcompress.quantization import fake_quantize_weight
from tests.graphs import Builder, assert_close, assert_left_alone, check, clone, find_node, ops, records, run


def feeds_for(model: ir.Model, count: int = 4, seed: int = 0) -> list[dict]:
    """Inputs with clearly nonzero, different per-channel means (as after a Relu)."""
    rng = np.random.default_rng(seed)
    shapes = {v.name: [d if isinstance(d, int) else 2 for d in v.shape] for v in model.graph.inputs}
    offsets = {}
    for name, shape in shapes.items():
        axis = 1 if len(shape) == 4 else len(shape) - 1
        offsets[name] = rng.uniform(0.5, 3.0, shape[axis]).reshape([-1 if i == axis else 1 for i in range(len(shape))])
    return [{name: (np.abs(rng.standard_normal(shape)) + offsets[name]).astype(np.float32)
             for name, shape in shapes.items()} for _ in range(count)]


def quantized_weights(model: ir.Model, per_channel: bool = True) -> ir.Model:
    """A copy of ``model`` with every layer weight on the int8 grid quantize-qdq uses."""
    copy = clone(model)
    for node in copy.graph:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or node.inputs[1].const_value is None:
            continue
        axis = 0 if node.op_type == "Conv" or (node.op_type == "Gemm" and node.attributes.get_int("transB", 0)) else 1
        value = node.inputs[1]
        value.const_value = ir.tensor(fake_quantize_weight(value.const_value.numpy(), axis if per_channel else None),
                                      name=value.name)
    return copy


def mean_error(reference: ir.Model, candidate: ir.Model, feeds: list[dict]) -> float:
    """Largest per-channel mean output difference over the feeds, relative to the output's peak."""
    diffs, peak = [], 0.0
    for feed in feeds:
        [e], [a] = run(reference, feed), run(candidate, feed)
        axis = 1 if e.ndim == 4 else e.ndim - 1
        moved = np.moveaxis(a.astype(np.float64) - e, axis, 0)
        diffs.append(moved.reshape(moved.shape[0], -1))
        peak = max(peak, float(np.abs(e).max()))
    return float(np.abs(np.concatenate(diffs, axis=1).mean(axis=1)).max()) / peak


def correct(model: ir.Model, feeds, **options) -> CorrectBias:
    p = CorrectBias(CorrectBiasOptions(**{"weights": "int8", **options}), PassContext(calibration=feeds))
    assert p(model).modified
    check(model)
    return p


def assert_mean_error_removed(build, exact: bool, per_channel: bool = True, **options) -> tuple[float, float]:
    float_model = build()
    feeds = feeds_for(float_model)
    before = mean_error(float_model, quantized_weights(float_model, per_channel), feeds)
    model = build()
    weights = {n: v.const_value.numpy().copy() for n, v in model.graph.initializers.items() if n.startswith("W")}
    correct(model, feeds, per_channel=per_channel, **options)
    for name, array in weights.items():  # the weights themselves are not changed
        np.testing.assert_array_equal(model.graph.initializers[name].const_value.numpy(), array)
    after = mean_error(float_model, quantized_weights(model, per_channel), feeds)
    assert before > 1e-4, before  # the grid does leave a mean error to remove
    if exact:
        assert after < 1e-6, (before, after)
    else:
        assert after < before / 3, (before, after)
    return before, after


def conv(kernel: int, pads: int, group: int = 1, bias: bool = True, seed: int = 0):
    def build() -> ir.Model:
        rng = np.random.default_rng(seed)
        b = Builder()
        x = b.input("x", ["N", 4, 9, 9])
        inputs = [x, b.init("W", (0.4 * rng.standard_normal((6, 4 // group, kernel, kernel))).astype(np.float32))]
        if bias:
            inputs.append(b.init("b", (0.1 * rng.standard_normal(6)).astype(np.float32)))
        y = b.op("Conv", inputs, name="conv", group=group, pads=[pads] * 4, output_names=["y"])
        return b.model([y])

    return build


def gemm(trans_b: int, bias: bool, alpha: float = 1.0, beta: float = 1.0, trans_a: int = 0):
    def build() -> ir.Model:
        rng = np.random.default_rng(1)
        b = Builder()
        x = b.input("x", [7, "M"] if trans_a else ["M", 7])
        w = (0.4 * rng.standard_normal((5, 7) if trans_b else (7, 5))).astype(np.float32)
        inputs = [x, b.init("W", w)]
        if bias:
            inputs.append(b.init("C", (0.1 * rng.standard_normal(5)).astype(np.float32)))
        y = b.op("Gemm", inputs, name="gemm", output_names=["y"], transA=trans_a, transB=trans_b, alpha=alpha, beta=beta)
        return b.model([y])

    return build


def matmul(bias_add: bool):
    def build() -> ir.Model:
        rng = np.random.default_rng(2)
        b = Builder()
        x = b.input("x", ["B", 3, 8])
        h = b.op("MatMul", [x, b.init("W", (0.4 * rng.standard_normal((8, 5))).astype(np.float32))], name="mm",
                 output_names=["y" if not bias_add else "h"])
        if bias_add:
            h = b.op("Add", [b.init("c", np.array([0.2], np.float32)), h], name="bias", output_names=["y"])
        return b.model([h])

    return build


# ---------------------------------------------------------------------------- exact limits


@pytest.mark.parametrize("bias", [True, False])
def test_unpadded_pointwise_conv_leaves_no_mean_error(bias):
    assert_mean_error_removed(conv(1, 0, bias=bias), exact=True)


def test_conv_without_bias_gets_one():
    model = conv(1, 0, bias=False)()
    correct(model, feeds_for(model))
    node = find_node(model, "conv")
    assert len(node.inputs) == 3 and node.inputs[2].name == "W_bias"


@pytest.mark.parametrize("group", [1, 2])
def test_padded_3x3_conv_removes_most_of_the_mean_error(group):
    assert_mean_error_removed(conv(3, 1, group=group), exact=False)


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bias", [True, False])
def test_gemm_leaves_no_mean_error(trans_b, bias):
    assert_mean_error_removed(gemm(trans_b, bias, alpha=0.8, beta=1.7), exact=True)


def test_gemm_trans_a_leaves_no_mean_error():
    assert_mean_error_removed(gemm(1, True, trans_a=1), exact=True)


def test_matmul_uses_its_bias_add():
    model = matmul(bias_add=True)()
    assert_mean_error_removed(matmul(bias_add=True), exact=True)
    correct(model, feeds_for(model))
    assert ops(model) == ["MatMul", "Add"]
    assert model.graph.initializers["c_corrected"].const_value.shape == (5,)
    assert "c" not in model.graph.initializers


def test_matmul_without_bias_gets_an_add_that_takes_its_output_name():
    model = matmul(bias_add=False)()
    assert_mean_error_removed(matmul(bias_add=False), exact=True)
    correct(model, feeds_for(model))
    assert ops(model) == ["MatMul", "Add"]
    add = model.graph.node(1)
    assert add.outputs[0].name == "y" and model.graph.outputs[0] is add.outputs[0]
    assert add.inputs[0] is find_node(model, "mm").outputs[0] and add.inputs[0].name == "y_uncorrected"


def test_per_tensor_grid():
    assert_mean_error_removed(conv(1, 0), exact=True, per_channel=False)


def test_record_names_the_correction():
    model = conv(1, 0)()
    p = correct(model, feeds_for(model))
    [record] = records(p, "rewritten")
    assert record.node == "conv" and "bias corrected by up to" in record.detail and "per channel" in record.detail


def test_pipeline_and_outputs_stay_close_in_float():
    model = conv(3, 1)()
    feeds = feeds_for(model)
    result = onnxcompress.compress(model, "correct-bias", calibration=feeds)
    entry = next(e for e in result.report.passes if e.name == "correct-bias")
    assert entry.status == "changed"
    # In float the corrected bias is a small shift: the output moves by well under 1 %.
    assert_close(run(model, feeds[0]), run(result.model, feeds[0]), rel=1e-2)


# ---------------------------------------------------------------------------- refusals


def test_weights_already_on_the_grid_are_left_alone():
    model = quantized_weights(conv(3, 1)())
    p = CorrectBias(CorrectBiasOptions(weights="int8"), context=PassContext(calibration=feeds_for(model)))
    assert_left_alone(p, model, "weight 'W' is already on the int8 grid", "conv")


def test_weights_on_the_per_tensor_grid_are_left_alone_per_tensor():
    model = quantized_weights(gemm(1, True)(), per_channel=False)
    p = CorrectBias(CorrectBiasOptions(per_channel=False, weights="int8"), PassContext(calibration=feeds_for(model)))
    assert_left_alone(p, model, "weight 'W' is already on the int8 grid", "gemm")


def test_no_calibration_data_raises():
    with pytest.raises(CalibrationError, match=r"correct-bias needs calibration data \(--calib\)"):
        CorrectBias(CorrectBiasOptions(weights="int8"))(conv(1, 0)())


def test_activation_times_activation_is_refused():
    b = Builder()
    x = b.input("x", ["N", 4])
    w = b.input("w", [4, 3])
    y = b.op("MatMul", [x, w], name="mm", output_names=["y"])
    model = b.model([y])
    feeds = [{"x": np.ones((2, 4), np.float32), "w": np.ones((4, 3), np.float32)}]
    assert_left_alone(CorrectBias(CorrectBiasOptions(weights="int8"), context=PassContext(calibration=feeds)), model,
                      "weight 'w' is a graph input, not a constant", "mm")


def test_gemm_with_beta_zero_is_refused():
    model = gemm(0, True, beta=0.0)()
    p = CorrectBias(CorrectBiasOptions(weights="int8"), context=PassContext(calibration=feeds_for(model)))
    assert_left_alone(p, model, "the Gemm has beta=0: it ignores its bias", "gemm")


def test_bias_that_is_a_graph_input_is_refused():
    b = Builder()
    x = b.input("x", ["N", 4, 5, 5])
    bias = b.input("bias", [6])
    w = b.init("W", np.random.default_rng(0).standard_normal((6, 4, 1, 1)).astype(np.float32))
    y = b.op("Conv", [x, w, bias], name="conv", output_names=["y"])
    model = b.model([y])
    feeds = [{"x": np.ones((1, 4, 5, 5), np.float32), "bias": np.zeros(6, np.float32)}]
    assert_left_alone(CorrectBias(CorrectBiasOptions(weights="int8"), context=PassContext(calibration=feeds)), model,
                      "bias 'bias' is a graph input, not a constant", "conv")


def test_excluded_node_is_refused():
    model = conv(1, 0)()
    p = CorrectBias(CorrectBiasOptions(exclude="^conv$", weights="int8"), PassContext(calibration=feeds_for(model)))
    assert_left_alone(p, model, "excluded by exclude=^conv$", "conv")


def test_zero_input_mean_gives_no_correction():
    model = conv(1, 0)()
    feeds = [{"x": np.zeros((1, 4, 9, 9), np.float32)}]
    assert_left_alone(CorrectBias(CorrectBiasOptions(weights="int8"), context=PassContext(calibration=feeds)), model, "the correction is zero", "conv")


def test_bad_exclude_option():
    with pytest.raises(OptionError, match="correct-bias: option 'exclude' is not a valid regular expression"):
        parse_options(CorrectBiasOptions, {"exclude": "("})


def test_the_grid_follows_quantize_qdq_weights_option():
    """Weights on the int7 grid are exact for weights=int7 and get a correction for int8."""
    from onnxcompress.quantization import INT7, fake_quantize_weight

    model = conv(1, 0)()
    weight = next(v for v in model.graph.initializers.values() if v.const_value.numpy().ndim == 4)
    on_int7 = fake_quantize_weight(weight.const_value.numpy(), 0, INT7)
    weight.const_value = ir.tensor(on_int7, name=weight.name)
    feeds = feeds_for(model)
    p = CorrectBias(CorrectBiasOptions(weights="int7"), PassContext(calibration=feeds))
    assert not p(model).modified
    assert CorrectBias(CorrectBiasOptions(weights="uint8"), PassContext(calibration=feeds))(model).modified
