"""--bisect auto: the first pass over a drift budget, then its first node rewrite, and a reproducer.

The node-level tests use low-rank-gemm at a fixed rank over MatMuls whose weights are of
exactly that rank (rewritten to float rounding) but for one full-rank weight, whose
truncation is destructive; the drift the search reports is checked against the truncated
SVD computed here in numpy, and the reproducer it prints is run through compress().
"""

from __future__ import annotations

import dataclasses
import math
import shlex

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import onnxcompress
from onnxcompress.auto_bisect import BisectFinding, bisect_to_node, drift_from_report
from onnxcompress.cli import main
from onnxcompress.metrics import Drift, DriftBudget, tensor_drift
from onnxcompress.options import PassOptions, option
from onnxcompress.pass_base import CompressionPass
from onnxcompress.pipeline import Pipeline, name_pattern
from onnxcompress.registry import register
from tests.graphs import Builder
from tests.tiny import tiny_classifier, tiny_feeds

K = 32
RANK = 4
LOW_RANK = f"low-rank-gemm{{rank={RANK},min_elements=0}}"
PREREQUISITES = "lift-constants,fold-batchnorm"


@dataclasses.dataclass(frozen=True)
class ScaleMatMulsOptions(PassOptions):
    factor: float = option(1.0, "multiply each MatMul weight by this")


@register
class ScaleMatMulWeights(CompressionPass):
    """Test pass: scale the weight of each MatMul the per-node plan leaves to it; given no
    per-node plan, also scale the first weight by 1.1 (a change it records for no node)."""

    name = "test-scale-matmuls"
    Options = ScaleMatMulsOptions
    per_node = ()
    lossless = False

    def call(self, model):
        matmuls = [n for n in model.graph if n.op_type == "MatMul"]
        for node in matmuls:
            if reason := self.skipped_by_plan(node):
                self.refused(node, reason)
                continue
            _scale(node.inputs[1], self.options.factor)
            self.rewrote(node, f"scaled by {self.options.factor}")
        if not self.overrides:
            _scale(matmuls[0].inputs[1], 1.1)
        return ir.passes.PassResult(model, modified=True)


def _scale(value: ir.Value, factor: float) -> None:
    value.const_value = ir.tensor(value.const_value.numpy() * np.float32(factor), name=value.name)


def low_rank(r: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((K, r)) @ rng.standard_normal((r, K)) / np.sqrt(r)).astype(np.float32)


def full_rank(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((K, K)).astype(np.float32)


def truncated(w: np.ndarray, r: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(w.astype(np.float64), full_matrices=False)
    return (u[:, :r] * s[:r]) @ vt[:r]


def parallel_matmuls(weights, names=None) -> ir.Model:
    """x[B, K] → MatMul by each weight → one output per weight, y0, y1, ..."""
    names = names or [f"mm{i}" for i in range(len(weights))]
    b = Builder()
    x = b.input("x", ["B", K])
    outs = [b.op("MatMul", [x, b.init(f"W{i}", w)], name=name, output_names=[f"y{i}"])
            for i, (w, name) in enumerate(zip(weights, names))]
    return b.model(outs)


def summed_matmuls(weights) -> ir.Model:
    """x[B, K] → Σ_i x·W_i → y (one output: the rewrites' errors add up)."""
    b = Builder()
    x = b.input("x", ["B", K])
    total = None
    for i, w in enumerate(weights):
        y = b.op("MatMul", [x, b.init(f"W{i}", w)], name=f"mm{i}", output_names=[f"p{i}"])
        total = y if total is None else b.op("Add", [total, y], output_names=[f"s{i}"])
    return b.model([total])


def feeds(count: int = 4, seed: int = 5) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((3, K)).astype(np.float32)} for _ in range(count)]


def predicted_sqnr(weights, truncated_ones: set[int], summed: bool) -> float:
    """The worst output SQNR (dB) when the weights numbered in ``truncated_ones`` are cut to
    rank RANK, in float64."""
    xs = [f["x"].astype(np.float64) for f in feeds()]
    used = [truncated(w, RANK) if i in truncated_ones else w.astype(np.float64) for i, w in enumerate(weights)]
    if summed:
        refs = [[sum(x @ w.astype(np.float64) for w in weights) for x in xs]]
        cands = [[sum(x @ w for w in used) for x in xs]]
    else:
        refs = [[x @ w.astype(np.float64) for x in xs] for w in weights]
        cands = [[x @ w for x in xs] for w in used]
    return min(tensor_drift(r, c).sqnr_db for r, c in zip(refs, cands))


