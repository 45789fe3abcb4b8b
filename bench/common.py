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

import onnxruntime as ort  # noqa: E402

from onnxcompress.runtime import session_options  # noqa: E402


def bench_session(path) -> ort.InferenceSession:
    """2 intra-op threads that do not spin: two sessions take turns, and a spinning pool of
    one would steal the cores from the other and make the ratio meaningless."""
    options = session_options(threads=2)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def latency_ratio(original, candidate, feed: dict, rounds: int = 300, blocks: int = 5, warmup: int = 30) -> float:
    """Median over blocks of median(candidate time) / median(original time), runs interleaved.

    Within a block the two sessions alternate (which goes first alternates too), so a burst of
    load on the machine hits both; the median over blocks drops a block that a burst spoiled.
    """
    a, b = bench_session(original), bench_session(candidate)
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
