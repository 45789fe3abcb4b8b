"""The tuner: cached partial runs, the greedy-hull search, budgets, and `tune` end to end."""

from __future__ import annotations

import json
import math
import re
import textwrap
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

import onnxcompress
from onnxcompress import cli
from onnxcompress.activations import capture, reusing
from onnxcompress.errors import DriftBudgetError, OnnxCompressError
from onnxcompress.knobs import FAMILIES, Knob, parse_families, plan_pipeline, probe_pipeline
from onnxcompress.modelio import load_model, model_bytes
from onnxcompress.partial_run import CachedRunner, signatures
from onnxcompress.pipeline import Pipeline
from onnxcompress.runtime import make_session, run_all
from onnxcompress.search import Point, bisect_plans, fill_plan, greedy_order, pareto_front, plan_at, predicted, uniform_plans
from onnxcompress.sensitivity import ProbeResult, damage_of, run_pipeline
from onnxcompress.metrics import Drift
from onnxcompress import tuning
from onnxcompress.tuning import TuneBudget, tune

DIGITS = Path(__file__).resolve().parent.parent / "models" / "digits_cnn.onnx"
DIGITS_CALIB = DIGITS.with_name("digits_calib.npz")


def _digits_feeds():
    data = np.load(DIGITS_CALIB)
    x = data["input"]
    return [{"input": x[i : i + 1]} for i in range(x.shape[0])]


@pytest.fixture
def stacked_calib(tmp_path_factory):
    """The digits samples as a stack of 16 one-sample feeds (the shipped .npz is one batch)."""
    path = tmp_path_factory.mktemp("calib") / "digits_stack.npz"
    np.savez(path, input=np.load(DIGITS_CALIB)["input"][:, None])
    return path


# ------------------------------------------------------------------------------- cached runs


def test_signatures_of_a_clone_are_the_same_and_a_changed_weight_changes_what_follows():
    model = load_model(DIGITS)
    clone = model.clone()
    assert signatures(model) == signatures(clone)
    first_conv = next(n for n in clone.graph if n.op_type == "Conv")
    weight = first_conv.inputs[1]
    weight.const_value = ir.tensor(weight.const_value.numpy() * 2.0, name=weight.name)
    a, b = signatures(model), signatures(clone)
    assert a[first_conv.inputs[0].name] == b[first_conv.inputs[0].name]  # upstream: the same
    assert a[first_conv.outputs[0].name] != b[first_conv.outputs[0].name]
    assert a[model.graph.outputs[0].name] != b[clone.graph.outputs[0].name]


def test_a_cut_run_gives_what_the_whole_model_gives():
    model = load_model(DIGITS)
    feeds = _digits_feeds()
    runner = CachedRunner(model, feeds)
    changed, _ = run_pipeline(model, "low-rank-gemm{min_elements=16,@/fc1/Gemm{rank=4},@.*{skip=true}}", feeds)
    whole = run_all(make_session(changed.clone()), feeds)
    cut = runner.run(changed)
    for w, c in zip(whole, cut):
        np.testing.assert_allclose(c["logits"], w["logits"], rtol=0, atol=1e-5)
    untouched = runner.run(model.clone())  # nothing differs: served from the cache, bit for bit
    for r, u in zip(runner.reference, untouched):
        np.testing.assert_array_equal(r["logits"], u["logits"])


def test_capture_from_the_cache_equals_capture_by_onnxruntime():
    model = load_model(DIGITS)
    feeds = _digits_feeds()
    runner = CachedRunner(model, feeds)
    changed, _ = run_pipeline(model, "low-rank-gemm{min_elements=16,@/fc1/Gemm{rank=4},@.*{skip=true}}", feeds)
    names = [v.name for n in changed.graph for v in n.outputs][-4:] + [changed.graph.inputs[0].name]
    direct = capture(changed, names, feeds)
    with reusing(runner):
        served = capture(changed, names, feeds)
    for name in names:
        for d, s in zip(direct[name], served[name]):
            np.testing.assert_allclose(s, d, rtol=0, atol=1e-5)


def test_a_probe_under_the_cache_builds_the_same_model_bit_for_bit():
    model = load_model(DIGITS)
    feeds = _digits_feeds()
    runner = CachedRunner(model, feeds)
    text = "quantize-qdq{calibration=mse,@/features/features\\.3/Conv{},@.*{skip=true}}"
    plain, _ = run_pipeline(model, text, feeds)
    with reusing(runner):
        cached, _ = run_pipeline(model, text, feeds)
    assert model_bytes(plain) == model_bytes(cached)


