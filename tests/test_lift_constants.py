"""lift-constants: Constant nodes become initializers, bit-exactly; the refusals."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxcompress.errors import OptionError
from onnxcompress.passes.lift_constants import LiftConstants
from tests.graphs import (
    Builder,
    assert_identical,
    check,
    from_text,
    ops,
    random_feeds,
    records,
    refusals,
    run,
)


def paddle_style_model() -> ir.Model:
    """Conv weight and bias, a Reshape shape and a Mul scalar all held by Constant nodes."""
    rng = np.random.default_rng(0)
    b = Builder()
    x = b.input("x", ["N", 3, 5, 5])
    w = b.const("W", rng.standard_normal((4, 3, 3, 3)).astype(np.float32))
    bias = b.const("b", rng.standard_normal(4).astype(np.float32))
    h = b.op("Conv", [x, w, bias], name="conv", pads=[1, 1, 1, 1])
    shape = b.const("shape", np.array([0, -1], np.int64))
    flat = b.op("Reshape", [h, shape], name="reshape")
    half = b.const("half", np.array(0.5, np.float32))
    y = b.op("Mul", [flat, half], name="mul", output_names=["y"])
    return b.model([y])


ATTRIBUTE_KINDS = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2, 3] x) => (float[2, 3] y, int64[3] z) {
  f = Constant <value_float = 2.5> ()
  fs = Constant <value_floats = [1.0, -2.0, 3.5]> ()
  i = Constant <value_int = 3> ()
  is = Constant <value_ints = [4, 5, 6]> ()
  t = Constant <value = double[3] {0.1, 0.2, 0.3}> ()
  a = Mul (x, f)
  td = Cast <to = 1> (t)
  b = Add (a, fs)
  y = Sub (b, td)
  z = Add (is, i)
}
"""


def test_lifts_every_weight_bit_exactly():
    model = paddle_style_model()
    feeds = random_feeds(model)
    before = run(model, feeds)
    p = LiftConstants()
    result = p(model)
    assert result.modified
    assert "Constant" not in ops(model)
    assert set(model.graph.initializers) == {"W", "b", "shape", "half"}
    assert model.graph.initializers["W"].const_value.shape == (4, 3, 3, 3)
    assert len(records(p, "rewritten")) == 4 and not records(p, "refused")
    assert p.notes == ["lifted 4 Constant nodes to initializers"]
    check(model)
    assert_identical(before, run(model, feeds))


def test_second_run_and_nothing_to_do_are_unmodified():
    model = paddle_style_model()
    assert LiftConstants()(model).modified
    p = LiftConstants()
    assert not p(model).modified
    assert p.records == [] and p.notes == []


@pytest.mark.parametrize("name", ["f", "fs", "i", "is", "t"])
def test_every_attribute_kind_is_lifted_with_its_dtype(name):
    model = from_text(ATTRIBUTE_KINDS)
    feeds = random_feeds(model)
    before = run(model, feeds)
    assert LiftConstants()(model).modified
    lifted = model.graph.initializers[name].const_value
    expected = {"f": (ir.DataType.FLOAT, ()), "fs": (ir.DataType.FLOAT, (3,)),
                "i": (ir.DataType.INT64, ()), "is": (ir.DataType.INT64, (3,)),
                "t": (ir.DataType.DOUBLE, (3,))}[name]
    assert (lifted.dtype, tuple(lifted.shape)) == expected
    check(model)
    assert_identical(before, run(model, feeds))


def test_size_limit_keeps_small_constants_and_says_why():
    model = paddle_style_model()
    p = LiftConstants(LiftConstants.Options(size_limit=3))
    assert p(model).modified
    assert set(model.graph.initializers) == {"W", "b"}
    assert ops(model).count("Constant") == 2
    assert refusals(p, "const_shape") == ["2 elements, under size_limit=3"]
    assert refusals(p, "const_half") == ["1 elements, under size_limit=3"]


def test_size_limit_must_not_be_negative():
    with pytest.raises(OptionError, match="size_limit"):
        LiftConstants.Options(size_limit=-1)


