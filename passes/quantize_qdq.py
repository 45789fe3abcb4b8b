"""quantize-qdq: calibrated int8 QuantizeLinear/DequantizeLinear placed where onnxruntime fuses it."""

from __future__ import annotations

import dataclasses
import logging
import re
from collections import Counter
from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxcompress.activations import stream
from onnxcompress.errors import CalibrationError, DriftBudgetError
from onnxcompress.executed import executed_kernels, float_reason, int8_kernel, saturating_u8s8
from onnxcompress.histogram import StreamingHistogram, calibrated_range
from onnxcompress.initializers import Names, drop_if_unused, new_initializer, take_over
from onnxcompress.metrics import DriftBudget, format_db, output_drift, worst
from onnxcompress.modelio import convert_opset
from onnxcompress.options import PassOptions, option
from onnxcompress.pass_base import Candidate, CompressionPass, node_label
from onnxcompress.qdq import (
    UNIT_OPS,
    WEIGHTED_OPS,
    Builder,
    Params,
    activation_inputs,
    final_bias_add,
    fused_activation,
    is_float_constant,
    weight_grid,
)
from onnxcompress.qdq_rounding import GptqRounding, gptq_reason
from onnxcompress.quantization import ACTIVATION_TYPES, quantized_reason
from onnxcompress.registry import register
from onnxcompress.runtime import make_session, run_all

logger = logging.getLogger(__name__)

MIN_OPSET = 13  # per-axis QuantizeLinear/DequantizeLinear


@dataclasses.dataclass(frozen=True)
class QuantizeQdqOptions(PassOptions):
    calibration: Literal["minmax", "percentile", "entropy", "mse"] = option(
        "minmax", "how activation ranges are read off the streamed histograms")
    percentile: float = option(99.99, "for calibration=percentile: the share of values (%) kept inside the range at each end")
    activations: Literal["uint8", "int8"] = option("uint8", "activation type, per tensor (uint8 is what onnxruntime's x86 kernels fuse)")
    weights: Literal["auto", "int8", "int7", "uint8"] = option(
        "auto", "weight grid: int8 [-127, 127]; int7 [-63, 63], exact in the u8s8 kernels of x86 CPUs without "
        "VNNI, which saturate sums of int8 products; uint8 centred on 128 (u8u8 kernels: exact, slower); "
        "auto: int7 on such a CPU (int8 for depthwise convs, whose kernel does not saturate), int8 elsewhere")
    per_channel: bool = option(True, "int8 weights with one scale per output channel (false: one per tensor)")
    rounding: Literal["nearest", "gptq"] = option(
        "nearest", "how weights meet their grid: each to its nearest code, or by GPTQ (each Conv/MatMul weight's "
        "rounding errors compensated row by row so its output on the calibration data moves least)")
    damp: float = option(0.01, "rounding=gptq: share of the mean diagonal of XᵀX added to it, in (0, 1]")
    tables: bool = option(True, "store constant Gather tables (embeddings) on the activation grid")
    matmul_only: Literal["static", "leave"] = option(
        "static", "a model without a constant-weight convolution (a transformer, an MLP): static (quantized "
        "like any other) or leave (left alone for a quantize-dynamic after this pass: dynamic activation "
        "ranges beat static ones there)")
    exclude: str = option("", "regular expression: nodes whose name matches stay float")
    exclude_ops: str = option("", "op types that stay float, separated by | (e.g. 'Add|Softmax')")
    fallback: str = option("", "drift budget (e.g. 'sqnr=25', 'top1=0.95,sqnr=20'): keep the fewest worst nodes in float until it holds")
    fallback_samples: int = option(16, "calibration feeds the fallback search measures drift on")
    bins: int = option(4096, "histogram bins per tensor (memory per tensor is fixed by this, not by the data)")

    def __post_init__(self):
        if not 50.0 < self.percentile <= 100.0:
            self.fail("percentile", f"must lie in (50, 100], got {self.percentile:g}")
        if self.bins < 64 or self.bins % 4:
            self.fail("bins", f"must be a multiple of 4, at least 64, got {self.bins}")
        if not 0.0 < self.damp <= 1.0:
            self.fail("damp", f"must lie in (0, 1], got {self.damp:g}")
        if self.fallback_samples < 1:
            self.fail("fallback_samples", f"must be at least 1, got {self.fallback_samples}")
        self.check_pattern("exclude")
        for op in self.excluded_ops():
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", op):
                self.fail("exclude_ops", f"holds '{op}', which is not an op type")
        if self.fallback:
            try:
                DriftBudget.parse(self.fallback)
            except DriftBudgetError as exc:
                self.fail("fallback", str(exc))

    def excluded_ops(self) -> list[str]:
        return [op.strip() for op in self.exclude_ops.split("|") if op.strip()]

    def budget(self) -> DriftBudget | None:
        return DriftBudget.parse(self.fallback) if self.fallback else None


