"""prune-channels: remove whole output channels / neurons, shrinking every tensor they flow through."""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from typing import Literal

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from onnxcompress.analysis.channels import ChannelGroups, Slice, channel_groups
from onnxcompress.channel_importance import importance_of_units
from onnxcompress.errors import CalibrationError
from onnxcompress.initializers import new_initializer, replace_constant_input
from onnxcompress.options import PassOptions, option
from onnxcompress.pass_base import Candidate, CompressionPass, node_label
from onnxcompress.reconstruct import reconstruct_sinks, reconstruction_targets
from onnxcompress.registry import register

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PruneChannelsOptions(PassOptions):
    ratio: float = option(0.3, "share of each group's channels to remove, in [0, 1)")
    importance: Literal["l1", "l2", "apoz", "lasso"] = option(
        "l1", "how channels are ranked: weight norms (l1, l2), share of zero activations (apoz), "
        "or Lasso channel selection on calibration data (lasso)"
    )
    scope: Literal["layer", "global"] = option("layer", "rank within each group, or across all groups")
    min_channels: int = option(1, "never keep fewer channels than this in a group")
    round_to: int = option(1, "keep a multiple of this many channels (8 or 16 suit fast kernels)")
    reconstruct: bool = option(False, "refit the next layers' weights by least squares on calibration data")
    exclude: str = option("", "regular expression: sources whose node name matches keep all channels")

    def __post_init__(self):
        if not 0.0 <= self.ratio < 1.0:
            self.fail("ratio", f"must lie in [0, 1), got {self.ratio}")
        if self.min_channels < 1:
            self.fail("min_channels", f"must be at least 1, got {self.min_channels}")
        if self.round_to < 1:
            self.fail("round_to", f"must be at least 1, got {self.round_to}")
        self.check_pattern("exclude")


