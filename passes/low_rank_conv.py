"""low-rank-conv: Conv N×C×k×k → Conv r×C×k×k (no bias) followed by a 1×1 Conv N×r (with the bias)."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from onnxcompress.errors import CalibrationError
from onnxcompress.factorize import (
    LowRankOptions,
    Plan,
    Whiteners,
    collect_grams,
    constant_array,
    constant_reason,
    describe,
    plan,
    replace_node,
    shared_reason,
    shrink_reason,
)
from onnxcompress.initializers import Names, drop_if_unused, new_initializer
from onnxcompress.pass_base import Candidate, CompressionPass, node_label
from onnxcompress.reconstruct import conv_geometry, im2col
from onnxcompress.registry import register

logger = logging.getLogger(__name__)

# Rows of im2col patches kept per calibration feed for the covariance (a seeded random subset
# beyond this; a 112×112 feature map has 12,544 positions per image).
MAX_ROWS_PER_FEED = 4096


@dataclasses.dataclass(frozen=True)
class LowRankConvOptions(LowRankOptions):
    """Options of low-rank-conv (shared with low-rank-gemm)."""


@register
class LowRankConv(CompressionPass):
    """Split a Conv into a Conv with r filters and a 1×1 Conv (channel SVD, Tucker-2 variant).

    The weight W (N×C×k…) reshaped to the matrix ``W_mat`` (K×N, K = C·∏k, the im2col
    columns) is factored ``W_mat ≈ A·B`` (truncated SVD, :mod:`onnxcompress.factorize`). The
    Conv becomes a Conv with weight ``Aᵀ`` reshaped to r×C×k… and the original ``strides``,
    ``pads``, ``dilations``, ``auto_pad`` and ``kernel_shape`` (it computes the r projections at
    exactly the original output positions), no bias, followed by a 1×1 Conv with weight ``Bᵀ``
    (N×r×1…) and the original bias. The output keeps its name. Any number of spatial dims;
    1×1 convs are plain matrices (K = C). Rank options and ``data_aware`` as for
    low-rank-gemm; data-aware activations are the im2col patches of the conv input on the
    calibration data (at most 4096 positions per feed, a seeded random subset).

    Refused, with the reason and the numbers, when the pair would not be smaller: parameters
    ``r·(C·∏k + N) ≥ N·C·∏k``. The MACs obey the same inequality, so one check covers both:
    the first conv costs ``r·C·∏k`` and the 1×1 conv ``N·r`` per output position, against
    ``N·C·∏k`` for the original, at the same output positions. Also refused: grouped and
    depthwise convs (``group`` > 1: already factorised per group), a weight that is not a
    constant floating-point initializer, a weight shared with a node that is not factorised
    with it (a weight shared by several plain Convs is factored once for all of them), a
    ``rank`` above the full rank ``min(C·∏k, N)``, an all-zero weight, fewer than
    ``min_elements`` weights, names matching ``exclude``.

    Exact limit: at full rank ``A·B = W_mat`` to float rounding, so the pair computes the
    conv (tested on :func:`onnxcompress.factorize.low_rank_factors` and on a conv whose weight
    has true rank r, which is reproduced exactly at rank r).

    Per node (``@PATTERN{...}``): ``rank``, ``ratio`` or ``energy`` (setting one resets the
    other two to their defaults for those convs), or ``skip=true`` to leave them alone
    (refused, naming the pattern). A weight shared by several convs follows the rule of its
    first reader in graph order; a reader left alone keeps the weight, so all its readers are
    refused.
    """

    name = "low-rank-conv"
    Options = LowRankConvOptions
    per_node = ("rank", "ratio", "energy")
    prerequisites = ("lift-constants", "fold-batchnorm")
    lossless = False

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        options = self.options
        if options.data_aware and not self.context.calibration:
            raise CalibrationError("low-rank-conv with data_aware=true needs calibration data (--calib)")
        order = {node: i for i, node in enumerate(model.graph)}
        self._outcomes: list[tuple[ir.Node, str, str]] = []
        groups = self._groups(model)
        whiteners = Whiteners(self._grams(model, groups) if options.data_aware else {}, options.damping)
        names = Names(model)
        changed = 0
        for weight, nodes in groups.items():
            whitener = whiteners([_patch_key(node, weight) for node in nodes])
            rule = self.node_options(nodes[0]).rule  # a shared weight follows its first reader
            p = plan(_matrix(weight.const_value.numpy()), rule, whitener=whitener)
            if reason := shrink_reason(p, _k_text(weight.const_value.shape), "N"):
                self._outcomes += [(node, "refused", reason) for node in nodes]
                continue
            detail = describe(p, options.data_aware).replace("parameters", "weights and MACs per output position")
            if len(nodes) > 1:
                detail += f"; factors shared by {len(nodes)} convs reading '{weight.name}'"
            self._rewrite(model, weight, nodes, p, names)
            self._outcomes += [(node, "rewritten", detail) for node in nodes]
            changed += len(nodes)
        for node, action, detail in sorted(self._outcomes, key=lambda item: order[item[0]]):
            (self.rewrote if action == "rewritten" else self.refused)(node, detail)
        if changed:
            self.note(f"factorised {changed} Conv nodes")
        return ir.passes.PassResult(model, modified=bool(changed))

    def candidates(self, model: ir.Model) -> list[Candidate]:
        """Convs the default rank rule would factorise, with the rank and the saving (plain SVD;
        weights in Constant nodes count too, as they will once lifted)."""
        out, plans = [], {}
        for node in model.graph:
            if not _is_conv(node) or self.options.excluded(node) or node.attributes.get_int("group", 1) != 1:
                continue
            array = constant_array(node.inputs[1])
            if array is None or array.ndim < 3 or array.size < max(self.options.min_elements, 1):
                continue
            key = id(node.inputs[1])
            if key not in plans:
                plans[key] = plan(_matrix(array), self.options.rule)
            if not shrink_reason(plans[key]):
                what = describe(plans[key], False).replace("parameters", "weights and MACs per output position")
                out.append(Candidate(self.name, node_label(node), node.op_type, what))
        return out

    # ------------------------------------------------------------------------ selection

    def _groups(self, model: ir.Model) -> dict[ir.Value, list[ir.Node]]:
        groups: dict[ir.Value, list[ir.Node]] = {}
        for node in model.graph:
            if not _is_conv(node):
                continue
            if reason := self._node_reason(node):
                self._outcomes.append((node, "refused", reason))
                continue
            groups.setdefault(node.inputs[1], []).append(node)
        eligible = {}
        for weight, nodes in groups.items():
            if reason := shared_reason(weight, {(id(n), 1) for n in nodes}):
                self._outcomes += [(node, "refused", reason) for node in nodes]
            else:
                eligible[weight] = nodes
        return eligible

    def _node_reason(self, node: ir.Node) -> str:
        if self.options.excluded(node):
            return f"excluded by exclude={self.options.exclude}"
        if reason := self.skipped_by_plan(node):
            return reason
        group = node.attributes.get_int("group", 1)
        weight = node.inputs[1]
        if group != 1:
            shape = weight.const_value.shape if weight.const_value is not None else None
            depthwise = shape is not None and shape[1] == 1 and shape[0] % group == 0
            kind = "depthwise conv" if depthwise else "grouped conv"
            return f"{kind} (group={group}): already factorised per group"
        if reason := constant_reason(weight):
            return reason
        shape = tuple(weight.const_value.shape)
        if len(shape) < 3:
            return f"weight '{weight.name}' is {len(shape)}-D {list(shape)}, a Conv weight has 3 or more"
        size = int(np.prod(shape))
        if size < self.options.min_elements:
            return f"weight '{weight.name}' has {size:,} elements, fewer than min_elements={self.options.min_elements:,}"
        return ""

    def _grams(self, model: ir.Model, groups: dict[ir.Value, list[ir.Node]]) -> dict:
        requests = {}
        rng = np.random.default_rng(0)
        for weight, nodes in groups.items():
            shape = tuple(weight.const_value.shape)
            for node in nodes:
                requests[_patch_key(node, weight)] = (node.inputs[0].name, _patches(node, shape, rng))
        return collect_grams(model, requests, self.context.calibration)

    # ------------------------------------------------------------------------ rewriting

    def _rewrite(self, model: ir.Model, weight: ir.Value, nodes: list[ir.Node], p: Plan, names: Names) -> None:
        w = weight.const_value.numpy()
        a, b = p.factors()
        r = p.rank
        out_channels, spatial = w.shape[0], w.ndim - 2
        base = weight.name or "weight"
        first_w = a.T.reshape(r, *w.shape[1:]).astype(w.dtype)
        second_w = b.T.reshape(out_channels, r, *([1] * spatial)).astype(w.dtype)
        first_value = new_initializer(model, names.unique(f"{base}.lowrank_a"), first_w)
        second_value = new_initializer(model, names.unique(f"{base}.lowrank_b"), second_w)
        for node in nodes:
            label = node.name or node_label(node)
            attributes = {key: attr for key, attr in node.attributes.items()}
            first = ir.node("Conv", [node.inputs[0], first_value], attributes=attributes, name=f"{label}/lowrank_a")
            inputs = [first.outputs[0], second_value]
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                inputs.append(node.inputs[2])
            second = ir.node("Conv", inputs, attributes={"kernel_shape": [1] * spatial}, name=node.name or None)
            hidden = names.unique(f"{node.outputs[0].name or label}_lowrank")
            replace_node(node, first, second, hidden)
        drop_if_unused(weight)


def _is_conv(node: ir.Node) -> bool:
    return node.op_type == "Conv" and node.domain == "" and len(node.inputs) >= 2


def _k_text(shape) -> str:
    return "C·kh·kw" if len(shape) == 4 else "C·k" if len(shape) == 3 else "C·∏k"


def _matrix(w: np.ndarray) -> np.ndarray:
    """N×C×k… → (C·∏k)×N, the columns of im2col times the filters."""
    return w.reshape(w.shape[0], -1).T


def _patch_key(node: ir.Node, weight: ir.Value) -> tuple:
    """Convs reading the same input with the same kernel and geometry see the same patches."""
    geometry = tuple(sorted((k, str(a.value)) for k, a in node.attributes.items() if k != "group"))
    return node.inputs[0].name, tuple(weight.const_value.shape[1:]), geometry


def _patches(node: ir.Node, weight_shape, rng):
    def rows(x: np.ndarray) -> np.ndarray:
        patches = im2col(x, *conv_geometry(node, weight_shape, x.shape))
        if len(patches) > MAX_ROWS_PER_FEED:
            patches = patches[rng.choice(len(patches), MAX_ROWS_PER_FEED, replace=False)]
        return patches

    return rows
