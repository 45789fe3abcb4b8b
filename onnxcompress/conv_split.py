"""Shared pieces of the passes that split one Conv into two (split-spatial, split-depthwise).

- :func:`conv_reason`: why a node is not a plain Conv with a constant, unshared float weight.
- :func:`geometry`: kernel, strides, dilations and explicit pads of a Conv (``auto_pad``
  resolved where the input's spatial size is known), and its input/output spatial sizes.
- :func:`rank_for_energy`, :func:`numerical_rank`: how many singular values to keep.
- :func:`replace_conv`: put a chain of new Conv nodes in the place of one, with new
  initializers (tensors are never changed in place) and the old output's name and uses.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import math
import re
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnxcompress.initializers import Names, drop_if_unused, new_initializer, take_over
from onnxcompress.pass_base import Candidate, CompressionPass, node_label

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- checks


def is_conv(node: ir.Node) -> bool:
    return node.op_type == "Conv" and node.domain in ("", "ai.onnx")


def conv_reason(node: ir.Node) -> str:
    """Why ``node`` (a Conv) cannot be split whatever its shape: '' when it can."""
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return "it has no weight input"
    if len(node.outputs) != 1:
        return f"it has {len(node.outputs)} outputs"
    weight = node.inputs[1]
    if weight.is_graph_input():
        return f"weight '{weight.name}' is a graph input, not a constant"
    if weight.const_value is None:
        return f"weight '{weight.name}' is not a constant initializer (computed at run time)"
    if weight.is_graph_output():
        return f"weight '{weight.name}' is also a graph output"
    for use in weight.uses():
        if use.node is not node or use.idx != 1:
            return f"weight '{weight.name}' is shared with '{node_label(use.node)}' (it would stay, nothing saved)"
    if not weight.const_value.dtype.is_floating_point():
        return f"weight '{weight.name}' is {weight.const_value.dtype.name}, not floating point"
    return ""


def excluded(node: ir.Node, pattern: str) -> str:
    """The refusal text when ``node``'s name matches the ``exclude`` pattern, else ''."""
    if pattern and re.search(pattern, node.name or ""):
        return f"excluded by exclude={pattern}"
    return ""


def validate_common(options, energy: float, exclude: str, min_params: int) -> None:
    """Checks shared by the options of both passes (raise OptionError through ``options.fail``)."""
    if not (0.0 < energy <= 1.0):
        options.fail("energy", f"must lie in (0, 1], got {energy}")
    if min_params < 0:
        options.fail("min_params", f"must be 0 or more, got {min_params}")
    options.check_pattern("exclude")


# ---------------------------------------------------------------------------- geometry


