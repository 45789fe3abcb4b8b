"""prune-magnitude: zero the smallest weights of Conv/ConvTranspose/Gemm/MatMul initializers."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxcompress.initializers import replace_initializer, weight_refusal
from onnxcompress.options import PassOptions, option
from onnxcompress.pass_base import Candidate, CompressionPass, node_label
from onnxcompress.registry import register
from onnxcompress.sparse_storage import INDEX_BYTES, SPARSE_MIN_OPSET, STORAGE_KEY, STORAGE_SPARSE

WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)
# Tensor metadata asking the save layer to store this initializer as an ONNX sparse tensor.
# COO storage as ONNX requires it: one int64 linear index per stored value.


@dataclasses.dataclass(frozen=True)
class PruneMagnitudeOptions(PassOptions):
    # A per-node sparsity or pattern replaces the other; a per-node pattern also prunes those
    # weights on their own (scope=layer), as N:M groups are always pruned alone.
    exclusive = (("sparsity", "pattern"), ("pattern", "scope"))

    sparsity: float = option(
        0.5, "share of each weight's elements (scope=global: of all eligible weights) that end up zero, "
        "in [0, 1); the count is rounded down"
    )
    scope: Literal["layer", "global"] = option(
        "layer", "one magnitude threshold per weight (layer), or one over all eligible weights (global)"
    )
    min_elements: int = option(1024, "leave weights with fewer elements than this alone")
    pattern: str = option(
        "", "N:M structured sparsity (e.g. 2:4): keep the N largest of every M consecutive weights along "
        "the reduction axis; implies sparsity 1-N/M"
    )
    sparse_storage: bool = option(
        False, "mark pruned weights to be saved as ONNX sparse tensors (Constant sparse_value) where that "
        "is smaller than dense"
    )
    exclude: str = option("", "regular expression: weights of nodes whose name matches are left alone")

    def __post_init__(self):
        if not 0.0 <= self.sparsity < 1.0:
            self.fail("sparsity", f"must lie in [0, 1), got {self.sparsity}")
        if self.min_elements < 0:
            self.fail("min_elements", f"must be at least 0, got {self.min_elements}")
        self.check_pattern("exclude")
        if self.pattern:
            n, m = self._parse_pattern()
            implied = 1.0 - n / m
            if self.sparsity not in (0.5, implied):  # 0.5: the default, i.e. not given
                self.fail("sparsity", f"{self.sparsity} contradicts pattern={self.pattern}, which implies {implied:g}")
            if self.scope == "global":
                self.fail("scope", f"global has no meaning with pattern={self.pattern} "
                          f"(each group of {m} is pruned alone)")

    def _parse_pattern(self) -> tuple[int, int]:
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", self.pattern)
        if match is None or not 0 < int(match[1]) < int(match[2]):
            self.fail("pattern", f"must be 'N:M' with 0 < N < M (e.g. 2:4), got '{self.pattern}'")
        return int(match[1]), int(match[2])

    @property
    def nm(self) -> tuple[int, int] | None:
        """(N, M) of the pattern, or None."""
        return self._parse_pattern() if self.pattern else None

    @property
    def target(self) -> float:
        """The sparsity asked for: the pattern's 1 - N/M, else ``sparsity``."""
        nm = self.nm
        return 1.0 - nm[0] / nm[1] if nm else self.sparsity


@dataclasses.dataclass
class Weight:
    """One prunable weight tensor and the nodes that use it as their weight input."""

    value: ir.Value
    nodes: list[ir.Node]
    axis: int  # reduction axis (N:M groups run along it)
    options: PruneMagnitudeOptions | None = None  # those of its first reader
    own: bool = False  # a per-node override chose them: pruned alone, outside a global threshold

    @property
    def array(self) -> np.ndarray:
        return self.value.const_value.numpy()