# ------------------------------------------------------------------------------- search


def _knob(node, family="prune", level=0):
    return Knob(FAMILIES[family], level, node, "Conv")


def _probe(node, damage, saving, family="prune", level=0):
    return ProbeResult(_knob(node, family, level), "rewritten", "", damage, None, saving)


def test_the_hull_drops_dominated_and_concave_levels():
    results = [
        _probe("a", 1.0, 10.0, level=0),
        _probe("a", 2.0, 9.0, level=1),  # more damage, less saving: dominated
        _probe("b", 1.0, 1.0, level=0),   # under the chord from (0,0) to b's level 1: not on the hull
        _probe("b", 4.0, 40.0, level=1),
    ]
    order = greedy_order(results)
    assert [(s.key[0], s.knob.level) for s in order] == [("a", 0), ("b", 1)]
    assert [s.efficiency for s in order] == [10.0, 10.0]


def test_greedy_order_sorts_by_saving_per_damage_and_keeps_a_nodes_steps_in_order():
    results = [_probe("a", 1.0, 4.0, level=0), _probe("a", 3.0, 6.0, level=1), _probe("b", 1.0, 3.0),
               _probe("c", 0.0, 1.0, family="int8")]
    order = greedy_order(results)
    assert [(s.key, s.knob.level) for s in order] == [
        (("c", "precision"), 0), (("a", "structure"), 0), (("b", "structure"), 0), (("a", "structure"), 1)]
    assert plan_at(order, 4)[("a", "structure")].level == 1
    assert predicted(order, 4) == (0.0 + 3.0 + 1.0, 1.0 + 6.0 + 3.0)
    assert predicted(order, 0) == (0, 0)


def _point(k, ok, objective=0.0, damage=0.0, extra=()):
    return Point(k, 0.0, objective, damage, ok, {}, "" if ok else "over", "", extra)


def test_bisection_finds_the_largest_plan_within_budget_in_log_runs():
    calls = []

    def verify(k):
        calls.append(k)
        return _point(k, k <= 37)

    points, chosen = bisect_plans(100, verify)
    assert chosen.k == 37
    assert len(calls) <= 2 + math.ceil(math.log2(100))
    assert calls[:2] == [0, 100]


def test_bisection_with_every_plan_within_or_none():
    assert bisect_plans(10, lambda k: _point(k, True))[1].k == 10
    points, chosen = bisect_plans(10, lambda k: _point(k, False))
    assert chosen is None and [p.k for p in points] == [0]
    assert bisect_plans(0, lambda k: _point(k, True))[1].k == 0


def _fill_order():
    # a: two levels (steps 0 and 3), b, c, d one each; sorted by saving per damage
    results = [_probe("a", 1.0, 8.0, level=0), _probe("a", 3.0, 12.0, level=1), _probe("b", 1.0, 6.0),
               _probe("c", 1.0, 4.0), _probe("d", 1.0, 1.5)]
    order = greedy_order(results)
    assert [(s.key[0], s.knob.level) for s in order] == [("a", 0), ("b", 0), ("c", 0), ("a", 1), ("d", 0)]
    return order


def test_fill_adds_later_steps_that_keep_the_budget_and_skips_slots_that_broke_it():
    order = _fill_order()
    breaks = {"b"}  # b's step breaks the budget whatever else is in the plan
    calls = []

    def verify(k, extra=()):
        calls.append((k, extra))
        nodes = {key[0] for key in plan_at(order, k, extra)}
        return _point(k, not nodes & breaks, extra=extra)

    points, chosen = bisect_plans(len(order), verify)
    assert chosen.k == 1  # the bisection stops before b
    filled, chosen = fill_plan(order, chosen, verify, tries=10)
    # c (index 2) fits; a's second level (3) replaces its first; d (4) fits; b was never retried
    assert [p.extra for p in filled] == [(2,), (2, 3), (2, 3, 4)]
    assert chosen.extra == (2, 3, 4) and chosen.steps == 4 and chosen.label == "k=1 + 3,4,5"
    assert {key[0]: knob.level for key, knob in plan_at(order, 1, chosen.extra).items()} == {"a": 1, "c": 0, "d": 0}
    assert predicted(order, 1, (2, 3, 4)) == (3.0 + 1.0 + 1.0, 12.0 + 4.0 + 1.5)


