"""The command line: a thin layer over the Python API.

    onnxcompress optimize IN.onnx -o OUT.onnx -p PIPELINE | --preset NAME [debugging flags]
    onnxcompress optimize IN.onnx -o OUT.onnx -p PIPELINE --calib DATA --drift-budget B --bisect auto
        (prints the first pass and node rewrite over budget and the command reproducing it;
        exits 0 when the search ran, whether or not the budget breaks; writes nothing)
    onnxcompress tune MODEL.onnx -o OUT.onnx --calib DATA --budget "top1>=0.99" [--objective size|latency|macs] [-j N]
    onnxcompress inspect MODEL.onnx [--json] [--storage]
    onnxcompress pack MODEL.onnx -o MODEL.onnxz
    onnxcompress unpack MODEL.onnxz -o MODEL.onnx
    onnxcompress compare A.onnx B.onnx --calib DATA [--per-node]
    onnxcompress list-passes [--json]

Errors print one line, ``onnxcompress: error: ...``, and exit non-zero; nothing is written.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections import Counter
from pathlib import Path

from onnxcompress import registry
from onnxcompress.errors import OnnxCompressError
from onnxcompress.options import describe_options

log = logging.getLogger("onnxcompress")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except OnnxCompressError as exc:
        print(f"onnxcompress: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("onnxcompress: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into head & co.: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except Exception as exc:  # onnxruntime or onnx refusing a model: one line, not a traceback
        if args.verbose:
            raise
        first = (str(exc).strip().splitlines() or [""])[0]
        print(f"onnxcompress: error: {type(exc).__name__}: {first} (rerun with -v for details)", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onnxcompress", description="Compiler-style compression passes for ONNX models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the passes do; show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    opt = sub.add_parser("optimize", help="run a pipeline of passes on a model")
    opt.add_argument("input", nargs="?", help="the ONNX model (never modified)")
    opt.add_argument("-o", "--output", help="where to write the optimized model")
    what = opt.add_mutually_exclusive_group()
    what.add_argument("-p", "--pipeline", help="pipeline string, e.g. 'fold-batchnorm,cleanup'")
    what.add_argument("--preset", help=f"named pipeline: {', '.join(registry.PRESETS)}")
    opt.add_argument("--print-pipeline", action="store_true", help="print the expanded, ordered pipeline and exit")
    _add_calibration_args(opt)
    opt.add_argument("--drift-budget", help="e.g. 'sqnr=30', 'top1=0.99', 'sqnr=25,cosine=0.999'")
    opt.add_argument("--on-drift", choices=("rollback", "fail"), default="rollback", help="what to do with a pass over budget")
    opt.add_argument("--localize-drift", action="store_true", help="name the first tensor that drifted over budget")
    opt.add_argument("--reference", help="measure drift against this model instead of the input")
    opt.add_argument("--report", help="JSON report path (default: OUTPUT with .report.json)")
    opt.add_argument("--print-after-change", metavar="DIR", help="write NNN_<pass>.onnx after each pass that changed the model")
    bisect = opt.add_mutually_exclusive_group()
    bisect.add_argument("--bisect-limit", type=int, metavar="N", help="run only the first N skippable passes")
    bisect.add_argument("--bisect", choices=["auto"],
                        help="auto: find the first pass, then its first node rewrite, over --drift-budget; print the "
                             "pipeline that reproduces it; write no model; exit 0 whether or not the budget breaks")
    opt.add_argument("--reproducer-dir", metavar="DIR", help="where to write a reproducer if a pass fails (default: beside the output)")
    opt.add_argument("--external-data", action="store_true", help="store weights in OUTPUT.data")
    opt.add_argument("--no-verify", action="store_true", help="skip the onnx checker after each pass")
    opt.set_defaults(func=_optimize)

    tun = sub.add_parser("tune", help="choose per node int8/float, prune ratio and rank for the best objective within a budget")
    tun.add_argument("input", help="the ONNX model (never modified)")
    tun.add_argument("-o", "--output", required=True, help="the tuned model; its plan (.plan.json) and record (.tune.json) go beside it")
    _add_calibration_args(tun)
    tun.add_argument("--validation", metavar="FILE_OR_DIR",
                     help="feeds to measure drift on (default: the second half of the calibration feeds; the passes calibrate on the first)")
    tun.add_argument("--budget", required=True,
                     help="what the plan must keep, e.g. 'top1>=0.99', 'sqnr>=30,cosine>=0.999', 'metric_drop<=0.005' (with --metric)")
    tun.add_argument("--objective", choices=("size", "latency", "macs"), default="size",
                     help="what to minimise (latency: estimated from MACs priced by the kernel onnxruntime runs and the "
                          "int8 conversions it cannot fold)")
    tun.add_argument("--knobs", default=None, help="knob families to turn per node, comma-separated (default: int8,prune,low-rank,low-rank-gemm)")
    tun.add_argument("-j", "--jobs", type=int, default=1, help="probe in N worker processes")
    tun.add_argument("--metric", metavar="MODULE:FUNCTION", help="your metric: called with a model path, returns a number, higher is better")
    tun.add_argument("--fill", type=int, default=0, metavar="N",
                     help="after the bisection, up to N more verification runs, each adding one later step if the budget still holds "
                          "(default 0; the plan then fits the check feeds more closely: give a large --validation set)")
    tun.add_argument("--best-effort", action="store_true", help="write the best plan found even when it misses the budget")
    tun.add_argument("--report-html", metavar="PATH", help="write a self-contained HTML report of the tuning")
    tun.add_argument("--base", default="default", help="the pipeline every plan starts with (default: the default preset)")
    tun.set_defaults(func=_tune)

    ins = sub.add_parser("inspect", help="parameters, bytes, MACs per node, and what each pass could do")
    ins.add_argument("model")
    ins.add_argument("--json", action="store_true")
    ins.add_argument("--top", type=int, default=25, help="rows of the per-node table (0: all)")
    ins.add_argument("--input-shape", action="append", default=[], metavar="NAME=D1,D2,...",
                     help="fix an input's shape for MACs (e.g. input_ids=1,128); repeatable")
    ins.add_argument("--storage", action="store_true",
                     help="per weight tensor: bits per weight under each archive encoding, and pack's choice")
    ins.set_defaults(func=_inspect)

    pck = sub.add_parser("pack", help="store a model in an .onnxz archive (sparse, codebook and Huffman-coded weights)")
    pck.add_argument("input", help="the ONNX model (never modified)")
    pck.add_argument("-o", "--output", required=True, help="the archive to write (MODEL.onnxz)")
    pck.set_defaults(func=_pack)

    upk = sub.add_parser("unpack", help="the ONNX model an .onnxz archive holds, bit for bit")
    upk.add_argument("input", help="the archive (never modified)")
    upk.add_argument("-o", "--output", required=True, help="the ONNX model to write")
    upk.set_defaults(func=_unpack)

    cmp_ = sub.add_parser("compare", help="output drift between two models on the same feeds")
    cmp_.add_argument("a")
    cmp_.add_argument("b")
    _add_calibration_args(cmp_)
    cmp_.add_argument("--per-node", action="store_true", help="also rank the intermediate tensors both models compute")
    cmp_.add_argument("--top", type=int, default=20)
    cmp_.add_argument("--json", action="store_true")
    cmp_.set_defaults(func=_compare)

    lst = sub.add_parser("list-passes", help="the passes, their options and the presets")
    lst.add_argument("--json", action="store_true")
    lst.add_argument("--markdown", action="store_true", help="the README's table of passes")
    lst.set_defaults(func=_list_passes)
    return parser


def _add_calibration_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib", metavar="FILE_OR_DIR", help=".npz file or folder of them, arrays named by model input")
    p.add_argument("--calib-limit", type=int, metavar="N", help="use at most N feeds")
    p.add_argument("--random-calib", type=int, metavar="N", help="use N random feeds (only when no real data exists)")


def _optimize(args) -> int:
    from onnxcompress.api import compress
    from onnxcompress.errors import PipelineError
    from onnxcompress.instruments import Bisect, Dump
    from onnxcompress.pipeline import Pipeline

    text = args.pipeline if args.pipeline is not None else (args.preset or "default")
    if args.preset and args.preset not in registry.PRESETS:
        raise PipelineError(f"unknown preset '{args.preset}'; presets: {', '.join(registry.PRESETS)}")
    pipeline = Pipeline.parse(text)
    if args.print_pipeline:
        print(pipeline)
        return 0
    if not args.input or not args.output:
        raise OnnxCompressError("optimize needs an input model and -o OUTPUT")
    output = Path(args.output)
    if Path(args.input).resolve() == output.resolve():
        raise OnnxCompressError("the output must not be the input file: the input is never modified")
    if args.bisect == "auto":
        return _bisect_auto(args, pipeline)
    instruments = []
    bisect = None
    if args.bisect_limit is not None:
        if args.bisect_limit < 0:
            raise OnnxCompressError("--bisect-limit must be >= 0")
        bisect = Bisect(args.bisect_limit)
        instruments.append(bisect)
    if args.print_after_change:
        instruments.append(Dump(args.print_after_change))
    result = compress(
        args.input,
        pipeline,
        calibration=args.calib,
        random_calibration=args.random_calib,
        calibration_limit=args.calib_limit,
        drift=args.drift_budget,
        on_drift=args.on_drift,
        localize_drift=args.localize_drift,
        reference=args.reference,
        instruments=instruments,
        reproducer_dir=args.reproducer_dir or output.resolve().parent,
        verify=not args.no_verify,
    )
    if bisect is not None:
        print("\n".join(bisect.log))
    report_path = Path(args.report) if args.report else output.with_name(output.stem + ".report.json")
    result.save(output, report=report_path, external_data=True if args.external_data else None)
    print(result.report.table())
    print(f"wrote {output} and {report_path}")
    return 0


def _bisect_auto(args, pipeline) -> int:
    """``optimize --bisect auto``: print the first pass, then its first node rewrite, over the
    drift budget, ending with the command that reproduces it. Finding it (or finding that
    nothing breaks the budget) is the command's success: exit 0. No model, no report."""
    from onnxcompress import calibration as calib
    from onnxcompress.auto_bisect import bisect_to_node
    from onnxcompress.errors import CalibrationError, DriftBudgetError
    from onnxcompress.modelio import load_model

    if not args.calib and not args.random_calib:
        raise CalibrationError("--bisect auto needs calibration data: --calib FILE_OR_DIR or --random-calib N")
    if args.calib and args.random_calib:
        raise CalibrationError("give --calib or --random-calib, not both")
    if not args.drift_budget:
        raise DriftBudgetError("--bisect auto needs --drift-budget: the budget whose first break it looks for")
    unused = [flag for flag, given in (("--report", args.report), ("--print-after-change", args.print_after_change),
                                       ("--external-data", args.external_data), ("--localize-drift", args.localize_drift)) if given]
    if unused:
        raise OnnxCompressError(f"--bisect auto writes no model and no report: drop {', '.join(unused)}")
    model = load_model(args.input)
    if args.random_calib:
        feeds, data = calib.random_feeds(model, args.random_calib), ["--random-calib", str(args.random_calib)]
    else:
        feeds = calib.load_calibration(args.calib, model, args.calib_limit)
        data = ["--calib", args.calib] + (["--calib-limit", str(args.calib_limit)] if args.calib_limit else [])
    if args.reference:
        data += ["--reference", args.reference]
    finding = bisect_to_node(model, pipeline, feeds, args.drift_budget, reference=args.reference, verify=not args.no_verify)
    print(finding.describe(args.input, args.output, data))
    return 0


