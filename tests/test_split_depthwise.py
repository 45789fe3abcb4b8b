"""split-depthwise: k×k Conv C→N → depthwise k×k (multiplier m, group=C) + pointwise 1×1 (C·m→N).

Exact limits: at m = min(N, k²) the kernels compose back to W and the split graph reproduces the
Conv for every geometry (via ``split_conv``, which bypasses the cost rule: that m never pays);
through the pass, weights whose per-channel N×k² slices have rank r are split exactly at m = r.
Then every refusal, the options, candidates, the pipeline API (lineage), and the real models.
"""

from __future__ import annotations

import os

import numpy as np
import onnx_ir as ir
import pytest
from onnxcompress.passes.split_depthwise import (
    SplitDepthwise,
    SplitDepthwiseOptions,
    channel_slices,
    compose,
    depthwise_factors,
    split_conv,
)

import onnxcompress
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

RNG = np.random.default_rng(11)


def conv_model(weight, size=(10, 12), bias=True, name="conv", spatial_names=None, **attrs) -> ir.Model:
    return graphs.conv_model(weight, size, bias, name, spatial_names, rng=RNG, **attrs)


def slice_rank_weight(n, c, kernel, rank, seed=0) -> np.ndarray:
    """A weight whose every per-channel N×K slice has rank ``rank``."""
    rng = np.random.default_rng(seed)
    k = int(np.prod(kernel))
    slices = np.einsum("cnr,crk->cnk", rng.standard_normal((c, n, rank)), rng.standard_normal((c, rank, k)))
    return (0.3 * slices).transpose(1, 0, 2).reshape(n, c, *kernel).astype(np.float32)


def split_and_compare(model: ir.Model, options: SplitDepthwiseOptions, rel: float = 1e-5) -> SplitDepthwise:
    return apply_and_compare(model, SplitDepthwise(options), rel)


# ---------------------------------------------------------------------------- the math


def test_slice_layout():
    w = RNG.standard_normal((4, 3, 2, 5))
    s = channel_slices(w)
    assert s.shape == (3, 4, 10)
    assert s[1, 2, 1 * 5 + 3] == w[2, 1, 1, 3]


@pytest.mark.parametrize("shape", [(6, 4, 3, 3), (16, 3, 3, 3), (4, 5, 3, 3), (5, 2, 7), (3, 2, 2, 2, 3)])
def test_full_multiplier_factors_compose_back_to_the_weight(shape):
    w = RNG.standard_normal(shape)
    n, c = shape[:2]
    m = min(n, int(np.prod(shape[2:])))
    depthwise, pointwise, _s = depthwise_factors(w, m)
    assert depthwise.shape == (c * m, 1, *shape[2:])
    assert pointwise.shape == (n, c * m, *([1] * (len(shape) - 2)))
    np.testing.assert_allclose(compose(depthwise, pointwise, c), w, atol=1e-12)


def test_pointwise_column_c_times_m_plus_j_pairs_with_depthwise_filter_c_times_m_plus_j():
    w = RNG.standard_normal((5, 3, 3, 3))
    depthwise, pointwise, _ = depthwise_factors(w, 2)
    c, m = 1, 2
    part = sum(np.multiply.outer(pointwise[:, c * m + j, 0, 0], depthwise[c * m + j, 0]) for j in range(m))
    np.testing.assert_allclose(part, compose(depthwise, pointwise, 3)[:, c], atol=1e-12)


def test_truncation_error_is_the_dropped_energy_of_every_channel():
    w = RNG.standard_normal((8, 6, 3, 3))
    depthwise, pointwise, s = depthwise_factors(w, 4)
    err = np.linalg.norm(compose(depthwise, pointwise, 6) - w) ** 2
    np.testing.assert_allclose(err, np.sum(s[:, 4:] ** 2), rtol=1e-9)


# ---------------------------------------------------------------------------- exact limits in the graph

