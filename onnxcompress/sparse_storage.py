"""Sparse storage on disk: weights marked ``onnxcompress.storage=sparse`` are written as
``Constant(sparse_value)`` nodes (COO, int64 linear indices) when that is smaller than dense.

onnx_ir cannot hold sparse tensors, so the in-memory model stays dense: the mark is tensor
metadata, turned into the sparse form when saving and back into dense initializers (marked
again) when loading. onnxruntime densifies sparse constants when it loads a model; the saving
is on disk only.
"""

from __future__ import annotations

import math

import numpy as np
import onnx

STORAGE_KEY = "onnxcompress.storage"
STORAGE_SPARSE = "sparse"
INDEX_BYTES = 8
SPARSE_MIN_OPSET = 11  # Constant(sparse_value)


def has_sparse_marks(model) -> bool:
    """Whether any initializer of an ir.Model asks for sparse storage."""
    return any(
        v.const_value is not None and v.const_value.metadata_props.get(STORAGE_KEY) == STORAGE_SPARSE
        for v in model.graph.initializers.values()
    )


def to_sparse_storage(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Store the marked dense initializers of the main graph as ``Constant(sparse_value)`` nodes.

    Only initializers whose tensor metadata says ``onnxcompress.storage=sparse``, that are
    not graph inputs, and whose COO form (int64 linear indices) is still smaller than the
    dense one are converted. Modifies ``proto`` in place and returns it. onnxruntime turns
    the constants back into dense tensors when it loads the model.
    """
    graph = proto.graph
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 1)
    if opset < SPARSE_MIN_OPSET:
        return proto
    inputs = {i.name for i in graph.input}
    keep, constants = [], []
    for tensor in graph.initializer:
        marked = any(p.key == STORAGE_KEY and p.value == STORAGE_SPARSE for p in tensor.metadata_props)
        sparse = _sparse_proto(tensor) if marked and tensor.name not in inputs else None
        if sparse is None:
            keep.append(tensor)
        else:
            constants.append(onnx.helper.make_node("Constant", [], [tensor.name], name=f"{tensor.name}.sparse",
                                                   sparse_value=sparse))
    if constants:
        del graph.initializer[:]
        graph.initializer.extend(keep)
        nodes = constants + list(graph.node)
        del graph.node[:]
        graph.node.extend(nodes)
    return proto


def _sparse_proto(tensor: onnx.TensorProto) -> onnx.SparseTensorProto | None:
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return None
    array = onnx.numpy_helper.to_array(tensor)
    flat = array.ravel()
    index = np.flatnonzero(flat)
    if index.size * (array.itemsize + INDEX_BYTES) >= array.nbytes:
        return None
    values = onnx.numpy_helper.from_array(flat[index], tensor.name)
    values.data_type = tensor.data_type
    indices = onnx.numpy_helper.from_array(index.astype(np.int64), "")
    return onnx.helper.make_sparse_tensor(values, indices, list(array.shape))


def from_sparse_storage(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Turn ``Constant(sparse_value)`` nodes and ``sparse_initializer`` entries of the main graph
    into dense initializers, so that onnx_ir (which cannot hold sparse tensors) can load the model.
    Modifies ``proto`` in place and returns it."""
    graph = proto.graph
    dense = [_dense_proto(s, s.values.name) for s in graph.sparse_initializer]
    nodes = []
    for node in graph.node:
        attr = next((a for a in node.attribute if a.name == "sparse_value"), None)
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and attr is not None:
            dense.append(_dense_proto(attr.sparse_tensor, node.output[0]))
            dense[-1].metadata_props.add(key=STORAGE_KEY, value=STORAGE_SPARSE)
        else:
            nodes.append(node)
    if dense:
        del graph.sparse_initializer[:]
        del graph.node[:]
        graph.node.extend(nodes)
        graph.initializer.extend(dense)
    return proto


def _dense_proto(sparse: onnx.SparseTensorProto, name: str) -> onnx.TensorProto:
    values = onnx.numpy_helper.to_array(sparse.values)
    indices = onnx.numpy_helper.to_array(sparse.indices)
    dims = tuple(sparse.dims)
    flat = np.zeros(math.prod(dims), dtype=values.dtype)
    if indices.ndim == 2:
        indices = np.ravel_multi_index(tuple(indices.T), dims)
    flat[indices] = values
    tensor = onnx.numpy_helper.from_array(flat.reshape(dims), name)
    tensor.data_type = sparse.values.data_type
    return tensor
