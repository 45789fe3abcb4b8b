"""Per-node plans (``@PATTERN{...}`` inside a pass's braces) in every compressing pass.

For each pass: an override changes only the nodes it matches (their weights are bit for bit
those of a run with that option for the whole model, every other weight those of the run
without the override), ``skip=true`` leaves the node bit for bit as it was and records it as
refused with the plan's reason, and options a node may not set fail when the pipeline is
parsed. Then the rules particular to a pass: channel groups of prune-channels (first source
decides, a skipped source keeps the whole group), ``scope=global`` with overrides, shared
weights, and quantize-qdq's skip being its exclude.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import onnx_ir as ir
import pytest

from onnxcompress import registry
from onnxcompress.errors import OptionError
from onnxcompress.pass_base import PassContext
from onnxcompress.pipeline import Pipeline
from tests.graphs import Builder, check, random_feeds, refusals

PLAN_REASON = "left alone by the per-node plan (@{})"


# ---------------------------------------------------------------------------- models
#
# Each weight is named after its node ("conv2" reads "conv2.w"), and every initializer a pass
# makes from a weight starts with the weight's name, so "conv2*" is everything of conv2.


def _weight(rng, shape, scale=0.3) -> np.ndarray:
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def matmul_chain(count: int = 2, width: int = 64, seed: int = 0) -> ir.Model:
    """x[4, width] → MatMul mm1 → … → MatMul mm<count> → y."""
    rng = np.random.default_rng(seed)
    b = Builder()
    h = b.input("x", [4, width])
    for i in range(1, count + 1):
        h = b.op("MatMul", [h, b.init(f"mm{i}.w", _weight(rng, (width, width)))], name=f"mm{i}")
    h.name = "y"
    return b.model([h])


def conv_chain(channels=(8, 16, 16), last: int | None = None, size: int = 8, seed: int = 0) -> ir.Model:
    """x → Conv conv1 (3×3, pads 1) → Relu → Conv conv2 → Relu … (→ Conv ``last`` channels) → y.

    Biased convs, explicit pads, so the split passes know their geometry without shapes."""
    rng = np.random.default_rng(seed)
    b = Builder()
    h = b.input("x", [1, channels[0], size, size])
    widths = list(channels[1:]) + ([last] if last else [])
    c_in = channels[0]
    for i, c_out in enumerate(widths, start=1):
        w = b.init(f"conv{i}.w", _weight(rng, (c_out, c_in, 3, 3)))
        bias = b.init(f"conv{i}.b", _weight(rng, (c_out,), 0.1))
        h = b.op("Conv", [h, w, bias], name=f"conv{i}", pads=[1, 1, 1, 1])
        if i < len(widths):
            h = b.op("Relu", [h], name=f"relu{i}")
        c_in = c_out
    h.name = "y"
    return b.model([h])


def residual_model(seed: int = 0) -> ir.Model:
    """conv0 → Relu → (convA, convB) → Add → Relu → conv_out: convA and convB share one channel group."""
    rng = np.random.default_rng(seed)
    b = Builder()
    x = b.input("x", [1, 4, 6, 6])
    h = b.op("Conv", [x, b.init("conv0.w", _weight(rng, (8, 4, 3, 3)))], name="conv0", pads=[1, 1, 1, 1])
    h = b.op("Relu", [h], name="relu0")
    a = b.op("Conv", [h, b.init("convA.w", _weight(rng, (16, 8, 3, 3)))], name="convA", pads=[1, 1, 1, 1])
    c = b.op("Conv", [h, b.init("convB.w", _weight(rng, (16, 8, 3, 3)))], name="convB", pads=[1, 1, 1, 1])
    s = b.op("Relu", [b.op("Add", [a, c], name="add")], name="relu_add")
    y = b.op("Conv", [s, b.init("conv_out.w", _weight(rng, (4, 16, 1, 1)))], name="conv_out")
    y.name = "y"
    model = b.model([y])
    registry.get_pass("infer-shapes")()(model)  # the channel analysis needs the Add's ranks
    return model


# ---------------------------------------------------------------------------- running


def make_pass(text: str, feeds=None):
    """The pass ``text`` names, with its options and per-node overrides as parsed."""
    name = text.split("{", 1)[0]
    entry = next(e for e in Pipeline.parse(text) if e.name == name)
    return registry.get_pass(name)(entry.options, PassContext(calibration=feeds), entry.overrides)


def run_pass(text: str, model: ir.Model, feeds=None):
    """Run the pass ``text`` names (only it: the models here need no prerequisite) on ``model``."""
    pass_ = make_pass(text, feeds)
    pass_(model)
    check(model)
    return pass_


def _named(name: str, prefix: str) -> bool:
    return name == prefix or re.match(re.escape(prefix) + r"[._/]", name) is not None


def weights_of(model: ir.Model, prefix: str) -> dict[str, tuple]:
    """Every initializer whose name is ``prefix`` or goes on from it with a separator, as
    (dtype, shape, bytes), and every node so named, as (op type, domain, attributes, input
    names): equal means bit-identical."""
    found = {}
    for name, value in model.graph.initializers.items():
        if _named(name, prefix):
            array = value.const_value.numpy()
            found[name] = (array.dtype.str, array.shape, array.tobytes())
    for node in model.graph:
        if _named(node.name or "", prefix):
            attributes = sorted((k, str(a.value)) for k, a in node.attributes.items())
            inputs = [v.name if v is not None else "" for v in node.inputs]
            found[f"node {node.name}"] = (node.op_type, node.domain, attributes, inputs)
    return found


def with_options(text: str, options: str) -> str:
    """``pass{a=1}`` + ``b=2`` → ``pass{a=1,b=2}``."""
    name, _, rest = text.partition("{")
    inner = rest.rstrip("}")
    return f"{name}{{{inner + ',' if inner else ''}{options}}}"


def globally(text: str, level: str) -> str:
    """The pass ``text`` with the option ``level`` for the whole model: it replaces the option
    of that name and those exclusive with it (as a per-node override does)."""
    name, _, rest = text.partition("{")
    key = level.split("=", 1)[0]
    group = next((g for g in registry.get_pass(name).Options.exclusive if key in g), (key,))
    items = [item for item in rest.rstrip("}").split(",") if item and item.split("=", 1)[0] not in group]
    return f"{name}{{{','.join(items + [level])}}}"


@dataclasses.dataclass
class Case:
    """A pass, a model with a node ``target`` and others, its options for the whole model
    (``base``) and one option level (``level``) the target takes per node."""

    base: str  # e.g. "low-rank-gemm{min_elements=16,rank=8}"
    level: str  # e.g. "rank=4"
    model: callable
    target: str
    others: tuple[str, ...]
    feeds: bool = False

    @property
    def name(self) -> str:
        return self.base.split("{", 1)[0]

    def run(self, text: str):
        model = self.model()
        feeds = [random_feeds(model, seed=s) for s in range(4)] if self.feeds else None
        return model, run_pass(text, model, feeds)


CASES = [
    Case("low-rank-gemm{min_elements=16,rank=8}", "rank=4", lambda: matmul_chain(2), "mm2", ("mm1",)),
    Case("low-rank-gemm{min_elements=16,rank=8}", "energy=0.5", lambda: matmul_chain(2), "mm2", ("mm1",)),
    Case("low-rank-conv{min_elements=0,rank=8}", "rank=4", conv_chain, "conv2", ("conv1",)),
    Case("low-rank-conv{min_elements=0,rank=8}", "ratio=0.25", conv_chain, "conv2", ("conv1",)),
    Case("split-spatial{rank=4}", "rank=2", conv_chain, "conv2", ("conv1",)),
    Case("split-spatial{rank=4}", "energy=0.6", conv_chain, "conv2", ("conv1",)),
    Case("split-depthwise{multiplier=2}", "multiplier=1", conv_chain, "conv2", ("conv1",)),
    Case("split-depthwise{multiplier=2}", "energy=0.7", conv_chain, "conv2", ("conv1",)),
    Case("prune-magnitude{sparsity=0.5}", "sparsity=0.8", lambda: matmul_chain(2), "mm2", ("mm1",)),
    Case("prune-magnitude{sparsity=0.5}", "pattern=2:4", lambda: matmul_chain(2), "mm2", ("mm1",)),
    Case("cluster-weights{clusters=16}", "clusters=4", lambda: matmul_chain(2), "mm2", ("mm1",)),
    Case("cluster-weights{clusters=16}", "granularity=channel", lambda: matmul_chain(2), "mm2", ("mm1",)),
    Case("cluster-weights{clusters=16}", "init=density", lambda: matmul_chain(2), "mm2", ("mm1",)),
    Case("quantize-qdq", "per_channel=false", lambda: conv_chain(last=4), "conv2", ("conv1",), feeds=True),
    Case("quantize-qdq{weights=int7}", "weights=int8", lambda: conv_chain(last=4), "conv2", ("conv1",), feeds=True),
    Case("quantize-dynamic", "per_channel=false", lambda: matmul_chain(2), "mm2", ("mm1",)),
    Case("quantize-dynamic", "storage=uint8", lambda: matmul_chain(2), "mm2", ("mm1",)),
    Case("quantize-weights-int4", "block_size=16", lambda: matmul_chain(2), "mm2", ("mm1",)),
    Case("quantize-weights-int4", "symmetric=true", lambda: matmul_chain(2), "mm2", ("mm1",)),
    Case("quantize-weights-int4", "accuracy_level=0", lambda: matmul_chain(2), "mm2", ("mm1",)),
]


# The first case of each pass: skip=true does not depend on the option level.
ONE_PER_PASS = [case for i, case in enumerate(CASES) if case.name not in {c.name for c in CASES[:i]}]


def _id(case: Case) -> str:
    return f"{case.name}-{case.level}"


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_an_override_changes_only_the_node_it_matches(case: Case):
    base_model, base = case.run(case.base)
    global_model, everywhere = case.run(globally(case.base, case.level))
    node_model, per_node = case.run(with_options(case.base, f"@{case.target}{{{case.level}}}"))
    target = weights_of(node_model, case.target)
    assert target == weights_of(global_model, case.target)
    assert target != weights_of(base_model, case.target)  # the level is a real change here
    for other in case.others:
        assert weights_of(node_model, other) == weights_of(base_model, other)
    actions = {r.node: (r.action, r.detail) for r in per_node.records}
    assert actions[case.target] == next((r.action, r.detail) for r in everywhere.records if r.node == case.target)
    for other in case.others:
        assert actions[other] == next((r.action, r.detail) for r in base.records if r.node == other)
        assert actions[other][0] == "rewritten"


@pytest.mark.parametrize("case", ONE_PER_PASS, ids=_id)
def test_skip_leaves_the_node_bit_identical_and_refused(case: Case):
    original = case.model()
    base_model, _ = case.run(case.base)
    skipped_model, skipping = case.run(with_options(case.base, f"@{case.target}{{skip=true}}"))
    # its weights and the node itself as they were; only its input may now come from a
    # quantized neighbour (quantize-qdq dequantizes it back to float)
    mine, before = weights_of(skipped_model, case.target), weights_of(original, case.target)
    node_key = f"node {case.target}"
    assert mine.pop(node_key)[:3] == before.pop(node_key)[:3]
    assert mine == before
    node, was = (next(n for n in m.graph if n.name == case.target) for m in (skipped_model, original))
    assert [v.name for v in node.inputs[1:]] == [v.name for v in was.inputs[1:]]
    assert refusals(skipping, case.target) == [PLAN_REASON.format(case.target)]
    for other in case.others:
        assert weights_of(skipped_model, other) == weights_of(base_model, other)


@pytest.mark.parametrize("case", ONE_PER_PASS, ids=_id)
def test_skipping_every_node_leaves_the_model_unmodified(case: Case):
    model = case.model()
    snapshot = ir.to_onnx_text(model)
    feeds = [random_feeds(model, seed=s) for s in range(4)] if case.feeds else None
    pass_ = make_pass(with_options(case.base, "@.*{skip=true}"), feeds)
    assert not pass_(model).modified
    assert ir.to_onnx_text(model) == snapshot
    assert pass_.records and {r.action for r in pass_.records} == {"refused"}
    assert {r.detail for r in pass_.records} == {PLAN_REASON.format(".*")}


@pytest.mark.parametrize(
    "text",
    [
        "low-rank-gemm{@mm1{data_aware=true}}",
        "low-rank-conv{@conv1{min_elements=0}}",
        "split-spatial{@conv1{min_params=10}}",
        "split-depthwise{@conv1{exclude=x}}",
        "prune-channels{@conv1{importance=l2}}",
        "prune-channels{@conv1{scope=global}}",
        "prune-magnitude{@mm1{scope=global}}",
        "prune-magnitude{@mm1{sparse_storage=true}}",
        "cluster-weights{@mm1{form=indexed}}",
        "quantize-qdq{@conv1{calibration=mse}}",
        "quantize-dynamic{@mm1{tables=false}}",
        "quantize-weights-int4{@mm1{min_elements=5}}",
    ],
)
def test_options_a_node_may_not_set_fail_at_parse(text):
    key = re.search(r"\{@\w+\{(\w+)=", text)[1]
    with pytest.raises(OptionError, match=re.escape(f"option '{key}' cannot be set per node")):
        Pipeline.parse(text)


@pytest.mark.parametrize(
    "text, message",
    [
        ("split-spatial{@conv1{rank=-1}}", "option 'rank' must be 0"),
        ("split-depthwise{@conv1{energy=2}}", "option 'energy' must lie in (0, 1]"),
        ("prune-channels{@conv1{ratio=1.0}}", "option 'ratio' must lie in [0, 1)"),
        ("prune-magnitude{@mm1{pattern=4:2}}", "option 'pattern' must be 'N:M'"),
        ("cluster-weights{@mm1{clusters=300}}", "option 'clusters' must lie in [2, 256]"),
        ("quantize-qdq{@conv1{weights=int4}}", "option 'weights' must be one of"),
        ("quantize-weights-int4{@mm1{block_size=24}}", "option 'block_size' must be a power of two"),
    ],
)
def test_bad_per_node_values_fail_at_parse(text, message):
    with pytest.raises(OptionError, match=re.escape(message)):
        Pipeline.parse(text)


def test_exclusive_options_reset_each_other_per_node():
    def override(text):
        return next(e for e in Pipeline.parse(text) if e.name == text.split("{")[0]).overrides[0].options

    assert override("split-spatial{rank=4,@c{energy=0.5}}").rank == 0
    assert override("split-spatial{energy=0.5,@c{rank=2}}").energy == 0.99
    assert override("split-depthwise{multiplier=3,@c{energy=0.5}}").multiplier == 0
    assert override("low-rank-conv{rank=4,@c{ratio=0.5}}").rank == 0
    assert override("prune-magnitude{pattern=2:4,@m{sparsity=0.7}}").pattern == ""
    # a per-node pattern prunes that weight on its own, whatever the scope of the others
    options = override("prune-magnitude{scope=global,sparsity=0.6,@m{pattern=1:4}}")
    assert (options.pattern, options.sparsity, options.scope) == ("1:4", 0.5, "layer")


# ---------------------------------------------------------------------------- prune-channels


def _l1_keep(weight: np.ndarray, keep: int) -> list[int]:
    """The ``keep`` output channels of largest mean |w| (l1 importance), in order."""
    norms = np.abs(weight.reshape(weight.shape[0], -1)).mean(axis=1)
    return sorted(np.argsort(-norms, kind="stable")[:keep].tolist())


def _array(model: ir.Model, name: str) -> np.ndarray:
    return model.graph.initializers[name].const_value.numpy()


def _read(model: ir.Model, node: str, index: int = 1) -> np.ndarray:
    """The constant input ``index`` of the node called ``node`` (its weight by default)."""
    return next(n for n in model.graph if n.name == node).inputs[index].const_value.numpy()


def test_prune_channels_override_prunes_only_its_group_at_its_ratio():
    original, base_model, global_model, model = (conv_chain(last=4) for _ in range(4))
    run_pass("prune-channels{ratio=0.25}", base_model)
    run_pass("prune-channels{ratio=0.5}", global_model)
    pass_ = run_pass("prune-channels{ratio=0.25,@conv2{ratio=0.5}}", model)
    # conv1's group (conv1's rows, conv2's columns) as at 0.25; conv2's group (conv2's rows,
    # conv3's columns) as at 0.5 everywhere
    assert weights_of(model, "conv1") == weights_of(base_model, "conv1")
    assert weights_of(model, "conv3") == weights_of(global_model, "conv3")
    rows = _l1_keep(_array(original, "conv2.w"), 8)
    cols = _l1_keep(_array(original, "conv1.w"), 12)
    np.testing.assert_array_equal(_read(model, "conv2"), _array(original, "conv2.w")[np.ix_(rows, cols)])
    np.testing.assert_array_equal(_read(model, "conv2", 2), _array(original, "conv2.b")[rows])
    details = {r.node: r.detail for r in pass_.records}
    assert details["conv1"] == "removed 4 of 16 channels" and details["conv2"] == "removed 8 of 16 channels"


@pytest.mark.parametrize("level, removed", [("min_channels=12", 4), ("round_to=6", 4), ("ratio=0.125", 2)])
def test_prune_channels_group_options_per_node(level, removed):
    model = conv_chain(last=4)
    pass_ = run_pass(f"prune-channels{{ratio=0.5,@conv2{{{level}}}}}", model)
    details = {r.node: r.detail for r in pass_.records}
    # round_to=6: keep ⌈8/6⌉·6 = 12 of 16
    assert details["conv2"] == f"removed {removed} of 16 channels"
    assert details["conv1"] == "removed 8 of 16 channels"


def test_prune_channels_skip_keeps_the_group_and_says_so():
    base_model = conv_chain(last=4)
    run_pass("prune-channels{ratio=0.25}", base_model)
    original = conv_chain(last=4)
    model = conv_chain(last=4)
    pass_ = run_pass("prune-channels{ratio=0.25,@conv2{skip=true}}", model)
    assert refusals(pass_, "conv2") == [PLAN_REASON.format("conv2")]
    assert weights_of(model, "conv3") == weights_of(original, "conv3")  # conv2's channels all kept
    assert weights_of(model, "conv1") == weights_of(base_model, "conv1")
    assert _read(model, "conv2").shape == (16, 12, 3, 3)  # only its inputs follow conv1


def test_prune_channels_ratio_zero_with_one_override_prunes_that_group_only():
    original = conv_chain(last=4)
    model = conv_chain(last=4)
    pass_ = run_pass("prune-channels{ratio=0.0,@conv1{ratio=0.5}}", model)
    assert _read(model, "conv1").shape == (8, 8, 3, 3)
    assert weights_of(model, "conv3") == weights_of(original, "conv3")
    assert refusals(pass_, "conv2") == ["ratio 0 for this group: every channel kept"]
    untouched = conv_chain(last=4)
    snapshot = ir.to_onnx_text(untouched)
    assert not make_pass("prune-channels{ratio=0.0,@conv1{ratio=0.0}}")(untouched).modified
    assert ir.to_onnx_text(untouched) == snapshot


def _removed_from_residual(text: str) -> tuple[dict[str, tuple[str, str]], int]:
    model = residual_model()
    pass_ = run_pass(text, model)
    records = {r.node: (r.action, r.detail) for r in pass_.records}
    return records, 16 - _read(model, "convA").shape[0]


def test_prune_channels_first_source_in_graph_order_decides_the_group():
    records, removed = _removed_from_residual("prune-channels{ratio=0.0,@convB{ratio=0.5},@convA{ratio=0.25}}")
    assert removed == 4  # convA comes first in the graph: its override (0.25) decides
    assert records["convA"] == records["convB"] == ("rewritten", "removed 4 of 16 channels")
    _, removed = _removed_from_residual("prune-channels{ratio=0.0,@convB{ratio=0.5}}")
    assert removed == 8  # convA matches no override: convB's decides
    _, removed = _removed_from_residual("prune-channels{ratio=0.5,@conv0{ratio=0.25}}")
    assert removed == 8  # conv0's override is about conv0's own group


def test_prune_channels_skip_on_one_source_keeps_the_whole_group():
    records, removed = _removed_from_residual("prune-channels{ratio=0.5,@convB{skip=true}}")
    assert removed == 0
    assert records["convA"] == records["convB"] == ("refused", PLAN_REASON.format("convB"))
    assert records["conv0"] == ("rewritten", "removed 4 of 8 channels")


def test_prune_channels_global_scope_prunes_overridden_groups_on_their_own():
    text = "prune-channels{scope=global,ratio=0.3,@conv2{ratio=0.5}}"
    chain = lambda: conv_chain(channels=(8, 16, 16, 16), last=4)  # noqa: E731
    model = chain()
    pass_ = run_pass(text, model)
    details = {r.node: r.detail for r in pass_.records}
    assert details["conv2"] == "removed 8 of 16 channels"
    removed = {n: 16 - _read(model, n).shape[0] for n in ("conv1", "conv3")}
    assert sum(removed.values()) == 9  # floor(0.3 · 32): the global ratio over the other groups
    # conv2's group is out of the ranking: skipping it instead ranks conv1 and conv3 the same way
    skipped = chain()
    run_pass("prune-channels{scope=global,ratio=0.3,@conv2{skip=true}}", skipped)
    assert weights_of(model, "conv1") == weights_of(skipped, "conv1")
    np.testing.assert_array_equal(_read(model, "conv3", 2), _read(skipped, "conv3", 2))


# ---------------------------------------------------------------------------- prune-magnitude


def test_prune_magnitude_global_scope_prunes_overridden_weights_on_their_own():
    model = matmul_chain(3)
    run_pass("prune-magnitude{scope=global,sparsity=0.5,@mm2{sparsity=0.8}}", model)
    alone = matmul_chain(3)
    run_pass("prune-magnitude{sparsity=0.8}", alone)
    assert weights_of(model, "mm2") == weights_of(alone, "mm2")
    assert int(np.count_nonzero(_array(model, "mm2.w") == 0)) == int(0.8 * 4096)
    # mm1 and mm3 share one threshold: as when mm2 is skipped, and half of their elements
    shared = matmul_chain(3)
    run_pass("prune-magnitude{scope=global,sparsity=0.5,@mm2{skip=true}}", shared)
    for name in ("mm1", "mm3"):
        assert weights_of(model, name) == weights_of(shared, name)
    zeros = sum(int(np.count_nonzero(_array(model, f"{n}.w") == 0)) for n in ("mm1", "mm3"))
    assert zeros == 4096
    layer = matmul_chain(3)
    run_pass("prune-magnitude{sparsity=0.5}", layer)
    assert weights_of(model, "mm1") != weights_of(layer, "mm1")  # really one threshold, not per layer


def test_prune_magnitude_pattern_per_node_under_global_scope():
    model = matmul_chain(3)
    run_pass("prune-magnitude{scope=global,sparsity=0.5,@mm2{pattern=1:4}}", model)
    alone = matmul_chain(3)
    run_pass("prune-magnitude{pattern=1:4}", alone)
    assert weights_of(model, "mm2") == weights_of(alone, "mm2")
    groups = (_array(model, "mm2.w").T.reshape(64, 16, 4) != 0).sum(axis=-1)  # along K (axis -2)
    assert (groups == 1).all()


def test_prune_magnitude_sparsity_zero_everywhere_but_one_node():
    original = matmul_chain(2)
    model = matmul_chain(2)
    pass_ = run_pass("prune-magnitude{sparsity=0.0,@mm2{sparsity=0.25}}", model)
    assert weights_of(model, "mm1") == weights_of(original, "mm1")
    assert refusals(pass_, "mm1") == ["sparsity 0 for this weight: left as it is"]
    assert int(np.count_nonzero(_array(model, "mm2.w") == 0)) == 1024


# ---------------------------------------------------------------------------- shared weights


def _shared_weight_model() -> ir.Model:
    """Two MatMuls reading the same weight 'w': mm1(x) and mm2(x), added."""
    rng = np.random.default_rng(3)
    b = Builder()
    x = b.input("x", [4, 64])
    w = b.init("w", _weight(rng, (64, 64)))
    y = b.op("Add", [b.op("MatMul", [x, w], name="mm1"), b.op("MatMul", [x, w], name="mm2")], name="add")
    y.name = "y"
    return b.model([y])


@pytest.mark.parametrize(
    "base, level",
    [
        ("prune-magnitude{sparsity=0.5}", "sparsity=0.8"),
        ("cluster-weights{clusters=16}", "clusters=4"),
        ("low-rank-gemm{min_elements=16,rank=8}", "rank=4"),
        ("quantize-dynamic", "per_channel=false"),
        ("quantize-weights-int4", "block_size=16"),
    ],
)
def test_a_shared_weight_follows_its_first_reader_and_any_skip_keeps_it(base, level):
    name = base.split("{")[0]
    everywhere = _shared_weight_model()
    run_pass(globally(base, level), everywhere)
    first = _shared_weight_model()
    run_pass(with_options(base, f"@mm1{{{level}}}"), first)
    assert weights_of(first, "w") == weights_of(everywhere, "w")
    second = _shared_weight_model()
    plain = _shared_weight_model()
    run_pass(with_options(base, f"@mm2{{{level}}}"), second)
    run_pass(base, plain)
    assert weights_of(second, "w") == weights_of(plain, "w")
    kept = _shared_weight_model()
    pass_ = run_pass(with_options(base, "@mm2{skip=true}"), kept)
    assert weights_of(kept, "w") == weights_of(_shared_weight_model(), "w"), name
    assert refusals(pass_, "mm2") == [PLAN_REASON.format("mm2")]
    assert len(refusals(pass_, "mm1")) == 1  # refused too: the weight it shares stays float


# ---------------------------------------------------------------------------- quantize-qdq


def test_quantize_qdq_skip_is_exclude():
    feeds_model = conv_chain(last=4)
    feeds = [random_feeds(feeds_model, seed=s) for s in range(4)]
    skipped, excluded = conv_chain(last=4), conv_chain(last=4)
    by_plan = run_pass("quantize-qdq{@conv2{skip=true}}", skipped, feeds)
    by_exclude = run_pass("quantize-qdq{exclude=^conv2$}", excluded, feeds)
    assert ir.to_onnx_text(skipped) == ir.to_onnx_text(excluded)
    assert refusals(by_plan, "conv2") == [PLAN_REASON.format("conv2")]
    assert refusals(by_exclude, "conv2") == ["excluded by exclude=^conv2$"]
    assert [(r.node, r.action) for r in by_plan.records] == [(r.node, r.action) for r in by_exclude.records]


def test_quantize_qdq_weight_grid_per_node():
    feeds_model = conv_chain(last=4)
    feeds = [random_feeds(feeds_model, seed=s) for s in range(4)]
    model = conv_chain(last=4)
    pass_ = run_pass("quantize-qdq{weights=int7,@conv2{weights=int8,per_channel=false}}", model, feeds)
    conv1 = np.abs(_array(model, "conv1.w_quantized").astype(np.int16))
    conv2 = np.abs(_array(model, "conv2.w_quantized").astype(np.int16))
    assert conv1.max() == 63 and conv2.max() == 127
    assert _array(model, "conv1.w_scale").shape == (16,) and _array(model, "conv2.w_scale").shape == ()
    details = {r.node: r.detail for r in pass_.records if r.action == "rewritten"}
    assert "weight int7 per channel" in details["conv1"] and "weight int8 per tensor" in details["conv2"]


# ---------------------------------------------------------------------------- quantize-dynamic tables


def test_quantize_dynamic_skips_a_table_per_node():
    rng = np.random.default_rng(4)
    b = Builder()
    ids = b.input("ids", [2, 3], ir.DataType.INT64)
    e1 = b.op("Gather", [b.init("emb1", _weight(rng, (16, 32))), ids], name="gather1")
    e2 = b.op("Gather", [b.init("emb2", _weight(rng, (16, 32))), ids], name="gather2")
    y = b.op("Add", [e1, e2], name="add")
    y.name = "y"
    model = b.model([y])
    original = ir.to_onnx_text(model)
    pass_ = run_pass("quantize-dynamic{@gather2{skip=true}}", model)
    assert [n.op_type for n in model.graph] == ["GatherBlockQuantized", "Gather", "Add"]
    assert refusals(pass_, "gather2") == [PLAN_REASON.format("gather2")]
    assert "emb2" in model.graph.initializers and "emb1" not in model.graph.initializers
    assert original != ir.to_onnx_text(model)
