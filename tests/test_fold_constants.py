"""fold-constants: constant subgraphs become initializers, exactly; the refusals."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from onnxcompress.errors import OptionError
from onnxcompress.passes.fold_constants import FoldConstants
from tests.graphs import (
    Builder,
    check,
    from_text,
    ops,
    random_feeds,
    records,
    refusals,
    run,
)


def live_ops(model: ir.Model) -> list[str]:
    """Op types of the nodes something still reads (folded inputs are left dead for cleanup)."""
    live = []
    for node in model.graph:
        if any(v.uses() or v.is_graph_output() for v in node.outputs):
            live.append(node.op_type)
    return live


def assert_exact(before, after, atol=1e-6):
    assert len(before) == len(after)
    for e, a in zip(before, after):
        assert e.dtype == a.dtype and e.shape == a.shape
        assert np.max(np.abs(e.astype(np.float64) - a.astype(np.float64))) <= atol


WEIGHT_EXPRESSION = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4] x) => (float[N, 3] y) {
  w0 = Constant <value = float[3, 4] {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}> ()
  two = Constant <value_float = 2.0> ()
  w1 = Div (w0, two)
  w2 = Sqrt (w1)
  w3 = Exp (w2)
  wt = Transpose <perm = [1, 0]> (w3)
  y = MatMul (x, wt)
}
"""


def test_weight_expression_folds_to_one_initializer():
    model = from_text(WEIGHT_EXPRESSION)
    feeds = random_feeds(model)
    before = run(model, feeds)
    p = FoldConstants()
    result = p(model)
    assert result.modified
    assert live_ops(model) == ["MatMul"]
    assert [r.op_type for r in records(p, "rewritten")] == ["Div", "Sqrt", "Exp", "Transpose"]
    assert p.notes == ["folded 4 nodes"]
    assert model.graph.node(-1).inputs[1].is_initializer()
    check(model)
    assert_exact(before, run(model, feeds))


def test_second_run_and_nothing_to_do_are_unmodified():
    model = from_text(WEIGHT_EXPRESSION)
    assert FoldConstants()(model).modified
    p = FoldConstants()
    assert not p(model).modified
    assert records(p, "rewritten") == []
    plain = from_text("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4] x) => (float[N, 4] y) {
      r = Relu (x)
      y = Add (r, x)
    }""")
    p = FoldConstants()
    assert not p(plain).modified
    assert p.records == [] and p.notes == []


def test_static_shape_arithmetic_folds():
    model = from_text("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 3, 4] x) => (float[2, 12] y) {
      s = Shape (x)
      zero = Constant <value_ints = [0]> ()
      n = Gather <axis = 0> (s, zero)
      minus1 = Constant <value_ints = [-1]> ()
      target = Concat <axis = 0> (n, minus1)
      y = Reshape (x, target)
    }""")
    feeds = random_feeds(model)
    before = run(model, feeds)
    p = FoldConstants()
    assert p(model).modified
    assert live_ops(model) == ["Reshape"]
    target = model.graph.node(-1).inputs[1]
    assert target.is_initializer()
    assert target.const_value.numpy().tolist() == [2, -1]
    check(model)
    assert_exact(before, run(model, feeds), atol=0.0)


def test_folded_shapes_become_initializers_not_constant_nodes():
    model = from_text("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 6] x, float[12] z) => (float[2, 6] y) {
      s = Shape (x)
      y = Reshape (z, s)
    }""")
    feeds = random_feeds(model)
    before = run(model, feeds)
    p = FoldConstants()
    assert p(model).modified
    assert ops(model) == ["Reshape"]
    assert model.graph.node(0).inputs[1].const_value.numpy().tolist() == [2, 6]
    assert [r.op_type for r in records(p, "rewritten")] == ["Shape"]
    check(model)
    assert_exact(before, run(model, feeds), atol=0.0)
    assert not FoldConstants()(model).modified


def test_if_with_constant_condition_is_inlined():
    model = from_text("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2] x) => (float[2] y) {
      c = Constant <value = bool {1}> ()
      y = If (c) <
        then_branch = then_g () => (float[2] t) { t = Relu (x) },
        else_branch = else_g () => (float[2] e) { e = Neg (x) }
      >
    }""")
    feeds = {"x": np.array([-1.5, 2.0], np.float32)}
    before = run(model, feeds)
    p = FoldConstants()
    assert p(model).modified
    assert "If" not in ops(model) and "Relu" in ops(model)
    assert [r.detail for r in records(p, "rewritten")] == [
        "inlined the branch of a constant condition"
    ]
    check(model)
    assert_exact(before, run(model, feeds), atol=0.0)


