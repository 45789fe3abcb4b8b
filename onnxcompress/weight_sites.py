"""Constant-weight MatMul/Gemm sites shared by the weight-only quantization passes
(quantize-dynamic, quantize-weights-int4): which nodes qualify, the bias Add or Gemm C each
can fold, and replacing a site by one com.microsoft node."""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import numpy as np
import onnx_ir as ir

from onnxcompress.factorize import constant_reason
from onnxcompress.initializers import take_over
from onnxcompress.options import PassOptions
from onnxcompress.pass_base import node_label

MS_DOMAIN = "com.microsoft"
FLOAT = ir.DataType.FLOAT
FLOAT_BYTES = 4


def check_selection(options: PassOptions) -> None:
    """Validate the ``min_elements`` and ``exclude`` options every weight-only pass has."""
    if options.min_elements < 0:
        options.fail("min_elements", f"must be 0 or more, got {options.min_elements}")
    options.check_pattern("exclude")


def excluded(options: PassOptions, node: ir.Node) -> bool:
    return bool(options.exclude) and re.search(options.exclude, node.name or "") is not None


# ---------------------------------------------------------------------------- weight selection


@dataclasses.dataclass
class WeightSite:
    """A MatMul or Gemm (``transA=0``, ``alpha=1``) with a constant 2-D float32 weight, and the
    bias that its replacement can take over: Gemm's ``C``, or the constant of the ``Add`` that
    alone reads the MatMul's output (``bias_add``)."""

    node: ir.Node
    weight: ir.Value
    trans_b: bool
    bias: ir.Value | None = None
    bias_add: ir.Node | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """K×N, the weight as the op multiplies by it."""
        rows, cols = self.weight.const_value.shape
        return (cols, rows) if self.trans_b else (rows, cols)

    def matrix(self) -> np.ndarray:
        w = self.weight.const_value.numpy()
        return w.T if self.trans_b else w

    def bias_text(self) -> str:
        if self.bias_add is not None:
            return f"; bias Add '{node_label(self.bias_add)}' folded"
        return "; Gemm C as bias" if self.bias is not None else ""


Refuse = Callable[[ir.Node, str], None]
# The refusal text of a node a per-node plan leaves alone, '' for the others.
Skipped = Callable[[ir.Node], str]


def _nothing_skipped(node: ir.Node) -> str:
    return ""


class Outcomes:
    """What a pass did to each node, collected while it works weight by weight and reported
    in graph order (the order the report reads best in)."""

    def __init__(self, model: ir.Model):
        self._order = {node: i for i, node in enumerate(model.graph)}
        self._items: list[tuple[ir.Node, bool, str]] = []

    def refuse(self, node: ir.Node, reason: str) -> None:
        self._items.append((node, False, reason))

    def add(self, nodes, rewritten: bool, detail: str | Callable[[ir.Node], str]) -> None:
        for node in nodes:
            self._items.append((node, rewritten, detail(node) if callable(detail) else detail))

    def report(self, pass_) -> None:
        for node, rewritten, detail in sorted(self._items, key=lambda item: self._order[item[0]]):
            (pass_.rewrote if rewritten else pass_.refused)(node, detail)


def weight_sites(model: ir.Model, options: PassOptions, refuse: Refuse,
                 skipped: Skipped = _nothing_skipped) -> dict[ir.Value, list[WeightSite]]:
    """Eligible MatMul/Gemm nodes of the main graph grouped by weight; ``refuse(node, reason)``
    hears about every other MatMul/Gemm (including every reader of a weight that some node
    reads in a way the rewrite cannot follow, or that ``skipped`` leaves alone)."""
    groups: dict[ir.Value, list[WeightSite]] = {}
    for node in model.graph:
        if not _is_gemm(node):
            continue
        site = _site(node, options, skipped)
        if isinstance(site, str):
            refuse(node, site)
        else:
            groups.setdefault(site.weight, []).append(site)
    eligible = {}
    for weight, sites in groups.items():
        reason = _shared_reason(weight, sites)
        if reason:
            for site in sites:
                refuse(site.node, reason)
        else:
            eligible[weight] = sites
    return eligible


def _is_gemm(node: ir.Node) -> bool:
    return node.op_type in ("MatMul", "Gemm") and node.domain == "" and len(node.inputs) >= 2


