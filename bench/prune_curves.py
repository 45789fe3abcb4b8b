"""Channel-pruning curves per model: ratio -> parameters, MACs, latency ratio, metric.

For each model and ratio, four configurations: l1 and lasso importance, each without and with
least-squares reconstruction (He et al. 2017), no fine-tuning. Latency is the interleaved
onnxruntime ratio pruned/original (batch 1, 2 threads). Run:

    python bench/prune_curves.py --models digits_cnn fmnist_cnn --ratios 0.1 0.2 0.3 0.4 0.5 0.6

and it prints a markdown table per model (the README's benchmark section is pasted from it).
``--largest "top1_agreement>=0.95"`` finds instead, per configuration, the largest ratio that
keeps the metric there.
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

CONFIGS = [("l1", False), ("l1", True), ("lasso", False), ("lasso", True)]
PRIMARY = {"digits_cnn": "accuracy", "fmnist_cnn": "accuracy", "mobilenet_v2": "top1_agreement",
           "minilm_l6": "accuracy", "ppocrv4_rec": "exact"}


def prepare(name: str, calib: int):
    """(normalised original's path, its metrics, its cost, calibration feeds, work folder)."""
    feeds = models.calibration_feeds(name, calib)
    baseline = onnxcompress.compress(models.fetch(name), "default", calibration=feeds)  # feeds fix symbolic dims for MACs
    work = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    base_path = work / "base.onnx"
    baseline.save(base_path)
    return base_path, baseline.report.final_cost, feeds, work


def spec_for(ratio: float, importance: str, reconstruct: bool, round_to: int, extra: str) -> str:
    spec = f"prune-channels{{ratio={ratio},importance={importance},reconstruct={str(reconstruct).lower()}"
    spec += f",round_to={round_to}" if round_to > 1 else ""
    return spec + (f",{extra}}}" if extra else "}")


def measure(name, base_path, base_cost, feeds, work, spec, eval_limit, rounds, latency: bool = True) -> dict:
    start = time.perf_counter()
    result = onnxcompress.compress(base_path, spec, calibration=feeds)
    seconds = time.perf_counter() - start
    path = work / "candidate.onnx"
    result.save(path)
    cost = result.report.final_cost
    row = {"params": cost["params"], "MACs": cost["macs"],
           "MACs %": 100.0 * cost["macs"] / base_cost["macs"] if base_cost["macs"] else None,
           "latency": latency_ratio(base_path, path, feeds[0], rounds=rounds) if latency else None,
           **models.evaluate(name, path, limit=eval_limit), "time s": seconds}
    print(f"{name} {spec}: {row}", file=sys.stderr, flush=True)
    return row


def run(name: str, ratios: list[float], calib: int, eval_limit: int | None, rounds: int, configs,
        round_to: int = 1, extra: str = "") -> list[dict]:
    base_path, base_cost, feeds, work = prepare(name, calib)
    base_metric = models.evaluate(name, base_path, limit=eval_limit)
    rows = [{"ratio": 0.0, "importance": "-", "reconstruct": "-", "params": base_cost["params"],
             "MACs": base_cost["macs"], "latency": 1.0, **base_metric}]
    for ratio in ratios:
        for importance, reconstruct in configs:
            spec = spec_for(ratio, importance, reconstruct, round_to, extra)
            rows.append({"ratio": ratio, "importance": importance, "reconstruct": "yes" if reconstruct else "no",
                         **measure(name, base_path, base_cost, feeds, work, spec, eval_limit, rounds)})
    return rows


def largest_ratio(name: str, condition: str, calib: int, eval_limit: int | None, rounds: int, configs,
                  round_to: int = 1, extra: str = "", step: float = 0.01, top: float = 0.6) -> list[dict]:
    """Per configuration, the largest ratio on a ``step`` grid up to ``top`` whose metric meets
    ``condition`` ("metric>=value"), by bisection: a metric that is not monotone in the ratio
    can hide a larger passing ratio, so the answer is a passing ratio with a failing one
    ``step`` above it."""
    metric, bound = condition.split(">=")
    bound = float(bound)
    base_path, base_cost, feeds, work = prepare(name, calib)
    rows = [{"ratio": 0.0, "importance": "-", "reconstruct": "-", "params": base_cost["params"],
             "MACs": base_cost["macs"], "latency": 1.0, **models.evaluate(name, base_path, limit=eval_limit)}]
    for importance, reconstruct in configs:
        def metric_at(k: int) -> dict:
            spec = spec_for(round(k * step, 6), importance, reconstruct, round_to, extra)
            return measure(name, base_path, base_cost, feeds, work, spec, eval_limit, rounds, latency=False)

        low, high = 0, int(round(top / step))
        seen = {high: metric_at(high)}
        if seen[high][metric] >= bound:
            low = high
        while high - low > 1:
            mid = (low + high) // 2
            seen[mid] = metric_at(mid)
            low, high = (mid, high) if seen[mid][metric] >= bound else (low, mid)
        if low == 0:
            rows.append({"ratio": 0.0, "importance": importance, "reconstruct": "yes" if reconstruct else "no",
                         "note": f"{metric} < {bound} already at ratio {step}: {seen[1][metric]:.3f}"})
            continue
        spec = spec_for(round(low * step, 6), importance, reconstruct, round_to, extra)
        rows.append({"ratio": low * step, "importance": importance, "reconstruct": "yes" if reconstruct else "no",
                     **measure(name, base_path, base_cost, feeds, work, spec, eval_limit, rounds),
                     "next ratio": high * step, f"{metric} there": seen[high][metric]})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["digits_cnn", "fmnist_cnn"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    parser.add_argument("--calib", type=int, default=64, help="calibration samples")
    parser.add_argument("--eval-limit", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=300, help="latency rounds per measurement")
    parser.add_argument("--configs", default="all", help="'all' or e.g. 'l1:0,l1:1'")
    parser.add_argument("--round-to", type=int, default=1, help="prune-channels round_to (8 suits onnxruntime's conv kernels)")
    parser.add_argument("--extra", default="", help='more prune-channels options, e.g. exclude="fc1"')
    parser.add_argument("--largest", metavar="METRIC>=VALUE", default=None,
                        help="instead of curves: the largest ratio (0.01 grid, by bisection) meeting this")
    args = parser.parse_args()
    configs = CONFIGS if args.configs == "all" else [
        (c.split(":")[0], c.split(":")[1] == "1") for c in args.configs.split(",")]
    for name in args.models:
        if args.largest:
            rows = largest_ratio(name, args.largest, args.calib, args.eval_limit, args.rounds, configs,
                                 args.round_to, args.extra)
        else:
            rows = run(name, args.ratios, args.calib, args.eval_limit, args.rounds, configs, args.round_to, args.extra)
        metrics = [PRIMARY[name]] + [k for k in rows[0] if k not in PRIMARY.values() and k not in (
            "ratio", "importance", "reconstruct", "params", "MACs", "latency")]
        columns = ["ratio", "importance", "reconstruct", "params", "MACs %", "latency", *metrics, "time s"]
        if args.largest:
            metric = args.largest.split(">=")[0]
            columns += ["next ratio", f"{metric} there", "note"]
        options = [f"round_to={args.round_to}"] * (args.round_to > 1) + [args.extra] * bool(args.extra)
        print(f"\n### {name}" + (f" ({', '.join(options)})" if options else "") + "\n")
        print(markdown_table(rows, columns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