def _tune(args) -> int:
    from onnxcompress.knobs import DEFAULT_KNOBS
    from onnxcompress.progress import StageBars
    from onnxcompress.tuning import MetricError, tune

    if Path(args.input).resolve() == Path(args.output).resolve():
        raise OnnxCompressError("the output must not be the input file: the input is never modified")
    if not args.calib:
        raise OnnxCompressError("tune needs calibration data: --calib FILE_OR_DIR")
    try:
        with StageBars() as bars:
            result = tune(args.input, args.calib, args.budget, args.objective, args.knobs or DEFAULT_KNOBS,
                          args.jobs, args.metric, args.best_effort, args.base, args.calib_limit, args.validation, bars,
                          args.fill)
    except MetricError as exc:
        if exc.details:
            print(exc.details.rstrip(), file=sys.stderr)
        raise
    written = result.save(args.output, html=args.report_html)
    print(_tune_summary(result))
    print("wrote " + ", ".join(str(p) for p in written.values()))
    return 0 if result.within_budget else 1


def _tune_summary(result) -> str:
    probes = result.probes
    rewritten = sum(p.status == "rewritten" for p in probes)
    lines = [f"sensitivity: {len(probes)} probes ({rewritten} rewrote their node, {len(probes) - rewritten} refused or failed) "
             f"in {result.timings['sensitivity_s']:.1f} s"]
    rows = [("plan", "predicted damage", "damage", result.objective, "budget")]
    for p in result.points:
        mark = "within" if p.within_budget else p.reason
        rows.append((p.label, f"{p.predicted_damage:.3g}", f"{p.damage:.3g}", f"{p.objective:,.0f}", mark + (" <- chosen" if p is result.chosen else "")))
    lines += ["search (plans of the first k steps of the greedy order, + the later steps the fill added, run whole):",
              _table(rows)]
    base, out = result.baseline["objective"], result.result["objective"]
    if base and out:
        lines.append(f"{result.objective}: {base:,.0f} -> {out:,.0f} ({base / out:.2f}x) within '{result.budget}'"
                     if result.within_budget else f"budget '{result.budget}' NOT met (--best-effort): {result.chosen.reason}")
    lines.append(f"plan: {result.pipeline}")
    lines.append(f"tuning took {result.timings['total_s']:.1f} s")
    return "\n".join(lines)


