"""cluster-weights: k-means weight sharing (Deep Compression), as shared values or as indices + codebook."""

from __future__ import annotations

import dataclasses
import re
from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxcompress.clustering import INITS, Clustered, Init, cluster_channels, cluster_values, codebook_metadata
from onnxcompress.errors import CalibrationError
from onnxcompress.gptq import assign_codebook_gptq, output_error, unit_layout
from onnxcompress.initializers import Names, drop_if_unused, new_initializer, replace_initializer, weight_refusal
from onnxcompress.metrics import format_db
from onnxcompress.options import PassOptions, option
from onnxcompress.pass_base import Candidate, CompressionPass, node_label
from onnxcompress.qdq_rounding import gram_reason, unit_grams
from onnxcompress.quantization import quantized_reason
from onnxcompress.registry import register

# The weight input of each op whose weights are clustered.
WEIGHT_INPUT = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1, "Gather": 0}
FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE)
MAX_INDEXED_CLUSTERS = 256  # uint8 indices


@dataclasses.dataclass(frozen=True)
class ClusterWeightsOptions(PassOptions):
    """Options of cluster-weights."""

    clusters: int = option(16, "shared values per weight tensor, exact zeros included (2 to 256; 16 is 4-bit indices)")
    init: Literal["linear", "kmeans++", "density"] = option(
        "linear", "centroid seeding: linear over [min, max] (keeps the rare large weights), kmeans++, or "
        "density (evenly spaced quantiles)")
    granularity: Literal["tensor", "channel"] = option(
        "tensor", "tensor: one codebook per weight; channel: one codebook shared by the output channels, "
        "each scaled by its root-mean-square (one more value per channel)")
    form: Literal["dense", "indexed"] = option(
        "dense", "dense: weights replaced by their shared values (same graph; pack codes the indices); "
        "indexed: uint8 indices + codebook + Gather that rebuilds the weight when onnxruntime loads it")
    assign: Literal["nearest", "gptq"] = option(
        "nearest", "nearest: each weight to its nearest shared value; gptq: row by row, each row's error "
        "moved onto the rows not yet assigned so that the layer's output on the calibration data moves least "
        "(MatMul, Gemm and 2-D Conv weights; needs calibration data)")
    damp: float = option(0.01, "assign=gptq: share of the mean diagonal of XᵀX added to it, in (0, 1]")
    gather: bool = option(True, "also cluster the tables of Gather nodes (embeddings)")
    min_elements: int = option(1024, "leave weights with fewer elements alone")
    exclude: str = option("", "regular expression: weights of nodes whose name matches are left alone")
    seed: int = option(0, "random seed of init=kmeans++")

    def __post_init__(self):
        if not 2 <= self.clusters <= MAX_INDEXED_CLUSTERS:
            self.fail("clusters", f"must lie in [2, {MAX_INDEXED_CLUSTERS}], got {self.clusters}")
        if self.init not in INITS:
            self.fail("init", f"must be one of {'|'.join(INITS)}, got '{self.init}'")
        if not 0.0 < self.damp <= 1.0:
            self.fail("damp", f"must lie in (0, 1], got {self.damp:g}")
        if self.min_elements < 0:
            self.fail("min_elements", f"must be at least 0, got {self.min_elements}")
        self.check_pattern("exclude")


@dataclasses.dataclass
class SharedWeight:
    """One float weight initializer and the nodes that read it as their weight."""

    value: ir.Value
    nodes: list[ir.Node]
    options: ClusterWeightsOptions | None = None  # those of its first reader

    @property
    def array(self) -> np.ndarray:
        return self.value.const_value.numpy()


