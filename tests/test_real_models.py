"""The core on every real model: normalise + cleanup + drift check end to end.

Each model is fetched through ``models/`` (built into the cache on first use; a missing
dependency fails with the reason, never a skip). The normalised model must be checker-valid,
run in onnxruntime, match the original's outputs (SQNR >= 60 dB on real samples) and keep the
model's metric; the input file is never touched.
"""

from __future__ import annotations

import hashlib

import onnx
import pytest

import models
import onnxcompress

pytestmark = pytest.mark.real_model

EVAL_LIMIT = {"digits_cnn": None, "fmnist_cnn": 1000, "mobilenet_v2": 30, "minilm_l6": 300, "ppocrv4_rec": 60}


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_default_preset_is_lossless_on_real_models(name, tmp_path):
    path = models.fetch(name)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    feeds = models.calibration_feeds(name, 4)
    result = onnxcompress.compress(path, "default", calibration=feeds, drift="sqnr=60", on_drift="fail")
    statuses = {p.name: p.status for p in result.report.passes}
    assert set(statuses.values()) <= {"changed", "unchanged"}, statuses
    for entry in result.report.passes:
        if entry.drift is not None:
            assert entry.drift["sqnr_db"] == "inf" or entry.drift["sqnr_db"] >= 60, (entry.name, entry.drift)
    out = tmp_path / f"{name}.onnx"
    result.save(out)
    onnx.checker.check_model(str(out))
    limit = EVAL_LIMIT[name]
    before, after = models.evaluate(name, path, limit=limit), models.evaluate(name, out, limit=limit)
    for key, value in before.items():
        assert after[key] == pytest.approx(value, abs=1e-3), (key, before, after)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


def test_constant_node_weights_are_lifted_on_ppocr():
    path = models.fetch("ppocrv4_rec")
    original = onnx.load(str(path))
    constants = sum(n.op_type == "Constant" for n in original.graph.node)
    assert constants > 100  # the quirk this test is about
    result = onnxcompress.compress(path, "lift-constants")
    (entry,) = result.report.passes
    assert entry.rewritten >= 100
    weights = [n.inputs[1] for n in result.model.graph if n.op_type in ("Conv", "MatMul")]
    assert all(w.is_initializer() for w in weights if w.producer() is None)
    assert not any(w.producer() is not None and w.producer().op_type == "Constant" for w in weights)


def test_batchnorm_is_folded_on_mobilenet():
    path = models.fetch("mobilenet_v2")
    result = onnxcompress.compress(path, "default")
    assert not any(n.op_type == "BatchNormalization" for n in result.model.graph)
    fold = next(p for p in result.report.passes if p.name == "fold-batchnorm")
    assert fold.rewritten == 52


def test_variable_length_calibration_on_minilm():
    feeds = models.calibration_feeds("minilm_l6", 6)
    lengths = {f["input_ids"].shape[1] for f in feeds}
    assert len(lengths) > 1  # really variable-length
    result = onnxcompress.compress(models.fetch("minilm_l6"), "default", calibration=feeds, drift="cosine=0.99999")
    assert all(p.status in ("changed", "unchanged") for p in result.report.passes)
    assert result.report.input_cost["macs"] > 0  # sequence length taken from the feeds
