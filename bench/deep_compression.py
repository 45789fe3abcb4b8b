"""Deep Compression on the real models: storage ratio against the model's metric, per pipeline.

For each model, each pipeline (prune → cluster → pack, prune → int8/int4 → pack, ...) runs with
no fine-tuning; the result is saved as ONNX, evaluated with the model's metric from
``models/``, packed into an ``.onnxz`` archive, and unpacked again (checked bit for bit).
Storage ratio = bytes of the original FP32 ``.onnx`` / bytes of the archive; ``zlib`` is the
ratio the standard compressor alone reaches on the same compressed ONNX file, for comparison.
Pack and unpack throughput are in MB/s of the original model's FP32 weights: the first call,
and (``warm``) the median of ``--repeats`` more calls (3). Last, the
``form=indexed`` model (uint8 indices + codebook, rebuilt by a Gather that onnxruntime folds
when it loads the model) against the FP32 original: file size ratio and interleaved latency
ratio (batch 1, 2 threads). Run:

    python bench/deep_compression.py --models digits_cnn fmnist_cnn mobilenet_v2 minilm_l6 ppocrv4_rec

and it prints a markdown table per model (the README's benchmark section is pasted from it).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import latency_ratio, markdown_table  # noqa: E402

import onnx  # noqa: E402

import models  # noqa: E402
import onnxcompress  # noqa: E402
from onnxcompress.archive import pack_bytes, unpack_bytes  # noqa: E402

PRIMARY = {"digits_cnn": "accuracy", "fmnist_cnn": "accuracy", "mobilenet_v2": "top1_agreement",
           "minilm_l6": "accuracy", "ppocrv4_rec": "exact"}

CNN = [
    "default",
    "cluster-weights{clusters=16}",
    "prune-magnitude{sparsity=0.8,scope=global},cluster-weights{clusters=8}",
    "prune-magnitude{sparsity=0.85,scope=global},cluster-weights{clusters=16}",
    "prune-magnitude{sparsity=0.9,scope=global},cluster-weights{clusters=16}",
    "prune-magnitude{sparsity=0.85,scope=global},quantize-qdq",
]
# 128 scaled-channel values for the 1×1 convs, 32 for the classifier, 256 per tensor for the
# first block and the depthwise convs.
MOBILENET_MIXED = ('cluster-weights{{clusters=128,granularity=channel,assign={assign},@/classifier/.*{{clusters=32}},'
                   '@/features/features\\.[01]/.*{{clusters=256,granularity=tensor}},'
                   '@.*/conv\\.1\\.0/Conv{{clusters=256,granularity=tensor}}}}')
# cross-layer equalization first (exact in float): the per-tensor codebooks of the depthwise convs lose less
EQUALIZED = "lift-constants,fold-constants,fold-batchnorm,cleanup,equalize-cross-layer{relu6=calibrated},"
MOBILENET_MIXED_SMALLER = ('cluster-weights{clusters=128,granularity=channel,assign=gptq,damp=0.1,'
                           '@/classifier/.*{clusters=16},@/features/features\\.[01]/.*{clusters=256,granularity=tensor},'
                           '@.*/conv\\.1\\.0/Conv{clusters=256,granularity=tensor},@/features/features\\.18/.*{clusters=16},'
                           '@/features/features\\.1[4-7]/conv/conv\\.0/conv\\.0\\.0/Conv{clusters=96}}')
PIPELINES = {
    "digits_cnn": CNN,
    "fmnist_cnn": CNN,
    "mobilenet_v2": [
        "default",
        "cluster-weights{clusters=64,granularity=channel}",
        "cluster-weights{clusters=128,granularity=channel}",
        "cluster-weights{clusters=256}",
        "cluster-weights{clusters=256,granularity=channel}",
        "prune-magnitude{sparsity=0.1,scope=global},cluster-weights{clusters=256}",
        "cluster-weights{clusters=64,granularity=channel,assign=gptq}",
        MOBILENET_MIXED.format(assign="nearest"),
        MOBILENET_MIXED.format(assign="gptq"),
        EQUALIZED + MOBILENET_MIXED.format(assign="gptq"),
        EQUALIZED + MOBILENET_MIXED_SMALLER,
        "preset:int8",
    ],
    "minilm_l6": [
        "default",
        "cluster-weights{clusters=16}",
        "cluster-weights{clusters=16,granularity=channel}",
        "cluster-weights{clusters=32}",
        "prune-magnitude{sparsity=0.3},cluster-weights{clusters=16}",
        "prune-magnitude{sparsity=0.3},quantize-dynamic",
        "preset:int8-dynamic",
        "quantize-weights-int4",
    ],
    "ppocrv4_rec": [
        "default",
        "cluster-weights{clusters=64,granularity=channel}",
        "cluster-weights{clusters=128,granularity=channel}",
        "cluster-weights{clusters=256}",
        "prune-magnitude{sparsity=0.2,scope=global},cluster-weights{clusters=256}",
        "cluster-weights{clusters=64,granularity=channel,assign=gptq}",
        "cluster-weights{clusters=32,granularity=channel}",
        "cluster-weights{clusters=32,granularity=channel,assign=gptq}",
        "cluster-weights{clusters=16,granularity=channel,assign=gptq}",
        "quantize-qdq{calibration=percentile}",
    ],
}


def fp32_weight_bytes(proto: onnx.ModelProto) -> int:
    """Bytes of the float32 weights (initializers and Constant tensors) of a model."""
    total = sum(len(t.raw_data) for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
    for node in proto.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == onnx.TensorProto.FLOAT:
                total += len(attr.t.raw_data)
    return total


def run(name: str, pipelines: list[str], calib: int, eval_limit: int | None, repeats: int = 3) -> list[dict]:
    original = models.fetch(name)
    original_bytes = original.read_bytes()
    weight_mb = fp32_weight_bytes(onnx.load_model_from_string(original_bytes)) / 1e6
    feeds = models.calibration_feeds(name, calib)
    work = Path(tempfile.mkdtemp(prefix=f"bench-dc-{name}-"))
    rows = []
    for i, spec in enumerate(pipelines):
        text = onnxcompress.registry.PRESETS[spec[7:]][0] if spec.startswith("preset:") else spec
        start = time.perf_counter()
        result = onnxcompress.compress(original, text, calibration=feeds)
        compress_s = time.perf_counter() - start
        path = work / f"p{i}.onnx"
        result.save(path)
        metric = models.evaluate(name, path, limit=eval_limit)
        data = path.read_bytes()
        (pack_s, pack_warm_s), archive = _times(lambda: pack_bytes(data), repeats)
        (unpack_s, unpack_warm_s), restored = _times(lambda: unpack_bytes(archive), repeats)
        if restored != data:
            raise SystemExit(f"{name} {spec}: unpack did not reproduce the model bit for bit")
        rows.append({
            "pipeline": f"`{spec}`", "onnx bytes": len(data), "packed bytes": len(archive),
            "ratio": len(original_bytes) / len(archive), "zlib": len(original_bytes) / len(zlib.compress(data, 9)),
            **metric, "compress s": compress_s,
            "pack MB/s": weight_mb / pack_s, "unpack MB/s": weight_mb / unpack_s,
            "warm pack MB/s": weight_mb / pack_warm_s, "warm unpack MB/s": weight_mb / unpack_warm_s,
        })
        print(f"{name} {spec}: {rows[-1]}", file=sys.stderr, flush=True)
    return rows


THROUGHPUT = ("pack MB/s", "unpack MB/s", "warm pack MB/s", "warm unpack MB/s")


def _times(call, repeats: int):
    """((seconds of the first call, median seconds of ``repeats`` more), the last result).

    The first call is what a one-shot ``pack`` or a model load pays; later ones in the same
    process run faster (the allocator reuses memory the first call paged in)."""
    times = []
    for _ in range(1 + repeats):
        start = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - start)
    return (times[0], statistics.median(times[1:])), result


def indexed_form(name: str, clusters: int, rounds: int) -> str:
    """One line: the file size and latency of the ``form=indexed`` model against the original."""
    original = models.fetch(name)
    path = Path(tempfile.mkdtemp(prefix=f"bench-dc-{name}-")) / "indexed.onnx"
    onnxcompress.compress(original, f"cluster-weights{{clusters={clusters},form=indexed}}").save(path)
    feed = models.calibration_feeds(name, 1)[0]
    ratio = latency_ratio(original, path, feed, rounds=rounds)
    metric = models.evaluate(name, path)
    return (f"`cluster-weights{{clusters={clusters},form=indexed}}`: file {original.stat().st_size / path.stat().st_size:.2f}x "
            f"smaller, latency ratio {ratio:.2f} against FP32, {metric}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["digits_cnn", "fmnist_cnn"])
    parser.add_argument("--pipelines", nargs="+", help="pipeline strings (or preset:NAME) instead of the defaults")
    parser.add_argument("--calib", type=int, default=32, help="calibration samples (for quantize-qdq)")
    parser.add_argument("--eval-limit", type=int, default=None)
    parser.add_argument("--indexed-clusters", type=int, default=16, help="clusters of the form=indexed line")
    parser.add_argument("--rounds", type=int, default=300, help="latency rounds of the form=indexed line")
    parser.add_argument("--repeats", type=int, default=3, help="pack and unpack calls timed after the first (their median is the warm column)")
    args = parser.parse_args()
    for name in args.models:
        rows = run(name, args.pipelines or PIPELINES[name], args.calib, args.eval_limit, args.repeats)
        metrics = [PRIMARY[name]] + [k for k in rows[0] if k not in PRIMARY.values() and k not in (
            "pipeline", "onnx bytes", "packed bytes", "ratio", "zlib", "compress s", *THROUGHPUT)]
        columns = ["pipeline", "packed bytes", "ratio", "zlib", *metrics, *THROUGHPUT]
        print(f"\n### {name}\n")
        print(markdown_table(rows, columns))
        print("\n" + indexed_form(name, args.indexed_clusters, args.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
