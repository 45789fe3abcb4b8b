"""low-rank-gemm: a Gemm/MatMul with a constant weight W (K×N) → two thinner products of rank r."""

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
from onnxcompress.registry import register

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LowRankGemmOptions(LowRankOptions):
    """Options of low-rank-gemm (shared with low-rank-conv)."""


@dataclasses.dataclass
class _Site:
    """One Gemm/MatMul that reads a factorisable weight."""

    node: ir.Node
    weight: ir.Value
    trans_b: bool  # Gemm transB=1: W is stored N×K

    @property
    def x(self) -> ir.Value:
        return self.node.inputs[0]


@register
class LowRankGemm(CompressionPass):
    """Factor the constant weight of a Gemm or MatMul into two thinner matrices (truncated SVD).

    ``Y = X·W`` with W (K×N, as the op uses it: Gemm's ``transB`` honoured) becomes
    ``Y = (X·A)·B``, A: K×r, B: r×N: a MatMul by A, then a MatMul by B (from a MatMul, whose
    input may be N-D, ``x[B, T, K]``), or a Gemm by B that keeps the original ``C``, ``alpha``,
    ``beta`` and ``transB`` (from a Gemm; onnxruntime runs Gemm with its bias in one kernel).
    The output keeps its name, and the second product the node's name. Per node
    (``@PATTERN{rank=...}``) the rank rule can differ, or ``skip=true`` leaves it alone. The rank comes from ``rank``, ``ratio`` (of the full rank
    ``min(K, N)``) or ``energy`` (share of squared singular values kept; the default); the
    options are exclusive. ``data_aware=true`` fits the factors to the layer's output on the
    calibration data instead (activation-whitened SVD, see :mod:`onnxcompress.factorize`;
    the activations are those of the model as it was before this pass, one onnxruntime run
    over the feeds, and the energy is then the share of output energy kept).

    A weight shared by several Gemm/MatMul nodes is factored once (its activations pooled when
    data-aware) and every node reads the same A and B, so the saving counts once, like the
    weight did; if another kind of node (or an excluded one) also reads it, all its readers
    are refused. Nodes inside If/Loop/Scan bodies are not visited.

    Refused, with the reason and the numbers: r·(K + N) ≥ K·N (would not shrink; the MACs
    per row obey the same inequality), a ``rank`` above the full rank, an all-zero weight, a
    weight that is not a constant floating-point initializer of 2 dims (the attention
    products of a transformer, whose operands are activations), Gemm with ``transA=1``,
    fewer than ``min_elements`` weights, names matching ``exclude``.

    Exact limit: at full rank A·B = W to float rounding (tested on
    :func:`onnxcompress.factorize.low_rank_factors`; the pass itself refuses full rank since
    it would not shrink), and a weight of true rank r is reproduced exactly at rank r.
    """

    name = "low-rank-gemm"
    Options = LowRankGemmOptions
    per_node = ("rank", "ratio", "energy")
    prerequisites = ("lift-constants", "fold-batchnorm")
    lossless = False

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        options = self.options
        if options.data_aware and not self.context.calibration:
            raise CalibrationError("low-rank-gemm with data_aware=true needs calibration data (--calib)")
        order = {node: i for i, node in enumerate(model.graph)}
        self._outcomes: list[tuple[ir.Node, str, str]] = []
        groups = self._groups(model)
        whiteners = Whiteners(self._grams(model, groups) if options.data_aware else {}, options.damping)
        names = Names(model)
        changed = 0
        for weight, sites in groups.items():
            whitener = whiteners([site.x.name for site in sites])
            rule = self.node_options(sites[0].node).rule  # a shared weight follows its first reader
            p = plan(_used_matrix(sites[0]), rule, whitener=whitener)
            if reason := shrink_reason(p):
                self._outcomes += [(site.node, "refused", reason) for site in sites]
                continue
            detail = describe(p, options.data_aware)
            if len(sites) > 1:
                detail += f"; factors shared by {len(sites)} nodes reading '{weight.name}'"
            self._rewrite(model, weight, sites, p, names)
            self._outcomes += [(site.node, "rewritten", detail) for site in sites]
            changed += len(sites)
        for node, action, detail in sorted(self._outcomes, key=lambda item: order[item[0]]):
            (self.rewrote if action == "rewritten" else self.refused)(node, detail)
        if changed:
            self.note(f"factorised {changed} Gemm/MatMul nodes")
        return ir.passes.PassResult(model, modified=bool(changed))

    def candidates(self, model: ir.Model) -> list[Candidate]:
        """Nodes the default rank rule would factorise, with the rank and the saving (plain SVD;
        weights in Constant nodes count too, as they will once lifted)."""
        out, plans = [], {}
        for node in model.graph:
            if not _is_gemm(node) or self.options.excluded(node) or _gemm_reason(node):
                continue
            array = constant_array(node.inputs[1])
            if array is None or array.ndim != 2 or array.size < max(self.options.min_elements, 1):
                continue
            key = id(node.inputs[1])
            if key not in plans:
                w = array.T if node.op_type == "Gemm" and node.attributes.get_int("transB", 0) else array
                plans[key] = plan(w, self.options.rule)
            p = plans[key]
            if not shrink_reason(p):
                out.append(Candidate(self.name, node_label(node), node.op_type, describe(p, False)))
        return out

    # ------------------------------------------------------------------------ selection

    def _groups(self, model: ir.Model) -> dict[ir.Value, list[_Site]]:
        """Eligible sites grouped by weight; every other Gemm/MatMul is refused with its reason."""
        groups: dict[ir.Value, list[_Site]] = {}
        for node in model.graph:
            if not _is_gemm(node):
                continue
            if reason := self._node_reason(node):
                self._outcomes.append((node, "refused", reason))
                continue
            trans_b = node.op_type == "Gemm" and bool(node.attributes.get_int("transB", 0))
            groups.setdefault(node.inputs[1], []).append(_Site(node, node.inputs[1], trans_b))
        eligible = {}
        for weight, sites in groups.items():
            reason = shared_reason(weight, {(id(s.node), 1) for s in sites})
            if not reason and len({s.trans_b for s in sites}) > 1:
                reason = f"weight '{weight.name}' is read both transposed (Gemm transB=1) and not"
            if reason:
                self._outcomes += [(site.node, "refused", reason) for site in sites]
            else:
                eligible[weight] = sites
        return eligible

    def _node_reason(self, node: ir.Node) -> str:
        if self.options.excluded(node):
            return f"excluded by exclude={self.options.exclude}"
        if reason := self.skipped_by_plan(node):
            return reason
        if reason := _gemm_reason(node):
            return reason
        weight = node.inputs[1]
        if reason := constant_reason(weight):
            return reason
        shape = tuple(weight.const_value.shape)
        if len(shape) != 2:
            return f"weight '{weight.name}' is {len(shape)}-D {list(shape)}, only 2-D weights are factorised"
        size = shape[0] * shape[1]
        if size < self.options.min_elements:
            return f"weight '{weight.name}' has {size:,} elements, fewer than min_elements={self.options.min_elements:,}"
        return ""

    def _grams(self, model: ir.Model, groups: dict[ir.Value, list[_Site]]) -> dict:
        requests = {}
        for sites in groups.values():
            k = _used_shape(sites[0])[0]
            for site in sites:
                requests[site.x.name] = (site.x.name, _rows(k))
        return collect_grams(model, requests, self.context.calibration)

    # ------------------------------------------------------------------------ rewriting

    def _rewrite(self, model: ir.Model, weight: ir.Value, sites: list[_Site], p: Plan, names: Names) -> None:
        a, b = p.factors()
        dtype = weight.const_value.numpy().dtype
        trans_b = sites[0].trans_b
        base = weight.name or "weight"
        a_value = new_initializer(model, names.unique(f"{base}.lowrank_a"), a.astype(dtype))
        b_array = (b.T if trans_b else b).astype(dtype)
        b_value = new_initializer(model, names.unique(f"{base}.lowrank_b"), b_array)
        for site in sites:
            node = site.node
            label = node.name or node_label(node)
            first = ir.node("MatMul", [site.x, a_value], name=f"{label}/lowrank_a")
            if node.op_type == "Gemm":
                attributes = {key: attr for key, attr in node.attributes.items() if key in ("alpha", "beta")}
                attributes["transB"] = ir.AttrInt64("transB", 1 if trans_b else 0)
                inputs = [first.outputs[0], b_value]
                if len(node.inputs) > 2 and node.inputs[2] is not None:
                    inputs.append(node.inputs[2])
                second = ir.node("Gemm", inputs, attributes=attributes, name=node.name or None)
            else:
                second = ir.node("MatMul", [first.outputs[0], b_value], name=node.name or None)
            hidden = names.unique(f"{node.outputs[0].name or label}_lowrank")
            replace_node(node, first, second, hidden)
        drop_if_unused(weight)


def _is_gemm(node: ir.Node) -> bool:
    return node.op_type in ("Gemm", "MatMul") and node.domain == "" and len(node.inputs) >= 2


def _gemm_reason(node: ir.Node) -> str:
    if node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
        return "Gemm with transA=1 (its input is transposed) is not handled"
    return ""


def _used_matrix(site: _Site) -> np.ndarray:
    """W as the op multiplies by it: K×N."""
    w = site.weight.const_value.numpy()
    return w.T if site.trans_b else w


def _used_shape(site: _Site) -> tuple[int, int]:
    k, n = site.weight.const_value.shape
    return (n, k) if site.trans_b else (k, n)


def _rows(k: int):
    def rows(x: np.ndarray) -> np.ndarray:
        return x.reshape(-1, k)

    return rows
