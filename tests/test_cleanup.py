"""cleanup: Identity, dead nodes, unused initializers/functions/opsets go; duplicates merge."""

from __future__ import annotations

import numpy as np

from onnxcompress.passes.cleanup import Cleanup
from tests.graphs import Builder, assert_identical, check, from_text, ops, random_feeds, run

MESSY = """
<ir_version: 8, opset_import: ["" : 17, "local" : 1, "com.unused" : 1]>
g (float[N, 3] x) => (float[N, 3] y) {
  b1 = Constant <value = float[3] {1, 2, 3}> ()
  i = Identity (x)
  a = Add (i, b1)
  dead = Relu (a)
  dead2 = Neg (dead)
  y = Identity (a)
}
<domain: "local", opset_import: ["" : 17]>
Unused (p) => (q) {
  q = Relu (p)
}
"""


def duplicated_weights_model():
    """Two Adds reading equal but distinct bias initializers, plus an unused initializer."""
    b = Builder()
    x = b.input("x", ["N", 3])
    b1 = b.init("b1", np.array([1.0, 2.0, 3.0], np.float32))
    b2 = b.init("b2", np.array([1.0, 2.0, 3.0], np.float32))
    b.init("unused", np.zeros(3, np.float32))
    h = b.op("Add", [x, b1], name="add1")
    y = b.op("Add", [h, b2], name="add2", output_names=["y"])
    return b.model([y])


def test_removes_identity_dead_nodes_functions_and_opsets():
    model = from_text(MESSY)
    feeds = random_feeds(model)
    before = run(model, feeds)
    p = Cleanup()
    assert p(model).modified
    assert ops(model) == ["Constant", "Add"]
    assert [v.name for v in model.graph.outputs] == ["y"]
    assert not model.functions
    assert set(model.opset_imports) == {""}
    assert p.notes == ["removed 4 nodes, 0 initializers"]
    check(model)
    assert_identical(before, run(model, feeds))


def test_merges_duplicate_initializers_and_drops_unused_ones():
    model = duplicated_weights_model()
    feeds = random_feeds(model)
    before = run(model, feeds)
    p = Cleanup()
    assert p(model).modified
    assert set(model.graph.initializers) == {"b1"}
    assert p.notes == ["removed 0 nodes, 2 initializers"]
    check(model)
    assert_identical(before, run(model, feeds))


def test_deduplicate_off_keeps_duplicates():
    model = duplicated_weights_model()
    assert Cleanup(Cleanup.Options(deduplicate=False))(model).modified
    assert set(model.graph.initializers) == {"b1", "b2"}


def test_second_run_and_nothing_to_do_are_unmodified():
    model = from_text(MESSY)
    assert Cleanup()(model).modified
    p = Cleanup()
    assert not p(model).modified
    assert p.notes == []
    clean = from_text("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 3] x) => (float[N, 3] y) {
      y = Relu (x)
    }""")
    assert not Cleanup()(clean).modified


def test_identity_from_input_to_output_is_kept():
    # An input cannot also be an output, so this Identity is needed.
    model = from_text("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 3] x) => (float[N, 3] y) {
      y = Identity (x)
    }""")
    assert not Cleanup()(model).modified
    assert ops(model) == ["Identity"]
    check(model)