@register
class QuantizeQdq(CompressionPass):
    """Insert QuantizeLinear/DequantizeLinear pairs so that onnxruntime runs int8 kernels.

    Units are Conv, ConvTranspose, MatMul (constant weight, or two activations as in
    attention), Gemm (rewritten first as the exactly equal MatMul + Add), Add, Mul, Concat,
    GlobalAveragePool, AveragePool, Sigmoid, LeakyRelu and Softmax, plus constant Gather tables.
    Weights are int8 symmetric (narrow range, per output channel by default), Conv biases
    int32 at input_scale·weight_scale, activations uint8 (or int8) per tensor with ranges
    calibrated on the feeds (streamed histograms: memory does not grow with the number of
    feeds; ``calibration=minmax|percentile|entropy|mse``). Placement follows onnxruntime's
    fusion rules (see :mod:`onnxcompress.qdq`): Relu/Clip folded only where the output's grid
    clamps the same way, data movement ops pass int8 through, graph outputs stay float (a last
    MatMul + bias Add, a classifier's head, runs as MatMulIntegerToFloat: int8 products, float
    logits; quantizing the logits cost mobilenet_v2 9 points of top-1 agreement).

    The pass then reads back the graph onnxruntime executes for the result and keeps in
    float, with the reason, every unit onnxruntime would still run in float (it has no int8
    HardSwish, for one, and decomposes it), repeating until nothing changes; the report
    says which int8 kernel each unit became. ``fallback=BUDGET`` measures the drift each
    unit causes when it alone is quantized (onnxruntime, ``fallback_samples`` feeds), and
    keeps the worst in float, the fewest that make the whole model meet the budget (binary
    search over how many, assuming that keeping more in float never hurts).

    ``rounding=gptq`` rounds each Conv and constant-weight MatMul weight onto the same grid by
    GPTQ (:mod:`onnxcompress.gptq`: row by row, each row's rounding error moved onto the rows
    not yet rounded, so the unit's output on the calibration inputs moves least), from the
    Gram matrix of the unit's float inputs (a Conv's patches), one streamed run of the feeds.
    ConvTranspose and Conv other than 2-D keep nearest rounding, with a note.

    Left alone, with a note: a model that is already quantized (QuantizeLinear, QLinearConv,
    DynamicQuantizeLinear, ConvInteger, MatMulNBits…); with ``matmul_only=leave``, a model
    without a Conv/ConvTranspose of constant weight (a transformer, an MLP), for a
    ``quantize-dynamic`` after this pass, as the ``int8`` preset does. Per-tensor static
    ranges must cover every input's activations at once, dynamic ones each input's own:
    minilm_l6 (all 970 texts, VNNI machine) reached cosine 0.82 to FP32 and accuracy 0.780
    with this pass (mse ranges, GPTQ), 0.993 and 0.814 (FP32's) with quantize-dynamic, at
    0.54 of FP32's latency against 0.70; the convolutional models (fmnist_cnn, mobilenet_v2,
    ppocrv4_rec, the last with attention blocks after its convolutions) are better static.
    Refused per node, with the reason: names matching ``exclude``, op types in
    ``exclude_ops``, a weight or bias that is not a constant float, a tensor the feeds never
    compute. Not candidates, only counted in a note:
    nodes on tensors that are not float32 (shape arithmetic). Nodes inside If/Loop/Scan bodies
    are not visited. An opset below 13 is converted to 13 first (onnx's version converter).
    Without calibration data, when there is anything to quantize: an error that points to
    quantize-dynamic.

    Exact limit: float values already on the chosen grids (weights on their int8 per-channel
    grid, activations on their uint8 grid, biases on the int32 grid) come out unchanged, up
    to float rounding in onnxruntime's integer kernels; with either rounding (GPTQ keeps the
    codes of a weight already on its grid).

    Per node (``@PATTERN{...}``): ``per_channel`` and ``weights`` (the weight grid of that
    unit), or ``skip=true`` to keep the node in float exactly as ``exclude`` does (refused,
    naming the pattern). Activation ranges, calibration and the fallback stay whole-model.
    """

    name = "quantize-qdq"
    Options = QuantizeQdqOptions
    per_node = ("per_channel", "weights")
    prerequisites = ("lift-constants", "fold-batchnorm")
    lossless = False

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if self.left_alone_as_quantized(model):
            return ir.passes.PassResult(model, modified=False)
        if self._leaves_for_dynamic(model):
            self.note("left alone (matmul_only=leave): no convolution with a constant weight; dynamic int8 "
                      "(quantize-dynamic) quantizes each MatMul's activations over their own range at run time")
            return ir.passes.PassResult(model, modified=False)
        feeds = self.context.calibration
        if not feeds:
            raise CalibrationError("quantize-qdq needs calibration data to set activation ranges (--calib, or --random-calib N)"
                                   "; without data, quantize-dynamic (preset int8-dynamic) quantizes weights only")
        modified = _ensure_opset(model, self)
        if self.options.weights == "auto" and saturating_u8s8():
            self.note("weights int7 (int8 for depthwise convs): on this x86 CPU without VNNI onnxruntime's u8s8 "
                      "kernels saturate sums of int8 products; weights=int8 for a VNNI target")
        candidates = self._select(model)
        if not candidates:
            self.note("nothing to quantize")
            return ir.passes.PassResult(model, modified=modified)
        # Units whose weight grid a per-node override chose (skipped nodes are no candidates).
        self._own = {n: o.options for n in candidates if (o := self.override_for(n)) is not None}
        if any(n.op_type == "Gemm" for n in candidates):
            candidates = self._gemms_as_matmuls(model, candidates)
            modified = True
        params = self._calibrate(model, candidates, feeds)
        items = self._calibrated(candidates, params)
        if not items:
            return ir.passes.PassResult(model, modified=modified)
        self._rounding = self._gptq(model, items, feeds) if self.options.rounding == "gptq" else None
        index = {node: i for i, node in enumerate(model.graph)}
        enabled, kernels = self._keep_what_runs_int8(model, items, params, index)
        budget = self.options.budget()
        fallback: dict[ir.Node, str] = {}
        if budget is not None and enabled:
            enabled, fallback, kernels = self._fall_back(model, enabled, params, index, budget, feeds)
        tables = {n for n in enabled if _is_table(n)}
        done = _build(model, enabled, params, self.options, index, in_place=True, own=self._own, rounding=self._rounding)
        self._report(enabled, tables, fallback, kernels, done)
        return ir.passes.PassResult(model, modified=modified or bool(enabled))

    def _leaves_for_dynamic(self, model: ir.Model) -> bool:
        """``matmul_only=leave`` and no Conv/ConvTranspose of the graph has a constant float weight."""
        return self.options.matmul_only == "leave" and not any(_is_weighted_conv(n) for n in model.graph)

    def candidates(self, model: ir.Model) -> list[Candidate]:
        """Nodes this pass would try to quantize (onnxruntime's check and fallback come later)."""
        if quantized_reason(model) or self._leaves_for_dynamic(model):
            return []
        saved, self.records = self.records, []
        try:
            nodes = self._select(model)
        finally:
            self.records = saved
        return [Candidate(self.name, node_label(n), n.op_type, "int8 (QDQ, calibrated)") for n in nodes]

    # ------------------------------------------------------------------ selection

    def _select(self, model: ir.Model) -> list[ir.Node]:
        excluded_ops = set(self.options.excluded_ops())
        pattern = re.compile(self.options.exclude) if self.options.exclude else None
        chosen = []
        for node in model.graph:
            if node.domain != "" or not (node.op_type in UNIT_OPS or node.op_type == "Gemm" or _is_table(node)):
                continue
            if node.op_type in excluded_ops:
                self.refused(node, f"op type {node.op_type} excluded by exclude_ops")
            elif pattern is not None and node.name and pattern.search(node.name):
                self.refused(node, f"excluded by exclude={self.options.exclude}")
            elif reason := self.skipped_by_plan(node):
                self.refused(node, reason)
            elif _is_table(node):
                if self.options.tables:
                    chosen.append(node)
            elif _folded_bias(node):
                continue  # becomes part of its MatMul's MatMulIntegerToFloat, reported there
            elif reason := _unit_reason(node):
                self.refused(node, reason)
            else:
                chosen.append(node)
        return chosen

    def _gemms_as_matmuls(self, model: ir.Model, candidates: list[ir.Node]) -> list[ir.Node]:
        """The candidates with each Gemm rewritten as MatMul + Add (which keep its per-node options)."""
        names = Names(model)
        out = []
        for node in candidates:
            if node.op_type != "Gemm":
                out.append(node)
                continue
            replacements = _gemm_as_matmul(model, node, names)
            if node in self._own:
                options = self._own.pop(node)
                self._own.update((m, options) for m in replacements)
            out += replacements
        return out

    def _calibrated(self, candidates: list[ir.Node], params: dict[str, Params]) -> list[ir.Node]:
        """The candidates whose tensors are all float32 and calibrated; arithmetic on other
        types (shape computations on int64) is not a candidate at all, only counted in a note."""
        items, integer = [], 0
        for node in candidates:
            if _is_table(node):
                items.append(node)
                continue
            missing = [n for n in _tensors(node) if n not in params]
            if not missing:
                items.append(node)
            elif missing[0] in self._not_float32:
                integer += 1
            else:
                self.refused(node, f"tensor '{missing[0]}' was never computed on the calibration feeds")
        if integer:
            self.note(f"{integer} nodes compute on tensors that are not float32 (shape arithmetic): not quantized")
        return items

    # ------------------------------------------------------------------ calibration

    def _calibrate(self, model: ir.Model, nodes: list[ir.Node], feeds: list[dict]) -> dict[str, Params]:
        names = list(dict.fromkeys(name for node in nodes if not _is_table(node) for name in _tensors(node)))
        histograms = {name: StreamingHistogram(self.options.bins) for name in names}
        floats = set(names)
        self._not_float32 = set()
        for values in stream(model, names, feeds):
            for name, array in values.items():
                if array.dtype != np.float32:
                    floats.discard(name)
                    self._not_float32.add(name)
                elif name in floats:
                    histograms[name].update(array)
        qtype = ACTIVATION_TYPES[self.options.activations]
        params = {}
        for name in names:
            if name in floats and histograms[name].total:
                lo, hi = calibrated_range(histograms[name], self.options.calibration, qtype, self.options.percentile)
                params[name] = Params.covering(lo, hi, qtype)
        self.note(f"calibrated {len(params)} activation tensors on {len(feeds)} feeds ({self.options.calibration}, "
                  f"{self.options.bins} bins each)")
        return params

    def _gptq(self, model: ir.Model, items: list[ir.Node], feeds: list[dict]) -> GptqRounding:
        weighted = [n for n in items if n.op_type in WEIGHTED_OPS and is_float_constant(n.inputs[1])]
        for node in weighted:
            if reason := gptq_reason(node):
                self.note(f"{node_label(node)}: weight rounded to nearest, not by GPTQ: {reason}")
        rounding = GptqRounding(model, weighted, feeds, self.options.damp)
        self.note(f"GPTQ rounding of {len(rounding.grams)} weights against their inputs on {rounding.feeds} feeds")
        return rounding

    # ------------------------------------------------------------------ what onnxruntime runs

    def _keep_what_runs_int8(self, model, items, params, index, rounds: int = 3):
        enabled = list(items)
        kernels: dict[str, tuple[str, str]] = {}
        for _ in range(rounds):
            candidate = _build(model, enabled, params, self.options, index, own=self._own, rounding=self._rounding)
            kernels = executed_kernels(candidate.model)
            floats = [n for n in enabled if not _is_table(n) and int8_kernel(kernels, candidate.names[n]) is None]
            if not floats:
                return enabled, kernels
            for node in floats:
                self.refused(node, float_reason(kernels, candidate.names[node]))
            enabled = [n for n in enabled if n not in floats]
        return enabled, kernels

    # ------------------------------------------------------------------ fallback

    def _fall_back(self, model, enabled, params, index, budget: DriftBudget, feeds):
        probe_feeds = feeds[: self.options.fallback_samples]
        reference = run_all(make_session(model), probe_feeds)

        def drift(nodes) -> tuple:
            built = _build(model, nodes, params, self.options, index, own=self._own, rounding=self._rounding)
            return worst(output_drift(reference, run_all(make_session(built.model), probe_feeds))), built

        alone = {node: drift([node])[0] for node in enabled}
        ranked = sorted(enabled, key=lambda n: alone[n].sqnr_db)
        measured: dict[int, tuple] = {}  # k → (drift, built model) with the k worst kept in float

        def keeping_float(k: int) -> tuple:
            if k not in measured:
                measured[k] = drift(ranked[k:])
            return measured[k]

        whole = keeping_float(0)[0]
        lo, hi = 0, len(ranked)  # keeping the hi worst in float meets the budget
        if not budget.violations(whole):
            hi = 0
        while lo < hi:
            mid = (lo + hi) // 2
            if mid and not budget.violations(keeping_float(mid)[0]):
                hi = mid
            else:
                lo = mid + 1
        kept = ranked[hi:]
        fallback = {n: f"kept in float by fallback={self.options.fallback}: quantized alone it drifts to "
                    f"{format_db(alone[n].sqnr_db)}" for n in ranked[:hi]}
        final, built = keeping_float(hi) if kept else (None, None)
        self.note(f"fallback: {hi} of {len(ranked)} nodes kept in float to meet {budget} "
                  f"(all quantized: {format_db(whole.sqnr_db)}"
                  + (f", result: {format_db(final.sqnr_db)})" if final else ")"))
        kernels = executed_kernels(built.model) if kept else {}
        return kept, fallback, kernels

    # ------------------------------------------------------------------ report

    def _report(self, enabled, tables, fallback, kernels, done):
        for node, reason in fallback.items():
            self.refused(node, reason)
        counts = Counter()
        for node in enabled:
            label = node.name or node_label(node)
            kernel = "Gather on the quantized table" if node in tables else int8_kernel(kernels, node.name) or "int8"
            counts[kernel] += 1
            self.rewrote(node, f"{kernel}: {done.get(label, '')}")
        if counts:
            listed = ", ".join(f"{c} {k}" for k, c in counts.most_common())
            self.note(f"onnxruntime runs {listed}")


