"""Cost analysis: parameters, storage bytes and multiply-accumulates (MACs), per node and in total.

Registered as the analysis ``"cost"``; ``compute_cost(model)`` is what the manager calls.

What is counted
---------------
* **params / bytes** count every constant tensor of the model once: the initializers of the main
  graph and of every subgraph (If/Loop/Scan bodies), and the tensors held by ``Constant`` nodes
  (``value``, ``value_float(s)``, ``value_int(s)``, ``value_string(s)``). Lifting Constant nodes to
  initializers therefore leaves the totals unchanged. ``params`` is the number of stored elements;
  ``bytes`` the storage they take by dtype (float16 = 2, int8 = 1, int4 = half a byte rounded up per
  tensor, strings = their UTF-8 length). Packed formats count what is stored: a ``MatMulNBits``
  weight is a uint8 tensor of packed nibbles, so its ``params`` is its number of bytes.
  A tensor shared by several nodes is counted once, and attributed to the first node that reads it
  (in graph order, subgraph nodes following the node that owns the subgraph); a Constant node's
  tensor that nothing reads is attributed to the Constant node itself. The per-node numbers add up
  to the totals, except for initializers that no node reads (dead ones, or ones only used as a graph
  output), which count in the totals only.
* **macs** are multiply-accumulates of the ops that are built of them: Conv (any rank, groups,
  dilations, strides), ConvTranspose, Gemm, MatMul (with broadcasting batch dims and 1-D operands),
  their integer / quantized forms (ConvInteger, QLinearConv, MatMulInteger, QLinearMatMul), the
  onnxruntime contrib ops FusedConv, NhwcConv, FusedGemm, QGemm, FusedMatMul, MatMulIntegerToFloat,
  DynamicQuantizeMatMul, MatMulNBits, MatMulBnb4, Attention, MultiHeadAttention, the ONNX
  Attention op, LSTM, GRU, RNN and Einsum. Every other op (elementwise, activations, normalisation,
  pooling, reductions, Softmax, data movement) counts 0 MACs. Bias additions and the
  elementwise parts of recurrent cells (gate activations, peepholes) are not counted.

  Formulas (N = batch, prod = product):

  ====================  ===============================================================
  Conv & co.            numel(Y) · prod(W.shape[1:])  = N·C_out·prod(out spatial)·(C_in/group)·prod(kernel)
  ConvTranspose         numel(X) · prod(W.shape[1:])  = N·C_in·prod(in spatial)·(C_out/group)·prod(kernel)
  Gemm                  M·N·K (transA / transB honoured)
  MatMul & co.          prod(broadcast batch dims)·M·N·K; a 1-D operand is a vector (M or N = 1)
  MatMulNBits/Bnb4      prod(A.shape[:-1])·N·K (N, K from the attributes)
  LSTM / GRU / RNN      seq·N·directions·gates·hidden·(input + hidden), gates = 4 / 3 / 1
  Einsum                prod(sizes of all indices) for two operands (a contraction),
                        (operands − 1)·prod(sizes) for more (naive order), 0 for one operand
  attention ops         N·heads·S_q·S_kv·(head_size_qk + head_size_v) (QKᵀ and A·V);
                        com.microsoft Attention adds its input projection
  ====================  ===============================================================

  MACs need shapes. The input model is never changed: a weight-free copy is serialised (initializers
  and Constant tensors of more than 1024 elements become typed graph inputs, so shape inference
  neither copies nor reads them), its symbolic input dims are fixed, and
  ``onnx.shape_inference.infer_shapes(..., data_prop=True)`` runs on it; if inference fails, the
  shapes already stored on the IR values are used. The first dim of every graph input, when
  symbolic or unknown, becomes ``batch`` (and so does every other dim with the same symbol);
  ``input_shapes`` fixes chosen inputs completely (their symbols propagate the same way). When
  every input dim is then known but some MAC op's dims are not (ONNX's data propagation stops at
  e.g. Shape -> Slice of a position-id table, as in exported BERTs), onnxruntime's symbolic shape
  inference (``onnxruntime.tools.symbolic_shape_infer``, sympy) runs on the same copy and fills
  the gaps. A MAC op whose needed dims stay unknown counts 0 and is listed in
  ``unknown_shape_nodes``; a transformer with a symbolic sequence length needs ``input_shapes``.
  A model with fixed dims is costed as it is: ``batch`` replaces symbolic dims only.

Limits: ops inside If/Loop/Scan subgraphs count once (both If branches are added; a Loop or Scan
body is not multiplied by its trip count); calls to model-local functions and contrib ops not listed
above (e.g. GroupQueryAttention) count 0 MACs without being listed; FusedMatMul's transBatch
attributes are ignored; ONNX sparse initializers are not represented by onnx_ir and so not counted.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable, Iterator, Sequence

import onnx
import onnx_ir as ir

from onnxcompress.analysis import register_analysis

logger = logging.getLogger(__name__)

__all__ = ["NodeCost", "ModelCost", "compute_cost", "input_symbols", "mac_op_types", "tensor_params_and_bytes"]

# Constant tensors up to this many elements keep their data in the copy handed to shape
# inference (shape-like int64 vectors, scalars for Range, ...); larger ones become typed inputs.
_KEEP_DATA_MAX_ELEMENTS = 1024

_DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclasses.dataclass
class NodeCost:
    node: str
    op_type: str
    params: int
    bytes: int
    macs: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class ModelCost:
    nodes: list[NodeCost]
    params: int
    bytes: int
    macs: int
    op_histogram: dict[str, int]
    unknown_shape_nodes: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "params": self.params,
            "bytes": self.bytes,
            "macs": self.macs,
            "op_histogram": dict(self.op_histogram),
            "unknown_shape_nodes": list(self.unknown_shape_nodes),
            "nodes": [n.to_dict() for n in self.nodes],
        }

    def node(self, name: str) -> NodeCost:
        """The cost of the node called ``name`` (KeyError if there is none)."""
        for n in self.nodes:
            if n.node == name:
                return n
        raise KeyError(name)


# --------------------------------------------------------------------------------------------
# Constant tensors: params and bytes
# --------------------------------------------------------------------------------------------


def _numel(dims: Sequence[int]) -> int:
    return math.prod(int(d) for d in dims)


def tensor_params_and_bytes(tensor: ir.TensorProtocol) -> tuple[int, int]:
    """Number of elements and storage bytes of a tensor, without reading its data
    (except for string tensors, whose size is their content)."""
    numel = _numel(tensor.shape.numpy())
    dtype = tensor.dtype
    if dtype == ir.DataType.STRING:
        try:
            if hasattr(tensor, "string_data"):
                data = tensor.string_data()
            else:
                data = tensor.numpy().ravel()
            nbytes = sum(len(s if isinstance(s, bytes) else str(s).encode()) for s in data)
        except Exception:  # pragma: no cover - unreadable external strings
            nbytes = 0
        return numel, nbytes
    try:
        bits = dtype.bitwidth
    except TypeError:  # pragma: no cover - undefined / exotic dtype
        return numel, int(getattr(tensor, "nbytes", 0) or 0)
    return numel, (numel * bits + 7) // 8


def _constant_node_size(node: ir.Node) -> tuple[int, int] | None:
    """params/bytes of the tensor a Constant node holds (None if it holds nothing we can size)."""
    for name, attr in node.attributes.items():
        if attr.is_ref():
            continue
        value = attr.value
        if name == "value" and value is not None:
            return tensor_params_and_bytes(value)
        if name == "value_float":
            return 1, 4
        if name == "value_int":
            return 1, 8
        if name == "value_floats":
            return len(value), 4 * len(value)
        if name == "value_ints":
            return len(value), 8 * len(value)
        if name == "value_string":
            return 1, len(value.encode() if isinstance(value, str) else value)
        if name == "value_strings":
            return len(value), sum(len(s.encode() if isinstance(s, str) else s) for s in value)
    return None


def _constant_node_tensor_type(node: ir.Node) -> tuple[int, list[int]] | None:
    """(onnx elem type, dims) of a Constant node's output, for the weight-free copy."""
    attrs = node.attributes
    if "value" in attrs and not attrs["value"].is_ref():
        t = attrs["value"].value
        return t.dtype.value, [int(d) for d in t.shape.numpy()]
    if "value_floats" in attrs:
        return onnx.TensorProto.FLOAT, [len(attrs["value_floats"].value)]
    if "value_ints" in attrs:
        return onnx.TensorProto.INT64, [len(attrs["value_ints"].value)]
    if "value_strings" in attrs:
        return onnx.TensorProto.STRING, [len(attrs["value_strings"].value)]
    return None


