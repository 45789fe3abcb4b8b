"""Capture intermediate tensors of a model on calibration feeds with onnxruntime.

Inside ``with reusing(runner):`` (the tuner's probes), requests for the runner's own feeds are
served by :class:`onnxcompress.partial_run.CachedRunner`: tensors the model computes as the
runner's reference model does come from its cache, and only the part of the model that
differs runs. The values are the same either way (the cache is computed as :func:`capture`
computes); only the time differs.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterable, Iterator

import numpy as np
import onnx_ir as ir

from onnxcompress.runtime import make_session


_RUNNER: contextvars.ContextVar = contextvars.ContextVar("onnxcompress_activation_runner", default=None)


@contextlib.contextmanager
def reusing(runner):
    """Serve :func:`capture` and :func:`stream` on ``runner.feeds`` from ``runner``."""
    token = _RUNNER.set(runner)
    try:
        yield
    finally:
        _RUNNER.reset(token)


def _cached(model: ir.Model, names: list[str], feeds, optimize: bool = False):
    runner = _RUNNER.get()
    if runner is None or feeds is not runner.feeds:
        return None
    return runner.compute(model, names, optimize=optimize)


def capture(model: ir.Model, names: Iterable[str], feeds: list[dict]) -> dict[str, list[np.ndarray]]:
    """``{name: [array per feed]}`` for the named tensors (graph inputs are taken from the feeds)."""
    names = list(dict.fromkeys(names))
    cached = _cached(model, names, feeds)
    if cached is not None:
        return {n: [values[n] for values in cached] for n in names}
    inputs = {v.name for v in model.graph.inputs}
    computed = [n for n in names if n not in inputs]
    session = make_session(model, optimize=False, extra_outputs=computed) if computed else None
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
    cached = _cached(model, names, feeds, optimize)
    if cached is not None:
        yield from cached
        return
    inputs = {v.name for v in model.graph.inputs}
    computed = [n for n in names if n not in inputs]
    session = make_session(model, optimize=optimize, extra_outputs=computed) if computed else None
    for feed in feeds:
        values = dict(zip(computed, session.run(computed, feed))) if session else {}
        yield {name: (feed[name] if name in inputs else values[name]) for name in names}


def channel_peaks(model: ir.Model, axes: dict[str, int], feeds: Iterable[dict],
                  magnitude: bool = False) -> dict[str, np.ndarray]:
    """Largest value (``magnitude``: largest ``|x|``) of each channel of the named tensors over
    the feeds, ``axes`` giving each tensor's channel axis; float64, one feed in memory at a time."""
    peaks: dict[str, np.ndarray] = {}
    for values in stream(model, axes, feeds):
        for name, axis in axes.items():
            array = np.asarray(values[name], np.float64)
            moved = np.moveaxis(np.abs(array) if magnitude else array, axis, 0)
            peak = moved.reshape(moved.shape[0], -1).max(axis=1)
            peaks[name] = np.maximum(peaks[name], peak) if name in peaks else peak
    return peaks


def reader(model: ir.Model, names: Iterable[str], feeds: list[dict], overridable: Iterable[str] = ()):
    """``read(name, overrides) -> [array per feed]`` for any of the named tensors, with the
    ``overridable`` initializers (named as they are in ``model`` now) fed from ``overrides``.

    One onnxruntime session serves every call: a caller that refits one layer at a time and
    reads the next layer's input after each refit pays for one session, not one per read (and
    memory does not creep with sessions built and freed one after another). The caller writes
    each override into the model as well; inside :func:`reusing` the cached runner serves each
    call from the model as it is then, which is why it needs no overrides.
    """
    names = list(dict.fromkeys(names))
    runner = _RUNNER.get()
    if runner is not None and feeds is runner.feeds:
        return lambda name, overrides: capture(model, [name], feeds)[name]
    inputs = {v.name for v in model.graph.inputs}
    computed = [n for n in names if n not in inputs]
    session = make_session(model, optimize=False, extra_outputs=computed, overridable=list(overridable)) \
        if computed else None

    def read(name: str, overrides: dict[str, np.ndarray]) -> list[np.ndarray]:
        if name in inputs:
            return [feed[name] for feed in feeds]
        return [session.run([name], {**feed, **overrides})[0] for feed in feeds]

    return read
