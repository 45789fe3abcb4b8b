"""Peak memory and time of calibration + quantization against the number of calibration samples.

Ours: ``onnxcompress.compress(model, pipeline, calibration=feeds)`` then ``.save()``, for each
``--ours`` pipeline (by default ``quantize-qdq{calibration=percentile}`` and
``quantize-qdq{calibration=entropy}``), which streams activation statistics into histograms.
onnxruntime: ``quantize_static`` (QDQ, per-channel int8 weights, ``--ort-activations``) with
Percentile and Entropy calibration on the model after its ``quant_pre_process`` (the raw model if
that fails; the pre-processing is done once and not counted). onnxruntime's calibrator keeps
every captured activation of every sample in memory until it computes the ranges, so it runs
only up to ``--ort-max`` samples.

Each measurement is its own fresh process (bench.common.in_fresh_process): the step's peak
resident memory above what the process holds after imports and loading the feeds
(bench.common.PeakMemory), and its wall time, model loading and saving included.

Feeds are ``models.calibration_feeds(model, count, seed=0)``. Each model draws ``count`` samples
from a fixed pool without replacement while the pool is large enough, and with replacement
(so with repeats) beyond it: digits_cnn 1347 training images, fmnist_cnn 60000 training images,
mobilenet_v2 900 crops (15 calibration photos x 60 crops: 4 scales, several positions, mirrored),
so 512 samples are distinct crops but of only 15 photos; minilm_l6 2506 fortunes texts;
ppocrv4_rec renders a new distinct text line per sample, with no limit. Run:

    python bench/calibration_memory.py --model mobilenet_v2 --samples 32 128 512 --ort-max 128

and it prints a markdown table, one row per sample count.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import StepFailed, in_fresh_process, markdown_table  # noqa: E402
from quantize_vs_ort import quantization_step  # noqa: E402

import models  # noqa: E402

DEFAULT_OURS = ("quantize-qdq{calibration=percentile}", "quantize-qdq{calibration=entropy}")
ORT_CALIBRATIONS = ("Percentile", "Entropy")
SHORT_LABELS = {"quantize-qdq{calibration=percentile}": "ours percentile",
                "quantize-qdq{calibration=entropy}": "ours entropy"}


def measure(kind: str, src: Path, work: Path, model: str, count: int, arg: str, timeout: float) -> tuple[str, str]:
    """(seconds, peak MB) of one step in a fresh process, as table cells; a failure fills both."""
    dst = work / "out" / "model.onnx"
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        result = in_fresh_process(quantization_step, kind, str(src), str(dst), model, count, arg, str(dst.parent),
                                  timeout=timeout)
    except StepFailed as exc:
        return f"failed: {exc}", "-"
    finally:
        shutil.rmtree(dst.parent, ignore_errors=True)
    return f"{result['seconds']:.1f}", f"{result['peak_mb']:.0f}"


def ort_input(src: Path, work: Path, model: str, timeout: float) -> tuple[Path, str]:
    """The pre-processed model (kept in ``work``), or the raw one if pre-processing fails."""
    pre = work / "ort-pre" / "model.onnx"
    pre.parent.mkdir()
    try:
        in_fresh_process(quantization_step, "ort-pre", str(src), str(pre), model, 0, "", str(pre.parent),
                         timeout=timeout)
        return pre, "model after quant_pre_process"
    except StepFailed as exc:
        return src, f"raw model (pre_process failed: {exc})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenet_v2", choices=models.MODEL_NAMES)
    parser.add_argument("--samples", type=int, nargs="+", default=[32, 128, 512])
    parser.add_argument("--ort-max", type=int, default=128, help="largest sample count given to onnxruntime's tool")
    parser.add_argument("--ours", nargs="+", default=list(DEFAULT_OURS), metavar="PIPELINE")
    parser.add_argument("--ort-activations", choices=("uint8", "int8"), default="uint8")
    parser.add_argument("--step-timeout", type=float, default=3600.0, help="seconds before a step is a failure")
    args = parser.parse_args()

    src = models.fetch(args.model)
    work = Path(tempfile.mkdtemp(prefix=f"bench-calib-{args.model}-"))
    try:
        ort_src, ort_label = ort_input(src, work, args.model, args.step_timeout)
        print(f"onnxruntime quantizes the {ort_label}", file=sys.stderr, flush=True)
        methods = [(SHORT_LABELS.get(p, f"`{p}`"), "ours", p, src) for p in args.ours]
        methods += [(f"ORT {m}", "ort-static", f"{m}:{args.ort_activations}", ort_src) for m in ORT_CALIBRATIONS]
        rows = []
        for count in args.samples:
            row = {"samples": count}
            for label, kind, arg, model_path in methods:
                if kind != "ours" and count > args.ort_max:
                    row[f"{label} s"], row[f"{label} MB"] = "not run (> --ort-max)", "-"
                    continue
                row[f"{label} s"], row[f"{label} MB"] = measure(kind, model_path, work, args.model, count, arg,
                                                                args.step_timeout)
                print(f"{count} samples, {label}: {row[f'{label} s']} s, {row[f'{label} MB']} MB",
                      file=sys.stderr, flush=True)
            rows.append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    columns = ["samples"] + [f"{label} {unit}" for label, *_ in methods for unit in ("s", "MB")]
    print(f"\n### {args.model}: calibration + quantization, time (s) and peak memory (MB)\n")
    print(f"onnxruntime quantizes the {ort_label}; activations {args.ort_activations}.\n")
    print(markdown_table(rows, columns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