GEOMETRIES = [
    {"pads": [1, 1, 1, 1]},
    {"pads": [0, 2, 1, 1]},
    {"pads": [2, 1, 0, 3], "strides": [2, 2]},
    {"pads": [1, 1, 1, 1], "strides": [2, 1], "dilations": [2, 2]},
    {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
    {"auto_pad": "SAME_LOWER", "strides": [2, 3]},
    {"auto_pad": "VALID"},
]


@pytest.mark.parametrize("attrs", GEOMETRIES, ids=lambda a: ",".join(f"{k}={v}" for k, v in a.items()))
@pytest.mark.parametrize("kernel", [(3, 3), (5, 3), (1, 3)])
def test_full_multiplier_split_reproduces_every_geometry(attrs, kernel):
    model = conv_model(RNG.standard_normal((6, 4, *kernel)), size=(11, 13), **attrs)
    feeds = random_feeds(model, seed=2)
    before = run(model, feeds)
    dw, pw = split_conv(model, find_node(model, "conv"), min(6, kernel[0] * kernel[1]))
    assert ops(model) == ["Conv", "Conv"]
    assert dw.attributes["group"].as_int() == 4 and pw.attributes["kernel_shape"].as_ints() == (1, 1)
    check(model)
    assert_close(before, run(model, feeds), rel=1e-5)


@pytest.mark.parametrize("kernel, size, attrs", [
    ((5,), (17,), {"pads": [2, 1], "strides": [2]}),
    ((3, 3, 2), (5, 6, 7), {"pads": [1, 0, 1, 1, 2, 0], "dilations": [1, 2, 1]}),
])
def test_1d_and_3d_convs_split_exactly(kernel, size, attrs):
    model = conv_model(RNG.standard_normal((5, 3, *kernel)), size=size, **attrs)
    feeds = random_feeds(model, seed=2)
    before = run(model, feeds)
    split_conv(model, find_node(model, "conv"), min(5, int(np.prod(kernel))))
    check(model)
    assert_close(before, run(model, feeds), rel=1e-5)


def test_same_padding_of_an_unknown_size_is_kept_and_exact_at_any_size():
    model = conv_model(slice_rank_weight(12, 4, (3, 3), 2), spatial_names=["H", "W"], auto_pad="SAME_UPPER", strides=[2, 2])
    reference = clone(model)
    p = SplitDepthwise(SplitDepthwiseOptions(energy=1.0))
    assert p(model).modified
    assert model.graph.node(0).attributes["auto_pad"].as_string() == "SAME_UPPER"
    assert "MACs per output position (output size unknown) 432 → 168" in records(p)[0].detail
    check(model)
    for h, w in ((9, 11), (10, 12)):
        feeds = {"x": RNG.standard_normal((2, 4, h, w)).astype(np.float32)}
        assert_close(run(reference, feeds), run(model, feeds), rel=1e-5)


def test_pass_is_exact_with_multiplier_one_for_rank_one_slices():
    model = conv_model(slice_rank_weight(16, 8, (3, 3), 1), pads=[1, 1, 1, 1])
    p = split_and_compare(model, SplitDepthwiseOptions())
    (rec,) = records(p, "rewritten")
    assert "m=1 of at most 9 (largest slice rank 1)" in rec.detail
    assert "parameters 1152 → 200, MACs 138240 → 24000" in rec.detail
    dw, pw = model.graph.node(0), model.graph.node(1)
    assert tuple(dw.inputs[1].const_value.shape) == (8, 1, 3, 3) and dw.attributes["group"].as_int() == 8
    assert tuple(pw.inputs[1].const_value.shape) == (16, 8, 1, 1) and pw.inputs[2].name == "b"
    assert model.graph.outputs[0].name == "y" and "W" not in model.graph.initializers


def test_pass_is_exact_at_the_slice_rank_with_strides_dilations_and_asymmetric_pads():
    model = conv_model(slice_rank_weight(32, 6, (3, 3), 2, seed=3), bias=False, pads=[0, 2, 1, 1], strides=[2, 1], dilations=[1, 2])
    p = split_and_compare(model, SplitDepthwiseOptions(energy=1.0))
    assert "m=2" in records(p)[0].detail
    mid = model.graph.node(0).outputs[0]
    assert list(mid.shape)[1:] == [12, 5, 11]


def test_energy_picks_the_fewest_terms_over_all_channels():
    w = RNG.standard_normal((32, 8, 3, 3)).astype(np.float32)
    model = conv_model(w)
    p = SplitDepthwise(SplitDepthwiseOptions(energy=0.6))
    assert p(model).modified
    s = np.linalg.svd(channel_slices(w), compute_uv=False)
    kept = np.cumsum(np.sum(s**2, axis=0)) / np.sum(s**2)
    m = int(np.argmax(kept >= 0.6)) + 1
    assert f"m={m} of" in records(p)[0].detail and f"energy kept {kept[m - 1]:.4f}" in records(p)[0].detail


# ---------------------------------------------------------------------------- refusals


def refused_only(model: ir.Model, options: SplitDepthwiseOptions | None = None) -> list[str]:
    options = options or SplitDepthwiseOptions()
    before = ir.to_proto(model).SerializeToString()
    p = SplitDepthwise(options)
    assert not p(model).modified
    assert ir.to_proto(model).SerializeToString() == before
    return refusals(p)


def test_the_exact_multiplier_never_pays():
    model = conv_model(RNG.standard_normal((16, 8, 3, 3)), pads=[1, 1, 1, 1])
    (reason,) = refused_only(model, SplitDepthwiseOptions(energy=1.0))
    assert "multiplier m=9" in reason and "parameters 1152 → 1800, MACs 138240 → 216000" in reason


def test_a_multiplier_beyond_min_n_k2_is_refused_with_the_numbers():
    model = conv_model(RNG.standard_normal((4, 8, 3, 3)), pads=[1, 1, 1, 1])
    (reason,) = refused_only(model, SplitDepthwiseOptions(multiplier=5))
    assert "parameters 288 → 520" in reason and "m=5 exceeds min(N, k²) = 4" in reason


def test_refuses_pointwise_depthwise_and_grouped_convs():
    assert refused_only(conv_model(RNG.standard_normal((8, 4, 1, 1)))) == ["a 1×1 kernel is already pointwise"]
    assert refused_only(conv_model(RNG.standard_normal((8, 4, 1)), size=(9,))) == ["a 1 kernel is already pointwise"]
    depthwise = conv_model(RNG.standard_normal((8, 1, 3, 3)), group=8, pads=[1, 1, 1, 1])
    assert refused_only(depthwise) == ["depthwise Conv (group=8): already depthwise, nothing to split"]
    grouped = conv_model(RNG.standard_normal((8, 2, 3, 3)), group=2, pads=[1, 1, 1, 1])
    assert refused_only(grouped) == ["grouped Conv (group=2): split-depthwise handles group=1 Convs only"]


def test_refuses_weights_that_are_not_constant_or_shared():
    b = Builder()
    x = b.input("x", ["N", 4, 8, 8])
    y = b.op("Conv", [x, b.input("w", [8, 4, 3, 3])], name="conv")
    y.name = "y"
    assert refused_only(b.model([y])) == ["weight 'w' is a graph input, not a constant"]

    b = Builder()
    x = b.input("x", ["N", 8, 8, 8])
    w = b.init("W", slice_rank_weight(8, 8, (3, 3), 1))
    h = b.op("Conv", [x, w], name="c1", pads=[1, 1, 1, 1])
    y = b.op("Conv", [h, w], name="c2", pads=[1, 1, 1, 1])
    y.name = "y"
    assert refused_only(b.model([y]))[1] == "weight 'W' is shared with 'c1' (it would stay, nothing saved)"


def test_exclude_min_params_and_zero_weights():
    model = conv_model(slice_rank_weight(16, 8, (3, 3), 1), name="stem.conv")
    assert refused_only(model, SplitDepthwiseOptions(exclude="stem")) == ["excluded by exclude=stem"]
    assert refused_only(model, SplitDepthwiseOptions(min_params=1153)) == [
        "its weight has 1152 parameters, fewer than min_params=1153"]
    assert refused_only(conv_model(np.zeros((8, 4, 3, 3)))) == ["its weight is all zeros"]


# ---------------------------------------------------------------------------- options, candidates, API


@pytest.mark.parametrize("kwargs, text", [
    ({"multiplier": -1}, "option 'multiplier' must be 0"),
    ({"energy": 0.0}, "option 'energy' must lie in (0, 1]"),
    ({"energy": 1.01}, "option 'energy' must lie in (0, 1]"),
    ({"exclude": "[a-"}, "option 'exclude' is not a valid regular expression"),
    ({"min_params": -1}, "option 'min_params' must be 0 or more"),
])
def test_invalid_options(kwargs, text):
    with pytest.raises(OptionError) as info:
        SplitDepthwiseOptions(**kwargs)
    assert str(info.value).startswith("split-depthwise: ") and text in str(info.value)


def test_options_in_pipeline_strings():
    assert str(Pipeline.parse("split-depthwise{multiplier=2}")).endswith("split-depthwise{multiplier=2}")
    with pytest.raises(OptionError, match="'multiplier' must be an integer"):
        Pipeline.parse("split-depthwise{multiplier=two}")


def test_candidates_name_what_would_be_split_without_changing_the_model():
    b = Builder()
    x = b.input("x", ["N", 8, 10, 10])
    h = b.op("Conv", [x, b.init("W1", RNG.standard_normal((16, 8, 3, 3)).astype(np.float32))], name="dense", pads=[1, 1, 1, 1])
    y = b.op("Conv", [h, b.init("W2", slice_rank_weight(16, 16, (3, 3), 1))], name="separable", pads=[1, 1, 1, 1])
    y.name = "y"
    model = b.model([y])
    before = ir.to_proto(model).SerializeToString()
    found = SplitDepthwise(SplitDepthwiseOptions(energy=1.0)).candidates(model)
    assert [(c.node, c.pass_name) for c in found] == [("separable", "split-depthwise")]
    assert "m=1" in found[0].what and "parameters 2304 → 400" in found[0].what
    assert ir.to_proto(model).SerializeToString() == before


def test_compress_reports_multiplier_and_marks_lineage():
    model = conv_model(slice_rank_weight(16, 8, (3, 3), 2), pads=[1, 1, 1, 1])
    feeds = random_feeds(model, seed=4)
    before = run(model, feeds)
    result = onnxcompress.compress(ir.to_proto(model), "split-depthwise{energy=1.0}")
    entry = result.report.passes[-1]
    assert entry.name == "split-depthwise" and entry.status == "changed"
    assert entry.rewritten == 1 and "m=2" in entry.records[0].detail
    new = [n for n in result.model.graph if n.op_type == "Conv"]
    assert [n.metadata_props.get(LINEAGE_KEY) for n in new] == ["split-depthwise", "split-depthwise"]
    assert_close(before, run(result.model, feeds), rel=1e-5)


# ---------------------------------------------------------------------------- real models


def _accuracy(name: str, model: ir.Model, tmp_path, limit=None) -> float:
    import models

    path = os.fspath(tmp_path / f"{name}.onnx")
    ir.save(model, path)
    return models.evaluate(name, path, limit=limit)["accuracy"]


@pytest.mark.real_model
def test_digits_exact_split_keeps_accuracy_and_multiplier_six_shrinks(tmp_path):
    import models

    path = models.fetch("digits_cnn")
    base = onnxcompress.compress(path, "default").model
    base_acc = _accuracy("digits_cnn", base, tmp_path)
    exact = clone(base)
    for node in [n for n in exact.graph if n.op_type == "Conv"]:
        split_conv(exact, node, 9)
    check(exact)
    assert round(_accuracy("digits_cnn", exact, tmp_path), 4) == round(base_acc, 4)

    entry = onnxcompress.compress(path, "split-depthwise").report.passes[-1]  # energy 0.99 → m=9
    assert entry.rewritten == 0 and all("multiplier m=9" in r.detail for r in entry.records)

    result = onnxcompress.compress(path, r"split-depthwise{multiplier=6,exclude=features\.0/}")
    entry = result.report.passes[-1]
    assert entry.rewritten == 2 and entry.records[0].detail == r"excluded by exclude=features\.0/"
    assert result.report.passes[-1].cost["params"] < result.report.passes[-2].cost["params"] - 20000
    assert _accuracy("digits_cnn", result.model, tmp_path) >= base_acc - 0.02


@pytest.mark.real_model
def test_fmnist_multiplier_seven(tmp_path):
    import models

    path = models.fetch("fmnist_cnn")
    base_acc = _accuracy("fmnist_cnn", onnxcompress.compress(path, "default").model, tmp_path, limit=2000)
    result = onnxcompress.compress(path, r"split-depthwise{multiplier=7,exclude=features\.0/}")
    entry = result.report.passes[-1]
    assert entry.rewritten == 3 and entry.refused == 1
    assert _accuracy("fmnist_cnn", result.model, tmp_path, limit=2000) >= base_acc - 0.02


@pytest.mark.real_model
def test_mobilenet_v2_depthwise_and_pointwise_convs_are_left_alone_with_reasons():
    import models

    entry = onnxcompress.compress(models.fetch("mobilenet_v2"), "split-depthwise").report.passes[-1]
    assert entry.rewritten == 0 and entry.refused == 52
    reasons = [r.detail for r in entry.records]
    assert sum(d.startswith("depthwise Conv (group=") and d.endswith("already depthwise, nothing to split") for d in reasons) == 17
    assert sum(d == "a 1×1 kernel is already pointwise" for d in reasons) == 34
    assert "parameters 864 → 984" in reasons[0]  # the 3-channel stem at m=8


def test_split_conv_raises_on_a_conv_it_cannot_split():
    model = conv_model(RNG.standard_normal((8, 1, 3, 3)), group=8)
    with pytest.raises(ValueError, match="conv: depthwise Conv"):
        split_conv(model, find_node(model, "conv"), 2)


def test_float16_weights_stay_float16():
    b = Builder()
    x = b.input("x", ["N", 8, 6, 6], dtype=ir.DataType.FLOAT16)
    w = b.init("W", slice_rank_weight(16, 8, (3, 3), 1).astype(np.float16))
    y = b.op("Conv", [x, w], name="conv", pads=[1, 1, 1, 1])
    y.name = "y"
    model = b.model([y], dtype=ir.DataType.FLOAT16)
    feeds = random_feeds(model, seed=5)
    before = run(model, feeds)
    assert SplitDepthwise()(model).modified
    assert {n.inputs[1].const_value.dtype for n in model.graph} == {ir.DataType.FLOAT16}
    check(model)
    assert_close(before, run(model, feeds), rel=5e-3)