def test_constant_that_is_a_graph_output_is_refused():
    model = from_text("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2] x) => (float[2] y, float[2] k) {
      k = Constant <value = float[2] {1, 2}> ()
      y = Add (x, k)
    }""")
    p = LiftConstants()
    assert not p(model).modified
    assert ops(model) == ["Constant", "Add"]
    assert refusals(p) == ["its output is a graph output"]


IF_MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2] x, bool c) => (float[2] y) {
  y = If (c) <
    then_branch = then_g () => (float[2] t) {
      k = Constant <value = float[2] {1.5, 2.5}> ()
      t = Mul (x, k)
    },
    else_branch = else_g () => (float[2] e) {
      k2 = Constant <value_floats = [3.0, 4.0]> ()
      e = Add (x, k2)
    }
  >
}
"""


def test_constants_in_if_branches_become_branch_initializers():
    model = from_text(IF_MODEL)
    x = np.array([0.3, -1.7], np.float32)
    feeds = [{"x": x, "c": np.array(flag)} for flag in (True, False)]
    before = [run(model, f) for f in feeds]
    p = LiftConstants()
    assert p(model).modified
    assert "Constant" not in ops(model)
    assert not model.graph.initializers
    branches = model.graph.node(0).attributes
    assert set(branches["then_branch"].as_graph().initializers) == {"k"}
    assert set(branches["else_branch"].as_graph().initializers) == {"k2"}
    check(model)
    for f, expected in zip(feeds, before):
        assert_identical(expected, run(model, f))


def test_constants_in_functions_are_refused():
    model = from_text("""
    <ir_version: 8, opset_import: ["" : 17, "local" : 1]>
    g (float[2] x) => (float[2] y) {
      y = local.AddK (x)
    }
    <domain: "local", opset_import: ["" : 17]>
    AddK (a) => (b) {
      k = Constant <value = float[2] {1, 2}> ()
      b = Add (a, k)
    }""")
    p = LiftConstants()
    assert not p(model).modified
    assert refusals(p) == ["in function 'AddK': functions have no initializers"]


def test_sparse_value_is_refused():
    # onnx_ir 1.1 cannot deserialize a sparse_value Constant at all (SerdeError), so a model
    # holding one never reaches the pass; one built in memory is refused, untouched.
    b = Builder()
    x = b.input("x", [4])
    attr = ir.Attr("sparse_value", ir.AttributeType.SPARSE_TENSOR, object())
    const = ir.node("Constant", [], {"sparse_value": attr}, name="sparse")
    const.outputs[0].name = "k"
    b.nodes.append(const)
    y = b.op("Add", [x, const.outputs[0]], output_names=["y"])
    y.dtype, y.shape = ir.DataType.FLOAT, ir.Shape([4])
    graph = ir.Graph(b.inputs, [y], nodes=b.nodes, opset_imports={"": 17})
    model = ir.Model(graph, ir_version=8)
    p = LiftConstants()
    assert not p(model).modified
    assert refusals(p, "sparse") == ["attribute 'sparse_value' is not supported by onnx_ir"]


def test_onnx_ir_cannot_load_sparse_value_constants():
    values = onnx.numpy_helper.from_array(np.array([1.0], np.float32), "v")
    indices = onnx.numpy_helper.from_array(np.array([2], np.int64), "i")
    sparse = onnx.helper.make_sparse_tensor(values, indices, [4])
    node = onnx.helper.make_node("Constant", [], ["k"], sparse_value=sparse)
    graph = onnx.helper.make_graph(
        [node], "g", [], [onnx.helper.make_tensor_value_info("k", onnx.TensorProto.FLOAT, [4])]
    )
    with pytest.raises(Exception):
        ir.from_proto(onnx.helper.make_model(graph))


def test_candidates_list_lifts_without_changing_the_model():
    model = paddle_style_model()
    found = LiftConstants().candidates(model)
    assert [c.node for c in found] == ["const_W", "const_b", "const_shape", "const_half"]
    assert found[0].what == "lift FLOAT[4, 3, 3, 3] to an initializer"
    assert ops(model).count("Constant") == 4 and not model.graph.initializers
