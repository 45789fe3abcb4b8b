"""prune-channels and prune-magnitude on the real models.

The exactness check zeroes the least important channels of every prunable group (source
weights, biases and depthwise filters) and then prunes exactly those: on a real graph with
residual Adds, depthwise convs, Concat and attention, every output must stay the same. A
wrong coupling anywhere would change the outputs or break the model.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import models
import onnxcompress
from onnxcompress.analysis.channels import channel_groups
from onnxcompress.channel_importance import importance_of_units
from onnxcompress.metrics import tensor_drift
from onnxcompress.runtime import make_session, run_all

pytestmark = pytest.mark.real_model


def _zero_least_important(model: ir.Model, ratio: float) -> int:
    groups = channel_groups(model)
    importance = importance_of_units(model, groups, "l1", None)
    zero = set()
    for units in groups.groups:
        free = sorted((u for u in units if u not in groups.blocked), key=lambda u: importance[u])
        zero.update(free[: int(math.floor(ratio * len(units)))])
    for item in groups.slices:
        positions = [i for i, a in enumerate(item.atoms) if groups.unit(a) in zero]
        # Sources and what adds to their output (depthwise filters and biases, bias Adds) must be
        # zero for a channel to stay zero; per-channel scales (Mul, PRelu) do not matter.
        if not positions or item.role == "sink" or (item.role == "param" and item.node.op_type not in ("Conv", "Add", "Sub")):
            continue
        value = item.node.inputs[item.input_index]
        array = value.const_value.numpy().copy()
        index = [slice(None)] * array.ndim
        index[item.axis] = positions
        array[tuple(index)] = 0
        value.const_value = ir.tensor(array, name=value.name)
    # A scalar added to a channel (PP-OCR's learnable hardswish bias) makes a zero channel
    # constant; zero those scalars too, so that zeroed channels really carry nothing.
    for node in model.graph:
        if node.op_type in ("Add", "Sub") and any(v.name in groups.tensors for v in node.inputs if v is not None):
            for value in node.inputs:
                if value is not None and value.const_value is not None and value.const_value.size == 1:
                    array = np.zeros_like(value.const_value.numpy())
                    value.const_value = ir.tensor(array, name=value.name)
    return len(zero)


@pytest.mark.parametrize("name", ["mobilenet_v2", "ppocrv4_rec", "minilm_l6", "fmnist_cnn"])
def test_pruning_zeroed_channels_of_a_real_model_is_exact(name):
    feeds = models.calibration_feeds(name, 3)
    model = onnxcompress.compress(models.fetch(name), "default").model
    zeroed = _zero_least_important(model, 0.25)
    assert zeroed > 0
    reference = run_all(make_session(model), feeds)
    result = onnxcompress.compress(model, "prune-channels{ratio=0.25}", calibration=feeds)
    entry = next(p for p in result.report.passes if p.name == "prune-channels")
    assert entry.status == "changed"
    assert result.report.final_cost["params"] < result.report.input_cost["params"]
    outputs = run_all(make_session(result.model), feeds)
    for key in reference[0]:
        # Exact up to float rounding (shorter sums round differently): >= 60 dB on every output.
        drift = tensor_drift([r[key] for r in reference], [o[key] for o in outputs])
        assert drift.sqnr_db >= 60, (key, drift)
    onnx.checker.check_model(ir.to_proto(result.model))


def test_minilm_ffn_neurons_are_removed_and_attention_is_refused_with_reasons():
    feeds = models.calibration_feeds("minilm_l6", 2)
    result = onnxcompress.compress(models.fetch("minilm_l6"), "prune-channels{ratio=0.25}", calibration=feeds)
    entry = next(p for p in result.report.passes if p.name == "prune-channels")
    rewritten = [r for r in entry.records if r.action == "rewritten"]
    assert len(rewritten) == 6 and all("removed 384 of 1536" in r.detail for r in rewritten)
    refused = [r for r in entry.records if r.action == "refused"]
    assert refused and all(r.detail for r in refused)
    shapes = sorted({tuple(n.inputs[1].const_value.shape) for n in result.model.graph
                     if n.op_type == "MatMul" and n.inputs[1].const_value is not None})
    assert (384, 1152) in shapes and (1152, 384) in shapes


def test_reconstruction_beats_plain_l1_on_digits(tmp_path):
    feeds = models.calibration_feeds("digits_cnn", 64)
    scores = {}
    for reconstruct in ("false", "true"):
        result = onnxcompress.compress(models.fetch("digits_cnn"),
                                       f"prune-channels{{ratio=0.5,reconstruct={reconstruct}}}", calibration=feeds)
        path = tmp_path / f"digits-{reconstruct}.onnx"
        result.save(path)
        scores[reconstruct] = models.evaluate("digits_cnn", path)["accuracy"]
    assert scores["true"] >= 0.95
    assert scores["true"] > scores["false"] + 0.2


def test_prune_magnitude_keeps_fmnist_accuracy(tmp_path):
    path = models.fetch("fmnist_cnn")
    result = onnxcompress.compress(path, "prune-magnitude{sparsity=0.5}")
    out = tmp_path / "fmnist-magnitude.onnx"
    result.save(out)
    before = models.evaluate("fmnist_cnn", path, limit=2000)["accuracy"]
    after = models.evaluate("fmnist_cnn", out, limit=2000)["accuracy"]
    assert after >= before - 0.01