# ---------------------------------------------------------------------- helpers


def _is_table(node: ir.Node) -> bool:
    return (node.op_type == "Gather" and node.domain == "" and is_float_constant(node.inputs[0])
            and node.inputs[1] is not None and node.inputs[1].const_value is None)


def _is_weighted_conv(node: ir.Node) -> bool:
    return node.op_type in ("Conv", "ConvTranspose") and node.domain == "" and is_float_constant(node.inputs[1])


def _folded_bias(node: ir.Node) -> bool:
    """An Add that a constant-weight MatMul's MatMulIntegerToFloat will take as its bias."""
    producer = next((v.producer() for v in node.inputs if v is not None and v.producer() is not None), None)
    return node.op_type == "Add" and producer is not None and final_bias_add(producer, set()) is node


def _unit_reason(node: ir.Node) -> str:
    if node.graph is None:
        return "inside a subgraph"
    op = node.op_type
    if op == "Gemm":
        if node.attributes.get_int("transA", 0):
            return "Gemm with transA=1 is not handled"
        if not is_float_constant(node.inputs[1]) or node.inputs[1].const_value.numpy().ndim != 2:
            return "Gemm whose weight is not a constant float 2-D tensor"
        c = node.inputs[2] if len(node.inputs) > 2 else None
        if c is not None and not is_float_constant(c):
            return "Gemm whose bias is not a constant float"
        return ""
    if op in ("Conv", "ConvTranspose"):
        if not is_float_constant(node.inputs[1]):
            return f"weight '{node.inputs[1].name}' is not a constant float tensor"
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if bias is not None and not is_float_constant(bias):
            return f"bias '{bias.name}' is not a constant float tensor"
    if op == "MatMul" and node.inputs[0].const_value is not None:
        return "MatMul whose first input is a constant is not handled"
    if op in ("Add", "Mul", "Concat") and not activation_inputs(node):
        return "all inputs are constants (fold-constants removes it)"
    if not node.outputs or node.outputs[0] is None:
        return "no output"
    if op != "MatMul" and node.outputs[0].is_graph_output():
        return ("its output is a graph output, which stays float: onnxruntime runs it in int8 only "
                "with a QuantizeLinear after it")
    return ""


