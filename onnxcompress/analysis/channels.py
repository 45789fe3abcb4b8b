"""Channel groups: which channels of which tensors must be removed together.

Every output channel of a *source* (a Conv, ConvTranspose, Gemm or MatMul with a constant
weight, group 1) is an *atom*. Atoms flow forward through the graph: each tensor that
carries channels gets, along its channel axis, the atom behind each index. Ops that keep
channels (activations, BatchNorm, pooling, Resize, Pad on other axes, depthwise convs with
multiplier 1) pass them on; Add/Sub/Mul/Div of two activations *unify* the atoms at equal
indices (a residual couples both sides); Concat along the channel axis concatenates the
lists, Split and Slice (step 1) cut them; Flatten (or a 2-D Reshape) in front of a Gemm turns channel c into
the block of features c·HW … (c+1)·HW−1. Constants indexed by channel (BatchNorm
parameters, PRelu slopes, per-channel Mul/Add constants, depthwise weights) and weights of
*sinks* (the next Conv/Gemm/MatMul) are recorded as slices to take.

A *unit* is a class of unified atoms: removing it removes one index from every tensor that
carries any of its atoms. Units that reach a graph output, an op this analysis does not
understand, a grouped conv, a normalisation over channels, or a non-channel reshape are
*blocked*, with the reason. A *group* is a set of sources coupled through shared units; a
prune ratio applies per group.

The union-find and the coupling graph are networkx structures.
"""

from __future__ import annotations

import dataclasses
import math
import networkx as nx
import onnx_ir as ir
from networkx.utils import UnionFind

from onnxcompress.analysis import register_analysis
from onnxcompress.pass_base import node_label

# Ops whose output keeps the input's channels, index for index (any axis they act on is
# not the channel axis, or they are elementwise).
ELEMENTWISE_UNARY = {
    "Relu", "LeakyRelu", "Elu", "Selu", "Celu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh",
    "Softplus", "Softsign", "Gelu", "Erf", "Mish", "Swish", "Clip", "Abs", "Neg", "Exp", "Log",
    "Sqrt", "Reciprocal", "Identity", "Dropout", "Cast", "Floor", "Ceil", "Round", "Sign", "Relu6",
    "ThresholdedRelu", "Sin", "Cos",
}
SPATIAL_POOLING = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"}


@dataclasses.dataclass
class Slice:
    """Take the kept indices of a constant input of ``node`` along ``axis``.

    ``atoms[i]`` is the atom behind index i of that axis (atoms may repeat: a Flatten block).
    """

    node: ir.Node
    input_index: int
    axis: int
    atoms: tuple[int, ...]
    role: str  # "source", "param", "sink"


@dataclasses.dataclass
class SplitSizes:
    """A Split along channels: its sizes shrink with the atoms removed from each piece."""

    node: ir.Node
    pieces: list[tuple[int, ...]]


@dataclasses.dataclass
class SliceFix:
    """A Slice along channels (step 1): its start and end move with the atoms removed before them."""

    node: ir.Node
    axis_position: int  # index into the starts/ends/axes inputs
    atoms: tuple[int, ...]  # the input's atoms
    start: int
    end: int


@dataclasses.dataclass
class ReshapeFix:
    """A Reshape to [N, features] whose target gives the feature count explicitly."""

    node: ir.Node
    atoms: tuple[int, ...]


@dataclasses.dataclass
class GroupFix:
    """A depthwise conv: its ``group`` attribute is its channel count."""

    node: ir.Node
    atoms: tuple[int, ...]


@dataclasses.dataclass
class Source:
    node: ir.Node
    atoms: tuple[int, ...]
    weight_axis: int  # the output-channel axis of the weight

    @property
    def label(self) -> str:
        return node_label(self.node)


@dataclasses.dataclass
class ChannelGroups:
    sources: list[Source]
    slices: list[Slice]
    splits: list[SplitSizes]
    reshapes: list[ReshapeFix]
    depthwise: list[GroupFix]
    channel_slices: list[SliceFix]
    tensors: dict[str, tuple[int, tuple[int, ...]]]  # tensor name -> (axis, atoms)
    unions: UnionFind
    blocked: dict[int, str]  # unit root -> reason
    refusals: list[tuple[ir.Node, str]]  # would-be sources whose channels cannot be removed
    groups: list[list[int]]  # each group: the unit roots of coupled sources

    def unit(self, atom: int) -> int:
        return self.unions[atom]

    def sources_of_group(self, group: list[int]) -> list[Source]:
        roots = set(group)
        return [s for s in self.sources if any(self.unit(a) in roots for a in s.atoms)]


