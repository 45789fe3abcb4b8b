"""infer-shapes: annotate every value with the type and shape onnx shape inference derives."""

from __future__ import annotations

import dataclasses

import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from onnxcompress.options import PassOptions, option
from onnxcompress.pass_base import CompressionPass
from onnxcompress.registry import register

# onnx shape inference names the dims it cannot infer unk__0, unk__1, ...
_UNKNOWN_PREFIX = "unk__"
_Annotation = tuple[ir.TypeProtocol | None, ir.Shape | None]


@dataclasses.dataclass(frozen=True)
class InferShapesOptions(PassOptions):
    trust_declared: bool = option(
        False,
        "keep the declared types/shapes of node outputs (graph outputs included) where "
        "inference disagrees, instead of replacing them with the inferred ones",
    )


@register
class InferShapes(CompressionPass):
    """Annotate values with the types and shapes onnx shape inference derives (data_prop on).

    Wraps onnx_ir's ``ShapeInferencePass`` (``onnx.shape_inference.infer_shapes`` with data
    propagation, non-strict so that one op it cannot infer does not stop the rest; initializers
    over 1 KB are stripped from the copy it serializes, so large models work). Exported models
    sometimes declare wrong output shapes (a fixed batch, a stale size), and onnx inference
    then fails outright (strict) or keeps them (non-strict); so by default the declared type and
    shape of every node output (graph outputs included) are set aside, inference runs without
    them, and then, per value: an inferred dim wins over a declared one unless it is unknown
    (unnamed, or onnx's made-up ``unk__N``), a declared shape fills what inference left unknown,
    and a rank or type disagreement takes the inferred one; if a declaration was kept, inference
    runs once more so that it propagates. Each graph output whose declared shape or type
    disagreed is noted. With ``trust_declared=true`` declared annotations are kept
    as they are and inference only fills gaps.

    A dim inference cannot tie to a known size or symbol is left unnamed in node outputs: onnx
    names each such dim afresh (``unk__0``, ``unk__1``, ...), which tells onnxruntime that dims
    it could prove equal differ, and it then skips fusions (minilm_l6 ran 12% slower with them).

    Only annotations change; the computation never does. ``modified`` is True exactly when some
    value's type or shape annotation changed. Values inside functions are not annotated.
    """

    name = "infer-shapes"
    Options = InferShapesOptions
    preserves = ()

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = _annotations(_all_values(model))
        declared: dict[ir.Value, _Annotation] = {}
        if not self.options.trust_declared:
            declared = _annotations(_node_outputs(model))
            for value in declared:
                value.type, value.shape = None, None
        _infer(model)
        if declared and all(v.type is None and v.shape is None for v in declared):
            self.note("onnx shape inference inferred nothing (see the log for its error)")
        if self._reconcile(declared):
            _infer(model)  # let the declarations kept above propagate to what follows them
        _unname_made_up_dims(_node_outputs(model))
        changed = [v for v, old in before.items() if _annotation(v) != old]
        if changed:
            self.note(f"updated the type/shape of {len(changed)} values")
        return ir.passes.PassResult(model, modified=bool(changed))

    def _reconcile(self, declared: dict[ir.Value, _Annotation]) -> bool:
        """Merge each set-aside declaration with what inference found; note the conflicts.

        Returns whether some declaration said more than inference (and was kept).
        """
        intermediates = 0
        kept = False
        for value, (old_type, old_shape) in declared.items():
            if _disagree(old_type, old_shape, value.type, value.shape):
                if value.is_graph_output():
                    self.note(
                        f"output '{value.name}': declared {_show(old_type, old_shape)}, inferred "
                        f"{_show(value.type, value.shape)}; kept the inferred one"
                    )
                else:
                    intermediates += 1
            merged = _merge_shapes(value.shape, old_shape)
            kept |= (value.type is None and old_type is not None) or merged != value.shape
            value.type = value.type if value.type is not None else old_type
            value.shape = merged
        if intermediates:
            self.note(
                f"{intermediates} declared intermediate shapes/types disagreed with inference"
            )
        return kept


def _infer(model: ir.Model) -> None:
    ShapeInferencePass(strict_mode=False, data_prop=True)(model)


def _unname_made_up_dims(values: list[ir.Value]) -> None:
    for value in values:
        if value.shape is not None and any(_made_up(d) for d in value.shape):
            value.shape = ir.Shape([None if _made_up(d) else d for d in value.shape])


def _made_up(dim) -> bool:
    """onnx's ``unk__N``: a name that says nothing (an unnamed dim is None already)."""
    return not isinstance(dim, int) and dim.value is not None and not _known(dim)


def _all_values(model: ir.Model) -> list[ir.Value]:
    values: list[ir.Value] = []
    for graph in model.graphs():
        values.extend(graph.inputs)
        values.extend(graph.initializers.values())
        values.extend(v for node in graph for v in node.outputs)
    return list(dict.fromkeys(values))


def _node_outputs(model: ir.Model) -> list[ir.Value]:
    return [v for graph in model.graphs() for node in graph for v in node.outputs]


def _annotation(value: ir.Value) -> _Annotation:
    return value.type, value.shape


def _annotations(values: list[ir.Value]) -> dict[ir.Value, _Annotation]:
    return {v: _annotation(v) for v in values}


def _known(dim) -> bool:
    """A dim that says something: an int or a named symbol (not onnx's made-up ``unk__N``)."""
    if isinstance(dim, int):
        return True
    return dim.value is not None and not dim.value.startswith(_UNKNOWN_PREFIX)


def _merge_shapes(inferred: ir.Shape | None, declared: ir.Shape | None) -> ir.Shape | None:
    """Inferred dims win unless unknown; a rank disagreement takes the inferred shape."""
    if inferred is None:
        return declared
    if declared is None or len(inferred) != len(declared):
        return inferred
    dims = [i if _known(i) or not _known(d) else d for i, d in zip(inferred, declared)]
    return ir.Shape(dims)


def _disagree(old_type, old_shape, new_type, new_shape) -> bool:
    """Whether inference contradicts a declaration (not merely knows more or less)."""
    if old_type is not None and new_type is not None and old_type != new_type:
        return True
    if old_shape is None or new_shape is None:
        return False
    if len(old_shape) != len(new_shape):
        return True
    for old, new in zip(old_shape, new_shape):
        if isinstance(old, int) and _known(new) and old != new:
            return True
    return False


def _show(type_: ir.TypeProtocol | None, shape: ir.Shape | None) -> str:
    dtype = type_.dtype.name if type_ is not None and hasattr(type_, "dtype") else "?"
    dims = "?" if shape is None else "[" + ",".join(str(d) for d in shape) + "]"
    return f"{dtype}{dims}"
