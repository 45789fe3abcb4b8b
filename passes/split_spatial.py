"""split-spatial: a k_h×k_w Conv becomes a k_h×1 Conv then a 1×k_w Conv (spatial SVD)."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from onnxcompress import conv_split as cs
from onnxcompress.options import PassOptions, option
from onnxcompress.pass_base import node_label
from onnxcompress.registry import register


@dataclasses.dataclass(frozen=True)
class SplitSpatialOptions(PassOptions):
    exclusive = (("rank", "energy"),)

    rank: int = option(0, "filters D of the k_h×1 conv; 0 chooses the fewest that keep `energy`")
    energy: float = option(
        0.99, "share of the squared singular values of the reshaped weight to keep, in (0, 1]; "
        "1 keeps the numerical rank (exact)"
    )
    exclude: str = option("", "regular expression: Convs whose node name matches are left alone")
    min_params: int = option(0, "leave Convs with fewer weight parameters than this alone")

    def __post_init__(self):
        if self.rank < 0:
            self.fail("rank", f"must be 0 (choose by energy) or a positive number of filters, got {self.rank}")
        cs.validate_common(self, self.energy, self.exclude, self.min_params)


# ---------------------------------------------------------------------------- the arithmetic


def spatial_matrix(weight: np.ndarray) -> np.ndarray:
    """W[n, c, i, j] → M[(c, i), (n, j)], a (C·k_h) × (N·k_w) matrix (float64)."""
    n, c, kh, kw = weight.shape
    return np.asarray(weight, np.float64).transpose(1, 2, 0, 3).reshape(c * kh, n * kw)


def spatial_factors(weight: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The two kernels of the split and the singular values of M (float64).

    With M = U·S·Vᵀ: ``vertical[d, c, i, 0] = (U_d·√s_d)[(c, i)]`` (D × C × k_h × 1) and
    ``horizontal[n, d, 0, j] = (√s_d·V_d)[(n, j)]`` (N × D × 1 × k_w). Their composition is the
    rank-D truncation of M, so they are exact when D ≥ rank(M). A ``rank`` beyond min(C·k_h,
    N·k_w) gets zero filters for the missing terms.
    """
    n, c, kh, kw = weight.shape
    u, s, vt = cs.svd(spatial_matrix(weight))
    keep = min(rank, s.size)
    root = np.sqrt(s[:keep])
    a = np.zeros((c * kh, rank))
    b = np.zeros((rank, n * kw))
    a[:, :keep] = u[:, :keep] * root
    b[:keep] = root[:, None] * vt[:keep]
    vertical = a.T.reshape(rank, c, kh, 1)
    horizontal = b.reshape(rank, n, kw).transpose(1, 0, 2).reshape(n, rank, 1, kw)
    return vertical, horizontal, s


def compose(vertical: np.ndarray, horizontal: np.ndarray) -> np.ndarray:
    """The k_h×k_w kernel the two convs compute together: W[n,c,i,j] = Σ_d V2[n,d,0,j]·V1[d,c,i,0]."""
    return np.einsum("ndj,dci->ncij", horizontal[:, :, 0, :], vertical[:, :, :, 0])


def split_costs(geom: cs.Geometry, n: int, c: int, rank: int) -> tuple[int, int, int, int, bool]:
    """(params before, after, MACs before, after, exact): weight parameters and MACs per image.

    The k_h×1 conv works on the unpadded input width (the horizontal pads move to the 1×k_w
    conv): MACs D·C·k_h·H_out·W_in + N·D·k_w·H_out·W_out against N·C·k_h·k_w·H_out·W_out.
    When the width is unknown, MACs are per output position in the large-input limit
    (W_in ≈ s_w·W_out) and ``exact`` is False.
    """
    kh, kw = geom.kernel
    before = n * c * kh * kw
    after = rank * c * kh + n * rank * kw
    w_in = geom.in_spatial[1]
    h_out, w_out = geom.out_spatial
    if w_in is not None and h_out is not None and w_out is not None:
        macs_before = before * h_out * w_out
        macs_after = rank * c * kh * h_out * w_in + n * rank * kw * h_out * w_out
        return before, after, macs_before, macs_after, True
    return before, after, before, rank * c * kh * geom.strides[1] + n * rank * kw, False


