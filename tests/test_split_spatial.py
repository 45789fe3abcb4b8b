"""split-spatial: k_h×k_w Conv → k_h×1 (D filters) + 1×k_w, by the SVD of W reshaped (C·k_h)×(N·k_w).

Exact limits: at full rank the two kernels compose back to W (float64 round-off) and the split
graph reproduces the Conv for every padding/stride/dilation/auto_pad combination (via
``split_conv``, which bypasses the cost rule: at full rank the pair never pays); through the pass,
weights of low rank are split exactly at that rank. Then every refusal, the options, candidates,
the pipeline API (lineage), and the real models.
"""

from __future__ import annotations

import os

import numpy as np
import onnx_ir as ir
import pytest
from onnxcompress.passes.split_spatial import (
    SplitSpatial,
    SplitSpatialOptions,
    compose,
    spatial_factors,
    spatial_matrix,
    split_conv,
)

import onnxcompress
from onnxcompress.conv_split import rank_for_energy
from onnxcompress.errors import OptionError
from onnxcompress.instruments import LINEAGE_KEY
from onnxcompress.pipeline import Pipeline
from tests import graphs
from tests.graphs import (
    Builder,
    apply_and_compare,
    assert_close,
    check,
    clone,
    find_node,
    ops,
    random_feeds,
    records,
    refusals,
    run,
)

RNG = np.random.default_rng(7)


def conv_model(weight, size=(10, 12), bias=True, name="conv", spatial_names=None, **attrs) -> ir.Model:
    return graphs.conv_model(weight, size, bias, name, spatial_names, rng=RNG, **attrs)


def low_rank_weight(n, c, kh, kw, rank, seed=0) -> np.ndarray:
    """A weight whose (C·k_h)×(N·k_w) matrix has exactly ``rank`` equal-sized singular values."""
    rng = np.random.default_rng(seed)
    a = np.linalg.qr(rng.standard_normal((c * kh, rank)))[0]
    b = np.linalg.qr(rng.standard_normal((n * kw, rank)))[0]
    m = a @ b.T
    return m.reshape(c, kh, n, kw).transpose(2, 0, 1, 3).astype(np.float32)


def split_and_compare(model: ir.Model, options: SplitSpatialOptions, rel: float = 1e-5) -> SplitSpatial:
    return apply_and_compare(model, SplitSpatial(options), rel)


# ---------------------------------------------------------------------------- the math


def test_reshape_layout_is_c_i_by_n_j():
    w = RNG.standard_normal((4, 3, 2, 5))
    m = spatial_matrix(w)
    assert m.shape == (3 * 2, 4 * 5)
    n, c, i, j = 2, 1, 1, 3
    assert m[c * 2 + i, n * 5 + j] == w[n, c, i, j]


@pytest.mark.parametrize("shape", [(5, 4, 3, 3), (16, 3, 3, 3), (2, 7, 5, 3), (6, 2, 2, 4)])
def test_full_rank_factors_compose_back_to_the_weight(shape):
    w = RNG.standard_normal(shape)
    n, c, kh, kw = shape
    vertical, horizontal, _s = spatial_factors(w, min(c * kh, n * kw))
    assert vertical.shape == (min(c * kh, n * kw), c, kh, 1)
    assert horizontal.shape == (n, min(c * kh, n * kw), 1, kw)
    np.testing.assert_allclose(compose(vertical, horizontal), w, atol=1e-12 * np.abs(w).max() * 100)


def test_truncation_error_is_the_dropped_energy():
    w = RNG.standard_normal((8, 6, 3, 3))
    vertical, horizontal, s = spatial_factors(w, 5)
    err = np.linalg.norm(compose(vertical, horizontal) - w) ** 2
    np.testing.assert_allclose(err, np.sum(s[5:] ** 2), rtol=1e-9)


def test_rank_for_energy_is_the_fewest_terms():
    squared = np.array([50.0, 30.0, 15.0, 5.0])
    assert rank_for_energy(squared, 0.5, 4) == 1
    assert rank_for_energy(squared, 0.8, 4) == 2
    assert rank_for_energy(squared, 0.81, 4) == 3
    assert rank_for_energy(squared, 1.0, 4) == 4
    assert rank_for_energy(squared, 1.0, 3) == 3  # capped at the numerical rank


# ---------------------------------------------------------------------------- exact limits in the graph

