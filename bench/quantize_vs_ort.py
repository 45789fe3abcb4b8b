"""int8 quantization: onnxcompress's passes against onnxruntime.quantization, model by model.

For every model, one row per method, all in one run:

- FP32: ``onnxcompress.compress(model, "default")`` (lossless normalisation), the reference of
  the file size and latency ratios;
- onnxruntime's tool: ``quantize_static`` in QDQ format, per-channel int8 weights, activations
  ``--ort-activations`` (uint8 by default, onnxruntime's advice for x86 CPUs; its own default is
  int8), with MinMax, Entropy and Percentile calibration (its default percentile, 99.999), and
  ``quantize_dynamic`` with int8 weights (its default op types, Conv included). It runs on the
  model after its own ``quant_pre_process`` (shape inference + onnxruntime's basic graph
  optimisations, which fold BatchNormalization and turn Constant nodes into initializers), as its
  documentation asks (``--ort-prep auto``; ``always`` or ``never`` to force it). The
  pre-processing has a row of its own (its time and memory, not counted in the rows below), and
  the "ORT input" column says which model each ORT row quantized: the pre-processed one, or the
  raw one because pre-processing, or quantizing the pre-processed model, failed;
- ours: each ``--ours`` pipeline, ``onnxcompress.compress(model, pipeline, calibration=feeds)``
  then ``.save(path)``, with compress's usual instruments (per-pass drift check on the
  calibration feeds and the onnx checker) included in its time.

Both tools get the same calibration samples, ``models.calibration_feeds(name, --calib, seed=0)``,
which models/ draws from data disjoint from the evaluation data. A step that fails, is refused or
crashes gives a row "failed: <reason>" and the run goes on.

Columns: file size / FP32 file size; latency ratio vs FP32 (bench.common.latency_ratio:
interleaved, batch 1, 2 threads, on the first calibration feed); every metric models.evaluate
returns; time of the quantization step; its peak memory, measured in a fresh process per step
(resident high-water mark minus the resident size after imports and loading the feeds); and the
kernels onnxruntime runs: node counts per op type in the graph it optimises at
ORT_ENABLE_EXTENDED (integer kernels, Q = QuantizeLinear and DQ = DequantizeLinear left unfused,
and the float Conv/MatMul/Gemm kernels left). Run:

    python bench/quantize_vs_ort.py --models digits_cnn fmnist_cnn --calib 64 --rounds 100

and it prints one markdown table per model (the README's tables are pasted from it). Nothing is
written into the repository: models go to a temporary folder that is removed at the end.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PeakMemory, StepFailed, in_fresh_process, latency_ratio, markdown_table, one_line  # noqa: E402

import models  # noqa: E402
import onnx  # noqa: E402
import onnxcompress  # noqa: E402
import onnxruntime as ort  # noqa: E402

DEFAULT_OURS = (
    "quantize-qdq",
    "quantize-qdq{calibration=percentile}",
    "quantize-qdq{calibration=entropy}",
    "int8",
    "quantize-dynamic",
)
ORT_CALIBRATIONS = ("MinMax", "Entropy", "Percentile")

INTEGER_OPS = {"QGemm", "QAttention", "QEmbedLayerNormalization", "MatMulInteger", "ConvInteger",
               "MatMulIntegerToFloat", "MatMulNBits", "QOrderedMatMul", "DynamicQuantizeLinear"}
INTEGER_PREFIXES = ("QLinear", "DynamicQuantize")
FLOAT_COMPUTE_OPS = {"Conv", "FusedConv", "ConvTranspose", "MatMul", "FusedMatMul", "Gemm", "FusedGemm",
                     "Attention", "MultiHeadAttention"}
SHORT_NAMES = {"QuantizeLinear": "Q", "DequantizeLinear": "DQ"}


# --------------------------------------------------------------------------- steps (run in a child)
class FeedReader:
    """onnxruntime's CalibrationDataReader protocol over a list of feed dicts."""

    def __init__(self, feeds):
        self._feeds = iter(feeds)

    def get_next(self):
        return next(self._feeds, None)


