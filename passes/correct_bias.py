"""correct-bias: absorb the mean output error of int8 weight quantization into the bias."""

from __future__ import annotations

import dataclasses
from typing import Literal
import re

import numpy as np
import onnx_ir as ir

from onnxcompress.activations import stream
from onnxcompress.errors import CalibrationError
from onnxcompress.factorize import constant_reason
from onnxcompress.initializers import Names, new_initializer, replace_constant_input
from onnxcompress.options import PassOptions, option
from onnxcompress.pass_base import Candidate, CompressionPass, node_label
from onnxcompress.qdq import weight_grid
from onnxcompress.quantization import fake_quantize_weight
from onnxcompress.registry import register

_LAYERS = ("Conv", "Gemm", "MatMul")


@dataclasses.dataclass(frozen=True)
class CorrectBiasOptions(PassOptions):
    """Options of correct-bias."""

    per_channel: bool = option(True, "the int8 grid quantize-qdq will use: one scale per output channel (else per tensor)")
    weights: Literal["auto", "int8", "int7", "uint8"] = option(
        "auto", "the weight grid quantize-qdq will use (its option of the same name)")
    exclude: str = option("", "regular expression: nodes whose name matches are left alone")

    def __post_init__(self):
        self.check_pattern("exclude")

    def excluded(self, node: ir.Node) -> bool:
        return bool(self.exclude) and re.search(self.exclude, node.name or "") is not None


@dataclasses.dataclass
class _Site:
    """A Conv, Gemm or MatMul with a constant float weight, and its quantization error."""

    node: ir.Node
    eps: np.ndarray  # W' - W, float64, as the weight is stored
    bias_node: ir.Node  # the node that holds the bias: the layer, or a MatMul's bias Add
    bias_index: int | None  # input index of the bias on bias_node (None: there is none yet)

    @property
    def x(self) -> ir.Value:
        return self.node.inputs[0]