def _tensors(node: ir.Node) -> list[str]:
    names = [node.inputs[i].name for i in activation_inputs(node)]
    names.append(node.outputs[0].name)
    act = fused_activation(node)
    if act is not None:
        names.append(act.outputs[0].name)
    return names


def _ensure_opset(model: ir.Model, pass_: QuantizeQdq) -> bool:
    """Bring an opset below 13 up to 13 with onnx's version converter (in place)."""
    version = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    if version is None or version >= MIN_OPSET:
        return False
    why = f"quantize-qdq needs opset {MIN_OPSET} and the model has {version}"
    converted = ir.from_proto(convert_opset(ir.to_proto(model), MIN_OPSET, why))
    model.graph = converted.graph  # the opset imports live on the graph
    pass_.note(f"converted from opset {version} to {MIN_OPSET} (per-channel QuantizeLinear needs it)")
    return True


def _gemm_as_matmul(model: ir.Model, gemm: ir.Node, names: Names) -> list[ir.Node]:
    """Gemm(x, B, C) → Add(MatMul(x, alpha·op(B)), beta·C), equal in float: onnxruntime has
    QDQ fusions for MatMul and Add, none for Gemm. Returns the new MatMul (named as the Gemm
    was) and the bias Add."""
    w = gemm.inputs[1].const_value.numpy().astype(np.float32)
    if gemm.attributes.get_int("transB", 0):
        w = w.T
    w = np.ascontiguousarray(np.float32(gemm.attributes.get_float("alpha", 1.0)) * w, dtype=np.float32)
    label = gemm.name or node_label(gemm)
    weight = new_initializer(model, names.unique(f"{gemm.inputs[1].name}_matmul"), w)
    matmul = ir.node("MatMul", [gemm.inputs[0], weight], name=gemm.name or names.unique("Gemm_MatMul"))
    matmul.outputs[0].name = names.unique(f"{gemm.outputs[0].name}_matmul")
    nodes = [matmul]
    out = matmul.outputs[0]
    c = gemm.inputs[2] if len(gemm.inputs) > 2 else None
    if c is not None:
        bias = (np.float32(gemm.attributes.get_float("beta", 1.0)) * c.const_value.numpy()).astype(np.float32)
        bias_value = new_initializer(model, names.unique(f"{c.name}_bias"), bias)
        add = ir.node("Add", [out, bias_value], name=names.unique(f"{label}_bias"))
        nodes.append(add)
        out = add.outputs[0]
    gemm.graph.insert_before(gemm, nodes)
    if gemm.outputs[0].is_graph_output():
        nodes = nodes[:1]  # the bias Add folds into MatMulIntegerToFloat: not a unit of its own
    take_over(gemm.outputs[0], out)
    old = [v for v in gemm.inputs[1:] if v is not None]
    gemm.graph.remove(gemm, safe=True)
    for value in old:
        drop_if_unused(value)
    return nodes


