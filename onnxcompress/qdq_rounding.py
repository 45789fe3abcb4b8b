"""GPTQ rounding of quantize-qdq's weights: the Gram matrices of each unit's inputs on the
calibration feeds (:func:`unit_grams`, which cluster-weights' GPTQ assignment reads too), and
the codes :func:`onnxcompress.gptq.round_weight_gptq` picks from them."""

from __future__ import annotations

import math
from typing import Iterable, NamedTuple

import numpy as np
import onnx_ir as ir

from onnxcompress.activations import stream
from onnxcompress.gptq import conv_gram, conv_positions, input_gram, round_weight_gptq
from onnxcompress.quantization import QType


MAX_GRAM_INPUTS = 8192  # a 512 MiB float64 matrix


class UnitGram(NamedTuple):
    """A unit's Gram matrix and the number of input rows (vectors, patches) it sums."""

    gram: np.ndarray
    rows: int


def gram_reason(node: ir.Node) -> str:
    """Why no Gram matrix of this unit's inputs can be formed ("" when one can): it takes a
    MatMul or a Gemm (transA=0) with a constant 2-D weight, or a 2-D Conv, with at most
    MAX_GRAM_INPUTS inputs (a unit of VGG-16's first classifier layer, 25,088 inputs, would
    need a 5 GB matrix)."""
    weight = node.inputs[1].const_value if len(node.inputs) > 1 and node.inputs[1] is not None else None
    if node.op_type in ("MatMul", "Gemm"):
        if weight is None or len(weight.shape) != 2:
            return "its weight is not a constant 2-D matrix"
        if node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
            return "a Gemm with transA=1 is not handled"
        transposed = node.op_type == "Gemm" and node.attributes.get_int("transB", 0)
        return _size_reason(weight.shape[1] if transposed else weight.shape[0])
    if node.op_type == "Conv":
        if weight is None or len(weight.shape) != 4:
            return "not a 2-D convolution"
        return _size_reason(weight.shape[1] * weight.shape[2] * weight.shape[3])
    return f"{node.op_type} is not handled"


def _size_reason(inputs: int) -> str:
    if inputs <= MAX_GRAM_INPUTS:
        return ""
    return (f"{inputs} inputs: its Gram matrix would take {inputs * inputs * 8 / 2**30:.1f} GiB "
            f"(more than {MAX_GRAM_INPUTS} inputs)")


def gptq_reason(node: ir.Node) -> str:
    """Why GPTQ cannot round this unit's weight onto quantize-qdq's grid ("" when it can)."""
    return "Gemm is not handled" if node.op_type == "Gemm" else gram_reason(node)


def unit_grams(model: ir.Model, nodes: Iterable[ir.Node], feeds: list[dict]) -> dict[ir.Node, UnitGram]:
    """The Gram matrix of each unit's inputs (G×K×K for a Conv's patches per group, K×K for
    a MatMul or Gemm) on ``feeds`` and the number of input rows it sums, in one streamed run
    of the float model (memory: one matrix per unit, not the activations). Units without
    one (:func:`gram_reason`) are left out.

    Units that read the same input the same way (attention's query, key and value MatMuls)
    share one Gram matrix: computed once per feed, not once per unit."""
    nodes = [n for n in nodes if not gram_reason(n)]
    if not nodes:
        return {}
    readers: dict[tuple, list[ir.Node]] = {}
    for node in nodes:
        readers.setdefault(_geometry(node), []).append(node)
    shared: dict[tuple, UnitGram] = {}
    for values in stream(model, [n.inputs[0].name for n in nodes], feeds):
        for key, (node, *_) in readers.items():
            gram, rows = _unit_gram(node, values[node.inputs[0].name])
            shared[key] = UnitGram(gram, rows) if key not in shared else \
                UnitGram(shared[key].gram + gram, shared[key].rows + rows)
    return {node: shared[key] for key, group in readers.items() for node in group}


class GptqRounding:
    """Codes for the weights of ``nodes`` (constant-weight MatMuls and 2-D Convs), rounded by
    GPTQ against their inputs on ``feeds``, read in one streamed run of the float model
    (memory: one K×K matrix per unit, not the activations). Codes are computed once per node
    and grid, however many candidate models the pass builds."""

    def __init__(self, model: ir.Model, nodes: Iterable[ir.Node], feeds: list[dict], damp: float):
        self.damp = damp
        self.feeds = len(feeds)
        self._codes: dict[tuple, np.ndarray] = {}
        units = unit_grams(model, [n for n in nodes if not gptq_reason(n)], feeds)
        self.grams = {node: unit.gram for node, unit in units.items()}

    def codes(self, node: ir.Node, w: np.ndarray, scale, axis: int | None, qtype: QType, zero_point: int):
        """The codes of ``node``'s weight ``w`` on the grid (scale, zero point, qtype), or None
        when ``node`` has no Gram matrix (round it to nearest)."""
        gram = self.grams.get(node)
        if gram is None:
            return None
        key = (node, np.asarray(scale).tobytes(), axis, qtype.name, qtype.qmin, zero_point)
        if key not in self._codes:
            group = node.attributes.get_int("group", 1) if node.op_type == "Conv" else 1
            self._codes[key] = round_weight_gptq(w, gram, scale, axis, zero_point, qtype, group, self.damp)
        return self._codes[key]


def _geometry(node: ir.Node) -> tuple:
    """What a unit's Gram matrix depends on: its input, op, weight shape and Conv attributes."""
    attributes = tuple(sorted((name, repr(attr.value)) for name, attr in node.attributes.items()))
    return node.inputs[0].name, node.op_type, tuple(node.inputs[1].const_value.shape), attributes


def _unit_gram(node: ir.Node, x: np.ndarray) -> tuple[np.ndarray, int]:
    w_shape = tuple(node.inputs[1].const_value.shape)
    if node.op_type in ("MatMul", "Gemm"):
        k = w_shape[1] if node.op_type == "Gemm" and node.attributes.get_int("transB", 0) else w_shape[0]
        return input_gram([x], k), x.size // k
    attributes = node.attributes
    strides = list(attributes.get_ints("strides", [1, 1]))
    dilations = list(attributes.get_ints("dilations", [1, 1]))
    pads = _pads(attributes.get_string("auto_pad", "NOTSET"), list(attributes.get_ints("pads", [0, 0, 0, 0])),
                 x.shape[2:], w_shape[2:], strides, dilations)
    out_h, out_w = conv_positions(x.shape[2:], w_shape[2:], strides, pads, dilations)
    return conv_gram(x, w_shape, attributes.get_int("group", 1), strides, pads, dilations), x.shape[0] * out_h * out_w


def _pads(auto_pad: str, pads: list[int], size, kernel, strides, dilations) -> list[int]:
    """Explicit (top, left, bottom, right) pads, auto_pad=SAME_* worked out as onnxruntime does."""
    if auto_pad == "VALID":
        return [0, 0, 0, 0]
    if auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        return pads
    begin, end = [], []
    for n, k, s, d in zip(size, kernel, strides, dilations):
        total = max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
        small = total // 2
        begin.append(small if auto_pad == "SAME_UPPER" else total - small)
        end.append(total - begin[-1])
    return begin + end
