"""Sensitivity analysis: the drift and the saving of each knob when only that node changes.

A probe runs the knob's one-node pipeline (:func:`onnxcompress.knobs.probe_pipeline`) on the
normalised model, the passes calibrating on the *fit* feeds, and measures with onnxruntime on
the held-out *check* feeds the outputs' drift against the normalised model's. Its *damage* is the relative noise power of the worst output,
``Σ(y − y')² / Σy²`` = 10^(−SQNR/10): noise powers of independent changes add, which is what
the search relies on. The *saving* is what the objective gains: constant bytes (``size``),
MACs (``macs``), or MACs weighted by the measured int8 speed-up plus the int8 conversions
onnxruntime cannot fold (``latency``, an estimate: probes are too short to time on a shared
CPU; see :class:`Objective`).

Probes only run the part of the graph after the changed nodes: the reference model's
activations are computed once, and a probe's model is cut where its tensors are still the
reference's (same name, same producing computation), so onnxruntime runs only what changed
and what follows it. The passes' own calibration (quantization ranges, reconstruction
targets) is served from the same cache (:func:`onnxcompress.activations.reusing`).

``jobs > 1`` runs probes in that many worker processes (spawned: each loads the model once);
each worker's onnxruntime sessions then use ``cpu_count // jobs`` threads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import multiprocessing
import os
import time
from typing import Callable, Iterable

import numpy as np
import onnx_ir as ir

from onnxcompress.activations import reusing
from onnxcompress.analysis.cost import compute_cost, input_symbols
from onnxcompress.knobs import Knob, probe_pipeline
from onnxcompress.manager import PassManager
from onnxcompress.metrics import Drift, output_drift, worst
from onnxcompress.modelio import initializer_bytes
from onnxcompress.partial_run import CachedRunner
from onnxcompress.pipeline import Pipeline

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class ProbeResult:
    knob: Knob
    status: str  # "rewritten", "refused" or "failed"
    reason: str = ""
    damage: float = 0.0
    drift: Drift | None = None
    saving: float = 0.0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {
            "node": self.knob.node, "op_type": self.knob.op_type, "knob": self.knob.label,
            "family": self.knob.family.name, "status": self.status, "reason": self.reason,
            "damage": self.damage, "saving": self.saving, "seconds": round(self.seconds, 3),
            "drift": self.drift.to_dict() if self.drift else None,
        }


def damage_of(drift: Drift) -> float:
    """Relative noise power of the worst output: 10^(−SQNR/10) (0 when exact)."""
    if math.isinf(drift.sqnr_db):
        return 0.0 if drift.sqnr_db > 0 else math.inf
    return 10.0 ** (-drift.sqnr_db / 10.0)


class Objective:
    """What the tuner minimises, measured on one model: ``size``, ``macs`` or ``latency``.

    ``latency`` is an estimate in float-MAC equivalents: a MAC costs 1, or MAC_COSTS of the
    kernel onnxruntime runs the node with (:func:`kernel_kind`), and every QuantizeLinear or
    DequantizeLinear that onnxruntime cannot fold into an int8 kernel (at a border between
    float and int8 nodes) costs CONVERSION_COST per element it converts. Inside a run of int8
    nodes the conversions fold away, so an int8 node pays only where it meets float ones. The
    constants are fitted to onnxruntime's latency (batch 1, 2 threads) of int8 regions of
    mobilenet_v2 and weight-only regions of minilm_l6 (``bench/latency_model.py``, README).
    Ops without MACs cost nothing here: the estimate ranks plans of one model, and its ratios
    overstate the gain on a model whose time is not mostly MACs (minilm_l6 at 17 tokens spends
    about as long outside its MatMuls as in them).
    """

    MAC_COSTS = {
        "int8": 0.6,
        "depthwise int8": 1.1,  # onnxruntime's int8 depthwise kernel is no faster than its float one
        "dynamic int8": 0.1,  # int8 weights: onnxruntime's u8s8 kernel, with the bias Add folded in
        "dynamic uint8": 0.8,  # uint8 weights (quantize-dynamic{storage=uint8}): its slower u8u8 kernel
        "int4": 0.8,  # MatMulNBits, at batch 1
    }
    CONVERSION_COST = 35.0  # a conversion also breaks onnxruntime's blocked float layout around it

    def __init__(self, kind: str, input_shapes: dict | None = None):
        if kind not in ("size", "macs", "latency"):
            raise ValueError(f"objective must be size, macs or latency, not {kind!r}")
        self.kind = kind
        self.input_shapes = input_shapes

    def __call__(self, model: ir.Model) -> float:
        if self.kind == "size":
            return float(initializer_bytes(model))  # as stored: int8 one byte, int4 half
        if self.kind == "macs":
            return float(compute_cost(model, input_shapes=self.input_shapes).macs)
        terms = latency_terms(model, self.input_shapes)
        saved = sum((1.0 - self.MAC_COSTS[kind]) * macs for kind, macs in terms.kernel_macs.items())
        return float(terms.macs - saved + self.CONVERSION_COST * terms.converted)


@dataclasses.dataclass(frozen=True)
class LatencyTerms:
    macs: int  # all of them
    kernel_macs: dict[str, int]  # the MACs of the nodes of each kernel_kind (float ones left out)
    converted: int  # elements of the unfolded conversions


def latency_terms(model: ir.Model, input_shapes: dict | None = None) -> LatencyTerms:
    """What the latency estimate weighs, for inputs of the shapes ``input_shapes`` gives."""
    cost = compute_cost(model, input_shapes=input_shapes)
    outputs = set(model.graph.outputs)
    kinds = {n.name: kernel_kind(n, outputs) for n in model.graph}
    kernel_macs = {kind: 0 for kind in Objective.MAC_COSTS}
    for c in cost.nodes:
        if kinds.get(c.node) is not None:
            kernel_macs[kinds[c.node]] += c.macs
    symbols = input_symbols(model, input_shapes=input_shapes)  # as the MACs count them
    return LatencyTerms(cost.macs, kernel_macs, sum(_elements(value, symbols) for value in unfolded_conversions(model)))


def kernel_kind(node: ir.Node, outputs: set) -> str | None:
    """The kind of low-precision kernel onnxruntime runs the node with (a key of
    Objective.MAC_COSTS), or None for a float one: ``int8`` (``depthwise int8``) for a node
    that reads a dequantized weight and runs on int8 values, ``dynamic int8`` (``dynamic
    uint8``) for DynamicQuantizeMatMul and MatMulIntegerToFloat with int8 (uint8) weights,
    ``int4`` for MatMulNBits."""
    if node.op_type in ("DynamicQuantizeMatMul", "MatMulIntegerToFloat"):
        weight = node.inputs[1]
        return "dynamic uint8" if weight is not None and weight.dtype == ir.DataType.UINT8 else "dynamic int8"
    if node.op_type == "MatMulNBits":
        return "int4"
    if _reads_dequantized_weight(node) and _runs_int8(node, outputs):
        return "depthwise int8" if _depthwise(node) else "int8"
    return None


def _depthwise(node: ir.Node) -> bool:
    """A grouped Conv (its weight is a DequantizeLinear output here, so its shape is not read)."""
    return node.op_type == "Conv" and node.attributes.get_int("group", 1) > 1


def _reads_dequantized_weight(node: ir.Node) -> bool:
    if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.inputs) < 2 or node.inputs[1] is None:
        return False
    producer = node.inputs[1].producer()
    return producer is not None and producer.op_type == "DequantizeLinear"


def unfolded_conversions(model: ir.Model) -> list[ir.Value]:
    """The activations converted by a QuantizeLinear whose producer is not an int8 node, or
    by a DequantizeLinear read by a float node (or a graph output): the conversions
    onnxruntime runs on their own instead of folding them into an int8 kernel. Weights
    (a DequantizeLinear of a constant) are folded when the session is built: not counted."""
    outputs = set(model.graph.outputs)
    found = []
    for node in model.graph:
        if node.op_type == "QuantizeLinear" and not _is_constant(node.inputs[0]):
            producer = node.inputs[0].producer()
            if producer is None or not _runs_int8(producer, outputs):
                found.append(node.inputs[0])
        elif node.op_type == "DequantizeLinear" and not _is_constant(node.inputs[0]):
            value = node.outputs[0]
            if value in outputs or not all(_runs_int8(c, outputs) for c in value.consumers()):
                found.append(value)
    return found


def _runs_int8(node: ir.Node, outputs: set) -> bool:
    """Whether onnxruntime runs the node on int8 values: every input that is not a constant
    is dequantized, and every output is only quantized."""
    if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
        return False
    for value in node.inputs:
        if value is None or _is_constant(value):
            continue
        producer = value.producer()
        if producer is None or producer.op_type != "DequantizeLinear":
            return False
    return all(value not in outputs and value.consumers()
               and all(c.op_type == "QuantizeLinear" for c in value.consumers()) for value in node.outputs)


def _is_constant(value: ir.Value | None) -> bool:
    if value is None or value.const_value is not None:
        return True
    producer = value.producer()
    return producer is not None and (producer.op_type == "Constant" or
                                     (producer.op_type == "DequantizeLinear" and _is_constant(producer.inputs[0])))


def _elements(value: ir.Value, symbols: dict[str, int]) -> int:
    """Elements of an activation by its shape (0 when a dim is unknown)."""
    if value.shape is None:
        return 0
    count = 1
    for dim in value.shape:
        size = dim if isinstance(dim, int) else symbols.get(getattr(dim, "value", None))
        if size is None:
            logger.debug("conversion of '%s' not counted: dim %s unknown", value.name, dim)
            return 0
        count *= size
    return count


class Prober:
    """Runs probes on one normalised model. The passes calibrate on ``feeds``; the drift is
    measured on ``check_feeds`` (held out: a pass that fits its feeds, as reconstruction does,
    would look exact on them)."""

    def __init__(self, model: ir.Model, feeds: list[dict], check_feeds: list[dict], objective: Objective, threads: int = 2):
        self.model = model
        self.feeds = feeds
        self.check_feeds = check_feeds
        self.objective = objective
        self.runner = CachedRunner(model, feeds, threads)
        self.checker = CachedRunner(model, check_feeds, threads, self.runner.signatures)
        self.reference = self.checker.reference
        self.base_objective = objective(model)

    def probe(self, knob: Knob) -> ProbeResult:
        start = time.perf_counter()
        try:
            result = self._probe(knob)
        except Exception as exc:  # a knob that breaks a pass is a finding, not a crash of the tuner
            logger.debug("probe %s on %s failed", knob.label, knob.node, exc_info=True)
            result = ProbeResult(knob, "failed", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        result.seconds = time.perf_counter() - start
        return result

    def _probe(self, knob: Knob) -> ProbeResult:
        with reusing(self.runner):
            model, records = run_pipeline(self.model, probe_pipeline(knob), self.feeds, knob.family.pass_name)
        mine = [r for r in records if r.node == knob.node]
        if not any(r.action == "rewritten" for r in mine):
            reason = next((r.detail for r in mine if r.action == "refused"), "the pass did not rewrite it")
            return ProbeResult(knob, "refused", reason)
        saving = self.base_objective - self.objective(model)  # before the run cuts the model
        drift = worst(output_drift(self.reference, self.checker.run(model)))
        return ProbeResult(knob, "rewritten", "", damage_of(drift), drift, saving)


def run_pipeline(model: ir.Model, text: str, feeds, pass_name: str | None = None):
    """Run pipeline ``text`` on a copy of ``model`` with no instruments; the model and the
    node records of the entry named ``pass_name``."""
    out, report = PassManager(Pipeline.parse(text), (), feeds).run(model.clone())
    records = [r for p in report.passes if p.name == pass_name for r in p.records] if pass_name else []
    return out, records


# ------------------------------------------------------------------------------- parallel probes

_WORKER: Prober | None = None
_WORKER_ERROR: str = ""


def _init_worker(model_bytes: bytes, feeds, check_feeds, objective: Objective, threads: int) -> None:
    # An initializer that raises makes the pool start a new worker, forever: keep the error
    # and report it from the first task instead.
    global _WORKER, _WORKER_ERROR
    try:
        import onnx

        from onnxcompress.modelio import load_model

        _WORKER = Prober(load_model(onnx.load_from_string(model_bytes)), feeds, check_feeds, objective, threads)
    except Exception as exc:
        _WORKER_ERROR = f"{type(exc).__name__}: {exc}"


def _work(knob: Knob) -> ProbeResult:
    if _WORKER is None:
        raise RuntimeError(f"a probe worker could not start: {_WORKER_ERROR}")
    return _WORKER.probe(knob)


def run_probes(
    prober: Prober, knobs: list[Knob], jobs: int = 1, on_result: Callable[[ProbeResult], None] | None = None
) -> list[ProbeResult]:
    """Every knob's probe, in the order given; ``jobs`` worker processes when above 1."""
    if jobs <= 1 or len(knobs) < 2:
        results = []
        for knob in knobs:
            results.append(prober.probe(knob))
            if on_result:
                on_result(results[-1])
        return results
    from onnxcompress.modelio import model_bytes

    threads = max(1, (os.cpu_count() or 2) // jobs)
    context = multiprocessing.get_context("spawn")
    args = (model_bytes(prober.model), prober.feeds, prober.check_feeds, prober.objective, threads)
    by_position: dict[int, ProbeResult] = {}
    with _thread_limits(threads), context.Pool(jobs, initializer=_init_worker, initargs=args) as pool:
        for i, result in pool.imap_unordered(_indexed, list(enumerate(knobs))):
            by_position[i] = result
            if on_result:
                on_result(result)
    return [by_position[i] for i in range(len(knobs))]


_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@contextlib.contextmanager
def _thread_limits(threads: int):
    """Workers spawned inside inherit these limits: numpy's BLAS and scikit-learn's OpenMP would
    otherwise each start a thread per core in every worker, and spin against each other."""
    saved = {name: os.environ.get(name) for name in _THREAD_VARIABLES}
    os.environ.update({name: str(threads) for name in _THREAD_VARIABLES})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _indexed(item: tuple[int, Knob]) -> tuple[int, ProbeResult]:
    return item[0], _work(item[1])


def successful(results: Iterable[ProbeResult]) -> list[ProbeResult]:
    return [r for r in results if r.status == "rewritten" and r.saving > 0 and np.isfinite(r.damage)]