def _is_constant_node(node: ir.Node) -> bool:
    return node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS


def _subgraphs(node: ir.Node) -> Iterator[tuple[str, int, ir.Graph]]:
    """(attribute name, index or -1, graph) for each subgraph a node holds."""
    for name, attr in node.attributes.items():
        if attr.is_ref():
            continue
        if attr.type == ir.AttributeType.GRAPH:
            yield name, -1, attr.value
        elif attr.type == ir.AttributeType.GRAPHS:
            for i, g in enumerate(attr.value):
                yield name, i, g


def _walk(graph: ir.Graph) -> Iterator[tuple[ir.Node, ir.Graph]]:
    """Every node with the graph it belongs to; subgraph nodes follow the node owning them."""
    for node in graph:
        yield node, graph
        for _, _, sub in _subgraphs(node):
            yield from _walk(sub)


def _all_graphs(graph: ir.Graph) -> Iterator[ir.Graph]:
    yield graph
    for node in graph:
        for _, _, sub in _subgraphs(node):
            yield from _all_graphs(sub)


# --------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------

class _Shapes:
    """Known shapes of values: constant tensors, inferred shapes, then the IR's own shapes."""

    def __init__(self, symbols: dict[str, int]):
        self.symbols = symbols
        self.inferred: dict[int, list] = {}  # id(value) -> dims (int | str | None)
        self.constant: dict[int, list[int]] = {}
        self._keep: list[Any] = []  # keep keyed values alive so ids stay unique

    def _dim(self, d) -> int | None:
        if isinstance(d, int):
            return d if d >= 0 else None
        if isinstance(d, ir.SymbolicDim):
            d = d.value
        if isinstance(d, str):
            return self.symbols.get(d)
        return None

    def get(self, value: ir.Value | None) -> list[int | None] | None:
        if value is None:
            return None
        if id(value) in self.constant:
            return list(self.constant[id(value)])
        dims = None
        inferred = self.inferred.get(id(value))
        if inferred is not None:
            dims = [self._dim(d) for d in inferred]
        own = value.shape
        if own is not None:
            own_dims = [self._dim(d) for d in own]
            if dims is None:
                dims = own_dims
            elif len(own_dims) == len(dims):
                dims = [a if a is not None else b for a, b in zip(dims, own_dims)]
        return dims

    def known(self, value: ir.Value | None) -> list[int]:
        """All dims of ``value`` as ints, or raise _Unknown."""
        dims = self.get(value)
        if dims is None or any(d is None for d in dims):
            raise _Unknown
        return dims  # type: ignore[return-value]


