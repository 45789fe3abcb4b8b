"""`tune` on real models: the budget holds on held-out feeds, the plan rebuilds the model bit for
bit, and the evaluation metric (data the tuner never saw) agrees with the budget.

Measured (bench/tune.py, onnxruntime 1.32, 32 calibration feeds): mobilenet_v2 at
``top1>=0.99,sqnr>=36`` with the share knob, 7.42 MB at evaluation top-1 agreement 0.991,
1.39x smaller than the best uniform preset within the target (int8-dynamic, 10.32 MB), tuned in
49-54 s. minilm_l6 at ``cosine>=0.992`` with 96 calibration feeds (48 check feeds): 16.29 MB at
evaluation accuracy 0.815 against FP32's 0.814, 1.41x smaller than int8-dynamic (22.92 MB), tuned
in 101-109 s.
"""

from __future__ import annotations

import json

import pytest

import models
import onnxcompress
from onnxcompress.metrics import output_drift, worst
from onnxcompress.modelio import model_bytes
from onnxcompress.runtime import make_session, run_all
from onnxcompress.modelio import initializer_bytes

pytestmark = pytest.mark.real_model


def test_fmnist_tuned_plan_keeps_the_budget_and_rebuilds_bit_for_bit(tmp_path):
    name = "fmnist_cnn"
    source = models.fetch(name)
    feeds = models.calibration_feeds(name, 32)
    result = onnxcompress.tune(str(source), feeds, "sqnr>=30", "size", knobs="int8,prune,low-rank-gemm")
    assert result.within_budget and result.chosen.k > 0
    assert result.result["size"] < result.baseline["size"] / 3
    held_out = feeds[16:]
    reference = run_all(make_session(str(source)), held_out)
    assert worst(output_drift(reference, run_all(make_session(result.model), held_out))).sqnr_db >= 30
    written = result.save(tmp_path / "fmnist.tuned.onnx")
    fit = json.loads(written["plan"].read_text())["about"]["fit_feeds"]
    again = onnxcompress.compress(str(source), f"@{written['plan']}", calibration=feeds[:fit])
    assert model_bytes(again.model) == model_bytes(result.model), _differences(result.model, again.model)
    accuracy = models.evaluate(name, written["model"])["accuracy"]
    assert accuracy >= models.evaluate(name, source)["accuracy"] - 0.02


def _differences(tuned, rebuilt) -> str:
    """What differs between two models that should be the same bytes: initializers by name
    (with the largest difference), then the node lists."""
    a, b = tuned.graph.initializers, rebuilt.graph.initializers
    lines = [f"initializers only in one: {sorted(set(a) ^ set(b))}"]
    for name in sorted(set(a) & set(b)):
        x, y = a[name].const_value.numpy(), b[name].const_value.numpy()
        if x.shape != y.shape or x.tobytes() != y.tobytes():
            gap = float(abs(x.astype("float64") - y.astype("float64")).max()) if x.shape == y.shape else None
            lines.append(f"{name}: {x.dtype}{x.shape} vs {y.dtype}{y.shape}, largest difference {gap}")
    nodes = [(n.op_type, n.name) for n in tuned.graph], [(n.op_type, n.name) for n in rebuilt.graph]
    if nodes[0] != nodes[1]:
        lines.append(f"nodes differ: {nodes[0]} vs {nodes[1]}")
    return "; ".join(lines)


def test_mobilenet_shared_weights_within_top1_and_sqnr_budget(tmp_path):
    name = "mobilenet_v2"
    source = models.fetch(name)
    feeds = models.calibration_feeds(name, 32)
    result = onnxcompress.tune(str(source), feeds, "top1>=0.99,sqnr>=36", "size", knobs="share,prune,low-rank-gemm")
    assert result.within_budget and result.chosen.k > 0
    assert result.chosen.measures["top1"] >= 0.99 and result.chosen.measures["sqnr_db"] >= 36
    path = result.save(tmp_path / "mobilenet.tuned.onnx")["model"]
    uniform = onnxcompress.compress(str(source), "int8-dynamic", calibration=feeds[:16])
    assert result.result["size"] < 0.8 * initializer_bytes(uniform.model)  # measured 0.72
    assert models.evaluate(name, path)["top1_agreement"] >= 0.985  # measured 0.991


def test_minilm_tuned_plan_keeps_the_accuracy_within_half_a_point(tmp_path):
    name = "minilm_l6"
    source = models.fetch(name)
    feeds = models.calibration_feeds(name, 96)  # 48 check feeds: on 16 the cosine budget lets 0.9 point go
    result = onnxcompress.tune(str(source), feeds, "cosine>=0.992", "size", knobs="int4,int8-dynamic")
    assert result.within_budget and result.chosen.measures["cosine"] >= 0.992
    path = result.save(tmp_path / "minilm.tuned.onnx")["model"]
    uniform = onnxcompress.compress(str(source), "int8-dynamic", calibration=feeds[:48])
    assert result.result["size"] * 1.3 <= initializer_bytes(uniform.model)  # measured 1.41x
    accuracy = models.evaluate(name, path)["accuracy"]
    assert accuracy >= models.evaluate(name, source)["accuracy"] - 0.005  # measured 0.815 against 0.814