def _inspect(args) -> int:
    from onnxcompress.analysis.cost import compute_cost
    from onnxcompress.modelio import load_model

    if args.storage:
        return _inspect_storage(args)
    model = load_model(args.model)
    try:
        cost = compute_cost(model, input_shapes=_parse_shapes(args.input_shape) or None)
    except ValueError as exc:
        raise OnnxCompressError(f"--input-shape: {exc}") from None
    candidates = []
    for cls in registry.all_passes():
        candidates += cls().candidates(model)
    if args.json:
        data = cost.to_dict()
        data["candidates"] = [c.__dict__ for c in candidates]
        print(json.dumps(data, indent=2))
        return 0
    nodes = sorted(cost.nodes, key=lambda n: (n.macs, n.params), reverse=True)
    nodes = [n for n in nodes if n.params or n.macs]
    shown = nodes if args.top == 0 else nodes[: args.top]
    rows = [("node", "op", "params", "bytes", "MACs")]
    rows += [(n.node, n.op_type, f"{n.params:,}", f"{n.bytes:,}", f"{n.macs:,}") for n in shown]
    print(_table(rows))
    if len(shown) < len(nodes):
        print(f"... {len(nodes) - len(shown)} more nodes with parameters or MACs (--top 0 shows all)")
    print(f"\ntotal: {cost.params:,} parameters, {cost.bytes:,} bytes, {cost.macs:,} MACs (batch 1)")
    if cost.unknown_shape_nodes:
        print(f"MACs unknown (shapes not inferred) for {len(cost.unknown_shape_nodes)} nodes")
    print("\nops: " + ", ".join(f"{op} {n}" for op, n in sorted(cost.op_histogram.items(), key=lambda kv: -kv[1])))
    by_pass = Counter(c.pass_name for c in candidates)
    print("\ncandidates:")
    if not candidates:
        print("  none of the registered passes would rewrite this model")
    for name, count in sorted(by_pass.items()):
        examples = [c for c in candidates if c.pass_name == name][:3]
        print(f"  {name}: {count} ({'; '.join(f'{c.node}: {c.what}' for c in examples)}{'; ...' if count > 3 else ''})")
    return 0


