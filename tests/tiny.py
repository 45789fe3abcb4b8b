"""A tiny classifier model and feeds for fast tests; and test-only passes for the manager."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_ir as ir

from onnxcompress.options import PassOptions, option
from onnxcompress.pass_base import CompressionPass
from onnxcompress.registry import register


def tiny_classifier(seed: int = 0) -> onnx.ModelProto:
    """x[N,4] -> Gemm(8) -> Relu -> Gemm(3) -> y[N,3], weights as initializers."""
    rng = np.random.default_rng(seed)
    w1 = onnx.numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w1")
    b1 = onnx.numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b1")
    w2 = onnx.numpy_helper.from_array(rng.standard_normal((3, 8)).astype(np.float32), "w2")
    b2 = onnx.numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "b2")
    nodes = [
        onnx.helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
        onnx.helper.make_node("Relu", ["h"], ["r"], name="relu"),
        onnx.helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="fc2", transB=1),
    ]
    graph = onnx.helper.make_graph(
        nodes,
        "tiny",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 3])],
        [w1, b1, w2, b2],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def tiny_feeds(count: int = 8, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((2, 4)).astype(np.float32)} for _ in range(count)]


# Test-only passes, registered under names no built-in pass uses.


def _first_gemm_weight(model: ir.Model) -> ir.Value:
    node = next(n for n in model.graph if n.op_type == "Gemm")
    return node.inputs[1]


@dataclasses.dataclass(frozen=True)
class ScaleOptions(PassOptions):
    factor: float = option(1.5, "multiply the first Gemm weight by this")


@register
class ScaleFirstWeight(CompressionPass):
    """Test pass: scale the first Gemm weight (a controllable amount of drift)."""

    name = "test-scale-weight"
    Options = ScaleOptions
    lossless = False

    def call(self, model):
        value = _first_gemm_weight(model)
        array = value.const_value.numpy() * np.float32(self.options.factor)
        value.const_value = ir.tensor(array, name=value.name)
        self.rewrote(value.uses()[0].node, f"scaled by {self.options.factor}")
        return ir.passes.PassResult(model, modified=self.options.factor != 1.0)


@register
class AddIdentity(CompressionPass):
    """Test pass: insert an Identity before the first Relu (a new node, for lineage)."""

    name = "test-add-identity"

    def call(self, model):
        relu = next(n for n in model.graph if n.op_type == "Relu")
        node = ir.node("Identity", [relu.inputs[0]], name="inserted")
        model.graph.insert_before(relu, node)
        relu.replace_input_with(0, node.outputs[0])
        return ir.passes.PassResult(model, modified=True)


@register
class Explode(CompressionPass):
    """Test pass: raise, as a buggy pass would."""

    name = "test-raise"

    def call(self, model):
        raise RuntimeError("boom in test pass")


@register
class BreakModel(CompressionPass):
    """Test pass: make the model invalid ONNX (an op type that does not exist)."""

    name = "test-break"

    def call(self, model):
        relu = next(n for n in model.graph if n.op_type == "Relu")
        relu.op_type = "NoSuchOp"
        return ir.passes.PassResult(model, modified=True)


@register
class NeedsScale(CompressionPass):
    """Test pass: does nothing, but must run after test-scale-weight."""

    name = "test-needs-scale"
    prerequisites = ("test-scale-weight",)
    skippable = False

    def call(self, model):
        return ir.passes.PassResult(model, modified=False)
