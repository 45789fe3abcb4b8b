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

from onnxcompress.modelio import NUMPY_TYPES


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
                 extra_outputs: Sequence[str] = (), overridable: Sequence[str] = ()) -> ort.InferenceSession:
    """An onnxruntime CPU session for an ``ir.Model``, a ``ModelProto`` or a path;
    ``extra_outputs`` names tensors of an ``ir.Model`` the session returns besides its outputs,
    ``overridable`` initializers of an ``ir.Model`` that a run may feed new values for (they
    become graph inputs too; onnxruntime uses the stored value when a run does not feed one).

    An ``ir.Model`` reaches onnxruntime as a temporary file whose weights sit in an external
    data file: onnxruntime maps them instead of parsing a serialized copy, so a session costs
    about the model's weights in memory rather than three times them (minilm_l6: 80 MB against
    272 MB from serialized bytes), and starts no slower. Initializers held as numpy arrays
    (``ir.Tensor``, which :func:`onnxcompress.modelio.load_model` gives every numeric weight)
    are lent to onnxruntime instead (``add_initializer``): it computes from the model's own
    buffers, and the session costs only its prepacked weights and activations (minilm_l6:
    55 MB against 91 MB after a run).
    """
    options = session_options(threads, optimize)
    providers = ["CPUExecutionProvider"]
    if isinstance(model, (str, os.PathLike)):
        return ort.InferenceSession(str(model), options, providers=providers)
    if isinstance(model, onnx.ModelProto):
        return ort.InferenceSession(model.SerializeToString(), options, providers=providers)
    with _outputs_added(model, extra_outputs), _inputs_added(model, overridable), \
            tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        ir.save(model, path, external_data="model.onnx.data")
        lent = _lend_initializers(model, options, exclude=set(overridable))
        session = ort.InferenceSession(path, options, providers=providers)
    session.lent_initializers = lent  # onnxruntime reads these buffers for the session's life
    return session


_LEND_MIN_BYTES = 1024  # small tensors are cheaper to copy, and shape inference reads them


def _lend_initializers(model: ir.Model, options: ort.SessionOptions, exclude: set[str]) -> list:
    """Add the main graph's large numpy-backed initializers to ``options``; returns the
    OrtValues, which must outlive the session."""
    lent = []
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if name in exclude or type(tensor) is not ir.Tensor or tensor.dtype not in NUMPY_TYPES:
            continue
        array = tensor.numpy()
        if array.nbytes < _LEND_MIN_BYTES or not array.flags.c_contiguous or array.dtype.byteorder == ">":
            continue
        ortvalue = ort.OrtValue.ortvalue_from_numpy(array)
        options.add_initializer(name, ortvalue)
        lent.append((array, ortvalue))
    return lent


def _outputs_added(model: ir.Model, names: Sequence[str]):
    """The named tensors are graph outputs of ``model`` inside the block, and no longer after."""
    if not names:
        return contextlib.nullcontext()
    values = {v.name: v for node in model.graph for v in node.outputs if v is not None}
    values.update(model.graph.initializers)
    return _appended(model.graph.outputs, names, values, "tensor")


def _inputs_added(model: ir.Model, names: Sequence[str]):
    """The named initializers are graph inputs of ``model`` inside the block, and no longer after."""
    return _appended(model.graph.inputs, names, model.graph.initializers, "initializer")


@contextlib.contextmanager
def _appended(values: list, names: Sequence[str], known: dict, what: str):
    """The named ``known`` values are at the end of ``values`` inside the block (those already
    there are not added twice), and no longer after."""
    existing = {v.name for v in values}
    added = []
    for name in dict.fromkeys(names):
        if name in existing:
            continue
        if name not in known:
            raise ValueError(f"no {what} named {name!r} in the model")
        added.append(known[name])
    values.extend(added)
    try:
        yield
    finally:
        for _ in added:
            values.pop()


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