@register
class PruneChannels(CompressionPass):
    """Remove whole output channels / neurons and the matching input slices of every consumer.

    Channel groups (analysis "channels") say which channels must go together: through
    BatchNorm, activations, residual Add/Mul, Concat, Split, Slice, pooling, Resize, Pad,
    depthwise convs and Flatten/Reshape into a Gemm. In each group the ``ratio`` least
    important channels are removed (``scope=global``: the least important over all groups,
    each group's importances normalised by its mean). Weights of the sources, per-channel
    constants and the next layers' input slices are cut; shapes shrink for real.

    Exact limit: removing channels whose source weights and bias are all zero (and whose
    downstream constants add nothing) changes no output; ratio 0 changes nothing and reports
    ``modified=False``. Groups reaching a graph output or an op the analysis does not know
    are refused, with the reason. With ``reconstruct=true`` each consumer's remaining weights
    are refitted by least squares (He et al. 2017) so its output on the calibration data
    matches the original's; the fit is pulled towards the pruned weights with a strength
    chosen on held-out calibration feeds, and a layer keeps its weights when no refit helps.
    A consumer whose output is added to a residual branch is fitted to the original sum less
    that branch as pruned (so it absorbs the drift before it), weighted per token as a
    LayerNormalization reading the sum would weigh it.

    Per node (``@PATTERN{...}``): ``ratio``, ``min_channels`` and ``round_to`` of a channel
    group, or ``skip=true``. A group is matched by its sources, the Conv/Gemm/MatMul nodes
    whose weights lose output channels: the first source in graph order that an override
    matches decides the group's options, and ``skip=true`` on any source leaves the whole
    group alone (each source refused, naming the pattern). With ``scope=global`` a group an
    override matched leaves the global ranking and is pruned on its own at its own ratio (a
    skipped group leaves it too); the global ratio applies to the channels of the other groups.
    """

    name = "prune-channels"
    Options = PruneChannelsOptions
    per_node = ("ratio", "min_channels", "round_to")
    prerequisites = ("lift-constants", "fold-batchnorm", "infer-shapes")
    lossless = False

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if not self._prunes_anywhere():
            return ir.passes.PassResult(model, modified=False)
        needs_data = self.options.importance in ("apoz", "lasso") or self.options.reconstruct
        if needs_data and not self.context.calibration:
            raise CalibrationError(
                f"prune-channels with importance={self.options.importance}"
                f"{' and reconstruct=true' if self.options.reconstruct else ''} needs calibration data (--calib)"
            )
        groups = channel_groups(model)  # computed here, not cached: _exclude marks it up
        self._exclude(groups)
        plans = [self._group_plan(groups, units) for units in groups.groups]
        importance = importance_of_units(model, groups, self.options.importance, self.context.calibration)
        removed = self._select(groups, importance, plans)
        self._record(groups, removed, plans)
        if not removed:
            return ir.passes.PassResult(model, modified=False)
        feeds = self.context.calibration
        targets = reconstruction_targets(model, groups, removed, feeds) if self.options.reconstruct else None
        apply_pruning(model, groups, removed)
        if self.options.reconstruct:
            for node, detail in reconstruct_sinks(model, groups, removed, targets, feeds):
                self.rewrote(node, detail)
        return ir.passes.PassResult(model, modified=True)

    def candidates(self, model: ir.Model) -> list[Candidate]:
        """Each channel group with prunable channels, named by its first source (as the pass
        would see the model: after its prerequisites, run here on a copy)."""
        from onnxcompress.registry import get_pass

        try:
            model = model.clone()
            for name in self.prerequisites:
                get_pass(name)()(model)
            groups = channel_groups(model)
        except Exception as exc:  # shapes missing on an un-normalised model: say so, don't fail inspect
            logger.info("prune-channels candidates unavailable: %s", exc)
            return []
        out = []
        for units in groups.groups:
            free = sum(u not in groups.blocked for u in units)
            sources = groups.sources_of_group(units)
            if free and sources:
                first = sources[0].node
                coupled = f", coupled with {len(sources) - 1} more" if len(sources) > 1 else ""
                out.append(Candidate(self.name, node_label(first), first.op_type,
                                     f"{free} of {len(units)} channels prunable{coupled}"))
        return out

    def _prunes_anywhere(self) -> bool:
        """False when the ratio is 0 for the pass and for every per-node override."""
        ratios = [self.options.ratio] + [o.options.ratio for o in self.overrides if not o.skip]
        return any(ratios)

    def _group_plan(self, groups: ChannelGroups, units: list[int]) -> _GroupPlan:
        """The group's options: skipped when an override skips any of its sources, else those
        of the first source (graph order) that an override matches, else the pass's."""
        sources = groups.sources_of_group(units)
        for source in sources:
            if reason := self.skipped_by_plan(source.node):
                return _GroupPlan(None, reason, own=True)
        chosen = next((o for s in sources if (o := self.override_for(s.node)) is not None), None)
        return _GroupPlan(self.options if chosen is None else chosen.options, "", own=chosen is not None)

    def _exclude(self, groups: ChannelGroups) -> None:
        if not self.options.exclude:
            return
        pattern = re.compile(self.options.exclude)
        for source in groups.sources:
            if pattern.search(source.node.name or ""):
                for atom in source.atoms:
                    groups.blocked.setdefault(groups.unit(atom), f"excluded by exclude={self.options.exclude}")

    def _select(self, groups: ChannelGroups, importance: dict[int, float], plans: list[_GroupPlan]) -> set[int]:
        """Per group (``scope=layer``, and the groups an override matched): its least important
        free channels, as many as its options allow; the other groups under ``scope=global``
        share one ranking."""
        ranked_globally = self.options.scope == "global"
        removed = set()
        for i, units in enumerate(groups.groups):
            plan = plans[i]
            if plan.options is None or (ranked_globally and not plan.own):
                continue
            candidates = sorted((u for u in units if u not in groups.blocked), key=lambda u: importance[u])
            removed.update(candidates[: self._removable_count(groups, units, plan.options)])
        if ranked_globally:
            removed |= self._select_global(groups, importance, [not p.own for p in plans])
        return removed

    def _select_global(self, groups, importance, ranked: list[bool]) -> set[int]:
        scored = []
        total = 0
        for i, units in enumerate(groups.groups):
            free = [u for u in units if u not in groups.blocked]
            if not free or not ranked[i]:
                continue
            total += len(units)
            mean = float(np.mean([importance[u] for u in units])) or 1.0
            scored += [(importance[u] / mean, u, i) for u in free]
        target = int(math.floor(self.options.ratio * total))
        removed, taken = set(), {i: 0 for i in range(len(groups.groups))}
        limits = {i: self._removable_count(groups, units, self.options, ratio=0.95)
                  for i, units in enumerate(groups.groups)}
        for _, unit, i in sorted(scored):
            if len(removed) >= target:
                break
            if taken[i] < limits[i]:
                removed.add(unit)
                taken[i] += 1
        return removed

    @staticmethod
    def _removable_count(groups: ChannelGroups, units: list[int], options: PruneChannelsOptions,
                         ratio: float | None = None) -> int:
        ratio = options.ratio if ratio is None else ratio
        total = len(units)
        free = sum(u not in groups.blocked for u in units)
        keep = max(total - int(math.floor(ratio * total)), options.min_channels)
        round_to = options.round_to
        keep = min(total, int(math.ceil(keep / round_to) * round_to))
        return max(0, min(free, total - keep))

    def _record(self, groups: ChannelGroups, removed: set[int], plans: list[_GroupPlan]) -> None:
        for node, reason in groups.refusals:
            self.refused(node, reason)
        for units, plan in zip(groups.groups, plans):
            sources = groups.sources_of_group(units)
            gone = sum(u in removed for u in units)
            blocked = {groups.blocked[u] for u in units if u in groups.blocked}
            for source in sources:
                if plan.skip_reason:
                    self.refused(source.node, plan.skip_reason)
                elif gone:
                    self.rewrote(source.node, f"removed {gone} of {len(units)} channels")
                elif blocked:
                    self.refused(source.node, sorted(blocked)[0])
                elif plan.options.ratio == 0.0:
                    self.refused(source.node, "ratio 0 for this group: every channel kept")
                else:
                    self.refused(source.node, "no channel selected at this ratio (min_channels / round_to)")


