"""The tuning report page: sections, escaping, self-containment, plots, atomic writing."""

from __future__ import annotations

import html
import math
import re
import subprocess
import sys
from html.parser import HTMLParser

import numpy as np
import pytest

from onnxcompress import html_report
from onnxcompress.html_report import (
    HEAT_COLOURS,
    BudgetLine,
    ReportDataError,
    _HeatBins,
    pareto_front,
    reason_shape,
    render_html_report,
    write_html_report,
)

SECTIONS = {"passes": "passes", "sensitivity": "sensitivity", "explored": "pareto", "refused": "refused"}
KNOBS = [
    ("quantize", "int8"),
    ("prune", "ratio=0.3"),
    ("prune", "ratio=0.5"),
    ("prune", "ratio=0.7"),
    ("low-rank", "ratio=0.25"),
    ("low-rank", "ratio=0.5"),
]


def mobilenet_like_nodes(blocks: int) -> list[tuple[str, str, bool]]:
    """(name, op_type, depthwise) in graph order, shaped like MobileNetV2's inverted residuals."""
    nodes = [("/features.0/features.0.0/Conv", "Conv", False)]
    for b in range(1, blocks + 1):
        nodes += [
            (f"/features.{b}/conv/conv.0/conv.0.0/Conv", "Conv", False),
            (f"/features.{b}/conv/conv.1/conv.1.0/Conv", "Conv", True),
            (f"/features.{b}/conv/conv.2/Conv", "Conv", False),
        ]
    return nodes + [("/classifier/classifier.1/Gemm", "Gemm", False)]


def tuning_data(blocks: int = 17, seed: int = 0) -> dict:
    """A tuner result of realistic shape: 3·blocks+2 nodes, six knob levels over three families
    (depthwise convs never low-rank), passes with costs and drift, explored points, refusals."""
    rng = np.random.default_rng(seed)
    nodes = mobilenet_like_nodes(blocks)
    sensitivity = []
    for name, op, depthwise in nodes:
        for family, knob in KNOBS:
            if family == "low-rank" and depthwise:
                continue
            damage = float(10 ** rng.uniform(-6, -1))
            sensitivity.append(
                {
                    "node": name,
                    "op_type": op,
                    "knob": knob,
                    "family": family,
                    "damage": damage,
                    "saving": float(rng.integers(100, 50_000)),
                    "drift": {"sqnr_db": float(-10 * math.log10(damage)), "top1": 1.0},
                }
            )
    passes = []
    size, macs = 13_964_000, 300_000_000
    for i, name in enumerate(["lift-constants", "fold-batchnorm", "prune-channels", "low-rank-conv", "quantize-qdq"]):
        size, macs = int(size * (1 - 0.15 * (i > 1))), int(macs * (1 - 0.1 * (i in (2, 3))))
        drift = None if i < 2 else {"sqnr_db": 40.0 - 5 * i, "cosine": 0.9999 - 0.0002 * i, "top1": 1.0 - 0.002 * i}
        passes.append(
            {
                "name": name,
                "status": "changed" if i != 1 else "unchanged",
                "cost": {"params": size // 4, "bytes": size, "macs": macs},
                "drift": drift,
                "time_s": 0.5 + i,
            }
        )
    explored = []
    for i in range(24):
        objective = 4_000_000 + 400_000 * i
        metric = min(1.0, 0.97 + 0.0015 * i + float(rng.uniform(-0.002, 0.002)))
        explored.append(
            {
                "label": f"tau=1e-{i % 6 + 1}",
                "objective": float(objective),
                "damage": float(10 ** -(1 + i / 6)),
                "metric": metric,
                "within_budget": metric >= 0.99,
                "verified": i % 3 == 0,
            }
        )
    refused = [
        {"pass": "low-rank-conv", "node": name, "op_type": op, "reason": "depthwise conv: nothing to factor"}
        for name, op, depthwise in nodes
        if depthwise
    ]
    refused += [
        {
            "pass": "quantize-qdq",
            "node": "/classifier/classifier.1/Gemm",
            "op_type": "Gemm",
            "reason": "the classifier stays float",
        }
    ]
    return {
        "model": "mobilenet_v2.onnx",
        "budget": "top1>=0.99",
        "objective": "size",
        "plan": "default,prune-channels{ratio=0.3,@/features\\.1/.*{skip=true}},quantize-qdq{calibration=minmax}",
        "baseline": {"size": 13_964_000, "macs": 300_000_000, "latency_ms": 4.1, "metric": {"top1": 1.0}},
        "result": {"size": 3_900_000, "macs": 300_000_000, "latency_ms": 2.7, "metric": {"top1": 0.99}},
        "passes": passes,
        "sensitivity": sensitivity,
        "explored": explored,
        "chosen": 14,
        "refused": refused,
    }


class TagBalance(HTMLParser):
    """Fails on an end tag that closes something other than the open element; collects ids."""

    VOID = {"meta", "br", "hr", "img", "input", "link", "col", "wbr"}

    def __init__(self):
        super().__init__()
        self.stack, self.ids, self.errors = [], [], []

    def handle_starttag(self, tag, attrs):
        self.ids += [v for k, v in attrs if k == "id"]
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.ids += [v for k, v in attrs if k == "id"]

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:]}")
        else:
            self.stack.pop()


