"""Channel-pruning curves per model: ratio -> parameters, MACs, latency ratio, metric.

For each model and ratio, four configurations: l1 and lasso importance, each without and with
least-squares reconstruction (He et al. 2017), no fine-tuning. Latency is the interleaved
onnxruntime ratio pruned/original (batch 1, 2 threads). Run:

    python bench/prune_curves.py --models digits_cnn fmnist_cnn --ratios 0.1 0.2 0.3 0.4 0.5 0.6

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

CONFIGS = [("l1", False), ("l1", True), ("lasso", False), ("lasso", True)]
PRIMARY = {"digits_cnn": "accuracy", "fmnist_cnn": "accuracy", "mobilenet_v2": "top1_agreement",
           "minilm_l6": "accuracy", "ppocrv4_rec": "exact"}


def run(name: str, ratios: list[float], calib: int, eval_limit: int | None, rounds: int, configs,
        round_to: int = 1, extra: str = "") -> list[dict]:
    original = models.fetch(name)
    feeds = models.calibration_feeds(name, calib)
    baseline = onnxcompress.compress(original, "default", calibration=feeds)  # feeds fix symbolic dims for MACs
    work = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    base_path = work / "base.onnx"
    baseline.save(base_path)
    base_metric = models.evaluate(name, base_path, limit=eval_limit)
    base_cost = baseline.report.final_cost
    rows = [{"ratio": 0.0, "importance": "-", "reconstruct": "-", "params": base_cost["params"],
             "MACs": base_cost["macs"], "latency": 1.0, **base_metric}]
    for ratio in ratios:
        for importance, reconstruct in configs:
            spec = f"prune-channels{{ratio={ratio},importance={importance},reconstruct={str(reconstruct).lower()}"
            spec += f",round_to={round_to}" if round_to > 1 else ""
            spec += f",{extra}}}" if extra else "}"
            start = time.perf_counter()
            result = onnxcompress.compress(base_path, spec, calibration=feeds)
            seconds = time.perf_counter() - start
            path = work / f"r{ratio}-{importance}-{reconstruct}.onnx"
            result.save(path)
            metric = models.evaluate(name, path, limit=eval_limit)
            cost = result.report.final_cost
            rows.append({
                "ratio": ratio, "importance": importance, "reconstruct": "yes" if reconstruct else "no",
                "params": cost["params"], "MACs": cost["macs"],
                "MACs %": 100.0 * cost["macs"] / base_cost["macs"] if base_cost["macs"] else None,
                "latency": latency_ratio(base_path, path, feeds[0], rounds=rounds),
                **metric, "time s": seconds,
            })
            print(f"{name} {spec}: {rows[-1]}", file=sys.stderr, flush=True)
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
    args = parser.parse_args()
    configs = CONFIGS if args.configs == "all" else [
        (c.split(":")[0], c.split(":")[1] == "1") for c in args.configs.split(",")]
    for name in args.models:
        rows = run(name, args.ratios, args.calib, args.eval_limit, args.rounds, configs, args.round_to, args.extra)
        metrics = [PRIMARY[name]] + [k for k in rows[0] if k not in PRIMARY.values() and k not in (
            "ratio", "importance", "reconstruct", "params", "MACs", "latency")]
        columns = ["ratio", "importance", "reconstruct", "params", "MACs %", "latency", *metrics, "time s"]
        options = [f"round_to={args.round_to}"] * (args.round_to > 1) + [args.extra] * bool(args.extra)
        print(f"\n### {name}" + (f" ({', '.join(options)})" if options else "") + "\n")
        print(markdown_table(rows, columns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
