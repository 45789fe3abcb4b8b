"""Loading refuses bad files with one clear message; saving is atomic."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxcompress.errors import ModelLoadError, UnsafeExternalData
from onnxcompress.modelio import load_model, save_model
from tests.tiny import tiny_classifier


def _save_external(tmp_path, location: str) -> os.PathLike:
    """The tiny model with w1 stored externally at ``location`` (relative to the model)."""
    model = tiny_classifier()
    w1 = next(t for t in model.graph.initializer if t.name == "w1")
    data = onnx.numpy_helper.to_array(w1).tobytes()
    w1.ClearField("float_data")
    w1.ClearField("raw_data")
    w1.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(len(data)))):
        w1.external_data.add(key=key, value=value)
    path = tmp_path / "model" / "m.onnx"
    path.parent.mkdir(exist_ok=True)
    onnx.save(model, path)
    return path, data


def test_loads_external_data_inside_the_folder(tmp_path):
    path, data = _save_external(tmp_path, "weights.bin")
    (path.parent / "weights.bin").write_bytes(data)
    model = load_model(path)
    np.testing.assert_array_equal(
        model.graph.initializers["w1"].const_value.numpy().tobytes(), data
    )


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda p: None, ModelLoadError, "no such file"),
        (lambda p: p.write_bytes(b""), ModelLoadError, "empty file"),
        (lambda p: p.write_bytes(b"this is not a model at all \x00\xff" * 10), ModelLoadError, "not a valid ONNX model"),
        (lambda p: p.write_bytes(tiny_classifier().SerializeToString()[:150]), ModelLoadError, "not a valid ONNX model"),
    ],
    ids=["missing", "empty", "garbage", "truncated"],
)
def test_bad_files_give_one_clear_error(tmp_path, make, error, message):
    path = tmp_path / "bad.onnx"
    make(path)
    with pytest.raises(error, match=message) as info:
        load_model(path)
    assert "\n" not in str(info.value)


def test_folder_is_not_a_model(tmp_path):
    with pytest.raises(ModelLoadError, match="is a folder"):
        load_model(tmp_path)


def test_missing_external_data_file(tmp_path):
    path, _ = _save_external(tmp_path, "weights.bin")
    with pytest.raises(ModelLoadError, match="external data file 'weights.bin' is missing"):
        load_model(path)


def test_short_external_data_file(tmp_path):
    path, data = _save_external(tmp_path, "weights.bin")
    (path.parent / "weights.bin").write_bytes(data[:10])
    with pytest.raises(ModelLoadError, match="too short"):
        load_model(path)


def test_external_data_path_traversal_is_refused(tmp_path):
    path, data = _save_external(tmp_path, "../secret.bin")
    (tmp_path / "secret.bin").write_bytes(data)
    with pytest.raises(UnsafeExternalData, match="leads outside the model's folder"):
        load_model(path)


def test_external_data_absolute_path_is_refused(tmp_path):
    target = tmp_path / "abs.bin"
    path, data = _save_external(tmp_path, str(target))
    target.write_bytes(data)
    with pytest.raises(UnsafeExternalData, match="is absolute"):
        load_model(path)


def test_external_data_symlink_out_of_the_folder_is_refused(tmp_path):
    path, data = _save_external(tmp_path, "weights.bin")
    outside = tmp_path / "outside.bin"
    outside.write_bytes(data)
    (path.parent / "weights.bin").symlink_to(outside)
    with pytest.raises(UnsafeExternalData, match="leads outside"):
        load_model(path)


def test_node_input_nothing_produces(tmp_path):
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2] x) => (float[2] y) {
        y = Add(x, ghost)
    }
    """
    with pytest.raises(ModelLoadError, match="reads 'ghost', which no node, input or initializer produces"):
        load_model(onnx.parser.parse_model(text))


def test_graph_with_a_cycle(tmp_path):
    x = ir.val("x", ir.DataType.FLOAT, [2])
    a = ir.node("Relu", [x], name="A")
    b = ir.node("Neg", [a.outputs[0]], name="B")
    a.replace_input_with(0, b.outputs[0])
    b.outputs[0].name = "b_out"
    a.outputs[0].name = "a_out"
    graph = ir.Graph([x], [b.outputs[0]], nodes=[a, b], opset_imports={"": 17})
    with pytest.raises(ModelLoadError, match="cycle through nodes"):
        load_model(ir.Model(graph, ir_version=8))


def test_unknown_source_type():
    with pytest.raises(ModelLoadError, match="cannot load a model from int"):
        load_model(42)


def test_save_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "out.onnx"
    target.write_bytes(b"previous")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        save_model(ir.from_proto(tiny_classifier()), target)
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]


def test_save_is_atomic_when_writing_external_data_fails(tmp_path, monkeypatch):
    target = tmp_path / "out.onnx"
    target.write_bytes(b"previous")

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ir, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_model(ir.from_proto(tiny_classifier()), target, external_data=True)
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]


def test_cycle_in_a_file_is_reported(tmp_path):
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("Relu", ["b_out"], ["a_out"], name="A"),
            onnx.helper.make_node("Neg", ["a_out"], ["b_out"], name="B"),
        ],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [onnx.helper.make_tensor_value_info("b_out", onnx.TensorProto.FLOAT, [2])],
    )
    path = tmp_path / "cycle.onnx"
    onnx.save(onnx.helper.make_model(graph), path)
    with pytest.raises(ModelLoadError, match="cycle through nodes|reads 'b_out'"):
        load_model(path)
