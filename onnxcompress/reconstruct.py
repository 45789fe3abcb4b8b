"""Least-squares refit of the layers after pruned channels (He et al. 2017, "Channel Pruning").

For each consumer (sink) that lost input channels, in graph order: take its input X' in the
pruned model (with the earlier refits applied) and its output Y in the original model (the
kept output channels only), and solve min ‖X'·W' + b' − Y‖² (ridge-regularised, a bias
column where the op has one). Conv inputs become im2col patches.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxcompress.activations import capture
from onnxcompress.initializers import replace_constant_input

MAX_ROWS = 40_000
RIDGE = 1e-3  # relative to the mean input energy


def im2col(x: np.ndarray, kernel, strides, pads, dilations) -> np.ndarray:
    """(N, C, *spatial) → (N·out positions, C·prod(kernel)) patches, channel-major columns."""
    n, c = x.shape[:2]
    dims = len(kernel)
    begin, end = pads[:dims], pads[dims:]
    x = np.pad(x, [(0, 0), (0, 0)] + [(b, e) for b, e in zip(begin, end)])
    out_sizes = [
        (x.shape[2 + d] - dilations[d] * (kernel[d] - 1) - 1) // strides[d] + 1 for d in range(dims)
    ]
    cols = np.empty((n, c, *kernel, *out_sizes), dtype=x.dtype)
    for offset in np.ndindex(*kernel):
        index = [slice(None), slice(None)]
        for d in range(dims):
            start = offset[d] * dilations[d]
            index.append(slice(start, start + strides[d] * out_sizes[d], strides[d]))
        cols[(slice(None), slice(None), *offset)] = x[tuple(index)]
    # (N, C, k..., out...) -> (N, out..., C, k...)
    order = [0] + list(range(2 + dims, 2 + 2 * dims)) + [1] + list(range(2, 2 + dims))
    return cols.transpose(order).reshape(n * int(np.prod(out_sizes)), c * int(np.prod(kernel)))


def conv_geometry(node: ir.Node, weight_shape, input_shape) -> tuple[list, list, list, list]:
    dims = len(weight_shape) - 2
    attrs = node.attributes
    kernel = list(weight_shape[2:])
    strides = list(attrs["strides"].as_ints()) if "strides" in attrs else [1] * dims
    dilations = list(attrs["dilations"].as_ints()) if "dilations" in attrs else [1] * dims
    pads = list(attrs["pads"].as_ints()) if "pads" in attrs else [0] * (2 * dims)
    auto_pad = attrs["auto_pad"].as_string() if "auto_pad" in attrs else "NOTSET"
    if auto_pad not in ("NOTSET", "VALID"):
        pads = []
        for d in range(dims):
            size = input_shape[2 + d]
            out = -(-size // strides[d])
            total = max(0, (out - 1) * strides[d] + dilations[d] * (kernel[d] - 1) + 1 - size)
            small, large = total // 2, total - total // 2
            pads.append((small, large) if auto_pad == "SAME_UPPER" else (large, small))
        pads = [p[0] for p in pads] + [p[1] for p in pads]
    return kernel, strides, pads, dilations


def sink_rows(node: ir.Node, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """The layer's input as a design matrix whose product with the flattened weight is its output."""
    if node.op_type == "Conv":
        return im2col(x, *conv_geometry(node, weight.shape, x.shape))
    if node.op_type == "Gemm":
        return x.reshape(-1, x.shape[-1]) if not _attr(node, "transA", 0) else x.T
    return x.reshape(-1, x.shape[-1])  # MatMul


def output_rows(node: ir.Node, y: np.ndarray) -> np.ndarray:
    if node.op_type == "Conv":
        return np.moveaxis(y, 1, -1).reshape(-1, y.shape[1])
    return y.reshape(-1, y.shape[-1])


def _attr(node, name, default):
    attr = node.attributes.get(name)
    return attr.value if attr is not None else default


def refittable(node: ir.Node) -> str | None:
    """None if the sink can be refitted, else why not."""
    if node.op_type == "Conv" and _attr(node, "group", 1) == 1:
        return None
    if node.op_type == "Gemm":
        if _attr(node, "alpha", 1.0) != 1.0 or _attr(node, "beta", 1.0) != 1.0 or _attr(node, "transA", 0):
            return "Gemm with alpha, beta or transA"
        return None
    if node.op_type == "MatMul":
        return None
    return f"{node.op_type} sinks are not refitted"


def weight_matrix(node: ir.Node, weight: np.ndarray) -> np.ndarray:
    """(inputs, outputs) matrix view of the weight, matching sink_rows' columns."""
    if node.op_type == "Conv":
        return weight.reshape(weight.shape[0], -1).T
    if node.op_type == "Gemm" and _attr(node, "transB", 0):
        return weight.T
    return weight