def test_fill_does_not_retry_a_slot_whose_lower_level_broke_and_stops_after_its_tries():
    order = _fill_order()

    def verify(k, extra=()):
        nodes = {key[0] for key in plan_at(order, k, extra)}
        return _point(k, "c" not in nodes, extra=extra)

    start = _point(2, True)  # a and b, then c broke
    filled, chosen = fill_plan(order, start, verify, tries=10)
    assert [p.extra for p in filled] == [(3,), (3, 4)]
    filled, chosen = fill_plan(order, start, verify, tries=1)
    assert [p.extra for p in filled] == [(3,)] and chosen.extra == (3,)
    filled, chosen = fill_plan(order, start, verify, tries=0)
    assert filled == [] and chosen is start


def test_a_failed_fill_step_is_not_kept():
    order = _fill_order()

    def verify(k, extra=()):
        return _point(k, 3 not in extra, extra=extra)  # only a's second level breaks

    filled, chosen = fill_plan(order, _point(2, True), verify, tries=10)
    assert [(p.extra, p.within_budget) for p in filled] == [((3,), False), ((4,), True)]
    assert chosen.extra == (4,)


def test_fill_after_a_plan_of_every_step_has_nothing_to_try():
    order = _fill_order()
    filled, chosen = fill_plan(order, _point(len(order), True), lambda k, extra=(): pytest.fail("ran"), tries=10)
    assert filled == [] and chosen.k == len(order)


def test_uniform_plans_take_one_level_of_one_family_on_every_node_it_was_probed_on():
    results = [_probe("a", 1.0, 4.0, level=0), _probe("a", 3.0, 6.0, level=1), _probe("b", 2.0, 3.0),
               _probe("c", 0.5, 1.0, family="int8"), _probe("d", 0.25, 1.0, family="int8"),
               _probe("e", 0.5, 1.0, family="low-rank-gemm")]
    plans = uniform_plans(results)
    assert [(label, sorted(k for k, _ in choice), damage) for label, choice, damage in plans] == [
        ("prune 0.25 everywhere", ["a", "b"], 3.0), ("prune 0.5 everywhere", ["a"], 3.0),
        ("int8 everywhere", ["c", "d"], 0.75), ("low-rank-gemm rank 0.5 everywhere", ["e"], 0.5)]
    assert all(knob.level == (1 if label == "prune 0.5 everywhere" else 0)
               for label, choice, _ in plans for knob in choice.values())


def test_pareto_front():
    points = [_point(0, True, 100.0, 0.0), _point(1, True, 60.0, 1.0), _point(2, True, 70.0, 2.0), _point(3, False, 10.0, 5.0)]
    assert [p.k for p in pareto_front(points)] == [0, 1, 3]


def test_damage_is_relative_noise_power():
    assert damage_of(Drift(20.0, 0.0, 1.0)) == pytest.approx(0.01)
    assert damage_of(Drift(math.inf, 0.0, 1.0)) == 0.0


# ------------------------------------------------------------------------------- knobs and budgets


def test_probe_and_plan_pipelines_parse_and_name_only_their_nodes():
    knob = _knob("/a.b/Conv", "prune", 1)
    text = probe_pipeline(knob)
    assert text == "prune-channels{reconstruct=true,@/a\\.b/Conv{ratio=0.5},@.*{skip=true}}"
    assert str(Pipeline.parse(text)).endswith(text)
    plan = plan_pipeline("default", [FAMILIES["int8"], FAMILIES["prune"]],
                         {("n1", "precision"): _knob("n1", "int8"), ("n2", "structure"): _knob("n2")})
    entries = [e.name for e in plan]
    assert entries.index("prune-channels") < entries.index("quantize-qdq")  # structure before precision


def test_weight_only_precisions_combine_per_node():
    families = parse_families("int4,int8-dynamic,prune")
    assert [f.pass_name for f in families] == ["quantize-weights-int4", "quantize-dynamic", "prune-channels"]
    assert all(("mixed", "true") in f.base for f in families if f.slot == "precision")


def test_weight_only_knobs_probe_gptq_int4_and_both_int4_tables():
    int4 = FAMILIES["int4"]
    assert probe_pipeline(Knob(int4, 0, "/mm", "MatMul")) == \
        "quantize-weights-int4{mixed=true,method=gptq,@/mm(/lowrank_a)?{},@.*{skip=true}}"
    dynamic = FAMILIES["int8-dynamic"]
    assert dynamic.labels == ("int8-dynamic", "int4 table", "int4 table, blocks of 64")
    assert probe_pipeline(Knob(dynamic, 2, "/emb/Gather", "Gather")) == \
        "quantize-dynamic{mixed=true,@/emb/Gather(/lowrank_a)?{table_bits=4,table_block=64},@.*{skip=true}}"
    for text in (probe_pipeline(Knob(int4, 0, "/mm", "MatMul")), probe_pipeline(Knob(dynamic, 2, "/emb/Gather", "Gather"))):
        assert str(Pipeline.parse(text)).endswith(text)
    assert [dynamic.applies(level, "MatMul") for level in range(3)] == [True, False, False]
    assert all(dynamic.applies(level, "Gather") for level in range(3))


@pytest.mark.parametrize("text, message", [
    ("", "name at least one"), ("int8,fp16", "unknown knob 'fp16'"), ("int8,int4", "int8 and int4 do not combine"),
    ("share,int8", "share and int8 do not combine")])
def test_bad_knob_lists(text, message):
    with pytest.raises(OnnxCompressError, match=re.escape(message)):
        parse_families(text)


def test_budget_parsing():
    b = TuneBudget.parse("top1>=0.99, metric_drop<=0.005")
    assert b.drift.top1 == 0.99 and b.metric_drop == 0.005 and b.needs_metric
    assert TuneBudget.parse("sqnr>=30").drift.sqnr == 30
    assert b.violations(Drift(40, 0, 1, 1.0), 0.80, 0.81) == ["metric 0.8 dropped 0.01 > 0.005"]
    for bad in ("top1<=0.5", "metric<=3", "speed>=2", ""):
        with pytest.raises(DriftBudgetError):
            TuneBudget.parse(bad)


# ------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def digits_tuned(tmp_path_factory):
    result = tune(str(DIGITS), _digits_feeds(), "sqnr>=25", "size", fill=16)
    folder = tmp_path_factory.mktemp("tuned")
    written = result.save(folder / "digits.tuned.onnx", html=folder / "report.html")
    return result, written


def test_tune_keeps_the_budget_and_shrinks_the_model(digits_tuned):
    result, written = digits_tuned
    assert result.within_budget and result.chosen.k > 0
    held_out = _digits_feeds()[8:]
    outputs = run_all(make_session(result.model), held_out)
    reference = run_all(make_session(load_model(DIGITS)), held_out)
    from onnxcompress.metrics import output_drift, worst

    assert worst(output_drift(reference, outputs)).sqnr_db >= 25
    assert result.result["size"] < result.baseline["size"] / 4
    record = json.loads(written["record"].read_text())
    assert record["plan"] == result.pipeline and record["chosen"] is not None
    assert {p["k"] for p in record["explored"]} >= {0, result.chosen.k}
    # on digits the bisection stops at 5 of 14 steps and the fill adds two later ones (the
    # reproduction test below then covers a filled plan)
    assert result.chosen.extra and record["explored"][record["chosen"]]["steps"] == result.chosen.steps
    assert result.result["steps"] == result.chosen.k + len(result.chosen.extra)
    assert "<svg" in written["html"].read_text() or "data:image/png" in written["html"].read_text()


def test_uniform_plans_predicted_within_the_searched_failures_are_verified_and_none_beats_the_chosen(digits_tuned):
    result, _ = digits_tuned
    uniform = [p for p in result.points if p.uniform]
    broke = min(p.predicted_damage for p in result.points if not p.uniform and not p.within_budget)
    expected = [label for label, _, damage in uniform_plans([p for p in result.probes if p.status == "rewritten"])
                if damage <= broke]
    assert [p.label for p in uniform] == expected and "int8 everywhere" in expected
    assert len(expected) < len(uniform_plans([p for p in result.probes if p.status == "rewritten"]))
    assert all(p.objective >= result.chosen.objective for p in uniform if p.within_budget)