class _Unknown(Exception):
    """A dim a MAC formula needs is not known."""


def _collect_symbols(
    graph: ir.Graph, batch: int, input_shapes: dict[str, Sequence[int]] | None
) -> tuple[dict[str, int], dict[str, list[int | None]]]:
    """Symbol -> value map, and the fixed dims for each graph input (None = leave as is)."""
    init_names = set(graph.initializers)
    inputs = {v.name: v for v in graph.inputs if v.name not in init_names}
    symbols: dict[str, int] = {}
    fixed: dict[str, list[int | None]] = {}
    if input_shapes:
        unknown = sorted(set(input_shapes) - set(inputs))
        if unknown:
            raise ValueError(
                f"input_shapes names {', '.join(map(repr, unknown))}, which "
                f"{'is not a graph input' if len(unknown) == 1 else 'are not graph inputs'}; "
                f"inputs: {', '.join(inputs) or '(none)'}"
            )
        for name, dims in input_shapes.items():
            dims = [None if d is None or int(d) < 0 else int(d) for d in dims]
            own = inputs[name].shape
            if own is not None and len(own) != len(dims):
                raise ValueError(
                    f"input_shapes[{name!r}] has rank {len(dims)} but input {name!r} has shape "
                    f"{list(own)} (rank {len(own)})"
                )
            if own is not None:
                for d, new in zip(own, dims):
                    if new is None:
                        continue
                    if isinstance(d, ir.SymbolicDim) and d.value is not None:
                        symbols.setdefault(d.value, new)
                    elif isinstance(d, int) and d != new:
                        raise ValueError(
                            f"input_shapes[{name!r}] = {list(dims)} contradicts the fixed shape "
                            f"{list(own)} of input {name!r}"
                        )
            fixed[name] = dims
    for name, value in inputs.items():
        own = value.shape
        if name in fixed or own is None or len(own) == 0:
            continue
        d0 = own[0]
        if isinstance(d0, int):
            continue
        sym = d0.value if isinstance(d0, ir.SymbolicDim) else None
        if sym is not None:
            symbols.setdefault(sym, batch)
            new = symbols[sym]
        else:
            new = batch
        fixed[name] = [new] + [None] * (len(own) - 1)
    return symbols, fixed


def _fix_dims_in_type(type_proto: onnx.TypeProto, symbols: dict[str, int], fixed=None) -> None:
    if not type_proto.HasField("tensor_type"):
        return
    if not type_proto.tensor_type.HasField("shape"):
        if fixed is None or any(d is None for d in fixed):
            return
        type_proto.tensor_type.shape.SetInParent()
        for d in fixed:
            type_proto.tensor_type.shape.dim.add().dim_value = d
        return
    for i, dim in enumerate(type_proto.tensor_type.shape.dim):
        if fixed is not None and i < len(fixed) and fixed[i] is not None:
            dim.dim_value = fixed[i]
        elif dim.HasField("dim_param") and dim.dim_param in symbols:
            dim.dim_value = symbols[dim.dim_param]


def _fix_dims_in_graph_proto(g: onnx.GraphProto, symbols: dict[str, int]) -> None:
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        _fix_dims_in_type(vi.type, symbols)
    for n in g.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                _fix_dims_in_graph_proto(a.g, symbols)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for sub in a.graphs:
                    _fix_dims_in_graph_proto(sub, symbols)


