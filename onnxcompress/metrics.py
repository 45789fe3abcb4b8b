"""Drift between a reference model's outputs and a candidate's.

SQNR (dB) = 10·log10(Σref² / Σ(ref−cand)²), infinite when identical; max-abs; cosine
similarity of the flattened outputs; top-1 agreement for classifier-shaped float outputs
(rank ≥ 2, last axis ≥ 2: the arg-max over the last axis agrees). Budgets compare the
worst value over all outputs.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Sequence

import numpy as np

from onnxcompress.errors import DriftBudgetError


@dataclasses.dataclass
class Drift:
    sqnr_db: float
    max_abs: float
    cosine: float
    top1: float | None = None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: (("inf" if v > 0 else "-inf") if isinstance(v, float) and math.isinf(v) else v) for k, v in d.items()}


def format_db(value: float) -> str:
    return "inf dB" if math.isinf(value) else f"{value:.1f} dB"


def _is_classifier(array: np.ndarray) -> bool:
    return array.dtype.kind == "f" and array.ndim >= 2 and array.shape[-1] >= 2


def tensor_drift(refs: Sequence[np.ndarray], cands: Sequence[np.ndarray]) -> Drift:
    """Drift of one tensor over all feeds (lists of arrays of matching shapes)."""
    signal = noise = dot = ref_sq = cand_sq = 0.0
    max_abs = 0.0
    agree = total = 0
    classifier = all(_is_classifier(r) for r in refs)
    for ref, cand in zip(refs, cands):
        if ref.shape != cand.shape:
            raise ValueError(f"shape {cand.shape} differs from the reference's {ref.shape}")
        r = ref.astype(np.float64).ravel()
        c = cand.astype(np.float64).ravel()
        diff = r - c
        signal += float(r @ r)
        noise += float(diff @ diff)
        dot += float(r @ c)
        ref_sq += float(r @ r)
        cand_sq += float(c @ c)
        if diff.size:
            max_abs = max(max_abs, float(np.max(np.abs(diff))))
        if classifier:
            agree += int(np.sum(np.argmax(ref, axis=-1) == np.argmax(cand, axis=-1)))
            total += int(np.prod(ref.shape[:-1]))
    if noise == 0.0:
        sqnr = math.inf
    elif signal == 0.0:
        sqnr = -math.inf
    else:
        sqnr = 10.0 * math.log10(signal / noise)
    if ref_sq == 0.0 and cand_sq == 0.0:
        cosine = 1.0
    elif ref_sq == 0.0 or cand_sq == 0.0:
        cosine = 0.0
    else:
        cosine = dot / math.sqrt(ref_sq * cand_sq)
    top1 = agree / total if classifier and total else None
    return Drift(sqnr, max_abs, cosine, top1)


def output_drift(reference: list[dict], candidate: list[dict]) -> dict[str, Drift]:
    """Drift per output name, over all feeds."""
    names = list(reference[0]) if reference else []
    return {
        name: tensor_drift([r[name] for r in reference], [c[name] for c in candidate]) for name in names
    }


def worst(drifts: dict[str, Drift]) -> Drift:
    """The worst value of each metric over the outputs."""
    values = list(drifts.values())
    if not values:
        return Drift(math.inf, 0.0, 1.0, None)
    top1s = [d.top1 for d in values if d.top1 is not None]
    return Drift(
        sqnr_db=min(d.sqnr_db for d in values),
        max_abs=max(d.max_abs for d in values),
        cosine=min(d.cosine for d in values),
        top1=min(top1s) if top1s else None,
    )


_BUDGET_KEYS = {"sqnr": "sqnr_db", "cosine": "cosine", "top1": "top1", "maxabs": "max_abs"}


@dataclasses.dataclass(frozen=True)
class DriftBudget:
    """Limits a pass must keep: ``sqnr`` (dB, at least), ``cosine`` and ``top1`` (at least),
    ``maxabs`` (at most). Parsed from text such as ``sqnr=30`` or ``top1=0.99,sqnr=25``."""

    sqnr: float | None = None
    cosine: float | None = None
    top1: float | None = None
    maxabs: float | None = None

    @classmethod
    def parse(cls, text: str) -> "DriftBudget":
        values = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            m = re.fullmatch(r"([a-z0-9]+)\s*(?:>=|<=|=)\s*([-+0-9.eE]+|inf)", part)
            if not m or m.group(1) not in _BUDGET_KEYS:
                raise DriftBudgetError(
                    f"bad drift budget '{part}': use sqnr=DB, cosine=X, top1=X or maxabs=X (e.g. 'sqnr=30,top1=0.99')"
                )
            values[m.group(1)] = float(m.group(2))
        if not values:
            raise DriftBudgetError(f"empty drift budget '{text}'")
        for key in ("cosine", "top1"):
            if key in values and not 0.0 <= values[key] <= 1.0:
                raise DriftBudgetError(f"drift budget {key}={values[key]} must lie in [0, 1]")
        return cls(**values)

    def __str__(self) -> str:
        return ",".join(f"{k}={getattr(self, k):g}" for k in _BUDGET_KEYS if getattr(self, k) is not None)

    def violations(self, drift: Drift) -> list[str]:
        """Human-readable reasons the drift breaks this budget (empty if it holds)."""
        out = []
        if self.sqnr is not None and drift.sqnr_db < self.sqnr:
            out.append(f"sqnr {format_db(drift.sqnr_db)} < {self.sqnr:g} dB")
        if self.cosine is not None and drift.cosine < self.cosine:
            out.append(f"cosine {drift.cosine:.6f} < {self.cosine:g}")
        if self.top1 is not None:
            if drift.top1 is None:
                out.append("top1 budget given but no output is classifier-shaped")
            elif drift.top1 < self.top1:
                out.append(f"top1 {drift.top1:.4f} < {self.top1:g}")
        if self.maxabs is not None and drift.max_abs > self.maxabs:
            out.append(f"max-abs {drift.max_abs:.3g} > {self.maxabs:g}")
        return out