def test_a_uniform_plan_within_budget_replaces_a_worse_searched_one(monkeypatch):
    """A search that keeps nothing (only the normalised model, k=0) loses to int8 on every node,
    which keeps sqnr>=20 on digits: the tuner returns that plan, and its pipeline rebuilds it."""
    def search_keeping_nothing(count, verify):
        normalised = verify(0)
        return [normalised], normalised

    monkeypatch.setattr(tuning, "bisect_plans", search_keeping_nothing)
    result = tune(str(DIGITS), _digits_feeds(), "sqnr>=20", "size", knobs="int8")
    assert result.chosen.uniform == "int8 everywhere" and result.within_budget
    assert result.result["size"] < result.baseline["size"] / 3
    assert result.to_dict()["explored"][result.to_dict()["chosen"]]["label"] == "int8 everywhere"
    again = onnxcompress.compress(str(DIGITS), result.pipeline, calibration=_digits_feeds()[:result.fit_feeds])
    assert model_bytes(again.model) == model_bytes(result.model)


def test_the_plan_file_reproduces_the_tuned_model_bit_for_bit(digits_tuned):
    result, written = digits_tuned
    fit = json.loads(written["plan"].read_text())["about"]["fit_feeds"]
    assert fit == result.fit_feeds == 8 and result.check_feeds == 8
    again = onnxcompress.compress(str(DIGITS), f"@{written['plan']}", calibration=_digits_feeds()[:fit])
    assert model_bytes(again.model) == model_bytes(result.model)
    assert str(Pipeline.parse(f"@{written['plan']}")) == result.pipeline


def test_the_latency_objective_chooses_by_the_estimate_and_keeps_the_budget():
    from onnxcompress.sensitivity import Objective
    from onnxcompress.tuning import _input_shapes

    result = tune(str(DIGITS), _digits_feeds(), "sqnr>=25", "latency", knobs="int8,prune,low-rank-gemm")
    assert result.within_budget and result.objective == "latency"
    estimate = Objective("latency", _input_shapes(load_model(DIGITS), _digits_feeds()))
    # the record's objective is the estimate of the model returned, which is below the original's
    assert result.result["objective"] == pytest.approx(estimate(result.model), rel=1e-12)
    assert result.result["objective"] < result.baseline["objective"] and result.chosen.k > 0
    # an int8 conv whose conversions cost more than its MACs save (the stem, reading the graph
    # input) is estimated to slow the model down and is not in the plan
    int8 = {p.knob.node: p.saving for p in result.probes if p.status == "rewritten" and p.knob.family.name == "int8"}
    assert int8["/features/features.0/Conv"] < 0
    qdq_entry = result.pipeline[result.pipeline.index("quantize-qdq"):]
    assert all(re.escape(node) not in qdq_entry for node, saving in int8.items() if saving <= 0)


def test_two_workers_measure_what_one_does(digits_tuned):
    result, _ = digits_tuned
    parallel = tune(str(DIGITS), _digits_feeds(), "sqnr>=25", "size", jobs=2)
    assert [(p.knob.node, p.knob.label, p.status, p.saving) for p in parallel.probes] == \
           [(p.knob.node, p.knob.label, p.status, p.saving) for p in result.probes]
    # onnxruntime with one thread per worker sums in another order: the same to float rounding
    np.testing.assert_allclose([p.damage for p in parallel.probes], [p.damage for p in result.probes], rtol=1e-3, atol=1e-12)


def test_an_unreachable_budget_says_what_the_best_was_and_writes_nothing(tmp_path, capsys, stacked_calib):
    out = tmp_path / "never.onnx"
    code = cli.main(["tune", str(DIGITS), "-o", str(out), "--calib", str(stacked_calib), "--budget", "sqnr>=400",
                     "--knobs", "int8"])
    err = capsys.readouterr().err
    assert code != 0 and "budget 'sqnr>=400' cannot be met" in err and "dB" in err
    assert list(tmp_path.iterdir()) == []


def test_best_effort_writes_the_best_plan_and_exits_non_zero(tmp_path, stacked_calib):
    out = tmp_path / "best.onnx"
    code = cli.main(["tune", str(DIGITS), "-o", str(out), "--calib", str(stacked_calib), "--budget", "sqnr>=400",
                     "--knobs", "int8", "--best-effort"])
    assert code == 1 and out.exists() and (tmp_path / "best.plan.json").exists()


def test_the_share_knob_stores_weights_as_indices(stacked_calib):
    result = tune(str(DIGITS), _digits_feeds(), "sqnr>=30", "size", knobs="share")
    assert result.within_budget and result.chosen.k > 0
    ops = [n.op_type for n in result.model.graph]
    assert "Gather" in ops and "QuantizeLinear" not in ops
    assert result.result["size"] < result.baseline["size"] / 2


