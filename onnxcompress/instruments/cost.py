"""cost: parameters, bytes and MACs of the model before the pipeline and after each pass.

With calibration feeds, symbolic input dims (a transformer's sequence length) take the
first feed's sizes, so MACs are counted for that input shape.
"""

from __future__ import annotations

from onnxcompress.analysis.cost import compute_cost
from onnxcompress.calibration import input_specs
from onnxcompress.instruments.base import Instrument


def _summary(cost) -> dict[str, int]:
    return {"params": cost.params, "bytes": cost.bytes, "macs": cost.macs}


class CostTracking(Instrument):
    def _cost(self, state, model):
        if state.feeds:
            return compute_cost(model, input_shapes=symbolic_dims_from(model, state.feeds[0]))
        return state.analyses.get("cost", model)

    def before_pipeline(self, state):
        state.report.input_cost = _summary(self._cost(state, state.model))

    def after_pass(self, state, pass_, entry):
        if entry.status in ("changed", "rolled back"):
            model = state.before if entry.status == "rolled back" else state.model
            entry.cost = _summary(self._cost(state, model))


def symbolic_dims_from(model, feed) -> dict[str, list]:
    """Sizes for the symbolic dims of each input, from a feed; the first dim counts one sample."""
    shapes = {}
    for spec in input_specs(model):
        array = feed.get(spec.name)
        if array is None or array.ndim != len(spec.shape):
            continue
        dims = [None if isinstance(d, int) else size for d, size in zip(spec.shape, array.shape)]
        if dims and dims[0] is not None:
            dims[0] = 1
        shapes[spec.name] = dims
    return shapes
