"""QuantizeLinear/DequantizeLinear placement: which tensors get a Q→DQ pair, and the graph edit.

The plan names *units*: the nodes onnxruntime can run as one int8 kernel when their float
inputs come from DequantizeLinear and their output goes to QuantizeLinear (Conv, MatMul,
Add, pooling, …), plus constant Gather tables. Given the units to enable and each tensor's
quantization parameters, :func:`apply` rewrites the graph:

- every float activation input of an enabled unit gets Q→DQ, and the unit reads the DQ;
- a weight becomes an int8 initializer (symmetric, per output channel or per tensor) read
  through its own DequantizeLinear; a Conv bias becomes int32 at input_scale·weight_scale
  (a weight scale is raised where a bias would not fit int32); a constant operand of Add, Mul
  or Concat is stored on the activation grid;
- the output of an enabled unit gets Q→DQ, and then *every* consumer reads the DQ (a direct
  float reader would stop onnxruntime from fusing the producer);
- a Relu or Clip that is the only reader of an enabled unit's output is removed when the
  output's quantization clamps exactly as it does (Relu: zero point at the grid's minimum;
  Clip: the grid's range inside the clip's, to half a step): Q(act(x)) = Q(x) then;
- data movement ops (Reshape, Transpose, MaxPool, …) whose input is produced in int8 pass it
  on: their output gets Q→DQ with the same parameters, which onnxruntime drops so the op
  runs on int8 data;
- a constant Gather table (an embedding) is stored on the activation grid and dequantized
  after the Gather, so only the gathered rows are expanded;
- graph outputs stay float: a unit producing one keeps its output unquantized, and a last
  constant-weight MatMul whose bias Add computes a graph output (a classifier's logits) becomes
  one com.microsoft MatMulIntegerToFloat: int8 products, float output, the bias folded in.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import onnx_ir as ir

from onnxcompress.initializers import Names, drop_if_unused, new_initializer, take_over
from onnxcompress.executed import exact_u8s8_grid
from onnxcompress.quantization import (
    INT8_NARROW,
    INT32,
    WEIGHT_TYPES,
    QType,
    affine_params,
    quantize,
    quantize_bias,
    symmetric_scales,
)

WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "MatMul"})
ARITHMETIC_OPS = frozenset({"Add", "Mul", "Concat", "GlobalAveragePool", "AveragePool", "Sigmoid", "LeakyRelu", "Softmax"})
UNIT_OPS = WEIGHTED_OPS | ARITHMETIC_OPS
# Ops that only move or select values: int8 in, int8 out at the same scale.
MOVE_OPS = frozenset({
    "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "MaxPool", "Resize", "Slice", "Gather",
    "Identity", "Split", "DepthToSpace", "SpaceToDepth",
})
FUSABLE_ACTIVATIONS = frozenset({"Relu", "Clip"})


@dataclasses.dataclass(frozen=True)
class Params:
    """Per-tensor affine quantization of one activation."""

    scale: np.float32
    zero_point: int
    qtype: QType

    @classmethod
    def covering(cls, lo: float, hi: float, qtype: QType) -> "Params":
        scale, zero_point = affine_params(lo, hi, qtype)
        return cls(scale, zero_point, qtype)

    def representable(self) -> tuple[float, float]:
        return (self.qtype.qmin - self.zero_point) * float(self.scale), (self.qtype.qmax - self.zero_point) * float(self.scale)

    def describe(self) -> str:
        return f"{self.qtype.name} scale {float(self.scale):.4g} zero point {self.zero_point}"


def weight_grid(choice: str):
    """node → (weight type, zero point) for quantize-qdq's ``weights`` option (see there)."""
    if choice != "auto":
        return lambda node: WEIGHT_TYPES[choice]
    wide = WEIGHT_TYPES[exact_u8s8_grid()]
    return lambda node: WEIGHT_TYPES["int8"] if _depthwise(node) else wide


def _depthwise(node: ir.Node) -> bool:
    group = node.attributes.get_int("group", 1)
    return node.op_type == "Conv" and group > 1 and node.inputs[1].const_value is not None \
        and node.inputs[1].const_value.shape[1] == 1


MS_DOMAIN = "com.microsoft"