def last_pass_drift(model, pipeline: str) -> Drift:
    """The cumulative drift after the last pass of ``pipeline``, run by compress()."""
    result = onnxcompress.compress(model, pipeline, calibration=feeds())
    return drift_from_report(result.report.passes[-1].drift)


def restriction(nodes: list[str], options: str = f"rank={RANK},min_elements=0") -> str:
    overrides = "".join(f",@{n}{{}}" for n in nodes)
    return f"{PREREQUISITES},low-rank-gemm{{{options}{overrides},@.*{{skip=true}}}}"


def assert_reproducer_parses(finding: BisectFinding) -> None:
    assert str(Pipeline.parse(finding.pipeline)) == finding.pipeline


# ---------------------------------------------------------------------------- pass level


def test_lossless_pass_first_lossy_second_names_the_second():
    model = ir.from_proto(tiny_classifier())
    finding = bisect_to_node(model, "test-add-identity,test-scale-weight{factor=3.0}", tiny_feeds(), "sqnr=30")
    assert finding.found
    assert (finding.culprit_index, finding.culprit_spec) == (1, "test-scale-weight{factor=3.0}")
    # Scaling the first weight by 3, measured independently of the search.
    expected = onnxcompress.compress(model, "test-scale-weight{factor=3.0}", calibration=tiny_feeds())
    assert finding.culprit_drift == drift_from_report(expected.report.passes[0].drift)
    assert finding.culprit_drift.sqnr_db < 30
    assert finding.violations == (f"sqnr {finding.culprit_drift.sqnr_db:.1f} dB < 30 dB",)
    # test-scale-weight takes no per-node overrides: the search stops at the pass.
    assert finding.node is None and finding.k is None
    assert finding.notes == ["no node-level bisection: test-scale-weight takes no per-node overrides (it decides for the whole model)"]
    assert finding.pipeline == "test-add-identity,test-scale-weight{factor=3.0}"
    assert finding.runs == 1
    assert finding.describe().splitlines()[-1] == (
        "onnxcompress optimize IN -o OUT -p 'test-add-identity,test-scale-weight{factor=3.0}' --calib DATA --drift-budget sqnr=30"
    )


def test_passes_after_the_culprit_do_not_run_and_a_first_culprit_has_no_prefix():
    finding = bisect_to_node(tiny_classifier(), "test-scale-weight{factor=3.0},test-raise", tiny_feeds(), "sqnr=30")
    # test-raise would fail the run had it run.
    assert (finding.culprit_index, finding.pipeline) == (0, "test-scale-weight{factor=3.0}")


def test_budget_never_broken_says_so_with_the_whole_pipelines_drift():
    weights = [low_rank(RANK, i) for i in range(3)]
    model = parallel_matmuls(weights)
    finding = bisect_to_node(model, LOW_RANK, feeds(), "sqnr=40")
    assert not finding.found and finding.pipeline is None and finding.node is None
    assert finding.final_drift == last_pass_drift(model, LOW_RANK)
    assert finding.final_drift.sqnr_db > 100  # exactly low-rank weights: float rounding only
    assert finding.describe().startswith("the whole pipeline stays within budget: SQNR ")
    assert finding.describe().endswith("(budget sqnr=40)")


def test_a_pipeline_that_changes_nothing_stays_within_budget_exactly():
    finding = bisect_to_node(tiny_classifier(), "cleanup", tiny_feeds(), "sqnr=40")
    assert not finding.found
    assert finding.final_drift == Drift(math.inf, 0.0, 1.0, 1.0)


# ---------------------------------------------------------------------------- node level


@pytest.mark.parametrize("count, bad", [(4, 2), (9, 0), (9, 8), (16, 11)])
def test_names_the_destructive_rewrite_and_its_reproducer_breaks_the_budget(count, bad):
    weights = [full_rank(100) if i == bad else low_rank(RANK, i) for i in range(count)]
    model = parallel_matmuls(weights)
    untouched = ir.to_proto(model).SerializeToString()
    finding = bisect_to_node(model, LOW_RANK, feeds(), "sqnr=40")
    assert ir.to_proto(model).SerializeToString() == untouched

    assert finding.culprit_index == 2 and finding.culprit_spec == LOW_RANK  # after the two prerequisites
    assert finding.rewrites == count
    assert (finding.node, finding.k) == (f"mm{bad}", bad + 1)
    assert finding.notes == []
    assert finding.pipeline == restriction([f"mm{i}" for i in range(bad + 1)])
    assert_reproducer_parses(finding)
    assert finding.runs <= math.ceil(math.log2(count)) + 3

    destructive = predicted_sqnr(weights, {bad}, summed=False)
    assert destructive < 5
    assert finding.drift_with_node.sqnr_db == pytest.approx(destructive, abs=0.01)
    assert finding.drift_node_alone == finding.drift_with_node  # the other outputs stay exact
    assert finding.drift_before_node.sqnr_db > 100

    # The reproducer, run through compress(), breaks the budget; one rewrite fewer does not.
    budget = DriftBudget(sqnr=40)
    reproduced = last_pass_drift(model, finding.pipeline)
    assert reproduced == finding.drift_with_node and budget.violations(reproduced)
    before = last_pass_drift(model, restriction([f"mm{i}" for i in range(bad)])) if bad else None
    if before is not None:
        assert before == finding.drift_before_node and not budget.violations(before)


