"""bisect: run only the first N skippable passes (as LLVM's -opt-bisect-limit).

Passes that are not skippable always run. Each skippable pass is numbered from 1 in the
report; with limit N, passes numbered above N are skipped. Bisecting over N finds the
first pass that breaks something.
"""

from __future__ import annotations

from onnxcompress.instruments.base import Instrument


class Bisect(Instrument):
    def __init__(self, limit: int):
        if limit < 0:
            raise ValueError("bisect limit must be >= 0")
        self.limit = limit
        self.count = 0
        self.log: list[str] = []

    def should_run(self, state, pass_, entry):
        if not pass_.skippable:
            return None
        self.count += 1
        run = self.count <= self.limit
        self.log.append(f"BISECT: {'running' if run else 'NOT running'} pass ({self.count}) {entry.spec}")
        return None if run else f"bisect limit {self.limit} reached (skippable pass #{self.count})"