@register
class CorrectBias(CompressionPass):
    """Bias correction: subtract the expected output error of int8 weights from the bias.

    For each Conv, Gemm and MatMul with a constant floating-point weight W, ``W'`` is W on the
    int8 grid quantize-qdq will quantize it on (``fake_quantize_weight``: symmetric, narrow range
    [-127, 127], one scale per output channel, axis 0 for Conv ``[C_out, C_in/g, k...]``, axis
    1 for a MatMul weight ``[K, N]``, axis 0 or 1 for Gemm by ``transB``; one scale per tensor
    with ``per_channel=false``) and ``eps = W' - W``. With ``E[x]`` the mean of the layer's
    input per input channel over the calibration feeds (over batch and spatial positions, or
    every axis but the last for MatMul; the float model as given, one onnxruntime run, one feed
    in memory at a time), the expected output error is ``eps`` applied to ``E[x]``:
    ``e[o] = sum_{c,k} eps[o, c, k] · E[x_c]`` for Conv (input channels of o's group, every
    kernel position), ``alpha · E[x] · eps`` for Gemm, ``E[x] · eps`` for MatMul; the bias
    becomes ``b - e`` (Gemm: ``C - e / beta``), so that the int8 layer's mean output matches
    the float one (Nagel et al. 2019, empirical bias correction). The weights are not changed.

    A Conv or Gemm without a bias gets one (Conv input 2, Gemm C). A MatMul whose output feeds
    only an Add of a constant uses that Add's constant as its bias (broadcast to N features
    when it was a scalar); any other MatMul gets a new Add after it, which takes the MatMul
    output's name (the MatMul's output gets a new one). Biases are new initializers; the old
    ones are dropped when nothing else reads them.

    Exact limit: for Gemm and MatMul the correction is exactly the mean output error over the
    calibration data; for Conv it ignores padding (the zeros read at the borders are taken as
    E[x]) and that border positions are read by fewer outputs, so it is exact for an unpadded
    1x1 conv with stride 1 and close otherwise. A weight already on its grid (eps = 0) is left
    alone.

    Refused, with the reason: a weight that is not a constant floating-point initializer
    (attention MatMuls), a Conv weight of fewer than 3 dims or a Gemm/MatMul weight that is not
    2-D, a MatMul reading the weight as its first input, a Gemm with ``beta=0``, a bias that is
    not a constant initializer, an input whose mean does not have the expected channel count,
    a weight already on the int8 grid, a correction that is zero, names matching ``exclude``.
    Calibration data is required (CalibrationError otherwise). Nodes inside If/Loop/Scan
    bodies are not visited.
    """

    name = "correct-bias"
    Options = CorrectBiasOptions
    prerequisites = ("lift-constants", "fold-batchnorm")
    lossless = False

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if not self.context.calibration:
            raise CalibrationError("correct-bias needs calibration data (--calib); without data, quantize-dynamic (preset int8-dynamic) quantizes weights only")
        sites = []
        for node in model.graph:
            if node.op_type in _LAYERS and node.domain == "":
                site = self._plan(node)
                if isinstance(site, str):
                    self.refused(node, site)
                else:
                    sites.append(site)
        if not sites:
            return ir.passes.PassResult(model, modified=False)
        means = _input_means(model, sites, self.context.calibration)
        names = Names(model)
        changed = 0
        for site in sites:
            mean = means[site.x.name]
            error = _output_error(site, mean)
            if isinstance(error, str):
                self.refused(site.node, error)
                continue
            if not np.any(error):
                self.refused(site.node, "the correction is zero (the input's mean is zero where the weight error is not)")
                continue
            self._correct(model, site, error, names)
            grid = "per channel" if self.options.per_channel else "per tensor"
            self.rewrote(site.node, f"bias corrected by up to {np.max(np.abs(error)):.3g} "
                                    f"(mean output error of int8 weights, {grid})")
            changed += 1
        if changed:
            self.note(f"corrected the bias of {changed} layers on {len(self.context.calibration)} calibration feeds")
        return ir.passes.PassResult(model, modified=bool(changed))

    def candidates(self, model: ir.Model) -> list[Candidate]:
        found = []
        for node in model.graph:
            if node.op_type in _LAYERS and node.domain == "" and isinstance(self._plan(node), _Site):
                found.append(Candidate(self.name, node_label(node), node.op_type, "correct the bias for int8 weights"))
        return found

    # ------------------------------------------------------------------------ selection

    def _plan(self, node: ir.Node) -> _Site | str:
        if self.options.excluded(node):
            return f"excluded by exclude={self.options.exclude}"
        op = node.op_type
        if len(node.inputs) < 2 or node.inputs[1] is None:
            return f"the {op} has no weight input"
        weight = node.inputs[1]
        if reason := constant_reason(weight, "weight"):
            return reason
        if op == "MatMul" and node.inputs[0] is weight:
            return "the MatMul reads its weight as both inputs"
        w = weight.const_value.numpy()
        if op == "Conv" and w.ndim < 3:
            return f"the Conv weight is {w.ndim}-D"
        if op != "Conv" and w.ndim != 2:
            return f"the {op} weight is {w.ndim}-D, only 2-D weights are corrected"
        if op == "Gemm" and node.attributes.get_float("beta", 1.0) == 0.0:
            return "the Gemm has beta=0: it ignores its bias"
        axis = _channel_axis(node) if self.options.per_channel else None
        grid, zero_point = weight_grid(self.options.weights)(node)
        eps = fake_quantize_weight(w, axis, grid, zero_point).astype(np.float64) - w.astype(np.float64)
        if not np.any(eps):
            return f"weight '{weight.name}' is already on the int8 grid"
        bias_node, index = _bias_place(node)
        if index is not None and (reason := constant_reason(bias_node.inputs[index], "bias")):
            return reason
        return _Site(node, eps, bias_node, index)

    # ------------------------------------------------------------------------ rewriting

    def _correct(self, model: ir.Model, site: _Site, error: np.ndarray, names: Names) -> None:
        node, holder, index = site.node, site.bias_node, site.bias_index
        dtype = node.inputs[1].const_value.numpy().dtype
        if node.op_type == "Gemm":
            error = error / node.attributes.get_float("beta", 1.0)
        if index is None:
            bias = new_initializer(model, names.unique(f"{node.inputs[1].name}_bias"), (-error).astype(dtype))
            if node.op_type == "MatMul":
                _append_add(node, bias, names)
            else:
                node.resize_inputs(3)
                node.replace_input_with(2, bias)
            return
        old = holder.inputs[index].const_value.numpy()
        shape = old.shape[:-1] + (error.size,) if old.ndim else (error.size,)
        corrected = np.broadcast_to(old.astype(np.float64), shape) - error
        replace_constant_input(model, holder, index, corrected.astype(old.dtype), "_corrected")


