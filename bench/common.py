"""Shared benchmark helpers: interleaved latency ratios and result tables.

Latency is measured as a ratio in one process: the candidate and the original run in turn on
the same input (batch 1, 2 intra-op threads), in several blocks of rounds; the median of the
blocks' median-time ratios is reported. Absolute times on a shared 2-core machine mean little; the ratio is stable.
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


def latency_ratio(original, candidate, feed: dict, rounds: int = 300, blocks: int = 5, warmup: int = 30) -> float:
    """Median over blocks of median(candidate time) / median(original time), runs interleaved.

    Within a block the two sessions alternate (which goes first alternates too), so a burst of
    load on the machine hits both; the median over blocks drops a block that a burst spoiled.
    """
    a, b = make_session(str(original)), make_session(str(candidate))
    names_a = [o.name for o in a.get_outputs()]
    names_b = [o.name for o in b.get_outputs()]
    for _ in range(warmup):
        a.run(names_a, feed)
        b.run(names_b, feed)
    ratios = []
    for _ in range(blocks):
        ta, tb = [], []
        for i in range(max(1, rounds // blocks)):
            order = ((a, names_a, ta), (b, names_b, tb)) if i % 2 == 0 else ((b, names_b, tb), (a, names_a, ta))
            for session, names, times in order:
                start = time.perf_counter()
                session.run(names, feed)
                times.append(time.perf_counter() - start)
        ratios.append(statistics.median(tb) / statistics.median(ta))
    return statistics.median(ratios)


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