GEOMETRIES = [
    {"pads": [1, 1, 1, 1]},
    {"pads": [0, 2, 1, 1]},  # asymmetric: top 0, left 2, bottom 1, right 1
    {"pads": [2, 1, 0, 3], "strides": [2, 2]},
    {"pads": [1, 0, 2, 1], "strides": [1, 2]},
    {"pads": [1, 1, 1, 1], "strides": [2, 1], "dilations": [2, 2]},
    {"pads": [2, 0, 1, 2], "dilations": [1, 2], "strides": [2, 3]},
    {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
    {"auto_pad": "SAME_LOWER", "strides": [2, 3]},
    {"auto_pad": "VALID", "strides": [1, 2]},
    {},  # no pads at all
]


@pytest.mark.parametrize("attrs", GEOMETRIES, ids=lambda a: ",".join(f"{k}={v}" for k, v in a.items()) or "plain")
@pytest.mark.parametrize("kernel", [(3, 3), (5, 3), (2, 4)])
def test_full_rank_split_reproduces_every_geometry(attrs, kernel):
    model = conv_model(RNG.standard_normal((6, 4, *kernel)), size=(11, 13), **attrs)
    feeds = random_feeds(model, seed=2)
    before = run(model, feeds)
    v, h = split_conv(model, find_node(model, "conv"), min(4 * kernel[0], 6 * kernel[1]))
    assert ops(model) == ["Conv", "Conv"]
    assert v.attributes["kernel_shape"].as_ints() == (kernel[0], 1)
    assert h.attributes["kernel_shape"].as_ints() == (1, kernel[1])
    assert "auto_pad" not in v.attributes and "auto_pad" not in h.attributes
    check(model)
    assert_close(before, run(model, feeds), rel=1e-5)


def test_stride_dilation_pads_go_to_the_right_conv():
    model = conv_model(RNG.standard_normal((6, 4, 3, 3)), pads=[1, 2, 3, 4], strides=[2, 3], dilations=[4, 5])
    v, h = split_conv(model, find_node(model, "conv"), 12)
    assert v.attributes["strides"].as_ints() == (2, 1) and h.attributes["strides"].as_ints() == (1, 3)
    assert v.attributes["dilations"].as_ints() == (4, 1) and h.attributes["dilations"].as_ints() == (1, 5)
    assert v.attributes["pads"].as_ints() == (1, 0, 3, 0) and h.attributes["pads"].as_ints() == (0, 2, 0, 4)
    assert len(v.inputs) == 2 and len(h.inputs) == 3 and h.inputs[2].name == "b"  # bias on the second
    assert model.graph.outputs[0].name == "y" and h.outputs[0] is model.graph.outputs[0]
    assert "W" not in model.graph.initializers


def test_pass_is_exact_at_the_weights_rank_and_shrinks():
    w = low_rank_weight(16, 8, 3, 3, rank=2)
    model = conv_model(w, pads=[0, 1, 2, 1], strides=[2, 1], dilations=[1, 2])
    p = split_and_compare(model, SplitSpatialOptions(energy=1.0))
    (rec,) = records(p, "rewritten")
    assert "D=2 of at most 24 (numerical rank 2)" in rec.detail
    assert "parameters 1152 → 144" in rec.detail
    v = model.graph.node(0)
    assert tuple(v.inputs[1].const_value.shape) == (2, 8, 3, 1)
    assert tuple(model.graph.node(1).inputs[1].const_value.shape) == (16, 2, 1, 3)


def test_pass_without_bias_and_with_same_pads_of_a_known_input():
    w = low_rank_weight(12, 6, 3, 5, rank=3, seed=1)
    model = conv_model(w, bias=False, size=(9, 14), auto_pad="SAME_UPPER", strides=[2, 2])
    split_and_compare(model, SplitSpatialOptions(rank=3))
    assert "auto_pad" not in model.graph.node(0).attributes


def test_energy_picks_the_fewest_filters_and_bounds_the_weight_error():
    w = RNG.standard_normal((32, 16, 3, 3)).astype(np.float32)
    model = conv_model(w)
    p = SplitSpatial(SplitSpatialOptions(energy=0.7))
    assert p(model).modified
    check(model)
    s = np.linalg.svd(spatial_matrix(w), compute_uv=False)
    kept = np.cumsum(s**2) / np.sum(s**2)
    d = int(np.argmax(kept >= 0.7)) + 1
    assert f"D={d} of" in records(p, "rewritten")[0].detail
    v, h = model.graph.node(0).inputs[1].const_value.numpy(), model.graph.node(1).inputs[1].const_value.numpy()
    rel = np.linalg.norm(compose(v.astype(np.float64), h.astype(np.float64)) - w) ** 2 / np.linalg.norm(w) ** 2
    assert rel <= 0.3 + 1e-6 and 1 - kept[d - 2] > 0.3


def test_intermediate_shape_is_annotated():
    model = conv_model(low_rank_weight(16, 8, 3, 3, 2), size=(10, 12), pads=[1, 1, 1, 1], strides=[2, 2])
    SplitSpatial(SplitSpatialOptions(energy=1.0))(model)
    mid = model.graph.node(0).outputs[0]
    assert list(mid.shape)[1:] == [2, 5, 12]  # H_out with vertical stride, unpadded input width
    check(model)


# ---------------------------------------------------------------------------- refusals


def refused_only(model: ir.Model, options: SplitSpatialOptions | None = None) -> list[str]:
    options = options or SplitSpatialOptions()
    before = ir.to_proto(model).SerializeToString()
    p = SplitSpatial(options)
    assert not p(model).modified
    assert ir.to_proto(model).SerializeToString() == before
    return refusals(p)


def test_the_classic_trap_three_channels_sixteen_filters_grows_from_432_to_912():
    model = conv_model(RNG.standard_normal((16, 3, 3, 3)), pads=[1, 1, 1, 1])
    (reason,) = refused_only(model, SplitSpatialOptions(rank=16))
    assert "parameters 432 → 912" in reason
    assert "MACs 51840 → 109440" in reason  # 10×12 output positions
    assert "exceeds the largest useful rank min(C·k_h, N·k_w) = 9" in reason


def test_full_rank_of_a_three_channel_conv_does_not_pay():
    model = conv_model(RNG.standard_normal((16, 3, 3, 3)), pads=[1, 1, 1, 1])
    (reason,) = refused_only(model, SplitSpatialOptions(energy=1.0))
    assert "D=9" in reason and "parameters 432 → 513" in reason


def test_refused_when_parameters_shrink_but_macs_grow():
    # A horizontal stride of 3: the k_h×1 conv runs on the full input width, 3× the output width.
    model = conv_model(RNG.standard_normal((4, 16, 3, 3)), size=(12, 12), pads=[1, 1, 1, 1], strides=[1, 3])
    (reason,) = refused_only(model, SplitSpatialOptions(rank=5))
    assert "parameters 576 → 300" in reason and "MACs 27648 → 37440" in reason


def test_unknown_width_compares_macs_per_output_position():
    model = conv_model(RNG.standard_normal((4, 16, 3, 3)), spatial_names=["H", "W"], pads=[1, 1, 1, 1], strides=[1, 3])
    (reason,) = refused_only(model, SplitSpatialOptions(rank=5))
    assert "MACs per output position (input width unknown) 576 → 780" in reason
    model = conv_model(low_rank_weight(16, 8, 3, 3, 2), spatial_names=["H", "W"], pads=[1, 1, 1, 1])
    p = split_and_compare(model, SplitSpatialOptions(energy=1.0))
    assert "MACs per output position (input width unknown) 1152 → 144" in records(p)[0].detail


@pytest.mark.parametrize("kernel", [(1, 3), (3, 1), (1, 1)])
def test_refuses_kernels_with_nothing_to_split(kernel):
    model = conv_model(RNG.standard_normal((8, 8, *kernel)))
    assert refused_only(model) == [f"a {kernel[0]}×{kernel[1]} kernel has nothing to split"]


def test_refuses_grouped_and_depthwise_convs():
    grouped = conv_model(RNG.standard_normal((8, 4, 3, 3)), group=2, pads=[1, 1, 1, 1])
    assert refused_only(grouped) == ["grouped Conv (group=2): split-spatial handles group=1 Convs only"]
    depthwise = conv_model(RNG.standard_normal((8, 1, 3, 3)), group=8, pads=[1, 1, 1, 1])
    assert refused_only(depthwise) == ["depthwise Conv (group=8): split-spatial handles group=1 Convs only"]


def test_refuses_1d_and_3d_convs():
    one = conv_model(RNG.standard_normal((8, 4, 3)), size=(10,))
    assert "1-D Conv" in refused_only(one)[0]
    three = conv_model(RNG.standard_normal((8, 4, 3, 3, 3)), size=(5, 6, 7))
    assert "3-D Conv" in refused_only(three)[0]


def test_refuses_weights_that_are_not_constant():
    b = Builder()
    x = b.input("x", ["N", 4, 8, 8])
    w = b.input("w", [8, 4, 3, 3])
    y = b.op("Conv", [x, w], name="conv")
    y.name = "y"
    assert refused_only(b.model([y])) == ["weight 'w' is a graph input, not a constant"]

    b = Builder()
    x = b.input("x", ["N", 4, 8, 8])
    w = b.op("Identity", [b.init("W", low_rank_weight(8, 4, 3, 3, 1))], name="id")
    y = b.op("Conv", [x, w], name="conv")
    y.name = "y"
    assert "is not a constant initializer" in refused_only(b.model([y]))[0]


def test_refuses_a_shared_weight():
    b = Builder()
    x = b.input("x", ["N", 8, 8, 8])
    w = b.init("W", low_rank_weight(8, 8, 3, 3, 1))
    h = b.op("Conv", [x, w], name="c1", pads=[1, 1, 1, 1])
    y = b.op("Conv", [h, w], name="c2", pads=[1, 1, 1, 1])
    y.name = "y"
    reasons = refused_only(b.model([y]))
    assert reasons[0] == "weight 'W' is shared with 'c2' (it would stay, nothing saved)"


def test_refuses_same_padding_of_an_unknown_size():
    model = conv_model(low_rank_weight(16, 8, 3, 3, 2), spatial_names=["H", "W"], auto_pad="SAME_UPPER")
    (reason,) = refused_only(model)
    assert reason.startswith("auto_pad=SAME_UPPER and the input's spatial size is unknown")


def test_exclude_min_params_and_zero_weights():
    model = conv_model(low_rank_weight(16, 8, 3, 3, 2), name="stem.conv")
    assert refused_only(model, SplitSpatialOptions(exclude=r"^stem\.")) == [r"excluded by exclude=^stem\."]
    assert refused_only(model, SplitSpatialOptions(min_params=2000)) == [
        "its weight has 1152 parameters, fewer than min_params=2000"]
    assert refused_only(conv_model(np.zeros((8, 4, 3, 3)))) == ["its weight is all zeros"]


# ---------------------------------------------------------------------------- options, candidates, API


@pytest.mark.parametrize("kwargs, text", [
    ({"rank": -1}, "option 'rank' must be 0"),
    ({"energy": 0.0}, "option 'energy' must lie in (0, 1]"),
    ({"energy": 1.5}, "option 'energy' must lie in (0, 1]"),
    ({"exclude": "("}, "option 'exclude' is not a valid regular expression"),
    ({"min_params": -3}, "option 'min_params' must be 0 or more"),
])
def test_invalid_options(kwargs, text):
    with pytest.raises(OptionError, match=None) as info:
        SplitSpatialOptions(**kwargs)
    assert str(info.value).startswith("split-spatial: ") and text in str(info.value)


def test_options_in_pipeline_strings():
    assert str(Pipeline.parse("split-spatial{energy=0.9,rank=0}")).endswith("split-spatial{energy=0.9}")
    with pytest.raises(OptionError, match="'energy' must be a number"):
        Pipeline.parse("split-spatial{energy=lots}")
    with pytest.raises(OptionError, match="unknown option 'ranks'"):
        Pipeline.parse("split-spatial{ranks=3}")


def test_candidates_name_what_would_be_split_without_changing_the_model():
    b = Builder()
    x = b.input("x", ["N", 3, 10, 10])
    h = b.op("Conv", [x, b.init("W1", RNG.standard_normal((16, 3, 3, 3)).astype(np.float32))], name="trap", pads=[1, 1, 1, 1])
    y = b.op("Conv", [h, b.init("W2", low_rank_weight(16, 16, 3, 3, 2))], name="lowrank", pads=[1, 1, 1, 1])
    y.name = "y"
    model = b.model([y])
    before = ir.to_proto(model).SerializeToString()
    found = SplitSpatial(SplitSpatialOptions(energy=1.0)).candidates(model)
    assert [(c.node, c.pass_name) for c in found] == [("lowrank", "split-spatial")]
    assert "D=2" in found[0].what and "parameters 2304 → 192" in found[0].what
    assert ir.to_proto(model).SerializeToString() == before


def test_compress_reports_rank_and_marks_lineage():
    model = conv_model(low_rank_weight(16, 8, 3, 3, 2), pads=[1, 1, 1, 1])
    feeds = random_feeds(model, seed=4)
    before = run(model, feeds)
    result = onnxcompress.compress(ir.to_proto(model), "split-spatial{energy=1.0}")
    entry = result.report.passes[-1]
    assert entry.name == "split-spatial" and entry.status == "changed"
    assert entry.rewritten == 1 and "D=2" in entry.records[0].detail
    new = [n for n in result.model.graph if n.op_type == "Conv"]
    assert [n.metadata_props.get(LINEAGE_KEY) for n in new] == ["split-spatial", "split-spatial"]
    assert_close(before, run(result.model, feeds), rel=1e-5)


# ---------------------------------------------------------------------------- real models


def _evaluate(name: str, model: ir.Model, tmp_path, limit=None) -> float:
    path = os.fspath(tmp_path / f"{name}.onnx")
    ir.save(model, path)
    import models

    metrics = models.evaluate(name, path, limit=limit)
    return metrics["accuracy"]


@pytest.mark.real_model
def test_digits_full_rank_split_keeps_accuracy_and_energy_split_shrinks(tmp_path):
    import models

    path = models.fetch("digits_cnn")
    base = onnxcompress.compress(path, "default").model
    base_acc = _evaluate("digits_cnn", base, tmp_path)
    exact = clone(base)
    for node in [n for n in exact.graph if n.op_type == "Conv"]:
        n, c, kh, kw = node.inputs[1].const_value.shape
        split_conv(exact, node, min(c * kh, n * kw))
    check(exact)
    assert round(_evaluate("digits_cnn", exact, tmp_path), 4) == round(base_acc, 4)

    result = onnxcompress.compress(path, "split-spatial{energy=0.9}")
    entry = result.report.passes[-1]
    assert entry.rewritten == 2 and entry.refused == 1
    stem = next(r for r in entry.records if r.action == "refused")
    assert stem.node == "/features/features.0/Conv" and "parameters 288 → 297" in stem.detail
    assert result.report.passes[-1].cost["params"] < result.report.passes[-2].cost["params"]
    assert _evaluate("digits_cnn", result.model, tmp_path) >= base_acc - 0.02


@pytest.mark.real_model
def test_fmnist_energy_split(tmp_path):
    import models

    path = models.fetch("fmnist_cnn")
    base_acc = _evaluate("fmnist_cnn", onnxcompress.compress(path, "default").model, tmp_path, limit=2000)
    result = onnxcompress.compress(path, "split-spatial{energy=0.9}")
    entry = result.report.passes[-1]
    assert entry.rewritten == 3 and entry.refused == 1
    assert _evaluate("fmnist_cnn", result.model, tmp_path, limit=2000) >= base_acc - 0.02
    # at the default energy no 3×3 conv of it pays: every one is refused, with the numbers
    entry = onnxcompress.compress(path, "split-spatial").report.passes[-1]
    assert entry.rewritten == 0 and all("would not shrink it: parameters" in r.detail for r in entry.records)


@pytest.mark.real_model
def test_mobilenet_v2_depthwise_refused_and_stem_refused_by_cost_at_exact_rank():
    import models

    path = models.fetch("mobilenet_v2")
    entry = onnxcompress.compress(path, "split-spatial{energy=1.0}").report.passes[-1]
    assert entry.rewritten == 0
    reasons = {r.node: r.detail for r in entry.records}
    stem = reasons.pop("/features/features.0/features.0.0/Conv")
    assert "D=9" in stem and "parameters 864 → 945" in stem and "MACs 10838016 → 12870144" in stem
    depthwise = [d for d in reasons.values() if d.startswith("depthwise Conv")]
    assert len(depthwise) == 17 and all("group=1 Convs only" in d for d in depthwise)
    assert sum(d == "a 1×1 kernel has nothing to split" for d in reasons.values()) == 34
    # at the default energy (0.99) 7 of 9 terms suffice, and the stem does shrink
    entry = onnxcompress.compress(path, "split-spatial").report.passes[-1]
    assert entry.rewritten == 1 and "parameters 864 → 735" in entry.records[0].detail


def test_split_conv_raises_on_a_conv_it_cannot_split():
    model = conv_model(RNG.standard_normal((8, 8, 1, 3)))
    with pytest.raises(ValueError, match="conv: a 1×3 kernel has nothing to split"):
        split_conv(model, find_node(model, "conv"), 2)