def _channel_axis(node: ir.Node) -> int:
    """The weight axis of the output channels: the axis quantize-qdq gives its scales."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        return 0 if node.attributes.get_int("transB", 0) else 1
    return 1


def _bias_place(node: ir.Node) -> tuple[ir.Node, int | None]:
    """The node and input index holding the layer's bias (index None when it has none)."""
    if node.op_type in ("Conv", "Gemm"):
        has = len(node.inputs) > 2 and node.inputs[2] is not None
        return node, 2 if has else None
    out = node.outputs[0]
    uses = out.uses()
    if not out.is_graph_output() and len(uses) == 1 and uses[0].node.op_type == "Add":
        add, index = uses[0].node, 1 - uses[0].idx
        other = add.inputs[index]
        n = node.inputs[1].const_value.shape[1]
        if other is not None and other is not out and other.const_value is not None and other.is_initializer():
            shape = tuple(other.const_value.shape)
            if not shape or shape[-1] in (1, n):
                return add, index
    return node, None


# ---------------------------------------------------------------------------- the statistics


def _input_means(model: ir.Model, sites: list[_Site], feeds: list[dict]) -> dict[str, np.ndarray]:
    """Per-channel means of every site's input over the feeds (float64), one feed at a time."""
    axes = {site.x.name: _mean_axis(site.node) for site in sites}
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = dict.fromkeys(axes, 0)
    for values in stream(model, list(axes), feeds):
        for name, array in values.items():
            axis = axes[name] % array.ndim
            moved = np.moveaxis(np.asarray(array, np.float64), axis, 0).reshape(array.shape[axis], -1)
            sums[name] = sums.get(name, 0.0) + moved.sum(axis=1)
            counts[name] += moved.shape[1]
    return {name: sums[name] / counts[name] for name in axes}


def _mean_axis(node: ir.Node) -> int:
    """The axis of the input's channels: 1 for Conv, K of Gemm (by transA), the last for MatMul."""
    if node.op_type == "Conv":
        return 1
    if node.op_type == "Gemm":
        return 0 if node.attributes.get_int("transA", 0) else 1
    return -1


def _output_error(site: _Site, mean: np.ndarray) -> np.ndarray | str:
    """``eps`` applied to the input's mean: the expected output error per output channel."""
    node, eps = site.node, site.eps
    if node.op_type == "Conv":
        group = node.attributes.get_int("group", 1)
        c_out, c_group = eps.shape[0], eps.shape[1]
        if mean.size != c_group * group:
            return f"its input has {mean.size} channels, the weight expects {c_group * group}"
        summed = eps.reshape(c_out, c_group, -1).sum(axis=2)  # over kernel positions
        per_group = mean.reshape(group, c_group)
        return np.einsum("goc,gc->go", summed.reshape(group, c_out // group, c_group), per_group).reshape(c_out)
    trans_b = node.op_type == "Gemm" and node.attributes.get_int("transB", 0)
    used = eps.T if trans_b else eps  # K x N
    if mean.size != used.shape[0]:
        return f"its input has {mean.size} features, the weight expects {used.shape[0]}"
    error = mean @ used
    if node.op_type == "Gemm":
        error = error * node.attributes.get_float("alpha", 1.0)
    return error


# ---------------------------------------------------------------------------- graph surgery


def _append_add(matmul: ir.Node, bias: ir.Value, names: Names) -> None:
    """MatMul → Add(bias); the Add takes over the MatMul output's name and consumers."""
    out = matmul.outputs[0]
    add = ir.node("Add", [out, bias], name=names.unique(f"{matmul.name or 'matmul'}/bias"))
    matmul.graph.insert_after(matmul, add)
    result = add.outputs[0]
    name = out.name
    result.type, result.shape = out.type, out.shape
    out.replace_all_uses_with(result, replace_graph_outputs=True)
    add.replace_input_with(0, out)
    out.name = names.unique(f"{name}_uncorrected")
    result.name = name
