"""Selection: the best plan within a budget, from the sensitivity table.

Each (node, slot) offers its probed levels, each with a damage and a saving (see
:mod:`onnxcompress.sensitivity`). Per (node, slot) the levels worth having lie on the upper
convex hull of (damage, saving) from (0, 0): a level that saves less than a cheaper one, or
whose extra saving per extra damage beats the step before it, is never the better choice.
The hull's steps, from every (node, slot), sorted by saving per damage, form the *greedy
order* (the usual greedy of the multiple-choice knapsack): the plan of size k takes the first
k steps, and its predicted damage (the sum of the chosen levels' damages: noise powers add)
grows with k.

The search then finds the largest k whose plan, run whole, keeps the budget: a verification
run at k = all, then a bisection between the last plan that held and the first that broke
(monotone in practice; each run is recorded, so the explored points form the Pareto front of
objective against measured damage). Backing off from a plan that breaks the budget is the
bisection step towards fewer knobs.

Uniform plans are verified too: each family at each level on every node it applies to (what a
preset does). Greedy on the probes, the search can stop before a plan that a uniform setting
reaches (a knob whose gain shows only when every node takes it, one whose probes each look
dearer than they are together); the tuner returns a uniform plan when one keeps the budget and
beats the searched one on the objective, so a tuned plan is never worse than the uniform plans
it ran. It runs those whose predicted damage is no more than that of a searched plan that broke
the budget.

The bisection stops at the first step that breaks the budget, but later steps may still fit
in what is left of it (the additive prediction is only a guide: a step's real damage in the
whole plan can be far from its probe's). The *fill* then tries the steps after the prefix one
at a time, in greedy order, each added to the plan so far and kept if the whole plan still
keeps the budget, until ``tries`` verification runs are spent. A (node, slot) whose step broke
the budget is not tried again at a higher level (more damage, by the hull).
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from typing import Callable

from onnxcompress.knobs import Knob
from onnxcompress.sensitivity import ProbeResult


@dataclasses.dataclass(frozen=True)
class Step:
    """Moving one (node, slot) to the next level on its hull."""

    key: tuple[str, str]  # (node, slot)
    knob: Knob
    damage: float  # of the level (not the increment)
    saving: float
    efficiency: float  # extra saving per extra damage


def greedy_order(results: list[ProbeResult]) -> list[Step]:
    """The hull steps of every (node, slot), most saving per damage first."""
    by_key: dict[tuple[str, str], list[ProbeResult]] = defaultdict(list)
    for r in results:
        by_key[(r.knob.node, r.knob.family.slot)].append(r)
    steps: list[tuple[float, int, int, Step]] = []
    for group, (key, options) in enumerate(by_key.items()):
        for i, (result, efficiency) in enumerate(_hull(options)):
            step = Step(key, result.knob, result.damage, result.saving, efficiency)
            steps.append((-efficiency, group, i, step))
    # Along a hull the efficiencies strictly fall, so this sort keeps each group's steps in order.
    steps.sort(key=lambda item: item[:3])
    return [s for *_, s in steps]


def _hull(options: list[ProbeResult]) -> list[tuple[ProbeResult, float]]:
    """The upper convex hull of (damage, saving) from (0, 0), as (level, step efficiency)."""
    ordered = sorted(options, key=lambda r: (r.damage, -r.saving))
    frontier = []
    for r in ordered:
        if r.saving > (frontier[-1].saving if frontier else 0.0):
            frontier.append(r)
    hull: list[ProbeResult] = []
    for r in frontier:
        while hull and _slope(hull[-2] if len(hull) > 1 else None, hull[-1]) <= _slope(hull[-1], r):
            hull.pop()
        hull.append(r)
    out, previous = [], None
    for r in hull:
        out.append((r, _slope(previous, r)))
        previous = r
    return out


def _slope(a: ProbeResult | None, b: ProbeResult) -> float:
    d0, s0 = (a.damage, a.saving) if a is not None else (0.0, 0.0)
    dd, ds = b.damage - d0, b.saving - s0
    return math.inf if dd <= 0 else ds / dd


def _taken(order: list[Step], k: int, extra: tuple[int, ...]) -> list[Step]:
    return order[:k] + [order[i] for i in sorted(extra)]


def plan_at(order: list[Step], k: int, extra: tuple[int, ...] = ()) -> dict[tuple[str, str], Knob]:
    """The (node, slot) -> knob choice after the first ``k`` steps and the steps ``extra``
    (indices past ``k``)."""
    choice: dict[tuple[str, str], Knob] = {}
    for step in _taken(order, k, extra):
        choice[step.key] = step.knob
    return choice


def predicted(order: list[Step], k: int, extra: tuple[int, ...] = ()) -> tuple[float, float]:
    """(damage, saving) the additive model predicts for the first ``k`` steps and ``extra``."""
    last: dict[tuple[str, str], Step] = {}
    for step in _taken(order, k, extra):
        last[step.key] = step
    return sum(s.damage for s in last.values()), sum(s.saving for s in last.values())


def uniform_plans(results: list[ProbeResult]) -> list[tuple[str, dict[tuple[str, str], Knob], float]]:
    """(label, plan, predicted damage) of each family at each level on every node whose probe at
    that level succeeded, in the order of the probes."""
    plans: dict[str, tuple[dict[tuple[str, str], Knob], list[float]]] = {}
    for r in results:
        name = r.knob.label if r.knob.label.startswith(r.knob.family.name) else f"{r.knob.family.name} {r.knob.label}"
        label = f"{name} everywhere"
        choice, damages = plans.setdefault(label, ({}, []))
        choice[(r.knob.node, r.knob.family.slot)] = r.knob
        damages.append(r.damage)
    return [(label, choice, sum(damages)) for label, (choice, damages) in plans.items()]


@dataclasses.dataclass
class Point:
    """One verified plan: the first ``k`` steps of the greedy order and the fill's ``extra``
    steps (indices into the order), run whole."""

    k: int
    predicted_damage: float
    objective: float
    damage: float
    within_budget: bool
    measures: dict  # drift metrics and the user metric, as measured
    reason: str  # why it broke the budget ('' when within)
    pipeline: str
    extra: tuple[int, ...] = ()
    uniform: str = ""  # a uniform plan's label (then k is its number of knobs, not a prefix)

    @property
    def steps(self) -> int:
        return self.k + len(self.extra)

    @property
    def label(self) -> str:
        if self.uniform:
            return self.uniform
        return f"k={self.k}" + (f" + {','.join(str(i + 1) for i in self.extra)}" if self.extra else "")

    def to_dict(self) -> dict:
        return {
            "label": self.label, "k": self.k, "extra": list(self.extra), "steps": self.steps, "uniform": self.uniform,
            "predicted_damage": self.predicted_damage,
            "objective": self.objective, "damage": self.damage, "within_budget": self.within_budget,
            "verified": True, "metric": self.measures.get("metric"), "measures": self.measures,
            "reason": self.reason, "pipeline": self.pipeline,
        }


def bisect_plans(count: int, verify: Callable[[int], Point]) -> tuple[list[Point], Point | None]:
    """Every verified point, and the one with the largest k within budget (None if even k=0
    breaks it). ``count`` is the length of the greedy order."""
    points: dict[int, Point] = {}

    def check(k: int) -> bool:
        if k not in points:
            points[k] = verify(k)
        return points[k].within_budget

    if not check(0):
        return list(points.values()), None
    if count == 0 or check(count):
        return sorted(points.values(), key=lambda p: p.k), points[count if count else 0]
    good, bad = 0, count
    while bad - good > 1:
        mid = (good + bad) // 2
        if check(mid):
            good = mid
        else:
            bad = mid
    return sorted(points.values(), key=lambda p: p.k), points[good]


def fill_plan(order: list[Step], start: Point, verify: Callable[[int, tuple[int, ...]], Point],
              tries: int) -> tuple[list[Point], Point]:
    """Every point the fill verified, and the plan it ends with: ``start`` (a prefix within
    budget whose next step broke it) with each later step that still keeps the budget."""
    chosen, points = start, []
    refused = {order[start.k].key} if start.k < len(order) else set()  # the step the bisection stopped at
    for i in range(start.k + 1, len(order)):
        if len(points) >= tries:
            break
        if order[i].key in refused:
            continue
        point = verify(start.k, chosen.extra + (i,))
        points.append(point)
        if point.within_budget:
            chosen = point
        else:
            refused.add(order[i].key)
    return points, chosen


def pareto_front(points: list[Point]) -> list[Point]:
    """The points no other point beats on both objective (lower) and damage (lower)."""
    front = []
    for p in sorted(points, key=lambda p: (p.damage, p.objective)):
        if not front or p.objective < front[-1].objective:
            front.append(p)
    return front