def _inspect_storage(args) -> int:
    from onnxcompress.archive import storage_report

    path = Path(args.model)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise OnnxCompressError(f"cannot read {path}: {exc.strerror or exc}") from None
    tensors = storage_report(data)
    if args.json:
        print(json.dumps([{**t.__dict__, "encodings": [e.__dict__ for e in t.encodings]} for t in tensors], indent=2))
        return 0
    shown = sorted(tensors, key=lambda t: t.raw_bytes, reverse=True)
    shown = shown if args.top == 0 else shown[: args.top]
    used = list(dict.fromkeys(e.encoding for t in shown for e in t.encodings))
    rows = [("tensor", "dtype", "elements", "bytes", *(f"{e} b/w" for e in used), "packed", "chosen")]
    for t in shown:
        bits = [_bits(t, e) for e in used]
        rows.append((t.name, t.dtype, f"{t.elements:,}", f"{t.raw_bytes:,}",
                     *("-" if b is None else f"{b:.2f}" for b in bits), f"{t.chosen_bytes:,}", t.chosen))
    print(_table(rows))
    if len(shown) < len(tensors):
        print(f"... {len(tensors) - len(shown)} more tensors (--top 0 shows all)")
    raw = sum(t.raw_bytes for t in tensors)
    packed = sum(t.chosen_bytes for t in tensors)
    print(f"\n{len(tensors)} tensors: {raw:,} bytes raw, {packed:,} bytes packed "
          f"({raw / max(packed, 1):.1f}x; the graph and the archive header come on top)")
    print("b/w: bits per element under each encoding; 'inline': too small to pack apart, stays in the graph")
    return 0


def _bits(tensor, encoding: str) -> float | None:
    try:
        return 8 * tensor.size(encoding) / max(tensor.elements, 1)
    except KeyError:
        return None


