"""The tuner against the uniform presets, on the real models.

For each model: ``onnxcompress.tune`` with the budget on the held-out half of the calibration
feeds (``--budget``), objective ``size``; then the tuned model and every uniform preset
(``default``, ``int8``, ``int8-dynamic``, calibrated on the same feeds) are evaluated with the
model's metric from ``models/`` on its evaluation data, which the tuner never saw. The *best
uniform preset* is the smallest one whose evaluation metric keeps the model's target (top-1
agreement ≥ 0.99 for mobilenet_v2, at most 0.5 point accuracy drop for minilm_l6); the gain is
its size over the tuned model's. Size is the bytes of the model's constants; latency the
interleaved ratio against FP32 (batch 1, 2 threads). With ``--jobs 1 2`` the tuning runs once per
job count, to compare the times. Run:

    python bench/tune.py --models mobilenet_v2 minilm_l6 --jobs 1 2

and it prints a markdown table per model (the README's benchmark section is pasted from it).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import latency_ratio, markdown_table  # noqa: E402

import models  # noqa: E402
import onnxcompress  # noqa: E402
from onnxcompress.modelio import initializer_bytes  # noqa: E402

SETTINGS = {
    # model: (budget on the check feeds, knobs, metric key, target: (kind, value), calibration feeds)
    "mobilenet_v2": ("top1>=0.99,sqnr>=36", "share,prune,low-rank,low-rank-gemm", "top1_agreement", ("at_least", 0.99), 32),
    # 48 check feeds: on 16 the cosine budget is met by plans that lose 0.9 point on the evaluation texts
    "minilm_l6": ("cosine>=0.992", "int4,int8-dynamic", "accuracy", ("drop_at_most", 0.005), 96),
    "fmnist_cnn": ("top1>=0.99", "int8,prune,low-rank,low-rank-gemm", "accuracy", ("drop_at_most", 0.01), 32),
}
PRESETS = ["default", "int8", "int8-dynamic"]


def meets(value: float, base: float, target) -> bool:
    kind, limit = target
    return value >= limit if kind == "at_least" else value >= base - limit


def bench(name: str, jobs: list[int], samples: int | None = None, budget: str | None = None, fill: int = 0,
          objective: str = "size", knobs: str | None = None) -> str:
    default_budget, default_knobs, key, target, default_samples = SETTINGS[name]
    budget, knobs = budget or default_budget, knobs or default_knobs
    samples = samples or default_samples
    source = models.fetch(name)
    feeds = models.calibration_feeds(name, samples)
    fit = feeds[: (len(feeds) + 1) // 2]
    base_metric = models.evaluate(name, source)[key]
    feed = feeds[0]
    rows, tuned = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for j in jobs:
            start = time.perf_counter()
            result = onnxcompress.tune(str(source), feeds, budget, objective, knobs=knobs, jobs=j, fill=fill)
            seconds = time.perf_counter() - start
            if tuned is None:
                tuned = result
                path = Path(tmp) / "tuned.onnx"
                result.save(path)
                value = models.evaluate(name, path)[key]
                rows.append({"model": f"tuned (-j {j})", "size MB": initializer_bytes(result.model) / 1e6,
                             key: value, "target met": meets(value, base_metric, target),
                             "latency": latency_ratio(source, path, feed), "tune s": seconds,
                             "steps": f"{result.chosen.steps} of {result.result['of_steps']}"})
            else:
                rows.append({"model": f"tuned (-j {j})", "tune s": seconds,
                             "steps": "same plan" if result.pipeline == tuned.pipeline else "another plan"})
        uniform = []
        for preset in PRESETS:
            try:
                out = onnxcompress.compress(str(source), preset, calibration=fit)
            except Exception as exc:  # a preset a model cannot take is a result, not a crash
                rows.append({"model": preset, "steps": f"failed: {type(exc).__name__}"})
                continue
            path = Path(tmp) / f"{preset}.onnx"
            out.save(path)
            value = models.evaluate(name, path)[key]
            ok = meets(value, base_metric, target)
            size = initializer_bytes(out.model)
            latency = latency_ratio(source, path, feed)
            uniform.append((ok, size if objective == "size" else latency, preset))
            rows.append({"model": preset, "size MB": size / 1e6, key: value, "target met": ok, "latency": latency})
    best = min((cost, preset) for ok, cost, preset in uniform if ok) if any(ok for ok, *_ in uniform) else None
    table = markdown_table(rows, ["model", "size MB", key, "target met", "latency", "tune s", "steps"])
    filled = f", fill {fill}" if fill else ""
    lines = [f"**{name}** (FP32 {key} {base_metric:.4f}; tuned for `{budget}` on the held-out half of "
             f"{len(feeds)} calibration feeds, objective `{objective}`, knobs `{knobs}`{filled})", "", table, ""]
    if best is not None:
        missed = "" if rows[0]["target met"] else ", but misses the target"
        if objective == "size":
            gain = best[0] / initializer_bytes(tuned.model)
            lines.append(f"Best uniform preset within the target: `{best[1]}`, {best[0] / 1e6:.2f} MB; the tuned plan "
                         f"is {gain:.2f}x smaller{missed}.")
        else:  # latency ratios against FP32, each measured interleaved with it
            gain = best[0] / rows[0]["latency"]
            lines.append(f"Fastest uniform preset within the target: `{best[1]}`, latency ratio {best[0]:.3f}; the "
                         f"tuned plan is {gain:.2f}x faster{missed}.")
    lines.append(f"Plan: `{tuned.pipeline}`")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["mobilenet_v2", "minilm_l6"])
    parser.add_argument("--jobs", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--samples", type=int, help="calibration feeds, half of them for the check (default: each model's own, above)")
    parser.add_argument("--budget", help="the budget for every model given (default: each model's own, above)")
    parser.add_argument("--fill", type=int, default=0, help="tune's fill: verification runs after the bisection")
    parser.add_argument("--objective", choices=["size", "latency"], default="size",
                        help="tune's objective; the best uniform preset is then the fastest within the target")
    parser.add_argument("--knobs", help="tune's knobs for every model given (default: each model's own, above)")
    args = parser.parse_args()
    for name in args.models:
        print(bench(name, args.jobs, args.samples, args.budget, args.fill, args.objective, args.knobs), flush=True)
        print()


if __name__ == "__main__":
    main()