def parsed(page: str) -> TagBalance:
    parser = TagBalance()
    parser.feed(page)
    parser.close()
    return parser


def section_ids(page: str) -> set[str]:
    return set(re.findall(r'<(?:section|header) id="([^"]+)"', page))


def test_full_data_shows_every_section_and_well_formed_markup():
    page = render_html_report(tuning_data())
    assert section_ids(page) == {"summary", "passes", "sensitivity", "pareto", "refused"}
    tags = parsed(page)
    assert tags.errors == [] and tags.stack == []
    assert len(tags.ids) == len(set(tags.ids)), "two plots share an id"
    assert (
        '<pre id="plan">default,prune-channels{ratio=0.3,@/features\\.1/.*{skip=true}},quantize-qdq{calibration=minmax}</pre>'
        in page
    )


@pytest.mark.parametrize("key", sorted(SECTIONS))
def test_a_section_appears_only_with_its_data(key):
    full = tuning_data()
    page = render_html_report({key: full[key], **({"chosen": full["chosen"]} if key == "explored" else {})})
    assert section_ids(page) == {SECTIONS[key]}
    page_without = render_html_report(
        {k: v for k, v in full.items() if k != key and not (key == "explored" and k == "chosen")}
    )
    assert SECTIONS[key] not in section_ids(page_without)


def test_empty_data_is_a_page_with_only_its_title():
    page = render_html_report({})
    assert section_ids(page) == set()
    assert "<h1>Tuning report</h1>" in page and "<svg" not in page


def test_every_name_is_escaped_in_tables_and_plots():
    data = tuning_data(blocks=3)
    hostile = '/enc/<b>&"x"/MatMul'
    script = "<script>alert(1)</script>"
    data["model"] = f"m{script}.onnx"
    data["plan"] = f"low-rank-gemm{{@{hostile}{{rank=4}}}}"
    data["passes"][0]["name"] = f"pass{script}"
    data["sensitivity"][0]["node"] = hostile
    data["explored"][data["chosen"]]["label"] = f"point {hostile} $x$"
    data["refused"][0]["reason"] = f"reason {script} & more"
    data["refused"][0]["node"] = hostile
    page = render_html_report(data)
    assert "<script" not in page and "<b>" not in page
    assert html.escape(hostile) in page
    assert html.escape("reason <script>alert(1)</script> & more") in page
    # the chosen point's label is drawn as text in the plot's legend, escaped, '$' not read as math
    svg_texts = re.findall(r"<text[^>]*>([^<]*)</text>", page)
    assert any("point /enc/&lt;b&gt;&amp;" in t and "$x$" in t for t in svg_texts)
    assert any("pass&lt;script&gt;" in t for t in svg_texts)
    assert parsed(page).errors == []


def test_page_is_one_file_with_nothing_outside_it(tmp_path):
    path = write_html_report(tuning_data(), tmp_path / "tune.html")
    page = path.read_text(encoding="utf-8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tune.html"]
    for outside in ('src="http', 'href="http', "src='http", "url(http", "@import", "<link", "<script", "<img"):
        assert outside not in page, outside
    assert not re.search(r'href="(?!#)', page), "every href points inside the page"


