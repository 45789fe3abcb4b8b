"""drift: compare outputs to the original after every pass that changed the model.

Reference outputs are computed once, from the original model (or a given reference), on
the calibration feeds. After each changed pass the current model runs on the same feeds;
the worst SQNR, max-abs, cosine and top-1 agreement over the outputs go into the report.
A pass over the budget is rolled back (``on_drift="rollback"``) or fails the run
(``on_drift="fail"``). With ``localize=True`` the report also names the first node, in
graph order, whose output breaks the budget.
"""

from __future__ import annotations

from typing import Literal

from onnxcompress.compare import per_tensor_drift
from onnxcompress.instruments.base import Instrument
from onnxcompress.metrics import DriftBudget, output_drift, worst
from onnxcompress.runtime import make_session, run_all


class DriftCheck(Instrument):
    def __init__(
        self,
        budget: DriftBudget | None = None,
        on_drift: Literal["rollback", "fail"] = "rollback",
        localize: bool = False,
        reference=None,
    ):
        if on_drift not in ("rollback", "fail"):
            raise ValueError(f"on_drift must be rollback or fail, not {on_drift!r}")
        self.budget = budget
        self.on_drift = on_drift
        self.localize = localize
        self.reference_model = reference
        self.reference: list[dict] | None = None

    def before_pipeline(self, state):
        if state.feeds:
            reference = self.reference_model if self.reference_model is not None else state.original
            self.reference = run_all(make_session(reference), state.feeds)
            self._reference_ir = reference

    def after_pass(self, state, pass_, entry):
        if entry.status != "changed" or self.reference is None:
            return
        outputs = run_all(make_session(state.model), state.feeds)
        per_output = output_drift(self.reference, outputs)
        drift = worst(per_output)
        entry.drift = drift.to_dict()
        entry.drift_outputs = {name: d.to_dict() for name, d in per_output.items()}
        if self.budget is None:
            return
        problems = self.budget.violations(drift)
        if not problems:
            return
        reason = f"drift over budget ({'; '.join(problems)})"
        if self.localize:
            entry.first_drifting_node = self._first_drifting(state)
            if entry.first_drifting_node:
                reason += f"; first drifting tensor: {entry.first_drifting_node}"
        if self.on_drift == "rollback":
            entry.roll_back(reason)
        else:
            entry.fail(reason)

    def _first_drifting(self, state) -> str | None:
        # Intermediate tensors are not classifier outputs: judge them by SQNR, cosine and
        # max-abs; a top1-only budget uses 30 dB as the tensor threshold.
        b = self.budget
        sqnr = b.sqnr if b.sqnr is not None or b.cosine is not None or b.maxabs is not None else 30.0
        tensor_budget = DriftBudget(sqnr=sqnr, cosine=b.cosine, maxabs=b.maxabs)
        for tensor in per_tensor_drift(self._reference_ir, state.model, state.feeds):
            if tensor_budget.violations(tensor.drift):
                return f"{tensor.name} ({tensor.producer})"
        return None