def matrix_to_weight(node: ir.Node, matrix: np.ndarray, like: np.ndarray) -> np.ndarray:
    if node.op_type == "Conv":
        return matrix.T.reshape(like.shape)
    if node.op_type == "Gemm" and _attr(node, "transB", 0):
        return matrix.T
    return matrix


def least_squares(x: np.ndarray, y: np.ndarray, anchor: np.ndarray, anchor_bias: np.ndarray | None):
    """min ‖x·W + b − y‖² + λ‖[W; b] − [anchor; anchor_bias]‖², b only if anchor_bias is given.

    The pull towards the pruned layer's own weights keeps the fit sane when there are
    fewer calibration rows than inputs (a plain least-squares fit would interpolate).
    """
    x = x.astype(np.float64)
    prior = anchor.astype(np.float64)
    if anchor_bias is not None:
        x = np.hstack([x, np.ones((x.shape[0], 1))])
        prior = np.vstack([prior, anchor_bias.reshape(1, -1).astype(np.float64)])
    gram = x.T @ x
    lam = RIDGE * max(np.trace(gram) / gram.shape[0], 1e-12)
    gram[np.diag_indices_from(gram)] += lam
    solution = np.linalg.solve(gram, x.T @ y.astype(np.float64) + lam * prior)
    if anchor_bias is not None:
        return solution[:-1], solution[-1]
    return solution, None


def reconstruct_sinks(original: ir.Model, pruned: ir.Model, groups, removed: set[int], feeds: list[dict]):
    """Refit each sink that lost inputs; yields (node, what was done) for the report."""
    sinks = []
    for item in groups.slices:
        if item.role == "sink" and any(groups.unit(a) in removed for a in item.atoms):
            if item.node not in sinks:
                sinks.append(item.node)
    order = {node: i for i, node in enumerate(pruned.graph)}
    sinks.sort(key=lambda n: order[n])
    targets = capture(original, [n.outputs[0].name for n in sinks], feeds)
    rng = np.random.default_rng(0)
    for node in sinks:
        reason = refittable(node)
        if reason:
            yield node, f"not refitted: {reason}"
            continue
        weight = node.inputs[1].const_value.numpy()
        xs = capture(pruned, [node.inputs[0].name], feeds)[node.inputs[0].name]
        rows = np.concatenate([sink_rows(node, xi, weight) for xi in xs])
        ys = [output_rows(node, yi) for yi in targets[node.outputs[0].name]]
        y = np.concatenate(ys)
        y = y[:, _kept_outputs(node, groups, removed, y.shape[1])]
        has_bias = node.op_type in ("Conv", "Gemm")
        bias_value = node.inputs[2] if len(node.inputs) > 2 else None
        if bias_value is None or bias_value.const_value is None or bias_value.const_value.size != y.shape[1]:
            has_bias = False  # no per-channel bias to put it in: fit the weight alone
        few = rows.shape[0] < rows.shape[1] + 1
        if rows.shape[0] > MAX_ROWS:
            pick = rng.choice(rows.shape[0], MAX_ROWS, replace=False)
            rows, y = rows[pick], y[pick]
        old_matrix, old_bias = weight_matrix(node, weight), _bias(bias_value) if has_bias else None
        before = _relative_error(rows, old_matrix, old_bias, y)
        matrix, bias = least_squares(rows, y, old_matrix, old_bias)
        new_weight = matrix_to_weight(node, matrix, weight).astype(weight.dtype)
        replace_constant_input(pruned, node, 1, new_weight, ".refit")
        if bias is not None:
            bias_array = bias.astype(weight.dtype).reshape(node.inputs[2].const_value.shape.numpy())
            replace_constant_input(pruned, node, 2, bias_array, ".refit")
        after = _relative_error(rows, matrix, bias, y)
        note = (f" (only {rows.shape[0]} rows for {rows.shape[1]} inputs: the fit stays near the old weights"
                "; more calibration samples make it generalise)") if few else ""
        yield node, f"refitted by least squares: relative output error {before:.4f} -> {after:.4f}{note}"


def _bias(value):
    return value.const_value.numpy().reshape(-1) if value is not None and value.const_value is not None else None


def _relative_error(rows, matrix, bias, y) -> float:
    pred = rows.astype(np.float64) @ matrix
    if bias is not None:
        pred = pred + bias
    return float(np.linalg.norm(pred - y) / max(np.linalg.norm(y), 1e-12))


def _kept_outputs(node: ir.Node, groups, removed: set[int], count: int) -> list[int]:
    for source in groups.sources:
        if source.node is node:
            return [i for i, a in enumerate(source.atoms) if groups.unit(a) not in removed]
    return list(range(count))