@register
class PruneMagnitude(CompressionPass):
    """Zero the smallest-magnitude weights of Conv/ConvTranspose/Gemm/MatMul initializers.

    The weight input (input 1) of each such node, when it is a float initializer of at least
    ``min_elements`` elements, gets its ``floor(sparsity * n)`` smallest |w| set to zero
    (``scope=layer``), or all eligible weights share one threshold chosen so that exactly
    ``floor(sparsity * total)`` of their elements are zero (``scope=global``; ties at the
    threshold are broken by position). ``pattern=N:M`` instead keeps the N largest |w| of
    every M consecutive weights along the reduction axis (Conv: axis 1, ConvTranspose: 0,
    Gemm: 0 or 1 per transB, MatMul: -2), which must be a multiple of M. A weight shared
    by several nodes is one tensor and is pruned once. Biases are never touched. Each
    pruned weight becomes a new tensor in a new initializer of the same name.

    Exact limits: sparsity 0 changes nothing and reports ``modified=False``; weights that
    are already zero stay zero and count towards the target, so a layer ends with
    ``max(zeros before, floor(sparsity * n))`` zeros. Refused, with the reason: weights
    that are graph inputs or outputs, not float, also read by another kind of input,
    too small, excluded, or (with a pattern) of a reduction length not divisible by M.

    ``sparse_storage=true`` marks each weight whose COO form (values + int64 indices,
    as ONNX requires) is smaller than its dense form with tensor metadata
    ``onnxcompress.storage=sparse``. onnx_ir cannot hold sparse tensors, so the model in
    memory stays dense and numerically the same;  saving (``onnxcompress.sparse_storage``)
    writes the marked initializers as ``Constant(sparse_value)`` nodes, which onnxruntime
    densifies when it loads the model (same outputs, bit for bit), and loading turns them
    back into marked dense initializers.

    Per node (``@PATTERN{...}``): ``sparsity`` or ``pattern`` (setting one resets the other),
    or ``skip=true`` to leave the node's weight alone (refused, naming the pattern). A weight
    read by several nodes follows its first reader in graph order and is left alone when any
    reader is skipped. With ``scope=global`` a weight an override matched leaves the global
    threshold and is pruned on its own at its own sparsity (or pattern); the global sparsity
    applies to the elements of the other weights.
    """

    name = "prune-magnitude"
    Options = PruneMagnitudeOptions
    per_node = ("sparsity", "pattern")
    prerequisites = ("lift-constants", "fold-batchnorm")
    lossless = False

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if not self._prunes_anywhere():
            return ir.passes.PassResult(model, modified=False)
        weights = self._eligible(model, record=True)
        masks = self._masks(weights)
        opset_ok = model.opset_imports.get("", 1) >= SPARSE_MIN_OPSET
        if self.options.sparse_storage and not opset_ok:
            self.note(f"sparse storage needs opset >= {SPARSE_MIN_OPSET} (Constant sparse_value); weights stay dense")
        totals = _Totals()
        for weight, mask in zip(weights, masks):
            self._apply(weight, mask, totals, self.options.sparse_storage and opset_ok)
        self._summarise(totals)
        return ir.passes.PassResult(model, modified=totals.changed > 0)

    def candidates(self, model: ir.Model) -> list[Candidate]:
        found = []
        for weight in self._eligible(model, record=False):
            array = weight.array
            node = weight.nodes[0]
            what = (f"weight '{weight.value.name}' {list(array.shape)}: {array.size} elements, "
                    f"{_zero_share(array):.1%} zero now")
            found.append(Candidate(self.name, node_label(node), node.op_type, what))
        return found

    def _prunes_anywhere(self) -> bool:
        """False when the target is 0 for the pass and for every per-node override."""
        return any([self.options.target] + [o.options.target for o in self.overrides if not o.skip])

    # ------------------------------------------------------------------ selection

    def _eligible(self, model: ir.Model, record: bool) -> list[Weight]:
        """The weights this pass may prune; the others are refused (when ``record``)."""
        weights: dict[int, Weight] = {}
        reasons: dict[int, str] = {}
        exclude = re.compile(self.options.exclude) if self.options.exclude else None
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            if node.op_type not in WEIGHT_OPS or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
                continue
            value = node.inputs[1]
            reason = _static_refusal(value)
            if reason is not None and (value is None or value.const_value is None):
                if record:
                    self.refused(node, reason)
                continue
            if reason is None and exclude is not None and exclude.search(node.name or ""):
                reason = f"excluded by exclude={self.options.exclude}"
            if reason is None:
                reason = self.skipped_by_plan(node) or None
            axis = _reduction_axis(node, value.const_value.shape.rank())
            weight = weights.setdefault(id(value), Weight(value, [], axis))
            weight.nodes.append(node)
            if reason is not None:
                reasons.setdefault(id(value), reason)
        eligible = []
        for key, weight in weights.items():
            override = self.override_for(weight.nodes[0])
            weight.own = override is not None
            weight.options = override.options if weight.own and not override.skip else self.options
            reason = reasons.get(key) or self._size_refusal(weight)
            if reason is None:
                eligible.append(weight)
            elif record:
                for node in weight.nodes:
                    self.refused(node, reason)
        return eligible

    def _size_refusal(self, weight: Weight) -> str | None:
        """Why the weight is too small or does not fit the N:M pattern, or None."""
        shape = weight.value.const_value.shape
        size = math.prod(shape.numpy())
        if size < self.options.min_elements:
            return f"only {size} elements (< min_elements={self.options.min_elements})"
        options = weight.options
        if not options.nm:
            return None
        m = options.nm[1]
        axes = {_reduction_axis(node, shape.rank()) for node in weight.nodes}
        if len(axes) > 1:
            return (f"weight '{weight.value.name}' is shared by nodes that reduce over different axes; "
                    f"no {options.pattern} layout fits all")
        if shape[weight.axis] % m:
            return (f"reduction axis {weight.axis} has length {shape[weight.axis]}, "
                    f"not a multiple of {m} (pattern={options.pattern})")
        return None

    # ------------------------------------------------------------------ masks

    def _masks(self, weights: list[Weight]) -> list[np.ndarray]:
        """For each weight, a boolean array: True where the element is set to zero. Under
        ``scope=global`` the weights no override chose share one threshold."""
        shared = [i for i, w in enumerate(weights) if self.options.scope == "global" and not w.own]
        masks: list[np.ndarray | None] = [None] * len(weights)
        if shared:
            together = global_masks([_magnitude(weights[i].array) for i in shared], self.options.sparsity)
            for i, mask in zip(shared, together):
                masks[i] = mask
        for i, w in enumerate(weights):
            if masks[i] is None:
                masks[i] = _own_mask(w)
        return masks

    # ------------------------------------------------------------------ rewriting

    def _apply(self, weight: Weight, mask: np.ndarray, totals: _Totals, sparse_storage: bool) -> None:
        array = weight.array
        before = int(np.count_nonzero(array == 0))
        pruned = array.copy()  # a new array: the old tensor may be shared or memory-mapped
        pruned[mask] = 0
        after = int(np.count_nonzero(pruned == 0))
        changed = after > before
        was_marked = weight.value.const_value.metadata_props.get(STORAGE_KEY) == STORAGE_SPARSE
        mark, stored, storage_text = _storage(array, after, sparse_storage, was_marked)
        totals.add(array.size, before, after, array.nbytes, stored)
        if not changed and mark == was_marked:
            options = weight.options
            reason = (f"already satisfies the {options.pattern} pattern" if options.nm
                      else "sparsity 0 for this weight: left as it is" if options.target == 0.0
                      else f"already {before / array.size:.1%} zero, at or above the target")
            for node in weight.nodes:
                self.refused(node, reason)
            return
        _replace_weight(weight.value, pruned if changed else array, mark)
        totals.changed += 1
        if after == array.size:
            self.note(f"weight '{weight.value.name}' is now entirely zero")
        for node in weight.nodes:
            self.rewrote(node, self._detail(weight, before, after, array.size) + storage_text)

    def _detail(self, weight: Weight, before: int, after: int, size: int) -> str:
        text = f"sparsity {before / size:.1%} -> {after / size:.1%} ({after} of {size} zero"
        if weight.options.nm:
            text += f", {weight.options.pattern} along axis {weight.axis}"
        text += ")"
        if len(weight.nodes) > 1:
            text += f"; weight '{weight.value.name}' shared by {len(weight.nodes)} nodes, pruned once"
        return text

    def _summarise(self, totals: _Totals) -> None:
        if not totals.elements:
            return
        self.note(f"{totals.changed} weights rewritten; their sparsity {totals.zeros_before / totals.elements:.1%} -> "
                  f"{totals.zeros_after / totals.elements:.1%} ({totals.zeros_after} of {totals.elements} zero)")
        if self.options.sparse_storage:
            delta = totals.stored - totals.dense
            self.note(f"file size with sparse storage (on save): {totals.dense} B -> {totals.stored} B of these "
                      f"weights ({delta:+d} B) when saved; the in-memory model stays dense")
        else:
            self.note(f"file size unchanged ({totals.dense} B of these weights stay dense); "
                      "sparse_storage=true or pack would shrink it")


