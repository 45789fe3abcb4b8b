"""Accuracy-aware tuning: choose per node a knob level (int8 or float, prune ratio, rank) for
the best objective within a budget.

    result = onnxcompress.tune("model.onnx", calibration="calib/", budget="top1>=0.99", objective="size")
    result.save("model.tuned.onnx")   # + model.tuned.plan.json, model.tuned.tune.json

1. normalise the model (``base``, the ``default`` preset);
2. sensitivity (:mod:`onnxcompress.sensitivity`): every candidate node at every knob level
   alone, drift and saving measured with onnxruntime. The passes calibrate on the first half
   of the calibration feeds (the *fit* feeds) and drift is measured on the other half (the
   *check* feeds), or on ``validation`` data when given: reconstruction fits its feeds, so
   drift measured on them would call an over-fitted layer exact;
3. selection (:mod:`onnxcompress.search`): the greedy order of the sensitivity table, then
   verification runs of whole plans, bisecting to the largest plan within the budget, then
   with ``fill``, up to that many more runs, each trying one later step on top of the plan
   (more runs judged on the same check feeds: the plan fits them more closely, see the README);
   then each family at each level on every node (a uniform plan), taken instead when it keeps
   the budget and beats the searched plan on the objective;
4. the chosen plan as a pipeline string (and plan file) that ``optimize`` runs to the same
   model, bit for bit, from the same input and the fit feeds.

Budgets (comma-separated, all must hold): ``top1>=X``, ``cosine>=X``, ``sqnr>=DB``,
``maxabs<=X`` on the check feeds against the original, and with a user metric
(``metric=module:function``, called with a model path, higher is better) ``metric>=X`` or
``metric_drop<=X`` (at most X below the original's value). Probes always use the drift on
the check feeds (a user metric per probe would cost a full evaluation each); the user
metric judges the verification runs.

A cluster backend would slot in where :func:`onnxcompress.sensitivity.run_probes` maps probes
onto worker processes: each probe is a pure function of (model bytes, feeds, knob) returning a
small record, so ``Pool.imap_unordered`` becomes Ray's ``ray.remote`` tasks over an object-store
copy of the model and feeds, or Dask's ``client.map`` with the model scattered once.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import math
import os
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

import onnx_ir as ir

from onnxcompress import calibration as calib
from onnxcompress.api import Result, compress
from onnxcompress.errors import CalibrationError, DriftBudgetError, OnnxCompressError
from onnxcompress.knobs import DEFAULT_KNOBS, candidate_knobs, parse_families, plan_pipeline
from onnxcompress.compare import drift_against
from onnxcompress.metrics import DriftBudget
from onnxcompress.modelio import initializer_bytes, load_model, save_model, write_atomically
from onnxcompress.plan import write_plan
from onnxcompress.report import finite
from onnxcompress.runtime import make_session, run_all
from onnxcompress.search import Point, bisect_plans, fill_plan, greedy_order, pareto_front, plan_at, predicted, uniform_plans
from onnxcompress.sensitivity import (
    Objective,
    Prober,
    ProbeResult,
    damage_of,
    run_pipeline,
    run_probes,
    successful,
)


class BudgetUnreachable(OnnxCompressError):
    """No plan, not even the normalised model alone, keeps the budget."""


class MetricError(OnnxCompressError):
    """The user's metric function raised or returned something that is not a number."""

    def __init__(self, message: str, details: str):
        super().__init__(message)
        self.details = details