@register
class ClusterWeights(CompressionPass):
    """Share a few values among each weight tensor's elements, by k-means (Deep Compression).

    The weight of each Conv, ConvTranspose, Gemm and MatMul (input 1) and, with
    ``gather=true``, the table of each Gather (input 0), when it is a float initializer of
    at least ``min_elements`` elements, is clustered on its own (one codebook per tensor)
    into ``clusters`` values by scikit-learn's k-means (:mod:`onnxcompress.clustering`).
    Exact zeros, as pruning leaves them, keep one codebook entry that is exactly 0.0, and
    no nonzero weight is mapped to it: a pruned model stays as sparse as it was.

    ``granularity=channel`` shares one codebook among the output channels of a weight
    (Conv axis 0, ConvTranspose 1, Gemm/MatMul the N axis, Gather the feature axis), each
    channel divided by its root-mean-square before the k-means and multiplied back after:
    small and large channels keep the same relative error, as per-channel quantization
    scales give, for one more value per channel (the 1-D table of a Gather: a scale per
    element). On ppocrv4_rec, whose BatchNorm-folded channels differ by orders of magnitude,
    64 values per tensor give exact match 0.00, 64 scaled-channel values 0.905 (FP32 0.970).
    The dense form records the codebook, scales and axis in the tensor's metadata
    (``onnxcompress.codebook*``) so that ``pack`` can code the indices.

    ``form=dense`` replaces the weight by its shared values: the graph is unchanged, the
    tensor has ``clusters`` distinct values, and ``onnxcompress pack`` stores it as indices
    into a codebook. ``form=indexed`` stores ``<weight>_indices`` (uint8, the weight's
    shape) and ``<weight>_codebook`` (float, [entries]) and feeds the readers from
    ``Gather(codebook, Cast(indices, int32))`` (times ``<weight>_scales`` for channels):
    the file holds one byte per weight instead of four, and onnxruntime folds the Gather
    into the dense weight when it builds its session, so it runs the same kernels as the
    original. Passes that fold constants undo it: put
    ``form=indexed`` last.

    ``assign=gptq`` keeps the codebook but picks each weight's entry as GPTQ rounds
    (:func:`onnxcompress.gptq.assign_codebook_gptq`): the rows of the weight (its inputs) one
    after another, each row's error moved onto the rows not yet assigned so that the layer's
    output on the calibration inputs moves least, from the Gram matrix of the layer's float
    inputs (a Conv's patches, per group) in one streamed run of the feeds. Zeros stay
    zeros. The report gives each layer's output error on the calibration data as a multiple of
    nearest assignment's. On mobilenet_v2 (128 scaled-channel values for the 1×1 convs, 32
    for the classifier, 256 per tensor for the rest; 5.3× smaller packed) top-1 agreement
    goes from 0.913 to 0.944, KL from 0.016 to 0.0056.
    GPTQ fits the calibration inputs: with fewer input rows than a layer has inputs it can
    do worse than the nearest values on other inputs. minilm_l6 with 16 values per tensor:
    cosine to FP32 0.905 from 32 sentences (about 1,000 tokens for 1536-input projections)
    against 0.936 for the nearest values; 0.958 from 128 sentences; from 32 sentences with
    ``damp=0.3``, 0.961 (accuracy 0.814, FP32's).
    A layer whose Gram matrix sums fewer input rows than it has inputs says so in its line.
    Weights of other ops, and weights read by several nodes, get the nearest entries, with
    the reason in their line.

    Exact limit: a weight whose nonzero elements take at most ``clusters`` distinct values
    (``clusters - 1`` when it has zeros) is reproduced bit for bit, by either assignment;
    ``form=dense`` then leaves it alone (``modified=False``) and says so.

    Refused, with the reason: a model already quantized (nothing is touched); weights
    that are not float initializers, are graph inputs or outputs, are also read as another
    input than the weight, are smaller than ``min_elements``, hold NaN or infinite values,
    or whose nodes match ``exclude``. Nodes inside If/Loop/Scan bodies are not visited.

    Per node (``@PATTERN{...}``): ``clusters``, ``init``, ``granularity`` and ``assign`` of the
    node's weight, or ``skip=true`` to leave it alone (refused, naming the pattern). A weight read by
    several nodes is one tensor: it follows its first reader in graph order, and is left alone
    when any reader is skipped.
    """

    name = "cluster-weights"
    Options = ClusterWeightsOptions
    per_node = ("clusters", "init", "granularity", "assign")
    prerequisites = ("lift-constants", "fold-batchnorm")
    lossless = False

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if self.left_alone_as_quantized(model):
            return ir.passes.PassResult(model, modified=False)
        names = Names(model)
        changed = elements = most = 0
        weights = self._eligible(model, record=True)
        by_gptq = [w for w in weights if w.options.assign == "gptq"]
        grams = self._grams(model, by_gptq) if by_gptq else {}
        for weight in weights:
            array = weight.array
            clustered = self._cluster(weight)
            assignment = ""
            if weight.options.assign == "gptq":
                clustered, assignment = _assign_gptq(weight, clustered, grams, self.options.damp)
            rebuilt = clustered.rebuild()
            if self.options.form == "dense" and np.array_equal(rebuilt, array):
                self._refuse_all(weight, f"already takes {len(clustered.codebook)} distinct values "
                                         f"(<= clusters={weight.options.clusters})")
                continue
            if self.options.form == "dense":
                metadata = {**weight.value.const_value.metadata_props, **codebook_metadata(clustered)}
                replace_initializer(weight.value, rebuilt, metadata)
            else:
                self._index(model, weight, clustered, names)
            detail = _detail(array, rebuilt, clustered, weight) + assignment
            for node in weight.nodes:
                self.rewrote(node, detail)
            changed += 1
            elements += array.size
            most = max(most, weight.options.clusters)
        if changed:
            self.note(f"clustered {changed} weight tensors ({elements:,} weights) into at most "
                      f"{most} shared values each, form={self.options.form}")
        return ir.passes.PassResult(model, modified=bool(changed))

    def candidates(self, model: ir.Model) -> list[Candidate]:
        if quantized_reason(model):
            return []
        out = []
        for w in self._eligible(model, record=False):
            bits = int(np.ceil(np.log2(w.options.clusters)))
            out.append(Candidate(self.name, node_label(w.nodes[0]), w.nodes[0].op_type,
                                 f"weight '{w.value.name}' {list(w.array.shape)}: {w.options.clusters} shared values, "
                                 f"{bits} bits per weight instead of {8 * w.array.itemsize}"))
        return out

    def _grams(self, model: ir.Model, weights: list[SharedWeight]) -> dict:
        """The Gram matrix of the inputs of each weight's one reader, for assign=gptq."""
        feeds = self.context.calibration
        if not feeds:
            raise CalibrationError("cluster-weights{assign=gptq} needs calibration data (--calib, or --random-calib N); "
                                   "without data, assign=nearest")
        grams = unit_grams(model, [w.nodes[0] for w in weights if len(w.nodes) == 1], feeds)
        self.note(f"GPTQ assignment of {len(grams)} weights against their inputs on {len(feeds)} feeds")
        return grams

    def _cluster(self, weight: SharedWeight) -> Clustered:
        options = weight.options
        init: Init = options.init  # type: ignore[assignment]
        if options.granularity == "channel":
            axis = _channel_axis(weight.nodes[0], weight.array.ndim)
            return cluster_channels(weight.array, axis, options.clusters, init, self.options.seed)
        return cluster_values(weight.array, options.clusters, init, self.options.seed)

    # ------------------------------------------------------------------ selection

    def _eligible(self, model: ir.Model, record: bool) -> list[SharedWeight]:
        """The weights this pass clusters; the others are refused (when ``record``)."""
        weights: dict[int, SharedWeight] = {}
        reasons: dict[int, str] = {}
        exclude = re.compile(self.options.exclude) if self.options.exclude else None
        for node in model.graph:
            index = WEIGHT_INPUT.get(node.op_type)
            if index is None or node.domain not in ("", "ai.onnx") or len(node.inputs) <= index:
                continue
            if node.op_type == "Gather" and not self.options.gather:
                continue
            value = node.inputs[index]
            if value is None or value.const_value is None or value.const_value.dtype not in FLOAT_TYPES:
                if record and node.op_type != "Gather":  # a Gather of indices or of an int table holds no weight
                    self.refused(node, _static_refusal(value))
                continue
            weight = weights.setdefault(id(value), SharedWeight(value, []))
            weight.nodes.append(node)
            reason = _static_refusal(value)
            if reason is None and exclude is not None and exclude.search(node.name or ""):
                reason = f"excluded by exclude={self.options.exclude}"
            if reason is None:
                reason = self.skipped_by_plan(node) or None
            if reason is not None:
                reasons.setdefault(id(value), reason)
        eligible = []
        for key, weight in weights.items():
            weight.options = self.node_options(weight.nodes[0]) or self.options
            size = weight.value.const_value.size
            reason = reasons.get(key)
            if reason is None and size < self.options.min_elements:
                reason = f"only {size} elements (< min_elements={self.options.min_elements})"
            if reason is None and not np.isfinite(weight.array).all():
                reason = f"weight '{weight.value.name}' holds NaN or infinite values"
            if reason is None:
                eligible.append(weight)
            elif record:
                self._refuse_all(weight, reason)
        return eligible

    def _refuse_all(self, weight: SharedWeight, reason: str) -> None:
        for node in weight.nodes:
            self.refused(node, reason)

    # ------------------------------------------------------------------ rewriting

    def _index(self, model: ir.Model, weight: SharedWeight, clustered: Clustered, names: Names) -> None:
        """Feed the weight's readers from Gather(codebook, Cast(indices)) instead."""
        old = weight.value
        base = old.name or "weight"
        codebook = new_initializer(model, names.unique(f"{base}_codebook"), clustered.codebook)
        indices = new_initializer(model, names.unique(f"{base}_indices"), clustered.indices.astype(np.uint8))
        cast = ir.node("Cast", [indices], {"to": ir.DataType.INT32}, name=names.unique(f"{base}_indices_cast"))
        gather = ir.node("Gather", [codebook, cast.outputs[0]], {"axis": 0}, name=names.unique(f"{base}_shared"))
        cast.outputs[0].name = names.unique(f"{base}_indices_int32")
        nodes = [cast, gather]
        rebuilt = gather.outputs[0]
        if clustered.scales is not None:
            scales = new_initializer(model, names.unique(f"{base}_scales"), clustered.broadcast_scales())
            nodes.append(ir.node("Mul", [rebuilt, scales], name=names.unique(f"{base}_scaled")))
            rebuilt.name = names.unique(f"{base}_unscaled")
            rebuilt = nodes[-1].outputs[0]
        rebuilt.name = names.unique(f"{base}_shared")
        rebuilt.type, rebuilt.shape = old.type, ir.Shape(clustered.indices.shape)
        model.graph.insert_before(model.graph.node(0), nodes)
        old.replace_all_uses_with(rebuilt)
        drop_if_unused(old)


