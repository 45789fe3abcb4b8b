"""The run report: per pass what changed, what it cost, how far outputs drifted, how long it took."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from onnxcompress.pass_base import NodeRecord


@dataclasses.dataclass
class PassReport:
    index: int
    name: str
    spec: str
    status: str = "pending"  # changed | unchanged | skipped | rolled back | failed
    reason: str = ""  # why skipped, rolled back or failed
    records: list[NodeRecord] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    cost: dict[str, int] | None = None
    drift: dict[str, Any] | None = None
    drift_outputs: dict[str, dict] | None = None
    first_drifting_node: str | None = None
    time_s: float | None = None
    dump: str | None = None

    # Instruments decide; the manager acts on these after the pass.
    def roll_back(self, reason: str) -> None:
        self.status, self.reason = "rolled back", reason

    def fail(self, reason: str) -> None:
        self.status, self.reason = "failed", reason

    @property
    def rewritten(self) -> int:
        return sum(r.action == "rewritten" for r in self.records)

    @property
    def refused(self) -> int:
        return sum(r.action == "refused" for r in self.records)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["rewritten"], d["refused"] = self.rewritten, self.refused
        return d


@dataclasses.dataclass
class Report:
    pipeline: str
    input_cost: dict[str, int] | None = None
    passes: list[PassReport] = dataclasses.field(default_factory=list)
    calibration: str = "none"
    drift_budget: str | None = None
    on_drift: str | None = None
    reproducer: str | None = None
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def final_cost(self) -> dict[str, int] | None:
        for p in reversed(self.passes):
            if p.cost is not None:
                return p.cost
        return self.input_cost

    def to_dict(self) -> dict:
        return {
            "pipeline": self.pipeline,
            "calibration": self.calibration,
            "drift_budget": self.drift_budget,
            "on_drift": self.on_drift,
            "input_cost": self.input_cost,
            "final_cost": self.final_cost,
            "reproducer": self.reproducer,
            "notes": self.notes,
            "passes": [p.to_dict() for p in self.passes],
        }

    def to_json(self) -> str:
        return json.dumps(finite(self.to_dict()), indent=2)

    def table(self) -> str:
        """The per-pass table printed by ``onnxcompress optimize``."""
        header = ("#", "pass", "status", "rewritten", "refused", "params", "bytes", "MACs", "drift", "time")
        rows = [header]
        if self.input_cost:
            c = self.input_cost
            rows.append(("", "(input)", "", "", "", _n(c["params"]), _n(c["bytes"]), _n(c["macs"]), "", ""))
        for p in self.passes:
            c = p.cost or {}
            rows.append((
                str(p.index + 1),
                p.spec if len(p.spec) <= 40 else p.spec[:37] + "...",
                p.status,
                str(p.rewritten) if p.records else "-",
                str(p.refused) if p.records else "-",
                _n(c.get("params")), _n(c.get("bytes")), _n(c.get("macs")),
                _drift_cell(p.drift),
                f"{p.time_s:.2f}s" if p.time_s is not None else "-",
            ))
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        for p in self.passes:
            if p.reason:
                lines.append(f"pass {p.index + 1} ({p.name}) {p.status}: {p.reason}")
        lines.append(f"calibration: {self.calibration}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _n(value) -> str:
    if value is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return str(value)


def _drift_cell(drift: dict | None) -> str:
    if not drift:
        return "-"
    sqnr = drift.get("sqnr_db")
    text = f"{sqnr} dB" if isinstance(sqnr, str) else f"{sqnr:.1f} dB"
    if drift.get("top1") is not None:
        text += f" top1 {drift['top1']:.3f}"
    return text


def finite(obj):
    """``obj`` with every non-finite float as the text "inf", "-inf" or "nan" (JSON has none)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj
