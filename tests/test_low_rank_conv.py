"""low-rank-conv: exact at the weight's true rank for every conv geometry, every refusal,
data-aware fitting on im2col patches, mobilenet_v2 and digits_cnn.

The full-rank limit of the factorisation itself is tested in test_low_rank_gemm.py (the same
onnxcompress.factorize math); here a conv whose W (N×C·k·k) has true rank r must be
reproduced to float tolerance by the r-filter conv and the 1×1 conv.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnxcompress.passes.low_rank_conv import LowRankConv, LowRankConvOptions

import onnxcompress
from onnxcompress.errors import CalibrationError, OptionError
from onnxcompress.factorize import low_rank_factors
from onnxcompress.pass_base import PassContext
from onnxcompress.pipeline import Pipeline
from onnxcompress.reconstruct import conv_geometry, im2col
from tests.graphs import (
    Builder,
    assert_close,
    assert_left_alone,
    check,
    find_node,
    ops,
    random_feeds,
    records,
    run,
)

RNG = np.random.default_rng(0)


def low_rank_weight(n: int, c: int, kernel, r: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    k = c * int(np.prod(kernel))
    w = rng.standard_normal((n, r)) @ rng.standard_normal((r, k)) / np.sqrt(r * k)
    return w.reshape(n, c, *kernel).astype(np.float32)


def conv_model(w: np.ndarray, size=9, bias=True, name="conv", **attributes) -> ir.Model:
    spatial = w.ndim - 2
    b = Builder()
    x = b.input("x", ["N", w.shape[1] * attributes.get("group", 1)] + [size] * spatial)
    inputs = [x, b.init("W", w)]
    if bias:
        inputs.append(b.init("B", RNG.standard_normal(w.shape[0]).astype(np.float32)))
    y = b.op("Conv", inputs, name=name, output_names=["y"], **attributes)
    return b.model([y])


def apply(model: ir.Model, feeds=None, **options) -> LowRankConv:
    options.setdefault("min_elements", 0)
    p = LowRankConv(LowRankConvOptions(**options), PassContext(calibration=feeds))
    p(model)
    return p


def assert_untouched(model: ir.Model, reason: str, node: str = "conv", **options) -> None:
    assert_left_alone(LowRankConv(LowRankConvOptions(**{"min_elements": 0, **options})), model, reason, node)


# ---------------------------------------------------------------------------- exact cases


GEOMETRIES = {
    "3x3 pads": ((3, 3), {"pads": [1, 1, 1, 1]}),
    "stride 2 asymmetric pads": ((3, 3), {"strides": [2, 2], "pads": [0, 1, 1, 0]}),
    "dilation 2": ((3, 3), {"dilations": [2, 2], "pads": [2, 2, 2, 2]}),
    "same_upper stride 2": ((3, 3), {"auto_pad": "SAME_UPPER", "strides": [2, 2]}),
    "valid 5x3": ((5, 3), {"auto_pad": "VALID"}),
    "1x1": ((1, 1), {}),
    "conv1d": ((3,), {"pads": [1, 1]}),
    "conv3d": ((3, 3, 3), {"pads": [1, 1, 1, 1, 1, 1]}),
}


@pytest.mark.parametrize("kernel, attributes", GEOMETRIES.values(), ids=GEOMETRIES.keys())
def test_true_rank_conv_is_reproduced_at_its_rank(kernel, attributes):
    w = low_rank_weight(24, 8, kernel, r=3)
    model = conv_model(w, size=6 if len(kernel) == 3 else 9, **attributes)
    feeds = random_feeds(model)
    before = run(model, feeds)
    p = apply(model, rank=3)
    assert [r.action for r in records(p)] == ["rewritten"], p.records
    assert ops(model) == ["Conv", "Conv"]
    first = find_node(model, "conv/lowrank_a")
    second = find_node(model, "conv")
    assert tuple(first.inputs[1].const_value.shape) == (3, 8, *kernel)
    assert tuple(second.inputs[1].const_value.shape) == (24, 3) + (1,) * len(kernel)
    assert second.inputs[2].name == "B"  # the bias moves to the 1×1 conv
    assert "W" not in model.graph.initializers
    check(model)
    assert_close(before, run(model, feeds), rel=1e-5)


def test_conv_without_bias_and_the_report_line():
    model = conv_model(low_rank_weight(32, 16, (3, 3), r=4), bias=False, pads=[1, 1, 1, 1])
    feeds = random_feeds(model)
    before = run(model, feeds)
    p = apply(model, energy=0.99999)
    assert records(p)[0].detail.startswith("rank 4 of 32 (weight energy kept 1.0000, svd): "
                                           "4,608 → 704 weights and MACs per output position")
    assert len(find_node(model, "conv").inputs) == 2
    assert_close(before, run(model, feeds), rel=1e-5)


def test_full_rank_factors_compute_the_conv():
    """The math at full rank (which the pass refuses): the two convs' im2col products equal the conv's."""
    w = RNG.standard_normal((6, 4, 3, 3))
    a, b = low_rank_factors(w.reshape(6, -1).T, 6)
    x = RNG.standard_normal((1, 4, 7, 7))
    patches = im2col(x, *conv_geometry(ir.node("Conv", [None, None], {"pads": [1, 1, 1, 1]}), w.shape, x.shape))
    np.testing.assert_allclose(patches @ a @ b, patches @ w.reshape(6, -1).T, atol=1e-9)


def test_lineage_and_cost_through_compress():
    model = conv_model(low_rank_weight(32, 16, (3, 3), r=4), pads=[1, 1, 1, 1])
    result = onnxcompress.compress(model, "low-rank-conv{rank=4,min_elements=0}")
    convs = [n for n in result.model.graph if n.op_type == "Conv"]
    assert len(convs) == 2 and all(n.metadata_props.get("onnxcompress.pass") == "low-rank-conv" for n in convs)
    assert result.report.final_cost["macs"] < result.report.input_cost["macs"]
    assert result.report.final_cost["params"] == 4 * (16 * 9 + 32) + 32


def test_shared_conv_weight_is_factored_once():
    w = low_rank_weight(8, 8, (3, 3), r=2)
    b = Builder()
    x = b.input("x", ["N", 8, 6, 6])
    weight = b.init("W", w)
    h = b.op("Conv", [x, weight], name="conv1", pads=[1, 1, 1, 1])
    y = b.op("Conv", [b.op("Relu", [h]), weight], name="conv2", output_names=["y"], pads=[1, 1, 1, 1])
    model = b.model([y])
    feeds = random_feeds(model)
    before = run(model, feeds)
    p = apply(model, rank=2)
    assert [r.action for r in records(p)] == ["rewritten", "rewritten"]
    assert "shared by 2 convs" in records(p)[0].detail
    assert len(model.graph.initializers) == 2
    assert_close(before, run(model, feeds), rel=1e-5)


# ---------------------------------------------------------------------------- refusals


def test_would_not_shrink_names_the_numbers():
    model = conv_model(RNG.standard_normal((16, 3, 3, 3)).astype(np.float32), pads=[1, 1, 1, 1])
    assert_untouched(model, "would not shrink: r(C·kh·kw+N)=16·(27+16)=688 ≥ C·kh·kw·N=27·16=432", ratio=1.0)
    assert_untouched(model, "would not shrink: r(C·kh·kw+N)=11·(27+16)=473", rank=11)
    assert_untouched(model, "rank=17 is more than the full rank", rank=17)


@pytest.mark.parametrize("group, kind", [(2, "grouped conv (group=2)"), (8, "depthwise conv (group=8)")])
def test_grouped_and_depthwise_convs_are_refused(group, kind):
    w = RNG.standard_normal((16, 8 // group, 3, 3)).astype(np.float32)
    model = conv_model(w, group=group, pads=[1, 1, 1, 1])
    assert_untouched(model, f"{kind}: already factorised per group", rank=1)


def test_non_constant_weight_is_refused():
    b = Builder()
    x = b.input("x", ["N", 4, 6, 6])
    w = b.input("w", [8, 4, 3, 3])
    y = b.op("Conv", [x, w], name="conv")
    assert_untouched(b.model([y]), "weight 'w' is a graph input, not a constant", rank=1)
    b = Builder()
    x = b.input("x", ["N", 4, 6, 6])
    w = b.op("Abs", [b.init("W", RNG.standard_normal((8, 4, 3, 3)).astype(np.float32))], name="abs")
    y = b.op("Conv", [x, w], name="conv")
    assert_untouched(b.model([y]), "is not constant (computed by Abs 'abs')", rank=1)


def test_excluded_and_small_convs_are_refused():
    model = conv_model(low_rank_weight(32, 16, (3, 3), r=2), pads=[1, 1, 1, 1])
    assert_untouched(model, "excluded by exclude=conv", rank=2, exclude="conv")
    assert_untouched(model, "weight 'W' has 4,608 elements, fewer than min_elements=5,000", rank=2,
                     min_elements=5000)
    (candidate,) = LowRankConv().candidates(model)  # the default energy finds the true rank
    assert candidate.node == "conv" and "rank 2 of 32" in candidate.what and "4,608 → 352 weights" in candidate.what
    assert LowRankConv(LowRankConvOptions(exclude="conv")).candidates(model) == []
    assert LowRankConv(LowRankConvOptions(min_elements=5000)).candidates(model) == []


def test_weight_also_read_inside_a_subgraph_is_refused():
    import onnx
    from onnx import TensorProto, helper

    w = onnx.numpy_helper.from_array(low_rank_weight(8, 8, (3, 3), r=1), "W")
    branch = helper.make_graph([helper.make_node("Conv", ["x", "W"], ["inner"], name="inner_conv", pads=[1, 1, 1, 1])],
                               "then", [], [helper.make_tensor_value_info("inner", TensorProto.FLOAT, [1, 8, 5, 5])])
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("If", ["flag"], ["d"], name="if", then_branch=branch, else_branch=branch),
         helper.make_node("Add", ["c", "d"], ["y"], name="add")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 5, 5]),
              helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 5, 5])], [w])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    assert_untouched(model, "weight 'W' is also read by 'inner_conv' (Conv), which is not factorised with it", rank=1)


# ---------------------------------------------------------------------------- data-aware


def test_data_aware_beats_plain_on_anisotropic_inputs():
    w = RNG.standard_normal((24, 12, 3, 3)).astype(np.float32)
    model = conv_model(w, size=8, pads=[1, 1, 1, 1])
    scale = np.geomspace(0.02, 5, 12).astype(np.float32).reshape(1, 12, 1, 1)
    rng = np.random.default_rng(3)

    def feeds(count):
        return [{"x": (rng.standard_normal((2, 12, 8, 8)) * scale).astype(np.float32)} for _ in range(count)]

    calibration, held_out = feeds(6), feeds(4)
    ref = [run(model, f)[0] for f in held_out]

    def error(m):
        return sum(float(np.linalg.norm(run(m, f)[0] - r)) for f, r in zip(held_out, ref))

    plain, aware = ir.from_proto(ir.to_proto(model)), ir.from_proto(ir.to_proto(model))
    apply(plain, rank=6)
    p = apply(aware, calibration, rank=6, data_aware=True)
    assert "data-aware" in records(p)[0].detail
    assert error(aware) < 0.8 * error(plain)
    check(aware)
    with pytest.raises(CalibrationError, match="low-rank-conv with data_aware=true needs calibration data"):
        apply(ir.from_proto(ir.to_proto(model)), rank=6, data_aware=True)


@pytest.mark.parametrize(
    "text, message",
    [
        ("low-rank-conv{rank=4,ratio=0.5}", "low-rank-conv: option 'ratio' cannot be combined with rank"),
        ("low-rank-conv{ratio=0}", None),
        ("low-rank-conv{energy=-0.1}", "low-rank-conv: option 'energy' must lie in"),
        ("low-rank-conv{damping=-1}", "low-rank-conv: option 'damping' must be a positive number"),
    ],
)
def test_options(text, message):
    if message is None:
        assert str(Pipeline.parse(text)) == "lift-constants,fold-batchnorm,low-rank-conv"
        return
    with pytest.raises(OptionError, match=message):
        Pipeline.parse(text)


# ---------------------------------------------------------------------------- real models


@pytest.mark.real_model
def test_mobilenet_depthwise_convs_are_left_alone_with_the_reason():
    import models

    result = onnxcompress.compress(models.fetch("mobilenet_v2"), "low-rank-conv{ratio=0.25}", verify=False)
    entry = next(p for p in result.report.passes if p.name == "low-rank-conv")
    depthwise = [r for r in entry.records if r.detail.startswith("depthwise conv (group=")]
    assert len(depthwise) == 17 and all("already factorised per group" in r.detail for r in depthwise)
    rewritten = [r for r in entry.records if r.action == "rewritten"]
    small = [r for r in entry.records if "fewer than min_elements=4,096" in r.detail]
    assert len(rewritten) == 28 and len(small) == 7  # 35 plain convs; 1 Gemm is low-rank-gemm's
    assert len(entry.records) == 52
    check(result.model, full=False)


@pytest.mark.real_model
def test_digits_cnn_keeps_its_accuracy(tmp_path):
    import models

    feeds = models.calibration_feeds("digits_cnn", 16)
    for pipeline, changes in (("low-rank-conv{energy=0.99}", False), ("low-rank-conv{ratio=0.3,data_aware=true}", True)):
        result = onnxcompress.compress(models.fetch("digits_cnn"), pipeline, calibration=feeds)
        entry = next(p for p in result.report.passes if p.name == "low-rank-conv")
        assert (entry.status == "changed") == changes
        assert all(r.action == "rewritten" or "would not shrink" in r.detail or "min_elements" in r.detail
                   for r in entry.records)
        path = tmp_path / "digits.onnx"
        result.save(path)
        accuracy = models.evaluate("digits_cnn", path)["accuracy"]
        print(f"digits_cnn {pipeline}: accuracy {accuracy:.4f}, params {result.report.input_cost['params']:,}"
              f" → {result.report.final_cost['params']:,}")
        assert accuracy >= 0.95