def quantization_step(kind: str, src: str, dst: str, model: str, calib: int, arg: str, workdir: str) -> dict:
    """One measured step in this (fresh) process: seconds and peak MB above the baseline.

    ``kind``: "ort-pre" (quant_pre_process), "ort-static" (``arg`` is the calibration method
    name, then ``:uint8`` or ``:int8`` for the activations), "ort-dynamic" or "ours" (``arg`` is
    the pipeline). Calibration feeds are loaded before the baseline is taken.
    """
    os.chdir(workdir)  # whatever a tool writes beside itself lands in the temporary folder
    _import_tools()
    feeds = models.calibration_feeds(model, calib, seed=0) if kind in ("ort-static", "ours") else None
    memory = PeakMemory()
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # onnxruntime's calibrators print progress
        if kind == "ort-pre":
            from onnxruntime.quantization.shape_inference import quant_pre_process

            quant_pre_process(src, dst)
        elif kind == "ort-static":
            method, activations = arg.split(":")
            ort_static(src, dst, feeds, method, activations)
        elif kind == "ort-dynamic":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
        elif kind == "ours":
            onnxcompress.compress(src, arg, calibration=feeds).save(dst)
        else:
            raise ValueError(f"unknown step {kind!r}")
    return {"seconds": time.perf_counter() - start, "peak_mb": memory.peak_mb()}


def _import_tools() -> None:
    """Import what either tool imports lazily, so that imports do not count as the step's memory."""
    import onnxruntime.quantization  # noqa: F401
    import onnxruntime.quantization.shape_inference  # noqa: F401
    import onnxruntime.tools.symbolic_shape_infer  # noqa: F401
    import onnxcompress.analysis.cost  # noqa: F401
    import onnxcompress.passes  # noqa: F401


def ort_static(src, dst, feeds, method: str, activations: str) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(
        src, dst, FeedReader(feeds), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8 if activations == "uint8" else QuantType.QInt8,
        weight_type=QuantType.QInt8, calibrate_method=getattr(CalibrationMethod, method),
    )


# --------------------------------------------------------------------------- measurements (parent)
def run_step(kind: str, src: Path, dst: Path, name: str, args, arg: str = "") -> dict:
    """:func:`quantization_step` in a fresh process, writing ``dst`` (its folder is the step's cwd)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    return in_fresh_process(quantization_step, kind, str(src), str(dst), name, args.calib, arg, str(dst.parent),
                            timeout=args.step_timeout)


def file_bytes(path: Path) -> int:
    """Bytes of a model file and its external data: everything in its own folder."""
    return sum(f.stat().st_size for f in path.parent.iterdir() if f.is_file())


def ort_kernels(path: Path, scratch: Path) -> tuple[str, str]:
    """(integer kernels, float compute kernels) in the graph onnxruntime optimises, as text."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(scratch)
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    counts = collections.Counter(n.op_type for n in onnx.load(str(scratch), load_external_data=False).graph.node)
    for f in scratch.parent.glob(scratch.name + "*"):
        f.unlink()
    integer = {op: n for op, n in counts.items()
               if op in INTEGER_OPS or op.startswith(INTEGER_PREFIXES) or op in SHORT_NAMES}
    floating = {op: n for op, n in counts.items() if op in FLOAT_COMPUTE_OPS}
    return _count_text(integer), _count_text(floating)


def _count_text(counts: dict) -> str:
    order = sorted(counts.items(), key=lambda kv: (kv[0] in SHORT_NAMES, -kv[1], kv[0]))
    return ", ".join(f"{n} {SHORT_NAMES.get(op, op)}" for op, n in order) or "none"


def finished_row(row: dict, name: str, path: Path, fp32: Path, feed: dict, args, scratch: Path) -> dict:
    """Fill size, latency, metrics and kernels of a quantized model; a failure here fails the row."""
    try:
        integer, floating = ort_kernels(path, scratch)
        row.update({
            "size ratio": file_bytes(path) / file_bytes(fp32),
            "latency ratio": latency_ratio(fp32, path, feed, rounds=args.rounds),
            **models.evaluate(name, path, limit=args.eval_limit),
            "int8 kernels": integer, "float kernels": floating,
        })
    except Exception as exc:  # noqa: BLE001 - an unloadable or unrunnable result is a row, not a crash
        row["size ratio"] = f"failed: {one_line(exc)}"
    return row


