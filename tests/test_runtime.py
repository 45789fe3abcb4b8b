"""Sessions over IR models: weights loaded once and lent to onnxruntime, overridable initializers."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from onnxcompress.activations import reader
from onnxcompress.modelio import load_model
from onnxcompress.runtime import make_session


def _matmul_model(tmp_path, k: int = 64, n: int = 32):
    """x[N,k] -> MatMul(w: k×n) -> Add(Constant bias) -> y, saved as a file; returns (path, w, bias)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((k, n)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    weight = onnx.numpy_helper.from_array(w, "w")
    weight.doc_string = "the weight"
    weight.metadata_props.add(key="origin", value="test")
    nodes = [
        onnx.helper.make_node("Constant", [], ["b"], name="bias", value=onnx.numpy_helper.from_array(bias, "b")),
        onnx.helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        onnx.helper.make_node("Add", ["h", "b"], ["y"], name="add"),
    ]
    graph = onnx.helper.make_graph(
        nodes, "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", k])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", n])], [weight])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    return path, w, bias


def test_loaded_numeric_tensors_are_numpy_arrays_with_their_metadata(tmp_path):
    path, w, bias = _matmul_model(tmp_path)
    model = load_model(path)
    tensor = model.graph.initializers["w"].const_value
    assert type(tensor) is ir.Tensor
    assert tensor.numpy() is tensor.numpy()  # read without a copy
    np.testing.assert_array_equal(tensor.numpy(), w)
    assert tensor.doc_string == "the weight" and tensor.metadata_props == {"origin": "test"}
    constant = next(node for node in model.graph if node.op_type == "Constant")
    assert type(constant.attributes["value"].value) is ir.Tensor
    np.testing.assert_array_equal(constant.attributes["value"].value.numpy(), bias)


def test_session_computes_from_the_lent_weights_exactly(tmp_path):
    path, w, bias = _matmul_model(tmp_path)
    model = load_model(path)
    session = make_session(model, optimize=False)
    lent = [array for array, _ in session.lent_initializers]
    assert any(array is model.graph.initializers["w"].const_value.numpy() for array in lent)
    x = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)
    reference = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], reference.run(None, {"x": x})[0])


def test_overridable_initializers_take_the_fed_value(tmp_path):
    path, w, bias = _matmul_model(tmp_path)
    model = load_model(path)
    session = make_session(model, optimize=False, overridable=["w"], extra_outputs=["h"])
    assert [v.name for v in model.graph.inputs] == ["x"] and [v.name for v in model.graph.outputs] == ["y"]
    x = np.random.default_rng(2).standard_normal((3, 64)).astype(np.float32)
    other = np.random.default_rng(3).standard_normal((64, 32)).astype(np.float32)
    h_stored = session.run(["h"], {"x": x})[0]
    h_fed = session.run(["h"], {"x": x, "w": other})[0]
    np.testing.assert_allclose(h_stored, x @ w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(h_fed, x @ other, rtol=1e-5, atol=1e-5)

    read = reader(model, ["h", "x"], [{"x": x}], overridable=["w"])
    np.testing.assert_array_equal(read("h", {"w": other})[0], h_fed)
    np.testing.assert_array_equal(read("x", {})[0], x)


def test_tensors_in_subgraphs_and_functions_are_held_in_memory(tmp_path):
    rng = np.random.default_rng(4)
    def constant(out):
        return onnx.helper.make_node("Constant", [], [out], value=onnx.numpy_helper.from_array(
            rng.standard_normal(300).astype(np.float32), out))
    branch = onnx.helper.make_graph([constant("c")], "branch", [],
                                    [onnx.helper.make_tensor_value_info("c", onnx.TensorProto.FLOAT, [300])])
    function = onnx.helper.make_function("local", "F", [], ["y"], [constant("y")], [onnx.helper.make_opsetid("", 17)])
    nodes = [onnx.helper.make_node("If", ["cond"], ["a"], then_branch=branch, else_branch=branch),
             onnx.helper.make_node("F", [], ["b"], domain="local")]
    graph = onnx.helper.make_graph(
        nodes, "g", [onnx.helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, [])],
        [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [300]) for n in ("a", "b")])
    model = onnx.helper.make_model(graph, functions=[function], opset_imports=[
        onnx.helper.make_opsetid("", 17), onnx.helper.make_opsetid("local", 1)])
    path = tmp_path / "nested.onnx"
    onnx.save(model, path)
    loaded = load_model(path)
    nodes = [*ir.traversal.RecursiveGraphIterator(loaded.graph),
             *(n for f in loaded.functions.values() for n in ir.traversal.RecursiveGraphIterator(f))]
    constants = [n for n in nodes if n.op_type == "Constant"]
    assert len(constants) == 3
    assert all(type(n.attributes["value"].value) is ir.Tensor for n in constants)
