"""Progress bars for calibration and search, on stderr, only when stderr is a terminal.

``for feed in progress(feeds, desc="calibrating"): ...`` yields the items of the iterable;
``with progress(total=n, desc="search") as bar: ... bar.update(k)`` counts by hand. When stderr
is not a terminal (a pipe, a file, a test capturing output) nothing at all is written.
:class:`StageBars` turns a ``callback(stage, done, total)`` (as ``tune`` reports) into bars.
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import Iterable, Iterator, TextIO

# Redraw at most this often (seconds); the last state is always drawn when the bar closes.
REDRAW_EVERY_S = 0.1


def progress(iterable: Iterable | None = None, total: int | None = None, desc: str = "") -> "Progress":
    """A bar over ``iterable`` (``total`` defaults to its length), or one to ``update`` by hand."""
    return Progress(iterable, total, desc)


class Progress:
    """See :func:`progress`. ``stream`` is stderr unless given; the bar shows only when it is a terminal."""

    def __init__(
        self, iterable: Iterable | None = None, total: int | None = None, desc: str = "", stream: TextIO | None = None
    ):
        self.iterable = iterable
        self.total = len(iterable) if total is None and hasattr(iterable, "__len__") else total
        self.desc, self.n = desc, 0
        self.stream = sys.stderr if stream is None else stream
        self.shown = _is_terminal(self.stream)
        self._start = self._drawn_at = time.monotonic()
        self._closed = False

    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError("this progress bar has no iterable: use update()")
        try:
            for item in self.iterable:
                yield item
                self.update()
        finally:
            self.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.shown and time.monotonic() - self._drawn_at >= REDRAW_EVERY_S:
            self._draw()

    def close(self) -> None:
        if self.shown and not self._closed:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()
        self._closed = True

    def line(self, width: int) -> str:
        """The bar as text, at most ``width`` characters."""
        elapsed = time.monotonic() - self._start
        prefix = f"{self.desc}: " if self.desc else ""
        if not self.total:
            return f"{prefix}{self.n} in {elapsed:.1f}s"[:width]
        share = min(1.0, self.n / self.total)
        counts = f" {self.n}/{self.total} {share:4.0%} {elapsed:.1f}s"
        cells = max(0, width - len(prefix) - len(counts) - 2)
        filled = int(share * cells)
        return f"{prefix}[{'#' * filled}{'.' * (cells - filled)}]{counts}"[:width]

    def _draw(self) -> None:
        self._drawn_at = time.monotonic()
        width = shutil.get_terminal_size().columns - 1
        self.stream.write("\r" + self.line(width).ljust(width))
        self.stream.flush()


def _is_terminal(stream: TextIO | None) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class StageBars:
    """A ``(stage, done, total)`` callback drawing one bar per stage; a new stage closes the
    bar of the one before. ``done`` is taken as the position, so a stage may move back (a
    bisection reports the plan size it tries). Use as a context manager to close the last bar."""

    def __init__(self, stream: TextIO | None = None):
        self.stream, self.stage, self.bar = stream, None, None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage != self.stage:
            self.close()
            self.stage, self.bar = stage, Progress(total=total, desc=stage, stream=self.stream)
        self.bar.total = total
        self.bar.update(done - self.bar.n)

    def __enter__(self) -> "StageBars":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.stage, self.bar = None, None