def benchmark_model(name: str, args, work: Path) -> tuple[list[dict], list[str]]:
    src = models.fetch(name)
    feed = models.calibration_feeds(name, args.calib, seed=0)[0]
    scratch = work / "optimized.onnx"

    fp32 = work / "fp32" / "model.onnx"
    fp32.parent.mkdir()
    onnxcompress.compress(src, "default").save(fp32)
    integer, floating = ort_kernels(fp32, scratch)
    metrics = models.evaluate(name, fp32, limit=args.eval_limit)
    rows = [{"model": name, "method": "FP32 (`default`)", "size ratio": 1.0, "latency ratio": 1.0, **metrics,
             "int8 kernels": integer, "float kernels": floating}]
    _progress(rows[-1])

    ort_inputs = ort_input_candidates(name, src, work, args, rows)
    methods = [("ort-static", f"{m}:{args.ort_activations}", f"ORT static {m}") for m in ORT_CALIBRATIONS]
    methods.append(("ort-dynamic", "", "ORT dynamic"))
    for i, (kind, arg, label) in enumerate(methods):
        row = {"model": name, "method": label}
        dst = work / f"ort{i}" / "model.onnx"
        reasons = []
        for input_path, input_label in ort_inputs:
            try:
                row.update(run_step(kind, input_path, dst, name, args, arg))
                row["ORT input"] = input_label + "".join(f" (after {r})" for r in reasons)
                break
            except StepFailed as exc:
                reasons.append(f"{input_label}: {exc}" if len(ort_inputs) > 1 else str(exc))
                shutil.rmtree(dst.parent, ignore_errors=True)
        if "seconds" in row:
            rows.append(finished_row(row, name, dst, fp32, feed, args, scratch))
        else:
            row.update({"ORT input": ", then ".join(label for _, label in ort_inputs),
                        "size ratio": "failed: " + ("; ".join(reasons) or "quant_pre_process failed (--ort-prep always)")})
            rows.append(row)
        _progress(rows[-1])

    for i, pipeline in enumerate(args.ours):
        row = {"model": name, "method": f"ours `{pipeline}`"}
        dst = work / f"ours{i}" / "model.onnx"
        try:
            row.update(run_step("ours", src, dst, name, args, pipeline))
            rows.append(finished_row(row, name, dst, fp32, feed, args, scratch))
        except StepFailed as exc:
            row["size ratio"] = f"failed: {exc}"
            rows.append(row)
        _progress(rows[-1])
    return rows, list(metrics)


def ort_input_candidates(name: str, src: Path, work: Path, args, rows: list[dict]) -> list[tuple[Path, str]]:
    """The models onnxruntime's tool is tried on, in order, each with its label for the table.

    Appends a row for the pre-processing step itself (its time and memory, or its failure).
    """
    if args.ort_prep == "never":
        return [(src, "raw")]
    pre = work / "ort-pre" / "model.onnx"
    try:
        measured = run_step("ort-pre", src, pre, name, args)
    except StepFailed as exc:
        rows.append({"model": name, "method": "ORT quant_pre_process", "size ratio": f"failed: {exc}"})
        return [] if args.ort_prep == "always" else [(src, "raw (pre_process failed)")]
    rows.append({"model": name, "method": "ORT quant_pre_process (input of the ORT rows)", **measured})
    _progress(rows[-1])
    if args.ort_prep == "always":
        return [(pre, "pre_process")]
    return [(pre, "pre_process"), (src, "raw")]


def _progress(row: dict) -> None:
    print({k: v for k, v in row.items() if k != "model"}, file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["digits_cnn"], choices=models.MODEL_NAMES)
    parser.add_argument("--calib", type=int, default=64, help="calibration samples, both tools")
    parser.add_argument("--eval-limit", type=int, default=None, help="cap on evaluation samples")
    parser.add_argument("--rounds", type=int, default=300, help="latency rounds per model pair")
    parser.add_argument("--ours", nargs="+", default=list(DEFAULT_OURS), metavar="PIPELINE")
    parser.add_argument("--ort-activations", choices=("uint8", "int8"), default="uint8")
    parser.add_argument("--ort-prep", choices=("auto", "always", "never"), default="auto",
                        help="quant_pre_process before onnxruntime's tool: auto falls back to the raw model on failure")
    parser.add_argument("--step-timeout", type=float, default=3600.0, help="seconds before a step is a failure")
    args = parser.parse_args()

    print(f"calibration: {args.calib} samples (seed 0); eval limit: {args.eval_limit}; latency rounds: {args.rounds}; "
          f"onnxruntime {ort.__version__}, activations {args.ort_activations}, weights int8 per channel",
          file=sys.stderr)
    tables = []
    for name in args.models:
        work = Path(tempfile.mkdtemp(prefix=f"bench-quant-{name}-"))
        try:
            rows, metrics = benchmark_model(name, args, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        columns = ["method", "ORT input", "size ratio", "latency ratio", *metrics, "quantize s", "peak MB",
                   "int8 kernels", "float kernels"]
        for row in rows:
            seconds, peak = row.pop("seconds", None), row.pop("peak_mb", None)
            row["quantize s"] = None if seconds is None else f"{seconds:.2f}"
            row["peak MB"] = None if peak is None else f"{peak:.0f}"
        tables.append(f"### {name} (calibration {args.calib}, eval limit {args.eval_limit})\n\n"
                      + markdown_table(rows, columns))
    print("\n\n".join(tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())
