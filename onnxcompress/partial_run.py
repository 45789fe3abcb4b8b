"""Run a rewritten model only where it differs from a reference model, reusing cached activations.

Every tensor of the reference model is computed once per feed (one onnxruntime run with all of
them as outputs). For a candidate model, a tensor is *the same* when the reference has a tensor
of that name computed the same way: same op, domain and attributes, from the same inputs,
recursively down to graph inputs and initializers of equal contents (a structural signature).
The candidate is then cut at the same tensors its changed nodes read: those become graph inputs
fed from the cache, the unchanged nodes are dropped, and onnxruntime runs what is left. The
outputs are exactly what the whole candidate computes (same kernels on the same values), up to
the float differences onnxruntime's fusions make at the cut; a candidate that cannot be cut (a
cut tensor without a known type, subgraph attributes) runs whole.
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import onnx_ir as ir

from onnxcompress.runtime import make_session, with_extra_outputs

logger = logging.getLogger(__name__)


def signatures(model: ir.Model) -> dict[str, str]:
    """Tensor name -> structural signature, for every named value of the main graph."""
    sig: dict[int, str] = {}
    out: dict[str, str] = {}
    for value in model.graph.inputs:
        sig[id(value)] = _digest(("input", value.name))
    for value in model.graph.initializers.values():
        sig[id(value)] = _tensor_digest(value)
    for node in model.graph:  # graph order is topological
        node_sig = _node_digest(node, sig)
        for i, value in enumerate(node.outputs):
            sig[id(value)] = _digest((node_sig, i))
    for value in [*model.graph.inputs, *model.graph.initializers.values(), *(v for n in model.graph for v in n.outputs)]:
        if value.name and id(value) in sig:
            out[value.name] = sig[id(value)]
    return out


def _digest(obj) -> str:
    return hashlib.blake2b(repr(obj).encode(), digest_size=16).hexdigest()


def _tensor_digest(value: ir.Value) -> str:
    tensor = value.const_value
    if tensor is None:
        return _digest(("unknown initializer", value.name, id(value)))
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((tensor.dtype, tuple(tensor.shape))).encode())
    h.update(tensor.tobytes())
    return h.hexdigest()


def _node_digest(node: ir.Node, sig: dict[int, str]) -> str:
    attrs = []
    for name, attr in sorted(node.attributes.items()):
        if attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
            return _digest(("subgraph node", id(node)))  # never the same: not cut through
        if attr.type in (ir.AttributeType.TENSOR, ir.AttributeType.TENSORS):
            tensors = attr.value if attr.type == ir.AttributeType.TENSORS else [attr.value]
            attrs.append((name, tuple(hashlib.blake2b(t.tobytes(), digest_size=16).hexdigest() for t in tensors)))
        else:
            attrs.append((name, repr(attr.value)))
    inputs = tuple(sig.get(id(v), _digest(("unknown", id(v)))) if v is not None else "" for v in node.inputs)
    return _digest((node.domain, node.op_type, node.overload, tuple(attrs), inputs))


class CachedRunner:
    """The reference model's outputs on ``feeds``, and candidates run from its cached activations."""

    def __init__(self, model: ir.Model, feeds: list[dict], threads: int = 2):
        self.feeds = feeds
        self.threads = threads
        self.output_names = [v.name for v in model.graph.outputs]
        self.signatures = signatures(model)
        names = [v.name for n in model.graph for v in n.outputs if v.name]
        session = make_session(with_extra_outputs(model, names), threads)
        all_names = [o.name for o in session.get_outputs()]
        self.cache = [dict(zip(all_names, session.run(all_names, feed))) for feed in feeds]
        self.reference = [{n: c[n] for n in self.output_names} for c in self.cache]

    def run(self, model: ir.Model) -> list[dict[str, np.ndarray]]:
        """The candidate's outputs (by the reference's output names) on every feed. ``model`` is
        cut in place: the caller must not use it afterwards."""
        cut = self._cut(model)
        if cut is None:
            session = make_session(model, self.threads)
            names = [o.name for o in session.get_outputs()]
            return [dict(zip(names, session.run(names, feed))) for feed in self.feeds]
        computed, fed = cut
        if not computed:
            return [{n: c[n] for n in self.output_names} for c in self.cache]
        session = make_session(model, self.threads)
        results = []
        for feed, cache in zip(self.feeds, self.cache):
            inputs = {n: (feed[n] if n in feed else cache[n]) for n in fed}
            values = dict(zip(computed, session.run(computed, inputs)))
            results.append({n: values[n] if n in values else cache[n] for n in self.output_names})
        return results

    def _cut(self, model: ir.Model):
        """Rewrite ``model`` into the part that differs; (outputs it computes, inputs it reads),
        or None when it has to run whole."""
        graph = model.graph
        if [v.name for v in graph.outputs] != self.output_names:
            return None
        mine = signatures(model)
        same = {name for name, s in mine.items() if self.signatures.get(name) == s}
        changed = [n for n in graph if not all(v.name in same for v in n.outputs)]
        cut_values = []
        for node in changed:
            for value in node.inputs:
                if value is None or value.is_initializer() or value.name not in same or value in cut_values:
                    continue
                if value.is_graph_input():
                    cut_values.append(value)
                    continue
                if value.type is None:
                    logger.debug("cannot cut at %s: no type", value.name)
                    return None
                cut_values.append(value)
        outputs = [v for v in graph.outputs if v.name not in same]
        if not outputs:
            return [], []
        inputs = []
        for value in cut_values:
            if value.is_graph_input():
                inputs.append(value)
                continue
            fresh = ir.Value(name=value.name, type=value.type, shape=value.shape)
            value.name = None
            value.replace_all_uses_with(fresh)
            inputs.append(fresh)
        graph.inputs.clear()
        graph.inputs.extend(inputs)
        graph.outputs.clear()
        graph.outputs.extend(outputs)
        _remove_dead(graph)
        return [v.name for v in outputs], [v.name for v in inputs]


def _remove_dead(graph: ir.Graph) -> None:
    live = {id(v) for v in graph.outputs}
    for node in reversed(list(graph)):
        if any(id(v) in live for v in node.outputs):
            live.update(id(v) for v in node.inputs if v is not None)
        else:
            graph.remove(node, safe=False)
    for name, value in list(graph.initializers.items()):
        if id(value) not in live:
            del graph.initializers[name]