def test_plots_are_inline_svg_with_their_text_as_text():
    page = render_html_report(tuning_data())
    assert page.count("<svg") == 2  # the pass bars and the Pareto panels
    assert "<?xml" not in page and "<!DOCTYPE svg" not in page
    texts = set(re.findall(r"<text[^>]*>([^<]*)</text>", page))
    assert {"5 quantize-qdq", "bytes after pass", "MACs after pass", "sqnr_db after pass"} <= texts
    assert not any("$" in t for t in texts), "no math text in the plots"
    assert {"1.0e-2", "1.0e-4"} <= texts  # the damage axis, labelled like the tables
    assert {"Pareto front", "budget top1&gt;=0.99", "chosen: tau=1e-3", "top1", "damage", "size"} <= texts


def test_report_is_deterministic():
    assert render_html_report(tuning_data()) == render_html_report(tuning_data())


def test_header_compares_baseline_and_result():
    page = render_html_report(tuning_data())
    assert '<td title="13,964,000">13.32 MiB</td><td title="3,900,000">3.72 MiB</td><td>×0.279 (-72.1%)</td>' in page
    assert '<td title="300,000,000">300.00 M</td><td title="300,000,000">300.00 M</td><td>×1 (+0.0%)</td>' in page
    assert '<td class="name">top1</td><td title="1">1</td><td title="0.99">0.99</td><td>-0.01</td>' in page
    assert "<dt>budget</dt><dd>top1&gt;=0.99</dd>" in page


def test_pass_table_has_one_row_per_pass_with_costs_and_drift():
    data = tuning_data()
    page = render_html_report(data)
    table = page[page.index('<table class="passes">') :]
    table = table[: table.index("</table>")]
    assert table.count("<tr>") == 1 + len(data["passes"])
    assert "<th>sqnr_db</th><th>cosine</th><th>top1</th>" in table
    last = data["passes"][-1]
    assert f'<td title="{last["cost"]["bytes"]:,}">' in table and "<td>20</td>" in table  # sqnr 40 - 5·4


def test_heat_map_rows_in_graph_order_blank_where_not_measured():
    data = tuning_data()
    page = render_html_report(data)
    heat = page[page.index('<table class="heat">') : page.index("</table>", page.index('<table class="heat">'))]
    names = re.findall(r'<tr><td class="name">([^<]*)</td>', heat)
    assert names == [html.escape(n) for n, _, _ in mobilenet_like_nodes(17)]
    depthwise = sum(d for _, _, d in mobilenet_like_nodes(17))
    assert heat.count("<td></td>") == 2 * depthwise  # two low-rank levels never measured on depthwise convs
    assert '<th colspan="1">quantize</th><th colspan="3">prune</th><th colspan="2">low-rank</th>' in heat
    coloured = re.findall(r'<td class="d(\d)" title="[^"]*">', heat)
    assert len(coloured) == len(data["sensitivity"])
    assert {"0", "7"} <= set(coloured)  # the least and the most damage take the end bins


def test_heat_cell_carries_damage_saving_and_drift():
    data = tuning_data(blocks=1)
    data["sensitivity"] = [
        {
            "node": "/a/Conv",
            "op_type": "Conv",
            "knob": "int8",
            "family": "quantize",
            "damage": 1.24e-4,
            "saving": 3456.0,
            "drift": {"sqnr_db": 38.0, "top1": 1.0},
        },
        {
            "node": "/a/Conv",
            "op_type": "Conv",
            "knob": "ratio=0.5",
            "family": "prune",
            "damage": 0.0,
            "saving": 10.0,
            "drift": None,
        },
        {
            "node": "/b/Conv",
            "op_type": "Conv",
            "knob": "int8",
            "family": "quantize",
            "damage": "inf",
            "saving": None,
            "drift": {"sqnr_db": "-inf"},
        },
    ]
    page = render_html_report(data)
    assert '<td class="d4" title="int8: damage 0.000124; saving 3.38 KiB; sqnr_db 38; top1 1">1.2e-4</td>' in page
    assert '<p class="legend">damage from <span class="d4">1.2e-4</span> up,' in page  # one positive value
    assert '<td class="d0" title="ratio=0.5: damage 0; saving 10 B">0</td>' in page
    assert '<td class="dx" title="int8: damage inf; sqnr_db -inf">inf</td>' in page


