"""Analyses: facts computed from a model on demand, cached, dropped when the model changes.

An analysis is a function ``(model: ir.Model) -> result`` registered under a name with
:func:`register_analysis`. The pass manager owns an :class:`AnalysisManager`; passes ask
it with ``self.context.analyses.get("cost", model)``. After a pass that modified the model,
the manager drops every cached result the pass does not declare in ``preserves``.
"""

from __future__ import annotations

from typing import Any, Callable

import onnx_ir as ir

_ANALYSES: dict[str, Callable[[ir.Model], Any]] = {}


def register_analysis(name: str):
    def decorate(fn: Callable[[ir.Model], Any]):
        _ANALYSES[name] = fn
        return fn

    return decorate


def analysis_names() -> list[str]:
    _load_builtin()
    return sorted(_ANALYSES)


def _load_builtin() -> None:
    from onnxcompress.analysis import cost  # noqa: F401  (registers "cost")


class AnalysisManager:
    """Cache of analysis results for the model being compressed."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[int, Any]] = {}
        self.computed: list[str] = []  # names in computation order, for tests and timing

    def get(self, name: str, model: ir.Model) -> Any:
        _load_builtin()
        if name not in _ANALYSES:
            raise KeyError(f"unknown analysis '{name}'; known: {', '.join(sorted(_ANALYSES))}")
        cached = self._cache.get(name)
        if cached is not None and cached[0] == id(model):
            return cached[1]
        result = _ANALYSES[name](model)
        self._cache[name] = (id(model), result)
        self.computed.append(name)
        return result

    def invalidate(self, preserved: tuple[str, ...] | frozenset[str] = ()) -> None:
        for name in list(self._cache):
            if name not in preserved:
                del self._cache[name]

    def clear(self) -> None:
        self._cache.clear()
