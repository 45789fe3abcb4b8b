"""The tuner's latency estimate: int8 MACs, and the int8 conversions onnxruntime cannot fold."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxcompress
from onnxcompress.modelio import load_model
from onnxcompress.sensitivity import Objective, latency_terms, unfolded_conversions

RNG = np.random.default_rng(3)
SHAPES = {"x": [1, 4, 8, 8]}
# MACs: a 8·64·(4·9) = 18432, b (1x1, 8->8) 8·64·8 = 4096, d (depthwise 3x3) 8·64·9 = 4608,
# c (1x1, 8->4) 4·64·8 = 2048; activations: x 256, a 512, b 512, d 512, y 256 elements
MACS = {"a": 18432, "b": 4096, "d": 4608, "c": 2048}


def _chain() -> onnx.ModelProto:
    """x -> a (3x3, 4->8) -> b (1x1) -> d (depthwise 3x3) -> c (1x1, 8->4) -> y, each a Conv."""
    def conv(name, src, dst, shape, **attrs):
        weight = numpy_helper.from_array((RNG.standard_normal(shape) * 0.3).astype(np.float32), f"{name}.w")
        return helper.make_node("Conv", [src, weight.name], [dst], name=name, **attrs), weight

    parts = [conv("a", "x", "a.out", (8, 4, 3, 3), pads=[1, 1, 1, 1]), conv("b", "a.out", "b.out", (8, 8, 1, 1)),
             conv("d", "b.out", "d.out", (8, 1, 3, 3), pads=[1, 1, 1, 1], group=8), conv("c", "d.out", "y", (4, 8, 1, 1))]
    graph = helper.make_graph([n for n, _ in parts], "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])], [w for _, w in parts])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _quantized(nodes: list[str]):
    feeds = [{"x": RNG.standard_normal((1, 4, 8, 8)).astype(np.float32)} for _ in range(4)]
    inner = ",".join(f"@{n}{{skip=false}}" for n in nodes)
    return onnxcompress.compress(_chain(), f"infer-shapes,quantize-qdq{{{inner},@.*{{skip=true}}}}", calibration=feeds).model


def _int8(terms) -> tuple[int, int, int]:
    assert terms.kernel_macs["dynamic int8"] == terms.kernel_macs["int4"] == 0
    return terms.kernel_macs["int8"], terms.kernel_macs["depthwise int8"], terms.converted


def test_a_float_model_costs_its_macs():
    model = load_model(_chain())
    terms = latency_terms(model, SHAPES)
    assert (terms.macs, *_int8(terms)) == (sum(MACS.values()), 0, 0, 0)
    assert Objective("latency", SHAPES)(model) == sum(MACS.values())


def test_one_int8_conv_between_float_ones_pays_for_both_conversions():
    model = _quantized(["b"])
    assert [v.name for v in unfolded_conversions(model)] == ["a.out", "b.out_dequantized"]
    terms = latency_terms(model, SHAPES)
    assert _int8(terms) == (MACS["b"], 0, 512 + 512)
    expected = sum(MACS.values()) - (1 - Objective.MAC_COSTS["int8"]) * MACS["b"] + Objective.CONVERSION_COST * 1024
    assert Objective("latency", SHAPES)(model) == pytest.approx(expected, rel=1e-12)
    # 4096 MACs at 0.6 of the price do not pay for converting 1024 elements
    assert Objective("latency", SHAPES)(model) > sum(MACS.values())


def test_inside_a_run_of_int8_convs_the_conversions_fold_away():
    model = _quantized(["a", "b", "d"])
    assert [v.name for v in unfolded_conversions(model)] == ["x", "d.out_dequantized"]
    terms = latency_terms(model, SHAPES)
    # the graph input is quantized for a, and d's output dequantized for the float c
    assert _int8(terms) == (MACS["a"] + MACS["b"], MACS["d"], 256 + 512)
    expected = (sum(MACS.values()) - (1 - Objective.MAC_COSTS["int8"]) * (MACS["a"] + MACS["b"])
                - (1 - Objective.MAC_COSTS["depthwise int8"]) * MACS["d"] + Objective.CONVERSION_COST * 768)
    assert Objective("latency", SHAPES)(model) == pytest.approx(expected, rel=1e-12)


def test_a_conv_whose_output_is_not_quantized_runs_in_float():
    """The last conv feeds the graph output, which is not quantized: onnxruntime folds its
    weight's DequantizeLinear and runs it in float, so its MACs are float ones and its input
    is a conversion."""
    model = _quantized(["a", "b", "d", "c"])
    assert not any(n.op_type == "QuantizeLinear" and n.inputs[0].name == "y" for n in model.graph)
    assert [v.name for v in unfolded_conversions(model)] == ["x", "d.out_dequantized"]
    terms = latency_terms(model, SHAPES)
    assert _int8(terms) == (MACS["a"] + MACS["b"], MACS["d"], 256 + 512)


def test_without_input_shapes_conversions_count_at_the_batch_the_macs_assume():
    model = _quantized(["b"])
    # compute_cost takes batch 1 for the symbolic first dim; the conversions follow it
    assert latency_terms(model, {}) == latency_terms(model, SHAPES)
    assert latency_terms(model, {}).converted == 512 + 512


def test_unknown_dims_count_no_conversion():
    model = _quantized(["b"])
    for value in unfolded_conversions(model):
        value.shape = ir.Shape([None, *value.shape[1:]])  # a dim nothing names
    assert latency_terms(model, SHAPES).converted == 0


@pytest.mark.parametrize("pipeline, kind", [
    ("quantize-dynamic{storage=int8}", "dynamic int8"), ("quantize-dynamic{storage=int7}", "dynamic int8"),
    ("quantize-dynamic{storage=uint8}", "dynamic uint8"), ("quantize-weights-int4{block_size=16}", "int4")])
def test_weight_only_matmuls_cost_their_kernels_macs(pipeline, kind):
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="m")], "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5, 32])],
        [numpy_helper.from_array(RNG.standard_normal((64, 32)).astype(np.float32), "w")])
    model = onnxcompress.compress(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), pipeline).model
    terms = latency_terms(model, {"x": [1, 5, 64]})
    macs = 5 * 64 * 32
    assert terms.macs == macs and terms.converted == 0
    assert terms.kernel_macs == {k: (macs if k == kind else 0) for k in Objective.MAC_COSTS}
    assert Objective("latency", {"x": [1, 5, 64]})(model) == pytest.approx(Objective.MAC_COSTS[kind] * macs, rel=1e-12)