@dataclasses.dataclass(frozen=True)
class TuneBudget:
    """What a plan must keep: drift limits on the calibration feeds and/or a user-metric floor."""

    drift: DriftBudget | None = None
    metric_at_least: float | None = None
    metric_drop: float | None = None
    text: str = ""

    @classmethod
    def parse(cls, text: str) -> "TuneBudget":
        drift_parts, metric_at_least, metric_drop = [], None, None
        for part in filter(None, (p.strip() for p in text.split(","))):
            m = re.fullmatch(r"(metric|metric_drop)\s*(>=|<=)\s*([-+0-9.eE]+)", part)
            if m is None:
                drift_parts.append(part)
            elif m.group(1) == "metric" and m.group(2) == ">=":
                metric_at_least = float(m.group(3))
            elif m.group(1) == "metric_drop" and m.group(2) == "<=":
                metric_drop = float(m.group(3))
            else:
                raise DriftBudgetError(f"bad budget '{part}': use metric>=X or metric_drop<=X")
        for part in drift_parts:
            m = re.fullmatch(r"(top1|cosine|sqnr)\s*>=.*|maxabs\s*<=.*|[a-z0-9]+\s*=.*", part)
            if m is None:
                raise DriftBudgetError(
                    f"bad budget '{part}': use top1>=X, cosine>=X, sqnr>=DB, maxabs<=X, metric>=X or metric_drop<=X"
                )
        drift = DriftBudget.parse(",".join(drift_parts)) if drift_parts else None
        if drift is None and metric_at_least is None and metric_drop is None:
            raise DriftBudgetError(f"empty budget '{text}'")
        return cls(drift, metric_at_least, metric_drop, text)

    @property
    def needs_metric(self) -> bool:
        return self.metric_at_least is not None or self.metric_drop is not None

    def violations(self, drift, metric: float | None, baseline_metric: float | None) -> list[str]:
        out = self.drift.violations(drift) if self.drift else []
        if self.metric_at_least is not None and metric < self.metric_at_least:
            out.append(f"metric {metric:.6g} < {self.metric_at_least:g}")
        if self.metric_drop is not None and metric < baseline_metric - self.metric_drop:
            out.append(f"metric {metric:.6g} dropped {baseline_metric - metric:.6g} > {self.metric_drop:g}")
        return out

    def __str__(self) -> str:
        return self.text


def load_metric(spec: str) -> Callable[[str], float]:
    """``module:function`` (the module importable from the working directory or a .py path)."""
    module_name, sep, function_name = spec.partition(":")
    if not sep or not module_name or not function_name:
        raise OnnxCompressError(f"--metric '{spec}': expected module:function")
    try:
        if module_name.endswith(".py"):
            spec_ = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
            module = importlib.util.module_from_spec(spec_)
            spec_.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except Exception as exc:
        raise MetricError(f"--metric '{spec}': cannot import {module_name}: {type(exc).__name__}: {exc}",
                          traceback.format_exc()) from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise OnnxCompressError(f"--metric '{spec}': {module_name} has no function {function_name}")
    return function


def _call_metric(function: Callable[[str], float], model: ir.Model) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        path = save_model(model, Path(tmp) / "candidate.onnx")
        try:
            value = function(str(path))
        except Exception as exc:
            raise MetricError(f"the metric function raised {type(exc).__name__}: {exc}", traceback.format_exc()) from None
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise MetricError(f"the metric function returned {value!r}, not a number", "") from None
    if not math.isfinite(value):
        raise MetricError(f"the metric function returned {value}, not a finite number", "")
    return value


