"""equalize-cross-layer: exact through homogeneous activations, ranges matched, every refusal.

Exact limit: through no activation, Relu, LeakyRelu, PRelu, a depthwise middle or between
Gemm/MatMul layers, the outputs stay within 1e-5 (relative) and after the sweeps every pair's
per-channel ranges r1_i and r2_i agree. relu6=calibrated is exact on the feeds it was fitted on.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

import onnxcompress
from onnxcompress.errors import CalibrationError, OptionError
from onnxcompress.options import parse_options
from onnxcompress.pass_base import PassContext
from onnxcompress.passes.equalize_cross_layer import EqualizeCrossLayer, EqualizeCrossLayerOptions
from tests.graphs import (
    Builder,
    apply_and_compare,
    assert_close,
    assert_left_alone,
    check,
    find_node,
    ops,
    random_feeds,
    records,
    refusals,
    run,
)


def skewed(shape, axis, seed, spread=3.0) -> np.ndarray:
    """Random weights whose channels along ``axis`` differ in scale by up to e^spread."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape)
    scale = np.exp(rng.uniform(-spread, spread, shape[axis]))
    return (w * scale.reshape([-1 if i == axis else 1 for i in range(len(shape))])).astype(np.float32)


def add_act(b: Builder, h: ir.Value, act: str | None, channels: int, name: str = "act") -> ir.Value:
    if act is None:
        return h
    if act == "LeakyRelu":
        return b.op("LeakyRelu", [h], name=name, alpha=0.1)
    if act == "PRelu":
        slope = np.random.default_rng(9).uniform(-0.5, 0.5, (channels, 1, 1)).astype(np.float32)
        return b.op("PRelu", [h, b.init(f"{name}_slope", slope)], name=name)
    if act == "Clip":
        return b.op("Clip", [h, b.init(f"{name}_lo", np.array(0, np.float32)),
                             b.init(f"{name}_hi", np.array(6, np.float32))], name=name)
    return b.op(act, [h], name=name)


