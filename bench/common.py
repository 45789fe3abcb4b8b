"""Shared benchmark helpers: interleaved latency ratios and result tables.

Latency is measured as a ratio in one process: the candidate and the original run in turn on
the same input (batch 1, 2 intra-op threads), in several blocks of rounds; the median of the
blocks' median-time ratios is reported. Absolute times on a shared 2-core machine mean little; the ratio is stable.

Peak memory of one step (a quantization, a calibration) is measured in a fresh process
(:func:`in_fresh_process`), so that what earlier steps allocated and freed does not hide it:
:class:`PeakMemory` reads the process's own high-water mark of resident memory.
"""

from __future__ import annotations

import multiprocessing
import statistics
import sys
import time
import traceback
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


class StepFailed(RuntimeError):
    """A step run by :func:`in_fresh_process` raised, died or ran out of time; one-line message."""


def one_line(exc: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message``, cut to ``limit`` characters."""
    text = str(exc).strip().splitlines()
    line = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def in_fresh_process(fn, *args, timeout: float | None = None):
    """``fn(*args)`` in a new spawned Python process; its (picklable) return value.

    ``fn`` must be importable (a module-level function). An exception in the child, a child
    that dies (killed for memory, a crash in native code) or one that outlives ``timeout``
    seconds raises :class:`StepFailed` with one line saying which.
    """
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child_main, args=(send, fn, args))
    child.start()
    send.close()
    try:
        if not receive.poll(timeout):
            child.kill()
            child.join()
            raise StepFailed(f"timed out after {timeout:.0f} s")
        ok, value = receive.recv()
    except EOFError:
        child.join()
        raise StepFailed(f"child process died (exit code {child.exitcode})") from None
    finally:
        receive.close()
    child.join()
    if not ok:
        raise StepFailed(value)
    return value


def _child_main(conn, fn, args) -> None:
    try:
        result = (True, fn(*args))
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent as one line
        traceback.print_exc(file=sys.stderr)
        result = (False, one_line(exc))
    conn.send(result)
    conn.close()


class PeakMemory:
    """Peak resident memory of this process from now on, in MB (10^6 bytes).

    On creation the kernel's high-water mark (VmHWM) is reset to the current resident size
    (``/proc/self/clear_refs``, Linux 4.0+) and that size is the baseline; where the reset is
    not allowed the baseline is VmHWM itself, so a step that stays below the earlier peak
    reads 0. :meth:`peak_mb` is VmHWM minus the baseline.
    """

    def __init__(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.baseline_kb = _proc_status_kb("VmRSS")
        except OSError:
            self.baseline_kb = _proc_status_kb("VmHWM")

    def peak_mb(self) -> float:
        return (_proc_status_kb("VmHWM") - self.baseline_kb) * 1024 / 1e6


def _proc_status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise OSError(f"{key} not in /proc/self/status")
