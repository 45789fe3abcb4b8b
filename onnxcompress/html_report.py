"""The tuning report as one self-contained HTML file.

:func:`write_html_report` renders the dict that ``onnxcompress tune`` ends with into a single
HTML page that needs nothing else: CSS inline, plots drawn by matplotlib as inline SVG (text
kept as text, ids made unique per plot), no script, no link to anything outside the file.
Each section is shown only when its data is there:

- header: model, budget, objective, plan steps, timings, a warning when the budget was not met,
  the chosen plan (pipeline text) and baseline against result (size, MACs, latency, objective,
  metric values);
- passes: a table and bar charts of bytes, MACs and drift after each pass;
- sensitivity: a heat map, one row per node in the order the nodes first appear (the tuner lists
  them in graph order), one column per knob level grouped by family, the colour the damage on a
  log scale in eight bins, the value in the cell and the details in its tooltip; no cell where a
  knob was not measured;
- Pareto front: explored points, the objective (lower is better) against the measure the
  budget's first constraint names (``measures.top1`` for ``top1>=0.99``, else ``metric``) with
  the budget line, and against damage; the front drawn as a step line, the chosen point
  starred; the points in a table below;
- refusals: what was refused and why, grouped by reason (reasons that differ only in numbers
  or quoted names are one group), the largest group first.

Every piece of text from the data is HTML-escaped. A key that is missing or null leaves its
section or cell out; a value of the wrong type is a :class:`ReportDataError` naming where it is.
The page is rendered completely before anything is written, so a failure leaves no file.
"""

from __future__ import annotations

import dataclasses
import html
import io
import math
import re
from pathlib import Path
from typing import Any, Callable

from onnxcompress.errors import OnnxCompressError
from onnxcompress.modelio import write_atomically

# ColorBrewer YlOrRd, 8 classes: pale for little damage, dark red for the most.
HEAT_COLOURS = ("#ffffcc", "#ffeda0", "#fed976", "#feb24c", "#fd8d3c", "#fc4e2a", "#e31a1c", "#b10026")
# Bins from this one on are dark enough to need white text.
FIRST_DARK_BIN = 5
DRIFT_KEYS = ("sqnr_db", "cosine", "max_abs", "top1")
# A number standing alone (not the 8 of int8 or the 1 of features.1), and a quoted name.
_NUMBER = re.compile(r"(?<![\w.])(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?(?!\w)")
_QUOTED = re.compile(r"'[^']*'")
_BUDGET_PART = re.compile(r"\s*([A-Za-z_][\w.]*)\s*(>=|<=|>|<|=)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*")


class ReportDataError(OnnxCompressError):
    """The data given to the tuning report has a value of the wrong type."""


def write_html_report(data: dict, path) -> Path:
    """Render ``data`` (the tuner's result dict) as one HTML file at ``path``, written atomically."""
    return write_atomically(Path(path), render_html_report(data).encode("utf-8"))


def render_html_report(data: dict) -> str:
    """The report page as text (see the module docstring for what it holds)."""
    if not isinstance(data, dict):
        raise ReportDataError(f"tuning report data must be a dict, not {type(data).__name__}")
    plots = _Plots()
    sections = [
        _header_section(data),
        _passes_section(data, plots),
        _sensitivity_section(data),
        _pareto_section(data, plots),
        _refused_section(data),
    ]
    title = "Tuning report" + (f": {_text(data['model'], 'model')}" if data.get("model") is not None else "")
    body = "\n".join([f"<h1>{_esc(title)}</h1>", *filter(None, sections)])
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{_esc(title)}</title>\n'
        f"<style>{_CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


# ---------------------------------------------------------------------------- reading the data


def _esc(text: str) -> str:
    return html.escape(text, quote=True)


def _text(value: Any, where: str) -> str:
    if isinstance(value, (dict, list)):
        raise ReportDataError(f"tuning report: {where} should be text, not {type(value).__name__}")
    return str(value)