def test_the_restricted_nodes_keep_the_culprits_own_overrides():
    # mm0 and mm3 take rank 4, mm1 is skipped, mm2 the base rank 2: mm3's weight is full rank.
    weights = [low_rank(4, 0), full_rank(7), low_rank(2, 2), full_rank(100)]
    model = parallel_matmuls(weights)
    options = "rank=2,min_elements=0,@mm0{rank=4},@mm1{skip=true},@mm3{rank=4}"
    finding = bisect_to_node(model, f"low-rank-gemm{{{options}}}", feeds(), "sqnr=40")
    assert (finding.node, finding.k, finding.rewrites) == ("mm3", 3, 3)
    assert finding.pipeline == (
        f"{PREREQUISITES},low-rank-gemm{{rank=2,min_elements=0,@mm0{{rank=4}},@mm2{{}},@mm3{{rank=4}},@.*{{skip=true}}}}"
    )
    assert_reproducer_parses(finding)
    assert finding.drift_with_node.sqnr_db == pytest.approx(predicted_sqnr(weights, {3}, summed=False), abs=0.01)


def test_rewrites_that_break_the_budget_only_together_are_reported_with_the_node_alone():
    # Weights of rank 4 plus a small full-rank part: each truncation loses a little, and the
    # errors add up in the one output. The budget lies between one and two truncations.
    rng = np.random.default_rng(3)
    weights = [(low_rank(RANK, i) + 0.02 * rng.standard_normal((K, K))).astype(np.float32) for i in range(3)]
    one, two = (predicted_sqnr(weights, set(range(j)), summed=True) for j in (1, 2))
    assert one - two > 1.5
    budget = f"sqnr={(one + two) / 2:.3f}"
    model = summed_matmuls(weights)
    finding = bisect_to_node(model, LOW_RANK, feeds(), budget)
    assert (finding.node, finding.k) == ("mm1", 2)
    assert finding.drift_before_node.sqnr_db == pytest.approx(one, abs=0.01)
    assert finding.drift_with_node.sqnr_db == pytest.approx(two, abs=0.01)
    alone = predicted_sqnr(weights, {1}, summed=True)
    assert finding.drift_node_alone.sqnr_db == pytest.approx(alone, abs=0.01)
    assert alone > (one + two) / 2
    assert finding.notes == ["mm1 alone stays within budget: it breaks it together with the 1 rewrite before it"]
    assert finding.pipeline == restriction(["mm0", "mm1"])


def test_rewrites_the_pass_decides_together_are_noted():
    # mmA and mmB share a weight: restricted to mmA (mmB skipped) the pass refuses both.
    b = Builder()
    x = b.input("x", ["B", K])
    shared = b.init("W", low_rank(RANK, 0))
    outs = [b.op("MatMul", [x, shared], name="mmA", output_names=["ya"]),
            b.op("MatMul", [x, b.init("V", full_rank(1))], name="mmX", output_names=["yx"]),
            b.op("MatMul", [x, shared], name="mmB", output_names=["yb"])]
    finding = bisect_to_node(b.model(outs), LOW_RANK, feeds(), "sqnr=40")
    assert (finding.node, finding.k, finding.rewrites) == ("mmX", 2, 3)
    assert finding.drift_before_node == Drift(math.inf, 0.0, 1.0, 1.0)  # with mmA alone: nothing rewritten
    assert finding.notes == [
        "restricted to its first 2 rewrites the pass rewrote 1 node (mmX): it decides some rewrites together (e.g. a shared weight)"
    ]
    assert finding.pipeline == restriction(["mmA", "mmX"])


