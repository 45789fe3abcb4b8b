"""Command line: ``python -m models fetch all|NAME...``, ``python -m models eval NAME PATH``.

Also ``python -m models build NAME OUT`` (build a model afresh into OUT, e.g. to
regenerate the committed ``models/digits_cnn.onnx``) and ``python -m models calib NAME OUT.npz``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from . import MODEL_NAMES, ModelUnavailable, calibration_feeds, evaluate, fetch, model_module
from ._common import atomic_path


def _fmt(metrics: dict[str, float]) -> str:
    return json.dumps({k: round(v, 6) for k, v in metrics.items()})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m models", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="fetch/build FP32 models and print path + metrics")
    f.add_argument("names", nargs="+", metavar="all|NAME", help=f"all, or some of: {', '.join(MODEL_NAMES)}")
    f.add_argument("--limit", type=int, default=None, help="cap the evaluation samples")
    f.add_argument("--no-eval", action="store_true", help="only fetch, print paths")
    e = sub.add_parser("eval", help="evaluate an ONNX file of model NAME")
    e.add_argument("name", choices=MODEL_NAMES)
    e.add_argument("path", type=Path)
    e.add_argument("--limit", type=int, default=None)
    b = sub.add_parser("build", help="build model NAME afresh into OUT (no cache)")
    b.add_argument("name", choices=MODEL_NAMES)
    b.add_argument("out", type=Path)
    c = sub.add_parser("calib", help="write calibration samples as OUT.npz (arrays stacked on axis 0 where shapes agree)")
    c.add_argument("name", choices=MODEL_NAMES)
    c.add_argument("out", type=Path)
    c.add_argument("--count", type=int, default=32)
    c.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    try:
        if args.cmd == "fetch":
            names = list(MODEL_NAMES) if args.names == ["all"] else args.names
            bad = [n for n in names if n not in MODEL_NAMES]
            if bad:
                ap.error(f"unknown model(s) {', '.join(bad)}; known: all, {', '.join(MODEL_NAMES)}")
            failed = 0
            for name in names:
                t0 = time.perf_counter()
                try:
                    path = fetch(name)
                except ModelUnavailable as exc:
                    print(f"{name}\tUNAVAILABLE\t{exc}", flush=True)
                    failed += 1
                    continue
                t1 = time.perf_counter()
                if args.no_eval:
                    print(f"{name}\t{path}\tfetch {t1 - t0:.1f}s", flush=True)
                    continue
                metrics = evaluate(name, path, limit=args.limit)
                t2 = time.perf_counter()
                print(f"{name}\t{path}\t{_fmt(metrics)}\tfetch {t1 - t0:.1f}s eval {t2 - t1:.1f}s", flush=True)
            return 1 if failed else 0
        if args.cmd == "eval":
            print(_fmt(evaluate(args.name, args.path, limit=args.limit)))
            return 0
        if args.cmd == "build":
            with atomic_path(args.out) as tmp:
                model_module(args.name).build(tmp)
            print(args.out)
            return 0
        if args.cmd == "calib":
            feeds = calibration_feeds(args.name, count=args.count, seed=args.seed)
            arrays = {}
            for key in feeds[0]:
                parts = [fd[key] for fd in feeds]
                if len({p.shape for p in parts}) == 1:
                    arrays[key] = np.concatenate(parts)
                else:  # variable shapes: one array per sample
                    arrays.update({f"{key}_{i}": p for i, p in enumerate(parts)})
            np.savez(args.out, **arrays)
            print(args.out)
            return 0
    except ModelUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
