"""Loading and saving models safely.

Loading checks what onnx and onnxruntime would otherwise report as a traceback, or not at all:
a file that is not ONNX, external data that is missing or points outside the model's folder
(directly or through a symbolic link), a node input that nothing produces, a cycle.
Saving writes to a temporary file beside the target and renames it into place, so a
failed save leaves nothing half-written; models over 2 GB get external data.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

import logging

import networkx as nx
import onnx
import onnx.version_converter
import onnx_ir as ir
from google.protobuf.message import DecodeError

from onnxcompress.errors import ModelLoadError, UnsafeExternalData
from onnxcompress.sparse_storage import from_sparse_storage, has_sparse_marks, to_sparse_storage

logger = logging.getLogger(__name__)

# Models older than this opset are upgraded with onnx's version converter on load.
MIN_OPSET = 11
UPGRADE_TO = 13
# Key in ir.Model.meta (not saved) for what loading did to the model, for the report.
LOAD_NOTES = "onnxcompress.load_notes"
# Initializer bytes above which a model is saved with external data.
EXTERNAL_DATA_THRESHOLD = 1_900_000_000


def load_model(source) -> ir.Model:
    """An onnx_ir model from a path, an ``onnx.ModelProto`` or an ``ir.Model``.

    The source is never modified: a ModelProto is deserialized into a new IR, an ir.Model is
    cloned (tensors are shared, and passes never modify a tensor in place).
    """
    if isinstance(source, ir.Model):
        check_structure(source)  # before cloning: the cloner cannot copy a cycle
        model = source.clone()
    elif isinstance(source, onnx.ModelProto):
        if _has_sparse(source):  # onnx_ir cannot hold sparse tensors: densify a copy
            copy = onnx.ModelProto()
            copy.CopyFrom(source)
            source = from_sparse_storage(copy)
        notes: list[str] = []
        model = ir.serde.deserialize_model(_upgrade_old_opset(source, "the model", notes))
        _hold_in_memory(model)
        model.meta[LOAD_NOTES] = notes
    elif isinstance(source, (str, os.PathLike)):
        model = _load_path(Path(source))
    else:
        raise ModelLoadError(
            f"cannot load a model from {type(source).__name__}: give a path, an onnx.ModelProto or an onnx_ir.Model"
        )
    check_structure(model)
    return model


# Types whose values numpy holds natively: an in-memory copy is exact and cheap to read, and
# onnxruntime computes from such an array directly.
NUMPY_TYPES = frozenset({
    ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BOOL,
    ir.DataType.INT8, ir.DataType.INT16, ir.DataType.INT32, ir.DataType.INT64,
    ir.DataType.UINT8, ir.DataType.UINT16, ir.DataType.UINT32, ir.DataType.UINT64,
})


def _hold_in_memory(model: ir.Model) -> None:
    """Give every numeric tensor read from a protobuf (initializers, Constant values) its own
    numpy array.

    A tensor that still points into the protobuf copies all its bytes on every ``numpy()``
    (the protobuf hands out a fresh ``bytes`` each time), and onnxruntime cannot compute from
    it in place; as an array it is read for free and lent to sessions
    (:func:`onnxcompress.runtime.make_session`). The protobuf is freed once no tensor points
    into it (any one would keep all of it alive), so the model costs its weights once.
    Tensors in external data stay mapped from their file.
    """
    for graph in (model.graph, *model.graph.subgraphs()):
        for value in graph.initializers.values():
            value.const_value = _in_memory(value.const_value)
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        _attribute_tensors_in_memory(node)
    for function in model.functions.values():
        for node in ir.traversal.RecursiveGraphIterator(function):
            _attribute_tensors_in_memory(node)


def _attribute_tensors_in_memory(node: ir.Node) -> None:
    for name, attr in list(node.attributes.items()):
        if attr.type == ir.AttributeType.TENSOR:
            tensor = _in_memory(attr.value)
            if tensor is not attr.value:
                node.attributes[name] = ir.AttrTensor(name, tensor, doc_string=attr.doc_string)


def _in_memory(tensor):
    if type(tensor) is not ir.TensorProtoTensor or tensor.dtype not in NUMPY_TYPES:
        return tensor
    return ir.Tensor(tensor.numpy(), dtype=tensor.dtype, name=tensor.name, doc_string=tensor.doc_string,
                     metadata_props=dict(tensor.metadata_props))


def _load_path(path: Path) -> ir.Model:
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a folder, not an ONNX file")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"{path}: empty file, not an ONNX model")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path}: not a valid ONNX model (truncated or another format): {_first_line(exc)}") from None
    if not proto.HasField("graph") or (not proto.graph.node and not proto.graph.output):
        raise ModelLoadError(f"{path}: not a valid ONNX model (no graph)")
    _check_external_data(proto, path.parent)
    notes: list[str] = []
    model = ir.serde.deserialize_model(_upgrade_old_opset(from_sparse_storage(proto), str(path), notes))
    del proto
    _hold_in_memory(model)
    model.meta[LOAD_NOTES] = notes
    ir.external_data.set_base_dir(model.graph, str(path.parent))
    return model


def convert_opset(proto: onnx.ModelProto, target: int, why: str) -> onnx.ModelProto:
    """``proto`` at opset ``target`` by onnx's version converter; its failure is a
    ModelLoadError that starts with ``why``."""
    try:
        return onnx.version_converter.convert_version(proto, target)
    except Exception as exc:  # the converter raises several types
        raise ModelLoadError(f"{why}, and onnx's version converter could not convert it: {_first_line(exc)}") from None


def _upgrade_old_opset(proto: onnx.ModelProto, where: str, notes: list[str]) -> onnx.ModelProto:
    """Upgrade a model older than MIN_OPSET with onnx's version converter, or refuse it."""
    version = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if version is None or version >= MIN_OPSET:
        return proto
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
        raise ModelLoadError(f"{where}: opset {version} is older than {MIN_OPSET}, the oldest the passes handle, "
                             "and its external data keeps it from being converted here; convert it first")
    upgraded = convert_opset(proto, UPGRADE_TO, f"{where}: opset {version} is older than {MIN_OPSET}, the oldest the passes handle")
    note = f"upgraded from opset {version} to {UPGRADE_TO} with onnx's version converter"
    logger.warning("%s: %s", where, note)
    notes.append(note)
    return upgraded


