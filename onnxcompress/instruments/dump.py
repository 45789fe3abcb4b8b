"""dump: ``NNN_<pass>.onnx`` after each pass that changed the model (MLIR's print-ir-after-change).

``000_input.onnx`` is the model as it entered the pipeline, so every dump has a predecessor
to diff against.
"""

from __future__ import annotations

from pathlib import Path

from onnxcompress.instruments.base import Instrument
from onnxcompress.modelio import save_model


class Dump(Instrument):
    def __init__(self, folder):
        self.folder = Path(folder)

    def before_pipeline(self, state):
        self.folder.mkdir(parents=True, exist_ok=True)
        save_model(state.model, self.folder / "000_input.onnx")

    def after_pass(self, state, pass_, entry):
        if entry.status != "changed":
            return
        path = self.folder / f"{entry.index + 1:03d}_{entry.name}.onnx"
        save_model(state.model, path)
        entry.dump = str(path)