@dataclasses.dataclass(frozen=True)
class _GroupPlan:
    """How one channel group is pruned: its options (None: left alone, ``skip_reason`` says
    why), and whether a per-node override chose them (``own``: outside a global ranking)."""

    options: PruneChannelsOptions | None
    skip_reason: str
    own: bool


def apply_pruning(model: ir.Model, groups: ChannelGroups, removed: set[int]) -> None:
    """Cut every recorded constant, Split and Reshape so the removed units disappear."""
    for item in groups.slices:
        keep = [i for i, atom in enumerate(item.atoms) if groups.unit(atom) not in removed]
        if len(keep) != len(item.atoms):
            _slice_input(model, item, keep)
    for split in groups.splits:
        sizes = [sum(groups.unit(a) not in removed for a in piece) for piece in split.pieces]
        _set_split_sizes(model, split.node, sizes)
    for fix in groups.channel_slices:
        kept = [groups.unit(a) not in removed for a in fix.atoms]
        start = sum(kept[: fix.start])
        end = start + sum(kept[fix.start : fix.end])
        for index, bound in ((1, start), (2, end)):
            array = fix.node.inputs[index].const_value.numpy().copy()
            array[fix.axis_position] = bound
            replace_constant_input(model, fix.node, index, array, ".pruned")
    for fix in groups.depthwise:
        fix.node.attributes["group"] = ir.AttrInt64("group", sum(groups.unit(a) not in removed for a in fix.atoms))
    for fix in groups.reshapes:
        count = sum(groups.unit(a) not in removed for a in fix.atoms)
        target = fix.node.inputs[1].const_value.numpy().copy()
        target[1] = count
        replace_constant_input(model, fix.node, 1, target, ".pruned")
    _refresh_shapes(model)


def _slice_input(model: ir.Model, item: Slice, keep: list[int]) -> None:
    value = item.node.inputs[item.input_index]
    array = value.const_value.numpy()
    replace_constant_input(model, item.node, item.input_index, np.take(array, keep, axis=item.axis), ".pruned")


def _set_split_sizes(model: ir.Model, node: ir.Node, sizes: list[int]) -> None:
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        replace_constant_input(model, node, 1, np.asarray(sizes, dtype=np.int64), ".pruned")
    elif "split" in node.attributes:
        node.attributes["split"] = ir.AttrInt64s("split", sizes)
    else:  # equal pieces implied by the output count: make the sizes explicit
        if model.opset_imports.get("", 1) >= 13:
            value = new_initializer(model, f"{node.name or 'split'}.sizes", np.asarray(sizes, dtype=np.int64))
            while len(node.inputs) < 2:
                node.resize_inputs(len(node.inputs) + 1)
            node.replace_input_with(1, value)
        else:
            node.attributes["split"] = ir.AttrInt64s("split", sizes)


def _refresh_shapes(model: ir.Model) -> None:
    """Channel counts changed: forget inferred shapes of intermediate tensors, infer again."""
    outputs = set(model.graph.outputs)
    for node in model.graph:
        for value in node.outputs:
            if value not in outputs:
                value.shape = None
    try:
        ShapeInferencePass(data_prop=True)(model)
    except Exception as exc:  # shapes are a convenience here; the model itself is consistent
        logger.info("shape inference after pruning failed: %s", exc)

