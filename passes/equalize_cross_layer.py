"""equalize-cross-layer: match the per-channel weight ranges of consecutive layers (data-free)."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxcompress.activations import channel_peaks
from onnxcompress.errors import CalibrationError
from onnxcompress.initializers import Names, drop_if_unused, take_over
from onnxcompress.options import PassOptions, option
from onnxcompress.pass_base import Candidate, CompressionPass, node_label
from onnxcompress.registry import register

_LAYERS = ("Conv", "Gemm", "MatMul")
_HOMOGENEOUS = ("Relu", "LeakyRelu", "PRelu")
# Element-wise activations for which f(x / s) != f(x) / s.
_ELEMENTWISE = frozenset({
    "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu", "Selu", "Celu", "Softplus", "Softsign",
    "Gelu", "Mish", "ThresholdedRelu", "Exp", "Log", "Sqrt", "Sin", "Cos", "Erf",
})


@dataclasses.dataclass(frozen=True)
class EqualizeCrossLayerOptions(PassOptions):
    """Options of equalize-cross-layer."""

    iterations: int = option(20, "most sweeps over the chains of pairs")
    tolerance: float = option(1e-4, "stop once no channel scale of a sweep moves by more than this (relative)")
    relu6: Literal["skip", "calibrated", "relu"] = option(
        "skip",
        "Clip(0, c) between two layers: skip it; calibrated: scale only as far as it stays exact "
        "on the calibration data; relu: replace it by Relu (not exact)",
    )
    exclude: str = option("", "regular expression: pairs with a node whose name matches are left alone")

    def __post_init__(self):
        if self.iterations < 1:
            self.fail("iterations", f"must be at least 1, got {self.iterations}")
        if not (self.tolerance >= 0 and math.isfinite(self.tolerance)):
            self.fail("tolerance", f"must be a finite number >= 0, got {self.tolerance}")
        self.check_pattern("exclude")

    def excluded(self, node: ir.Node) -> bool:
        return bool(self.exclude) and re.search(self.exclude, node.name or "") is not None


@dataclasses.dataclass
class _Layer:
    """A Conv, Gemm or MatMul with a constant weight, and where its channels lie."""

    node: ir.Node
    weight: ir.Value
    out_axis: int  # the weight axis of the output channels
    in_axis: int  # the weight axis of the input channels
    family: str  # "conv" (channels on axis 1 of the activations) or "dense" (on the last axis)
    bias: ir.Value | None = None  # Conv input 2, Gemm C, or the constant of a MatMul's bias Add
    bias_add: ir.Node | None = None

    @property
    def output(self) -> ir.Value:
        return (self.bias_add or self.node).outputs[0]

    @property
    def channels_out(self) -> int:
        return self.weight.const_value.shape[self.out_axis]

    @property
    def channels_in(self) -> int:
        shape = self.weight.const_value.shape
        return shape[self.in_axis] * (_group(self.node) if self.family == "conv" and self.in_axis == 1 else 1)

    @property
    def depthwise(self) -> bool:
        return self.family == "conv" and self.out_axis == self.in_axis == 0


@dataclasses.dataclass
class _Pair:
    """Layer 1 → (one positively homogeneous activation) → layer 2, and its scales so far."""

    first: _Layer
    second: _Layer
    act: ir.Node | None
    bound: float | None = None  # c of a Clip(0, c) between them
    total: np.ndarray | None = None  # cumulative s per channel (float64)
    floor: np.ndarray | None = None  # relu6=calibrated: least cumulative s per channel (m_i / c)
    pinned: np.ndarray | None = None  # relu6=calibrated: channels clipped on the data keep s = 1
    ratio_before: float = 0.0

    @property
    def through(self) -> str:
        if self.act is None:
            return "no activation"
        if self.bound is not None:
            return f"Clip(0, {self.bound:g})"
        return self.act.op_type


@register
class EqualizeCrossLayer(CompressionPass):
    """Cross-layer equalization: give consecutive layers the same per-channel weight ranges.

    For a pair layer 1 → act → layer 2 (Conv → Conv, or Gemm/MatMul → Gemm/MatMul, each with
    a constant weight), output channel i of layer 1 (its weight row and its bias) is divided by
    ``s_i`` and input channel i of layer 2 multiplied by ``s_i``, ``s_i = sqrt(r1_i / r2_i)``
    with ``r1_i = max|W1[i, ...]|`` and ``r2_i = max|W2[:, i, ...]|`` (the axes follow the op:
    Conv ``[C_out, C_in, k...]``, Gemm's ``transB``, MatMul ``[K, N]``), so that afterwards
    ``r1_i = r2_i = sqrt(r1_i · r2_i)``: per-tensor int8 grids then lose less on the small
    channels (Nagel et al. 2019, "Data-Free Quantization through Weight Equalization and
    Bias Correction"). A depthwise conv (``group`` = channels, multiplier 1) passes channel i
    straight through, so it can be layer 2 of one pair and layer 1 of the next, as in
    MobileNetV2's pointwise → depthwise → pointwise; the chains are swept in graph order until
    no scale moves by more than ``tolerance`` or ``iterations`` sweeps were made. A channel
    with a zero range keeps ``s = 1``. A MatMul followed by an Add of a constant counts as
    one layer whose bias is that constant. Arithmetic is float64, each weight is rounded
    to its dtype once; the middle tensors get new names (their values change) and keep
    their consumers. Nothing is written when no scale moves by more than ``tolerance``.

    Exact (outputs equal to float rounding) when the activation between the two layers is
    positively homogeneous, ``f(x / s) = f(x) / s`` for ``s > 0``: none, Relu, LeakyRelu,
    PRelu (any slopes), Clip(0, ∞). Clip(0, c), e.g. ReLU6, is not; option ``relu6``:

    - ``skip`` (default): refused with the reason.
    - ``calibrated`` (needs calibration feeds): with ``m_i`` the largest value of channel i of
      the tensor going into the Clip over the calibration feeds (of the model as given), a
      channel with ``m_i > c`` (clipped somewhere on the data) keeps ``s_i = 1``, and every
      other channel's cumulative scale is held at ``s_i >= m_i / c``, so that no scaled value
      exceeds c. Then ``Clip(x / s_i, 0, c) = Clip(x, 0, c) / s_i`` for every calibration value:
      the rewrite is exact on the calibration data (on other inputs a value above
      ``c · min(1, s_i)`` would be clipped differently).
    - ``relu``: Clip(0, c) is replaced by Relu and the pair equalized as through Relu. This
      changes the model (values above c are no longer clipped): not exact, the report says so.

    Refused, with the reason (recorded on layer 1): the middle tensor is a graph output or has
    another consumer; an op between the layers other than one of those activations (Sigmoid,
    Add, Flatten...); a Clip whose bounds are not constant or not (0, c) / (0, ∞); layers of
    different kinds (Conv → Gemm) or channel counts; a grouped conv that is not depthwise
    (``group`` ≠ channels, or a channel multiplier); a Gemm layer 2 with ``transA=1``; a weight
    or bias that is not a constant floating-point initializer, or is read by another node;
    names matching ``exclude``. Nodes inside If/Loop/Scan bodies are not visited.

    ``lossless`` is True: the class attribute cannot depend on options, and with
    ``relu6=relu`` the pass is not exact (see above).
    """

    name = "equalize-cross-layer"
    Options = EqualizeCrossLayerOptions
    prerequisites = ("lift-constants", "fold-batchnorm")
    lossless = True

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        options = self.options
        if options.relu6 == "calibrated" and not self.context.calibration:
            raise CalibrationError("equalize-cross-layer with relu6=calibrated needs calibration data (--calib)"
                                   "; without data, quantize-dynamic (preset int8-dynamic) quantizes weights only")
        pairs = []
        for node in model.graph:
            if node.op_type not in _LAYERS or node.domain != "":
                continue
            pair = _plan(node, options)
            if isinstance(pair, str):
                self.refused(node, pair)
            else:
                pairs.append(pair)
        if not pairs:
            return ir.passes.PassResult(model, modified=False)
        if options.relu6 == "calibrated":
            _fit_bounds(model, [p for p in pairs if p.bound is not None], self.context.calibration)
        arrays = _working_arrays(pairs)
        sweeps, last_step = _sweep(pairs, arrays, options)
        if max(_largest_step(p.total) for p in pairs) <= options.tolerance:
            for pair in pairs:
                self.refused(pair.first.node, f"ranges already match '{node_label(pair.second.node)}'"
                             f" within tolerance={options.tolerance:g}")
            return ir.passes.PassResult(model, modified=False)
        self._write(model, pairs, arrays)
        converged = "converged" if last_step <= options.tolerance else "did not converge"
        self.note(f"equalized {len(pairs)} pairs in {sweeps} sweeps ({converged}; largest step of the "
                  f"last sweep {last_step:.2g})")
        return ir.passes.PassResult(model, modified=True)

    def candidates(self, model: ir.Model) -> list[Candidate]:
        found = []
        for node in model.graph:
            if node.op_type in _LAYERS and node.domain == "" and isinstance(pair := _plan(node, self.options), _Pair):
                what = f"equalize with {pair.second.node.op_type} '{node_label(pair.second.node)}' through {pair.through}"
                found.append(Candidate(self.name, node_label(node), node.op_type, what))
        return found

    def _write(self, model: ir.Model, pairs: list[_Pair], arrays: dict[ir.Value, np.ndarray]) -> None:
        names = Names(model)
        for value, array in arrays.items():
            tensor = value.const_value
            value.const_value = ir.tensor(array.astype(tensor.dtype.numpy()), name=value.name)
            value.shape = ir.Shape(array.shape)
        for pair in pairs:
            detail = self._detail(pair, arrays)
            if pair.bound is not None and self.options.relu6 == "relu":
                pair.act = _replace_by_relu(pair.act)
                detail += f"; Clip(0, {pair.bound:g}) replaced by Relu (not exact)"
            middles = [pair.first.node.outputs[0]]
            if pair.first.bias_add is not None:
                middles.append(pair.first.bias_add.outputs[0])
            if pair.act is not None:
                middles.append(pair.act.outputs[0])
            for value in middles:
                value.name = names.unique(f"{value.name}_equalized")
            self.rewrote(pair.first.node, detail)

    def _detail(self, pair: _Pair, arrays: dict[ir.Value, np.ndarray]) -> str:
        after = _spread(_ranges(arrays[pair.first.weight], pair.first.out_axis))
        detail = (f"with {pair.second.node.op_type} '{node_label(pair.second.node)}' through {pair.through}: "
                  f"s in [{pair.total.min():.3g}, {pair.total.max():.3g}]; channel-range ratio of "
                  f"'{pair.first.weight.name}' {pair.ratio_before:.3g} -> {after:.3g}")
        if pair.pinned is not None:
            held = int(np.count_nonzero(pair.pinned))
            detail += f"; {held} of {pair.pinned.size} channels clipped on the calibration data keep s = 1"
        return detail


# ---------------------------------------------------------------------------- finding pairs


def _plan(node: ir.Node, options: EqualizeCrossLayerOptions) -> _Pair | str:
    """The pair that starts at ``node``, or the one-line reason there is none."""
    first = _layer(node, with_bias=True)
    if isinstance(first, str):
        return first
    middle = first.output
    found = _next_layer(middle)
    if isinstance(found, str):
        return found
    act, consumer = found
    if options.excluded(node) or options.excluded(consumer):
        return f"excluded by exclude={options.exclude}"
    second = _layer(consumer, with_bias=False)
    if isinstance(second, str):
        return f"next layer '{node_label(consumer)}': {second}"
    pair = _Pair(first, second, act)
    if act is not None and act.op_type == "Clip":
        bounds = _clip_bounds(act)
        if isinstance(bounds, str):
            return bounds
        if bounds is not None:
            if options.relu6 == "skip":
                return (f"Clip(0, {bounds:g}) '{node_label(act)}' is not positively homogeneous "
                        "(relu6=skip; relu6=calibrated scales where it stays exact on the calibration "
                        "data, relu6=relu replaces it by Relu)")
            pair.bound = bounds
    return _pair_reason(pair) or pair


def _layer(node: ir.Node, with_bias: bool) -> _Layer | str:
    """``node`` as a layer with a constant weight (and bias, when asked), or why it is not one."""
    op = node.op_type
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return f"the {op} has no weight input"
    weight = node.inputs[1]
    if reason := _constant_reason(weight, "weight", node, 1):
        return reason
    shape = tuple(weight.const_value.shape)
    if op == "Conv":
        if len(shape) < 3:
            return f"the Conv weight is {len(shape)}-D"
        group = _group(node)
        if group == 1:
            layer = _Layer(node, weight, 0, 1, "conv")
        elif group == shape[0] and shape[1] == 1:
            layer = _Layer(node, weight, 0, 0, "conv")
        else:
            return (f"grouped Conv (group={group}, weight {list(shape)}) that is not depthwise: "
                    "its channels do not map one to one")
        bias = node.inputs[2] if len(node.inputs) > 2 else None
    else:
        if len(shape) != 2:
            return f"the {op} weight is {len(shape)}-D, only 2-D weights are equalized"
        trans_b = op == "Gemm" and bool(node.attributes.get_int("transB", 0))
        layer = _Layer(node, weight, 0 if trans_b else 1, 1 if trans_b else 0, "dense")
        bias = node.inputs[2] if op == "Gemm" and len(node.inputs) > 2 else None
        if op == "MatMul" and (add := _bias_add(node)) is not None:
            layer.bias_add = add
            bias = next(v for v in add.inputs if v is not node.outputs[0])
    if not with_bias:
        return layer
    if bias is not None:
        index = next(u.idx for u in bias.uses() if u.node is (layer.bias_add or node))
        if reason := _constant_reason(bias, "bias", layer.bias_add or node, index):
            return reason
        if reason := _bias_shape_reason(layer, bias):
            return reason
    layer.bias = bias
    return layer


def _bias_add(matmul: ir.Node) -> ir.Node | None:
    """The Add of a constant that consumes the MatMul's output alone, if there is one."""
    out = matmul.outputs[0]
    uses = out.uses()
    if out.is_graph_output() or len(uses) != 1 or uses[0].node.op_type != "Add":
        return None
    add = uses[0].node
    other = add.inputs[1 - uses[0].idx]
    if other is None or other is out or other.const_value is None or not other.is_initializer():
        return None
    return add


def _bias_shape_reason(layer: _Layer, bias: ir.Value) -> str:
    shape = tuple(bias.const_value.shape)
    n = layer.channels_out
    if layer.family == "conv":
        return "" if shape == (n,) else f"bias '{bias.name}' has shape {list(shape)}, not [{n}]"
    if shape and shape[-1] not in (1, n):
        return f"bias '{bias.name}' of shape {list(shape)} does not broadcast along the {n} features"
    return ""


def _constant_reason(value: ir.Value, role: str, node: ir.Node, index: int) -> str:
    label = f"{role} '{value.name}'"
    if value.is_graph_input():
        return f"{label} is a graph input, not a constant"
    if value.const_value is None or not value.is_initializer():
        return f"{label} is not a constant initializer"
    if value.is_graph_output():
        return f"{label} is also a graph output"
    if not value.const_value.dtype.is_floating_point():
        return f"{label} is {value.const_value.dtype.name}, not floating point"
    for use in value.uses():
        if use.node is not node or use.idx != index:
            return f"{label} is shared with '{node_label(use.node)}' ({use.node.op_type})"
    return ""


def _sole_consumer(value: ir.Value, what: str) -> ir.Node | str:
    if value.is_graph_output():
        return f"{what} '{value.name}' is a graph output"
    uses = value.uses()
    if not uses:
        return f"{what} '{value.name}' is not used"
    if len(uses) > 1:
        others = ", ".join(f"'{node_label(u.node)}'" for u in uses[:3])
        return f"{what} '{value.name}' has {len(uses)} consumers ({others})"
    return uses[0].node


def _next_layer(middle: ir.Value) -> tuple[ir.Node | None, ir.Node] | str:
    """(activation or None, the layer reading the middle tensor as its input 0), or why not."""
    consumer = _sole_consumer(middle, "its output")
    if isinstance(consumer, str):
        return consumer
    act = None
    if consumer.op_type in (*_HOMOGENEOUS, "Clip") and consumer.domain == "":
        if consumer.inputs[0] is not middle:
            return f"its output is not the data input of {consumer.op_type} '{node_label(consumer)}'"
        act = consumer
        consumer = _sole_consumer(act.outputs[0], f"the {act.op_type} output")
        if isinstance(consumer, str):
            return consumer
        if consumer.op_type in _LAYERS and consumer.domain == "" and consumer.inputs[0] is act.outputs[0]:
            return act, consumer
        return (f"the {act.op_type} output feeds {consumer.op_type} '{node_label(consumer)}', "
                "not the data input of a Conv, Gemm or MatMul")
    if consumer.op_type in _LAYERS and consumer.domain == "" and consumer.inputs[0] is middle:
        return None, consumer
    # A one-input op (Sigmoid, Tanh, HardSwish...) that sits between two layers.
    unary = len(consumer.outputs) == 1 and all(v is None or v is middle or _const_tensor(v) is not None
                                                for v in consumer.inputs)
    uses = consumer.outputs[0].uses() if unary else []
    if len(uses) == 1 and uses[0].node.op_type in _LAYERS and uses[0].idx == 0:
        between = f"{consumer.op_type} '{node_label(consumer)}' between it and '{node_label(uses[0].node)}'"
        if consumer.op_type in _ELEMENTWISE:
            return f"{between} is not positively homogeneous"
        return f"{between} is not an activation that equalization passes through"
    return f"its output feeds {consumer.op_type} '{node_label(consumer)}', not a Conv, Gemm or MatMul"


def _clip_bounds(clip: ir.Node) -> float | None | str:
    """c of a Clip(0, c); None for a Clip that is Relu or the identity; else why it is neither."""
    lo, hi = -math.inf, math.inf
    if "min" in clip.attributes or "max" in clip.attributes:  # opset < 11
        lo = clip.attributes.get_float("min", -math.inf)
        hi = clip.attributes.get_float("max", math.inf)
    for index in (1, 2):
        value = clip.inputs[index] if len(clip.inputs) > index else None
        if value is None:
            continue
        tensor = _const_tensor(value)
        if tensor is None or tensor.size != 1:
            return f"Clip '{node_label(clip)}' has a bound '{value.name}' that is not a constant scalar"
        bound = float(tensor.numpy().reshape(()))
        lo, hi = (bound, hi) if index == 1 else (lo, bound)
    lowest = float(np.finfo(np.float32).min)
    lo = -math.inf if lo <= lowest else lo
    hi = math.inf if hi >= float(np.finfo(np.float32).max) else hi
    if (lo == 0.0 or lo == -math.inf) and hi == math.inf:
        return None
    if lo == 0.0 and 0.0 < hi < math.inf:
        return hi
    return f"Clip({lo:g}, {hi:g}) '{node_label(clip)}' is not positively homogeneous"


def _const_tensor(value: ir.Value):
    if value.const_value is not None:
        return value.const_value
    try:
        return ir.convenience.get_const_tensor(value)
    except Exception:  # noqa: BLE001 - anything odd is simply "not constant"
        return None


def _pair_reason(pair: _Pair) -> str:
    first, second = pair.first, pair.second
    label = f"'{node_label(second.node)}'"
    if first.family != second.family:
        return f"a {first.node.op_type} feeds the {second.node.op_type} {label}: their channel axes differ"
    if first.family == "conv" and len(first.weight.const_value.shape) != len(second.weight.const_value.shape):
        return f"the Conv {label} has a different number of spatial axes"
    if second.node.op_type == "Gemm" and second.node.attributes.get_int("transA", 0):
        return f"the Gemm {label} has transA=1"
    if first.channels_out != second.channels_in:
        return f"{first.channels_out} output channels feed {second.channels_in} input channels of {label}"
    return ""


def _group(node: ir.Node) -> int:
    return node.attributes.get_int("group", 1)


# ---------------------------------------------------------------------------- the arithmetic


def _working_arrays(pairs: list[_Pair]) -> dict[ir.Value, np.ndarray]:
    """float64 copies of every weight and bias the pairs scale (biases broadcast to N features)."""
    arrays: dict[ir.Value, np.ndarray] = {}
    for pair in pairs:
        first = pair.first
        for layer in (first, pair.second):
            arrays.setdefault(layer.weight, layer.weight.const_value.numpy().astype(np.float64))
        if first.bias is not None:
            bias = first.bias.const_value.numpy().astype(np.float64)
            if first.family == "dense":
                shape = bias.shape[:-1] + (first.channels_out,)
                bias = np.broadcast_to(bias, shape).copy()
            arrays[first.bias] = bias
        pair.total = np.ones(first.channels_out)
        pair.ratio_before = _spread(_ranges(arrays[first.weight], first.out_axis))
    return arrays


def _sweep(pairs: list[_Pair], arrays: dict[ir.Value, np.ndarray], options) -> tuple[int, float]:
    """Equalize every pair in turn until no step exceeds the tolerance; (sweeps, last step)."""
    step = math.inf
    for sweep in range(1, options.iterations + 1):
        step = 0.0
        for pair in pairs:
            s = _scales(pair, arrays)
            _apply(pair, s, arrays)
            step = max(step, _largest_step(s))
        if step <= options.tolerance:
            return sweep, step
    return options.iterations, step


def _scales(pair: _Pair, arrays: dict[ir.Value, np.ndarray]) -> np.ndarray:
    r1 = _ranges(arrays[pair.first.weight], pair.first.out_axis)
    r2 = _ranges(arrays[pair.second.weight], pair.second.in_axis)
    usable = (r1 > 0) & (r2 > 0)
    s = np.ones_like(r1)
    s[usable] = np.sqrt(r1[usable] / r2[usable])
    if pair.pinned is not None:
        wanted = np.maximum(pair.total * s, pair.floor)
        wanted[pair.pinned] = 1.0
        s = wanted / pair.total
    return s


def _apply(pair: _Pair, s: np.ndarray, arrays: dict[ir.Value, np.ndarray]) -> None:
    first, second = pair.first, pair.second
    arrays[first.weight] = arrays[first.weight] / _along(s, arrays[first.weight].ndim, first.out_axis)
    if first.bias is not None:
        bias = arrays[first.bias]
        axis = 0 if first.family == "conv" else bias.ndim - 1
        arrays[first.bias] = bias / _along(s, bias.ndim, axis)
    arrays[second.weight] = arrays[second.weight] * _along(s, arrays[second.weight].ndim, second.in_axis)
    pair.total = pair.total * s


def _ranges(w: np.ndarray, axis: int) -> np.ndarray:
    """max|w| over every axis but ``axis`` (for the depthwise conv's input axis 1 of size 1 too)."""
    moved = np.moveaxis(np.abs(w), axis, 0)
    return moved.reshape(moved.shape[0], -1).max(axis=1)


def _along(s: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    return s.reshape([-1 if i == axis else 1 for i in range(ndim)])


def _largest_step(s: np.ndarray) -> float:
    return float(np.max(np.abs(np.log(s)))) if s.size else 0.0


def _spread(r: np.ndarray) -> float:
    """Largest over smallest nonzero channel range (1 when there is at most one)."""
    nonzero = r[r > 0]
    return float(nonzero.max() / nonzero.min()) if nonzero.size else 1.0


def _fit_bounds(model: ir.Model, pairs: list[_Pair], feeds: list[dict]) -> None:
    """relu6=calibrated: per channel, the largest value entering each Clip(0, c) on the feeds."""
    if not pairs:
        return
    axes = {pair.first.output.name: 1 if pair.first.family == "conv" else -1 for pair in pairs}
    peaks = channel_peaks(model, axes, feeds)
    for pair in pairs:
        peak = peaks[pair.first.output.name]
        pair.pinned = peak > pair.bound
        pair.floor = np.where(pair.pinned, 1.0, peak / pair.bound)


# ---------------------------------------------------------------------------- graph surgery


def _replace_by_relu(clip: ir.Node) -> ir.Node:
    relu = ir.node("Relu", [clip.inputs[0]], name=clip.name or None)
    clip.graph.insert_before(clip, relu)
    bounds = [v for v in clip.inputs[1:] if v is not None]
    take_over(clip.outputs[0], relu.outputs[0])
    clip.graph.remove(clip, safe=True)
    for value in bounds:
        drop_if_unused(value)
    return relu
