"""The tuner's latency estimate against onnxruntime: int8 regions of mobilenet_v2, weight-only
regions of minilm_l6.

``tune --objective latency`` cannot time its probes (one node changed, on a shared CPU), so it
estimates (:class:`onnxcompress.sensitivity.Objective`): a float MAC costs 1, a MAC of a
low-precision kernel ``MAC_COSTS[kind]`` (int8 QDQ, depthwise int8, dynamic int8 with int8 or
uint8 weights, int4), and
every element that a QuantizeLinear or DequantizeLinear converts at a border between float and
int8 nodes ``CONVERSION_COST``. This script quantizes regions of both models (for mobilenet_v2:
one conv, one block, runs of blocks, every depthwise conv, every conv; for minilm_l6: the
attention or the feed-forward MatMuls of some layers, in dynamic int8 (both storages) or int4, and a
low-rank region that removes float MACs, which pins the time of its ops without MACs), measures each
latency ratio against the normalised FP32 model the tuner starts from (``default``;
interleaved, batch 1, 2 threads), prints it beside the estimate,
and fits the constants to the measurements by least squares, bounded so that no MAC, conversion
or overhead costs less than nothing.

    python bench/latency_model.py
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
from scipy.optimize import lsq_linear

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import latency_ratio, markdown_table  # noqa: E402

import models  # noqa: E402
import onnxcompress  # noqa: E402
from onnxcompress.pipeline import format_value, name_pattern  # noqa: E402
from onnxcompress.sensitivity import LatencyTerms, Objective, latency_terms  # noqa: E402
from onnxcompress.instruments.cost import symbolic_dims_from  # noqa: E402

# block 1 starts with its depthwise conv, blocks 2-17 expand first
_MOBILENET_DEPTHWISE = r"/features/features\.1/conv/conv\.0/conv\.0\.0/Conv|/features/features\.([2-9]|1[0-7])/conv/conv\.1/conv\.1\.0/Conv"
_MINILM_FFN = r"/bert/encoder/layer\.{}/(intermediate|output)/dense/MatMul"
_MINILM_ATTENTION = r"/bert/encoder/layer\.{}/attention/.*MatMul"

QDQ, INT4 = ("quantize-qdq", "calibration=minmax"), ("quantize-weights-int4", "method=rtn")
DYNAMIC, DYNAMIC_UINT8 = ("quantize-dynamic", ""), ("quantize-dynamic", "storage=uint8")

# Per model: the op type whose constant-weight nodes the regions name, and the regions: (label,
# (pass, its options), regular expression over the names of the nodes it rewrites).
REGIONS = {
    "mobilenet_v2": ("Conv", [
        ("stem conv", QDQ, r"/features/features\.0/.*"),
        ("one 1x1 conv (block 2, 16->96 at 112x112)", QDQ, r"/features/features\.2/conv/conv\.0/.*"),
        ("block 2", QDQ, r"/features/features\.2/.*"),
        ("blocks 2-3", QDQ, r"/features/features\.[23]/.*"),
        ("blocks 4-7", QDQ, r"/features/features\.[4-7]/.*"),
        ("blocks 14-17", QDQ, r"/features/features\.1[4-7]/.*"),
        ("1x1 convs of blocks 14-17", QDQ, r"/features/features\.1[4-7]/conv/conv\.(0/conv\.0\.0|2)/.*"),
        ("every depthwise conv", QDQ, _MOBILENET_DEPTHWISE),
        ("every conv", QDQ, r".*"),
    ]),
    "minilm_l6": ("MatMul", [
        ("attention of layers 0-2, dynamic int8", DYNAMIC, _MINILM_ATTENTION.format("[0-2]")),
        ("feed-forward of layers 0-2, dynamic int8", DYNAMIC, _MINILM_FFN.format("[0-2]")),
        ("every MatMul, dynamic int8", DYNAMIC, r".*"),
        ("feed-forward of layers 0-2, dynamic uint8", DYNAMIC_UINT8, _MINILM_FFN.format("[0-2]")),
        ("every MatMul, dynamic uint8", DYNAMIC_UINT8, r".*"),
        ("feed-forward of layers 0-2, int4", INT4, _MINILM_FFN.format("[0-2]")),
        ("attention of layers 0-2, int4", INT4, _MINILM_ATTENTION.format("[0-2]")),
        ("every MatMul, int4", INT4, r".*"),
        ("every MatMul, rank 0.5 (float)", ("low-rank-gemm", "ratio=0.5"), r".*"),
        ("feed-forward of every layer, rank 0.25 (float)", ("low-rank-gemm", "ratio=0.25"), _MINILM_FFN.format(".")),
    ]),
}


def region_pipeline(entry: tuple[str, str], nodes: list[str]) -> str:
    pass_name, options = entry
    inner = [options] if options else []
    inner += [f"@{format_value(name_pattern(n))}{{skip=false}}" for n in nodes] + ["@.*{skip=true}"]
    return f"default,{pass_name}{{{','.join(inner)}}}"


def measure(name: str, rounds: int) -> tuple[list[dict], list[tuple[LatencyTerms, float]], int, dict]:
    """One model's table rows, each region's (latency terms, measured ratio), the MACs of the
    normalised model and the input shapes latency was measured at."""
    source = str(models.fetch(name))
    feeds = models.calibration_feeds(name, 8)
    base = onnxcompress.compress(source, "default").model
    shapes = symbolic_dims_from(base, feeds[0])  # as the tuner sizes them
    estimate = Objective("latency", shapes)
    base_macs, base_estimate = latency_terms(base, shapes).macs, estimate(base)
    op_type, regions = REGIONS[name]
    weighted = [n for n in base.graph if n.op_type == op_type and len(n.inputs) > 1 and n.inputs[1] is not None
                and n.inputs[1].const_value is not None]
    rows, measured = [], []
    with tempfile.TemporaryDirectory() as tmp:
        reference = Path(tmp) / "normalised.onnx"  # what the tuner's plans start from
        onnxcompress.save_model(base, reference)
        for label, entry, pattern in regions:
            nodes = [n.name for n in weighted if re.fullmatch(pattern, n.name)]
            model = onnxcompress.compress(source, region_pipeline(entry, nodes), calibration=feeds).model
            path = Path(tmp) / "candidate.onnx"
            onnxcompress.save_model(model, path)
            ratio = latency_ratio(reference, path, feeds[0], rounds=rounds)
            terms = latency_terms(model, shapes)
            rows.append({"region": label, "nodes": len(nodes), "MACs": terms.macs / base_macs,
                         **{f"{kind} MACs": macs / base_macs for kind, macs in terms.kernel_macs.items() if macs},
                         "conversions (elements)": terms.converted, "estimate": estimate(model) / base_estimate,
                         "measured": ratio})
            measured.append((terms, ratio))
    return rows, measured, base_macs, {k: list(v.shape) for k, v in feeds[0].items()}


# Models whose time holds much besides MACs (at 17 tokens, minilm_l6's normalisation, attention
# scores and data movement take about as long as its MatMuls): their fit has one more unknown,
# that time, pinned by the low-rank regions. mobilenet_v2's time is its convolutions.
OVERHEAD_FITTED = ("minilm_l6",)


def fit(measured: dict[str, tuple[list[tuple[LatencyTerms, float]], int]]) -> str:
    """Least squares over every region of every model, in float-MAC equivalents:
    (ratio - 1) · (base MACs + overhead) = (MACs - base MACs) - Σ (1 - MAC cost) · kernel MACs
    + CONVERSION_COST · converted, the overhead (the time of the ops without MACs, which no
    region changes) an unknown for the models in OVERHEAD_FITTED and 0 for the others."""
    kinds = list(Objective.MAC_COSTS)
    with_overhead = [name for name in measured if name in OVERHEAD_FITTED]
    matrix, target = [], []
    for name, (regions, base_macs) in measured.items():
        for terms, ratio in regions:
            overhead = [-(ratio - 1.0) if name == other else 0.0 for other in with_overhead]
            matrix.append([-terms.kernel_macs[k] for k in kinds] + [terms.converted] + overhead)
            target.append((ratio - 1.0) * base_macs - (terms.macs - base_macs))  # removed float MACs cost 1 each
    matrix = np.array(matrix, float)
    used = np.flatnonzero(np.any(matrix != 0, axis=0))  # what no region exercised cannot be fitted
    # Bounded: no MAC costs less than nothing, nor does a conversion or an overhead.
    upper = np.array([1.0 if i < len(kinds) else np.inf for i in used])
    lower = np.array([-np.inf if i < len(kinds) else 0.0 for i in used])
    solution = lsq_linear(matrix[:, used], np.array(target), bounds=(lower, upper)).x
    parts = []
    for i, value in zip(used, solution):
        if i < len(kinds):
            parts.append(f"{kinds[i]} {1 - value:.2f}")
        elif i == len(kinds):
            parts.append(f"CONVERSION_COST {value:.1f}")
        else:
            name = with_overhead[i - len(kinds) - 1]
            parts.append(f"{name}'s ops without MACs {value / measured[name][1]:.2f} of its MACs")
    return ", ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(REGIONS), choices=list(REGIONS))
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args()
    constants = ", ".join(f"{kind} {cost}" for kind, cost in Objective.MAC_COSTS.items())
    print(f"Latency ratio against the normalised FP32 model: the tuner's estimate (MAC costs {constants}; "
          f"CONVERSION_COST {Objective.CONVERSION_COST}) and onnxruntime's")
    measured = {}
    for name in args.models:
        rows, regions, base_macs, shapes = measure(name, args.rounds)
        measured[name] = (regions, base_macs)
        columns = list(dict.fromkeys(c for row in rows for c in row))
        print(f"\n**{name}** (batch 1, inputs {', '.join(f'{k} {v}' for k, v in shapes.items())})\n")
        print(markdown_table(rows, columns))
    print(f"\nLeast-squares fit: {fit(measured)}")


if __name__ == "__main__":
    main()