def test_a_user_metric_judges_the_plans(tmp_path):
    module = tmp_path / "digits_metric.py"
    module.write_text(textwrap.dedent(f"""
        import numpy as np, onnxruntime as ort
        data = np.load({str(DIGITS_CALIB)!r})
        def agreement(path):
            ref = ort.InferenceSession({str(DIGITS)!r}).run(None, {{"input": data["input"]}})[0]
            out = ort.InferenceSession(path).run(None, {{"input": data["input"]}})[0]
            return float(np.mean(ref.argmax(1) == out.argmax(1)))
    """))
    result = tune(str(DIGITS), _digits_feeds(), "metric>=1.0", "size", knobs="int8", metric=f"{module}:agreement")
    assert result.within_budget and result.chosen.measures["metric"] == 1.0
    assert all(("metric" in p.measures) for p in result.points)


def test_a_metric_that_raises_shows_its_traceback_once_and_stops(tmp_path, capsys, stacked_calib):
    module = tmp_path / "bad_metric.py"
    module.write_text("def broken(path):\n    raise RuntimeError('no labels here')\n")
    code = cli.main(["tune", str(DIGITS), "-o", str(tmp_path / "x.onnx"), "--calib", str(stacked_calib),
                     "--budget", "metric_drop<=0.01", "--metric", f"{module}:broken", "--knobs", "int8"])
    err = capsys.readouterr().err
    assert code != 0
    assert err.count("Traceback (most recent call last)") == 1 and "RuntimeError: no labels here" in err
    assert err.strip().splitlines()[-1] == "onnxcompress: error: the metric function raised RuntimeError: no labels here"
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("args, message", [
    (["--budget", "metric>=0.5"], "names the metric: give --metric"),
    (["--budget", "top1>=0.9", "--knobs", "nope"], "unknown knob 'nope'"),
    (["--budget", "fast>=2"], "bad budget 'fast>=2'"),
    (["--budget", "top1>=0.9", "-j", "0"], "-j must be 1 or more"),
    (["--budget", "top1>=0.9", "--fill", "-1"], "--fill must be 0 or more"),
    (["--budget", "top1>=0.9", "--metric", "nomodule"], "expected module:function"),
])
def test_bad_tune_arguments_give_one_error_line(tmp_path, capsys, stacked_calib, args, message):
    code = cli.main(["tune", str(DIGITS), "-o", str(tmp_path / "x.onnx"), "--calib", str(stacked_calib), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and message in err[0]
    assert list(tmp_path.iterdir()) == []


def test_tune_without_calibration_data_is_refused(tmp_path, capsys):
    assert cli.main(["tune", str(DIGITS), "-o", str(tmp_path / "x.onnx"), "--budget", "top1>=0.9"]) != 0
    assert "tune needs calibration data" in capsys.readouterr().err


def test_one_calibration_feed_cannot_be_split_into_fit_and_check(tmp_path, capsys):
    out = tmp_path / "x.onnx"
    assert cli.main(["tune", str(DIGITS), "-o", str(out), "--calib", str(DIGITS_CALIB), "--budget", "top1>=0.9"]) != 0
    assert "give at least 2 calibration feeds (got 1" in capsys.readouterr().err and not out.exists()


def test_validation_data_replaces_the_held_out_half(stacked_calib):
    result = tune(str(DIGITS), _digits_feeds(), "sqnr>=25", "size", knobs="int8", validation=str(stacked_calib))
    assert (result.fit_feeds, result.check_feeds) == (16, 16)


def test_cli_tune_writes_model_plan_record_and_html(tmp_path, capsys, stacked_calib):
    out = tmp_path / "t.onnx"
    code = cli.main(["tune", str(DIGITS), "-o", str(out), "--calib", str(stacked_calib), "--budget", "sqnr>=25",
                     "--knobs", "int8,prune", "--validation", str(stacked_calib), "--report-html", str(tmp_path / "r.html")])
    printed = capsys.readouterr().out
    assert code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html", "t.onnx", "t.plan.json", "t.tune.json"]
    plan_line = next(line for line in printed.splitlines() if line.startswith("plan: "))
    assert str(Pipeline.parse(plan_line[len("plan: "):])) == plan_line[len("plan: "):]
    assert "<- chosen" in printed and "within 'sqnr>=25'" in printed