def test_heat_bins_are_equal_in_log_damage():
    bins = _HeatBins([1e-6, 1e-4, 1e-2, 0.0, math.inf])
    assert [bins.index(d) for d in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.0)] == [0, 2, 4, 6, 7, 0]
    assert bins.css_class(math.inf) == "dx" and bins.css_class(math.nan) == "dx"
    assert _HeatBins([3e-3, 3e-3]).index(3e-3) == len(HEAT_COLOURS) // 2  # one value: the middle bin


def test_pareto_front_keeps_only_undominated_points():
    xs = [4.0, 1.0, 3.0, 2.0, 5.0, 3.0]
    quality = [0.90, 0.50, 0.95, 0.60, 0.93, 0.95]
    assert pareto_front(xs, quality, higher_y_is_better=True) == [1, 3, 2]  # 5 ties with 2; 0 and 4 are dominated
    damage = [0.1, 0.5, 0.05, 0.2, 0.01, 0.05]
    assert pareto_front(xs, damage, higher_y_is_better=False) == [1, 3, 2, 4]
    assert pareto_front([], [], True) == []


def test_pareto_section_marks_the_chosen_point_and_lists_every_point():
    data = tuning_data()
    page = render_html_report(data)
    explored = page[page.index('<table class="explored">') :]
    explored = explored[: explored.index("</table>")]
    assert explored.count("<tr>") == 1 + len(data["explored"])
    assert explored.count('<td class="chosen">chosen</td>') == 1
    assert f'<tr><td>{data["chosen"]}</td><td class="name">{data["explored"][data["chosen"]]["label"]}</td>' in explored


def test_budget_line_reads_the_first_constraint():
    assert BudgetLine.parse("top1>=0.99") == BudgetLine("top1", 0.99, True, "top1>=0.99")
    assert BudgetLine.parse("maxabs<=1e-2,top1>=0.9") == BudgetLine("maxabs", 0.01, False, "maxabs<=1e-2")
    assert BudgetLine.parse("sqnr=30") == BudgetLine("sqnr", 30.0, True, "sqnr=30")
    assert BudgetLine.parse("whatever") is None and BudgetLine.parse(None) is None


def test_refusals_grouped_by_reason_most_frequent_first():
    data = tuning_data(blocks=4)
    page = render_html_report(data)
    summaries = re.findall(r'<summary><span class="count">(\d+)</span> ([^<]*)</summary>', page)
    assert summaries == [("4", "depthwise conv: nothing to factor"), ("1", "the classifier stays float")]
    assert "<h2>Refused (5)</h2>" in page


def test_three_hundred_nodes_stay_a_sane_size():
    data = tuning_data(blocks=100)  # 302 nodes, 1 612 measurements
    page = render_html_report(data)
    heat = page[page.index('<table class="heat">') : page.index("</table>", page.index('<table class="heat">'))]
    assert heat.count("<tr><td") == 302
    assert len(page.encode()) < 1_200_000


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d["passes"][2]["cost"].update(bytes="lots"), "passes[2].cost.bytes should be a number"),
        (lambda d: d.update(passes={"name": "x"}), "passes should be a list of dicts"),
        (
            lambda d: d["sensitivity"][5].update(drift={"sqnr_db": "high"}),
            "sensitivity[5].drift.sqnr_db should be a number",
        ),
        (lambda d: d.update(chosen=24), "'chosen' should be an index into the 24 explored points"),
        (lambda d: d["baseline"].update(metric=[1.0]), "baseline.metric should be a dict"),
    ],
)
def test_bad_data_is_one_clear_error_and_writes_nothing(tmp_path, change, message):
    data = tuning_data(blocks=2)
    change(data)
    target = tmp_path / "tune.html"
    with pytest.raises(ReportDataError, match=re.escape(message)) as caught:
        write_html_report(data, target)
    assert "\n" not in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_not_a_dict_is_refused():
    with pytest.raises(ReportDataError, match="must be a dict, not list"):
        render_html_report([1, 2])