# ---------------------------------------------------------------------------- planning


@dataclasses.dataclass
class _Plan:
    node: ir.Node
    geom: cs.Geometry
    weight: np.ndarray
    rank: int
    max_rank: int
    numerical_rank: int
    energy: float
    costs: tuple[int, int, int, int, bool]

    def detail(self) -> str:
        kh, kw = self.geom.kernel
        p0, p1, m0, m1, exact = self.costs
        macs = "MACs" if exact else "MACs per output position (input width unknown)"
        return (
            f"{kh}×{kw} → {kh}×1 ({self.rank} filters) + 1×{kw}: D={self.rank} of at most "
            f"{self.max_rank} (numerical rank {self.numerical_rank}), energy kept {self.energy:.4f}; "
            f"parameters {p0} → {p1}, {macs} {m0} → {m1}"
        )


def _structure_reason(node: ir.Node) -> str:
    """Why the Conv is not a group-1, 2-D, splittable Conv with a constant weight ('' if it is)."""
    if reason := cs.conv_reason(node):
        return reason
    shape = tuple(node.inputs[1].const_value.shape)
    if len(shape) == 3:
        return "1-D Conv: a 1-D kernel has nothing to split (split-spatial splits 2-D kernels)"
    if len(shape) == 5:
        return "3-D Conv: split-spatial splits only 2-D kernels"
    if len(shape) != 4:
        return f"the weight is {len(shape)}-D; split-spatial splits only 2-D convolutions"
    group = node.attributes.get_int("group", 1)
    if group != 1:
        if shape[1] == 1:
            return f"depthwise Conv (group={group}): split-spatial handles group=1 Convs only"
        return f"grouped Conv (group={group}): split-spatial handles group=1 Convs only"
    kh, kw = shape[2:]
    if kh == 1 or kw == 1:
        return f"a {kh}×{kw} kernel has nothing to split"
    return ""


def _geometry(node: ir.Node) -> cs.Geometry | str:
    geom = cs.geometry(node, tuple(node.inputs[1].const_value.shape[2:]))
    if isinstance(geom, str):
        return geom
    if geom.pads is None:
        return (
            f"auto_pad={geom.auto_pad} and the input's spatial size is unknown, so the pads cannot "
            "be made explicit for the two convs (run infer-shapes, or give the input a fixed size)"
        )
    return geom


def _plan(node: ir.Node, options: SplitSpatialOptions) -> _Plan | str:
    if reason := cs.excluded(node, options.exclude):
        return reason
    if reason := _structure_reason(node):
        return reason
    weight = node.inputs[1].const_value.numpy()
    if weight.size < options.min_params:
        return f"its weight has {weight.size} parameters, fewer than min_params={options.min_params}"
    geom = _geometry(node)
    if isinstance(geom, str):
        return geom
    n, c = weight.shape[:2]
    s = cs.svd(spatial_matrix(weight), compute_uv=False)
    limit = cs.numerical_rank(s, (c * geom.kernel[0], n * geom.kernel[1]), weight.dtype)
    if limit == 0:
        return "its weight is all zeros"
    squared = s**2
    rank = options.rank or cs.rank_for_energy(squared, options.energy, limit)
    costs = split_costs(geom, n, c, rank)
    p0, p1, m0, m1, exact = costs
    if p1 >= p0 or m1 >= m0:
        kh, kw = geom.kernel
        macs = "MACs" if exact else "MACs per output position (input width unknown)"
        beyond = f"; and D={rank} exceeds the largest useful rank min(C·k_h, N·k_w) = {s.size}" if rank > s.size else ""
        return (
            f"splitting the {kh}×{kw} conv into {kh}×1 with D={rank} filters + 1×{kw} would not shrink it: "
            f"parameters {p0} → {p1}, {macs} {m0} → {m1}{beyond}"
        )
    if rank > s.size:
        return f"D={rank} exceeds the largest useful rank min(C·k_h, N·k_w) = {s.size}"
    return _Plan(node, geom, weight, rank, s.size, limit, cs.kept_energy(squared, rank), costs)