def test_identity_is_bypassed_and_recorded():
    model = from_text("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4] x) => (float[N, 2, 2] y) {
      s = Constant <value_ints = [-1, 2, 2]> ()
      i = Identity (x)
      y = Reshape (i, s)
    }""")
    feeds = random_feeds(model)
    before = run(model, feeds)
    p = FoldConstants()
    assert p(model).modified
    assert live_ops(model) == ["Constant", "Reshape"]
    assert [(r.op_type, r.detail) for r in records(p)] == [
        ("Identity", "bypassed: its consumers read its input (dead now)")
    ]
    assert_exact(before, run(model, feeds), atol=0.0)
    assert not FoldConstants()(model).modified


def test_large_input_is_refused():
    b = Builder()
    x = b.input("x", [64])
    big = b.const("big", np.arange(64, dtype=np.float32))
    three = b.const("three", np.array(3.0, np.float32))
    w = b.op("Mul", [big, three], name="scale")
    y = b.op("Add", [x, w], name="add", output_names=["y"])
    model = b.model([y])
    feeds = random_feeds(model)
    before = run(model, feeds)
    p = FoldConstants(FoldConstants.Options(input_size_limit=10))
    assert not p(model).modified
    assert refusals(p, "scale") == ["an input has 64 elements, over input_size_limit"]
    assert ops(model) == ["Constant", "Constant", "Mul", "Add"]
    assert_exact(before, run(model, feeds), atol=0.0)
    # With the default limit it folds.
    assert FoldConstants()(model).modified
    assert live_ops(model) == ["Add"]
    assert_exact(before, run(model, feeds))


def test_large_output_is_refused():
    model = from_text("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[64, 64] x) => (float[64, 64] y) {
      one = Constant <value = float[1, 1] {1.5}> ()
      shape = Constant <value_ints = [64, 64]> ()
      big = Expand (one, shape)
      y = Mul (x, big)
    }""")
    p = FoldConstants(FoldConstants.Options(output_size_limit=100))
    assert not p(model).modified
    assert "Expand" in live_ops(model)
    assert refusals(p)[0].startswith("its output would exceed output_size_limit")


def test_constant_of_shape_is_kept():
    model = from_text("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 3] x) => (float[2, 3] y) {
      shape = Constant <value_ints = [2, 3]> ()
      z = ConstantOfShape <value = float[1] {0.5}> (shape)
      y = Add (x, z)
    }""")
    p = FoldConstants()
    assert not p(model).modified
    assert "ConstantOfShape" in ops(model)
    assert refusals(p) == ["ConstantOfShape is kept so the model does not grow"]


def test_initializer_that_is_a_graph_input_is_not_folded():
    # An initializer listed among the graph inputs can be overridden at run time.
    b = Builder()
    x = b.input("x", [3])
    w = b.init("w", np.array([1.0, 2.0, 3.0], np.float32))
    b.inputs.append(w)
    two = b.init("two", np.array(2.0, np.float32))
    w2 = b.op("Mul", [w, two], name="scale")
    y = b.op("Add", [x, w2], name="add", output_names=["y"])
    model = b.model([y])
    p = FoldConstants()
    assert not p(model).modified
    assert ops(model) == ["Mul", "Add"]
    feeds = {"x": np.zeros(3, np.float32), "w": np.array([5.0, 6.0, 7.0], np.float32)}
    assert run(model, feeds)[0].tolist() == [10.0, 12.0, 14.0]


def test_size_limits_must_not_be_negative():
    with pytest.raises(OptionError, match="input_size_limit"):
        FoldConstants.Options(input_size_limit=-1)
    with pytest.raises(OptionError, match="output_size_limit"):
        FoldConstants.Options(output_size_limit=-5)
