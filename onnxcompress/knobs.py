"""Knobs the tuner turns per node: which pass, which option levels, and how they combine.

A *knob family* is one pass with the levels the tuner tries on each node the pass could
rewrite (its ``candidates``), e.g. ``prune-channels`` at ratio 0.25 and 0.5. Families fall in
two *slots*: ``structure`` (pruning, low rank: they change a node's weights and shapes; a node
takes at most one) and ``precision`` (int8, int4: applied after the structure, on the same
node names). A plan is, per node and slot, at most one level; it becomes a pipeline with one
entry per family used, each entry naming its nodes with per-node overrides and leaving every
other node alone (``@.*{skip=true}``).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Literal

import onnx_ir as ir

from onnxcompress import registry
from onnxcompress.errors import OnnxCompressError
from onnxcompress.pipeline import Pipeline, format_value, name_pattern

Slot = Literal["structure", "precision"]

# Names the structural passes give the nodes they add beside the one that keeps the name
# (low-rank-*: "<name>/lowrank_a"): precision overrides cover them too.
_ADDED_SUFFIX = "(/lowrank_a)?"


@dataclasses.dataclass(frozen=True)
class Family:
    """One pass the tuner may apply per node, at the given levels."""

    name: str  # as written in --knobs
    pass_name: str
    slot: Slot
    base: tuple[tuple[str, str], ...]  # options of the pass for every node it touches
    levels: tuple[tuple[tuple[str, str], ...], ...]  # per-node override items, one per level
    labels: tuple[str, ...]
    only_for: tuple[tuple[str, ...], ...] = ()  # per level, the op types it applies to (empty: all)

    def applies(self, level: int, op_type: str) -> bool:
        ops = self.only_for[level] if level < len(self.only_for) else ()
        return not ops or op_type in ops

    def entry_text(self, chosen: dict[str, int]) -> str:
        """The pipeline entry applying level ``chosen[node]`` to each chosen node only."""
        overrides = []
        for node, level in chosen.items():
            inner = ",".join(f"{k}={format_value(v)}" for k, v in self.levels[level])
            overrides.append(f"@{format_value(self.pattern(node))}{{{inner}}}")
        overrides.append("@.*{skip=true}")
        options = [f"{k}={format_value(v)}" for k, v in self.base]
        return f"{self.pass_name}{{{','.join(options + overrides)}}}"

    def pattern(self, node: str) -> str:
        return name_pattern(node) + (_ADDED_SUFFIX if self.slot == "precision" else "")


@dataclasses.dataclass(frozen=True)
class Knob:
    """One family at one level on one node."""

    family: Family
    level: int
    node: str
    op_type: str

    @property
    def label(self) -> str:
        return self.family.labels[self.level]


def _family(name, pass_name, slot, base, option, values, label):
    levels = tuple(((option, str(v)),) if option else () for v in values)
    labels = tuple(label.format(v) for v in values)
    return Family(name, pass_name, slot, tuple(base), levels, labels)


# The families --knobs can name, with the levels tried by default.
FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        _family("prune", "prune-channels", "structure", [("reconstruct", "true")], "ratio", (0.25, 0.5), "prune {}"),
        _family("low-rank", "low-rank-conv", "structure", [], "ratio", (0.5, 0.25), "rank {}"),
        _family("low-rank-gemm", "low-rank-gemm", "structure", [], "ratio", (0.5, 0.25), "rank {}"),
        _family("int8", "quantize-qdq", "precision", [("calibration", "mse")], "", ("int8",), "{}"),
        _family("share", "cluster-weights", "precision", [("form", "indexed")], "clusters", (256,), "share {}"),
        Family("int8-dynamic", "quantize-dynamic", "precision", (("mixed", "true"),),
               ((), (("table_bits", "4"),), (("table_bits", "4"), ("table_block", "64"))),
               ("int8-dynamic", "int4 table", "int4 table, blocks of 64"), ((), ("Gather",), ("Gather",))),
        _family("int4", "quantize-weights-int4", "precision", [("mixed", "true"), ("method", "gptq")], "", ("int4",), "{}"),
    )
}

DEFAULT_KNOBS = "int8,prune,low-rank,low-rank-gemm"
WEIGHT_ONLY = {"int4", "int8-dynamic"}


def parse_families(text: str) -> list[Family]:
    """Families from a comma-separated list of names (``--knobs``). Precision families combine
    only when all are weight-only (int4, int8-dynamic: each node gets one of them, the second
    pass quantizing what the first left in float); int8 (QDQ) and share stand alone."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise OnnxCompressError(f"--knobs: name at least one of {', '.join(FAMILIES)}")
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        raise OnnxCompressError(f"--knobs: unknown knob '{unknown[0]}'; knobs: {', '.join(FAMILIES)}")
    families = [FAMILIES[n] for n in dict.fromkeys(names)]
    precision = [f.name for f in families if f.slot == "precision"]
    if len(precision) > 1 and not set(precision) <= WEIGHT_ONLY:
        raise OnnxCompressError(f"--knobs: {' and '.join(precision)} do not combine: only the weight-only "
                                "int4 and int8-dynamic mix per node (int8 quantizes activations too; share "
                                "turns weights into Gathers the quantizers refuse)")
    return families


def candidate_knobs(model: ir.Model, families: Iterable[Family]) -> list[Knob]:
    """Every (family, level, node) the tuner probes: the nodes each family's pass reports as
    candidates on ``model``, at each level. Unnamed nodes cannot be named by a plan: left out."""
    knobs = []
    for family in families:
        pass_ = registry.get_pass(family.pass_name)()
        seen = set()
        for candidate in pass_.candidates(model):
            if candidate.node.startswith("<") or candidate.node in seen:
                continue
            seen.add(candidate.node)
            knobs += [Knob(family, level, candidate.node, candidate.op_type)
                      for level in range(len(family.levels)) if family.applies(level, candidate.op_type)]
    return knobs


def plan_pipeline(base: str, families: list[Family], choice: dict[tuple[str, str], Knob]) -> Pipeline:
    """The pipeline of a plan: ``base``, then one entry per family that some node uses, structural
    families first; ``choice`` maps (node, slot) to the knob chosen there."""
    parts = [base] if base else []
    ordered = [f for f in families if f.slot == "structure"] + [f for f in families if f.slot == "precision"]
    for family in ordered:
        chosen = {k.node: k.level for k in choice.values() if k.family == family}
        if chosen:
            parts.append(family.entry_text(chosen))
    return Pipeline.parse(",".join(parts) if parts else "cleanup")


def probe_pipeline(knob: Knob) -> str:
    """The pipeline of one probe: only ``knob`` on its node, everything else left alone."""
    return knob.family.entry_text({knob.node: knob.level})