def test_failure_while_drawing_leaves_no_file_and_the_old_one_intact(tmp_path, monkeypatch):
    target = tmp_path / "tune.html"
    target.write_text("previous report")

    def broken(*args, **kwargs):
        raise RuntimeError("drawing failed")

    monkeypatch.setattr(html_report, "_draw_pareto", broken)
    with pytest.raises(RuntimeError, match="drawing failed"):
        write_html_report(tuning_data(blocks=2), target)
    assert target.read_text() == "previous report"
    assert [p.name for p in tmp_path.iterdir()] == ["tune.html"]


def test_importing_the_report_does_not_load_matplotlib():
    code = "import sys, onnxcompress.html_report, onnxcompress.progress; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_sparse_entries_render_with_blanks_instead_of_failing():
    data = {
        "passes": [{"name": "cleanup", "status": "unchanged", "cost": None, "drift": None}],
        "explored": [{"objective": 2.0e6, "damage": 0.1}, {"label": "no numbers"}],
        "chosen": None,
        "sensitivity": [{"node": "/a/Conv", "knob": "int8"}, {"damage": 1.0}],
        "refused": [{"node": "/b/Conv"}],
    }
    page = render_html_report(data)
    assert section_ids(page) == {"passes", "pareto", "sensitivity", "refused"}
    assert page.count("<svg") == 1  # the damage panel; no pass has a number to plot
    assert '<td title="int8: damage not measured"></td>' in page
    assert "<p>1 measurement(s) without a node or knob left out.</p>" in page
    assert '<summary><span class="count">1</span> (no reason given)</summary>' in page
    assert (
        '<tr><td>1</td><td class="name">no numbers</td><td></td><td></td><td></td><td></td><td></td><td></td></tr>'
        in page
    )


def test_an_infinite_sqnr_is_marked_in_the_pass_chart():
    data = {
        "passes": [
            {"name": "fold-batchnorm", "drift": {"sqnr_db": "inf"}},
            {"name": "quantize-qdq", "drift": {"sqnr_db": 31.5}},
        ]
    }
    page = render_html_report(data)
    texts = re.findall(r"<text[^>]*>([^<]*)</text>", page)
    assert "inf" in texts and "sqnr_db after pass" in texts
    assert "<td>inf</td>" in page and "<td>31.5</td>" in page


def test_the_tuners_own_record_renders(tmp_path, tiny_path, tiny_calib):
    from onnxcompress.tuning import tune

    result = tune(str(tiny_path), calibration=str(tiny_calib), budget="top1>=0.9", objective="size")
    written = result.save(tmp_path / "tiny.tuned.onnx", html=tmp_path / "tiny.tune.html")
    page = written["html"].read_text(encoding="utf-8")
    data = result.to_dict()
    assert {"summary", "passes", "sensitivity", "pareto"} <= section_ids(page)
    assert f'<pre id="plan">{html.escape(data["plan"])}</pre>' in page
    heat = page[page.index('<table class="heat">') : page.index("</table>", page.index('<table class="heat">'))]
    assert heat.count("<tr><td") == len({e["node"] for e in data["sensitivity"]})
    explored = page[page.index('<table class="explored">') :]
    explored = explored[: explored.index("</table>")]
    assert explored.count("<tr>") == 1 + len(data["explored"])
    chosen = data["explored"][data["chosen"]]
    # the budget names top1: the metric panel plots each point's measured top1 against the line
    assert f"<td>{chosen['measures']['top1']:.4g}</td>" in explored
    texts = re.findall(r"<text[^>]*>([^<]*)</text>", page)
    assert "budget top1&gt;=0.9" in texts and "top1" in texts and f"chosen: {chosen['label']}" in texts
    tags = parsed(page)
    assert tags.errors == [] and len(tags.ids) == len(set(tags.ids))


