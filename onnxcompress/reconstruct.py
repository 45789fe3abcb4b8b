"""Least-squares refit of the layers after pruned channels (He et al. 2017, "Channel Pruning").

For each consumer (sink) that lost input channels, in graph order: take its input X' in the
pruned model (with the earlier refits applied) and its output Y in the original model (the
kept output channels only), and solve min ‖X'·W' + b' − Y‖² + λ‖[W'; b'] − [W; b]‖²: a
ridge pulled towards the pruned layer's own weights, with λ chosen on held-out calibration
feeds (or no refit at all, when that does better there). Conv inputs become im2col patches.
A sink whose output is added to a residual branch is fitted to the original sum less that
branch as the pruned model computes it: the refit also absorbs the drift upstream.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from onnxcompress.activations import capture, reader
from onnxcompress.initializers import replace_constant_input

MAX_ROWS = 40_000


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


# Ridge strengths tried, relative to the mean input energy; the held-out feeds choose.
RIDGE_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
HOLDOUT_EVERY = 4  # every 4th calibration feed is held out to choose the ridge strength


def _design(x: np.ndarray, with_bias: bool) -> np.ndarray:
    x = x.astype(np.float64)
    return np.hstack([x, np.ones((x.shape[0], 1))]) if with_bias else x


def anchored_ridge(gram: np.ndarray, cross: np.ndarray, prior: np.ndarray, lam: float) -> np.ndarray:
    """argmin_W ‖x·W − y‖² + λ‖W − prior‖² from ``gram`` = xᵀx and ``cross`` = xᵀy (x already
    carries a ones column for a bias)."""
    gram = gram.copy()
    gram[np.diag_indices_from(gram)] += lam
    return np.linalg.solve(gram, cross + lam * prior)


def _moments(rows, width: int, outputs: int):
    """xᵀx and xᵀy over the (x, y) blocks ``rows``."""
    gram = np.zeros((width, width))
    cross = np.zeros((width, outputs))
    for design, y in rows:
        gram += design.T @ design
        cross += design.T @ y
    return gram, cross


def _rows(xs, ys, indices, with_bias, weights=None):
    """(design matrix, float64 target) of each feed in ``indices``, built one at a time, each
    row scaled by its weight when there are ``weights`` (weighted least squares)."""
    for i in indices:
        design, y = _design(xs[i], with_bias), ys[i].astype(np.float64)
        yield (design, y) if weights is None else (design * weights[i], y * weights[i])


def _relative_error(rows, solution) -> float:
    """‖x·solution − y‖ / ‖y‖ over the (x, y) blocks ``rows``."""
    residual = target = 0.0
    for design, y in rows:
        residual += float(np.sum((design @ solution - y) ** 2))
        target += float(np.sum(y * y))
    return math.sqrt(residual) / max(math.sqrt(target), 1e-12)


def fit_layer(xs: list[np.ndarray], ys: list[np.ndarray], anchor: np.ndarray, anchor_bias: np.ndarray | None,
              row_weights: list[np.ndarray] | None = None):
    """Refit [W; b] on per-feed row blocks, pulled towards the pruned layer's own weights;
    with ``row_weights`` (a column per feed) each row's residual is scaled by its weight.

    The pull strength λ is chosen on held-out feeds among RIDGE_GRID and "no refit" (the
    anchor itself), so the refit is never worse than leaving the weights alone on data the
    fit did not see. The fit needs only xᵀx and xᵀy, accumulated feed by feed; of the rows
    only the held-out quarter is kept in float64 (the candidates are all scored on it).
    Returns (W, b or None, chosen λ or None for "kept", held-out errors, relative error on
    all feeds before, and after).
    """
    with_bias = anchor_bias is not None
    prior = anchor.astype(np.float64)
    if with_bias:
        prior = np.vstack([prior, anchor_bias.reshape(1, -1).astype(np.float64)])
    everything = range(len(xs))
    held = [i for i in everything if len(xs) >= 2 and i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1] or (
        [len(xs) - 1] if len(xs) >= 2 else [])
    train = [i for i in everything if i not in held]
    width, outputs = xs[0].shape[1] + with_bias, ys[0].shape[1]
    gram, cross = _moments(_rows(xs, ys, train, with_bias, row_weights), width, outputs)
    rows = sum(xs[i].shape[0] for i in train)
    scale = max(float(np.trace(gram)) / (rows * gram.shape[0]), 1e-12)
    before = _relative_error(_rows(xs, ys, everything, with_bias, row_weights), prior)
    held_rows = list(_rows(xs, ys, held, with_bias, row_weights))  # a quarter of the rows, read once per candidate
    if held:
        errors = {None: _relative_error(held_rows, prior)}
        for ridge in RIDGE_GRID:
            errors[ridge] = _relative_error(held_rows, anchored_ridge(gram, cross, prior, ridge * scale))
        best = min(errors, key=errors.get)
    else:
        errors, best = {}, RIDGE_GRID[1]
    if best is None:
        return anchor, anchor_bias, None, errors, before, before
    held_gram, held_cross = _moments(held_rows, width, outputs)
    solution = anchored_ridge(gram + held_gram, cross + held_cross, prior, best * scale)
    after = _relative_error(_rows(xs, ys, everything, with_bias, row_weights), solution)
    weights, bias = (solution[:-1], solution[-1]) if with_bias else (solution, None)
    return weights, bias, best, errors, before, after


def pruned_sinks(model: ir.Model, groups, removed: set[int]) -> list[ir.Node]:
    """The sinks that lose input channels, in graph order."""
    sinks = []
    for item in groups.slices:
        if item.role == "sink" and any(groups.unit(a) in removed for a in item.atoms):
            if item.node not in sinks:
                sinks.append(item.node)
    order = {node: i for i, node in enumerate(model.graph)}
    return sorted(sinks, key=lambda n: order[n])


def residual_join(node: ir.Node):
    """(the Add, its other operand, the bias or None) when ``node``'s output reaches an Add
    with a computed operand, alone or through one Add of a constant: a residual connection."""
    value, bias = node.outputs[0], None
    for _ in range(2):
        uses = list(value.uses())
        if len(uses) != 1 or value.is_graph_output() or uses[0].node.op_type != "Add":
            return None
        user, other = uses[0].node, uses[0].node.inputs[1 - uses[0].idx]
        if other is None:
            return None
        if other.const_value is None:
            return user, other, bias
        if bias is not None:
            return None
        value, bias = user.outputs[0], other
    return None


def _same_known_shape(*values: ir.Value) -> bool:
    """Every value has one shape whose dims are all numbers or named (an unnamed dim may differ)."""
    shapes = [v.shape for v in values]
    known = shapes[0] is not None and all(isinstance(d, int) or d.value is not None for d in shapes[0])
    return known and all(s == shapes[0] for s in shapes)


def reconstruction_targets(model: ir.Model, groups, removed: set[int], feeds: list[dict]) -> dict[str, list[np.ndarray]]:
    """What each sink that will lose inputs is fitted to, on the calibration feeds, read from
    the model before it is pruned (so no copy of the whole original has to be kept): the sum
    of the residual Add it feeds where both operands have its known shape (no broadcast),
    or else its own output."""
    names = []
    for node in pruned_sinks(model, groups, removed):
        join = residual_join(node)
        if join and _same_known_shape(node.outputs[0], join[1], join[0].outputs[0]):
            names.append(join[0].outputs[0].name)
        else:
            names.append(node.outputs[0].name)
    return capture(model, names, feeds)


def reconstruct_sinks(model: ir.Model, groups, removed: set[int], targets: dict[str, list[np.ndarray]],
                      feeds: list[dict]):
    """Refit each sink that lost inputs, in graph order, to what ``targets``
    (:func:`reconstruction_targets`) says it should output, its kept output channels only;
    yields (node, what was done) for the report.

    One onnxruntime session of the pruned model reads every sink's input; the weights
    refitted so far are fed to it in place of the pruned ones (they are also written into
    the model). A refitted constant the session cannot take as an input (not an initializer)
    makes the later reads capture from the model as it is then. ``targets`` is consumed.
    """
    sinks = pruned_sinks(model, groups, removed)
    refitted = [node for node in sinks if refittable(node) is None]
    overridable = {v.name for node in refitted for v in node.inputs[1:3]
                   if v is not None and v.name in model.graph.initializers}
    joins = {node: residual_join(node) for node in refitted}
    joins = {node: join for node, join in joins.items() if join is not None and join[0].outputs[0].name in targets}
    session_read = reader(model, [node.inputs[0].name for node in refitted] + [j[1].name for j in joins.values()],
                          feeds, overridable=overridable)
    overrides: dict[str, np.ndarray] = {}
    stale = False

    def read(name: str) -> list[np.ndarray]:
        return capture(model, [name], feeds)[name] if stale else session_read(name, overrides)

    rng = np.random.default_rng(0)
    for node in sinks:
        reason = refittable(node)
        if not reason and node not in joins and node.outputs[0].name not in targets:
            reason = "the residual Add it was to be fitted through is gone after the rewrite"
        if reason:
            yield node, f"not refitted: {reason}"
            continue
        weight = node.inputs[1].const_value.numpy()
        keep_out = _kept_outputs(node, groups, removed)
        xs = [sink_rows(node, xi, weight) for xi in read(node.inputs[0].name)]
        ys, weights, through = _fit_targets(node, targets, joins.get(node), read, keep_out)
        xs, ys, weights = _subsample(xs, ys, weights, rng)
        bias_value = node.inputs[2] if len(node.inputs) > 2 else None
        has_bias = node.op_type in ("Conv", "Gemm") and bias_value is not None and \
            bias_value.const_value is not None and bias_value.const_value.size == ys[0].shape[1]
        old_matrix, old_bias = weight_matrix(node, weight), _bias(bias_value) if has_bias else None
        matrix, bias, ridge, errors, before, after = fit_layer(xs, ys, old_matrix, old_bias, weights)
        del xs, ys, weights
        if ridge is None:
            yield node, (f"kept its weights: a refit did worse on held-out calibration feeds "
                         f"({min(v for k, v in errors.items() if k is not None):.4f} vs {errors[None]:.4f})")
            continue
        new_weight = matrix_to_weight(node, matrix, weight).astype(weight.dtype)
        refits = {1: new_weight}
        if bias is not None:
            refits[2] = bias.astype(weight.dtype).reshape(node.inputs[2].const_value.shape.numpy())
        for index, array in refits.items():
            stale |= node.inputs[index].name not in overridable
            overrides[node.inputs[index].name] = array
            replace_constant_input(model, node, index, array, ".refit")
        held = f", held-out {errors[None]:.4f} -> {errors[ridge]:.4f}" if errors else ""
        yield node, (f"refitted by least squares{through} (ridge {ridge:g}): relative output error "
                     f"{before:.4f} -> {after:.4f}{held}")


def _fit_targets(node: ir.Node, targets, join, read, keep_out):
    """(the rows the sink's refit should output per feed, their weights or None, how they were
    made, for the report).

    Through a residual join the target is what the sum needs from the sink now: the original
    sum less the other operand as the pruned model computes it (and less the bias), so the
    refit also makes up for the drift upstream of the join instead of only matching the
    sink's own original output.
    """
    axis = 1 if node.op_type == "Conv" else -1
    if join is None:
        return [output_rows(node, y) for y in _kept(targets.pop(node.outputs[0].name), keep_out, axis)], None, ""
    add, other, bias = join
    sums = _kept(targets.pop(add.outputs[0].name), keep_out, axis)
    weights = _layer_norm_weights(node, add, sums)
    offset = bias.const_value.numpy() if bias is not None else 0.0
    rows = []
    for total, now in zip(sums, read(other.name)):  # not in place: captures may be cached
        rows.append(output_rows(node, total - now - offset))
    del sums
    through = f" to the sum of residual Add {add.name or add.outputs[0].name}"
    return rows, weights, through + (" weighted as its LayerNormalization sees it" if weights else "")


def _layer_norm_weights(node: ir.Node, add: ir.Node, sums) -> list[np.ndarray] | None:
    """1/σ of each row of the original sum when a LayerNormalization over the last axis reads
    it alone: the normalisation divides each token's error by that σ, so a token with a small
    spread weighs more downstream (the first-order weight of the LayerNorm's Jacobian)."""
    uses = list(add.outputs[0].uses())
    if node.op_type == "Conv" or len(uses) != 1 or add.outputs[0].is_graph_output():
        return None
    norm = uses[0].node
    axis = _attr(norm, "axis", -1)
    if norm.op_type != "LayerNormalization" or uses[0].idx != 0 or axis not in (-1, sums[0].ndim - 1):
        return None
    return [1.0 / np.maximum(s.reshape(-1, s.shape[-1]).std(axis=1, keepdims=True), 1e-12) for s in sums]


def _kept(arrays, keep, axis):
    return arrays if keep is None else [np.take(a, keep, axis=axis) for a in arrays]


def _subsample(xs, ys, weights, rng):
    """At most MAX_ROWS rows in all, taken evenly from every feed (with their row weights)."""
    total = sum(x.shape[0] for x in xs)
    if total <= MAX_ROWS:
        return xs, ys, weights
    share = MAX_ROWS / total
    picks = [rng.choice(x.shape[0], min(max(1, int(round(x.shape[0] * share))), x.shape[0]), replace=False)
             for x in xs]
    return ([x[p] for x, p in zip(xs, picks)], [y[p] for y, p in zip(ys, picks)],
            None if weights is None else [w[p] for w, p in zip(weights, picks)])


def _bias(value):
    return value.const_value.numpy().reshape(-1) if value is not None and value.const_value is not None else None


def _kept_outputs(node: ir.Node, groups, removed: set[int]) -> list[int] | None:
    """Output channels the sink keeps when it is also a pruned source; None when all stay."""
    for source in groups.sources:
        if source.node is node:
            kept = [i for i, a in enumerate(source.atoms) if groups.unit(a) not in removed]
            return kept if len(kept) < len(source.atoms) else None
    return None
