"""Output and per-tensor drift between two models on the same feeds."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from onnxcompress.metrics import Drift, output_drift, tensor_drift, worst
from onnxcompress.activations import capture
from onnxcompress.runtime import intermediate_names, make_session, run_all


@dataclasses.dataclass
class TensorDrift:
    name: str
    producer: str  # op type of the node computing it in the second model
    position: int  # index of that node in the second model's graph order
    drift: Drift


def drift_against(reference: list[dict], model, feeds: list[dict]) -> Drift:
    """The worst drift over the outputs of ``model`` run on ``feeds`` from ``reference`` (the
    outputs by name for each feed, as :func:`onnxcompress.runtime.run_all` gives them)."""
    return worst(output_drift(reference, run_all(make_session(model), feeds)))


def compare_outputs(a: ir.Model, b: ir.Model, feeds: list[dict]) -> dict[str, Drift]:
    """Drift of each output of ``b`` against the same-named output of ``a``."""
    ref = run_all(make_session(a), feeds)
    cand = run_all(make_session(b), feeds)
    common = [n for n in ref[0] if n in cand[0]]
    missing = [n for n in ref[0] if n not in cand[0]]
    if missing:
        raise ValueError(f"output '{missing[0]}' of the first model is not an output of the second")
    return output_drift([{n: r[n] for n in common} for r in ref], cand)


def per_tensor_drift(a: ir.Model, b: ir.Model, feeds: list[dict]) -> list[TensorDrift]:
    """Drift of every intermediate tensor that both models compute (same name, same shape).

    Ordered as in ``b``'s graph, so the first entry over a threshold is the first node
    whose output drifted.
    """
    names_a = set(intermediate_names(a))
    producers = {}
    for position, node in enumerate(b.graph):
        for value in node.outputs:
            if value is not None and value.name in names_a:
                producers[value.name] = (node.op_type, position)
    names = list(producers)
    if not names:
        return []
    ref, cand = capture(a, names, feeds), capture(b, names, feeds)
    result = []
    for name in names:
        refs, cands = ref[name], cand[name]
        if any(np.shape(x) != np.shape(y) for x, y in zip(refs, cands)):
            continue
        if any(np.asarray(x).dtype.kind not in "fiub" for x in refs):
            continue
        op, position = producers[name]
        result.append(TensorDrift(name, op, position, tensor_drift(refs, cands)))
    return result


def rank_by_drift(drifts: list[TensorDrift]) -> list[TensorDrift]:
    """Worst first: lowest SQNR, then lowest cosine."""
    return sorted(drifts, key=lambda t: (t.drift.sqnr_db, t.drift.cosine))