def test_reasons_that_differ_only_in_numbers_and_names_are_one_group():
    assert reason_shape("rank 12 does not pay for 40×30: 12·70 ≥ 1200") == "rank N does not pay for N×N: N·N ≥ N"
    assert reason_shape("ranges already match '/a/Conv'") == "ranges already match '…'"
    assert reason_shape("op type int8 at /features.1/Conv") == "op type int8 at /features.1/Conv"
    refused = [
        {
            "pass": "low-rank-gemm",
            "node": f"/l{i}/MatMul",
            "op_type": "MatMul",
            "knob": "rank=8",
            "reason": f"rank 8 does not pay for {n}×{n}",
        }
        for i, n in enumerate((10, 12, 12))
    ] + [
        {"pass": "quantize-qdq", "node": "/x/Softmax", "op_type": "Softmax", "knob": "int8", "reason": "no int8 kernel"}
    ]
    page = render_html_report({"refused": refused})
    assert '<summary><span class="count">3</span> rank N does not pay for N×N</summary>' in page
    assert "<th>pass</th><th>node</th><th>op</th><th>knob</th><th>reason</th>" in page  # the group's exact reasons
    assert '<td class="name">rank 8 does not pay for 10×10</td>' in page
    assert '<summary><span class="count">1</span> no int8 kernel</summary>' in page
    assert "<th>pass</th><th>node</th><th>op</th><th>knob</th></tr>" in page  # one exact reason: no column


def test_header_tells_steps_timings_and_a_missed_budget():
    data = {"budget": "top1>=0.99", "objective": "macs", "within_budget": False,
            "baseline": {"size": 1000, "objective": 5.0e6}, "result": {"size": 400, "objective": 2.0e6, "steps": 7, "of_steps": 12},
            "timings": {"sensitivity_s": 12.34, "total_s": 20.0}}  # fmt: skip
    page = render_html_report(data)
    assert '<p class="warning">The budget was not met: this is the best plan found.</p>' in page
    assert "<dt>plan steps</dt><dd>7 of 12</dd>" in page
    assert "<dt>time</dt><dd>sensitivity 12.3 s, total 20.0 s</dd>" in page
    assert (
        '<td class="name">objective (macs)</td><td title="5,000,000">5.00 M</td><td title="2,000,000">2.00 M</td>'
        in page
    )
    same = render_html_report(
        {"objective": "size", "baseline": {"size": 10, "objective": 10}, "result": {"size": 5, "objective": 5}}
    )
    assert "objective (size)" not in same and '<td class="name">size</td>' in same


def test_pass_table_counts_rewrites_and_explains_a_rollback():
    passes = [
        {"name": "prune-channels", "status": "rolled back", "reason": "top1 0.91 < 0.99", "rewritten": 3, "refused": 1}
    ]
    page = render_html_report({"passes": passes})
    assert '<td title="top1 0.91 &lt; 0.99">rolled back</td><td>3</td><td>1</td>' in page
    assert "<th>status</th><th>rewritten</th><th>refused</th>" in page


def test_budget_line_follows_the_measure_the_budget_names():
    assert BudgetLine.measure_key("sqnr>=30,top1>=0.9") == "sqnr_db"
    assert BudgetLine.measure_key("maxabs<=0.1") == "max_abs" and BudgetLine.measure_key(None) is None
    drop = BudgetLine.parse("metric_drop<=0.02", {"metric": {"metric": 0.76}})
    assert drop.metric == "metric" and drop.threshold == pytest.approx(0.74, abs=1e-12) and drop.higher_is_better
    assert BudgetLine.parse("metric_drop<=0.02", {}) is None  # no baseline value: no line
    explored = [
        {
            "label": "k=0",
            "objective": 100.0,
            "damage": 0.0,
            "metric": None,
            "measures": {"sqnr_db": "inf", "top1": 1.0},
        },
        {
            "label": "k=1",
            "objective": 60.0,
            "damage": 1e-3,
            "metric": None,
            "measures": {"sqnr_db": 30.0, "top1": 0.95},
        },
    ]
    page = render_html_report({"budget": "sqnr>=25", "explored": explored, "chosen": 1})
    assert "<td>inf</td>" in page and "<td>30</td>" in page  # the metric column shows sqnr_db
    texts = re.findall(r"<text[^>]*>([^<]*)</text>", page)
    assert "budget sqnr&gt;=25" in texts and "sqnr" in texts
    assert '<th>#</th><th>point</th><th>objective</th><th>damage</th><th>sqnr</th>' in page
