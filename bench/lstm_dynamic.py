"""Dynamic int8 LSTMs: quantize-dynamic against onnxruntime's quantize_dynamic.

None of the project's real models has an LSTM, so this builds a seeded two-layer bidirectional
LSTM encoder (a speech or OCR-style recurrent head: ``--input`` features, ``--hidden`` units
per direction, ``--steps`` time steps, batch 1), with weights drawn at the scale PyTorch
initialises them (uniform in ±1/√hidden). Both tools get the same FP32 file; reported: file
size ratio, latency ratio against FP32 (interleaved in one process, 2 threads), and the
output's largest difference relative to its largest magnitude, over ``--feeds`` random
sequences. Run:

    python bench/lstm_dynamic.py

and it prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_session, latency_ratio, markdown_table  # noqa: E402

import onnxcompress  # noqa: E402


def lstm_encoder(input_size: int, hidden: int, steps: int, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    bound = 1.0 / np.sqrt(hidden)
    nodes, inits = [], []
    x, width = "x", input_size
    for layer in range(2):
        names = [f"W{layer}", f"R{layer}", f"B{layer}"]
        for name, shape in zip(names, [(2, 4 * hidden, width), (2, 4 * hidden, hidden), (2, 8 * hidden)]):
            inits.append(numpy_helper.from_array(rng.uniform(-bound, bound, shape).astype(np.float32), name))
        nodes.append(helper.make_node("LSTM", [x, *names], [f"y{layer}"], name=f"lstm{layer}",
                                      hidden_size=hidden, direction="bidirectional"))
        # [T, 2, 1, H] -> [T, 1, 2H]
        nodes.append(helper.make_node("Transpose", [f"y{layer}"], [f"t{layer}"], perm=[0, 2, 1, 3]))
        nodes.append(helper.make_node("Reshape", [f"t{layer}", "shape"], [f"h{layer}"]))
        x, width = f"h{layer}", 2 * hidden
    inits.append(numpy_helper.from_array(np.array([steps, 1, 2 * hidden], np.int64), "shape"))
    graph = helper.make_graph(nodes, "lstm_encoder",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [steps, 1, input_size])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [steps, 1, 2 * hidden])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def relative_error(reference, candidate, feeds) -> float:
    a, b = bench_session(reference), bench_session(candidate)
    worst = 0.0
    for feed in feeds:
        expected, actual = a.run(None, feed)[0], b.run(None, feed)[0]
        worst = max(worst, float(np.abs(expected - actual).max() / np.abs(expected).max()))
    return worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=int, default=80)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--feeds", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=100)
    args = parser.parse_args()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    work = Path(tempfile.mkdtemp(prefix="bench-lstm-"))
    fp32 = work / "fp32.onnx"
    onnx.save(lstm_encoder(args.input, args.hidden, args.steps), fp32)
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.standard_normal((args.steps, 1, args.input)).astype(np.float32)} for _ in range(args.feeds)]
    candidates = {}
    candidates["ORT quantize_dynamic (QInt8)"] = work / "ort.onnx"
    quantize_dynamic(str(fp32), str(candidates["ORT quantize_dynamic (QInt8)"]), weight_type=QuantType.QInt8)
    for spec in ("quantize-dynamic", "quantize-dynamic{lstm_per_channel=true}"):
        path = work / f"{spec}.onnx"
        onnxcompress.compress(fp32, spec).save(path)
        candidates[f"ours `{spec}`"] = path
    rows = [{"method": "FP32", "size": 1.0, "latency": 1.0, "max rel error": 0.0, "kernels": "LSTM"}]
    for label, path in candidates.items():
        kernels = sorted({n.op_type for n in onnx.load(path).graph.node} - {"Transpose", "Reshape"})
        rows.append({"method": label, "size": path.stat().st_size / fp32.stat().st_size,
                     "latency": latency_ratio(fp32, path, feeds[0], rounds=args.rounds),
                     "max rel error": relative_error(fp32, path, feeds), "kernels": ", ".join(kernels)})
        print(f"{label}: {rows[-1]}", file=sys.stderr, flush=True)
    print(markdown_table(rows, ["method", "size", "latency", "max rel error", "kernels"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
