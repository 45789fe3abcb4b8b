"""onnxruntime sessions over IR models, and runs that expose intermediate tensors."""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterable, Sequence

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort


DEFAULT_THREADS = 2


def session_options(threads: int = DEFAULT_THREADS, optimize: bool = True) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return options


def make_session(model, threads: int = DEFAULT_THREADS, optimize: bool = True,
                 extra_outputs: Sequence[str] = ()) -> ort.InferenceSession:
    """An onnxruntime CPU session for an ``ir.Model``, a ``ModelProto`` or a path;
    ``extra_outputs`` names tensors of an ``ir.Model`` the session returns besides its outputs.

    An ``ir.Model`` reaches onnxruntime as a temporary file whose weights sit in an external
    data file: onnxruntime maps them instead of parsing a serialized copy, so a session costs
    about the model's weights in memory rather than three times them (minilm_l6: 80 MB against
    272 MB from serialized bytes), and starts no slower.
    """
    options = session_options(threads, optimize)
    providers = ["CPUExecutionProvider"]
    if isinstance(model, (str, os.PathLike)):
        return ort.InferenceSession(str(model), options, providers=providers)
    if isinstance(model, onnx.ModelProto):
        return ort.InferenceSession(model.SerializeToString(), options, providers=providers)
    with _outputs_added(model, extra_outputs), tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        ir.save(model, path, external_data="model.onnx.data")
        return ort.InferenceSession(path, options, providers=providers)


@contextlib.contextmanager
def _outputs_added(model: ir.Model, names: Sequence[str]):
    """The named tensors are graph outputs of ``model`` inside the block, and no longer after."""
    if not names:
        yield
        return
    values = {v.name: v for node in model.graph for v in node.outputs if v is not None}
    values.update(model.graph.initializers)
    existing = {v.name for v in model.graph.outputs}
    added = []
    for name in dict.fromkeys(names):
        if name in existing:
            continue
        if name not in values:
            raise ValueError(f"no tensor named {name!r} in the model")
        added.append(values[name])
    model.graph.outputs.extend(added)
    try:
        yield
    finally:
        for _ in added:
            model.graph.outputs.pop()


def run_all(session: ort.InferenceSession, feeds: Iterable[dict]) -> list[dict[str, np.ndarray]]:
    """Outputs by name for each feed."""
    names = [o.name for o in session.get_outputs()]
    return [dict(zip(names, session.run(names, feed))) for feed in feeds]


def intermediate_names(model: ir.Model) -> list[str]:
    """Names of every tensor computed by a node of the main graph, in graph order."""
    names = []
    for node in model.graph:
        for value in node.outputs:
            if value is not None and value.name:
                names.append(value.name)
    return names