def _weight_free_proto(model: ir.Model) -> tuple[onnx.ModelProto, list[ir.Node]]:
    """A ModelProto of ``model`` whose large constants are typed graph inputs (no data read).

    Returns the proto and the top-level IR nodes it holds, in order (large Constant nodes are
    left out; their outputs are graph inputs instead)."""
    graph = model.graph
    input_names = {v.name for v in graph.inputs}
    extra_inputs: list[onnx.ValueInfoProto] = []
    initializer_protos: list[onnx.TensorProto] = []
    for name, value in graph.initializers.items():
        tensor = value.const_value
        if tensor is None:
            continue
        dims = [int(d) for d in tensor.shape.numpy()]
        if _numel(dims) <= _KEEP_DATA_MAX_ELEMENTS:
            try:
                tp = ir.serde.serialize_tensor(tensor)
                if tp.data_location == onnx.TensorProto.EXTERNAL:
                    tp.ClearField("external_data")
                    tp.data_location = onnx.TensorProto.DEFAULT
                    tp.raw_data = tensor.tobytes()
                tp.name = name
                initializer_protos.append(tp)
                continue
            except Exception:  # unreadable data: inference makes do with the type
                logger.debug("cost: initializer %r data not readable; typed input instead", name)
        if name not in input_names:
            extra_inputs.append(onnx.helper.make_tensor_value_info(name, tensor.dtype.value, dims))
    kept_nodes: list[ir.Node] = []
    for node in graph:
        if _is_constant_node(node) and len(node.outputs) == 1:
            size = _constant_node_size(node)
            ttype = _constant_node_tensor_type(node)
            if size is not None and ttype is not None and size[0] > _KEEP_DATA_MAX_ELEMENTS:
                out = node.outputs[0]
                if out.name and out.name not in input_names:
                    extra_inputs.append(
                        onnx.helper.make_tensor_value_info(out.name, ttype[0], ttype[1])
                    )
                    continue
        kept_nodes.append(node)
    view = ir.GraphView(
        graph.inputs, graph.outputs, nodes=kept_nodes, initializers=(), name=graph.name
    )
    proto = onnx.ModelProto()
    proto.ir_version = max(int(model.ir_version or 0), 4)
    for domain, version in model.opset_imports.items():
        proto.opset_import.add(domain=domain, version=version)
    ir.serde.serialize_graph_into(proto.graph, view, model_ir_version=model.ir_version)
    proto.graph.initializer.extend(initializer_protos)
    proto.graph.input.extend(extra_inputs)
    _stand_in_standard_ops(proto.graph)
    for function in model.functions.values():
        try:
            proto.functions.append(ir.serde.serialize_function(function))
        except Exception as exc:  # pragma: no cover - inference then skips calls to it
            logger.debug("cost: could not serialise function %s: %s", function.identifier(), exc)
    return proto, kept_nodes


def _stand_in_standard_ops(g: onnx.GraphProto) -> None:
    """Give ONNX shape inference, which knows no contrib op, a standard op with the same output
    shape where there is one: DynamicQuantizeMatMul(A, B, ...) becomes MatMul(A, B), its
    (u)int8 weight B, a typed graph input, retyped float as A is; GatherBlockQuantized(data,
    indices, ...) becomes Gather(data, indices) on its gather axis, the data retyped float and,
    with 4-bit codes packed two per uint8, its quantized (last) axis twice as long. Node for
    node, so the inferred graph stays in step with the IR's."""
    weights = {vi.name: vi for vi in g.input}
    for node in g.node:
        if node.domain != "com.microsoft" or node.op_type not in _STAND_INS or len(node.input) < 2:
            continue
        name = node.input[_STAND_INS[node.op_type]]
        weight = weights[name] if name in weights else _as_typed_input(g, name, weights)
        if weight is None or not weight.type.HasField("tensor_type"):
            continue  # a computed or inline weight: inference leaves the output unknown
        if node.op_type == "GatherBlockQuantized":
            attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            dims = weight.type.tensor_type.shape.dim
            if attributes.get("bits", 4) == 4 and weight.type.tensor_type.elem_type == onnx.TensorProto.UINT8 \
                    and attributes.get("quantize_axis", len(dims) - 1) in (-1, len(dims) - 1) and dims[-1].HasField("dim_value"):
                dims[-1].dim_value *= 2
            axis = attributes.get("gather_axis", 0)
            del node.attribute[:]
            node.attribute.append(onnx.helper.make_attribute("axis", axis))
            node.op_type = "Gather"
        else:
            del node.attribute[:]
            node.op_type = "MatMul"
        weight.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
        del node.input[2:]
        node.domain = ""


_STAND_INS = {"DynamicQuantizeMatMul": 1, "GatherBlockQuantized": 0}  # op -> index of its constant input


def _as_typed_input(g: onnx.GraphProto, name: str, weights: dict) -> onnx.ValueInfoProto | None:
    """A small initializer (kept with its data) turned into a typed graph input, so that a
    stand-in can retype it; None if ``name`` is no initializer."""
    found = next((i for i, t in enumerate(g.initializer) if t.name == name), None)
    if found is None:
        return None
    tensor = g.initializer[found]
    del g.initializer[found]
    vi = onnx.helper.make_tensor_value_info(name, tensor.data_type, list(tensor.dims))
    g.input.append(vi)
    weights[name] = g.input[-1]
    return g.input[-1]


def _type_map(g: onnx.GraphProto) -> dict[str, onnx.TypeProto]:
    out: dict[str, onnx.TypeProto] = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        if vi.name:
            out[vi.name] = vi.type
    return out


def _dims_of(type_proto: onnx.TypeProto) -> list | None:
    if not type_proto.HasField("tensor_type") or not type_proto.tensor_type.HasField("shape"):
        return None
    dims: list = []
    for d in type_proto.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return dims


