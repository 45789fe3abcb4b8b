"""split-depthwise: a k×k Conv becomes a depthwise k×k Conv (multiplier m) and a pointwise 1×1 Conv."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from onnxcompress import conv_split as cs
from onnxcompress.options import PassOptions, option
from onnxcompress.pass_base import node_label
from onnxcompress.registry import register


@dataclasses.dataclass(frozen=True)
class SplitDepthwiseOptions(PassOptions):
    exclusive = (("multiplier", "energy"),)

    multiplier: int = option(
        0, "depthwise filters per input channel (m); 0 chooses the fewest that keep `energy`"
    )
    energy: float = option(
        0.99, "share of the squared singular values of the per-channel N×k² slices to keep, in (0, 1]; "
        "1 keeps the largest numerical rank of a slice (exact)"
    )
    exclude: str = option("", "regular expression: Convs whose node name matches are left alone")
    min_params: int = option(0, "leave Convs with fewer weight parameters than this alone")

    def __post_init__(self):
        if self.multiplier < 0:
            self.fail("multiplier", f"must be 0 (choose by energy) or a positive count, got {self.multiplier}")
        cs.validate_common(self, self.energy, self.exclude, self.min_params)


# ---------------------------------------------------------------------------- the arithmetic


def channel_slices(weight: np.ndarray) -> np.ndarray:
    """W (N×C×k...) → the C slices W[:, c] flattened to N×K (K = prod(k)): a C×N×K array (float64)."""
    n, c = weight.shape[:2]
    return np.asarray(weight, np.float64).reshape(n, c, -1).transpose(1, 0, 2)


def depthwise_factors(weight: np.ndarray, multiplier: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The depthwise and pointwise kernels and the per-channel singular values (C×min(N, K)).

    Per input channel c, W_c = W[:, c] (N×K) ≈ P_c·Q_c by its rank-m SVD, balanced
    (P_c = U·√s, Q_c = √s·Vᵀ). Depthwise filter c·m + j is Q_c[j] reshaped to the kernel
    (C·m × 1 × k...); pointwise weight [n, c·m + j] = P_c[n, j] (N × C·m × 1...). Exact when
    m ≥ the rank of every slice, so always at m = min(N, K); a multiplier beyond min(N, K) gets
    zero filters.
    """
    n, c, *kernel = weight.shape
    slices = channel_slices(weight)
    u, s, vt = cs.svd(slices)  # (C,N,r), (C,r), (C,r,K)
    keep = min(multiplier, s.shape[1])
    root = np.sqrt(s[:, :keep])
    p = np.zeros((c, n, multiplier))
    q = np.zeros((c, multiplier, slices.shape[2]))
    p[:, :, :keep] = u[:, :, :keep] * root[:, None, :]
    q[:, :keep] = root[:, :, None] * vt[:, :keep]
    depthwise = q.reshape(c * multiplier, 1, *kernel)
    pointwise = p.transpose(1, 0, 2).reshape(n, c * multiplier, *([1] * len(kernel)))
    return depthwise, pointwise, s


def compose(depthwise: np.ndarray, pointwise: np.ndarray, channels: int) -> np.ndarray:
    """The kernel the pair computes: W[n, c] = Σ_j pointwise[n, c·m + j]·depthwise[c·m + j]."""
    n = pointwise.shape[0]
    m = depthwise.shape[0] // channels
    kernel = depthwise.shape[2:]
    q = depthwise.reshape(channels, m, -1)
    p = pointwise.reshape(n, channels, m)
    return np.einsum("ncj,cjk->nck", p, q).reshape(n, channels, *kernel)


def split_costs(geom: cs.Geometry, n: int, c: int, m: int) -> tuple[int, int, int, int, bool]:
    """(params before, after, MACs before, after, exact): weights C·m·K + N·C·m against N·C·K;
    both convs run at the output resolution, so MACs are those times the output positions
    (per output position, ``exact`` False, when the output size is unknown)."""
    k = cs.product(geom.kernel)
    before, after = n * c * k, c * m * k + n * c * m
    out = geom.out_spatial
    if all(s is not None for s in out):
        positions = cs.product(out)
        return before, after, before * positions, after * positions, True
    return before, after, before, after, False


# ---------------------------------------------------------------------------- planning


@dataclasses.dataclass
class _Plan:
    node: ir.Node
    geom: cs.Geometry
    weight: np.ndarray
    multiplier: int
    max_multiplier: int
    numerical_rank: int
    energy: float
    costs: tuple[int, int, int, int, bool]

    def detail(self) -> str:
        c = self.weight.shape[1]
        k = cs.kernel_text(self.geom.kernel)
        p0, p1, m0, m1, exact = self.costs
        macs = "MACs" if exact else "MACs per output position (output size unknown)"
        return (
            f"{k} → depthwise {k} ×{self.multiplier} ({c * self.multiplier} channels) + pointwise: "
            f"m={self.multiplier} of at most {self.max_multiplier} (largest slice rank "
            f"{self.numerical_rank}), energy kept {self.energy:.4f}; parameters {p0} → {p1}, {macs} {m0} → {m1}"
        )


def _structure_reason(node: ir.Node) -> str:
    if reason := cs.conv_reason(node):
        return reason
    shape = tuple(node.inputs[1].const_value.shape)
    if len(shape) < 3:
        return f"the weight is {len(shape)}-D, not N×C×k..."
    group = node.attributes.get_int("group", 1)
    if group != 1:
        if shape[1] == 1:
            return f"depthwise Conv (group={group}): already depthwise, nothing to split"
        return f"grouped Conv (group={group}): split-depthwise handles group=1 Convs only"
    if all(k == 1 for k in shape[2:]):
        return f"a {cs.kernel_text(shape[2:])} kernel is already pointwise"
    return ""