@dataclasses.dataclass
class TuneResult:
    model: ir.Model
    pipeline: str
    budget: str
    objective: str
    baseline: dict
    result: dict
    probes: list[ProbeResult]
    points: list[Point]
    chosen: Point | None
    passes: list[dict]
    timings: dict
    within_budget: bool = True
    source: str = ""
    fit_feeds: int = 0
    check_feeds: int = 0

    def to_dict(self) -> dict:
        front = pareto_front(self.points)
        return {
            "model": self.source, "budget": self.budget, "objective": self.objective, "plan": self.pipeline,
            "within_budget": self.within_budget, "baseline": self.baseline, "result": self.result,
            "passes": self.passes,
            "sensitivity": [p.to_dict() for p in self.probes if p.status == "rewritten"],
            "refused": [{"pass": p.knob.family.pass_name, "node": p.knob.node, "op_type": p.knob.op_type,
                         "knob": p.knob.label, "reason": p.reason} for p in self.probes if p.status != "rewritten"],
            "explored": [dict(p.to_dict(), pareto=p in front) for p in self.points],
            "chosen": self.points.index(self.chosen) if self.chosen in self.points else None,
            "timings": self.timings,
        }

    def save(self, path, html: str | os.PathLike | None = None) -> dict[str, Path]:
        """The model at ``path``, its plan beside it (``.plan.json``), the tuning record
        (``.tune.json``) and, if asked, the HTML report."""
        path = Path(path)
        stem = path.with_suffix("")
        written = {"model": save_model(self.model, path)}
        written["plan"] = write_plan(self.pipeline_object(), f"{stem}.plan.json", budget=self.budget,
                                     objective=self.objective, tuned_from=self.source, fit_feeds=self.fit_feeds,
                                     note=f"the passes calibrated on the first {self.fit_feeds} calibration feeds: "
                                          f"run the plan with those (--calib DATA --calib-limit {self.fit_feeds}) "
                                          "to get the same model")
        data = self.to_dict()
        written["record"] = write_atomically(Path(f"{stem}.tune.json"), (json.dumps(finite(data), indent=2) + "\n").encode())
        if html is not None:
            from onnxcompress.html_report import write_html_report

            written["html"] = write_html_report(finite(data), html)
        return written

    def pipeline_object(self):
        from onnxcompress.pipeline import Pipeline

        return Pipeline.parse(self.pipeline)


