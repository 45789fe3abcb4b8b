"""cost: parameters, bytes and MACs of the model before the pipeline and after each pass."""

from __future__ import annotations

from onnxcompress.instruments.base import Instrument


def _summary(cost) -> dict[str, int]:
    return {"params": cost.params, "bytes": cost.bytes, "macs": cost.macs}


class CostTracking(Instrument):
    def before_pipeline(self, state):
        state.report.input_cost = _summary(state.analyses.get("cost", state.model))

    def after_pass(self, state, pass_, entry):
        if entry.status in ("changed", "rolled back"):
            # A rolled-back pass leaves the previous model, whose cost the cache may still hold.
            model = state.before if entry.status == "rolled back" else state.model
            entry.cost = _summary(state.analyses.get("cost", model))
