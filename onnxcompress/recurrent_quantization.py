"""LSTM weights for onnxruntime's ``com.microsoft.DynamicQuantizeLSTM`` (quantize-dynamic).

``LSTM(X, W, R, B, sequence_lens, initial_h, initial_c, P)`` with constant float32 W
[directions, 4·hidden, input] and R [directions, 4·hidden, hidden] becomes
``DynamicQuantizeLSTM(X, W_q, R_q, B, sequence_lens, initial_h, initial_c, P, W_scale,
W_zero_point, R_scale, R_zero_point)``: each weight symmetric on the int8 grid [-127, 127]
with one scale per direction or one per gate row (``[directions, 4·hidden]``), stored as int8
codes transposed as the kernel reads them ([directions, input, 4·hidden]); X and the hidden
state are quantized to uint8 at run time, each step. Unlike the MatMul kernel, this one does
not saturate int8 codes on CPUs without VNNI (measured: uint8 storage gives bit-identical
outputs, even with every weight at ±127 and inputs near 255, and runs 1.4× slower), so int8
it is. GRU and RNN have no such kernel in onnxruntime and stay in float, with that reason.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxcompress.factorize import constant_reason
from onnxcompress.initializers import Names, drop_if_unused, new_initializer, take_over
from onnxcompress.options import PassOptions
from onnxcompress.quantization import INT8_NARROW, quantize_weight
from onnxcompress.weight_sites import FLOAT, FLOAT_BYTES, MS_DOMAIN, Refuse, Skipped, excluded, size_text

NO_KERNEL = {"GRU": "onnxruntime has no dynamically quantized GRU kernel: left in float",
             "RNN": "onnxruntime has no dynamically quantized RNN kernel: left in float"}


def lstm_nodes(model: ir.Model, options: PassOptions, refuse: Refuse, skipped: Skipped) -> list[ir.Node]:
    """LSTM nodes of the main graph whose weights the rewrite can take; ``refuse`` hears about
    every other LSTM, GRU and RNN."""
    eligible = []
    for node in model.graph:
        if node.domain != "" or node.op_type not in ("LSTM", "GRU", "RNN"):
            continue
        reason = NO_KERNEL.get(node.op_type) or _lstm_reason(node, options, skipped)
        if reason:
            refuse(node, reason)
        else:
            eligible.append(node)
    return eligible


def _lstm_reason(node: ir.Node, options: PassOptions, skipped: Skipped) -> str:
    if excluded(options, node):
        return f"excluded by exclude={options.exclude}"
    if reason := skipped(node):
        return reason
    if node.attributes.get_int("layout", 0) != 0:
        return "LSTM with layout=1 (batch first): DynamicQuantizeLSTM takes only layout 0"
    for index, role in ((1, "W"), (2, "R")):
        value = node.inputs[index] if len(node.inputs) > index else None
        if reason := constant_reason(value, role):
            return reason
        tensor = value.const_value
        if tensor.dtype != FLOAT:
            return f"{role} '{value.name}' is {tensor.dtype.name}; only FLOAT (float32) weights are quantized"
        if len(tensor.shape) != 3:
            return f"{role} '{value.name}' is {len(tensor.shape)}-D, an LSTM weight is 3-D"
        if any(use.node is not node for use in value.uses()):
            other = next(use.node for use in value.uses() if use.node is not node)
            return f"{role} '{value.name}' is also read by '{other.name or other.op_type}'"
    elements = sum(node.inputs[i].const_value.size for i in (1, 2))
    if elements < options.min_elements:
        return f"weights have {elements:,} elements, fewer than min_elements={options.min_elements:,}"
    return ""


def lstm_sizes(node: ir.Node, per_channel: bool) -> tuple[int, int]:
    """Bytes of the node's W and R as float32, and as int8 codes with their scales and zero
    points (one byte each)."""
    before = after = 0
    for value in (node.inputs[1], node.inputs[2]):
        directions, rows, _ = value.const_value.shape
        scales = directions * rows if per_channel else directions
        before += FLOAT_BYTES * value.const_value.size
        after += value.const_value.size + FLOAT_BYTES * scales + scales  # zero points: one byte each
    return before, after


def rewrite_lstm(model: ir.Model, node: ir.Node, names: Names, per_channel: bool) -> str:
    """Replace the LSTM by DynamicQuantizeLSTM; the text for the report."""
    before, after = lstm_sizes(node, per_channel)
    elements = node.inputs[1].const_value.size + node.inputs[2].const_value.size
    quantized = [_quantized(model, node.inputs[i], names, per_channel) for i in (1, 2)]
    inputs = [node.inputs[0], quantized[0][0], quantized[1][0]]
    inputs += [node.inputs[i] if len(node.inputs) > i else None for i in range(3, 8)]
    inputs += [*quantized[0][1:], *quantized[1][1:]]
    attributes = {name: a for name, a in node.attributes.items() if name != "layout"}
    new = ir.node("DynamicQuantizeLSTM", inputs, attributes=attributes, domain=MS_DOMAIN,
                  num_outputs=len(node.outputs), name=node.name or None)
    node.graph.insert_before(node, new)
    for old, replacement in zip(node.outputs, new.outputs):
        take_over(old, replacement)
    weights = node.inputs[1], node.inputs[2]
    node.graph.remove(node, safe=True)
    for value in weights:
        drop_if_unused(value)
    grid = "per gate row" if per_channel else "per direction"
    return f"int8 W and R, {grid}: {size_text(before, after, elements)}"


def _quantized(model: ir.Model, weight: ir.Value, names: Names, per_channel: bool):
    """(codes [directions, columns, 4·hidden], scale, zero point) initializers for one weight."""
    w = weight.const_value.numpy()
    directions, rows, columns = w.shape
    flat = w.reshape(directions * rows, columns) if per_channel else w.reshape(directions, rows * columns)
    q, scale = quantize_weight(flat, 0, INT8_NARROW)  # one scale per row of ``flat``
    q = q.reshape(directions, rows, columns).transpose(0, 2, 1)
    scale = np.asarray(scale, np.float32).reshape((directions, rows) if per_channel else (directions,))
    codes, zero_point = q.astype(np.int8), np.zeros(scale.shape, np.int8)
    base = weight.name or "weight"
    return (new_initializer(model, names.unique(f"{base}_quantized"), np.ascontiguousarray(codes)),
            new_initializer(model, names.unique(f"{base}_scale"), scale),
            new_initializer(model, names.unique(f"{base}_zero_point"), zero_point))