def tune(
    model,
    calibration,
    budget: str | TuneBudget,
    objective: str = "size",
    knobs: str = DEFAULT_KNOBS,
    jobs: int = 1,
    metric: str | Callable[[str], float] | None = None,
    best_effort: bool = False,
    base: str = "default",
    calibration_limit: int | None = None,
    validation=None,
    progress: Callable[[str, int, int], None] | None = None,
    fill: int = 0,
) -> TuneResult:
    """Tune ``model`` (path, ModelProto or ir.Model; never modified); see the module docstring."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    source = str(model) if isinstance(model, (str, os.PathLike)) else ""
    original = load_model(model)
    budget = TuneBudget.parse(budget) if isinstance(budget, str) else budget
    families = parse_families(knobs)
    if jobs < 1:
        raise OnnxCompressError(f"-j must be 1 or more, got {jobs}")
    if fill < 0:
        raise OnnxCompressError(f"--fill must be 0 or more, got {fill}")
    metric_fn = load_metric(metric) if isinstance(metric, str) else metric
    if budget.needs_metric and metric_fn is None:
        raise OnnxCompressError(f"budget '{budget}' names the metric: give --metric module:function")
    feeds, check_feeds = _fit_and_check(calib.load_calibration(calibration, original, calibration_limit), validation, original)
    normalised, _ = run_pipeline(original, base, feeds) if base else (original.clone(), [])
    objective_fn = Objective(objective, _input_shapes(normalised, feeds))
    threads = max(1, (os.cpu_count() or 2) // jobs) if jobs > 1 else 2
    prober = Prober(normalised, feeds, check_feeds, objective_fn, threads)
    reference_outputs = run_all(make_session(original), check_feeds)
    baseline_metric = _call_metric(metric_fn, original) if metric_fn else None
    timings["setup_s"] = time.perf_counter() - start

    t = time.perf_counter()
    knob_list = candidate_knobs(normalised, families)
    done = [0]

    def on_result(_):
        done[0] += 1
        if progress:
            progress("sensitivity", done[0], len(knob_list))

    probes = run_probes(prober, knob_list, jobs, on_result)
    timings["sensitivity_s"] = time.perf_counter() - t

    t = time.perf_counter()
    order = greedy_order(successful(probes))

    def verify(k: int, extra: tuple[int, ...] = ()) -> Point:
        return verify_plan(plan_at(order, k, extra), k, predicted(order, k, extra)[0], extra)

    def verify_plan(choice, k: int, predicted_damage: float, extra: tuple[int, ...] = (), uniform: str = "") -> Point:
        # Under the pass manager with its instruments, exactly as `optimize -p PLAN` runs it, so
        # that the plan reproduces this model bit for bit.
        pipeline = plan_pipeline(base, families, choice)
        run = compress(original, pipeline, calibration=feeds)
        candidate = run.model
        drift = drift_against(reference_outputs, candidate, check_feeds)
        value = _call_metric(metric_fn, candidate) if metric_fn and budget.needs_metric else None
        problems = budget.violations(drift, value, baseline_metric)
        measures = drift.to_dict()
        if value is not None:
            measures["metric"] = value
        if progress and not uniform:
            progress("search", k + len(extra), len(order))
        # kept: the normalised model (--best-effort's fallback) and the latest plan within
        # budget, the only one the bisection or the fill can still choose
        if (k, extra) == (0, ()):
            kept["normalised"] = run
        if not problems:
            kept["within"] = run
        return Point(k, predicted_damage, objective_fn(candidate), damage_of(drift), not problems,
                     measures, "; ".join(problems), str(pipeline), extra, uniform)

    kept: dict[str, Result] = {}
    points, chosen = bisect_plans(len(order), verify)
    if chosen is not None and fill:
        filled, chosen = fill_plan(order, chosen, verify, fill)
        points += filled
    if chosen is not None:
        searched = kept["within"]
        # The additive prediction only guides: a uniform plan is run unless it is predicted to do
        # more damage than a searched plan that broke the budget.
        broke = min((p.predicted_damage for p in points if not p.within_budget), default=math.inf)
        uniform = [plan for plan in uniform_plans(successful(probes)) if plan[2] <= broke]
        for i, (label, choice, damage) in enumerate(uniform):
            point = verify_plan(choice, len(choice), damage, uniform=label)
            points.append(point)
            if progress:
                progress("uniform plans", i + 1, len(uniform))
            if point.within_budget and point.objective < chosen.objective:
                chosen, searched = point, kept["within"]
        kept["within"] = searched
    timings["search_s"] = time.perf_counter() - t
    within = chosen is not None
    if chosen is None:
        best = points[0]
        message = (f"budget '{budget}' cannot be met: even the normalised model alone gives "
                   f"{best.reason} (damage {best.damage:.3g})")
        if not best_effort:
            raise BudgetUnreachable(message + "; nothing written (--best-effort writes the best found)")
        chosen = best
    final = kept["within" if within else "normalised"]
    baseline = {"size": initializer_bytes(original), "objective": objective_fn(original),
                "metric": {"metric": baseline_metric} if baseline_metric is not None else {}}
    result = {"size": initializer_bytes(final.model), "objective": chosen.objective, "metric": chosen.measures,
              "steps": chosen.steps, "of_steps": len(order)}
    timings["total_s"] = time.perf_counter() - start
    passes = [p.to_dict() for p in final.report.passes]
    return TuneResult(final.model, chosen.pipeline, str(budget), objective, baseline, result, probes, points, chosen,
                      passes, timings, within, source, len(feeds), len(check_feeds))


def _fit_and_check(feeds: list[dict], validation, model: ir.Model) -> tuple[list[dict], list[dict]]:
    """The feeds the passes calibrate on, and the held-out feeds drift is measured on: the
    ``validation`` data when given, else the second half of the calibration feeds."""
    if validation is not None:
        return feeds, calib.load_calibration(validation, model)
    if len(feeds) < 2:
        raise CalibrationError(
            f"tune measures drift on feeds the passes did not calibrate on: give at least 2 calibration feeds "
            f"(got {len(feeds)}; an .npz array with one more leading axis is a stack of feeds) or --validation DATA")
    fit = (len(feeds) + 1) // 2
    return feeds[:fit], feeds[fit:]


def _input_shapes(model: ir.Model, feeds: list[dict]) -> dict:
    from onnxcompress.instruments.cost import symbolic_dims_from

    return symbolic_dims_from(model, feeds[0]) if feeds else {}
