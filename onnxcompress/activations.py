"""Capture intermediate tensors of a model on calibration feeds with onnxruntime."""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
import onnx_ir as ir

from onnxcompress.runtime import make_session, with_extra_outputs


def capture(model: ir.Model, names: Iterable[str], feeds: list[dict]) -> dict[str, list[np.ndarray]]:
    """``{name: [array per feed]}`` for the named tensors (graph inputs are taken from the feeds)."""
    names = list(dict.fromkeys(names))
    inputs = {v.name for v in model.graph.inputs}
    computed = [n for n in names if n not in inputs]
    session = make_session(with_extra_outputs(model, computed), optimize=False) if computed else None
    out: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for feed in feeds:
        values = dict(zip(computed, session.run(computed, feed))) if session else {}
        for name in names:
            out[name].append(feed[name] if name in inputs else values[name])
    return out


def stream(model: ir.Model, names: Iterable[str], feeds: Iterable[dict], optimize: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """``{name: array}`` for the named tensors, one feed at a time: memory stays that of one
    feed's activations however many feeds there are."""
    names = list(dict.fromkeys(names))
    inputs = {v.name for v in model.graph.inputs}
    computed = [n for n in names if n not in inputs]
    session = make_session(with_extra_outputs(model, computed), optimize=optimize) if computed else None
    for feed in feeds:
        values = dict(zip(computed, session.run(computed, feed))) if session else {}
        yield {name: (feed[name] if name in inputs else values[name]) for name in names}
