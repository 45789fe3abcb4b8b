"""The tuner's latency estimate against onnxruntime, on mobilenet_v2 with int8 in some places.

``tune --objective latency`` cannot time its probes (one node changed, on a shared CPU), so it
estimates (:class:`onnxcompress.sensitivity.Objective`): a float MAC costs 1, an int8 MAC
``INT8_MAC_COST`` (``DEPTHWISE_INT8_MAC_COST`` in a depthwise Conv), and every element that a
QuantizeLinear or DequantizeLinear converts at a border between float and int8 nodes
``CONVERSION_COST``. This script quantizes a few regions of
mobilenet_v2 (one conv, one block, runs of blocks, every pointwise or depthwise conv, the whole
model), measures each latency ratio against FP32 (interleaved, batch 1, 2 threads), prints it
beside the estimate, and fits the three constants to the measurements by least squares.

    python bench/latency_model.py
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import latency_ratio, markdown_table  # noqa: E402

import models  # noqa: E402
import onnxcompress  # noqa: E402
from onnxcompress.pipeline import format_value, name_pattern  # noqa: E402
from onnxcompress.sensitivity import Objective, latency_terms  # noqa: E402
from onnxcompress.tuning import _input_shapes  # noqa: E402

# Regions quantized, as regular expressions over mobilenet_v2's Conv names.
REGIONS = {
    "stem conv": r"/features/features\.0/.*",
    "one 1x1 conv (block 2, 16->96 at 112x112)": r"/features/features\.2/conv/conv\.0/.*",
    "block 2": r"/features/features\.2/.*",
    "blocks 2-3": r"/features/features\.[23]/.*",
    "blocks 4-7": r"/features/features\.[4-7]/.*",
    "blocks 14-17": r"/features/features\.1[4-7]/.*",
    "1x1 convs of blocks 14-17": r"/features/features\.1[4-7]/conv/conv\.(0/conv\.0\.0|2)/.*",
    "every depthwise conv": r"/features/features\.([1-9]|1[0-7])/conv/conv\.(1/conv\.1\.0|0/conv\.0\.0)/Conv$",
    "every conv": r".*",
}


def region_pipeline(nodes: list[str]) -> str:
    inner = ",".join(f"@{format_value(name_pattern(n))}{{skip=false}}" for n in nodes)
    return f"default,quantize-qdq{{calibration=minmax,{inner},@.*{{skip=true}}}}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args()
    name = "mobilenet_v2"
    source = str(models.fetch(name))
    feeds = models.calibration_feeds(name, 8)
    base = onnxcompress.compress(source, "default").model
    shapes = _input_shapes(base, feeds)
    estimate = Objective("latency", shapes)
    base_macs, base_estimate = latency_terms(base, shapes).macs, estimate(base)
    convs = [n.name for n in base.graph if n.op_type == "Conv"]
    rows, fit_rows, fit_y = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for label, pattern in REGIONS.items():
            nodes = [c for c in convs if re.fullmatch(pattern, c)]
            if label == "every depthwise conv":
                nodes = [c for c in nodes if _depthwise(base, c)]
            model = onnxcompress.compress(source, region_pipeline(nodes), calibration=feeds).model
            path = Path(tmp) / "candidate.onnx"
            onnxcompress.save_model(model, path)
            measured = latency_ratio(source, path, feeds[0], rounds=args.rounds)
            terms = latency_terms(model, shapes)
            rows.append({"int8 region": label, "convs": len(nodes),
                         "int8 MACs share": (terms.int8_macs + terms.depthwise_int8_macs) / base_macs,
                         "depthwise share": terms.depthwise_int8_macs / base_macs,
                         "conversions (elements)": terms.converted, "estimate": estimate(model) / base_estimate,
                         "measured": measured})
            fit_rows.append([-terms.int8_macs, -terms.depthwise_int8_macs, terms.converted])
            fit_y.append((measured - 1.0) * base_macs)
    (saved, saved_depthwise, conversion), *_ = np.linalg.lstsq(np.array(fit_rows, float), np.array(fit_y), rcond=None)
    print(f"**{name}**: latency ratio against FP32, the tuner's estimate (INT8_MAC_COST "
          f"{Objective.INT8_MAC_COST}, DEPTHWISE_INT8_MAC_COST {Objective.DEPTHWISE_INT8_MAC_COST}, "
          f"CONVERSION_COST {Objective.CONVERSION_COST}) and onnxruntime's")
    print()
    print(markdown_table(rows, list(rows[0])))
    print()
    print(f"Least-squares fit: INT8_MAC_COST {1 - saved:.2f}, DEPTHWISE_INT8_MAC_COST {1 - saved_depthwise:.2f}, "
          f"CONVERSION_COST {conversion:.1f}")


def _depthwise(model, name: str) -> bool:
    node = next(n for n in model.graph if n.name == name)
    group = node.attributes.get("group")
    return group is not None and group.as_int() > 1


if __name__ == "__main__":
    main()
