"""The pass contract: an onnx_ir in-place pass with a name, options, prerequisites and a record.

A pass is one class in one file under ``passes/``. It subclasses :class:`CompressionPass`,
sets ``name`` (the registry key used in pipeline strings) and, when it has options, an
``Options`` dataclass derived from :class:`~onnxcompress.options.PassOptions`.
``call(model)`` rewrites the model in place and returns ``PassResult(model, modified)``
with an honest ``modified``; along the way it calls :meth:`rewrote` and :meth:`refused`
so the report can say, per node, what it did and what it would not do and why.

Debugging aids (drift checks, dumps, bisection, timing…) are instruments run by the
pass manager; a pass contains none of them.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import ClassVar, Literal, Sequence

import onnx_ir as ir

from onnxcompress.analysis import AnalysisManager
from onnxcompress.options import NodeOverride, PassOptions, non_default_items
from onnxcompress.quantization import quantized_reason

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class NoOptions(PassOptions):
    """Options of a pass that takes none."""


@dataclasses.dataclass
class NodeRecord:
    """What a pass did to one node: rewrote it, or refused to, with the reason."""

    node: str
    op_type: str
    action: Literal["rewritten", "refused"]
    detail: str = ""

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Candidate:
    """A rewrite a pass could make on a model, for ``onnxcompress inspect``."""

    pass_name: str
    node: str
    op_type: str
    what: str


@dataclasses.dataclass
class PassContext:
    """What a pass may read besides the model: cached analyses and calibration feeds."""

    analyses: AnalysisManager = dataclasses.field(default_factory=AnalysisManager)
    calibration: list[dict] | None = None


class CompressionPass(ir.passes.InPlacePass):
    """Base of every onnxcompress pass. Subclasses implement ``call``."""

    name: ClassVar[str] = ""
    Options: ClassVar[type[PassOptions]] = NoOptions
    # Passes that must have run before this one (inserted by the pipeline if missing).
    prerequisites: ClassVar[tuple[str, ...]] = ()
    # Analyses that stay valid when this pass modifies the model.
    preserves: ClassVar[tuple[str, ...]] = ()
    # Whether --bisect-limit may skip it (a pass whose output later passes rely on may not).
    skippable: ClassVar[bool] = True
    # Whether the rewrite is exact up to float rounding.
    lossless: ClassVar[bool] = True
    # The options a per-node override (``@PATTERN{...}``) may set; () only ``skip=true``;
    # None: the pass takes no per-node overrides (it decides for the whole model).
    per_node: ClassVar[tuple[str, ...] | None] = None

    def __init__(
        self,
        options: PassOptions | None = None,
        context: PassContext | None = None,
        overrides: Sequence[NodeOverride] = (),
    ):
        super().__init__()
        self.options = options if options is not None else self.Options()
        if not isinstance(self.options, self.Options):
            raise TypeError(f"{self.name} takes {self.Options.__name__}, got {type(options)!r}")
        if overrides and self.per_node is None:
            raise TypeError(f"{self.name} takes no per-node overrides")
        self.overrides = tuple(overrides)
        self.context = context if context is not None else PassContext()
        self.records: list[NodeRecord] = []
        self.notes: list[str] = []

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.name and cls.Options is not NoOptions:
            cls.Options.pass_name = cls.name

    @classmethod
    def summary(cls) -> str:
        """The first line of the pass's docstring."""
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""

    def spec(self) -> str:
        """This pass, its non-default options and its per-node overrides as pipeline text."""
        from onnxcompress.pipeline import format_entry

        return format_entry(self.name, non_default_items(self.options), self.overrides)

    def node_options(self, node: ir.Node) -> PassOptions | None:
        """The options for ``node``: those of the first override whose pattern matches its
        whole name, else the pass's; None when that override says ``skip=true``."""
        override = self.override_for(node)
        return self.options if override is None else override.options

    def override_for(self, node: ir.Node) -> NodeOverride | None:
        name = node.name or ""
        return next((o for o in self.overrides if o.matches(name)), None)

    def skipped_by_plan(self, node: ir.Node) -> str:
        """The refusal text when an override says ``skip=true`` for ``node``, else ''."""
        override = self.override_for(node)
        return f"left alone by the per-node plan (@{override.pattern})" if override is not None and override.skip else ""

    def __call__(self, model_or_result):
        self.records = []
        self.notes = []
        return super().__call__(model_or_result)

    def note(self, text: str) -> None:
        """A whole-model remark for the report (e.g. "removed 3 nodes")."""
        self.notes.append(text)

    def left_alone_as_quantized(self, model: ir.Model) -> bool:
        """True, with a note saying why, when ``model`` is already quantized: passes that
        quantize or share weights do not stack a second grid on the first."""
        reason = quantized_reason(model)
        if reason:
            self.note(f"left alone: {reason}")
        return bool(reason)

    def rewrote(self, node: ir.Node, detail: str = "") -> None:
        self.records.append(NodeRecord(node_label(node), node.op_type, "rewritten", detail))

    def refused(self, node: ir.Node, reason: str) -> None:
        logger.info("%s: left %s alone: %s", self.name, node_label(node), reason)
        self.records.append(NodeRecord(node_label(node), node.op_type, "refused", reason))

    def candidates(self, model: ir.Model) -> list[Candidate]:
        """What this pass could rewrite in ``model``, without changing it. Default: nothing."""
        return []


def node_label(node: ir.Node) -> str:
    """The node's name, or its op type and first output when it has none."""
    if node.name:
        return node.name
    outputs = [v.name for v in node.outputs if v is not None and v.name]
    return f"<{node.op_type} -> {outputs[0]}>" if outputs else f"<{node.op_type}>"