@register_analysis("channels")
def channel_groups(model: ir.Model) -> ChannelGroups:
    return _Builder(model).build()


class _Builder:
    def __init__(self, model: ir.Model):
        self.model = model
        self.graph = model.graph
        self.next_atom = 0
        self.uf = UnionFind()
        self.blocked_atoms: dict[int, str] = {}
        self.tensors: dict[ir.Value, tuple[int, tuple[int, ...]]] = {}
        self.sources: list[Source] = []
        self.slices: list[Slice] = []
        self.splits: list[SplitSizes] = []
        self.reshapes: list[ReshapeFix] = []
        self.depthwise: list[GroupFix] = []
        self.refusals: list[tuple[ir.Node, str]] = []
        self.channel_slices: list[SliceFix] = []

    # -- atoms -----------------------------------------------------------------------------

    def new_atoms(self, count: int) -> tuple[int, ...]:
        atoms = tuple(range(self.next_atom, self.next_atom + count))
        self.next_atom += count
        for a in atoms:
            self.uf[a]  # register
        return atoms

    def block(self, atoms, reason: str) -> None:
        for a in set(atoms):
            self.blocked_atoms.setdefault(a, reason)

    def unify(self, a: tuple[int, ...], b: tuple[int, ...]) -> None:
        for x, y in zip(a, b):
            self.uf.union(x, y)

    def set_channels(self, value: ir.Value, axis: int, atoms: tuple[int, ...]) -> None:
        self.tensors[value] = (axis, atoms)

    def channels(self, value: ir.Value | None):
        return self.tensors.get(value) if value is not None else None

    # -- walk ------------------------------------------------------------------------------

    def build(self) -> ChannelGroups:
        for node in self.graph:
            self.visit(node)
        for value in self.graph.outputs:
            got = self.channels(value)
            if got:
                self.block(got[1], f"reaches graph output '{value.name}'")
        blocked: dict[int, str] = {}
        for atom, reason in self.blocked_atoms.items():
            blocked.setdefault(self.uf[atom], reason)
        return ChannelGroups(
            self.sources, self.slices, self.splits, self.reshapes, self.depthwise, self.channel_slices,
            {v.name: c for v, c in self.tensors.items()}, self.uf, blocked, self.refusals, self._groups(),
        )

    def _groups(self) -> list[list[int]]:
        coupling = nx.Graph()
        first_source: dict[int, int] = {}
        for i, source in enumerate(self.sources):
            coupling.add_node(("s", i))
            for atom in source.atoms:
                unit = self.uf[atom]
                first_source.setdefault(unit, i)
                coupling.add_edge(("s", i), ("u", unit))
        groups = []
        for component in nx.connected_components(coupling):
            units = sorted(n[1] for n in component if n[0] == "u")
            if units:
                groups.append(units)
        return sorted(groups, key=lambda g: min(first_source[u] for u in g))

    def visit(self, node: ir.Node) -> None:
        self._block_captured(node)
        inputs_with_channels = [(i, self.channels(v)) for i, v in enumerate(node.inputs) if self.channels(v)]
        if node.domain not in ("", "ai.onnx"):
            self.block_inputs(node, f"consumed by {node.op_type} ({node_label(node)}) from domain '{node.domain}'")
            return
        handler = getattr(self, f"_op_{node.op_type}", None)
        if handler is not None:
            try:
                handler(node)
            except UnknownShape as exc:
                self.block_inputs(node, f"{node_label(node)}: {exc}")
        elif node.op_type in ELEMENTWISE_UNARY:
            self.pass_through(node)
        elif node.op_type in SPATIAL_POOLING:
            self._spatial(node)
        elif inputs_with_channels:
            self.block_inputs(node, f"consumed by {node.op_type} ({node_label(node)}), which pruning does not handle")

    def _block_captured(self, node: ir.Node) -> None:
        """Tensors a subgraph reads from the outer scope keep their channels."""
        for attr in node.attributes.values():
            graphs = [attr.value] if attr.type == ir.AttributeType.GRAPH else (
                list(attr.value) if attr.type == ir.AttributeType.GRAPHS else [])
            for graph in graphs:
                for inner in ir.traversal.RecursiveGraphIterator(graph):
                    for value in inner.inputs:
                        got = self.channels(value)
                        if got:
                            self.block(got[1], f"read inside a subgraph of {node_label(node)}")

    def block_inputs(self, node: ir.Node, reason: str) -> None:
        for value in node.inputs:
            got = self.channels(value)
            if got:
                self.block(got[1], reason)

    def pass_through(self, node: ir.Node) -> None:
        got = self.channels(node.inputs[0]) if node.inputs else None
        if got and node.outputs:
            self.set_channels(node.outputs[0], *got)
        # Extra inputs (Clip's min/max) are scalars; anything else would have channels.
        for value in node.inputs[1:]:
            if value is not None and self.channels(value):
                self.block(self.channels(value)[1], f"second input of {node.op_type} ({node_label(node)})")

    def _spatial(self, node: ir.Node) -> None:
        got = self.channels(node.inputs[0])
        if got and got[0] == -_rank(node.inputs[0]) + 1:
            self.set_channels(node.outputs[0], *got)
        elif got:
            self.block(got[1], f"{node.op_type} ({node_label(node)}) on a tensor whose channel axis is not 1")

    # -- sources and sinks -------------------------------------------------------------------

    def _op_Conv(self, node: ir.Node) -> None:
        x, w = node.inputs[0], node.inputs[1]
        group = _int_attr(node, "group", 1)
        shape = _const_shape(w)
        got = self.channels(x)
        if shape is None:
            if got:
                self.block(got[1], f"weight of {node_label(node)} is not a constant")
            return
        c_out, c_in_per_group = shape[0], shape[1]
        rank = len(shape)
        if group == 1:
            if got:
                self._sink(node, 1, 1, got, x)
            self._source(node, c_out, weight_axis=0, out_axis=-rank + 1)
            return
        c_in = c_in_per_group * group
        if c_in_per_group == 1 and c_out == c_in and got:
            # Depthwise, multiplier 1: channel c in is channel c out.
            axis, atoms = got
            self.slices.append(Slice(node, 1, 0, atoms, "param"))
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                self.slices.append(Slice(node, 2, 0, atoms, "param"))
            self.depthwise.append(GroupFix(node, atoms))
            self.set_channels(node.outputs[0], axis, atoms)
            return
        reason = f"grouped conv {node_label(node)} (group={group}) keeps its channel layout"
        self.refusals.append((node, reason))
        if got:
            self.block(got[1], reason)
        atoms = self.new_atoms(c_out)
        self.block(atoms, reason)
        self.set_channels(node.outputs[0], -rank + 1, atoms)

    def _op_ConvTranspose(self, node: ir.Node) -> None:
        x, w = node.inputs[0], node.inputs[1]
        shape = _const_shape(w)
        got = self.channels(x)
        group = _int_attr(node, "group", 1)
        if shape is None or group != 1:
            reason = f"ConvTranspose {node_label(node)} with group={group} or a non-constant weight"
            self.refusals.append((node, reason))
            if got:
                self.block(got[1], reason)
            if shape is not None:
                atoms = self.new_atoms(shape[1] * group)
                self.block(atoms, reason)
                self.set_channels(node.outputs[0], -len(shape) + 1, atoms)
            return
        if got:
            self._sink(node, 1, 0, got, x)
        self._source(node, shape[1], weight_axis=1, out_axis=-len(shape) + 1)

    def _op_Gemm(self, node: ir.Node) -> None:
        a, b = node.inputs[0], node.inputs[1]
        shape = _const_shape(b)
        got = self.channels(a)
        trans_a, trans_b = _int_attr(node, "transA", 0), _int_attr(node, "transB", 0)
        if shape is None or trans_a:
            if got:
                self.block(got[1], f"Gemm {node_label(node)} with transA or a non-constant B")
            return
        if got:
            self._sink(node, 1, 1 if trans_b else 0, got, a)
        n_out = shape[0] if trans_b else shape[1]
        self._source(node, n_out, weight_axis=0 if trans_b else 1, out_axis=-1)

    def _op_MatMul(self, node: ir.Node) -> None:
        a, b = node.inputs[0], node.inputs[1]
        shape = _const_shape(b)
        got = self.channels(a)
        if shape is None or len(shape) != 2:
            # An attention-style MatMul of two activations: channels don't survive it.
            for value in (a, b):
                g = self.channels(value)
                if g:
                    self.block(g[1], f"MatMul {node_label(node)} of two activations")
            return
        if got:
            if got[0] != -1:
                self.block(got[1], f"MatMul {node_label(node)} reads channels on axis {got[0]}, not the last")
            else:
                self._sink(node, 1, 0, got, a)
        self._source(node, shape[1], weight_axis=1, out_axis=-1)

    def _sink(self, node: ir.Node, input_index: int, axis: int, got, value) -> None:
        _, atoms = got
        shape = _const_shape(node.inputs[input_index])
        if shape is None or shape[axis] != len(atoms):
            self.block(atoms, f"{node_label(node)}: weight axis {axis} does not match {len(atoms)} input channels")
            return
        self.slices.append(Slice(node, input_index, axis, atoms, "sink"))

    def _source(self, node: ir.Node, count: int, weight_axis: int, out_axis: int) -> None:
        atoms = self.new_atoms(count)
        self.sources.append(Source(node, atoms, weight_axis))
        self.slices.append(Slice(node, 1, weight_axis, atoms, "source"))
        bias_index = 2
        if len(node.inputs) > bias_index and node.inputs[bias_index] is not None:
            bias_shape = _const_shape(node.inputs[bias_index])
            if node.op_type == "Gemm" and bias_shape is not None and (len(bias_shape) == 0 or bias_shape[-1] == 1):
                pass  # a broadcast scalar bias has no channels
            elif bias_shape is None or bias_shape[-1] != count:
                self.block(atoms, f"bias of {node_label(node)} is not a per-channel constant")
            else:
                self.slices.append(Slice(node, bias_index, len(bias_shape) - 1, atoms, "source"))
        self.set_channels(node.outputs[0], out_axis, atoms)

    # -- per-channel and coupling ops ----------------------------------------------------------

    def _op_BatchNormalization(self, node: ir.Node) -> None:
        got = self.channels(node.inputs[0])
        if not got:
            return
        axis, atoms = got
        if axis != -_rank(node.inputs[0]) + 1 or len(node.outputs) > 1:
            self.block(atoms, f"BatchNormalization {node_label(node)} in training mode or not on axis 1")
            return
        for i in range(1, 5):
            if _const_shape(node.inputs[i]) is None:
                self.block(atoms, f"parameters of {node_label(node)} are not constant")
                return
        for i in range(1, 5):
            self.slices.append(Slice(node, i, 0, atoms, "param"))
        self.set_channels(node.outputs[0], axis, atoms)

    def _op_InstanceNormalization(self, node: ir.Node) -> None:
        self._op_BatchNormalization_like(node, 3)

    def _op_BatchNormalization_like(self, node: ir.Node, count: int) -> None:
        got = self.channels(node.inputs[0])
        if not got:
            return
        axis, atoms = got
        if any(_const_shape(node.inputs[i]) is None for i in range(1, count)):
            self.block(atoms, f"parameters of {node_label(node)} are not constant")
            return
        for i in range(1, count):
            self.slices.append(Slice(node, i, 0, atoms, "param"))
        self.set_channels(node.outputs[0], axis, atoms)

    def _op_PRelu(self, node: ir.Node) -> None:
        got = self.channels(node.inputs[0])
        if not got:
            return
        if not self._per_channel_constant(node, 1, got):
            return
        self.set_channels(node.outputs[0], *got)

    def _per_channel_constant(self, node: ir.Node, index: int, got) -> bool:
        """Record the slice of a broadcast constant operand; False (and block) if impossible."""
        axis, atoms = got
        shape = _const_shape(node.inputs[index])
        if shape is None:
            self.block(atoms, f"operand {index} of {node_label(node)} is neither constant nor coupled")
            return False
        const_axis = len(shape) + axis
        if const_axis < 0 or shape[const_axis] == 1:
            return True  # broadcast over channels: nothing to slice
        if shape[const_axis] != len(atoms):
            self.block(atoms, f"operand {index} of {node_label(node)} does not match the channel count")
            return False
        self.slices.append(Slice(node, index, const_axis, atoms, "param"))
        return True

    def _binary(self, node: ir.Node) -> None:
        if node.op_type == "Where":
            self.block_inputs(node, f"Where ({node_label(node)})")
            return
        a, b = node.inputs[0], node.inputs[1]
        ga, gb = self.channels(a), self.channels(b)
        if ga and gb:
            if ga[0] != gb[0] or len(ga[1]) != len(gb[1]) or _rank(a) != _rank(b):
                self.block(ga[1] + gb[1], f"{node_label(node)} combines differently shaped channel axes")
                return
            self.unify(ga[1], gb[1])
            self.set_channels(node.outputs[0], *ga)
        elif ga or gb:
            got, other = (ga, 1) if ga else (gb, 0)
            value = node.inputs[other]
            if _const_shape(value) is None:
                # The other operand carries no atoms we know: maybe computed from a graph input.
                if _broadcasts_over_channels(value, got[0]):
                    self.set_channels(node.outputs[0], *got)
                else:
                    self.block(got[1], f"operand of {node_label(node)} has channels from no known source")
                return
            if _rank_of_const(value) > _rank(node.inputs[1 - other]):
                self.block(got[1], f"{node_label(node)} broadcasts to a higher rank")
                return
            if self._per_channel_constant(node, other, got):
                self.set_channels(node.outputs[0], *got)

    _op_Add = _op_Sub = _op_Mul = _op_Div = _op_Max = _op_Min = _op_Pow = _op_Where = _binary

    def _op_Concat(self, node: ir.Node) -> None:
        axis = _int_attr(node, "axis", 0)
        gots = [self.channels(v) for v in node.inputs]
        known = [g for g in gots if g]
        if not known:
            return
        rank = _rank(node.inputs[0])
        axis = axis - rank if axis >= 0 else axis
        if all(g and g[0] == axis for g in gots):
            atoms = tuple(a for g in gots for a in g[1])
            self.set_channels(node.outputs[0], axis, atoms)
            return
        for g in known:
            self.block(g[1], f"Concat {node_label(node)} along another axis, or with a part of unknown channels")

    def _op_Split(self, node: ir.Node) -> None:
        got = self.channels(node.inputs[0])
        if not got:
            return
        axis, atoms = got
        split_axis = _int_attr(node, "axis", 0)
        rank = _rank(node.inputs[0])
        split_axis = split_axis - rank if split_axis >= 0 else split_axis
        if split_axis != axis:
            for out in node.outputs:
                self.set_channels(out, axis, atoms)
            return
        sizes = _split_sizes(node, len(atoms))
        if sizes is None:
            self.block(atoms, f"Split {node_label(node)} without constant sizes")
            return
        pieces, start = [], 0
        for out, size in zip(node.outputs, sizes):
            piece = atoms[start : start + size]
            pieces.append(piece)
            self.set_channels(out, axis, piece)
            start += size
        self.splits.append(SplitSizes(node, pieces))

    def _op_Slice(self, node: ir.Node) -> None:
        got = self.channels(node.inputs[0])
        if not got:
            return
        axis, atoms = got
        rank = _rank(node.inputs[0])
        values = [_const_values(node.inputs[i]) if len(node.inputs) > i and node.inputs[i] is not None else None
                  for i in range(1, 5)]
        starts, ends, axes, steps = values
        if starts is None or ends is None or (len(node.inputs) > 3 and node.inputs[3] is not None and axes is None) or (
            len(node.inputs) > 4 and node.inputs[4] is not None and steps is None
        ):
            self.block(atoms, f"Slice {node_label(node)} with non-constant bounds")
            return
        axes = axes if axes is not None else list(range(len(starts)))
        steps = steps if steps is not None else [1] * len(starts)
        hits = [i for i, a in enumerate(axes) if (a - rank if a >= 0 else a) == axis]
        if not hits:
            self.set_channels(node.outputs[0], axis, atoms)
            return
        i = hits[0]
        if steps[i] != 1:
            self.block(atoms, f"Slice {node_label(node)} along channels with step {steps[i]}")
            return
        start, end, _ = slice(starts[i], ends[i]).indices(len(atoms))
        self.channel_slices.append(SliceFix(node, i, atoms, start, end))
        self.set_channels(node.outputs[0], axis, atoms[start:end])

    def _op_Flatten(self, node: ir.Node) -> None:
        got = self.channels(node.inputs[0])
        if not got:
            return
        axis, atoms = got
        rank = _rank(node.inputs[0])
        shape = _static_shape(node.inputs[0])
        if _int_attr(node, "axis", 1) != 1 or axis != -rank + 1 or shape is None:
            self.block(atoms, f"Flatten {node_label(node)} not from axis 1, or with unknown spatial size")
            return
        block = math.prod(shape[2:])
        self.set_channels(node.outputs[0], -1, tuple(a for a in atoms for _ in range(block)))

    def _op_Reshape(self, node: ir.Node) -> None:
        got = self.channels(node.inputs[0])
        if not got:
            return
        axis, atoms = got
        target = _const_values(node.inputs[1])
        shape = _static_shape(node.inputs[0])
        rank = _rank(node.inputs[0])
        # Only [N, C, spatial...] -> [N, features]: channel c becomes a block of features.
        if target is None or shape is None or len(target) != 2 or axis != -rank + 1:
            self.block(atoms, f"reshaped by {node_label(node)} (Reshape)")
            return
        flat = tuple(a for a in atoms for _ in range(math.prod(shape[2:])))
        if target[1] != -1:
            self.reshapes.append(ReshapeFix(node, flat))
        self.set_channels(node.outputs[0], -1, flat)

    def _op_Resize(self, node: ir.Node) -> None:
        got = self.channels(node.inputs[0])
        if not got:
            return
        scales = _const_values(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        sizes = _const_values(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
        axis = got[0] + _rank(node.inputs[0])
        if (scales and scales[axis] != 1.0) or (sizes and sizes[axis] != len(got[1])) or (not scales and not sizes):
            self.block(got[1], f"Resize {node_label(node)} may act on channels")
            return
        self.set_channels(node.outputs[0], *got)

    def _op_Pad(self, node: ir.Node) -> None:
        got = self.channels(node.inputs[0])
        if not got:
            return
        pads = _const_values(node.inputs[1]) if len(node.inputs) > 1 else _ints_attr(node, "pads")
        rank = _rank(node.inputs[0])
        axis = got[0] + rank
        if len(node.inputs) > 3 and node.inputs[3] is not None or pads is None or pads[axis] or pads[axis + rank]:
            self.block(got[1], f"Pad {node_label(node)} may pad channels")
            return
        self.set_channels(node.outputs[0], *got)


# -- helpers ------------------------------------------------------------------------------------


class UnknownShape(Exception):
    """A shape the analysis needs was not inferred; the channels involved are blocked."""


def _int_attr(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return attr.as_int() if attr is not None else default


def _ints_attr(node: ir.Node, name: str):
    attr = node.attributes.get(name)
    return list(attr.as_ints()) if attr is not None else None


def _const_tensor(value: ir.Value | None):
    """The initializer or Constant-node tensor behind ``value``, else None."""
    return ir.convenience.get_const_tensor(value) if value is not None else None


def _const_shape(value: ir.Value | None):
    tensor = _const_tensor(value)
    return tuple(tensor.shape.numpy()) if tensor is not None else None


def _rank_of_const(value: ir.Value) -> int:
    return len(_const_shape(value))


def _const_values(value: ir.Value | None):
    tensor = _const_tensor(value)
    return tensor.numpy().tolist() if tensor is not None else None


def _rank(value: ir.Value) -> int:
    if value.shape is not None:
        return len(value.shape)
    shape = _const_shape(value)
    if shape is not None:
        return len(shape)
    raise UnknownShape(f"rank of '{value.name}' is unknown")


def _static_shape(value: ir.Value):
    if value.shape is None:
        return None
    dims = [d if isinstance(d, int) else str(d) for d in value.shape]
    if any(isinstance(d, str) for d in dims[1:]):
        return None
    return dims


def _broadcasts_over_channels(value: ir.Value, axis: int) -> bool:
    if value.shape is None:
        return False
    dims = list(value.shape)
    index = len(dims) + axis
    return index < 0 or dims[index] == 1


def _split_sizes(node: ir.Node, total: int):
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        values = _const_values(node.inputs[1])
        return [int(v) for v in values] if values is not None else None
    sizes = _ints_attr(node, "split")
    if sizes is not None:
        return sizes
    parts = len(node.outputs)
    if total % parts:
        return None
    return [total // parts] * parts
