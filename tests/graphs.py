"""Shared test helpers: small-graph builders and an onnxruntime runner.

Every test file may import this module (``from tests.graphs import ...`` or, with the
``tests`` folder on ``sys.path``, ``from graphs import ...``). Helpers:

- :class:`Builder`: build an ``ir.Model`` node by node, with weights as initializers
  (:meth:`Builder.init`) or Constant nodes (:meth:`Builder.const`).
- :func:`from_text`: an ``ir.Model`` from ONNX text (``onnx.parser`` syntax).
- :func:`run`: run a model (``ir.Model`` or ``onnx.ModelProto``) on onnxruntime's CPU
  provider with graph optimisations off, and return its outputs.
- :func:`random_feeds`: seeded random inputs matching a model's graph inputs.
- :func:`clone`: an independent deep copy of an ``ir.Model`` (through protobuf).
- :func:`check`: ``onnx.checker.check_model`` on the serialized model.
- :func:`assert_close`, :func:`max_rel_diff`: numeric comparison of output lists.
- :func:`records`, :func:`refusals`: a pass's per-node records, filtered.
- :func:`ops`, :func:`find_node`: what is in a graph.
- :func:`bn_params`, :func:`conv_bn_model`, :func:`conv_transpose_bn_model`,
  :func:`gemm_bn_model`, :func:`matmul_bn_model`: Conv/ConvTranspose/Gemm/MatMul followed
  by an inference-mode BatchNormalization with realistic statistics.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

OPSET = 17

_NP_OF_ORT = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


# ---------------------------------------------------------------------------- building


class Builder:
    """Build a one-graph ``ir.Model`` step by step.

    >>> b = Builder()
    >>> x = b.input("x", [2, 3])
    >>> w = b.init("w", np.ones((3, 4), np.float32))
    >>> y = b.op("MatMul", [x, w], name="mm")
    >>> model = b.model([y])
    """

    def __init__(self, opset: int = OPSET):
        self.opset = opset
        self.inputs: list[ir.Value] = []
        self.initializers: list[ir.Value] = []
        self.nodes: list[ir.Node] = []

    def input(
        self, name: str, shape: Sequence[int | str | None], dtype: ir.DataType = ir.DataType.FLOAT
    ) -> ir.Value:
        """A graph input; string dims are symbolic."""
        value = ir.val(name, dtype, shape)
        self.inputs.append(value)
        return value

    def init(self, name: str, array: np.ndarray) -> ir.Value:
        """An initializer holding ``array``."""
        tensor = ir.tensor(np.asarray(array), name=name)
        value = ir.Value(
            name=name, shape=tensor.shape, type=ir.TensorType(tensor.dtype), const_value=tensor
        )
        self.initializers.append(value)
        return value

    def const(self, name: str, array: np.ndarray, node_name: str | None = None) -> ir.Value:
        """A Constant node (``value`` attribute) holding ``array``; returns its output."""
        tensor = ir.tensor(np.asarray(array), name=name)
        node = ir.node(
            "Constant", [], {"value": tensor}, name=node_name or f"const_{name}", num_outputs=1
        )
        node.outputs[0].name = name
        self.nodes.append(node)
        return node.outputs[0]

    def op(
        self,
        op_type: str,
        inputs: Sequence[ir.Value | None],
        name: str | None = None,
        num_outputs: int = 1,
        output_names: Sequence[str] | None = None,
        **attributes: Any,
    ) -> Any:
        """Append a node; returns its output (or a tuple of outputs when there are several)."""
        node = ir.node(op_type, inputs, attributes, name=name, num_outputs=num_outputs)
        for i, out in enumerate(node.outputs):
            if output_names is not None:
                out.name = output_names[i]
            else:
                out.name = f"{name or op_type.lower()}_out{i}"
        self.nodes.append(node)
        return node.outputs[0] if num_outputs == 1 else tuple(node.outputs)

    def model(
        self, outputs: Sequence[ir.Value], dtype: ir.DataType = ir.DataType.FLOAT
    ) -> ir.Model:
        """The finished model (IR version 8, opset ``self.opset``).

        Graph outputs without a type get ``dtype``; those without a shape get the one onnx
        shape inference gives (the checker requires both). Intermediate values stay
        unannotated, as in many exported models.
        """
        for value in outputs:
            if value.type is None:
                value.dtype = dtype
        graph = ir.Graph(
            self.inputs,
            list(outputs),
            nodes=self.nodes,
            initializers=self.initializers,
            opset_imports={"": self.opset},
            name="test",
        )
        model = ir.Model(graph, ir_version=8, producer_name="onnxcompress-tests")
        _annotate_output_shapes(model)
        return model


def _annotate_output_shapes(model: ir.Model) -> None:
    inferred = onnx.shape_inference.infer_shapes(ir.to_proto(model), data_prop=True)
    shapes = {v.name: v for v in inferred.graph.output}
    for value in model.graph.outputs:
        if value.shape is None and value.name in shapes:
            value.shape = ir.serde.deserialize_type_proto_for_shape(shapes[value.name].type)
        if value.shape is None:
            raise ValueError(f"cannot infer the shape of output '{value.name}'; set it")


def from_text(text: str) -> ir.Model:
    """An ``ir.Model`` from ONNX text (the ``onnx.parser.parse_model`` syntax)."""
    return ir.from_proto(onnx.parser.parse_model(text))


def clone(model: ir.Model) -> ir.Model:
    """An independent deep copy of ``model`` (serialized and read back)."""
    return ir.from_proto(ir.to_proto(model))


def to_proto(model: ir.Model | onnx.ModelProto) -> onnx.ModelProto:
    """``model`` as a ModelProto (returned as is when it already is one)."""
    return model if isinstance(model, onnx.ModelProto) else ir.to_proto(model)


# ---------------------------------------------------------------------------- running


def session(model: ir.Model | onnx.ModelProto, optimize: bool = False) -> ort.InferenceSession:
    """An onnxruntime CPU session; graph optimisations are off unless ``optimize``.

    Off by default so that a test compares the graphs it built, not what onnxruntime's own
    fusions (which fold BatchNormalization too) turn them into.
    """
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    data = to_proto(model).SerializeToString()
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def run(
    model: ir.Model | onnx.ModelProto, feeds: Mapping[str, np.ndarray], optimize: bool = False
) -> list[np.ndarray]:
    """Run ``model`` on onnxruntime (CPU) and return all graph outputs in order."""
    return session(model, optimize).run(None, dict(feeds))


def smooth_feeds(count: int, seed: int, shape: tuple[int, ...]) -> list[dict[str, np.ndarray]]:
    """Feeds ``{"x": image batch}`` whose neighbouring pixels are strongly correlated (running
    sums of noise), as in real images: the Gram matrix of a Conv's patches is far from diagonal."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        x = np.cumsum(np.cumsum(rng.standard_normal(shape), axis=2), axis=3)
        out.append({"x": (x / np.abs(x).max()).astype(np.float32)})
    return out


