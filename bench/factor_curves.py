"""Factorisation curves: low-rank-gemm, low-rank-conv, split-spatial, split-depthwise.

For each model and each pipeline given, one row: parameters, MACs, latency ratio against the
normalised original (interleaved, batch 1, 2 threads), the model's metrics and the pass's time,
no fine-tuning. Run:

    python bench/factor_curves.py --model minilm_l6 --calib 64 --eval-limit 500 \\
        "low-rank-gemm{ratio=0.5}" "low-rank-gemm{ratio=0.5,data_aware=true}"

and it prints a markdown table (the README's benchmark section is pasted from it).
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("pipelines", nargs="+")
    parser.add_argument("--calib", type=int, default=64)
    parser.add_argument("--eval-limit", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args()

    feeds = models.calibration_feeds(args.model, args.calib)
    work = Path(tempfile.mkdtemp(prefix=f"bench-{args.model}-"))
    base = onnxcompress.compress(models.fetch(args.model), "default", calibration=feeds)
    base_path = work / "base.onnx"
    base.save(base_path)
    base_cost = base.report.final_cost
    rows = [{"pipeline": "(normalised original)", "params": base_cost["params"], "MACs %": 100.0, "latency": 1.0,
             **models.evaluate(args.model, base_path, limit=args.eval_limit)}]
    for i, pipeline in enumerate(args.pipelines):
        start = time.perf_counter()
        result = onnxcompress.compress(base_path, pipeline, calibration=feeds)
        seconds = time.perf_counter() - start
        path = work / f"p{i}.onnx"
        result.save(path)
        cost = result.report.final_cost
        rows.append({
            "pipeline": f"`{pipeline}`", "params": cost["params"],
            "MACs %": 100.0 * cost["macs"] / base_cost["macs"] if base_cost["macs"] else None,
            "latency": latency_ratio(base_path, path, feeds[0], rounds=args.rounds),
            **models.evaluate(args.model, path, limit=args.eval_limit), "time s": seconds,
        })
        print(rows[-1], file=sys.stderr, flush=True)
    metrics = [k for k in rows[0] if k not in ("pipeline", "params", "MACs %", "latency")]
    print(f"\n### {args.model}\n")
    print(markdown_table(rows, ["pipeline", "params", "MACs %", "latency", *metrics, "time s"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