def test_drift_the_per_node_plan_cannot_restrict_stops_the_search_at_the_pass():
    model = parallel_matmuls([low_rank(RANK, 0), low_rank(RANK, 1)])
    finding = bisect_to_node(model, "test-scale-matmuls{factor=1.0001}", feeds(), "sqnr=40")
    assert (finding.culprit_index, finding.rewrites, finding.node) == (0, 2, None)
    assert len(finding.notes) == 1
    assert finding.notes[0].startswith(
        "no node-level finding: restricted by per-node overrides to all its 2 rewrites, the pass stays within budget (SQNR 80.0 dB"
    )
    assert finding.pipeline == "test-scale-matmuls{factor=1.0001}"


def test_an_unnamed_rewritten_node_stops_the_search_at_the_pass():
    proto = ir.to_proto(parallel_matmuls([full_rank(1), low_rank(RANK, 2)]))
    proto.graph.node[0].name = ""  # as an exporter may leave it
    finding = bisect_to_node(proto, LOW_RANK, feeds(), "sqnr=40")
    assert finding.culprit_index == 2 and finding.node is None
    assert finding.notes == [
        "no node-level bisection: the rewritten node <MatMul> has no name, so no per-node override can single it out"
    ]
    assert finding.pipeline == f"{PREREQUISITES},{LOW_RANK}"


def test_a_model_already_over_budget_before_the_pass_stops_the_search_at_the_pass():
    weights = [low_rank(RANK, 0), full_rank(1)]
    model = parallel_matmuls(weights)
    # Measured against a reference the input itself differs from.
    reference = parallel_matmuls([w * np.float32(2.0) for w in weights])
    finding = bisect_to_node(model, LOW_RANK, feeds(), "sqnr=40", reference=reference)
    assert finding.culprit_index == 2 and finding.node is None
    assert len(finding.notes) == 1
    assert finding.notes[0].startswith("no node-level bisection: the model before the pass already breaks the budget (SQNR ")


def test_feeds_may_be_a_calibration_folder(tmp_path):
    for i, feed in enumerate(feeds()):
        np.savez(tmp_path / f"f{i}.npz", **feed)
    model = parallel_matmuls([low_rank(RANK, 0), full_rank(1)])
    from_folder = bisect_to_node(model, LOW_RANK, tmp_path, "sqnr=40")
    from_list = bisect_to_node(model, LOW_RANK, feeds(), "sqnr=40")
    assert from_folder == from_list and from_folder.node == "mm1"


def test_drift_from_report_restores_both_infinities():
    assert drift_from_report(Drift(math.inf, 0.0, 1.0).to_dict()).sqnr_db == math.inf
    assert drift_from_report(Drift(-math.inf, 2.0, 0.0).to_dict()).sqnr_db == -math.inf


# ---------------------------------------------------------------------------- command line


