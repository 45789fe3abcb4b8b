"""New initializers for rewritten weights. Tensors are never changed in place: a rewrite makes a
new tensor in a new initializer, points the node at it, and drops the old one if nothing else
reads it."""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx_ir as ir

from onnxcompress.pass_base import node_label


def new_initializer(owner: ir.Model | ir.Graph, base: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` as an initializer of the model's main graph (or of the given graph)
    named ``base`` (or ``base2``, ``base3``… if taken)."""
    graph = owner.graph if isinstance(owner, ir.Model) else owner
    name, n = base, 1
    while name in graph.initializers:
        n += 1
        name = f"{base}{n}"
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(np.require(array, requirements="C"), name=name))  # ascontiguousarray would make a 0-d array 1-d
    graph.register_initializer(value)
    return value


def replace_constant_input(model: ir.Model, node: ir.Node, index: int, array: np.ndarray, suffix: str) -> ir.Value:
    """Feed input ``index`` of ``node`` from a new initializer holding ``array``."""
    old = node.inputs[index]
    new = new_initializer(model, f"{old.name}{suffix}", array)
    node.replace_input_with(index, new)
    drop_if_unused(old)
    return new


def replace_initializer(old: ir.Value, array: np.ndarray, tensor_metadata: dict[str, str] | None = None) -> ir.Value:
    """A new tensor holding ``array`` in a new initializer of the same name takes ``old``'s
    place for every reader. The value's metadata is kept; the tensor's is ``tensor_metadata``
    (default: the old tensor's)."""
    graph = old.graph
    tensor = ir.tensor(array, dtype=old.const_value.dtype, name=old.name)
    metadata = old.const_value.metadata_props if tensor_metadata is None else tensor_metadata
    tensor.metadata_props.update(metadata)
    new = ir.Value(name=old.name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
    new.metadata_props.update(old.metadata_props)
    old.replace_all_uses_with(new)
    graph.initializers.pop(old.name)
    graph.register_initializer(new)
    return new


def weight_refusal(value: ir.Value | None, float_types, is_weight_use: Callable[[ir.Node, int], bool],
                   rewrite: str) -> str | None:
    """Why a weight input ``value`` cannot be rewritten in place whatever the options, or None:
    not an initializer, a graph input or output, not of ``float_types``, or also read where
    ``is_weight_use(node, input_index)`` is false (``rewrite`` names the rewrite in the reason)."""
    if value is None or value.const_value is None or not value.is_initializer():
        return "weight input is not an initializer"
    if value.is_graph_input():
        return f"weight '{value.name}' is also a graph input (it may be overridden at run time)"
    if value.is_graph_output():
        return f"weight '{value.name}' is also a graph output"
    if value.const_value.dtype not in float_types:
        return f"weight '{value.name}' is {value.const_value.dtype.name}, not a float type"
    for use in value.uses():
        if not is_weight_use(use.node, use.idx):
            return (f"weight '{value.name}' is also input {use.idx} of {use.node.op_type} "
                    f"'{node_label(use.node)}'; {rewrite} would change that too")
    return None


def drop_if_unused(value: ir.Value) -> None:
    """Remove an initializer nothing reads any more (graph inputs and outputs stay)."""
    if value.is_initializer() and not value.uses() and not value.is_graph_input() and not value.is_graph_output():
        value.graph.initializers.pop(value.name, None)


def take_over(old: ir.Value, new: ir.Value) -> None:
    """``new`` replaces ``old`` everywhere, graph outputs included, and takes its name, type and shape."""
    new.type, new.shape = old.type, old.shape
    name = old.name
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    old.name = None
    new.name = name


class Names:
    """Value and node names already used anywhere in the model, to make new ones unique."""

    def __init__(self, model: ir.Model):
        self.used: set[str] = set()
        for graph in model.graphs():
            self.used.update(v.name for v in graph.inputs if v.name)
            self.used.update(graph.initializers)
            for node in graph:
                if node.name:
                    self.used.add(node.name)
                self.used.update(v.name for v in node.outputs if v.name)

    def unique(self, base: str) -> str:
        name, i = base, 1
        while name in self.used:
            i += 1
            name = f"{base}{i}"
        self.used.add(name)
        return name