def _site(node: ir.Node, options: PassOptions, skipped: Skipped) -> WeightSite | str:
    if excluded(options, node):
        return f"excluded by exclude={options.exclude}"
    if reason := skipped(node):
        return reason
    is_gemm = node.op_type == "Gemm"
    if is_gemm and node.attributes.get_int("transA", 0):
        return "Gemm with transA=1 (its input is transposed) is not handled"
    if is_gemm and node.attributes.get_float("alpha", 1.0) != 1.0:
        return f"Gemm with alpha={node.attributes.get_float('alpha', 1.0):g} (only alpha=1 is handled)"
    weight = node.inputs[1]
    if reason := constant_reason(weight):
        return reason
    tensor = weight.const_value
    if tensor.dtype != FLOAT:
        return f"weight '{weight.name}' is {tensor.dtype.name}; only FLOAT (float32) weights are quantized"
    if len(tensor.shape) != 2:
        return f"weight '{weight.name}' is {len(tensor.shape)}-D {list(tensor.shape)}, only 2-D weights are quantized"
    if node.inputs[0] is weight:
        return f"the {node.op_type} reads its weight as both inputs"
    size = tensor.shape[0] * tensor.shape[1]
    if size < options.min_elements:
        return f"weight '{weight.name}' has {size:,} elements, fewer than min_elements={options.min_elements:,}"
    trans_b = is_gemm and bool(node.attributes.get_int("transB", 0))
    site = WeightSite(node, weight, trans_b)
    if is_gemm:
        if reason := _gemm_bias(site):
            return reason
    else:
        site.bias_add, site.bias = _bias_add(node, site.shape[1])
    return site


def _gemm_bias(site: WeightSite) -> str:
    """Take Gemm's C as the bias; the reason when it is not a constant [N] at beta=1."""
    node = site.node
    c = node.inputs[2] if len(node.inputs) > 2 else None
    if c is None:
        return ""
    if reason := constant_reason(c, "Gemm C"):
        return reason
    n = site.shape[1]
    if c.const_value.dtype != FLOAT or tuple(c.const_value.shape) != (n,):
        kind = f"{c.const_value.dtype.name} {list(c.const_value.shape)}"
        return f"Gemm C '{c.name}' is {kind}; only a FLOAT [N]=[{n}] bias is handled"
    beta = node.attributes.get_float("beta", 1.0)
    if beta != 1.0:
        return f"Gemm with beta={beta:g} and a C input (only beta=1 is handled)"
    site.bias = c
    return ""


def _bias_add(matmul: ir.Node, n: int) -> tuple[ir.Node | None, ir.Value | None]:
    """The Add that alone reads the MatMul's output with a constant FLOAT [N] on its other side."""
    out = matmul.outputs[0]
    uses = list(out.uses())
    if out.is_graph_output() or len(uses) != 1:
        return None, None
    add = uses[0].node
    if add.op_type != "Add" or add.domain != "" or add.graph is not matmul.graph or len(add.inputs) != 2:
        return None, None
    other = add.inputs[1 - uses[0].idx]
    if other is out or constant_reason(other, "bias"):
        return None, None
    tensor = other.const_value
    if tensor.dtype != FLOAT or tuple(tensor.shape) != (n,):
        return None, None
    return add, other


def _shared_reason(weight: ir.Value, sites: list[WeightSite]) -> str:
    readers = {(id(site.node), 1) for site in sites}
    for use in weight.uses():
        if (id(use.node), use.idx) not in readers:
            return (f"weight '{weight.name}' is also read by '{node_label(use.node)}' "
                    f"({use.node.op_type}), which is not quantized with it")
    if len({site.trans_b for site in sites}) > 1:
        return f"weight '{weight.name}' is read both transposed (Gemm transB=1) and not"
    return ""


def replace_with(site: WeightSite, new: ir.Node) -> None:
    """Put ``new`` where the site's node was; its output takes over the result (the bias Add's
    output when the Add is folded) with its name, type, shape and uses."""
    graph = site.node.graph
    result = site.bias_add.outputs[0] if site.bias_add is not None else site.node.outputs[0]
    graph.insert_before(site.node, new)
    take_over(result, new.outputs[0])
    for old in (site.bias_add, site.node):
        if old is not None:
            graph.remove(old, safe=True)


def use_microsoft_domain(model: ir.Model) -> None:
    model.opset_imports.setdefault(MS_DOMAIN, 1)


def size_text(before: int, after: int, elements: int) -> str:
    return f"{before:,} → {after:,} bytes ({8 * after / elements:.2f} bits per weight)"


def shrink_reason(what: str, before: int, after: int) -> str:
    if after >= before:
        return f"would not shrink: {what} takes {after:,} bytes quantized, {before:,} as float"
    return ""


# ---------------------------------------------------------------------------- the pass


