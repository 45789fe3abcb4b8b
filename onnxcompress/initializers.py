"""New initializers for rewritten weights. Tensors are never changed in place: a rewrite makes a
new tensor in a new initializer, points the node at it, and drops the old one if nothing else
reads it."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


def new_initializer(model: ir.Model, base: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` as an initializer named ``base`` (or ``base2``, ``base3``… if taken)."""
    name, n = base, 1
    while name in model.graph.initializers:
        n += 1
        name = f"{base}{n}"
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(np.ascontiguousarray(array), name=name))
    model.graph.register_initializer(value)
    return value


def replace_constant_input(model: ir.Model, node: ir.Node, index: int, array: np.ndarray, suffix: str) -> ir.Value:
    """Feed input ``index`` of ``node`` from a new initializer holding ``array``."""
    old = node.inputs[index]
    new = new_initializer(model, f"{old.name}{suffix}", array)
    node.replace_input_with(index, new)
    if not old.uses() and old.is_initializer() and not old.is_graph_input() and not old.is_graph_output():
        del model.graph.initializers[old.name]
    return new


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