def _record_inferred(
    shapes: _Shapes,
    graph_values: Sequence[ir.Value],
    nodes: Sequence[ir.Node],
    g: onnx.GraphProto,
    fill_only: bool = False,
) -> None:
    """Copy the shapes of ``g`` (the inferred proto of an IR graph) onto that graph's values.

    With ``fill_only``, a value's recorded dims are only completed where they are still unknown."""
    types = _type_map(g)

    def put(value: ir.Value | None) -> None:
        if value is None or not value.name or value.name not in types:
            return
        dims = _dims_of(types[value.name])
        if dims is None:
            return
        old = shapes.inferred.get(id(value))
        if fill_only and old is not None:
            if len(old) != len(dims):
                return
            dims = [o if shapes._dim(o) is not None else d for o, d in zip(old, dims)]
        shapes.inferred[id(value)] = dims
        shapes._keep.append(value)

    for v in graph_values:
        put(v)
    if len(g.node) != len(nodes):  # pragma: no cover - defensive: proto and IR out of step
        logger.debug("cost: inferred graph has %d nodes, IR has %d", len(g.node), len(nodes))
        for node in nodes:
            for v in node.outputs:
                put(v)
        return
    for node, node_proto in zip(nodes, g.node):
        for v in node.outputs:
            put(v)
        attrs = {a.name: a for a in node_proto.attribute}
        for attr_name, index, sub in _subgraphs(node):
            a = attrs.get(attr_name)
            if a is None:
                continue
            sub_proto = a.g if index < 0 else (a.graphs[index] if index < len(a.graphs) else None)
            if sub_proto is None:
                continue
            _record_inferred(
                shapes, list(sub.inputs) + list(sub.outputs), list(sub), sub_proto, fill_only
            )


