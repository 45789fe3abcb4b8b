"""fold-batchnorm: fold inference BatchNormalization into the Conv/Gemm/MatMul before it."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from onnxcompress.initializers import Names
from onnxcompress.pass_base import Candidate, CompressionPass, node_label
from onnxcompress.registry import register

_PRODUCERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_DEFAULT_EPSILON = 1e-5


@dataclasses.dataclass
class _Fold:
    """A BatchNormalization that can be folded, and what it folds into."""

    bn: ir.Node
    producer: ir.Node
    weight: ir.Value
    bias: ir.Value | None
    scale: np.ndarray  # gamma / sqrt(var + eps), float64
    mean: np.ndarray
    beta: np.ndarray


@register
class FoldBatchNorm(CompressionPass):
    """Fold inference BatchNormalization into the Conv, ConvTranspose, Gemm or MatMul before it.

    With ``s = gamma / sqrt(var + eps)`` the producer's weight is scaled along its output-channel
    axis, ``W' = W * s``, and its bias becomes ``b' = (b - mean) * s + beta`` (``b = 0`` when it
    had none). The axis is 0 for Conv (``[C_out, C_in/g, k...]``), axis 1 per group for
    ConvTranspose (``[C_in, C_out/g, k...]``), 0 or 1 for Gemm by ``transB`` (its ``beta``
    attribute is folded into the new bias and reset to 1), and 1 for MatMul with a 2-D weight
    ``[K, N]``, which keeps its MatMul and gets an ``Add`` of the new bias. Arithmetic is done in
    float64 and cast back to the weight's dtype once, so the result equals the unfolded model
    up to one rounding of each weight. The folded output takes the BatchNormalization output's
    name; BN parameters left unused are removed.

    Refused, with the reason: BN in training mode (``training_mode=1`` or more than one
    output) or with ``spatial=0``; BN parameters that are not constant initializers, or whose
    ``var + eps`` is not positive; an input not produced by one of the four ops; a producer
    output that also feeds other nodes or is a graph output; a weight or bias that is a graph
    input, not a constant initializer, shared with another node, or not floating point; a
    channel count that does not match; a ConvTranspose whose input channels do not divide by
    ``group``; a MatMul weight that is not 2-D or not the second input, and a MatMul output
    whose rank is not 2 (BN normalises axis 1, MatMul's features are the last axis) or unknown.
    """

    name = "fold-batchnorm"
    prerequisites = ("lift-constants",)
    preserves = ()

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self._names = Names(model)
        folded = 0
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            if _is_bn(node):
                folded += self._try_fold(node)
        if folded:
            self.note(f"folded {folded} BatchNormalization nodes")
        return ir.passes.PassResult(model, modified=bool(folded))

    def candidates(self, model: ir.Model) -> list[Candidate]:
        found = []
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            if _is_bn(node) and isinstance(fold := _plan(node), _Fold):
                what = f"fold into {fold.producer.op_type} '{node_label(fold.producer)}'"
                found.append(Candidate(self.name, node_label(node), node.op_type, what))
        return found

    def _try_fold(self, bn: ir.Node) -> bool:
        fold = _plan(bn)
        if isinstance(fold, str):
            self.refused(bn, fold)
            return False
        detail = f"folded into {fold.producer.op_type} '{node_label(fold.producer)}'"
        self._apply(fold)
        self.rewrote(bn, detail)
        return True

    def _apply(self, fold: _Fold) -> None:
        producer, bn = fold.producer, fold.bn
        weight = fold.weight.const_value.numpy()
        scaled = _scale_weight(producer, weight.astype(np.float64), fold.scale)
        fold.weight.const_value = ir.tensor(scaled.astype(weight.dtype), name=fold.weight.name)
        new_bias = ir.tensor(_folded_bias(fold).astype(weight.dtype))
        if producer.op_type == "MatMul":
            result = self._append_add(fold, new_bias)
        else:
            self._set_bias(fold, new_bias)
            result = producer.outputs[0]
        params = list(dict.fromkeys(bn.inputs[1:]))
        _replace_output(bn, result)
        _drop_unused_initializers(params)

    def _set_bias(self, fold: _Fold, tensor: ir.TensorProtocol) -> None:
        """Give the producer ``tensor`` as its bias (Conv/ConvTranspose input 2, Gemm C)."""
        producer = fold.producer
        if producer.op_type == "Gemm":
            producer.attributes.pop("beta", None)
        if fold.bias is not None:
            tensor.name = fold.bias.name
            fold.bias.const_value = tensor
            fold.bias.shape = ir.Shape(tensor.shape)
            return
        value = self._new_initializer(producer.graph, f"{fold.weight.name}_bias", tensor)
        producer.resize_inputs(3)
        producer.replace_input_with(2, value)

    def _append_add(self, fold: _Fold, tensor: ir.TensorProtocol) -> ir.Value:
        """MatMul keeps its form; an Add of the folded bias takes the BN's place."""
        bn, matmul = fold.bn, fold.producer
        bias = self._new_initializer(bn.graph, f"{fold.weight.name}_bias", tensor)
        # The MatMul's values change, so its output gets a new name (drift localisation
        # compares activations by name).
        matmul.outputs[0].name = self._names.unique(f"{matmul.outputs[0].name}_bnfolded")
        add = ir.node("Add", [matmul.outputs[0], bias], name=bn.name or None)
        bn.graph.insert_before(bn, add)
        return add.outputs[0]

    def _new_initializer(self, graph: ir.Graph, base: str, tensor: ir.TensorProtocol) -> ir.Value:
        tensor.name = self._names.unique(base)
        value = ir.Value(
            name=tensor.name,
            shape=ir.Shape(tensor.shape),
            type=ir.TensorType(tensor.dtype),
            const_value=tensor,
        )
        graph.register_initializer(value)
        return value



# ---------------------------------------------------------------------------- the checks


def _is_bn(node: ir.Node) -> bool:
    return node.op_type == "BatchNormalization" and node.domain == ""


def _plan(bn: ir.Node) -> _Fold | str:
    """What folding ``bn`` means, or the one-line reason it cannot be folded."""
    if reason := _bn_reason(bn):
        return reason
    x = bn.inputs[0]
    producer = x.producer()
    if producer is None or producer.op_type not in _PRODUCERS or producer.domain != "":
        kind = "a graph input" if producer is None else f"{producer.op_type}"
        return f"its input comes from {kind}, not from Conv, ConvTranspose, Gemm or MatMul"
    if producer.graph is not bn.graph:
        return f"the {producer.op_type} is in another graph"
    if reason := _exclusive_reason(x, bn, producer.op_type):
        return reason
    weight = producer.inputs[1] if len(producer.inputs) > 1 else None
    bias = producer.inputs[2] if len(producer.inputs) > 2 else None
    if weight is None:
        return f"the {producer.op_type} has no weight input"
    if producer.op_type == "MatMul" and producer.inputs[0] is weight:
        return "the MatMul reads its weight as both inputs"
    for role, value, index in (("weight", weight, 1), ("bias", bias, 2)):
        if value is not None and (reason := _operand_reason(value, role, producer, index)):
            return reason
    gamma, beta, mean, var = (p.const_value.numpy().astype(np.float64) for p in bn.inputs[1:])
    if reason := _channel_reason(producer, weight, gamma.size):
        return reason
    eps = bn.attributes.get_float("epsilon", _DEFAULT_EPSILON)
    if not np.all(var + eps > 0):
        return "var + epsilon is not positive for every channel"
    scale = gamma / np.sqrt(var + eps)
    return _Fold(bn, producer, weight, bias, scale, mean, beta)


def _bn_reason(bn: ir.Node) -> str:
    if bn.attributes.get_int("training_mode", 0) != 0:
        return "training_mode=1"
    if len(bn.outputs) > 1:
        return f"it has {len(bn.outputs)} outputs (training mode)"
    if bn.attributes.get_int("spatial", 1) == 0:
        return "spatial=0 (per-activation statistics)"
    if len(bn.inputs) != 5 or any(v is None for v in bn.inputs):
        return "it does not have the 5 inputs X, scale, B, mean, var"
    shapes = set()
    for value in bn.inputs[1:]:
        if value.is_graph_input():
            return f"parameter '{value.name}' is a graph input"
        if not value.is_initializer() or value.const_value is None:
            return f"parameter '{value.name}' is not a constant initializer"
        shapes.add(tuple(value.const_value.shape))
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        return f"parameters are not 1-D vectors of one length: {sorted(shapes)}"
    return ""


def _exclusive_reason(x: ir.Value, bn: ir.Node, op_type: str) -> str:
    if x.is_graph_output():
        return f"the {op_type} output '{x.name}' is also a graph output"
    others = [use.node for use in x.uses() if use.node is not bn]
    if others:
        return f"the {op_type} output '{x.name}' also feeds '{node_label(others[0])}'"
    return ""


def _operand_reason(value: ir.Value, role: str, producer: ir.Node, index: int) -> str:
    if value.is_graph_input():
        return f"{role} '{value.name}' is a graph input"
    if not value.is_initializer() or value.const_value is None:
        return f"{role} '{value.name}' is not a constant initializer"
    if value.is_graph_output():
        return f"{role} '{value.name}' is a graph output"
    for use in value.uses():
        if use.node is not producer or use.idx != index:
            return f"{role} '{value.name}' is shared with node '{node_label(use.node)}'"
    if not value.const_value.dtype.is_floating_point():
        return f"{role} '{value.name}' is {value.const_value.dtype.name}, not floating point"
    return ""


def _channel_reason(producer: ir.Node, weight: ir.Value, channels: int) -> str:
    """Why the BN's channel axis does not line up with the producer's output channels."""
    shape = tuple(weight.const_value.shape)
    op = producer.op_type
    if op in ("Conv", "ConvTranspose") and len(shape) < 3:
        return f"the {op} weight is {len(shape)}-D"
    if op in ("Gemm", "MatMul") and len(shape) != 2:
        return f"the {op} weight is {len(shape)}-D, only 2-D weights fold"
    if op == "ConvTranspose" and shape[0] % _group(producer):
        return f"ConvTranspose input channels {shape[0]} do not divide by group {_group(producer)}"
    if op == "MatMul" and (reason := _matmul_rank_reason(producer)):
        return reason
    out_channels = _out_channels(producer, shape)
    if out_channels != channels:
        return f"the {op} has {out_channels} output channels, BatchNormalization {channels}"
    return ""


def _matmul_rank_reason(matmul: ir.Node) -> str:
    rank = _rank(matmul.outputs[0])
    if rank is None:
        rank = _rank(matmul.inputs[0])
    if rank is None:
        return "the MatMul output's rank is unknown (run infer-shapes first)"
    if rank != 2:
        return (
            f"the MatMul output is {rank}-D: BatchNormalization normalises axis 1, "
            "the MatMul's features are the last axis"
        )
    return ""


def _rank(value: ir.Value) -> int | None:
    return None if value.shape is None else len(value.shape)


def _group(node: ir.Node) -> int:
    return node.attributes.get_int("group", 1)


def _out_channels(producer: ir.Node, shape: tuple[int, ...]) -> int:
    op = producer.op_type
    if op == "Conv":
        return shape[0]
    if op == "ConvTranspose":
        return shape[1] * _group(producer)
    if op == "Gemm":
        return shape[0] if producer.attributes.get_int("transB", 0) else shape[1]
    return shape[1]  # MatMul [K, N]


# ---------------------------------------------------------------------------- the arithmetic


def _scale_weight(producer: ir.Node, w: np.ndarray, s: np.ndarray) -> np.ndarray:
    """``w`` scaled by ``s`` along the producer's output-channel axis (a new array)."""
    op = producer.op_type
    if op == "ConvTranspose":
        group = _group(producer)
        grouped = w.reshape(group, w.shape[0] // group, w.shape[1], *w.shape[2:])
        per_group = s.reshape(group, 1, w.shape[1], *([1] * (w.ndim - 2)))
        return (grouped * per_group).reshape(w.shape)
    axis = 0 if op == "Conv" or (op == "Gemm" and producer.attributes.get_int("transB", 0)) else 1
    return w * s.reshape([-1 if i == axis else 1 for i in range(w.ndim)])


def _folded_bias(fold: _Fold) -> np.ndarray:
    """``(b - mean) * s + beta`` in float64; Gemm's ``beta`` attribute multiplies ``b`` first."""
    if fold.bias is None:
        bias = np.zeros_like(fold.mean)
    else:
        bias = fold.bias.const_value.numpy().astype(np.float64)
        if fold.producer.op_type == "Gemm":
            bias = bias * fold.producer.attributes.get_float("beta", 1.0)
    return (bias - fold.mean) * fold.scale + fold.beta


# ---------------------------------------------------------------------------- graph surgery


def _replace_output(bn: ir.Node, result: ir.Value) -> None:
    """Make ``result`` stand for the BN's output (same name, same uses) and remove the BN."""
    out = bn.outputs[0]
    name = out.name
    # BN keeps shape and type; a graph output must carry a type.
    if result.type is None:
        result.type = out.type
    if out.shape is not None:
        result.shape = out.shape
    out.replace_all_uses_with(result, replace_graph_outputs=True)
    bn.graph.remove(bn, safe=True)
    out.name = None
    result.name = name


def _drop_unused_initializers(values: list[ir.Value]) -> None:
    for value in values:
        if value.is_initializer() and not value.uses() and not value.is_graph_output():
            if not value.is_graph_input() and value.graph is not None:
                value.graph.initializers.pop(value.name)