def _number(value: Any, where: str) -> float | None:
    """A number from the data: None stays None, 'inf'/'-inf'/'nan' (as drift dicts write
    infinities) become floats, anything else that is not a number is an error."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lower() in ("inf", "+inf", "-inf", "nan"):
        return float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ReportDataError(f"tuning report: {where} should be a number, not {value!r:.60}")
    return float(value)


def _dict(value: Any, where: str) -> dict:
    """A dict from the data (``where`` says where, as ``passes[2].cost``); None is empty."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ReportDataError(f"tuning report: {where} should be a dict, not {type(value).__name__}")
    return value


def _records(value: Any, where: str) -> list[dict]:
    """A list of dicts from the data; None is empty."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(r, dict) for r in value):
        raise ReportDataError(f"tuning report: {where} should be a list of dicts")
    return value


# ---------------------------------------------------------------------------- formatting


def _format_bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _format_count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f}"


def _format_value(n: float | None, kind: str = "") -> str:
    """``n`` as a person reads it: bytes for sizes, k/M/G for MACs and parameters."""
    if n is None:
        return ""
    if not math.isfinite(n):
        return str(n)
    if kind in ("size", "bytes"):
        return _format_bytes(n)
    if kind in ("macs", "params"):
        return _format_count(n)
    if kind in ("latency", "latency_ms", "time_s"):
        return f"{n:.3g}"
    return f"{n:.4g}"


def _format_damage(d: float) -> str:
    if d == 0 or not math.isfinite(d):
        return str(d) if d else "0"
    mantissa, exponent = f"{d:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _change(before: float | None, after: float | None, relative: bool) -> str:
    """``after`` against ``before``: a ratio and percentage for costs, a difference for metrics."""
    if before is None or after is None or not (math.isfinite(before) and math.isfinite(after)):
        return ""
    if not relative:
        return f"{after - before:+.4g}"
    if before == 0:
        return ""
    return f"×{after / before:.3g} ({(after / before - 1) * 100:+.1f}%)"


def _table(headers: list[str], rows: list[list[str]], cls: str = "") -> str:
    """A table whose cells are already HTML (the callers escape the text they put in)."""
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "\n".join("<tr>" + "".join(row) + "</tr>" for row in rows)
    klass = f' class="{cls}"' if cls else ""
    return f"<table{klass}>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def _td(text: str, cls: str = "", title: str = "") -> str:
    attrs = (f' class="{cls}"' if cls else "") + (f' title="{_esc(title)}"' if title else "")
    return f"<td{attrs}>{_esc(text)}</td>"


# ---------------------------------------------------------------------------- header


def _header_section(data: dict) -> str:
    items = "".join(f"<dt>{key}</dt><dd>{_esc(text)}</dd>" for key, text in _header_facts(data))
    out = ['<header id="summary">']
    if data.get("within_budget") is False:
        out.append('<p class="warning">The budget was not met: this is the best plan found.</p>')
    if items:
        out.append(f"<dl>{items}</dl>")
    if data.get("plan") is not None:
        out.append(f'<h2>Chosen plan</h2>\n<pre id="plan">{_esc(_text(data["plan"], "plan"))}</pre>')
    objective = str(data.get("objective") or "")
    comparison = _baseline_table(
        _dict(data.get("baseline"), "baseline"), _dict(data.get("result"), "result"), objective
    )
    if comparison:
        out.append(f"<h2>Baseline and result</h2>\n{comparison}")
    if len(out) == 1:
        return ""
    out.append("</header>")
    return "\n".join(out)


def _header_facts(data: dict) -> list[tuple[str, str]]:
    """(label, text) of the run: model, budget, objective, how far the plan went, timings."""
    facts = [(key, _text(data[key], key)) for key in ("model", "budget", "objective") if data.get(key) is not None]
    result = _dict(data.get("result"), "result")
    steps, of_steps = _number(result.get("steps"), "result.steps"), _number(result.get("of_steps"), "result.of_steps")
    if steps is not None:
        facts.append(("plan steps", f"{steps:.0f}" + (f" of {of_steps:.0f}" if of_steps is not None else "")))
    timings = _dict(data.get("timings"), "timings")
    if timings:
        seconds = [(k, _number(v, f"timings.{k}")) for k, v in timings.items()]
        facts.append(("time", ", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in seconds if v is not None)))
    return facts


def _baseline_table(baseline: dict, result: dict, objective: str) -> str:
    """Costs (ratio after/before) then metrics (difference); the objective's own row only
    where it says something the size row does not."""
    if not baseline and not result:
        return ""
    rows, shown = [], []
    for key, label in (("size", "size"), ("macs", "MACs"), ("latency_ms", "latency (ms)"), ("objective", "objective")):
        before = _number(baseline.get(key), f"baseline.{key}")
        after = _number(result.get(key), f"result.{key}")
        if (before is None and after is None) or (key == "objective" and (before, after) in shown):
            continue
        kind = objective if key == "objective" else key
        rows.append(
            _comparison_row(f"objective ({objective})" if key == "objective" else label, before, after, kind, True)
        )
        shown.append((before, after))
    before_metrics = _dict(baseline.get("metric"), "baseline.metric")
    after_metrics = _dict(result.get("metric"), "result.metric")
    for name in dict.fromkeys([*before_metrics, *after_metrics]):
        before = _number(before_metrics.get(name), f"baseline.metric.{name}")
        after = _number(after_metrics.get(name), f"result.metric.{name}")
        rows.append(_comparison_row(name, before, after, "", relative=False))
    return _table(["", "baseline", "result", "change"], rows, "comparison") if rows else ""


def _comparison_row(label: str, before: float | None, after: float | None, kind: str, relative: bool) -> list[str]:
    def cell(n: float | None) -> str:
        exact = "" if n is None or not math.isfinite(n) else f"{n:,.10g}"
        return _td(_format_value(n, kind), title=exact)

    return [_td(label, "name"), cell(before), cell(after), _td(_change(before, after, relative))]


# ---------------------------------------------------------------------------- passes


@dataclasses.dataclass
class _PassRow:
    """One entry of ``data["passes"]``, its numbers read."""

    name: str
    status: str
    reason: str  # why skipped, rolled back or failed
    counts: dict[str, float | None]  # nodes rewritten, refused
    cost: dict[str, float | None]  # params, bytes, macs
    drift: dict[str, float | None]
    time_s: float | None

    @classmethod
    def read(cls, p: dict, i: int) -> "_PassRow":
        cost = _dict(p.get("cost"), f"passes[{i}].cost")
        drift = _dict(p.get("drift"), f"passes[{i}].drift")
        return cls(
            name=_text(p.get("name", "?"), f"passes[{i}].name"),
            status=_text(p.get("status", ""), f"passes[{i}].status"),
            reason=_text(p.get("reason") or "", f"passes[{i}].reason"),
            counts={k: _number(p.get(k), f"passes[{i}].{k}") for k in ("rewritten", "refused")},
            cost={k: _number(cost.get(k), f"passes[{i}].cost.{k}") for k in ("params", "bytes", "macs")},
            drift={k: _number(v, f"passes[{i}].drift.{k}") for k, v in drift.items()},
            time_s=_number(p.get("time_s"), f"passes[{i}].time_s"),
        )


def _passes_section(data: dict, plots: "_Plots") -> str:
    passes = [_PassRow.read(p, i) for i, p in enumerate(_records(data.get("passes"), "passes"))]
    if not passes:
        return ""
    drift_keys = [k for k in DRIFT_KEYS if any(k in p.drift for p in passes)]
    drift_keys += [k for k in dict.fromkeys(k for p in passes for k in p.drift) if k not in drift_keys]
    counts = [k for k in ("rewritten", "refused") if any(p.counts[k] is not None for p in passes)]
    headers = ["#", "pass", "status", *counts, "params", "bytes", "MACs", *map(_esc, drift_keys), "time (s)"]
    rows = [
        [_td(str(i + 1)), _td(p.name, "name"), _td(p.status, title=p.reason)]
        + [_td(_format_value(p.counts[k])) for k in counts]
        + [_td(_format_value(p.cost[k], k), title=_exact(p.cost[k])) for k in ("params", "bytes", "macs")]
        + [_td(_format_value(p.drift.get(k))) for k in drift_keys]
        + [_td(_format_value(p.time_s, "time_s"))]
        for i, p in enumerate(passes)
    ]
    chart = _pass_chart(passes, drift_keys[:1], plots)
    return f'<section id="passes">\n<h2>Passes</h2>\n{_table(headers, rows, "passes")}\n{chart}\n</section>'


def _pass_chart(passes: list[_PassRow], drift_keys: list[str], plots: "_Plots") -> str:
    """Bars of bytes, MACs and the first drift metric after each pass (the panels with data)."""
    series = [
        (f"{title} after pass", key, [p.cost[key] for p in passes])
        for key, title in (("bytes", "bytes"), ("macs", "MACs"))
    ]
    series += [(f"{key} after pass", "", [p.drift.get(key) for p in passes]) for key in drift_keys]
    series = [s for s in series if any(x is not None for x in s[2])]
    if not series:
        return ""
    labels = [f"{i + 1} {p.name}" for i, p in enumerate(passes)]
    size = (max(6.0, 0.3 * len(labels)), 1.0 + 1.8 * len(series))
    return plots.svg(lambda fig: _draw_bars(fig, labels, series), size)


def _exact(n: float | None) -> str:
    return "" if n is None or not math.isfinite(n) else f"{n:,.10g}"


def _draw_bars(fig, labels: list[str], series: list[tuple[str, str, list[float | None]]]) -> None:
    """One bar panel per (title, kind, values), stacked, sharing the pass axis; infinite values
    (the SQNR of a pass that changed no number) are marked 'inf' at the top of their panel."""
    axes = fig.subplots(len(series), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (title, kind, values) in zip(axes, series):
        finite = [(i, v) for i, v in enumerate(values) if v is not None and math.isfinite(v)]
        ax.bar([i for i, _ in finite], [v for _, v in finite], color="#4c72b0")
        top = ax.get_ylim()[1]
        for i, v in enumerate(values):
            if v is not None and not math.isfinite(v):
                ax.text(i, top, str(v), ha="center", va="top", fontsize=7)
        ax.set_title(title, fontsize=9, loc="left")
        ax.grid(axis="y", alpha=0.3)
        if kind:
            _quantity_axis(ax.yaxis, kind)
    axes[-1].set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)


# ---------------------------------------------------------------------------- sensitivity


def _sensitivity_section(data: dict) -> str:
    entries = _records(data.get("sensitivity"), "sensitivity")
    if not entries:
        return ""
    nodes: dict[str, str] = {}
    columns: dict[str, dict[str, None]] = {}  # family -> knobs, in first-appearance order
    cells: dict[tuple[str, str, str], dict] = {}
    left_out = 0
    for i, e in enumerate(entries):
        if e.get("node") is None or e.get("knob") is None:
            left_out += 1
            continue
        node, knob = _text(e["node"], f"sensitivity[{i}].node"), _text(e["knob"], f"sensitivity[{i}].knob")
        family = _text(e.get("family") or "", f"sensitivity[{i}].family")
        nodes.setdefault(node, _text(e.get("op_type") or "", f"sensitivity[{i}].op_type"))
        columns.setdefault(family, {})[knob] = None
        cells[(node, family, knob)] = (i, e)  # a pair measured twice keeps its last measurement
    damages = [_number(e.get("damage"), f"sensitivity[{i}].damage") for i, e in enumerate(entries)]
    bins = _HeatBins([d for d in damages if d is not None])
    objective = str(data.get("objective") or "")
    keys = [(f, k) for f, knobs in columns.items() for k in knobs]
    family_row = '<th colspan="2"></th>' + "".join(
        f'<th colspan="{len(knobs)}">{_esc(f)}</th>' for f, knobs in columns.items()
    )
    knob_row = "<th>node</th><th>op</th>" + "".join(f"<th>{_esc(k)}</th>" for _, k in keys)
    rows = []
    for node, op in nodes.items():
        row = [_td(node, "name"), _td(op, "name")]
        row += [_heat_cell(cells.get((node, f, k)), bins, objective) for f, k in keys]
        rows.append("<tr>" + "".join(row) + "</tr>")
    note = f"<p>{left_out} measurement(s) without a node or knob left out.</p>" if left_out else ""
    return (
        '<section id="sensitivity">\n<h2>Per-node sensitivity</h2>\n'
        f"<p>Damage per node and knob level, colour on a log scale; hover a cell for saving and drift.</p>\n"
        f"{bins.legend()}\n{note}"
        f'<div class="scroll"><table class="heat">\n<thead><tr>{family_row}</tr><tr>{knob_row}</tr></thead>\n'
        f"<tbody>\n" + "\n".join(rows) + "\n</tbody>\n</table></div>\n</section>"
    )


class _HeatBins:
    """Eight bins of damage, equal in log10 between the smallest positive and the largest finite
    damage. Zero (or negative) damage takes the first bin; infinite or NaN damage its own class."""

    def __init__(self, damages: list[float]):
        positive = [d for d in damages if math.isfinite(d) and d > 0]
        self.low = math.log10(min(positive)) if positive else 0.0
        self.high = math.log10(max(positive)) if positive else 0.0

    def index(self, damage: float) -> int:
        if damage <= 0:
            return 0
        if self.high == self.low:
            return len(HEAT_COLOURS) // 2
        share = (math.log10(damage) - self.low) / (self.high - self.low)
        return min(len(HEAT_COLOURS) - 1, max(0, int(share * len(HEAT_COLOURS))))

    def css_class(self, damage: float) -> str:
        return f"d{self.index(damage)}" if math.isfinite(damage) else "dx"

    def legend(self) -> str:
        """Each bin's colour labelled with the smallest damage it takes."""
        if self.high == self.low:
            bins = [(len(HEAT_COLOURS) // 2, 10**self.low)]
        else:
            step = (self.high - self.low) / len(HEAT_COLOURS)
            bins = [(i, 10 ** (self.low + i * step)) for i in range(len(HEAT_COLOURS))]
        swatches = "".join(f'<span class="d{i}">{_format_damage(low)}</span>' for i, low in bins)
        return f'<p class="legend">damage from {swatches} up, <span class="dx">inf / nan</span></p>'


def _heat_cell(cell: tuple[int, dict] | None, bins: _HeatBins, objective: str) -> str:
    """The cell of ``(index in data["sensitivity"], entry)``; blank where nothing was measured."""
    if cell is None:
        return "<td></td>"
    i, entry = cell
    damage = _number(entry.get("damage"), f"sensitivity[{i}].damage")
    details = [f"{entry.get('knob')}: damage {_format_value(damage) if damage is not None else 'not measured'}"]
    saving = _number(entry.get("saving"), f"sensitivity[{i}].saving")
    if saving is not None:
        details.append(f"saving {_format_value(saving, objective)}")
    drift = _dict(entry.get("drift"), f"sensitivity[{i}].drift")
    details += [f"{k} {_format_value(_number(v, f'sensitivity[{i}].drift.{k}'))}" for k, v in drift.items()]
    if damage is None:
        return _td("", title="; ".join(details))
    return _td(_format_damage(damage), bins.css_class(damage), "; ".join(details))


# ---------------------------------------------------------------------------- Pareto front


def pareto_front(xs: list[float], ys: list[float], higher_y_is_better: bool) -> list[int]:
    """Indices of the points no other point dominates, by increasing x: x is minimised, y is
    maximised (or minimised). A point ties with an earlier one on both coordinates is left out."""
    sign = -1.0 if higher_y_is_better else 1.0
    order = sorted(range(len(xs)), key=lambda i: (xs[i], sign * ys[i]))
    front, best = [], math.inf
    for i in order:
        if sign * ys[i] < best:
            front.append(i)
            best = sign * ys[i]
    return front


@dataclasses.dataclass(frozen=True)
class BudgetLine:
    """The first ``NAME OP VALUE`` constraint of a budget (``top1>=0.99``): the line drawn on
    the metric panel. ``<=`` and ``<`` mean lower is better; ``>=``, ``>`` and ``=`` higher.
    ``metric_drop<=X`` is the line X below the baseline's user metric (none without it)."""

    metric: str
    threshold: float
    higher_is_better: bool
    text: str

    # Budget names that a point's measures spell differently.
    MEASURES = {"sqnr": "sqnr_db", "maxabs": "max_abs", "metric_drop": "metric"}

    @classmethod
    def parse(cls, budget: Any, baseline: dict | None = None) -> "BudgetLine | None":
        m = cls._first(budget)
        if m is None:
            return None
        name, op, value, text = m.group(1), m.group(2), float(m.group(3)), m.group(0).strip()
        if name == "metric_drop":
            base = _number(_dict((baseline or {}).get("metric"), "baseline.metric").get("metric"), "baseline.metric")
            return None if base is None else cls("metric", base - value, True, text)
        return cls(name, value, op not in ("<=", "<"), text)

    @classmethod
    def measure_key(cls, budget: Any) -> str | None:
        """The key of ``explored[i]["measures"]`` the budget's first constraint reads."""
        m = cls._first(budget)
        return None if m is None else cls.MEASURES.get(m.group(1), m.group(1))

    @staticmethod
    def _first(budget: Any) -> re.Match | None:
        return None if budget is None else _BUDGET_PART.fullmatch(str(budget).split(",")[0])


def _budget_measure(point: dict, key: str | None, i: int) -> float | None:
    """What the budget line is drawn against: the point's measure the budget names, else its
    ``metric``."""
    measures = _dict(point.get("measures"), f"explored[{i}].measures")
    if key is not None and measures.get(key) is not None:
        return _number(measures[key], f"explored[{i}].measures.{key}")
    return _number(point.get("metric"), f"explored[{i}].metric")


def _pareto_section(data: dict, plots: "_Plots") -> str:
    explored = _records(data.get("explored"), "explored")
    if not explored:
        return ""
    chosen = data.get("chosen")
    if chosen is not None and (
        isinstance(chosen, bool) or not isinstance(chosen, int) or not 0 <= chosen < len(explored)
    ):
        raise ReportDataError(
            f"tuning report: 'chosen' should be an index into the {len(explored)} explored points, not {chosen!r:.40}"
        )
    budget_key = BudgetLine.measure_key(data.get("budget"))
    points = [
        {
            "label": _text(p.get("label", f"#{i}"), f"explored[{i}].label"),
            **{k: _number(p.get(k), f"explored[{i}].{k}") for k in ("objective", "damage")},
            "metric": _budget_measure(p, budget_key, i),
            "within": None if p.get("within_budget") is None else bool(p["within_budget"]),
            "verified": None if p.get("verified") is None else bool(p["verified"]),
        }
        for i, p in enumerate(explored)
    ]
    objective = str(data.get("objective") or "objective")
    budget = BudgetLine.parse(data.get("budget"), _dict(data.get("baseline"), "baseline"))
    panels = []
    if any(p["metric"] is not None for p in points):
        panels.append(("metric", budget.metric if budget else "metric", budget))
    if any(p["damage"] is not None for p in points):
        panels.append(("damage", "damage", None))
    chart = ""
    if panels:
        size = (4.8 * len(panels), 3.6)
        chart = plots.svg(lambda fig: _draw_pareto(fig, points, chosen, objective, panels), size)
    table = _explored_table(points, chosen, objective, budget.metric if budget else "metric")
    return (
        f'<section id="pareto">\n<h2>Pareto front</h2>\n{chart}\n'
        f"<details open><summary>{len(points)} explored points</summary>\n{table}\n</details>\n</section>"
    )


def _draw_pareto(fig, points: list[dict], chosen: int | None, objective: str, panels: list) -> None:
    """One panel per (key, y label, budget line): objective against metric, against damage."""
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (key, ylabel, budget) in zip(axes, panels):
        shown = [i for i, p in enumerate(points) if _finite(p["objective"]) and _finite(p[key])]
        _scatter_by_status(ax, [points[i] for i in shown], key)
        xs, ys = [points[i]["objective"] for i in shown], [points[i][key] for i in shown]
        higher_is_better = key == "metric" and (budget.higher_is_better if budget else True)
        front = pareto_front(xs, ys, higher_is_better)
        if front:
            ax.step([xs[i] for i in front], [ys[i] for i in front], where="post", color="black", linewidth=1,
                    label="Pareto front")  # fmt: skip
        if chosen in shown:
            star = points[chosen]
            ax.scatter([star["objective"]], [star[key]], marker="*", s=180, color="gold", edgecolors="black",
                       zorder=5, label=f"chosen: {star['label']}")  # fmt: skip
        if budget is not None:
            ax.axhline(budget.threshold, linestyle="--", color="#d62728", linewidth=1, label=f"budget {budget.text}")
        if key == "damage" and ys and min(ys) > 0:
            _log_axis(ax.yaxis)
        ax.set_xlabel(objective)
        _quantity_axis(ax.xaxis, objective)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)


_POINT_COLOURS = {
    True: ("#1f77b4", "within budget"),
    False: ("#d62728", "over budget"),
    None: ("#7f7f7f", "budget unknown"),
}


def _scatter_by_status(ax, points: list[dict], key: str) -> None:
    """Colour says within or over budget; a filled marker that the point was verified."""
    for within, (colour, label) in _POINT_COLOURS.items():
        for verified in (True, False):
            group = [p for p in points if p["within"] is within and (p["verified"] is True) is verified]
            if group:
                ax.scatter([p["objective"] for p in group], [p[key] for p in group], s=22, edgecolors=colour,
                           facecolors=colour if verified else "none",
                           label=label + ("" if verified else ", not verified"))  # fmt: skip


def _quantity_axis(axis, kind: str) -> None:
    """Tick labels written as the tables write ``kind`` (MiB for sizes, M for MACs)."""
    from matplotlib.ticker import FuncFormatter

    axis.set_major_formatter(FuncFormatter(lambda value, _: _format_value(value, kind)))


def _log_axis(axis) -> None:
    """A log scale labelled as the tables write damage (matplotlib's default labels are math
    text, which the page does not parse: see ``_Plots.RC``)."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    axis.axes.set_yscale("log")
    axis.set_major_formatter(FuncFormatter(lambda value, _: _format_damage(value)))
    axis.set_minor_formatter(NullFormatter())


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def _explored_table(points: list[dict], chosen: int | None, objective: str, metric: str) -> str:
    def yes_no(v: Any) -> str:
        return "" if v is None else "yes" if v else "no"

    rows = [
        [
            _td(str(i)),
            _td(p["label"], "name"),
            _td(_format_value(p["objective"], objective), title=_exact(p["objective"])),
            _td(_format_damage(p["damage"]) if p["damage"] is not None else ""),
            _td(_format_value(p["metric"])),
            _td(yes_no(p["within"])),
            _td(yes_no(p["verified"])),
            _td("chosen" if i == chosen else "", "chosen" if i == chosen else ""),
        ]
        for i, p in enumerate(points)
    ]
    return _table(
        ["#", "point", _esc(objective), "damage", _esc(metric), "within budget", "verified", ""], rows, "explored"
    )


# ---------------------------------------------------------------------------- refusals


def reason_shape(reason: str) -> str:
    """The reason with its numbers and quoted names masked (``N``, ``'…'``): refusals that differ
    only in those ("rank 12 does not pay for 40×30") are one group."""
    return _NUMBER.sub("N", _QUOTED.sub("'…'", reason))


def _refused_section(data: dict) -> str:
    refused = _records(data.get("refused"), "refused")
    if not refused:
        return ""
    groups: dict[str, list[tuple[str, dict]]] = {}
    for i, r in enumerate(refused):
        reason = _text(r.get("reason") or "(no reason given)", f"refused[{i}].reason")
        groups.setdefault(reason_shape(reason), []).append((reason, r))
    columns = ["pass", "node", "op_type"] + (["knob"] if any(r.get("knob") is not None for r in refused) else [])
    ordered = sorted(groups.items(), key=lambda item: -len(item[1]))  # stable: ties keep first appearance
    out = ['<section id="refused">', f"<h2>Refused ({len(refused)})</h2>"]
    for shape, group in ordered:
        exact = {reason for reason, _ in group}
        heading = shape if len(exact) > 1 else group[0][0]
        rows = [
            [_td(_text(r.get(k) or "", f"refused.{k}"), "name") for k in columns]
            + ([_td(reason, "name")] if len(exact) > 1 else [])
            for reason, r in group
        ]
        headers = [*(c.replace("op_type", "op") for c in columns)] + (["reason"] if len(exact) > 1 else [])
        out.append(
            f'<details><summary><span class="count">{len(group)}</span> {_esc(heading)}'
            f"</summary>\n{_table(headers, rows, 'refused')}\n</details>"
        )
    out.append("</section>")
    return "\n".join(out)


# ---------------------------------------------------------------------------- plots


class _Plots:
    """Draws matplotlib figures as inline SVG; ids carry a per-plot prefix so that several
    plots in one page never share an id. matplotlib is imported on first use only."""

    RC = {
        "svg.fonttype": "none",  # text stays text: small files, searchable labels
        "text.parse_math": False,  # a '$' in a node name is just a character
        "font.size": 8,
        "font.sans-serif": ["DejaVu Sans", "Arial"],
    }

    def __init__(self):
        self.count = 0

    def svg(self, draw: Callable, size: tuple[float, float]) -> str:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        self.count += 1
        prefix = f"plot{self.count}-"
        with matplotlib.rc_context({**self.RC, "svg.hashsalt": prefix}):
            fig = Figure(figsize=size, layout="constrained")
            FigureCanvasAgg(fig)
            draw(fig)
            out = io.BytesIO()
            fig.savefig(out, format="svg", metadata={"Creator": None, "Date": None, "Format": None, "Type": None})
        return f'<figure class="plot">{_prefixed_ids(out.getvalue().decode("utf-8"), prefix)}</figure>'


def _prefixed_ids(svg: str, prefix: str) -> str:
    """The ``<svg>`` element alone (no XML prolog), every id and reference to one prefixed."""
    svg = svg[svg.index("<svg") :]
    svg = re.sub(r'\bid="([^"]+)"', lambda m: f'id="{prefix}{m[1]}"', svg)
    svg = re.sub(r'href="#([^"]+)"', lambda m: f'href="#{prefix}{m[1]}"', svg)
    return re.sub(r"url\(#([^)]+)\)", lambda m: f"url(#{prefix}{m[1]})", svg)


_CSS = (
    "body{font:14px/1.45 system-ui,sans-serif;color:#222;max-width:1200px;margin:1.5em auto;padding:0 1em}"
    "h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}"
    "dl{display:grid;grid-template-columns:max-content auto;gap:.2em 1em}dt{font-weight:600}dd{margin:0}"
    "pre{white-space:pre-wrap;word-break:break-all;background:#f6f6f6;padding:.6em;border:1px solid #e4e4e4}"
    "table{border-collapse:collapse;font-size:12px;margin:.5em 0}"
    "th,td{border:1px solid #ddd;padding:2px 6px;text-align:right}"
    "th{background:#f3f3f3}td.name{text-align:left;font-family:ui-monospace,monospace}"
    ".scroll{max-height:75vh;overflow:auto}.heat thead th{position:sticky;top:0}"
    ".heat td{font-size:11px;padding:1px 4px}"
    ".heat tr>th:nth-child(1),.heat td.name{white-space:nowrap}"
    ".legend span{display:inline-block;padding:0 .4em;font-size:11px}"
    "summary{cursor:pointer;margin:.3em 0}.count{display:inline-block;min-width:3em;font-weight:600}"
    ".warning{background:#fdecea;border-left:4px solid #d62728;padding:.4em .8em}"
    "td.chosen{background:#ffe680;font-weight:600}figure.plot{margin:.5em 0}figure.plot svg{max-width:100%;height:auto}"
    + "".join(
        f".d{i}{{background:{c}{';color:#fff' if i >= FIRST_DARK_BIN else ''}}}" for i, c in enumerate(HEAT_COLOURS)
    )
    + ".dx{background:#222;color:#fff}"
)
