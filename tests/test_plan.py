"""Per-node overrides in pipeline strings, and JSON plan files."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx_ir as ir
import pytest

import onnxcompress
from onnxcompress.errors import OptionError, PipelineError
from onnxcompress.pipeline import Pipeline, name_pattern
from onnxcompress.plan import pipeline_to_plan, plan_to_text, read_plan_text, write_plan


def _entry(text):
    return next(e for e in Pipeline.parse(text) if e.name == "low-rank-gemm")


def test_override_prints_back_exactly():
    text = 'low-rank-gemm{energy=0.9,@"/enc/layer\\\\.0/.*"{rank=32},@/pooler{ratio=0.50},@.*{skip=true}}'
    printed = str(Pipeline.parse(text))
    assert printed.endswith(r"low-rank-gemm{energy=0.9,@/enc/layer\.0/.*{rank=32},@/pooler{ratio=0.5},@.*{skip=true}}")
    assert str(Pipeline.parse(printed)) == printed


def test_override_options_start_from_the_pass_options():
    entry = _entry("low-rank-gemm{energy=0.9,min_elements=16,@a{},@b{rank=4},@c{skip=true}}")
    a, b, c = entry.overrides
    assert a.options == entry.options
    # rank resets the exclusive energy to its default; the rest is inherited
    assert (b.options.rank, b.options.energy, b.options.min_elements) == (4, 0.95, 16)
    assert c.skip and c.options is None


def test_first_matching_override_wins_on_the_whole_name():
    entry = _entry("low-rank-gemm{@mm.*{rank=2},@mm1{rank=3},@m{rank=5}}")
    patterns = [o.pattern for o in entry.overrides]
    assert [next(p for p in patterns if re.fullmatch(p, n)) for n in ("mm1", "mm")] == ["mm.*", "mm.*"]
    assert not any(re.fullmatch(p, "xmm") for p in patterns)


def test_name_pattern_matches_only_that_name():
    name = "/features/features.0/Conv (a+b)[1]"
    assert re.fullmatch(name_pattern(name), name)
    assert not re.fullmatch(name_pattern("/features/features.0/Conv"), "/features/features10/Conv")


@pytest.mark.parametrize(
    "text, message",
    [
        ("low-rank-gemm{@a{data_aware=true}}", "option 'data_aware' cannot be set per node"),
        ("cleanup{@a{}}", "cleanup: takes no per-node options"),
        ("low-rank-gemm{@a{skip=true,rank=3}}", "skip=true takes no other option"),
        ('low-rank-gemm{@"("{rank=3}}', "node pattern '(' is not a valid regular expression"),
        ("low-rank-gemm{@a{rank=-1}}", "option 'rank' must be a positive integer"),
        ("low-rank-gemm{@a{rank=2,rank=3}}", "option 'rank' given twice"),
        ("low-rank-gemm{@a{rank=3}", "expected '}'"),
    ],
)
def test_bad_overrides_name_the_fault(text, message):
    with pytest.raises(PipelineError, match=re.escape(message)):
        Pipeline.parse(text)


def test_options_after_an_override_are_refused():
    with pytest.raises(PipelineError, match="options of 'low-rank-gemm' come before its per-node overrides"):
        Pipeline.parse("low-rank-gemm{@a{rank=3},energy=0.5}")
    with pytest.raises(OptionError):
        Pipeline.parse("low-rank-gemm{@a{skip=maybe}}")


def _two_matmuls() -> ir.Model:
    rng = np.random.default_rng(0)
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([4, 64]))
    w1 = ir.Value(name="w1", const_value=ir.tensor(rng.standard_normal((64, 64)).astype(np.float32)))
    w2 = ir.Value(name="w2", const_value=ir.tensor(rng.standard_normal((64, 64)).astype(np.float32)))
    n1 = ir.node("MatMul", [x, w1], name="mm1")
    n2 = ir.node("MatMul", [n1.outputs[0], w2], name="mm2")
    n2.outputs[0].name = "y"
    n2.outputs[0].type, n2.outputs[0].shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape([4, 64])
    graph = ir.Graph([x], [n2.outputs[0]], nodes=[n1, n2], initializers=[w1, w2], opset_imports={"": 17}, name="g")
    return ir.Model(graph, ir_version=8)


def _records(result):
    entry = next(p for p in result.report.passes if p.name == "low-rank-gemm")
    return {r.node: (r.action, r.detail) for r in entry.records}


def test_a_node_override_rewrites_only_that_node_with_its_rank():
    result = onnxcompress.compress(_two_matmuls(), "low-rank-gemm{min_elements=16,@mm2{rank=8},@.*{skip=true}}")
    records = _records(result)
    assert records["mm1"] == ("refused", "left alone by the per-node plan (@.*)")
    assert records["mm2"][0] == "rewritten" and "rank 8" in records["mm2"][1]
    shapes = {v.name: tuple(v.const_value.shape) for v in result.model.graph.initializers.values()}
    assert shapes["w1"] == (64, 64) and shapes["w2.lowrank_a"] == (64, 8)


def test_the_same_node_options_globally_give_bit_identical_weights():
    per_node = onnxcompress.compress(_two_matmuls(), "low-rank-gemm{min_elements=16,@mm2{rank=8},@.*{skip=true}}")
    globally = onnxcompress.compress(_two_matmuls(), "low-rank-gemm{min_elements=16,rank=8}")
    a = per_node.model.graph.initializers
    b = globally.model.graph.initializers
    for name in ("w2.lowrank_a", "w2.lowrank_b"):
        np.testing.assert_array_equal(a[name].const_value.numpy(), b[name].const_value.numpy())
    np.testing.assert_array_equal(a["w1"].const_value.numpy(), _two_matmuls().graph.initializers["w1"].const_value.numpy())


# ------------------------------------------------------------------------------- plan files


def test_plan_file_round_trip(tmp_path):
    pipeline = Pipeline.parse("fold-batchnorm,low-rank-gemm{energy=0.9,@/a\\.b{rank=4},@.*{skip=true}}")
    path = write_plan(pipeline, tmp_path / "p.plan.json", made_by="test")
    data = json.loads(path.read_text())
    assert data["about"] == {"made_by": "test"}
    assert data["pipeline"][-1]["nodes"] == [{"match": "/a\\.b", "options": {"rank": "4"}}, {"match": ".*", "skip": True}]
    assert str(Pipeline.parse(read_plan_text(path))) == str(pipeline)
    assert str(Pipeline.parse(f"@{path}")) == str(pipeline)


def test_a_plan_file_expands_in_place(tmp_path):
    plan = {"format": "onnxcompress-plan", "version": 1,
            "pipeline": [{"pass": "low-rank-gemm", "options": {"min_elements": 16}, "nodes": [{"match": "mm1", "options": {"rank": 2}}]}]}
    path = tmp_path / "ranks.json"
    path.write_text(json.dumps(plan))
    assert str(Pipeline.parse(f"cleanup,@{path}")) == "cleanup,lift-constants,fold-batchnorm,low-rank-gemm{min_elements=16,@mm1{rank=2}}"


@pytest.mark.parametrize(
    "content, message",
    [
        ("not json", "is not JSON"),
        ('{"format": "x"}', "not an onnxcompress plan"),
        ('{"format": "onnxcompress-plan", "version": 9, "pipeline": []}', "plan version 9 is not supported"),
        ('{"format": "onnxcompress-plan", "version": 1, "pipeline": []}', '"pipeline" must be a non-empty list'),
        ('{"format": "onnxcompress-plan", "version": 1, "pipeline": [{"pass": "cleanup", "opts": {}}]}', "unknown key 'opts'"),
        ('{"format": "onnxcompress-plan", "version": 1, "pipeline": [{"pass": "low-rank-gemm", "nodes": [{"options": {}}]}]}', 'needs a "match" pattern'),
        ('{"format": "onnxcompress-plan", "version": 1, "pipeline": [{"pass": "low-rank-gemm", "options": {"rank": [1]}}]}', "option values are strings"),
    ],
)
def test_bad_plan_files_name_the_fault(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(PipelineError, match=re.escape(message)):
        Pipeline.parse(f"@{path}")


def test_a_plan_file_that_includes_itself_is_refused(tmp_path):
    path = tmp_path / "loop.json"
    path.write_text(json.dumps({"format": "onnxcompress-plan", "version": 1, "pipeline": [{"pass": f"@{path}"}]}))
    with pytest.raises(PipelineError, match="includes itself"):
        Pipeline.parse(f"@{path}")


def test_plan_to_text_of_pipeline_to_plan_is_the_pipeline():
    pipeline = Pipeline.parse("default,low-rank-gemm{ratio=0.25,@x{energy=0.5}}")
    assert plan_to_text(pipeline_to_plan(pipeline)) == str(pipeline)


def test_mixed_precision_per_node_int4_then_int8_dynamic():
    """int4 on one MatMul, dynamic int8 on the other: the second pass takes only the float
    weight left (mixed=true); without it, it leaves the partly quantized model alone."""
    text = ("quantize-weights-int4{mixed=true,@mm1{},@.*{skip=true}},"
            "quantize-dynamic{mixed=true,@mm2{},@.*{skip=true}}")
    result = onnxcompress.compress(_two_matmuls(), text)
    ops = [n.op_type for n in result.model.graph]
    assert ops == ["MatMulNBits", "DynamicQuantizeMatMul"]
    by_pass = {p.name: p for p in result.report.passes}
    assert by_pass["quantize-dynamic"].status == "changed"
    assert [r.node for r in by_pass["quantize-dynamic"].records if r.action == "rewritten"] == ["mm2"]
    guarded = onnxcompress.compress(_two_matmuls(), text.replace("quantize-dynamic{mixed=true,", "quantize-dynamic{"))
    second = next(p for p in guarded.report.passes if p.name == "quantize-dynamic")
    assert second.status == "unchanged" and any("already quantized" in n for n in second.notes)
