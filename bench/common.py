"""Shared benchmark helpers: interleaved latency ratios and result tables.

Latency is measured as a ratio in one process: the candidate and the original run in turn on
the same input (batch 1, 2 intra-op threads), many rounds, and the ratio of the medians is
reported. Absolute times on a shared 2-core machine mean little; the ratio is stable.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from onnxcompress.runtime import make_session  # noqa: E402


def latency_ratio(original, candidate, feed: dict, rounds: int = 200, warmup: int = 20) -> float:
    """median(candidate time) / median(original time), runs interleaved."""
    a, b = make_session(str(original)), make_session(str(candidate))
    names_a = [o.name for o in a.get_outputs()]
    names_b = [o.name for o in b.get_outputs()]
    for _ in range(warmup):
        a.run(names_a, feed)
        b.run(names_b, feed)
    ta, tb = [], []
    for i in range(rounds):
        order = ((a, names_a, ta), (b, names_b, tb)) if i % 2 == 0 else ((b, names_b, tb), (a, names_a, ta))
        for session, names, times in order:
            start = time.perf_counter()
            session.run(names, feed)
            times.append(time.perf_counter() - start)
    return statistics.median(tb) / statistics.median(ta)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)