# ---------------------------------------------------------------------------- the rewrite


def _chain(node: ir.Node, geom: cs.Geometry, weight: np.ndarray, rank: int) -> list[cs.NewConv]:
    vertical, horizontal, _ = spatial_factors(weight, rank)
    (kh, kw), (sh, sw), (dh, dw) = geom.kernel, geom.strides, geom.dilations
    top, left, bottom, right = geom.pads
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    h_out = geom.out_size(0)
    mid_shape = cs.shape_of(cs.batch_dim(node.inputs[0]), rank, (h_out, geom.in_spatial[1]))
    return [
        cs.NewConv(
            "_split_v", vertical,
            {"kernel_shape": [kh, 1], "strides": [sh, 1], "dilations": [dh, 1], "pads": [top, 0, bottom, 0], "group": 1},
            shape=mid_shape,
        ),
        cs.NewConv(
            "_split_h", horizontal,
            {"kernel_shape": [1, kw], "strides": [1, sw], "dilations": [1, dw], "pads": [0, left, 0, right], "group": 1},
            bias=bias,
        ),
    ]


def split_conv(model: ir.Model, node: ir.Node, rank: int) -> list[ir.Node]:
    """Split ``node`` at ``rank`` whatever it costs (for tests and experiments); the pass adds the
    refusal rules. Raises ValueError when the Conv cannot be split at all."""
    geom = _structure_reason(node) or _geometry(node)
    if isinstance(geom, str):
        raise ValueError(f"{node_label(node)}: {geom}")  # noqa: TRY004 (a bad node, not a bad type)
    weight = node.inputs[1].const_value.numpy()
    return cs.replace_conv(node, _chain(node, geom, weight, rank), cs.Names(model))


@register
class SplitSpatial(cs.ConvSplitPass):
    """Split a k_h×k_w Conv into a k_h×1 Conv with D filters then a 1×k_w Conv (spatial SVD).

    Jaderberg et al. 2014, scheme 2. The weight W (N×C×k_h×k_w) is reshaped to the
    (C·k_h)×(N·k_w) matrix M[(c, i), (n, j)] = W[n, c, i, j] and truncated by SVD to rank D,
    M ≈ Σ_d (U_d·√s_d)(√s_d·V_d)ᵀ: the first conv (C→D, k_h×1) has the kernels U_d·√s_d,
    the second (D→N, 1×k_w, with the original bias) the kernels √s_d·V_d. Exact when D is the
    rank of M (``energy=1`` keeps the numerical rank). The vertical conv takes the vertical
    stride, dilation and top/bottom pads, the horizontal one the horizontal ones and the
    left/right pads; ``auto_pad=SAME_*`` becomes explicit pads when the input size is known.

    D is ``rank``, or the fewest singular values keeping ``energy`` of ‖W‖². Refused, with the
    numbers: a pair costing at least as many weight parameters (D·C·k_h + N·D·k_w ≥
    N·C·k_h·k_w) or MACs (D·C·k_h·H_out·W_in + N·D·k_w·H_out·W_out, per output position when the
    width is unknown) as the original; 1×k and k×1 kernels; grouped and depthwise Convs; 1-D and
    3-D Convs; non-constant or shared weights; ``auto_pad=SAME_*`` with an unknown input size;
    names matching ``exclude``; weights smaller than ``min_params``.

    Per node (``@PATTERN{...}``): ``rank`` or ``energy`` (setting one resets the other to its
    default for those Convs: ``rank`` 0 chooses by energy), or ``skip=true`` to leave them
    alone (refused, naming the pattern).
    """

    name = "split-spatial"
    Options = SplitSpatialOptions
    per_node = ("rank", "energy")
    prerequisites = ("lift-constants", "fold-batchnorm", "infer-shapes")
    lossless = False

    what = "k×1 + 1×k"

    def plan(self, node: ir.Node, options: SplitSpatialOptions):
        return _plan(node, options)

    def chain(self, node: ir.Node, plan) -> list[cs.NewConv]:
        return _chain(node, plan.geom, plan.weight, plan.rank)
