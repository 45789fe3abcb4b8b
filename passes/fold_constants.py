"""fold-constants: evaluate nodes whose inputs are all constant, with onnxscript's folder."""

from __future__ import annotations

import dataclasses

import onnx_ir as ir
from onnxscript import optimizer

from onnxcompress.options import PassOptions, option
from onnxcompress.pass_base import CompressionPass
from onnxcompress.passes.lift_constants import (
    TENSOR_ATTRIBUTES,
    constant_tensor,
    replace_with_initializer,
)
from onnxcompress.registry import register

# What onnxscript's folder keeps on purpose (onnxscript.optimizer._constant_folding).
_KEPT_OPS = {
    "ConstantOfShape": "kept so the model does not grow",
    "QuantizeLinear": "kept to preserve quantization",
    "DequantizeLinear": "kept to preserve quantization",
    "DynamicQuantizeLinear": "kept to preserve quantization",
}


@dataclasses.dataclass(frozen=True)
class FoldConstantsOptions(PassOptions):
    input_size_limit: int = option(
        1 << 20, "do not fold a node with an input of more elements than this"
    )
    output_size_limit: int = option(
        512 * 512,
        "do not store a folded tensor of more elements than this, unless folding frees "
        "at least as many elements of inputs nothing else reads",
    )
    shape_inference: bool = option(
        True, "run node-level onnx shape inference while folding (lets Shape/Size fold)"
    )

    def __post_init__(self):
        for name in ("input_size_limit", "output_size_limit"):
            if getattr(self, name) < 0:
                self.fail(name, f"must be 0 or more, got {getattr(self, name)}")


@register
class FoldConstants(CompressionPass):
    """Replace nodes whose inputs are all constant by initializers holding their outputs.

    Reuses onnxscript's constant folder (``onnxscript.optimizer.fold_constants``), which
    evaluates each such node with onnx's reference implementation and also folds Shape/Size
    of static shapes, If on a constant condition (the taken branch is inlined), Identity (its
    consumers read its input instead) and Cast to the same type. The folded values are what
    onnxruntime computes up to float rounding of the evaluated ops (bit-exact for data
    movement such as Transpose, Reshape, Concat, Gather). Every folded value becomes an
    initializer (the Constant nodes the folder makes for Shape/Size are turned into ones too);
    Constant nodes the folded nodes read, and bypassed Identity nodes, are left dead for
    ``cleanup``.

    Exact limits: a node is not folded when an input has more than ``input_size_limit``
    elements (Transpose of a weight read only by it is folded anyway), when its output
    would exceed ``output_size_limit`` elements without freeing as many, when it has several
    outputs, when it is random, has a subgraph, reads a graph input, or is one of the ops
    onnxscript keeps on purpose (ConstantOfShape, QuantizeLinear, DequantizeLinear,
    DynamicQuantizeLinear). Each node with constant inputs that stays is refused with the
    reason. ``modified`` reports graph changes; shape/type annotations the folder refines
    along the way do not count (they do not change what the model computes).
    """

    name = "fold-constants"
    Options = FoldConstantsOptions
    preserves = ()

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        considered: list[ir.Node] = []

        def should_fold(node: ir.Node) -> None:
            # Called for each node whose inputs are all constant; None = onnxscript's own rules.
            considered.append(node)
            return None

        before = _all_nodes(model)
        identities = [n for n in before if n.op_type == "Identity" and _is_read(n)]
        result = optimizer.fold_constants(
            model,
            onnx_shape_inference=self.options.shape_inference,
            input_size_limit=self.options.input_size_limit,
            output_size_limit=self.options.output_size_limit,
            should_fold=should_fold,
        )
        _lift_new_constants(model, set(before))
        folded = [node for node in before if node.graph is None]
        for node in folded:
            detail = "inlined the branch of a constant condition" if node.op_type == "If" else ""
            self.rewrote(node, detail or "folded to a constant")
        for node in identities:
            if node.graph is not None and not _is_read(node):
                self.rewrote(node, "bypassed: its consumers read its input (dead now)")
        for node in dict.fromkeys(considered):
            if node.graph is not None:
                self.refused(node, self._why_kept(node))
        if folded:
            self.note(f"folded {len(folded)} nodes")
        return ir.passes.PassResult(model, modified=result.modified)

    def _why_kept(self, node: ir.Node) -> str:
        if node.domain == "" and node.op_type in _KEPT_OPS:
            return f"{node.op_type} is {_KEPT_OPS[node.op_type]}"
        sizes = [
            v.const_value.size for v in node.inputs if v is not None and v.const_value is not None
        ]
        if sizes and max(sizes) > self.options.input_size_limit:
            return f"an input has {max(sizes)} elements, over input_size_limit"
        if len(node.outputs) > 1:
            return "it has several outputs; onnxscript folds single-output nodes only"
        return "its output would exceed output_size_limit (or onnx has no reference kernel)"


def _lift_new_constants(model: ir.Model, old: set[ir.Node]) -> None:
    """Make the Constant nodes the folder created (for Shape, Size...) initializers too."""
    for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
        if node in old or node.op_type != "Constant" or node.domain != "":
            continue
        if len(node.attributes) != 1 or node.outputs[0].is_graph_output():
            continue
        attr_name, attr = next(iter(node.attributes.items()))
        if attr_name in TENSOR_ATTRIBUTES and node.outputs[0].name:
            replace_with_initializer(node, constant_tensor(attr_name, attr))


def _is_read(node: ir.Node) -> bool:
    return any(v.uses() or v.is_graph_output() for v in node.outputs)


def _all_nodes(model: ir.Model) -> list[ir.Node]:
    nodes = list(ir.traversal.RecursiveGraphIterator(model.graph))
    for function in model.functions.values():
        nodes.extend(ir.traversal.RecursiveGraphIterator(function))
    return nodes
