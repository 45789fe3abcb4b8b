"""verify: the onnx checker after every pass that changed the model."""

from __future__ import annotations

import onnx
import onnx_ir as ir

from onnxcompress.instruments.base import Instrument
from onnxcompress.modelio import EXTERNAL_DATA_THRESHOLD, initializer_bytes


class Verify(Instrument):
    def after_pass(self, state, pass_, entry):
        if entry.status != "changed" or initializer_bytes(state.model) > EXTERNAL_DATA_THRESHOLD:
            return
        try:
            onnx.checker.check_model(ir.to_proto(state.model))
        except onnx.checker.ValidationError as exc:
            first = str(exc).strip().splitlines()[0]
            entry.fail(f"the model is no longer valid ONNX: {first}")
