"""reproducer: when a pass fails, write what it takes to make it fail again.

The folder holds ``model.onnx`` (the model as it was before the failing pass),
``reference.onnx`` (the model the pipeline started from: drift is measured against it),
``pipeline.txt`` (the failing pass with its options), ``full_pipeline.txt``, ``feeds/``
(the calibration feeds, one .npz each), ``error.txt`` and ``README.txt`` with the command
that reproduces the failure.
"""

from __future__ import annotations

import logging
import shlex
import tempfile
import time
import traceback
from pathlib import Path

from onnxcompress.calibration import save_feeds
from onnxcompress.instruments.base import Instrument
from onnxcompress.modelio import save_model

logger = logging.getLogger(__name__)


class Reproducer(Instrument):
    def __init__(self, folder=None, budget: str | None = None):
        self.parent = Path(folder) if folder is not None else Path(tempfile.gettempdir())
        self.budget = budget
        self.path: Path | None = None

    def after_pass_failed(self, state, pass_, entry):
        try:
            self._write(state, entry)
        except OSError as exc:  # never hide the pass's own failure behind this one
            logger.warning("could not write the reproducer: %s", exc)

    def _write(self, state, entry):
        self.parent.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        folder = Path(tempfile.mkdtemp(prefix=f"onnxcompress-repro-{entry.name}-{stamp}-", dir=self.parent))
        save_model(state.before, folder / "model.onnx")
        save_model(state.original, folder / "reference.onnx")
        (folder / "pipeline.txt").write_text(entry.spec + "\n")
        (folder / "full_pipeline.txt").write_text(state.pipeline + "\n")
        error = state.error
        details = "".join(traceback.format_exception(error)) if error is not None else entry.reason
        (folder / "error.txt").write_text(details + "\n")
        command = ["onnxcompress", "optimize", "model.onnx", "-o", "out.onnx", "-p", entry.spec]
        if state.feeds:
            save_feeds(state.feeds, folder / "feeds")
            command += ["--calib", "feeds"]
        if self.budget:
            command += ["--drift-budget", self.budget, "--on-drift", "fail", "--reference", "reference.onnx"]
        (folder / "README.txt").write_text(
            f"pass '{entry.spec}' failed: {entry.reason}\n\nreproduce in this folder with:\n  {shlex.join(command)}\n"
        )
        self.path = folder
        state.report.reproducer = str(folder)