def conv_pair(act: str | None = "Relu", group2: int = 1, c_mid: int = 6, seed: int = 0,
              extra=None) -> ir.Model:
    """x[N,3,8,8] → conv1 (3x3, bias) → act → conv2 (1x1 or grouped 3x3, bias) → y."""
    rng = np.random.default_rng(seed)
    b = Builder()
    x = b.input("x", ["N", 3, 8, 8])
    w1 = b.init("W1", skewed((c_mid, 3, 3, 3), 0, seed))
    b1 = b.init("b1", (0.5 * rng.standard_normal(c_mid)).astype(np.float32))
    h = b.op("Conv", [x, w1, b1], name="conv1", pads=[1, 1, 1, 1])
    a = add_act(b, h, act, c_mid)
    kernel = 1 if group2 == 1 else 3
    w2 = b.init("W2", skewed((5 * group2 if group2 > 1 else 5, c_mid // group2, kernel, kernel), 1, seed + 1))
    b2 = b.init("b2", (0.1 * rng.standard_normal(w2.const_value.shape[0])).astype(np.float32))
    y = b.op("Conv", [a, w2, b2], name="conv2", group=group2, output_names=["y"])
    outputs = [y]
    if extra is not None:
        outputs += extra(b, locals())
    return b.model(outputs)


def ranges(w: np.ndarray, axis: int) -> np.ndarray:
    moved = np.moveaxis(np.abs(w), axis, 0)
    return moved.reshape(moved.shape[0], -1).max(axis=1)


def weight(model: ir.Model, name: str) -> np.ndarray:
    return model.graph.initializers[name].const_value.numpy()


def spread(r: np.ndarray) -> float:
    return float(r.max() / r.min())


# ---------------------------------------------------------------------------- exact limits


@pytest.mark.parametrize("act", [None, "Relu", "LeakyRelu", "PRelu"])
def test_conv_pair_is_exact_and_its_ranges_match(act):
    model = conv_pair(act)
    balanced = np.sqrt(ranges(weight(model, "W1"), 0).astype(np.float64) * ranges(weight(model, "W2"), 1))
    p = apply_and_compare(model, EqualizeCrossLayer(), rel=1e-5)
    r1, r2 = ranges(weight(model, "W1"), 0), ranges(weight(model, "W2"), 1)
    np.testing.assert_allclose(r1, r2, rtol=1e-6)
    np.testing.assert_allclose(r1, balanced, rtol=1e-6)
    [record] = records(p, "rewritten")
    assert record.node == "conv1" and "with Conv 'conv2'" in record.detail
    assert f"through {act or 'no activation'}" in record.detail
    assert "channel-range ratio of 'W1'" in record.detail and "s in [" in record.detail


def test_scales_are_sqrt_of_range_ratio_and_the_bias_follows_layer_1():
    model = conv_pair("Relu")
    w1, b1, w2 = weight(model, "W1").copy(), weight(model, "b1").copy(), weight(model, "W2").copy()
    EqualizeCrossLayer()(model)
    s = np.sqrt(ranges(w1, 0).astype(np.float64) / ranges(w2, 1))
    np.testing.assert_allclose(weight(model, "W1"), w1 / s[:, None, None, None], rtol=1e-6)
    np.testing.assert_allclose(weight(model, "b1"), b1 / s, rtol=1e-6)
    np.testing.assert_allclose(weight(model, "W2"), w2 * s[None, :, None, None], rtol=1e-6)


def test_middle_tensors_are_renamed_and_the_output_keeps_its_name():
    model = conv_pair("Relu")
    EqualizeCrossLayer()(model)
    relu = find_node(model, "act")
    assert find_node(model, "conv1").outputs[0].name == "conv1_out0_equalized"
    assert relu.outputs[0].name == "act_out0_equalized"
    assert find_node(model, "conv2").inputs[0] is relu.outputs[0]
    assert [v.name for v in model.graph.outputs] == ["y"]


def depthwise_chain(act: str | None = "Relu", seed: int = 0) -> ir.Model:
    """pointwise → act → depthwise 3x3 → act → pointwise, as in a MobileNetV2 block."""
    rng = np.random.default_rng(seed)
    b = Builder()
    x = b.input("x", ["N", 4, 7, 7])
    h = b.op("Conv", [x, b.init("Wa", skewed((8, 4, 1, 1), 0, seed)),
                      b.init("ba", rng.standard_normal(8).astype(np.float32))], name="expand")
    h = add_act(b, h, act, 8, "act1")
    h = b.op("Conv", [h, b.init("Wd", skewed((8, 1, 3, 3), 0, seed + 1)),
                      b.init("bd", rng.standard_normal(8).astype(np.float32))],
             name="depthwise", group=8, pads=[1, 1, 1, 1])
    h = add_act(b, h, act, 8, "act2")
    y = b.op("Conv", [h, b.init("Wb", skewed((5, 8, 1, 1), 1, seed + 2))], name="project", output_names=["y"])
    return b.model([y])


@pytest.mark.parametrize("act", ["Relu", "PRelu"])
def test_depthwise_middle_chain_is_exact_and_converges(act):
    model = depthwise_chain(act)
    before = [spread(ranges(weight(model, n), 0)) for n in ("Wa", "Wd")]
    p = apply_and_compare(model, EqualizeCrossLayer(), rel=1e-5)
    assert [r.node for r in records(p, "rewritten")] == ["expand", "depthwise"]
    wa, wd, wb = weight(model, "Wa"), weight(model, "Wd"), weight(model, "Wb")
    # At the fixed point both pairs are balanced: r(Wa)_i = r(Wd)_i = r(Wb[:, i]).
    np.testing.assert_allclose(ranges(wa, 0), ranges(wd, 0), rtol=1e-3)
    np.testing.assert_allclose(ranges(wd, 0), ranges(wb, 1), rtol=1e-3)
    assert spread(ranges(wa, 0)) < before[0] and spread(ranges(wd, 0)) < before[1]
    assert any("converged" in note for note in p.notes)


def test_a_second_run_changes_nothing():
    model = depthwise_chain()
    EqualizeCrossLayer()(model)
    snapshot = ir.to_onnx_text(model)
    p = EqualizeCrossLayer()
    assert not p(model).modified
    assert ir.to_onnx_text(model) == snapshot
    assert all("ranges already match" in r for r in refusals(p, "expand"))


def dense_chain(trans_b: int, seed: int = 0) -> ir.Model:
    """x[N,6] → Gemm(transB) → Relu → MatMul + Add(bias) → LeakyRelu → Gemm → y."""
    rng = np.random.default_rng(seed)
    b = Builder()
    x = b.input("x", ["N", 6])
    w1 = skewed((10, 6), 0, seed) if trans_b else skewed((6, 10), 1, seed)
    h = b.op("Gemm", [x, b.init("G1", w1), b.init("c1", rng.standard_normal(10).astype(np.float32))],
             name="gemm1", transB=trans_b, alpha=0.7, beta=1.3)
    h = b.op("Relu", [h], name="relu1")
    h = b.op("MatMul", [h, b.init("M2", skewed((10, 7), 1, seed + 1))], name="matmul2")
    h = b.op("Add", [b.init("c2", rng.standard_normal((1, 7)).astype(np.float32)), h], name="bias2")
    h = b.op("LeakyRelu", [h], name="leaky2", alpha=0.2)
    y = b.op("Gemm", [h, b.init("G3", skewed((7, 4), 0, seed + 2))], name="gemm3", output_names=["y"])
    return b.model([y])


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_and_matmul_pairs_are_exact(trans_b):
    model = dense_chain(trans_b)
    p = apply_and_compare(model, EqualizeCrossLayer(), rel=1e-5)
    assert [r.node for r in records(p, "rewritten")] == ["gemm1", "matmul2"]
    r1 = ranges(weight(model, "G1"), 0 if trans_b else 1)
    np.testing.assert_allclose(r1, ranges(weight(model, "M2"), 0), rtol=1e-3)
    np.testing.assert_allclose(ranges(weight(model, "M2"), 1), ranges(weight(model, "G3"), 0), rtol=1e-3)
    assert find_node(model, "matmul2").outputs[0].name.endswith("_equalized")


def test_scalar_gemm_bias_is_broadcast_per_channel():
    b = Builder()
    x = b.input("x", ["N", 5])
    h = b.op("Gemm", [x, b.init("G1", skewed((5, 6), 1, 0)), b.init("c1", np.array([0.3], np.float32))],
             name="gemm1")
    h = b.op("Relu", [h], name="relu")
    y = b.op("MatMul", [h, b.init("M2", skewed((6, 3), 0, 1))], name="mm", output_names=["y"])
    model = b.model([y])
    apply_and_compare(model, EqualizeCrossLayer(), rel=1e-5)
    assert weight(model, "c1").shape == (6,)
    check(model)


def test_iterations_one_stops_after_one_sweep():
    model = depthwise_chain()
    p = EqualizeCrossLayer(EqualizeCrossLayerOptions(iterations=1))
    apply_and_compare(model, p, rel=1e-5)
    assert any("in 1 sweeps (did not converge" in note for note in p.notes)


# ---------------------------------------------------------------------------- ReLU6


def clip_data(model: ir.Model, count: int = 3) -> list[dict]:
    """Feeds large enough that some channels of conv1 exceed 6 and others stay below it."""
    return [random_feeds(model, seed=10 + i, scale=2.0) for i in range(count)]


def conv1_peaks(model: ir.Model, feeds) -> np.ndarray:
    from onnxcompress.activations import capture

    values = capture(model, ["conv1_out0"], feeds)["conv1_out0"]
    return np.max([v.max(axis=(0, 2, 3)) for v in values], axis=0)


def test_relu6_is_skipped_by_default():
    model = conv_pair("Clip")
    assert_left_alone(EqualizeCrossLayer(), model, "Clip(0, 6) 'act' is not positively homogeneous", "conv1")


def test_relu6_calibrated_is_exact_on_its_feeds_and_keeps_clipped_channels():
    model = conv_pair("Clip", c_mid=8, seed=3)
    feeds = clip_data(model)
    peaks = conv1_peaks(model, feeds)
    clipped = peaks > 6
    assert clipped.any() and not clipped.all()  # the test data exercises both rules
    w1 = weight(model, "W1").copy()
    before = [run(model, f) for f in feeds]
    p = EqualizeCrossLayer(EqualizeCrossLayerOptions(relu6="calibrated"), PassContext(calibration=feeds))
    assert p(model).modified
    check(model)
    for feed, expected in zip(feeds, before):
        assert_close(expected, run(model, feed), rel=1e-5)
    s = w1[:, 0, 0, 0].astype(np.float64) / weight(model, "W1")[:, 0, 0, 0]
    np.testing.assert_allclose(s[clipped], 1.0, rtol=1e-6)
    assert np.all(s[~clipped] >= peaks[~clipped] / 6 * (1 - 1e-6))  # nothing newly clipped
    assert np.any(np.abs(s[~clipped] - 1) > 1e-3)
    [record] = records(p, "rewritten")
    assert "through Clip(0, 6)" in record.detail
    assert f"{int(clipped.sum())} of 8 channels clipped on the calibration data keep s = 1" in record.detail


def test_relu6_calibrated_needs_calibration_data():
    with pytest.raises(CalibrationError, match="--calib"):
        EqualizeCrossLayer(EqualizeCrossLayerOptions(relu6="calibrated"))(conv_pair("Clip"))


def test_relu6_relu_replaces_the_clip_and_says_it_is_not_exact():
    model = conv_pair("Clip")
    reference = conv_pair("Relu")  # same weights (same seed), Relu in place of the Clip
    feeds = random_feeds(model, seed=1)
    p = EqualizeCrossLayer(EqualizeCrossLayerOptions(relu6="relu"))
    assert p(model).modified
    check(model)
    assert "Clip" not in ops(model) and "Relu" in ops(model)
    assert "act_lo" not in model.graph.initializers
    assert_close(run(reference, feeds), run(model, feeds), rel=1e-5)
    [record] = records(p, "rewritten")
    assert "Clip(0, 6) replaced by Relu (not exact)" in record.detail


def test_clip_without_upper_bound_is_relu():
    b = Builder()
    x = b.input("x", ["N", 3, 6, 6])
    h = b.op("Conv", [x, b.init("W1", skewed((4, 3, 1, 1), 0, 0))], name="conv1")
    h = b.op("Clip", [h, b.init("lo", np.array(0, np.float32))], name="clip")
    y = b.op("Conv", [h, b.init("W2", skewed((2, 4, 1, 1), 1, 1))], name="conv2", output_names=["y"])
    p = apply_and_compare(b.model([y]), EqualizeCrossLayer(), rel=1e-5)
    assert "through Clip:" in records(p, "rewritten")[0].detail


# ---------------------------------------------------------------------------- refusals


def test_grouped_conv_is_refused():
    assert_left_alone(EqualizeCrossLayer(), conv_pair("Relu", group2=2), "grouped Conv (group=2", "conv1")


def test_shared_layer1_weight_is_refused():
    def other_reader(b, names):
        return [b.op("Conv", [names["x"], names["w1"]], name="other", pads=[1, 1, 1, 1])]

    model = conv_pair("Relu", extra=other_reader)
    assert_left_alone(EqualizeCrossLayer(), model, "weight 'W1' is shared with 'other' (Conv)", "conv1")


def test_shared_layer1_bias_is_refused():
    def other_reader(b, names):
        return [b.op("Add", [names["x"], names["b1"]], name="reads_bias")]

    model = conv_pair("Relu", c_mid=8, extra=other_reader)
    assert_left_alone(EqualizeCrossLayer(), model, "bias 'b1' is shared with 'reads_bias' (Add)", "conv1")


def test_shared_layer2_weight_is_refused():
    b = Builder()
    x = b.input("x", ["N", 6, 5, 5])
    w2 = b.init("W2", skewed((4, 6, 1, 1), 1, 1))
    h = b.op("Relu", [b.op("Conv", [x, b.init("W1", skewed((6, 6, 1, 1), 0, 0))], name="conv1")], name="relu")
    y = b.op("Conv", [h, w2], name="conv2", output_names=["y"])
    z = b.op("Conv", [x, w2], name="other", output_names=["z"])
    assert_left_alone(EqualizeCrossLayer(), b.model([y, z]),
                      "next layer 'conv2': weight 'W2' is shared with 'other' (Conv)", "conv1")


def test_middle_tensor_with_two_consumers_is_refused():
    def second_consumer(b, names):
        return [b.op("Neg", [names["h"]], name="neg")]

    model = conv_pair("Relu", extra=second_consumer)
    assert_left_alone(EqualizeCrossLayer(), model, "its output 'conv1_out0' has 2 consumers", "conv1")


def test_middle_tensor_that_is_a_graph_output_is_refused():
    model = conv_pair("Relu", extra=lambda b, names: [names["a"]])
    assert_left_alone(EqualizeCrossLayer(), model, "the Relu output 'act_out0' is a graph output", "conv1")


def test_sigmoid_in_between_is_refused():
    model = conv_pair("Sigmoid")
    assert_left_alone(EqualizeCrossLayer(), model,
                      "Sigmoid 'act' between it and 'conv2' is not positively homogeneous", "conv1")


def test_clip_with_a_negative_floor_is_refused():
    b = Builder()
    x = b.input("x", ["N", 3, 6, 6])
    h = b.op("Conv", [x, b.init("W1", skewed((4, 3, 1, 1), 0, 0))], name="conv1")
    h = b.op("Clip", [h, b.init("lo", np.array(-1, np.float32)), b.init("hi", np.array(1, np.float32))], name="clip")
    y = b.op("Conv", [h, b.init("W2", skewed((2, 4, 1, 1), 1, 1))], name="conv2", output_names=["y"])
    options = EqualizeCrossLayerOptions(relu6="relu")
    assert_left_alone(EqualizeCrossLayer(options), b.model([y]), "Clip(-1, 1) 'clip' is not positively homogeneous",
                      "conv1")


def test_conv_feeding_a_gemm_through_flatten_is_refused():
    b = Builder()
    x = b.input("x", ["N", 3, 1, 1])
    h = b.op("Conv", [x, b.init("W1", skewed((4, 3, 1, 1), 0, 0))], name="conv1")
    h = b.op("Flatten", [h], name="flatten")
    y = b.op("Gemm", [h, b.init("G", skewed((4, 2), 0, 1))], name="gemm", output_names=["y"])
    assert_left_alone(EqualizeCrossLayer(), b.model([y]), "Flatten 'flatten' between it and 'gemm' is not an activation", "conv1")


def test_excluded_pair_is_refused():
    options = EqualizeCrossLayerOptions(exclude="^conv2$")
    assert_left_alone(EqualizeCrossLayer(options), conv_pair("Relu"), "excluded by exclude=^conv2$", "conv1")


def test_model_without_pairs_is_not_modified():
    b = Builder()
    x = b.input("x", ["N", 3, 6, 6])
    h = b.op("Conv", [x, b.init("W1", skewed((4, 3, 1, 1), 0, 0))], name="conv1")
    y = b.op("GlobalAveragePool", [h], name="pool", output_names=["y"])
    assert_left_alone(EqualizeCrossLayer(), b.model([y]), "its output feeds GlobalAveragePool 'pool'", "conv1")


# ---------------------------------------------------------------------------- options, pipeline


@pytest.mark.parametrize("values, message", [
    ({"iterations": "0"}, "option 'iterations' must be at least 1"),
    ({"tolerance": "-1"}, "option 'tolerance' must be a finite number"),
    ({"relu6": "clamp"}, "option 'relu6' must be one of skip|calibrated|relu"),
    ({"exclude": "("}, "option 'exclude' is not a valid regular expression"),
])
def test_bad_options(values, message):
    with pytest.raises(OptionError, match="equalize-cross-layer: " + message.replace("|", r"\|")):
        parse_options(EqualizeCrossLayerOptions, values)


def test_pipeline_runs_it_after_its_prerequisites():
    model = depthwise_chain()
    feeds = [random_feeds(model, seed=1)]
    result = onnxcompress.compress(model, "equalize-cross-layer", calibration=feeds)
    names = [entry.name for entry in result.report.passes]
    assert names.index("fold-batchnorm") < names.index("equalize-cross-layer")
    entry = next(e for e in result.report.passes if e.name == "equalize-cross-layer")
    assert entry.status == "changed"
    assert_close(run(model, feeds[0]), run(result.model, feeds[0]), rel=1e-5)


def test_candidates_list_the_pairs():
    found = EqualizeCrossLayer().candidates(depthwise_chain())
    assert [(c.node, c.what) for c in found] == [
        ("expand", "equalize with Conv 'depthwise' through Relu"),
        ("depthwise", "equalize with Conv 'project' through Relu"),
    ]