def _plan(node: ir.Node, options: SplitDepthwiseOptions) -> _Plan | str:
    if reason := cs.excluded(node, options.exclude):
        return reason
    if reason := _structure_reason(node):
        return reason
    weight = node.inputs[1].const_value.numpy()
    if weight.size < options.min_params:
        return f"its weight has {weight.size} parameters, fewer than min_params={options.min_params}"
    geom = cs.geometry(node, weight.shape[2:])
    if isinstance(geom, str):
        return geom
    n, c = weight.shape[:2]
    k = cs.product(geom.kernel)
    s = cs.svd(channel_slices(weight), compute_uv=False)  # C × min(N, K)
    limit = max(cs.numerical_rank(row, (n, k), weight.dtype) for row in s)
    if limit == 0:
        return "its weight is all zeros"
    squared = np.sum(s**2, axis=0)  # energy of the j-th term, summed over channels
    m = options.multiplier or cs.rank_for_energy(squared, options.energy, limit)
    costs = split_costs(geom, n, c, m)
    p0, p1, m0, m1, exact = costs
    if p1 >= p0 or m1 >= m0:
        kt = cs.kernel_text(geom.kernel)
        macs = "MACs" if exact else "MACs per output position (output size unknown)"
        beyond = f"; and m={m} exceeds min(N, k²) = {s.shape[1]}" if m > s.shape[1] else ""
        return (
            f"splitting the {kt} conv into depthwise {kt} with multiplier m={m} + pointwise would not "
            f"shrink it: parameters {p0} → {p1}, {macs} {m0} → {m1}{beyond}"
        )
    if m > s.shape[1]:
        return f"m={m} exceeds min(N, k²) = {s.shape[1]}"
    return _Plan(node, geom, weight, m, s.shape[1], limit, cs.kept_energy(squared, m), costs)


# ---------------------------------------------------------------------------- the rewrite


def _chain(node: ir.Node, geom: cs.Geometry, weight: np.ndarray, m: int) -> list[cs.NewConv]:
    depthwise, pointwise, _ = depthwise_factors(weight, m)
    c = weight.shape[1]
    dims = geom.dims
    attrs = {"kernel_shape": list(geom.kernel), "strides": list(geom.strides),
             "dilations": list(geom.dilations), "group": c}
    if geom.auto_pad in ("SAME_UPPER", "SAME_LOWER", "VALID") and geom.pads is None:
        attrs["auto_pad"] = geom.auto_pad  # same kernel, strides, dilations: same padding
    else:
        attrs["pads"] = list(geom.pads)
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    mid_shape = cs.shape_of(cs.batch_dim(node.inputs[0]), c * m, geom.out_spatial)
    return [
        cs.NewConv("_split_dw", depthwise, attrs, shape=mid_shape),
        cs.NewConv("_split_pw", pointwise, {"kernel_shape": [1] * dims, "group": 1}, bias=bias),
    ]


def split_conv(model: ir.Model, node: ir.Node, multiplier: int) -> list[ir.Node]:
    """Split ``node`` with ``multiplier`` whatever it costs (for tests and experiments); the pass
    adds the refusal rules. Raises ValueError when the Conv cannot be split at all."""
    geom = _structure_reason(node) or cs.geometry(node, tuple(node.inputs[1].const_value.shape[2:]))
    if isinstance(geom, str):
        raise ValueError(f"{node_label(node)}: {geom}")  # noqa: TRY004 (a bad node, not a bad type)
    weight = node.inputs[1].const_value.numpy()
    return cs.replace_conv(node, _chain(node, geom, weight, multiplier), cs.Names(model))


@register
class SplitDepthwise(cs.ConvSplitPass):
    """Split a k×k Conv C→N into a depthwise k×k Conv (multiplier m) and a pointwise 1×1 Conv.

    Per input channel c the slice W[:, c] (N×k², k² = the kernel's size) is truncated by SVD
    to rank m, W_c ≈ P_c·Q_c: the depthwise Conv (group=C, C·m output channels, the original
    strides, pads, dilations and auto_pad) holds the rows of Q_c as filters c·m … c·m+m−1, the
    pointwise Conv (C·m → N, with the original bias) holds P_c in its columns c·m … c·m+m−1.
    Exact when m is at least every slice's rank (always at m = min(N, k²)); 1-D and 3-D
    kernels split the same way.

    m is ``multiplier``, or the fewest terms keeping ``energy`` of ‖W‖² summed over channels.
    Refused, with the numbers: a pair costing at least as many weight parameters (C·m·k² + N·C·m ≥
    N·C·k², so the exact m = min(N, k²) never pays) or MACs as the original; 1×1 kernels (already
    pointwise); depthwise and grouped Convs; non-constant or shared weights; names matching
    ``exclude``; weights smaller than ``min_params``.

    Per node (``@PATTERN{...}``): ``multiplier`` or ``energy`` (setting one resets the other to
    its default for those Convs: ``multiplier`` 0 chooses by energy), or ``skip=true`` to leave
    them alone (refused, naming the pattern).
    """

    name = "split-depthwise"
    Options = SplitDepthwiseOptions
    per_node = ("multiplier", "energy")
    prerequisites = ("lift-constants", "fold-batchnorm", "infer-shapes")
    lossless = False

    what = "depthwise + pointwise"

    def plan(self, node: ir.Node, options: SplitDepthwiseOptions):
        return _plan(node, options)

    def chain(self, node: ir.Node, plan) -> list[cs.NewConv]:
        return _chain(node, plan.geom, plan.weight, plan.multiplier)
