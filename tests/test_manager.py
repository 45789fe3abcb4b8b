"""The pass manager and its instruments, through the Python API."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import onnxcompress
from onnxcompress.errors import CalibrationError, PassFailure
from onnxcompress.instruments import LINEAGE_KEY, Bisect, Dump
from onnxcompress.runtime import make_session, run_all
from tests.tiny import tiny_classifier, tiny_feeds


def test_compress_accepts_path_proto_and_ir_model(tiny_path):
    proto = tiny_classifier()
    for source in (tiny_path, str(tiny_path), proto, ir.from_proto(proto)):
        result = onnxcompress.compress(source, "cleanup")
        assert isinstance(result.model, ir.Model)
        assert result.report.passes[0].name == "cleanup"


def test_input_is_never_modified(tiny_path):
    before_file = tiny_path.read_bytes()
    proto = tiny_classifier()
    before_proto = proto.SerializeToString()
    model = ir.from_proto(tiny_classifier())
    before_ir = ir.to_proto(model).SerializeToString()
    for source in (tiny_path, proto, model):
        onnxcompress.compress(source, "test-scale-weight{factor=2.0},test-add-identity")
    assert tiny_path.read_bytes() == before_file
    assert proto.SerializeToString() == before_proto
    assert ir.to_proto(model).SerializeToString() == before_ir


def test_drift_is_measured_only_after_a_changing_pass():
    result = onnxcompress.compress(tiny_classifier(), "cleanup,test-scale-weight{factor=1.0},test-add-identity",
                                   calibration=tiny_feeds())
    cleanup, scale, identity = result.report.passes
    assert scale.status == "unchanged" and scale.drift is None
    assert identity.status == "changed"
    assert identity.drift["sqnr_db"] == "inf" and identity.drift["max_abs"] == 0.0
    assert identity.drift["top1"] == 1.0


def test_drift_over_budget_is_rolled_back_and_named():
    feeds = tiny_feeds()
    result = onnxcompress.compress(tiny_classifier(), "test-scale-weight{factor=3.0},test-add-identity",
                                   calibration=feeds, drift="sqnr=40")
    scale, identity = result.report.passes
    assert scale.status == "rolled back"
    assert "drift over budget" in scale.reason and "sqnr" in scale.reason
    assert scale.drift["sqnr_db"] < 40
    # The model after the run computes exactly what the original did: the pass was undone.
    ref = run_all(make_session(tiny_classifier()), feeds)
    out = run_all(make_session(result.model), feeds)
    for r, o in zip(ref, out):
        np.testing.assert_array_equal(r["y"], o["y"])
    assert identity.status == "changed"


def test_small_drift_within_budget_is_kept():
    result = onnxcompress.compress(tiny_classifier(), "test-scale-weight{factor=1.0001}",
                                   calibration=tiny_feeds(), drift="sqnr=40")
    (scale,) = result.report.passes
    assert scale.status == "changed"
    assert 40 < scale.drift["sqnr_db"] < 200


def test_drift_fail_stops_and_writes_a_reproducer(tmp_path):
    feeds = tiny_feeds()
    with pytest.raises(PassFailure) as info:
        onnxcompress.compress(tiny_classifier(), "cleanup,test-scale-weight{factor=3.0}",
                              calibration=feeds, drift="sqnr=40", on_drift="fail", reproducer_dir=tmp_path)
    error = info.value
    assert error.pass_name == "test-scale-weight"
    assert "#2" in str(error) and "drift over budget" in str(error)
    folder = tmp_path / next(p.name for p in tmp_path.iterdir())
    assert str(folder) == error.reproducer
    assert (folder / "pipeline.txt").read_text().strip() == "test-scale-weight{factor=3.0}"
    assert (folder / "full_pipeline.txt").read_text().strip() == "cleanup,test-scale-weight{factor=3.0}"
    assert len(list((folder / "feeds").glob("*.npz"))) == len(feeds)
    assert "--drift-budget sqnr=40" in (folder / "README.txt").read_text()
    # The reproducer's model is the one before the failing pass, and re-running the
    # failing pass on it with its feeds fails the same way.
    assert "--reference reference.onnx" in (folder / "README.txt").read_text()
    with pytest.raises(PassFailure, match="drift over budget"):
        onnxcompress.compress(folder / "model.onnx", (folder / "pipeline.txt").read_text().strip(),
                              calibration=folder / "feeds", drift="sqnr=40", on_drift="fail",
                              reference=folder / "reference.onnx", reproducer_dir=tmp_path / "again")


def test_a_raising_pass_becomes_pass_failure_with_reproducer(tmp_path):
    with pytest.raises(PassFailure, match=r"pass 'test-raise' \(#2\) failed: RuntimeError: boom") as info:
        onnxcompress.compress(tiny_classifier(), "test-add-identity,test-raise", reproducer_dir=tmp_path)
    folder = info.value.reproducer
    assert "boom in test pass" in open(f"{folder}/error.txt").read()
    before = onnx.load(f"{folder}/model.onnx")
    assert [n.op_type for n in before.graph.node].count("Identity") == 1  # state before the failing pass


def test_verify_catches_an_invalid_model(tmp_path):
    with pytest.raises(PassFailure, match="no longer valid ONNX"):
        onnxcompress.compress(tiny_classifier(), "test-break", reproducer_dir=tmp_path)


def test_lineage_marks_only_new_nodes():
    result = onnxcompress.compress(tiny_classifier(), "test-add-identity")
    marks = {n.name: n.metadata_props.get(LINEAGE_KEY) for n in result.model.graph}
    assert marks["inserted"] == "test-add-identity"
    assert marks["fc1"] is None and marks["relu"] is None
    proto = ir.to_proto(result.model)
    inserted = next(n for n in proto.graph.node if n.name == "inserted")
    assert {p.key: p.value for p in inserted.metadata_props} == {LINEAGE_KEY: "test-add-identity"}


def test_bisect_limit_runs_only_first_n_skippable_passes():
    bisect = Bisect(1)
    result = onnxcompress.compress(
        tiny_classifier(), "test-add-identity,test-scale-weight{factor=2.0},test-needs-scale", instruments=[bisect]
    )
    statuses = [(p.name, p.status) for p in result.report.passes]
    assert statuses == [
        ("test-add-identity", "changed"),
        ("test-scale-weight", "skipped"),
        ("test-needs-scale", "unchanged"),  # not skippable: always runs
    ]
    assert "bisect limit 1" in result.report.passes[1].reason
    assert bisect.log == [
        "BISECT: running pass (1) test-add-identity",
        "BISECT: NOT running pass (2) test-scale-weight{factor=2.0}",
    ]


def test_bisect_limit_zero_runs_no_skippable_pass():
    result = onnxcompress.compress(tiny_classifier(), "test-add-identity", instruments=[Bisect(0)])
    assert result.report.passes[0].status == "skipped"


def test_dump_writes_only_after_changing_passes(tmp_path):
    dump = tmp_path / "dump"
    result = onnxcompress.compress(
        tiny_classifier(), "test-scale-weight{factor=1.0},test-add-identity,cleanup", instruments=[Dump(dump)]
    )
    names = sorted(p.name for p in dump.iterdir())
    assert names == ["000_input.onnx", "002_test-add-identity.onnx", "003_cleanup.onnx"]
    assert result.report.passes[0].status == "unchanged"
    for name in names:
        onnx.checker.check_model(onnx.load(dump / name))


def test_report_has_cost_time_and_records(tmp_path):
    result = onnxcompress.compress(tiny_classifier(), "test-scale-weight{factor=2.0}", calibration=tiny_feeds())
    report = result.report
    assert report.input_cost == {"params": 8 * 4 + 8 + 3 * 8 + 3, "bytes": 4 * 67, "macs": 8 * 4 + 3 * 8}
    (entry,) = report.passes
    assert entry.cost == report.input_cost
    assert entry.time_s is not None and entry.time_s >= 0
    assert entry.rewritten == 1 and entry.records[0].node == "fc1"
    assert "8 feeds" in report.calibration
    table = report.table()
    assert "test-scale-weight{factor=2.0}" in table and "changed" in table
    data = json.loads(report.to_json())
    assert data["passes"][0]["drift"]["top1"] is not None


def test_save_writes_model_and_report_atomically(tmp_path):
    result = onnxcompress.compress(tiny_classifier(), "cleanup")
    out = tmp_path / "sub" / "out.onnx"
    result.save(out, report=tmp_path / "sub" / "out.report.json")
    onnx.checker.check_model(onnx.load(out))
    assert json.loads((tmp_path / "sub" / "out.report.json").read_text())["pipeline"] == "cleanup"
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["out.onnx", "out.report.json"]


def test_save_with_external_data_round_trips(tmp_path):
    result = onnxcompress.compress(tiny_classifier(), "cleanup")
    out = tmp_path / "ext.onnx"
    result.save(out, external_data=True)
    assert (tmp_path / "ext.onnx.data").exists()
    feeds = tiny_feeds(2)
    a = run_all(make_session(tiny_classifier()), feeds)
    b = run_all(make_session(str(out)), feeds)
    np.testing.assert_array_equal(a[0]["y"], b[0]["y"])


def test_drift_budget_without_data_is_a_clear_error():
    with pytest.raises(CalibrationError, match="needs calibration data"):
        onnxcompress.compress(tiny_classifier(), "cleanup", drift="sqnr=30")


def test_random_calibration_is_said_in_the_report():
    result = onnxcompress.compress(tiny_classifier(), "test-add-identity", random_calibration=4)
    assert "RANDOM" in result.report.calibration
    assert result.report.passes[0].drift["sqnr_db"] == "inf"


def test_localize_names_the_first_drifting_tensor():
    result = onnxcompress.compress(tiny_classifier(), "test-scale-weight{factor=3.0}", calibration=tiny_feeds(),
                                   drift="sqnr=40", localize_drift=True)
    (entry,) = result.report.passes
    assert entry.first_drifting_node == "h (Gemm)"


def test_analyses_are_cached_and_invalidated():
    from onnxcompress.analysis import AnalysisManager

    model = ir.from_proto(tiny_classifier())
    analyses = AnalysisManager()
    first = analyses.get("cost", model)
    assert analyses.get("cost", model) is first
    analyses.invalidate(preserved=("cost",))
    assert analyses.get("cost", model) is first
    analyses.invalidate()
    assert analyses.get("cost", model) is not first
    assert analyses.computed == ["cost", "cost"]
