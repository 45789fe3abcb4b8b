"""onnxruntime sessions over IR models, and runs that expose intermediate tensors."""

from __future__ import annotations

import os
import tempfile
from typing import Iterable, Sequence

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from onnxcompress.modelio import EXTERNAL_DATA_THRESHOLD, initializer_bytes

DEFAULT_THREADS = 2


def session_options(threads: int = DEFAULT_THREADS, optimize: bool = True) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return options


def make_session(model, threads: int = DEFAULT_THREADS, optimize: bool = True) -> ort.InferenceSession:
    """An onnxruntime CPU session for an ``ir.Model``, a ``ModelProto`` or a path."""
    options = session_options(threads, optimize)
    providers = ["CPUExecutionProvider"]
    if isinstance(model, (str, os.PathLike)):
        return ort.InferenceSession(str(model), options, providers=providers)
    if isinstance(model, ir.Model) and initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.onnx")
            ir.save(model, path, external_data="model.onnx.data")
            return ort.InferenceSession(path, options, providers=providers)
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    return ort.InferenceSession(proto.SerializeToString(), options, providers=providers)


def run_all(session: ort.InferenceSession, feeds: Iterable[dict]) -> list[dict[str, np.ndarray]]:
    """Outputs by name for each feed."""
    names = [o.name for o in session.get_outputs()]
    return [dict(zip(names, session.run(names, feed))) for feed in feeds]


def with_extra_outputs(model: ir.Model, names: Sequence[str]) -> onnx.ModelProto:
    """A proto of ``model`` whose graph also outputs the named intermediate tensors."""
    proto = ir.to_proto(model)
    existing = {o.name for o in proto.graph.output}
    for name in names:
        if name not in existing:
            # onnxruntime accepts an output without a declared type.
            proto.graph.output.append(onnx.ValueInfoProto(name=name))
    return proto


def intermediate_names(model: ir.Model) -> list[str]:
    """Names of every tensor computed by a node of the main graph, in graph order."""
    names = []
    for node in model.graph:
        for value in node.outputs:
            if value is not None and value.name:
                names.append(value.name)
    return names
