"""The pass manager: runs a pipeline's passes in order under instruments.

It does four things only: build each pass with its options and the shared context, let
instruments skip it, run it on a snapshot-protected model, and act on what instruments
decided (roll back to the snapshot, or stop with a PassFailure after the failure hooks ran).
Everything a user debugs with is an instrument.
"""

from __future__ import annotations

import logging
from typing import Sequence

import onnx_ir as ir

from onnxcompress import registry
from onnxcompress.analysis import AnalysisManager
from onnxcompress.errors import CalibrationError, PassFailure
from onnxcompress.instruments.base import Instrument, RunState
from onnxcompress.pass_base import PassContext
from onnxcompress.pipeline import Pipeline
from onnxcompress.report import PassReport, Report

logger = logging.getLogger(__name__)


class PassManager:
    def __init__(
        self,
        pipeline: Pipeline,
        instruments: Sequence[Instrument] = (),
        feeds: list[dict] | None = None,
        calibration_note: str = "none",
    ):
        self.pipeline = pipeline
        self.instruments = list(instruments)
        self.feeds = feeds
        self.calibration_note = calibration_note

    def run(self, model: ir.Model) -> tuple[ir.Model, Report]:
        """Run the pipeline on ``model`` (rewritten in place) and return it with the report."""
        analyses = AnalysisManager()
        report = Report(pipeline=str(self.pipeline), calibration=self.calibration_note)
        state = RunState(str(self.pipeline), model.clone(), model, report, analyses, self.feeds)
        context = PassContext(analyses=analyses, calibration=self.feeds)
        self._each("before_pipeline", state)
        for index, entry in enumerate(self.pipeline):
            pass_ = registry.get_pass(entry.name)(entry.options, context, entry.overrides)
            record = PassReport(index, entry.name, str(entry))
            report.passes.append(record)
            skip = next(filter(None, (i.should_run(state, pass_, record) for i in self.instruments)), None)
            if skip:
                record.status, record.reason = "skipped", skip
                continue
            self._run_pass(state, pass_, record)
        self._each("after_pipeline", state)
        return state.model, report

    def _run_pass(self, state: RunState, pass_, record: PassReport) -> None:
        state.before = state.model.clone()
        state.error = None
        self._each("before_pass", state, pass_, record)
        try:
            result = pass_(state.model)
        except CalibrationError:
            raise  # the user's data is missing or wrong: no reproducer of a pass to debug
        except Exception as exc:  # a pass bug must not surface as a bare traceback
            logger.debug("pass %s raised", record.spec, exc_info=True)
            state.error = exc
            record.fail(f"{type(exc).__name__}: {exc}")
            self._fail(state, pass_, record)
        state.model = result.model
        record.records, record.notes = list(pass_.records), list(pass_.notes)
        record.status = "changed" if result.modified else "unchanged"
        if result.modified:
            state.analyses.invalidate(pass_.preserves)
        self._each("after_pass", state, pass_, record)
        if record.status == "failed":
            self._fail(state, pass_, record)
        if record.status == "rolled back":
            logger.warning("pass %s rolled back: %s", record.spec, record.reason)
            state.model = state.before
            state.analyses.clear()

    def _fail(self, state: RunState, pass_, record: PassReport):
        self._each("after_pass_failed", state, pass_, record)
        raise PassFailure(
            f"pass '{record.spec}' (#{record.index + 1}) failed: {record.reason}",
            pass_name=record.name,
            reproducer=state.report.reproducer,
        )

    def _each(self, hook: str, *args) -> None:
        for instrument in self.instruments:
            getattr(instrument, hook)(*args)