def random_feeds(
    model: ir.Model | onnx.ModelProto, seed: int = 0, batch: int = 2, scale: float = 1.0
) -> dict[str, np.ndarray]:
    """Seeded random inputs for every graph input; symbolic dims become ``batch``.

    Floats are standard normal times ``scale``; integers are in [0, 4).
    """
    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in session(model).get_inputs():
        shape = [d if isinstance(d, int) and d >= 0 else batch for d in inp.shape]
        dtype = _NP_OF_ORT[inp.type]
        if np.issubdtype(dtype, np.floating):
            feeds[inp.name] = (rng.standard_normal(shape) * scale).astype(dtype)
        elif dtype == np.bool_:
            feeds[inp.name] = rng.integers(0, 2, shape).astype(np.bool_)
        else:
            feeds[inp.name] = rng.integers(0, 4, shape).astype(dtype)
    return feeds


def check(model: ir.Model | onnx.ModelProto, full: bool = True) -> None:
    """Run the onnx checker (with strict shape inference when ``full``) on the model."""
    onnx.checker.check_model(to_proto(model), full_check=full)


# ---------------------------------------------------------------------------- comparing


def max_rel_diff(expected: Sequence[np.ndarray], actual: Sequence[np.ndarray]) -> float:
    """Largest ``max|a - e| / max(max|e|, 1e-12)`` over the outputs (0.0 when identical)."""
    worst = 0.0
    for e, a in zip(expected, actual, strict=True):
        e64, a64 = np.asarray(e, np.float64), np.asarray(a, np.float64)
        scale = max(float(np.max(np.abs(e64))) if e64.size else 0.0, 1e-12)
        diff = float(np.max(np.abs(a64 - e64))) if e64.size else 0.0
        worst = max(worst, diff / scale)
    return worst