@dataclasses.dataclass
class Geometry:
    """A Conv's geometry with explicit pads ``[begin..., end...]``.

    ``in_spatial`` / ``out_spatial`` hold ints where known, None where not (symbolic dims, no
    shape). ``auto_pad`` is the attribute as found; ``pads`` are explicit whenever they could be
    resolved (``NOTSET``, ``VALID``, or ``SAME_*`` with a known input size), else None.
    """

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...] | None
    auto_pad: str
    in_spatial: tuple[int | None, ...]

    @property
    def dims(self) -> int:
        return len(self.kernel)

    def out_size(self, d: int) -> int | None:
        size = self.in_spatial[d]
        if size is None:
            return None
        if self.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            return -(-size // self.strides[d])
        assert self.pads is not None
        padded = size + self.pads[d] + self.pads[d + self.dims]
        return (padded - self.dilations[d] * (self.kernel[d] - 1) - 1) // self.strides[d] + 1

    @property
    def out_spatial(self) -> tuple[int | None, ...]:
        return tuple(self.out_size(d) for d in range(self.dims))


def spatial_sizes(value: ir.Value | None, dims: int) -> tuple[int | None, ...]:
    """The spatial dims of an (N, C, *spatial) value: ints where known, None elsewhere."""
    shape = value.shape if value is not None else None
    if shape is None or len(shape) != dims + 2:
        return (None,) * dims
    return tuple(d if isinstance(d, int) else None for d in list(shape)[2:])


def geometry(node: ir.Node, kernel: Sequence[int]) -> Geometry | str:
    """The Conv's geometry, or why its attributes cannot be read."""
    dims = len(kernel)
    attrs = node.attributes

    def ints(name: str, default: list[int], length: int) -> list[int] | str:
        attr = attrs.get(name)
        if attr is None:
            return default
        values = list(attr.as_ints())
        if len(values) != length:
            return f"'{name}' has {len(values)} values for a {dims}-D kernel"
        return values

    strides = ints("strides", [1] * dims, dims)
    dilations = ints("dilations", [1] * dims, dims)
    pads = ints("pads", [0] * (2 * dims), 2 * dims)
    for got in (strides, dilations, pads):
        if isinstance(got, str):
            return got
    declared = attrs.get("kernel_shape")
    if declared is not None and tuple(declared.as_ints()) != tuple(kernel):
        return f"kernel_shape {tuple(declared.as_ints())} disagrees with the weight's {tuple(kernel)}"
    if any(s < 1 for s in strides) or any(d < 1 for d in dilations) or any(p < 0 for p in pads):
        return "it has a non-positive stride or dilation, or a negative pad"
    auto_pad = attrs["auto_pad"].as_string() if "auto_pad" in attrs else "NOTSET"
    in_spatial = spatial_sizes(node.inputs[0], dims)
    resolved: list[int] | None = list(pads)
    if auto_pad == "VALID":
        resolved = [0] * (2 * dims)
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        if any(s is None for s in in_spatial):
            resolved = None
        else:
            begin, end = [], []
            for d in range(dims):
                size = in_spatial[d]
                out = -(-size // strides[d])
                total = max(0, (out - 1) * strides[d] + dilations[d] * (kernel[d] - 1) + 1 - size)
                small, large = total // 2, total - total // 2
                begin.append(small if auto_pad == "SAME_UPPER" else large)
                end.append(large if auto_pad == "SAME_UPPER" else small)
            resolved = begin + end
    elif auto_pad != "NOTSET":
        return f"unknown auto_pad={auto_pad}"
    return Geometry(tuple(kernel), tuple(strides), tuple(dilations),
                    None if resolved is None else tuple(resolved), auto_pad, in_spatial)


def kernel_text(kernel: Sequence[int]) -> str:
    return "×".join(str(k) for k in kernel)


# ---------------------------------------------------------------------------- ranks


def svd(matrix: np.ndarray, compute_uv: bool = True):
    """``np.linalg.svd(matrix, full_matrices=False)`` (batched over leading dims), with BLAS on one
    thread for the small matrices conv weights give: on a busy machine a multi-threaded OpenBLAS
    spends far longer synchronising than computing them (10× slower seen next to onnxruntime)."""
    small = min(matrix.shape[-2:]) <= 1024
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - comes with scikit-learn
        small = False
    if small:
        with threadpool_limits(1, user_api="blas"):
            return np.linalg.svd(matrix, full_matrices=False, compute_uv=compute_uv)
    return np.linalg.svd(matrix, full_matrices=False, compute_uv=compute_uv)


def numerical_rank(singular_values: np.ndarray, shape: tuple[int, int], dtype: np.dtype) -> int:
    """Singular values above ``s_max · max(shape) · eps(dtype)`` (numpy's matrix_rank rule, at the
    weight's precision: what is below it is rounding noise of the stored weight)."""
    s = np.asarray(singular_values, np.float64)
    if s.size == 0 or s[0] == 0.0:
        return 0
    eps = np.finfo(dtype).eps if np.issubdtype(dtype, np.floating) else np.finfo(np.float32).eps
    return int(np.sum(s > s[0] * max(shape) * eps))


def rank_for_energy(squared: np.ndarray, energy: float, limit: int) -> int:
    """Fewest leading terms whose squared singular values keep ``energy`` of the total.

    ``squared`` is sorted descending (several matrices' values may be summed per position);
    never more than ``limit`` (the numerical rank), never fewer than 1.
    """
    total = float(np.sum(squared))
    if total <= 0.0:
        return 1
    kept = np.cumsum(squared) / total
    count = int(np.searchsorted(kept, energy * (1 - 1e-12), side="left")) + 1
    return max(1, min(count, limit, len(squared)))


def kept_energy(squared: np.ndarray, count: int) -> float:
    total = float(np.sum(squared))
    return 1.0 if total <= 0.0 else float(np.sum(squared[:count]) / total)


# ---------------------------------------------------------------------------- graph surgery


@dataclasses.dataclass
class NewConv:
    """One Conv of the replacement chain; ``weight`` is a new array, ``bias`` an existing value."""

    suffix: str  # appended to the original node and output names
    weight: np.ndarray
    attributes: dict
    bias: ir.Value | None = None
    shape: ir.Shape | None = None  # of its output, where known


def replace_conv(node: ir.Node, chain: Sequence[NewConv], names: Names) -> list[ir.Node]:
    """Replace ``node`` by the Convs of ``chain`` (each reading the previous one's output).

    The last Conv's output takes over the original output's name, type, shape and uses
    (graph outputs too); the old weight initializer goes when nothing else reads it.
    """
    graph = node.graph
    x, weight = node.inputs[0], node.inputs[1]
    old_out = node.outputs[0]
    base = node.name or old_out.name or "conv"
    dtype = weight.const_value.dtype
    new_nodes: list[ir.Node] = []
    current = x
    for i, part in enumerate(chain):
        w_name = names.unique(f"{weight.name or base}{part.suffix}")
        w_value = new_initializer(graph, w_name, part.weight.astype(dtype.numpy()))
        inputs = [current, w_value] + ([part.bias] if part.bias is not None else [])
        new = ir.node("Conv", inputs, attributes=part.attributes, name=names.unique(f"{base}{part.suffix}"))
        out = new.outputs[0]
        if i < len(chain) - 1:
            out.name = names.unique(f"{old_out.name or base}{part.suffix}")
            out.type = old_out.type if old_out.type is not None else ir.TensorType(dtype)
            out.shape = part.shape
        new_nodes.append(new)
        current = out
    graph.insert_after(node, new_nodes)
    last = new_nodes[-1].outputs[0]
    take_over(old_out, last)
    if last.type is None:
        last.type = ir.TensorType(dtype)
    graph.remove(node, safe=True)
    drop_if_unused(weight)
    return new_nodes


def shape_of(batch, channels: int, spatial: Sequence[int | None]) -> ir.Shape | None:
    """An (N, C, *spatial) shape where every spatial dim is known, else None."""
    if any(s is None for s in spatial):
        return None
    return ir.Shape([batch, channels, *spatial])


def batch_dim(value: ir.Value):
    shape = value.shape
    if shape is None or len(shape) == 0:
        return None
    return shape[0]


def product(values: Sequence[int]) -> int:
    return int(math.prod(values))


def prepared(model: ir.Model, prerequisites: Sequence[str]) -> ir.Model:
    """A copy of ``model`` after the prerequisite passes (lifted weights, shapes), for
    ``candidates``; the model itself when they fail (inspect must not)."""
    from onnxcompress.registry import get_pass

    try:
        copy = model.clone()
        for name in prerequisites:
            get_pass(name)()(copy)
        return copy
    except Exception as exc:  # noqa: BLE001
        logger.info("conv split candidates on the model as it is: %s", exc)
        return model


class ConvSplitPass(CompressionPass):
    """Shared driver of the conv-splitting passes: plan each Conv, then replace it by a chain.

    Subclasses give ``plan(node, options)`` (a plan with ``detail()``, or the refusal reason as
    a string), ``chain(node, plan)`` (the new convs) and ``what`` (how the note names the
    rewrite). Each Conv is planned with its own options (a per-node override's, else the
    pass's); a Conv an override leaves alone (``skip=true``) is refused with that reason.
    """

    what = ""

    @abc.abstractmethod
    def plan(self, node: ir.Node, options):
        """A plan with ``detail()`` for this Conv under ``options``, or the reason to leave it alone."""

    @abc.abstractmethod
    def chain(self, node: ir.Node, plan) -> list[NewConv]:
        """The convs that replace ``node`` under ``plan``."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        names = Names(model)
        count = 0
        for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
            if not is_conv(node):
                continue
            options = self.node_options(node)
            plan = self.skipped_by_plan(node) if options is None else self.plan(node, options)
            if isinstance(plan, str):
                self.refused(node, plan)
                continue
            new_nodes = replace_conv(node, self.chain(node, plan), names)
            self.rewrote(node, f"{plan.detail()}; now '{new_nodes[0].name}' + '{new_nodes[1].name}'")
            count += 1
        if count:
            self.note(f"split {count} Convs into {self.what}")
        return ir.passes.PassResult(model, modified=bool(count))

    def candidates(self, model: ir.Model) -> list[Candidate]:
        out = []
        for node in ir.traversal.RecursiveGraphIterator(prepared(model, self.prerequisites).graph):
            if is_conv(node) and not isinstance(plan := self.plan(node, self.options), str):
                out.append(Candidate(self.name, node_label(node), node.op_type, plan.detail()))
        return out