@dataclasses.dataclass
class _Built:
    model: ir.Model
    names: dict[ir.Node, str]  # original node → its name in the built model


def _build(model: ir.Model, enabled: list[ir.Node], params, options: QuantizeQdqOptions, index,
           in_place: bool = False, own: dict[ir.Node, QuantizeQdqOptions] | None = None,
           rounding: GptqRounding | None = None):
    """The model with ``enabled`` quantized: rewritten in place, or a clone (``in_place=False``).
    ``own`` holds the options of the units a per-node override chose; the others take ``options``.
    ``rounding`` (keyed by the nodes of ``model``) rounds the weights it has Gram matrices for."""
    target = model if in_place else model.clone()
    nodes = list(target.graph) if not in_place else None
    mapped = {node: (node if in_place else nodes[index[node]]) for node in enabled}
    chosen = {mapped[node]: (own or {}).get(node, options) for node in enabled}
    grids = {choice: weight_grid(choice) for choice in {o.weights for o in chosen.values()}}
    original = {target_node: node for node, target_node in mapped.items()}

    def codes(node, *grid):
        return rounding.codes(original[node], *grid) if rounding is not None else None

    builder = Builder(target, params, ACTIVATION_TYPES[options.activations],
                      lambda node: chosen[node].per_channel, lambda node: grids[chosen[node].weights](node), codes)
    units = [mapped[n] for n in enabled if not _is_table(n)]
    tables = [mapped[n] for n in enabled if _is_table(n)]
    done = builder.apply(units, tables)
    if in_place:
        return done
    return _Built(target, {node: mapped[node].name for node in enabled})