def assert_close(
    expected: Sequence[np.ndarray], actual: Sequence[np.ndarray], rel: float = 1e-5
) -> None:
    """Same shapes and dtypes, and max-abs difference ≤ ``rel`` × the output's scale."""
    assert len(expected) == len(actual)
    for e, a in zip(expected, actual):
        assert e.shape == a.shape and e.dtype == a.dtype, (e.shape, e.dtype, a.shape, a.dtype)
    assert max_rel_diff(expected, actual) <= rel


def assert_identical(expected: Sequence[np.ndarray], actual: Sequence[np.ndarray]) -> None:
    """Bit-identical outputs (same shape, dtype and bytes)."""
    assert len(expected) == len(actual)
    for e, a in zip(expected, actual):
        assert e.dtype == a.dtype and e.shape == a.shape
        assert e.tobytes() == a.tobytes()


# ---------------------------------------------------------------------------- inspecting


def records(pass_, action: str | None = None) -> list:
    """The pass's NodeRecords from its last run, optionally only 'rewritten' or 'refused'."""
    return [r for r in pass_.records if action is None or r.action == action]


def refusals(pass_, node: str | None = None) -> list[str]:
    """Reasons the pass gave for refusing (optionally for the node labelled ``node``)."""
    return [r.detail for r in records(pass_, "refused") if node is None or r.node == node]


def ops(model_or_graph: ir.Model | ir.Graph, recursive: bool = True) -> list[str]:
    """Op types of the nodes of the graph, in order (subgraphs included when ``recursive``)."""
    graph = model_or_graph.graph if isinstance(model_or_graph, ir.Model) else model_or_graph
    nodes: Iterable[ir.Node] = ir.traversal.RecursiveGraphIterator(graph) if recursive else graph
    return [n.op_type for n in nodes]


def find_node(model: ir.Model, name: str) -> ir.Node:
    """The node called ``name`` anywhere in the model (KeyError when none)."""
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.name == name:
            return node
    raise KeyError(name)


# ---------------------------------------------------------------------------- BN models


def conv_model(weight, size=(10, 12), bias=True, name="conv", spatial_names=None, rng=None, **attrs) -> ir.Model:
    """x[N, C, *size] → Conv(weight, bias) → y; the bias is drawn from ``rng``."""
    rng = rng if rng is not None else np.random.default_rng(0)
    b = Builder()
    dims = spatial_names if spatial_names is not None else list(size)
    x = b.input("x", ["N", weight.shape[1] * attrs.get("group", 1), *dims])
    inputs = [x, b.init("W", np.asarray(weight, np.float32))]
    if bias:
        inputs.append(b.init("b", (0.1 * rng.standard_normal(weight.shape[0])).astype(np.float32)))
    y = b.op("Conv", inputs, name=name, **attrs)
    y.name = "y"
    return b.model([y])


def apply_and_compare(model: ir.Model, pass_, rel: float = 1e-5):
    """Run ``pass_`` on ``model``: it must change it, keep it valid and keep its outputs."""
    feeds = random_feeds(model, seed=1)
    before = run(model, feeds)
    assert pass_(model).modified
    check(model)
    assert_close(before, run(model, feeds), rel=rel)
    return pass_


def assert_left_alone(pass_, model: ir.Model, reason: str, node: str) -> None:
    """``pass_`` leaves ``model`` byte for byte as it was and refuses ``node`` with ``reason``."""
    snapshot = ir.to_onnx_text(model)
    assert not pass_(model).modified
    assert ir.to_onnx_text(model) == snapshot
    found = refusals(pass_, node)
    assert found and reason in found[0], found


