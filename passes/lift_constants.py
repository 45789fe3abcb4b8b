"""lift-constants: Constant nodes that hold tensors become initializers."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from onnxcompress.options import PassOptions, option
from onnxcompress.pass_base import Candidate, CompressionPass, node_label
from onnxcompress.registry import register

# The Constant attributes that hold a dense tensor (sparse_value is not representable).
TENSOR_ATTRIBUTES = (
    "value",
    "value_float",
    "value_floats",
    "value_int",
    "value_ints",
    "value_string",
    "value_strings",
)


@dataclasses.dataclass(frozen=True)
class LiftConstantsOptions(PassOptions):
    size_limit: int = option(
        0,
        "constants with fewer elements than this stay Constant nodes "
        "(0 lifts every constant; 2 keeps scalars)",
    )

    def __post_init__(self):
        if self.size_limit < 0:
            self.fail("size_limit", f"must be 0 or more, got {self.size_limit}")


@register
class LiftConstants(CompressionPass):
    """Turn Constant nodes that hold tensors into initializers of the graph they live in.

    A Constant node with a ``value``, ``value_float(s)``, ``value_int(s)`` or
    ``value_string(s)`` attribute is removed and its output becomes an initializer with
    the same name, dtype, shape and bytes, so the rewrite is bit-exact. Exporters such as
    Paddle2ONNX keep every Conv/MatMul weight in Constant nodes; onnxruntime's quantizer
    and the weight passes here only see initializers.

    Constants inside If/Loop/Scan bodies become initializers of that body (ONNX allows
    initializers in subgraphs; onnx_ir serializes them there), not of the main graph.

    Exact limits: constants with fewer than ``size_limit`` elements stay (default 0 lifts
    all, as onnxscript's optimizer does; 2 keeps scalars). Refused, with the reason: those,
    a Constant whose output is a graph output (an initializer cannot be one here), one with
    no or several value attributes, one with a ``sparse_value`` (onnx_ir 1.1 cannot
    represent sparse tensors; such a model does not even load), one whose output has no
    name, and Constants inside functions (ONNX functions have no initializers).
    """

    name = "lift-constants"
    Options = LiftConstantsOptions
    preserves = ()

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        lifted = 0
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            if _is_constant(node):
                lifted += self._try_lift(node)
        for function in model.functions.values():
            for node in ir.traversal.RecursiveGraphIterator(function):
                if _is_constant(node):
                    reason = f"in function '{function.name}': functions have no initializers"
                    self.refused(node, reason)
        if lifted:
            self.note(f"lifted {lifted} Constant nodes to initializers")
        return ir.passes.PassResult(model, modified=bool(lifted))

    def candidates(self, model: ir.Model) -> list[Candidate]:
        found = []
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            if not _is_constant(node):
                continue
            tensor, _ = self._lift_check(node)
            if tensor is not None:
                what = f"lift {tensor.dtype.name}{list(tensor.shape)} to an initializer"
                found.append(Candidate(self.name, node_label(node), node.op_type, what))
        return found

    def _try_lift(self, node: ir.Node) -> bool:
        tensor, reason = self._lift_check(node)
        if tensor is None:
            self.refused(node, reason)
            return False
        replace_with_initializer(node, tensor)
        self.rewrote(node, f"initializer {tensor.dtype.name}{list(tensor.shape)}")
        return True

    def _lift_check(self, node: ir.Node) -> tuple[ir.TensorProtocol | None, str]:
        """The tensor to lift, or None and why not."""
        output = node.outputs[0]
        if output.is_graph_output():
            return None, "its output is a graph output"
        if output.name is None:
            return None, "its output has no name"
        if len(node.attributes) != 1:
            return None, f"has {len(node.attributes)} attributes, a valid Constant has one"
        attr_name, attr = next(iter(node.attributes.items()))
        if attr_name not in TENSOR_ATTRIBUTES:
            return None, f"attribute '{attr_name}' is not supported by onnx_ir"
        if not isinstance(attr, ir.Attr) or attr.value is None:
            return None, f"attribute '{attr_name}' references a function attribute"
        tensor = constant_tensor(attr_name, attr)
        if tensor.size < self.options.size_limit:
            return None, f"{tensor.size} elements, under size_limit={self.options.size_limit}"
        return tensor, ""


def _is_constant(node: ir.Node) -> bool:
    return node.op_type == "Constant" and node.domain == "" and len(node.outputs) == 1


def constant_tensor(attr_name: str, attr: ir.Attr) -> ir.TensorProtocol:
    """The tensor a Constant attribute denotes (the attribute's own tensor for ``value``).

    ``attr_name`` must be one of the ``value*`` names other than ``sparse_value``.
    """
    if attr_name == "value":
        return attr.as_tensor()
    if attr_name in ("value_int", "value_ints"):
        return ir.tensor(np.array(attr.value, dtype=np.int64))
    if attr_name in ("value_float", "value_floats"):
        return ir.tensor(np.array(attr.value, dtype=np.float32))
    return ir.StringTensor(np.array(attr.value, dtype=np.bytes_))


def replace_with_initializer(node: ir.Node, tensor: ir.TensorProtocol) -> None:
    """Register ``tensor`` as an initializer of the Constant ``node``'s graph; remove the node.

    The initializer takes the name, metadata and uses of the node's output. The output must
    not be a graph output.
    """
    graph = node.graph
    assert graph is not None
    output = node.outputs[0]
    tensor.name = output.name
    initializer = ir.Value(
        name=output.name,
        shape=ir.Shape(tensor.shape),
        type=ir.TensorType(tensor.dtype),
        const_value=tensor,
        metadata_props=output.metadata_props.copy(),
    )
    initializer.meta.update(output.meta)
    output.replace_all_uses_with(initializer)
    graph.remove(node, safe=True)
    # The name is free now that the Constant's output left the graph.
    graph.register_initializer(initializer)
