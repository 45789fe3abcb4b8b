"""cleanup: remove dead nodes, unused initializers, Identity nodes and unused opsets."""

from __future__ import annotations

import dataclasses

import onnx_ir as ir
from onnx_ir.passes import common as ir_common

from onnxcompress.options import PassOptions, option
from onnxcompress.pass_base import CompressionPass
from onnxcompress.registry import register


@dataclasses.dataclass(frozen=True)
class CleanupOptions(PassOptions):
    deduplicate: bool = option(True, "merge initializers with identical contents")


@register
class Cleanup(CompressionPass):
    """Remove Identity nodes, dead nodes, unused initializers/functions/opsets; merge duplicate weights.

    Reuses onnx_ir's common passes. The model's inputs and outputs are never changed, so the
    rewrite is exact. Each removal is recorded; nothing is ever refused.
    """

    name = "cleanup"
    Options = CleanupOptions
    preserves = ()

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before_nodes = _count_nodes(model)
        before_inits = len(model.graph.initializers)
        steps: list[ir.passes.PassBase] = [ir_common.IdentityEliminationPass()]
        if self.options.deduplicate:
            steps.append(ir_common.DeduplicateInitializersPass())
        steps += [
            ir_common.RemoveUnusedNodesPass(),
            ir_common.RemoveUnusedFunctionsPass(),
            ir_common.RemoveUnusedOpsetsPass(),
        ]
        modified = False
        for step in steps:
            modified |= step(model).modified
        removed_nodes = before_nodes - _count_nodes(model)
        removed_inits = before_inits - len(model.graph.initializers)
        if modified:
            self.note(f"removed {removed_nodes} nodes, {removed_inits} initializers")
        return ir.passes.PassResult(model, modified=modified)


def _count_nodes(model: ir.Model) -> int:
    return sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))
