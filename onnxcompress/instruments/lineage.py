"""lineage: every node a pass creates carries ``metadata_props["onnxcompress.pass"]``.

Netron shows node metadata, so a user can see which pass made which node.
"""

from __future__ import annotations

import onnx_ir as ir

from onnxcompress.instruments.base import Instrument

LINEAGE_KEY = "onnxcompress.pass"


def _all_nodes(model: ir.Model):
    yield from ir.traversal.RecursiveGraphIterator(model.graph)
    for function in model.functions.values():
        yield from function


class Lineage(Instrument):
    def before_pass(self, state, pass_, entry):
        self._seen = {id(node) for node in _all_nodes(state.model)}

    def after_pass(self, state, pass_, entry):
        if entry.status != "changed":
            return
        for node in _all_nodes(state.model):
            if id(node) not in self._seen:
                node.metadata_props[LINEAGE_KEY] = pass_.name
