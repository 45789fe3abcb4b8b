"""infer-shapes: values get inferred types/shapes; wrong declared outputs are corrected."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from onnxcompress.passes.infer_shapes import InferShapes
from tests.graphs import check, from_text, random_feeds, run

PLAIN = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4] x) => (float[N, 3] y) {
  w = Constant <value = float[4, 3] {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}> ()
  h = MatMul (x, w)
  y = Relu (h)
}
"""

WRONG_OUTPUT = PLAIN.replace("=> (float[N, 3] y)", "=> (float[1, 5] y)")


def shape_of(model: ir.Model, name: str) -> list:
    for node in model.graph:
        for value in node.outputs:
            if value.name == name:
                return None if value.shape is None else [
                    d if isinstance(d, int) else d.value for d in value.shape
                ]
    raise KeyError(name)


def test_annotates_intermediate_values():
    model = from_text(PLAIN)
    assert shape_of(model, "h") is None
    p = InferShapes()
    assert p(model).modified
    assert shape_of(model, "h") == ["N", 3]
    assert shape_of(model, "w") == [4, 3]
    assert p.notes == ["updated the type/shape of 2 values"]
    check(model)


def test_second_run_and_nothing_to_do_are_unmodified():
    model = from_text(PLAIN)
    assert InferShapes()(model).modified
    p = InferShapes()
    assert not p(model).modified
    assert p.notes == []
    # A model that declares exactly what inference derives.
    exact = from_text("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4] x) => (float[N, 4] y) {
      y = Relu (x)
    }""")
    assert not InferShapes()(exact).modified


def test_wrong_declared_output_shape_is_replaced_and_noted():
    model = from_text(WRONG_OUTPUT)
    with pytest.raises(Exception):
        check(model)  # strict inference rejects the declared [1, 5]
    feeds = random_feeds(model)
    before = run(model, feeds)
    p = InferShapes()
    assert p(model).modified
    assert shape_of(model, "y") == ["N", 3]
    assert p.notes[0] == (
        "output 'y': declared FLOAT[1,5], inferred FLOAT[N,3]; kept the inferred one"
    )
    check(model)
    np.testing.assert_array_equal(before[0], run(model, feeds)[0])


def test_trust_declared_keeps_declared_shapes():
    model = from_text(WRONG_OUTPUT)
    p = InferShapes(InferShapes.Options(trust_declared=True))
    assert p(model).modified  # the intermediate values still get shapes
    assert shape_of(model, "y") == [1, 5]
    assert shape_of(model, "h") == ["N", 3]


def test_data_propagation_gives_reshape_a_concrete_shape():
    model = from_text("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 3, 4] x) => (float[2, 12] y) {
      s = Shape (x)
      zero = Constant <value_ints = [0]> ()
      n = Gather <axis = 0> (s, zero)
      minus1 = Constant <value_ints = [-1]> ()
      target = Concat <axis = 0> (n, minus1)
      h = Reshape (x, target)
      y = Relu (h)
    }""")
    assert InferShapes()(model).modified
    assert shape_of(model, "h") == [2, 12]


def test_declared_shape_is_kept_where_inference_knows_nothing():
    model = from_text("""
    <ir_version: 8, opset_import: ["" : 17, "com.example" : 1]>
    g (float[N, 4] x) => (float[N, 4] y) {
      h = com.example.Mystery (x)
      y = Relu (h)
    }""")
    h = model.graph.node(0).outputs[0]
    h.dtype, h.shape = ir.DataType.FLOAT, ir.Shape(["N", 4])
    p = InferShapes()
    assert not p(model).modified
    assert shape_of(model, "h") == ["N", 4]
    assert shape_of(model, "y") == ["N", 4]


def test_declared_dims_beat_dims_onnx_cannot_infer():
    # onnx names NonZero's count dim unk__0; a declared 5 says more and is kept.
    model = from_text("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 3] x) => (int64[N, M] y) {
      nz = NonZero (x)
      y = Neg (nz)
    }""")
    nz = model.graph.node(0).outputs[0]
    nz.dtype, nz.shape = ir.DataType.INT64, ir.Shape([2, 5])
    p = InferShapes()
    assert p(model).modified
    assert shape_of(model, "nz") == [2, 5]
    assert shape_of(model, "y") == [2, 5]  # the kept declaration propagated
    assert p.notes == ["updated the type/shape of 1 values"]
    assert not InferShapes()(model).modified


def test_dims_onnx_makes_up_names_for_are_left_unnamed():
    """onnx names NonZero's count dim unk__N, a new name per value: two values that have
    the same count would claim different dims (onnxruntime then skips fusions). Known
    symbols and sizes stay."""
    model = from_text("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 3] x) => (int64[2, M] y) {
      nz = NonZero (x)
      y = Neg (nz)
      s = Shape (x)
    }""")
    p = InferShapes()
    assert p(model).modified
    assert shape_of(model, "nz") == [2, None]
    assert shape_of(model, "y") == [2, "M"]  # the declared output names it
    assert shape_of(model, "s") == [2]
    assert not any(not isinstance(d, int) and d.value and d.value.startswith("unk__")
                   for node in model.graph for v in node.outputs for d in (v.shape or ()))
    assert not InferShapes()(model).modified


def test_subgraph_values_are_annotated():
    model = from_text("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 3] x, bool c) => (float[2, 3] y) {
      y = If (c) <
        then_branch = then_g () => (float[2, 3] t) { r = Relu (x)  t = Neg (r) },
        else_branch = else_g () => (float[2, 3] e) { e = Abs (x) }
      >
    }""")
    p = InferShapes()
    assert p(model).modified
    then_g = model.graph.node(0).attributes["then_branch"].as_graph()
    assert list(then_g.node(0).outputs[0].shape) == [2, 3]
    check(model)
