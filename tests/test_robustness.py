"""Models the passes must handle or leave alone with a reason: old opsets, other domains, subgraphs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnxcompress
from onnxcompress.errors import ModelLoadError
from onnxcompress.runtime import make_session, run_all
from tests.tiny import tiny_classifier, tiny_feeds


def test_old_opset_is_upgraded_and_said_in_the_report():
    old = tiny_classifier()
    old.opset_import[0].version = 9
    result = onnxcompress.compress(old, "default", calibration=tiny_feeds(), drift="sqnr=80")
    assert result.model.opset_imports[""] == 13
    assert any("opset 9 to 13" in n for n in result.report.notes)
    assert all(p.status in ("changed", "unchanged") for p in result.report.passes)


def test_opset_the_converter_cannot_upgrade_is_refused():
    graph = helper.make_graph(
        [helper.make_node("Upsample", ["x"], ["y"], scales=[1.0, 2.0], mode="nearest")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 1)])
    with pytest.raises(ModelLoadError, match="opset 1 is older than 11"):
        onnxcompress.load_model(model)


def _with_contrib_gelu() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = onnx.numpy_helper.from_array(rng.standard_normal((4, 8)).astype(np.float32), "w1")
    w2 = onnx.numpy_helper.from_array(rng.standard_normal((8, 3)).astype(np.float32), "w2")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
            helper.make_node("Gelu", ["h"], ["g"], name="gelu", domain="com.microsoft"),
            helper.make_node("MatMul", ["g", "w2"], ["y"], name="mm2"),
        ],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], [w1, w2],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    return model


def test_other_domain_ops_are_kept_and_channels_through_them_refused():
    model = _with_contrib_gelu()
    feeds = tiny_feeds()
    result = onnxcompress.compress(model, "default,prune-channels{ratio=0.5}", calibration=feeds, drift="sqnr=80")
    prune = next(p for p in result.report.passes if p.name == "prune-channels")
    assert prune.status == "unchanged"
    reasons = {r.node: r.detail for r in prune.records}
    assert "domain 'com.microsoft'" in reasons["mm1"]
    assert any(n.domain == "com.microsoft" for n in result.model.graph)


def _if_model_with_outer_weight() -> onnx.ModelProto:
    """A Conv inside both If branches reads an outer-scope initializer; a Conv outside feeds it."""
    rng = np.random.default_rng(1)
    w_outer = onnx.numpy_helper.from_array(rng.standard_normal((4, 2, 3, 3)).astype(np.float32), "w_outer")
    w_inner = onnx.numpy_helper.from_array(rng.standard_normal((2, 4, 1, 1)).astype(np.float32), "w_inner")

    def branch(name, op):
        return helper.make_graph(
            [helper.make_node("Conv", ["a", "w_inner"], [f"{name}_c"]), helper.make_node(op, [f"{name}_c"], [f"{name}_out"])],
            name, [], [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, None)],
        )

    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w_outer"], ["c"], name="outer_conv", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["a"], name="relu"),
            helper.make_node("If", ["flag"], ["y"], name="if", then_branch=branch("then", "Relu"), else_branch=branch("else", "Sigmoid")),
        ],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 5, 5]),
              helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w_outer, w_inner],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_weights_used_inside_subgraphs_are_left_alone_with_a_reason():
    model = _if_model_with_outer_weight()
    x = np.random.default_rng(2).standard_normal((1, 2, 5, 5)).astype(np.float32)
    feeds = [{"x": x, "flag": np.array(True)}, {"x": x, "flag": np.array(False)}]
    result = onnxcompress.compress(model, "default,prune-channels{ratio=0.5}", calibration=feeds, drift="sqnr=80")
    prune = next(p for p in result.report.passes if p.name == "prune-channels")
    assert prune.status == "unchanged"
    assert "subgraph" in {r.node: r.detail for r in prune.records}["outer_conv"]
    for ref, out in zip(run_all(make_session(model), feeds), run_all(make_session(result.model), feeds)):
        np.testing.assert_array_equal(out["y"], ref["y"])
