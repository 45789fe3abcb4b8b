"""Automatic bisection to the node: the first pass, then its first node rewrite, over a drift budget.

LLVM's opt-bisect, automated and carried down to one node::

    finding = bisect_to_node("model.onnx", "default,low-rank-gemm{energy=0.9}", "calib/", "sqnr=30")
    print(finding.describe())

1. **Pass level.** The pipeline runs once under the pass manager with a drift check that
   rolls nothing back: after every pass that changed the model it records the cumulative
   drift against the original (or ``reference``). The first pass whose cumulative drift
   breaks the budget is the culprit; the passes after it are skipped. The model as it was
   before the culprit (the *prefix model*) is kept, so no probe reruns the passes before it.
2. **Node level** (only when the culprit takes per-node overrides, ``per_node`` not None,
   and every node it rewrote has a name). The culprit's report lists its
   rewrites in order. A probe runs the culprit on the prefix model restricted to its first k
   rewritten nodes: ``@<name>{...}`` for each of them, carrying the items of the first
   override of the culprit that matched the node (``{}`` when none did), then
   ``@.*{skip=true}``. Binary search finds the smallest k whose drift breaks the budget,
   assuming drift grows with k; the finding is checked: k rewrites break it, k - 1 do not
   (k - 1 = 0 is the prefix model, measured without running the pass). The k-th node alone
   is measured too.
3. **Cost.** One pipeline run, at most ceil(log2(n)) probes of the culprit for n rewrites,
   one more for k = n (the whole pass restricted by overrides, since the reproducer is that
   restriction), one for the node alone (none when k = 1): at most ceil(log2(n)) + 3 runs.

The finding's ``pipeline`` is the one-line reproducer: the passes before the culprit and the
restricted culprit, as canonical pipeline text that parses back to itself.
"""

from __future__ import annotations

import dataclasses
import shlex
from typing import Sequence

import onnx_ir as ir

from onnxcompress import calibration as calib
from onnxcompress import registry
from onnxcompress.errors import DriftBudgetError
from onnxcompress.instruments import DriftCheck, Instrument, Verify
from onnxcompress.manager import PassManager
from onnxcompress.compare import drift_against
from onnxcompress.metrics import Drift, DriftBudget, format_db
from onnxcompress.modelio import load_model
from onnxcompress.options import SKIP_OPTION, NodeOverride, parse_override
from onnxcompress.pipeline import Pipeline, PipelineEntry, name_pattern
from onnxcompress.report import PassReport

SKIP_ALL = ".*"  # the override, last in a restriction, that leaves every other node alone


@dataclasses.dataclass
class BisectFinding:
    """What ``bisect_to_node`` found. ``culprit_index`` is None when no pass breaks the budget;
    ``node`` is None when the search stopped at the pass (``notes`` says why)."""

    budget: str
    culprit_index: int | None = None  # position of the culprit in the ordered pipeline, from 0
    culprit_spec: str | None = None
    culprit_drift: Drift | None = None  # cumulative drift after the whole culprit
    violations: tuple[str, ...] = ()  # how culprit_drift breaks the budget
    final_drift: Drift | None = None  # the whole pipeline's drift, when no pass breaks the budget
    rewrites: int = 0  # node rewrites the culprit made in the pipeline run
    node: str | None = None  # the k-th rewritten node: the first whose rewrite breaks the budget
    k: int | None = None
    drift_before_node: Drift | None = None  # with the first k - 1 rewrites
    drift_with_node: Drift | None = None  # with the first k rewrites
    drift_node_alone: Drift | None = None  # the prefix model and only the k-th rewrite
    pipeline: str | None = None  # the reproducer, as canonical pipeline text
    notes: list[str] = dataclasses.field(default_factory=list)
    runs: int = 0  # pipeline runs: the first one plus the probes of the culprit

    @property
    def found(self) -> bool:
        return self.culprit_index is not None

    def command(self, input: str = "IN", output: str = "OUT", data: Sequence[str] = ("--calib", "DATA")) -> str:
        """The ``onnxcompress optimize`` command line that reproduces the finding."""
        args = ["onnxcompress", "optimize", input, "-o", output, "-p", self.pipeline or "", *data,
                "--drift-budget", self.budget]
        return " ".join(shlex.quote(a) for a in args)

    def describe(self, input: str = "IN", output: str = "OUT", data: Sequence[str] = ("--calib", "DATA")) -> str:
        """A few lines for the command line; when a pass breaks the budget, the last one is
        the command that reproduces it."""
        if not self.found:
            return f"the whole pipeline stays within budget: {drift_text(self.final_drift)} (budget {self.budget})"
        lines = [
            f"first pass over budget {self.budget}: #{self.culprit_index + 1} {self.culprit_spec}: "
            f"{'; '.join(self.violations)} ({drift_text(self.culprit_drift)})"
        ]
        if self.node is not None:
            lines.append(f"first rewrite over budget: {self.node} (rewrite {self.k} of the pass's {self.rewrites})")
            before = f"first {counted(self.k - 1, 'rewrite')}" if self.k > 1 else "no rewrite (the model before the pass)"
            lines.append(f"  {before}: {drift_text(self.drift_before_node)}")
            lines.append(f"  first {counted(self.k, 'rewrite')}: {drift_text(self.drift_with_node)}")
            lines.append(f"  {self.node} alone: {drift_text(self.drift_node_alone)}")
        lines += [f"note: {n}" for n in self.notes]
        lines.append("reproduce with:")
        lines.append(self.command(input, output, data))
        return "\n".join(lines)


def counted(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def drift_text(drift: Drift | None) -> str:
    if drift is None:
        return "-"
    text = f"SQNR {format_db(drift.sqnr_db)}, max-abs {drift.max_abs:.3g}, cosine {drift.cosine:.6f}"
    return text + (f", top-1 {drift.top1:.4f}" if drift.top1 is not None else "")


def bisect_to_node(model, pipeline: str | Pipeline, feeds, budget: str | DriftBudget, *,
                   reference=None, verify: bool = True) -> BisectFinding:
    """Find the first pass of ``pipeline`` whose cumulative drift on ``feeds`` breaks
    ``budget``, then the first node rewrite of that pass that breaks it (see the module).

    ``model``: a path, ``onnx.ModelProto`` or ``onnx_ir.Model`` (never modified); ``feeds``:
    what ``compress(calibration=...)`` takes (``.npz`` file or folder, or ``{input: array}``
    dicts); ``reference``: measure drift against this model instead of ``model``.
    """
    budget = DriftBudget.parse(budget) if isinstance(budget, str) else budget
    if not isinstance(budget, DriftBudget):
        raise DriftBudgetError("bisection needs a drift budget, e.g. 'sqnr=30'")
    ir_model = load_model(model)
    pipe = pipeline if isinstance(pipeline, Pipeline) else Pipeline.parse(pipeline)
    feeds = calib.load_calibration(feeds, ir_model)
    drift_check = DriftCheck(None, reference=load_model(reference) if reference is not None else None)
    first_break = _FirstBreak(budget)
    instruments: list[Instrument] = [drift_check, *([Verify()] if verify else []), first_break]
    out, _ = PassManager(pipe, instruments, feeds).run(ir_model)
    finding = BisectFinding(str(budget), runs=1)
    if first_break.culprit is None:
        finding.final_drift = first_break.last_drift or drift_against(drift_check.reference, out, feeds)
        return finding
    search = _NodeSearch(pipe.entries[first_break.culprit.index], first_break.prefix_model,
                         drift_check.reference, feeds, budget)
    _bisect_culprit(finding, pipe, first_break, search)
    finding.runs += search.runs
    return finding


def _bisect_culprit(finding: BisectFinding, pipe: Pipeline, first_break: _FirstBreak, search: _NodeSearch) -> None:
    """Fill in the culprit, then, where its rewrites can be told apart, the first node rewrite
    over the budget; the reproducer is the prefix and the culprit, restricted when it can be."""
    culprit, entry = first_break.culprit, search.entry
    prefix = list(pipe.entries[: culprit.index])
    finding.culprit_index, finding.culprit_spec = culprit.index, str(entry)
    finding.culprit_drift = first_break.culprit_drift
    finding.violations = tuple(search.budget.violations(first_break.culprit_drift))
    finding.rewrites = culprit.rewritten
    finding.pipeline = str(Pipeline((*prefix, entry)))
    why_not = search.refusal(culprit)
    if why_not:
        finding.notes.append(f"no node-level bisection: {why_not}")
        return
    search.run(finding)
    if finding.node is not None:
        finding.pipeline = str(Pipeline((*prefix, search.restricted(search.labels[: finding.k]))))


class _FirstBreak(Instrument):
    """Runs after the drift check: notes the first pass whose cumulative drift breaks the
    budget, keeps the model as it was before that pass, and skips every pass after it."""

    def __init__(self, budget: DriftBudget):
        self.budget = budget
        self.culprit: PassReport | None = None
        self.culprit_drift: Drift | None = None
        self.prefix_model: ir.Model | None = None
        self.last_drift: Drift | None = None
        self._before: ir.Model | None = None

    def should_run(self, state, pass_, entry):
        if self.culprit is not None:
            return f"pass #{self.culprit.index + 1} already breaks the drift budget"
        return None

    def before_pass(self, state, pass_, entry):
        self._before = state.before

    def after_pass(self, state, pass_, entry):
        if entry.drift is None:
            return
        drift = drift_from_report(entry.drift)
        self.last_drift = drift
        if self.budget.violations(drift):
            self.culprit, self.culprit_drift, self.prefix_model = entry, drift, self._before


def drift_from_report(values: dict) -> Drift:
    """The Drift a report holds (``Drift.to_dict``: infinities as the text "inf" or "-inf")."""
    def number(key: str) -> float:
        return float(values[key])  # float() reads "inf" and "-inf"

    sqnr = number("sqnr_db")
    max_abs = number("max_abs")
    top1 = values.get("top1")
    return Drift(sqnr, max_abs, number("cosine"), None if top1 is None else float(top1))


@dataclasses.dataclass
class _Probe:
    drift: Drift
    breaks: bool
    rewritten: tuple[str, ...]  # what the restricted pass rewrote


class _NodeSearch:
    """Probes of the culprit on the prefix model, restricted to given nodes, cached by node list."""

    def __init__(self, entry: PipelineEntry, prefix_model: ir.Model, reference, feeds, budget: DriftBudget):
        self.entry = entry
        self.per_node = registry.get_pass(entry.name).per_node
        self.prefix_model = prefix_model
        self.reference = reference
        self.feeds = feeds
        self.budget = budget
        self.labels: list[str] = []
        self.runs = 0
        self._probes: dict[tuple[str, ...], _Probe] = {}

    def refusal(self, culprit: PassReport) -> str:
        """Why the culprit cannot be bisected by node ('' when it can)."""
        if self.per_node is None:
            return f"{self.entry.name} takes no per-node overrides (it decides for the whole model)"
        self.labels = [r.node for r in culprit.records if r.action == "rewritten"]
        # A label that is no node's name is that of an unnamed node (onnxruntime refuses a
        # graph in which two nodes share a name, so a name singles out one node).
        names = {node.name for node in ir.traversal.RecursiveGraphIterator(self.prefix_model.graph)}
        unnamed = next((label for label in self.labels if label not in names), None)
        if unnamed is not None:
            return f"the rewritten node {unnamed} has no name, so no per-node override can single it out"
        before = self.probe(())
        if before.breaks:
            return f"the model before the pass already breaks the budget ({drift_text(before.drift)})"
        return ""

    def run(self, finding: BisectFinding) -> None:
        """Binary search for the smallest k whose first k rewrites break the budget."""
        n = len(self.labels)
        within, over = 0, n  # the prefix model holds (checked); the whole pass broke it
        while over - within > 1:
            mid = (within + over) // 2
            if self.probe(tuple(self.labels[:mid])).breaks:
                over = mid
            else:
                within = mid
        k = over
        with_node = self.probe(tuple(self.labels[:k]))
        if not with_node.breaks:
            finding.notes.append(
                f"no node-level finding: restricted by per-node overrides to all its {counted(n, 'rewrite')}, the pass stays "
                f"within budget ({drift_text(with_node.drift)}), so the drift comes from something it does not record per node"
            )
            return
        before = self.probe(tuple(self.labels[: k - 1]))
        alone = self.probe((self.labels[k - 1],))
        finding.node, finding.k = self.labels[k - 1], k
        finding.drift_before_node, finding.drift_with_node = before.drift, with_node.drift
        finding.drift_node_alone = alone.drift
        if not alone.breaks:
            finding.notes.append(
                f"{finding.node} alone stays within budget: it breaks it together with the {counted(k - 1, 'rewrite')} before it"
            )
        if with_node.rewritten != tuple(self.labels[:k]):
            finding.notes.append(
                f"restricted to its first {counted(k, 'rewrite')} the pass rewrote {counted(len(with_node.rewritten), 'node')} "
                f"({', '.join(with_node.rewritten) or 'none'}): it decides some rewrites together (e.g. a shared weight)"
            )

    def probe(self, names: tuple[str, ...]) -> _Probe:
        if names not in self._probes:
            self._probes[names] = self._run(names)
        return self._probes[names]

    def _run(self, names: tuple[str, ...]) -> _Probe:
        if not names:
            drift = drift_against(self.reference, self.prefix_model, self.feeds)
            return _Probe(drift, bool(self.budget.violations(drift)), ())
        self.runs += 1
        pipeline = Pipeline((self.restricted(list(names)),))  # not parsed: no prerequisites inserted
        model, report = PassManager(pipeline, [], self.feeds).run(self.prefix_model.clone())
        drift = drift_against(self.reference, model, self.feeds)
        rewritten = tuple(r.node for r in report.passes[0].records if r.action == "rewritten")
        return _Probe(drift, bool(self.budget.violations(drift)), rewritten)

    def restricted(self, names: list[str]) -> PipelineEntry:
        """The culprit limited to ``names``: each keeps the items of the first original
        override that matched it, every other node is skipped."""
        base = self.entry.options
        overrides = [parse_override(base, name_pattern(n), dict(self._items_for(n)), self.per_node) for n in names]
        overrides.append(parse_override(base, SKIP_ALL, {SKIP_OPTION: "true"}, self.per_node))
        return PipelineEntry(self.entry.name, base, tuple(overrides))

    def _items_for(self, name: str) -> tuple[tuple[str, str], ...]:
        original: NodeOverride | None = next((o for o in self.entry.overrides if o.matches(name)), None)
        return original.items if original is not None else ()