def final_bias_add(node: ir.Node, units: set[ir.Node]) -> ir.Node | None:
    """The Add of a constant 1-D bias that is the only reader of a constant-weight MatMul's
    output and computes a graph output (the last layer of a classifier), if there is one."""
    if node.op_type != "MatMul" or not is_float_constant(node.inputs[1]) or node.inputs[1].const_value.numpy().ndim != 2:
        return None
    out = node.outputs[0]
    uses = list(out.uses())
    if out.is_graph_output() or len(uses) != 1:
        return None
    add = uses[0].node
    if add.op_type != "Add" or add.domain != "" or add in units or not add.outputs[0].is_graph_output():
        return None
    bias = next((v for v in add.inputs if v is not out), None)
    n = node.inputs[1].const_value.shape[1]
    if not is_float_constant(bias) or tuple(bias.const_value.shape) != (n,):
        return None
    return add


def is_float_constant(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None and value.const_value.dtype in (ir.DataType.FLOAT,)


def weight_axis(node: ir.Node, weight: np.ndarray, per_channel: bool) -> int | None:
    """The output-channel axis of a unit's weight (None: per tensor)."""
    if not per_channel:
        return None
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1 if node.attributes.get_int("group", 1) == 1 else None
    return 1 if weight.ndim == 2 else None  # MatMul: per column of K×N


def fused_activation(node: ir.Node) -> ir.Node | None:
    """The Relu/Clip that is the only reader of ``node``'s output, if there is one."""
    out = node.outputs[0]
    uses = list(out.uses())
    if out.is_graph_output() or len(uses) != 1:
        return None
    reader = uses[0].node
    if reader.op_type not in FUSABLE_ACTIVATIONS or reader.domain != "" or reader.graph is not node.graph:
        return None
    if reader.op_type == "Clip" and clip_bounds(reader) is None:
        return None
    return reader


def clip_bounds(node: ir.Node) -> tuple[float, float] | None:
    """(min, max) of a Clip whose bounds are constants (attributes before opset 11)."""
    if "min" in node.attributes or "max" in node.attributes:
        return node.attributes.get_float("min", -np.inf), node.attributes.get_float("max", np.inf)
    bounds = []
    for index, default in ((1, -np.inf), (2, np.inf)):
        value = node.inputs[index] if len(node.inputs) > index else None
        if value is None:
            bounds.append(default)
        elif value.const_value is None:
            return None
        else:
            bounds.append(float(value.const_value.numpy()))
    return bounds[0], bounds[1]


def removable(activation: ir.Node, params: Params) -> bool:
    """Whether Q(act(x)) = Q(x) for the activation's output parameters."""
    lo, hi = params.representable()
    half = 0.5 * float(params.scale)
    if activation.op_type == "Relu":
        return params.zero_point == params.qtype.qmin
    a, b = clip_bounds(activation)
    return lo >= a - half and hi <= b + half


def activation_inputs(node: ir.Node) -> list[int]:
    """Indices of the inputs a unit reads as quantized activations."""
    op = node.op_type
    if op in ("Conv", "ConvTranspose"):
        return [0]
    if op == "MatMul":
        return [0] if is_float_constant(node.inputs[1]) else [0, 1]
    if op in ("Add", "Mul", "Concat"):
        return [i for i, v in enumerate(node.inputs) if v is not None and v.const_value is None]
    return [0]


def constant_operands(node: ir.Node) -> list[int]:
    """Indices of constant float operands of Add/Mul/Concat, stored on the activation grid."""
    if node.op_type not in ("Add", "Mul", "Concat"):
        return []
    return [i for i, v in enumerate(node.inputs) if is_float_constant(v)]


def tensors_to_calibrate(node: ir.Node) -> list[str]:
    """Activation tensors whose ranges a unit needs: its activation inputs and its output
    (the fused activation's output instead when there is one)."""
    names = [node.inputs[i].name for i in activation_inputs(node)]
    act = fused_activation(node)
    names.append((act or node).outputs[0].name)
    return names


class Builder:
    """Rewrites one model for a set of enabled units (node indices in graph order).

    ``per_channel(node)`` and ``weights(node)`` give each unit's weight grid: one scale per
    output channel or per tensor, and the weight type with its zero point. ``rounding(node,
    w, scale, axis, qtype, zero_point)`` gives a weight's codes on that grid, or None for
    round-to-nearest.
    """

    def __init__(self, model: ir.Model, params: dict[str, Params], activations: QType,
                 per_channel: Callable[[ir.Node], bool] = lambda node: True,
                 weights: Callable[[ir.Node], tuple[QType, int]] = lambda node: (INT8_NARROW, 0),
                 rounding: Callable[..., np.ndarray | None] = lambda *grid: None):
        self.model = model
        self.weight_grid = weights
        self.rounding = rounding
        self.graph = model.graph
        self.params = params
        self.activations = activations
        self.per_channel = per_channel
        self.names = Names(model)

    def apply(self, units: list[ir.Node], tables: list[ir.Node]) -> dict[str, str]:
        """Rewrite the graph; returns each unit's name → a short description of what it became."""
        done: dict[str, str] = {}
        for node in units:
            if not node.name:
                node.name = self.names.unique(f"{node.op_type}_quant")
        produced: dict[str, Params] = {}  # tensors computed in int8 → their parameters
        finals = {node: add for node in units if (add := final_bias_add(node, set(units))) is not None}
        for node in units:
            if node in finals:
                continue  # its output stays float: see _integer_to_float
            out_name = self._fuse_activation(node)
            if out_name is not None and not node.outputs[0].is_graph_output():
                produced[node.outputs[0].name] = self.params[out_name]
        self._follow_moves(produced)
        wanted: dict[str, Params] = dict(produced)
        for node in units:
            for i in activation_inputs(node):
                name = node.inputs[i].name
                wanted.setdefault(name, self.params[name])
        inputs = {node: [wanted[node.inputs[i].name] for i in activation_inputs(node)] for node in units}
        unit_set = set(units)
        values = self._values_by_name()
        for name, p in wanted.items():
            self._insert_qdq(values[name], p, all_readers=name in produced, readers=unit_set)
        for node in units:
            done[node.name] = self._quantize_constants(node, inputs[node])
        for node, add in finals.items():
            done[node.name] += self._integer_to_float(node, add)
        for node in tables:
            done[node.name or node.outputs[0].name] = self._quantize_table(node)
        self.graph.sort()
        return done

    # ------------------------------------------------------------------ placement

    def _fuse_activation(self, node: ir.Node) -> str | None:
        """Remove a Relu/Clip the output's grid reproduces; the name whose parameters the
        unit's output now takes (None when the unit's output is not calibrated)."""
        act = fused_activation(node)
        if act is None:
            return node.outputs[0].name if node.outputs[0].name in self.params else None
        act_out = act.outputs[0]
        p = self.params.get(act_out.name)
        if p is None or not removable(act, p):
            return node.outputs[0].name if node.outputs[0].name in self.params else None
        unit_out = node.outputs[0]
        name = act_out.name
        act_out.replace_all_uses_with(unit_out, replace_graph_outputs=True)
        bounds = [v for v in act.inputs[1:] if v is not None]
        self.graph.remove(act, safe=True)
        for value in bounds:  # a Clip's own min/max constants, unless another node reads them
            drop_if_unused(value)
        self.params = {**self.params, unit_out.name: p}
        return name

    def _follow_moves(self, produced: dict[str, Params]) -> None:
        """Data movement ops fed by an int8 tensor pass its parameters on, in graph order."""
        for node in self.graph:
            if node.op_type not in MOVE_OPS or node.domain != "" or not node.inputs or node.inputs[0] is None:
                continue
            p = produced.get(node.inputs[0].name)
            if p is None:
                continue
            for out in node.outputs:
                if out is not None and not out.is_graph_output():
                    produced[out.name] = p

    def _values_by_name(self) -> dict[str, ir.Value]:
        values = {v.name: v for v in self.graph.inputs}
        for node in self.graph:
            values.update((v.name, v) for v in node.outputs if v is not None and v.name)
        return values

    def _insert_qdq(self, value: ir.Value, p: Params, all_readers: bool, readers: set[ir.Node]) -> None:
        uses = [(u.node, u.idx) for u in value.uses() if all_readers or u.node in readers]
        if not uses:
            return
        base = value.name
        scale = self._scalar(f"{base}_scale", np.array(p.scale, dtype=np.float32))
        zero = self._scalar(f"{base}_zero_point", np.array(p.zero_point, dtype=p.qtype.numpy))
        q = ir.node("QuantizeLinear", [value, scale, zero], name=self.names.unique(f"{base}_QuantizeLinear"))
        q.outputs[0].name = self.names.unique(f"{base}_quantized")
        dq = ir.node("DequantizeLinear", [q.outputs[0], scale, zero], name=self.names.unique(f"{base}_DequantizeLinear"))
        dq.outputs[0].name = self.names.unique(f"{base}_dequantized")
        dq.outputs[0].type, dq.outputs[0].shape = value.type, value.shape
        self.graph.extend([q, dq])
        for node, index in uses:
            node.replace_input_with(index, dq.outputs[0])

    def _scalar(self, base: str, array: np.ndarray) -> ir.Value:
        return new_initializer(self.model, self.names.unique(base), array)

    # ------------------------------------------------------------------ constants

    def _quantize_constants(self, node: ir.Node, inputs: list[Params]) -> str:
        """Quantize the unit's weight, bias and constant operands; describe the result."""
        parts = []
        if node.op_type in WEIGHTED_OPS and is_float_constant(node.inputs[1]):
            parts.append(self._quantize_weight(node, inputs[0]))
        for i in constant_operands(node):
            self._quantize_operand(node, i)
            parts.append(f"constant input {i} on the {self.activations.name} grid")
        described = ", ".join(p.describe() for p in inputs)
        return "; ".join([f"inputs {described}"] + parts)

    def _quantize_weight(self, node: ir.Node, input_params: Params) -> str:
        weight = node.inputs[1]
        w = weight.const_value.numpy()
        axis = weight_axis(node, w, self.per_channel(node))
        bias = node.inputs[2] if node.op_type in ("Conv", "ConvTranspose") and len(node.inputs) > 2 else None
        wtype, wzero = self.weight_grid(node)
        scale = symmetric_scales(w, axis, wtype, wzero)
        raised = 0
        if is_float_constant(bias):
            scale, raised = _fit_bias(bias.const_value.numpy(), float(input_params.scale), scale)
        q = self.rounding(node, w, scale, axis, wtype, wzero)
        rounded = q is not None
        if not rounded:
            q = quantize(w, scale, wzero, wtype, axis)
        base = weight.name or f"{node.name}_weight"
        q_value = new_initializer(self.model, self.names.unique(f"{base}_quantized"), q)
        s_value = new_initializer(self.model, self.names.unique(f"{base}_scale"), scale if axis is not None else np.float32(scale))
        z_value = new_initializer(self.model, self.names.unique(f"{base}_zero_point"),
                                  np.full(scale.shape if axis is not None else (), wzero, dtype=wtype.numpy))
        node.replace_input_with(1, self._dequantize(q_value, s_value, z_value, axis, f"{base}_DequantizeLinear"))
        detail = f"weight {_weight_name(wtype)} {'per channel' if axis is not None else 'per tensor'}"
        if rounded:
            detail += " (GPTQ)"
        if is_float_constant(bias):
            qb, bias_scale = quantize_bias(bias.const_value.numpy(), float(input_params.scale), scale)
            bq = new_initializer(self.model, self.names.unique(f"{bias.name}_quantized"), qb)
            bs = new_initializer(self.model, self.names.unique(f"{bias.name}_scale"), bias_scale)
            bz = new_initializer(self.model, self.names.unique(f"{bias.name}_zero_point"), np.zeros(bias_scale.shape, np.int32))
            node.replace_input_with(2, self._dequantize(bq, bs, bz, 0 if axis is not None else None, f"{bias.name}_DequantizeLinear"))
            detail += ", bias int32"
            if raised:
                detail += f" ({raised} weight scales raised so the bias fits int32)"
        for old in (weight, bias):
            if old is not None and old.is_initializer() and not old.uses():
                self.graph.initializers.pop(old.name, None)
        return detail

    def _integer_to_float(self, node: ir.Node, add: ir.Node) -> str:
        """MatMul(DQ(xq), DQ(wq)) → Add(·, bias) = graph output becomes one com.microsoft
        MatMulIntegerToFloat(xq, wq, scales, zero points, bias): int8 compute, float output, no
        output quantization (onnxruntime would otherwise fuse MatMul + Add into a float Gemm)."""
        x_dq, w_dq = (v.producer() for v in node.inputs[:2])
        bias = next(v for v in add.inputs if v is not node.outputs[0])
        inputs = [x_dq.inputs[0], w_dq.inputs[0], x_dq.inputs[1], w_dq.inputs[1], x_dq.inputs[2], w_dq.inputs[2], bias]
        fused = ir.node("MatMulIntegerToFloat", inputs, domain=MS_DOMAIN, name=node.name)
        self.graph.insert_after(add, fused)
        take_over(add.outputs[0], fused.outputs[0])
        self.graph.remove([add, node], safe=True)
        for dq in (x_dq, w_dq):  # the input's DQ may still feed other readers
            if not list(dq.outputs[0].uses()) and not dq.outputs[0].is_graph_output():
                self.graph.remove(dq, safe=True)
        self.model.opset_imports.setdefault(MS_DOMAIN, 1)
        return "; bias Add folded into MatMulIntegerToFloat (float output)"

    def _dequantize(self, q: ir.Value, s: ir.Value, z: ir.Value, axis: int | None, name: str) -> ir.Value:
        attributes = {"axis": axis} if axis is not None else {}
        dq = ir.node("DequantizeLinear", [q, s, z], attributes=attributes, name=self.names.unique(name))
        dq.outputs[0].name = self.names.unique(f"{q.name}_dequantized")
        self.graph.append(dq)
        return dq.outputs[0]

    def _quantize_operand(self, node: ir.Node, index: int) -> None:
        value = node.inputs[index]
        array = value.const_value.numpy()
        p = Params.covering(float(array.min()), float(array.max()), self.activations)
        q = quantize(array, p.scale, p.zero_point, p.qtype)
        base = value.name or f"{node.name}_input{index}"
        q_value = new_initializer(self.model, self.names.unique(f"{base}_quantized"), q)
        s_value = self._scalar(f"{base}_scale", np.array(p.scale, dtype=np.float32))
        z_value = self._scalar(f"{base}_zero_point", np.array(p.zero_point, dtype=p.qtype.numpy))
        node.replace_input_with(index, self._dequantize(q_value, s_value, z_value, None, f"{base}_DequantizeLinear"))
        if value.is_initializer() and not value.uses():
            self.graph.initializers.pop(value.name, None)

    def _quantize_table(self, node: ir.Node) -> str:
        """Gather(table, ids) → DequantizeLinear(Gather(q_table, ids)): the same rows, exactly
        as a DQ in front of the Gather would give them, at a quarter of the bytes."""
        table = node.inputs[0]
        array = table.const_value.numpy()
        p = Params.covering(float(array.min()), float(array.max()), self.activations)
        base = table.name or f"{node.name}_table"
        q_value = new_initializer(self.model, self.names.unique(f"{base}_quantized"), quantize(array, p.scale, p.zero_point, p.qtype))
        node.replace_input_with(0, q_value)
        if table.is_initializer() and not table.uses():
            self.graph.initializers.pop(table.name, None)
        out = node.outputs[0]
        s_value = self._scalar(f"{base}_scale", np.array(p.scale, dtype=np.float32))
        z_value = self._scalar(f"{base}_zero_point", np.array(p.zero_point, dtype=p.qtype.numpy))
        readers = [(u.node, u.idx) for u in out.uses()]
        dq = ir.node("DequantizeLinear", [out, s_value, z_value], name=self.names.unique(f"{base}_DequantizeLinear"))
        rows = dq.outputs[0]
        rows.type, rows.shape = out.type, out.shape
        for reader, index in readers:
            reader.replace_input_with(index, rows)
        outputs = self.graph.outputs
        for i, v in enumerate(outputs):
            if v is out:
                outputs[i] = rows
        name = out.name
        out.name = self.names.unique(f"{name}_quantized")
        out.type = ir.TensorType(p.qtype.ir_type)
        rows.name = name
        self.graph.insert_after(node, dq)
        return f"table stored {p.describe()}, dequantized after the Gather"


def _weight_name(qtype: QType) -> str:
    return {(-63, 63): "int7", (1, 255): "uint8"}.get((qtype.qmin, qtype.qmax), qtype.name)


def _fit_bias(bias: np.ndarray, input_scale: float, scale: np.ndarray) -> tuple[np.ndarray, int]:
    """Raise weight scales where bias / (input_scale · scale) would not fit int32."""
    per = np.broadcast_to(scale, bias.shape).astype(np.float64)
    needed = np.abs(bias.astype(np.float64)) / (input_scale * INT32.qmax)
    raise_mask = needed > per
    if not raise_mask.any():
        return scale, 0
    fitted = np.where(raise_mask, needed * 1.0001, per).astype(np.float32)
    return (fitted if np.ndim(scale) else np.float32(fitted.max())), int(raise_mask.sum())