def _static_refusal(value: ir.Value | None) -> str | None:
    """Why the weight input ``value`` cannot be clustered whatever the options, or None."""
    return weight_refusal(value, FLOAT_TYPES, lambda node, index: WEIGHT_INPUT.get(node.op_type) == index, "clustering")


def _channel_axis(node: ir.Node, rank: int) -> int:
    """The weight axis of the node's output channels (Gather: the table's last axis, features)."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        attr = node.attributes.get("transB")
        return 0 if attr is not None and attr.as_int() else rank - 1
    return rank - 1  # MatMul [..., K, N], Gather [V, D]


def _assign_gptq(weight: SharedWeight, clustered: Clustered, grams: dict, damp: float) -> tuple[Clustered, str]:
    """``clustered`` with its indices chosen by GPTQ, and what the report says of it."""
    node = weight.nodes[0]
    if len(weight.nodes) > 1:
        return clustered, f"; nearest values, not GPTQ: the weight is read by {len(weight.nodes)} nodes"
    if node not in grams:
        return clustered, f"; nearest values, not GPTQ: {gram_reason(node)}"
    gram, rows = grams[node]
    gram = gram if gram.ndim == 3 else gram[None]
    to_units, from_units = unit_layout(weight.array.shape, node.attributes.get_int("group", 1),
                                       node.op_type == "Gemm" and bool(node.attributes.get_int("transB", 0)))
    units = to_units(weight.array)
    groups, _, outputs = units.shape
    scales = np.ones((groups, outputs)) if clustered.scales is None else \
        clustered.scales.astype(np.float64).reshape(groups, outputs)
    indices = assign_codebook_gptq(units, gram, clustered.codebook, scales, damp)
    entries = clustered.codebook.astype(np.float64)
    nearest = output_error(units - entries[to_units(clustered.indices)] * scales[:, None, :], gram)
    chosen = output_error(units - entries[indices] * scales[:, None, :], gram)
    share = chosen / nearest if nearest > 0 else 1.0
    assigned = dataclasses.replace(clustered, indices=from_units(indices).astype(clustered.indices.dtype))
    text = f"; GPTQ assignment: output error on the calibration data {share:.3f}× that of nearest assignment"
    inputs = gram.shape[-1]
    if rows < inputs:
        text += (f" (from {rows} input rows for {inputs} inputs: fewer rows than inputs, the fit may not "
                 f"carry to other data; more calibration data or a larger damp, such as 0.3, helps)")
    return assigned, text


def _detail(array: np.ndarray, rebuilt: np.ndarray, clustered: Clustered, weight: SharedWeight) -> str:
    error = rebuilt.astype(np.float64) - array
    signal = float(np.square(array, dtype=np.float64).sum())
    noise = float(np.square(error).sum())
    sqnr = float("inf") if noise == 0 else 10 * np.log10(signal / noise) if signal > 0 else float("-inf")
    zeros = int(np.count_nonzero(array == 0))
    text = (f"{len(clustered.codebook)} shared values, {clustered.index_bits} bits per weight "
            f"(entropy {clustered.entropy_bits():.2f}), weight SQNR {format_db(sqnr)}")
    if clustered.scales is not None:
        text += f", {clustered.scales.size} channel scales along axis {clustered.axis}"
    if zeros:
        text += f", {zeros / array.size:.1%} zeros kept"
    if len(weight.nodes) > 1:
        text += f"; weight '{weight.value.name}' shared by {len(weight.nodes)} nodes, clustered once"
    return text