def _has_sparse(proto: onnx.ModelProto) -> bool:
    return bool(proto.graph.sparse_initializer) or any(
        a.name == "sparse_value" for n in proto.graph.node if n.op_type == "Constant" for a in n.attribute
    )


def _all_tensors(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_tensors(g)


def _check_external_data(proto: onnx.ModelProto, base: Path) -> None:
    base_real = base.resolve()
    for tensor in _all_tensors(proto.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        if not location:
            raise ModelLoadError(f"tensor '{tensor.name}': external data without a location")
        if os.path.isabs(location):
            raise UnsafeExternalData(
                f"tensor '{tensor.name}': external data path '{location}' is absolute; refusing (it must lie in the model's folder)"
            )
        target = (base / location).resolve()
        if base_real != target and base_real not in target.parents:
            raise UnsafeExternalData(
                f"tensor '{tensor.name}': external data path '{location}' leads outside the model's folder; refusing"
            )
        if not target.is_file():
            raise ModelLoadError(f"tensor '{tensor.name}': external data file '{location}' is missing")
        offset = int(info.get("offset", 0))
        length = int(info.get("length", 0)) if "length" in info else None
        size = target.stat().st_size
        if offset + (length or 0) > size:
            raise ModelLoadError(
                f"tensor '{tensor.name}': external data file '{location}' is too short ({size} bytes)"
            )


def check_structure(model: ir.Model) -> None:
    """Every node input is produced by something; the node graph has no cycle."""
    _check_graph(model.graph, outer=set())


def _check_graph(graph: ir.Graph, outer: set) -> None:
    defined = set(outer) | set(graph.inputs) | set(graph.initializers.values())
    deps = nx.DiGraph()
    for node in graph:
        deps.add_node(node)
        for value in node.inputs:
            if value is None:
                continue
            producer = value.producer()
            if producer is not None and producer.graph is graph:
                deps.add_edge(producer, node)
            elif producer is None and value not in defined and not value.is_initializer():
                raise ModelLoadError(
                    f"node '{node.name or node.op_type}' ({node.op_type}) reads '{value.name}', which no node, input or initializer produces"
                )
    try:
        cycle = nx.find_cycle(deps)
        names = [a.name or a.op_type for a, _ in cycle]
        raise ModelLoadError("graph has a cycle through nodes " + " -> ".join(names + names[:1]))
    except nx.NetworkXNoCycle:
        pass
    visible = defined | {out for node in graph for out in node.outputs}
    for node in graph:
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                _check_graph(attr.value, visible)
            elif attr.type == ir.AttributeType.GRAPHS:
                for sub in attr.value:
                    _check_graph(sub, visible)
    for out in graph.outputs:
        if out.producer() is None and out not in defined and not out.is_initializer():
            raise ModelLoadError(f"graph output '{out.name}' is produced by nothing")


def initializer_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def model_bytes(model: ir.Model) -> bytes:
    """The serialized model with its weights inline, as :func:`save_model` writes it (weights
    marked for sparse storage as sparse constants)."""
    if initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD:
        raise ModelLoadError(f"the model's weights take {initializer_bytes(model):,} bytes: over 2 GB, an ONNX "
                             "file must keep them as external data (save it as .onnx, not as one file or archive)")
    proto = ir.to_proto(model)
    return (to_sparse_storage(proto) if has_sparse_marks(model) else proto).SerializeToString()


def save_model(model: ir.Model, path, *, external_data: str | bool | None = None) -> Path:
    """Write ``model`` to ``path`` atomically (temporary file, then rename).

    ``external_data``: a file name (relative to the model) for the weights, True for
    ``<name>.data``, or None to use external data only when the model is over 2 GB.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if external_data is None and initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD:
        external_data = True
    if external_data is True:
        external_data = path.name + ".data"
    if not external_data:
        return write_atomically(path, model_bytes(model))
    with _replaced_by_temporary(path) as tmp:  # onnx_ir writes the data file atomically itself
        ir.save(model, tmp, external_data=external_data)
    return path


def write_atomically(path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file beside it, renamed into place:
    a failed write leaves ``path`` as it was and no temporary file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _replaced_by_temporary(path) as tmp:
        with open(tmp, "wb") as out:
            out.write(data)
        os.chmod(tmp, 0o644)
    return path


@contextlib.contextmanager
def _replaced_by_temporary(path: Path) -> Iterator[str]:
    """A temporary file name beside ``path``, renamed onto it when the block succeeds and
    removed when it fails."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