def cli(*args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def destructive_model(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(ir.to_proto(parallel_matmuls([low_rank(RANK, 0), full_rank(1), low_rank(RANK, 2)])), path)
    calib = tmp_path / "calib"
    calib.mkdir()
    for i, feed in enumerate(feeds()):
        np.savez(calib / f"f{i}.npz", **feed)
    return path, calib


def test_cli_prints_the_finding_and_a_reproducer_that_reproduces_it(destructive_model, tmp_path, capsys):
    path, calib = destructive_model
    out = tmp_path / "out.onnx"
    before = path.read_bytes()
    code, stdout, err = cli("optimize", path, "-o", out, "-p", LOW_RANK, "--calib", calib,
                            "--drift-budget", "sqnr=40", "--bisect", "auto", capsys=capsys)
    assert code == 0, err
    assert not out.exists() and path.read_bytes() == before
    lines = stdout.strip().splitlines()
    assert lines[0].startswith(f"first pass over budget sqnr=40: #3 {LOW_RANK}: sqnr ")
    assert "first rewrite over budget: mm1 (rewrite 2 of the pass's 3)" in lines
    command = shlex.split(lines[-1])
    pipeline = restriction(["mm0", "mm1"])
    assert command == ["onnxcompress", "optimize", str(path), "-o", str(out), "-p", pipeline,
                       "--calib", str(calib), "--drift-budget", "sqnr=40"]
    assert str(Pipeline.parse(command[6])) == command[6]
    # Run as printed, the reproducer's last pass goes over the budget and is rolled back.
    code, stdout, err = cli(*command[1:], capsys=capsys)
    assert code == 0, err
    assert "pass 3 (low-rank-gemm) rolled back: drift over budget (sqnr " in stdout


def test_cli_within_budget_exits_0_and_writes_nothing(destructive_model, tmp_path, capsys):
    path, calib = destructive_model
    out = tmp_path / "out.onnx"
    code, stdout, err = cli("optimize", path, "-o", out, "-p", "cleanup", "--calib", calib,
                            "--drift-budget", "sqnr=40", "--bisect", "auto", capsys=capsys)
    assert code == 0, err
    assert stdout.strip() == "the whole pipeline stays within budget: SQNR inf dB, max-abs 0, cosine 1.000000, top-1 1.0000 (budget sqnr=40)"
    assert not out.exists()


def test_cli_random_feeds_are_named_in_the_reproducer(destructive_model, tmp_path, capsys):
    path, _ = destructive_model
    code, stdout, err = cli("optimize", path, "-o", tmp_path / "o.onnx", "-p", LOW_RANK, "--random-calib", "3",
                            "--drift-budget", "sqnr=40", "--bisect", "auto", capsys=capsys)
    assert code == 0, err
    assert shlex.split(stdout.strip().splitlines()[-1])[-4:] == ["--random-calib", "3", "--drift-budget", "sqnr=40"]


@pytest.mark.parametrize("args, message", [
    (["--drift-budget", "sqnr=40"], "--bisect auto needs calibration data: --calib FILE_OR_DIR or --random-calib N"),
    (["--calib", "CALIB"], "--bisect auto needs --drift-budget: the budget whose first break it looks for"),
    (["--calib", "CALIB", "--drift-budget", "sqnr=40", "--report", "r.json"],
     "--bisect auto writes no model and no report: drop --report"),
    (["--calib", "CALIB", "--drift-budget", "sqnr=4x"], "bad drift budget 'sqnr=4x'"),
])
def test_cli_bad_arguments_one_error_line_nothing_written(destructive_model, tmp_path, capsys, args, message):
    path, calib = destructive_model
    out = tmp_path / "out.onnx"
    args = [str(calib) if a == "CALIB" else a for a in args]
    code, stdout, err = cli("optimize", path, "-o", out, "-p", LOW_RANK, "--bisect", "auto", *args, capsys=capsys)
    assert code == 2
    assert err.strip().startswith(f"onnxcompress: error: {message}") and len(err.strip().splitlines()) == 1
    assert stdout == "" and not out.exists() and not (tmp_path / "r.json").exists()


def test_cli_bisect_auto_and_bisect_limit_exclude_each_other(destructive_model, tmp_path, capsys):
    path, calib = destructive_model
    with pytest.raises(SystemExit) as exc:
        main(["optimize", str(path), "-o", str(tmp_path / "o.onnx"), "--calib", str(calib), "--drift-budget", "sqnr=40",
              "--bisect", "auto", "--bisect-limit", "1"])
    assert exc.value.code == 2
    assert "argument --bisect-limit: not allowed with argument --bisect" in capsys.readouterr().err


# ---------------------------------------------------------------------------- minilm_l6


@pytest.mark.real_model
def test_minilm_low_rank_bisects_to_one_matmul_whose_reproducer_breaks_the_budget():
    import models

    path = models.fetch("minilm_l6")
    calibration = models.calibration_feeds("minilm_l6", 4)
    pipeline = "default,low-rank-gemm{energy=0.9}"
    finding = bisect_to_node(path, pipeline, calibration, "sqnr=30")
    assert finding.culprit_spec == "low-rank-gemm{energy=0.9}" and finding.node is not None, finding.notes
    assert finding.node.endswith("/MatMul") and 1 <= finding.k <= finding.rewrites
    assert finding.runs <= math.ceil(math.log2(finding.rewrites)) + 3
    assert_reproducer_parses(finding)

    budget = DriftBudget(sqnr=30)
    reproduced = onnxcompress.compress(path, finding.pipeline, calibration=calibration).report.passes[-1]
    assert [r.node for r in reproduced.records if r.action == "rewritten"][-1] == finding.node
    assert drift_from_report(reproduced.drift).sqnr_db == pytest.approx(finding.drift_with_node.sqnr_db, abs=1e-6)
    assert budget.violations(drift_from_report(reproduced.drift))
    assert not budget.violations(finding.drift_before_node)
    if finding.k > 1:
        one_fewer = finding.pipeline.replace(f",@{name_pattern(finding.node)}{{}}", "")
        before = onnxcompress.compress(path, one_fewer, calibration=calibration).report.passes[-1]
        assert drift_from_report(before.drift).sqnr_db == pytest.approx(finding.drift_before_node.sqnr_db, abs=1e-6)
