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

from onnxcompress.runtime import make_session

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
    """The reference model's tensors on ``feeds``, and other models' tensors computed from them.

    The cache is computed without onnxruntime's graph optimisations, as
    :func:`onnxcompress.activations.capture` computes activations, so a pass that calibrates
    from the cache sees the values it would have computed itself.
    """

    def __init__(self, model: ir.Model, feeds: list[dict], threads: int = 2, model_signatures: dict[str, str] | None = None):
        self.feeds = feeds
        self.threads = threads
        self.output_names = [v.name for v in model.graph.outputs]
        self.signatures = model_signatures if model_signatures is not None else signatures(model)
        names = [v.name for n in model.graph for v in n.outputs if v.name]
        session = make_session(model, threads, optimize=False, extra_outputs=names)
        all_names = [o.name for o in session.get_outputs()]
        self.cache = [dict(zip(all_names, session.run(all_names, feed))) for feed in feeds]
        self.reference = [{n: c[n] for n in self.output_names} for c in self.cache]

    def run(self, model: ir.Model) -> list[dict[str, np.ndarray]]:
        """The candidate's outputs (by the reference's output names) on every feed. ``model`` is
        cut in place: the caller must not use it afterwards."""
        if [v.name for v in model.graph.outputs] != self.output_names:
            return self._run_whole(model, self.output_names, optimize=True)
        return self.compute(model, self.output_names, optimize=True, in_place=True)

    def compute(self, model: ir.Model, names: list[str], optimize: bool = False, in_place: bool = False) -> list[dict[str, np.ndarray]]:
        """``[{name: array} per feed]`` of the named tensors of ``model``: from the cache where
        ``model`` computes them as the reference does, the rest by running only what differs."""
        mine = signatures(model)
        same = {name for name, s in mine.items() if self.signatures.get(name) == s}
        graph_inputs = {v.name for v in model.graph.inputs}
        missing = [n for n in names if n not in same and n not in graph_inputs]
        computed: list[dict] = [{} for _ in self.feeds]
        if missing:
            work = model if in_place else model.clone()
            fed = _cut(work, missing, same)
            if fed is None:
                computed = self._run_whole(model, missing, optimize)
            else:
                session = make_session(work, self.threads, optimize=optimize)
                computed = []
                for feed, cache in zip(self.feeds, self.cache):
                    inputs = {n: (feed[n] if n in feed else cache[n]) for n in fed}
                    computed.append(dict(zip(missing, session.run(missing, inputs))))
        out = []
        for feed, cache, fresh in zip(self.feeds, self.cache, computed):
            out.append({n: fresh[n] if n in fresh else (feed[n] if n in graph_inputs else cache[n]) for n in names})
        return out

    def _run_whole(self, model: ir.Model, names: list[str], optimize: bool) -> list[dict[str, np.ndarray]]:
        session = make_session(model, self.threads, optimize=optimize, extra_outputs=names)
        return [dict(zip(names, session.run(names, feed))) for feed in self.feeds]


def _cut(model: ir.Model, wanted: list[str], same: set[str]) -> list[str] | None:
    """Rewrite ``model`` in place into the part that computes ``wanted`` from tensors in ``same``
    (which become graph inputs); the names it reads, or None when it cannot be cut."""
    graph = model.graph
    by_name = {v.name: v for n in graph for v in n.outputs if v.name}
    if any(n not in by_name for n in wanted):
        return None
    needed = _ancestors(graph, [by_name[n] for n in wanted], same)
    cut_values = []
    for node in needed:
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
    outputs = [by_name[n] for n in wanted]
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
    return [v.name for v in inputs]


def _ancestors(graph: ir.Graph, values: list[ir.Value], same: set[str]) -> list[ir.Node]:
    """The nodes needed to compute ``values`` when every tensor in ``same`` is given."""
    needed, todo = set(), list(values)
    while todo:
        value = todo.pop()
        node = value.producer()
        if node is None or id(node) in needed or (value.name in same and value not in values):
            continue
        needed.add(id(node))
        todo.extend(v for v in node.inputs if v is not None)
    return [n for n in graph if id(n) in needed]


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