@dataclasses.dataclass
class _Totals:
    elements: int = 0
    zeros_before: int = 0
    zeros_after: int = 0
    dense: int = 0
    stored: int = 0
    changed: int = 0

    def add(self, elements: int, before: int, after: int, dense: int, stored: int) -> None:
        self.elements += elements
        self.zeros_before += before
        self.zeros_after += after
        self.dense += dense
        self.stored += stored


# ---------------------------------------------------------------------- helpers


def _storage(array: np.ndarray, zeros: int, sparse_storage: bool, was_marked: bool) -> tuple[bool, int, str]:
    """Whether to mark the weight for sparse storage, the bytes it will take, and a report text."""
    dense, coo = array.nbytes, _coo_bytes(zeros, array)
    if not sparse_storage:
        return was_marked, dense, ""  # a mark set by an earlier run is kept (and rechecked on save)
    if coo < dense:
        return True, coo, f"; sparse storage {dense} B -> {coo} B"
    return False, dense, f"; kept dense: sparse storage would take {coo} B >= {dense} B"


def _static_refusal(value: ir.Value | None) -> str | None:
    """Why the weight input ``value`` cannot be pruned whatever the options, or None."""
    return weight_refusal(value, FLOAT_TYPES, lambda node, index: node.op_type in WEIGHT_OPS and index == 1, "pruning")