def _strip_value_info(g: onnx.GraphProto) -> None:
    del g.value_info[:]
    for n in g.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                _strip_value_info(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for sub in a.graphs:
                    _strip_value_info(sub)


def _onnxruntime_symbolic_inference(proto: onnx.ModelProto) -> onnx.ModelProto | None:
    """onnxruntime's symbolic shape inference (sympy): follows shape arithmetic (Shape -> Slice,
    Range, ...) that ONNX's data propagation stops at, and knows the com.microsoft ops."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
    except Exception:  # pragma: no cover - onnxruntime without its tools
        return None
    # The class's own infer_shapes() saves a model to the working directory when inference is
    # incomplete; drive its steps directly instead (a partial result is still useful).
    ssi = SymbolicShapeInference(2**31 - 1, True, False, 0)
    ssi._preprocess(proto)  # noqa: SLF001
    while ssi.run_:
        ssi._infer_impl()  # noqa: SLF001
    ssi._update_output_from_vi()  # noqa: SLF001
    return ssi.out_mp_


def _infer(
    model: ir.Model, shapes: _Shapes, fixed: dict[str, list[int | None]]
) -> tuple[bool, Callable[[], bool] | None]:
    """Run ONNX shape inference on a weight-free copy and record the shapes.

    Returns whether it worked, and a function that runs the slower onnxruntime symbolic shape
    inference on the same copy and fills in dims still unknown (None if no copy could be made
    or some input dim is still symbolic)."""
    try:
        proto, kept_nodes = _weight_free_proto(model)
    except Exception as exc:  # pragma: no cover - serialisation of an odd model
        logger.debug("cost: could not serialise the model for shape inference: %s", exc)
        return False, None
    for vi in proto.graph.input:
        if vi.name in fixed:
            _fix_dims_in_type(vi.type, shapes.symbols, fixed[vi.name])
    _fix_dims_in_graph_proto(proto.graph, shapes.symbols)
    graph = model.graph
    graph_values = list(graph.inputs) + list(graph.outputs)

    inferred = None
    for attempt in ("with value_info", "without value_info"):
        if attempt == "without value_info":
            _strip_value_info(proto.graph)
        try:
            inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
            break
        except Exception as exc:
            logger.debug("cost: ONNX shape inference (%s) failed: %s", attempt, exc)
    if inferred is not None:
        _record_inferred(shapes, graph_values, kept_nodes, inferred.graph)

    def refine() -> bool:
        try:
            out = _onnxruntime_symbolic_inference(proto)
        except Exception as exc:
            logger.debug("cost: onnxruntime symbolic shape inference failed: %s", exc)
            return False
        if out is None:
            return False
        _record_inferred(shapes, graph_values, kept_nodes, out.graph, fill_only=True)
        return True

    # onnxruntime's inference is worth its time only when every input dim is known: with
    # symbolic input dims left, the dims it could not find are unknowable anyway (and sympy slow).
    static = all(
        vi.type.HasField("tensor_type")
        and vi.type.tensor_type.HasField("shape")
        and all(d.HasField("dim_value") for d in vi.type.tensor_type.shape.dim)
        for vi in proto.graph.input
    )
    return inferred is not None, (refine if static else None)


# --------------------------------------------------------------------------------------------
# MAC formulas
# --------------------------------------------------------------------------------------------


def _attr(node: ir.Node, name: str, default=None):
    attr = node.attributes.get(name)
    if attr is None or attr.is_ref():
        return default
    return attr.value


def _input(node: ir.Node, i: int) -> ir.Value | None:
    return node.inputs[i] if i < len(node.inputs) else None


def _output(node: ir.Node, i: int) -> ir.Value | None:
    return node.outputs[i] if i < len(node.outputs) else None


def _broadcast(a: Sequence[int], b: Sequence[int]) -> list[int]:
    n = max(len(a), len(b))
    a = [1] * (n - len(a)) + list(a)
    b = [1] * (n - len(b)) + list(b)
    return [y if x == 1 else x for x, y in zip(a, b)]


def _conv(w_idx: int) -> Callable[[ir.Node, _Shapes], int]:
    """MACs = numel(Y)·prod(W.shape[1:]), the weight being input ``w_idx``."""

    def macs(node: ir.Node, s: _Shapes) -> int:
        w = s.known(_input(node, w_idx))
        y = s.known(_output(node, 0))
        return _numel(y) * _numel(w[1:])

    return macs


def _conv_transpose(node: ir.Node, s: _Shapes) -> int:
    x = s.known(_input(node, 0))
    w = s.known(_input(node, 1))
    return _numel(x) * _numel(w[1:])


def _gemm(a_idx: int, b_idx: int) -> Callable[[ir.Node, _Shapes], int]:
    def macs(node: ir.Node, s: _Shapes) -> int:
        a = s.known(_input(node, a_idx))
        b = s.known(_input(node, b_idx))
        if len(a) != 2 or len(b) != 2:
            raise _Unknown
        m, k = (a[1], a[0]) if _attr(node, "transA", 0) else (a[0], a[1])
        n = b[0] if _attr(node, "transB", 0) else b[1]
        return m * n * k

    return macs


def _matmul_macs(a: list[int], b: list[int]) -> int:
    if not a or not b:
        raise _Unknown
    if len(a) == 1:
        a = [1, a[0]]
    if len(b) == 1:
        b = [b[0], 1]
    m, k = a[-2], a[-1]
    n = b[-1]
    batch = _broadcast(a[:-2], b[:-2])
    return _numel(batch) * m * n * k


def _matmul(a_idx: int, b_idx: int, transposes: bool = False) -> Callable[[ir.Node, _Shapes], int]:
    def macs(node: ir.Node, s: _Shapes) -> int:
        a = s.known(_input(node, a_idx))
        b = s.known(_input(node, b_idx))
        if transposes:  # com.microsoft.FusedMatMul
            if _attr(node, "transA", 0) and len(a) >= 2:
                a = a[:-2] + [a[-1], a[-2]]
            if _attr(node, "transB", 0) and len(b) >= 2:
                b = b[:-2] + [b[-1], b[-2]]
        return _matmul_macs(a, b)

    return macs


def _matmul_nbits(node: ir.Node, s: _Shapes) -> int:
    n, k = _attr(node, "N"), _attr(node, "K")
    if n is None or k is None:
        raise _Unknown
    a = s.known(_input(node, 0))
    return _numel(a[:-1]) * int(n) * int(k)


def _recurrent(gates: int) -> Callable[[ir.Node, _Shapes], int]:
    def macs(node: ir.Node, s: _Shapes) -> int:
        x = s.known(_input(node, 0))
        w = s.known(_input(node, 1))
        if len(x) != 3 or len(w) != 3:
            raise _Unknown
        seq, batch = (x[1], x[0]) if _attr(node, "layout", 0) else (x[0], x[1])
        directions = w[0]
        hidden = _attr(node, "hidden_size") or w[1] // gates
        input_size = w[2]
        return seq * batch * directions * gates * hidden * (input_size + hidden)

    return macs


def _einsum(node: ir.Node, s: _Shapes) -> int:
    equation = _attr(node, "equation")
    operands = [v for v in node.inputs if v is not None]
    if not equation or not operands:
        raise _Unknown
    if len(operands) == 1:
        return 0
    lhs = equation.replace(" ", "").split("->")[0]
    terms = lhs.split(",")
    if len(terms) != len(operands):
        raise _Unknown
    sizes: dict[str, int] = {}
    ellipsis: list[int] = []
    for term, value in zip(terms, operands):
        dims = s.known(value)
        if "..." in term:
            head, tail = term.split("...")
            n_ell = len(dims) - len(head) - len(tail)
            if n_ell < 0:
                raise _Unknown
            ellipsis = _broadcast(ellipsis, dims[len(head) : len(head) + n_ell])
            letters = list(head) + list(tail)
            dims = dims[: len(head)] + dims[len(head) + n_ell :]
        else:
            letters = list(term)
        if len(letters) != len(dims):
            raise _Unknown
        for letter, d in zip(letters, dims):
            sizes[letter] = max(sizes.get(letter, 1), d)
    return (len(operands) - 1) * _numel(sizes.values()) * _numel(ellipsis)


def _attention(node: ir.Node, s: _Shapes) -> int:
    """ONNX Attention (opset 23): QKᵀ and softmax(QKᵀ)·V."""
    q = s.known(_input(node, 0))
    k = s.known(_input(node, 1))
    v = s.known(_input(node, 2))
    past = _input(node, 4)
    past_len = s.known(past)[2] if past is not None else 0
    if len(q) == 4 and len(k) == 4 and len(v) == 4:
        b, hq, sq, d = q
        skv, dv = k[2], v[3]
        return b * hq * sq * (skv + past_len) * (d + dv)
    if len(q) == 3 and len(k) == 3 and len(v) == 3:
        hq, hkv = _attr(node, "q_num_heads"), _attr(node, "kv_num_heads")
        if not hq or not hkv:
            raise _Unknown
        b, sq, q_hidden = q
        skv = k[1]
        dv = v[2] // hkv
        return b * sq * (skv + past_len) * (q_hidden + hq * dv)
    raise _Unknown


def _ms_mha(node: ir.Node, s: _Shapes) -> int:
    """com.microsoft.MultiHeadAttention with separate 3-D query/key/value."""
    q = s.known(_input(node, 0))
    k_val, v_val = _input(node, 1), _input(node, 2)
    if len(q) != 3 or k_val is None or v_val is None:
        raise _Unknown
    k, v = s.known(k_val), s.known(v_val)
    b, sq, q_hidden = q
    if len(k) == 3 and len(v) == 3:
        return b * sq * k[1] * (q_hidden + v[2])
    if len(k) == 4 and len(v) == 4:  # [B, heads, L, head]
        return b * sq * k[2] * (q_hidden + v[1] * v[3])
    raise _Unknown


def _ms_attention(node: ir.Node, s: _Shapes) -> int:
    """com.microsoft.Attention: QKV projection plus attention (no past / relative bias)."""
    x = s.known(_input(node, 0))
    w = s.known(_input(node, 1))
    if len(x) != 3 or len(w) != 2:
        raise _Unknown
    b, seq, hidden_in = x
    projection = b * seq * hidden_in * w[1]
    sizes = _attr(node, "qkv_hidden_sizes")
    dq, dk, dv = (list(sizes) if sizes else [w[1] // 3] * 3)
    past = _input(node, 4)
    past_len = s.known(past)[3] if past is not None else 0
    return projection + b * seq * (seq + past_len) * (dq + dv)


_FORMULAS: dict[tuple[str, str], Callable[[ir.Node, _Shapes], int]] = {
    ("", "Conv"): _conv(1),
    ("", "ConvInteger"): _conv(1),
    ("", "QLinearConv"): _conv(3),
    ("", "ConvTranspose"): _conv_transpose,
    ("", "Gemm"): _gemm(0, 1),
    ("", "MatMul"): _matmul(0, 1),
    ("", "MatMulInteger"): _matmul(0, 1),
    ("", "QLinearMatMul"): _matmul(0, 3),
    ("", "LSTM"): _recurrent(4),
    ("", "GRU"): _recurrent(3),
    ("", "RNN"): _recurrent(1),
    ("", "Einsum"): _einsum,
    ("", "Attention"): _attention,
    ("com.microsoft", "FusedConv"): _conv(1),
    ("com.microsoft", "NhwcConv"): _conv(1),
    ("com.microsoft", "NhwcFusedConv"): _conv(1),
    ("com.microsoft", "QLinearConv"): _conv(3),
    ("com.microsoft", "ConvTransposeWithDynamicPads"): _conv_transpose,
    ("com.microsoft", "FusedGemm"): _gemm(0, 1),
    ("com.microsoft", "QGemm"): _gemm(0, 3),
    ("com.microsoft", "FusedMatMul"): _matmul(0, 1, transposes=True),
    ("com.microsoft", "MatMulIntegerToFloat"): _matmul(0, 1),
    ("com.microsoft", "DynamicQuantizeMatMul"): _matmul(0, 1),
    ("com.microsoft", "MatMulNBits"): _matmul_nbits,
    ("com.microsoft", "MatMulBnb4"): _matmul_nbits,
    ("com.microsoft", "MultiHeadAttention"): _ms_mha,
    ("com.microsoft", "Attention"): _ms_attention,
}


def mac_op_types() -> list[str]:
    """The ops this analysis counts MACs for, as ``domain::op_type`` (default domain: op_type)."""
    return sorted(f"{d}::{o}" if d else o for d, o in _FORMULAS)


def _formula(node: ir.Node) -> Callable[[ir.Node, _Shapes], int] | None:
    domain = "" if node.domain in _DEFAULT_DOMAINS else node.domain
    return _FORMULAS.get((domain, node.op_type))


def _node_macs(node: ir.Node, shapes: _Shapes) -> int | None:
    """MACs of one node; 0 for ops without a formula, None if the shapes it needs are unknown."""
    formula = _formula(node)
    if formula is None:
        return 0
    try:
        return int(formula(node, shapes))
    except _Unknown:
        return None
    except (TypeError, ValueError, IndexError, ZeroDivisionError) as exc:
        logger.debug("cost: MACs of %s (%s) not computable: %s", node.name, node.op_type, exc)
        return None


def _apply_fixed_inputs(
    graph: ir.Graph, shapes: _Shapes, fixed: dict[str, list[int | None]]
) -> None:
    """Without inference, still apply the fixed input dims to the graph inputs' own shapes."""
    for value in graph.inputs:
        dims = fixed.get(value.name)
        if dims is None or value.shape is None or len(value.shape) != len(dims):
            continue
        own = [d if isinstance(d, int) else getattr(d, "value", None) for d in value.shape]
        shapes.inferred[id(value)] = [f if f is not None else o for f, o in zip(dims, own)]
        shapes._keep.append(value)


# --------------------------------------------------------------------------------------------
# The analysis
# --------------------------------------------------------------------------------------------


def input_symbols(model: ir.Model, batch: int = 1, input_shapes: dict[str, list[int]] | None = None) -> dict[str, int]:
    """The sizes :func:`compute_cost` gives the symbolic dims of the graph inputs (same
    arguments): those ``input_shapes`` fixes, and ``batch`` for a symbolic first dim."""
    return _collect_symbols(model.graph, batch, input_shapes)[0]


@register_analysis("cost")
def compute_cost(
    model: ir.Model,
    batch: int = 1,
    input_shapes: dict[str, list[int]] | None = None,
) -> ModelCost:
    """Parameters, storage bytes and MACs of ``model``, per node and in total.

    ``batch`` replaces the symbolic (or unknown) first dim of every graph input, and every other
    occurrence of the same symbol. ``input_shapes`` fixes whole input shapes (e.g.
    ``{"input_ids": [1, 128]}``; ``None`` or a negative entry keeps that dim); the symbols they
    replace propagate to the other inputs, and they take precedence over ``batch``.
    The model is not modified. See the module docstring for what is counted and how.
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    graph = model.graph

    # 1. every constant tensor, once: initializers of all graphs and Constant-node tensors
    sizes: dict[int, tuple[int, int]] = {}  # id(value) -> (params, bytes)
    constants: list[ir.Value] = []
    const_producer: dict[int, ir.Node] = {}
    shapes = _Shapes({})
    for g in _all_graphs(graph):
        for value in g.initializers.values():
            tensor = value.const_value
            if tensor is None or id(value) in sizes:
                continue
            sizes[id(value)] = tensor_params_and_bytes(tensor)
            constants.append(value)
            shapes.constant[id(value)] = [int(d) for d in tensor.shape.numpy()]
    order: list[ir.Node] = []
    for node, _ in _walk(graph):
        order.append(node)
        if _is_constant_node(node) and node.outputs:
            size = _constant_node_size(node)
            out = node.outputs[0]
            if size is not None and id(out) not in sizes:
                sizes[id(out)] = size
                constants.append(out)
                const_producer[id(out)] = node
                ttype = _constant_node_tensor_type(node)
                if ttype is not None:
                    shapes.constant[id(out)] = ttype[1]
                elif size[0] == 1:
                    shapes.constant[id(out)] = []
    position = {id(n): i for i, n in enumerate(order)}

    # 2. attribute each constant to its first reader (graph order), else its Constant node
    per_node: dict[int, list[int]] = {id(n): [0, 0] for n in order}
    for value in constants:
        readers = [u.node for u in value.uses() if id(u.node) in position]
        if readers:
            owner = min(readers, key=lambda n: position[id(n)])
        else:
            owner = const_producer.get(id(value))
        if owner is not None:
            p, b = sizes[id(value)]
            per_node[id(owner)][0] += p
            per_node[id(owner)][1] += b

    # 3. shapes (only if some node needs them)
    refine = None
    if any(_formula(n) is not None for n in order):
        symbols, fixed = _collect_symbols(graph, batch, input_shapes)
        shapes.symbols.update(symbols)
        ok, refine = _infer(model, shapes, fixed)
        if not ok:
            logger.info("cost: ONNX shape inference failed; using the shapes stored on the model")
            _apply_fixed_inputs(graph, shapes, fixed)
    elif input_shapes:
        _collect_symbols(graph, batch, input_shapes)  # still validate the argument

    # 4. per node
    macs: dict[int, int | None] = {id(n): _node_macs(n, shapes) for n in order}
    if refine is not None and any(m is None for m in macs.values()) and refine():
        for node in order:
            if macs[id(node)] is None:
                macs[id(node)] = _node_macs(node, shapes)

    nodes: list[NodeCost] = []
    unknown: list[str] = []
    histogram: dict[str, int] = {}
    for i, node in enumerate(order):
        name = node.name or f"{node.op_type}#{i}"
        histogram[node.op_type] = histogram.get(node.op_type, 0) + 1
        node_macs = macs[id(node)]
        if node_macs is None:
            unknown.append(name)
        p, b = per_node[id(node)]
        nodes.append(
            NodeCost(node=name, op_type=node.op_type, params=p, bytes=b, macs=node_macs or 0)
        )

    total_params = sum(sizes[id(v)][0] for v in constants)
    total_bytes = sum(sizes[id(v)][1] for v in constants)
    return ModelCost(
        nodes=nodes,
        params=total_params,
        bytes=total_bytes,
        macs=sum(n.macs for n in nodes),
        op_histogram=dict(sorted(histogram.items())),
        unknown_shape_nodes=unknown,
    )