def bn_params(channels: int, seed: int = 1, dtype=np.float32) -> dict[str, np.ndarray]:
    """Realistic inference BatchNorm statistics: gamma≈1, beta≈0, mean≈0, var in [0.5, 2]."""
    rng = np.random.default_rng(seed)
    return {
        "scale": (1.0 + 0.3 * rng.standard_normal(channels)).astype(dtype),
        "B": (0.2 * rng.standard_normal(channels)).astype(dtype),
        "mean": (0.5 * rng.standard_normal(channels)).astype(dtype),
        "var": rng.uniform(0.5, 2.0, channels).astype(dtype),
    }


def _add_bn(
    b: Builder, x: ir.Value, channels: int, seed: int, name: str = "bn", epsilon: float = 1e-5
) -> ir.Value:
    p = bn_params(channels, seed)
    params = [b.init(f"{name}_{k}", v) for k, v in p.items()]
    return b.op("BatchNormalization", [x, *params], name=name, epsilon=epsilon)


def conv_bn_model(
    c_in: int = 3,
    c_out: int = 8,
    kernel: int = 3,
    group: int = 1,
    bias: bool = True,
    size: int = 6,
    seed: int = 0,
) -> ir.Model:
    """x[N,c_in,size,size] → Conv(W, b, group) → BatchNormalization → y (nodes 'conv', 'bn')."""
    rng = np.random.default_rng(seed)
    b = Builder()
    x = b.input("x", ["N", c_in, size, size])
    shape = (c_out, c_in // group, kernel, kernel)
    w = b.init("W", (0.3 * rng.standard_normal(shape)).astype(np.float32))
    inputs = [x, w]
    if bias:
        inputs.append(b.init("b", (0.1 * rng.standard_normal(c_out)).astype(np.float32)))
    h = b.op("Conv", inputs, name="conv", group=group, pads=[1, 1, 1, 1])
    y = _add_bn(b, h, c_out, seed + 1)
    y.name = "y"
    return b.model([y])


def conv_transpose_bn_model(
    c_in: int = 4, c_out: int = 6, kernel: int = 3, group: int = 2, bias: bool = True, seed: int = 0
) -> ir.Model:
    """x[N,c_in,5,5] → ConvTranspose(W[c_in, c_out/group, k, k], group) → BN → y."""
    rng = np.random.default_rng(seed)
    b = Builder()
    x = b.input("x", ["N", c_in, 5, 5])
    shape = (c_in, c_out // group, kernel, kernel)
    w = b.init("W", (0.3 * rng.standard_normal(shape)).astype(np.float32))
    inputs = [x, w]
    if bias:
        inputs.append(b.init("b", (0.1 * rng.standard_normal(c_out)).astype(np.float32)))
    h = b.op("ConvTranspose", inputs, name="convt", group=group, strides=[2, 2])
    y = _add_bn(b, h, c_out, seed + 1)
    y.name = "y"
    return b.model([y])


def gemm_bn_model(
    k: int = 5,
    n: int = 4,
    trans_b: int = 0,
    bias: bool = True,
    alpha: float = 1.0,
    beta: float = 1.0,
    seed: int = 0,
) -> ir.Model:
    """x[N,k] → Gemm(B, C, transB, alpha, beta) → BN → y[N,n]."""
    rng = np.random.default_rng(seed)
    b = Builder()
    x = b.input("x", ["N", k])
    w_shape = (n, k) if trans_b else (k, n)
    w = b.init("W", (0.3 * rng.standard_normal(w_shape)).astype(np.float32))
    inputs = [x, w]
    if bias:
        inputs.append(b.init("b", (0.1 * rng.standard_normal(n)).astype(np.float32)))
    h = b.op("Gemm", inputs, name="gemm", transB=trans_b, alpha=alpha, beta=beta)
    y = _add_bn(b, h, n, seed + 1)
    y.name = "y"
    return b.model([y])


def matmul_bn_model(
    k: int = 5, n: int = 4, x_shape: Sequence[int | str] | None = None, seed: int = 0
) -> ir.Model:
    """x[N,k] (or ``x_shape``) → MatMul(W[k,n]) → BN → y."""
    rng = np.random.default_rng(seed)
    b = Builder()
    x = b.input("x", list(x_shape) if x_shape is not None else ["N", k])
    w = b.init("W", (0.3 * rng.standard_normal((k, n))).astype(np.float32))
    h = b.op("MatMul", [x, w], name="matmul")
    y = _add_bn(b, h, n, seed + 1)
    y.name = "y"
    return b.model([y])