def _reduction_axis(node: ir.Node, rank: int) -> int:
    """The axis of the weight that the node sums over (where N:M groups lie)."""
    if node.op_type == "Conv":
        return 1
    if node.op_type == "ConvTranspose":
        return 0
    if node.op_type == "Gemm":
        attr = node.attributes.get("transB")
        return 1 if attr is not None and attr.as_int() else 0
    return rank - 2 if rank >= 2 else 0  # MatMul: [..., K, N]


def _own_mask(weight: Weight) -> np.ndarray:
    """The weight pruned alone: its N:M pattern, else its own sparsity."""
    nm = weight.options.nm
    if nm:
        return nm_mask(_magnitude(weight.array), weight.axis, *nm)
    return layer_mask(_magnitude(weight.array), weight.options.sparsity)


def _magnitude(array: np.ndarray) -> np.ndarray:
    """|array| in float32 (float64 for double weights), so that all dtypes compare."""
    dtype = np.float64 if array.dtype == np.float64 else np.float32
    return np.abs(array.astype(dtype, copy=False))


def _zero_share(array: np.ndarray) -> float:
    return float(np.count_nonzero(array == 0)) / array.size if array.size else 0.0


def layer_mask(magnitude: np.ndarray, sparsity: float) -> np.ndarray:
    """True at exactly the ``floor(sparsity * n)`` smallest entries (zeros come first)."""
    flat = magnitude.ravel()
    k = int(math.floor(sparsity * flat.size))
    mask = np.zeros(flat.size, dtype=bool)
    if k > 0:
        mask[np.argpartition(flat, k - 1)[:k]] = True
    return mask.reshape(magnitude.shape)


def global_masks(magnitudes: list[np.ndarray], sparsity: float) -> list[np.ndarray]:
    """One threshold over all tensors: exactly ``floor(sparsity * total)`` entries are True.

    Everything strictly below the k-th smallest magnitude is pruned; ties at it are pruned
    in order (tensor by tensor, row-major) until the count is reached.
    """
    dtype = np.result_type(*magnitudes)
    everything = np.concatenate([m.ravel().astype(dtype, copy=False) for m in magnitudes])
    k = int(math.floor(sparsity * everything.size))
    if k == 0:
        return [np.zeros(m.shape, dtype=bool) for m in magnitudes]
    threshold = np.partition(everything, k - 1)[k - 1]
    mask = everything < threshold
    ties = np.flatnonzero(everything == threshold)
    mask[ties[: k - int(np.count_nonzero(mask))]] = True
    del everything
    ends = np.cumsum([m.size for m in magnitudes])[:-1]
    return [part.reshape(m.shape) for part, m in zip(np.split(mask, ends), magnitudes)]


def nm_mask(magnitude: np.ndarray, axis: int, n: int, m: int) -> np.ndarray:
    """True at the M-N smallest of every M consecutive entries along ``axis`` (ties: later ones)."""
    moved = np.moveaxis(magnitude, axis, -1)
    groups = moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m)
    order = np.argsort(-groups, axis=-1, kind="stable")  # largest first, ties in position order
    drop = np.zeros(groups.shape, dtype=bool)
    np.put_along_axis(drop, order[..., n:], True, axis=-1)
    return np.moveaxis(drop.reshape(moved.shape), -1, axis)


def _coo_bytes(zeros: int, array: np.ndarray) -> int:
    """Bytes of the ONNX COO form: each non-zero value plus its int64 linear index."""
    return (array.size - zeros) * (array.itemsize + INDEX_BYTES)


def _replace_weight(old: ir.Value, array: np.ndarray, sparse: bool) -> None:
    """A new tensor in a new initializer of the same name takes the old one's place."""
    metadata = {k: v for k, v in old.const_value.metadata_props.items() if k != STORAGE_KEY}
    if sparse:
        metadata[STORAGE_KEY] = STORAGE_SPARSE
    replace_initializer(old, array, metadata)
