"""Instruments: the hooks every debugging aid hangs on. Passes contain none of this.

The manager calls, in order: ``before_pipeline``; per pass ``should_run`` (any instrument may
skip it, giving the reason), ``before_pass``, the pass, ``after_pass`` (an instrument may ask
for a rollback or a failure through the pass's report), ``after_pass_failed`` when the pass
raised or was failed; ``after_pipeline``.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from onnxcompress.analysis import AnalysisManager
from onnxcompress.pass_base import CompressionPass
from onnxcompress.report import PassReport, Report


@dataclasses.dataclass
class RunState:
    """What instruments see of a run."""

    pipeline: str
    original: ir.Model
    model: ir.Model
    report: Report
    analyses: AnalysisManager
    feeds: list[dict] | None = None
    before: ir.Model | None = None  # the model as it was before the current pass
    error: BaseException | None = None


class Instrument:
    """Base class with no-op hooks."""

    def before_pipeline(self, state: RunState) -> None:
        pass

    def should_run(self, state: RunState, pass_: CompressionPass, entry: PassReport) -> str | None:
        """None to run the pass, or the reason to skip it."""
        return None

    def before_pass(self, state: RunState, pass_: CompressionPass, entry: PassReport) -> None:
        pass

    def after_pass(self, state: RunState, pass_: CompressionPass, entry: PassReport) -> None:
        pass

    def after_pass_failed(self, state: RunState, pass_: CompressionPass, entry: PassReport) -> None:
        pass

    def after_pipeline(self, state: RunState) -> None:
        pass
