"""timing: wall time of each pass."""

from __future__ import annotations

import time

from onnxcompress.instruments.base import Instrument


class Timing(Instrument):
    def before_pass(self, state, pass_, entry):
        self._start = time.perf_counter()

    def after_pass(self, state, pass_, entry):
        entry.time_s = time.perf_counter() - self._start

    after_pass_failed = after_pass