def _pack(args) -> int:
    from onnxcompress.archive import pack_file

    out = pack_file(args.input, args.output)
    before, after = Path(args.input).stat().st_size, out.stat().st_size
    print(f"wrote {out}: {before:,} -> {after:,} bytes ({before / max(after, 1):.1f}x smaller)")
    return 0


def _unpack(args) -> int:
    from onnxcompress.archive import unpack_file

    out = unpack_file(args.input, args.output)
    print(f"wrote {out} ({out.stat().st_size:,} bytes, checked against the archive's SHA-256)")
    return 0


def _parse_shapes(items: list[str]) -> dict[str, list[int]]:
    shapes = {}
    for item in items:
        name, _, dims = item.partition("=")
        try:
            shapes[name] = [int(d) for d in dims.split(",")]
        except ValueError:
            raise OnnxCompressError(f"--input-shape '{item}': expected NAME=D1,D2,... with integer sizes") from None
        if not name or not dims:
            raise OnnxCompressError(f"--input-shape '{item}': expected NAME=D1,D2,...")
    return shapes


def _compare(args) -> int:
    from onnxcompress import calibration as calib
    from onnxcompress.compare import compare_outputs, per_tensor_drift, rank_by_drift
    from onnxcompress.errors import CalibrationError
    from onnxcompress.metrics import format_db
    from onnxcompress.modelio import load_model

    a, b = load_model(args.a), load_model(args.b)
    if args.calib:
        feeds = calib.load_calibration(args.calib, a, args.calib_limit)
        calib.load_calibration(feeds, b)  # the second model must accept the same feeds
    elif args.random_calib:
        feeds = calib.random_feeds(a, args.random_calib)
    else:
        raise CalibrationError("compare needs feeds: --calib FILE_OR_DIR, or --random-calib N")
    drifts = compare_outputs(a, b, feeds)
    ranked = rank_by_drift(per_tensor_drift(a, b, feeds)) if args.per_node else []
    if args.json:
        data = {"outputs": {k: d.to_dict() for k, d in drifts.items()}}
        if args.per_node:
            data["tensors"] = [{"name": t.name, "op": t.producer, **t.drift.to_dict()} for t in ranked]
        print(json.dumps(data, indent=2))
        return 0
    rows = [("output", "SQNR", "max-abs", "cosine", "top-1 agreement")]
    for name, d in drifts.items():
        rows.append((name, format_db(d.sqnr_db), f"{d.max_abs:.3g}", f"{d.cosine:.6f}", "-" if d.top1 is None else f"{d.top1:.4f}"))
    print(_table(rows))
    if args.per_node:
        print(f"\nintermediate tensors in both models, worst first ({len(ranked)} compared):")
        rows = [("tensor", "op", "SQNR", "max-abs", "cosine")]
        for t in ranked[: args.top or None]:
            rows.append((t.name, t.producer, format_db(t.drift.sqnr_db), f"{t.drift.max_abs:.3g}", f"{t.drift.cosine:.6f}"))
        print(_table(rows))
    return 0


def _list_passes(args) -> int:
    passes = registry.all_passes()
    if args.json:
        data = {
            "passes": [
                {"name": c.name, "summary": c.summary(), "requires": list(c.prerequisites), "lossless": c.lossless,
                 "options": [dict(zip(("name", "type", "default", "help"), o)) for o in describe_options(c.Options)]}
                for c in passes
            ],
            "presets": {k: v[0] for k, v in registry.PRESETS.items()},
        }
        print(json.dumps(data, indent=2))
        return 0
    if args.markdown:
        print(passes_markdown())
        return 0
    for cls in passes:
        needs = f" (after {', '.join(cls.prerequisites)})" if cls.prerequisites else ""
        print(f"{cls.name}: {cls.summary()}{needs}")
        for name, kind, default, help_ in describe_options(cls.Options):
            print(f"    {name}={default}  [{kind}]  {help_}")
    print("\npresets:")
    for name, (text, about) in registry.PRESETS.items():
        print(f"  {name}: {about}\n      {text}")
    return 0


def passes_markdown() -> str:
    """The README's table of passes, generated from the registry."""
    lines = ["| pass | what it does | options (default) | runs after |", "|---|---|---|---|"]
    for cls in registry.builtin_passes():
        opts = "<br>".join(f"`{n}={d}`: {h}".replace("|", "\\|") for n, _, d, h in describe_options(cls.Options)) or "none"
        lines.append(f"| `{cls.name}` | {cls.summary()} | {opts} | {', '.join(cls.prerequisites) or '-'} |")
    return "\n".join(lines)


def _table(rows) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
