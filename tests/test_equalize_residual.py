"""equalize-residual: exact in float, channel ranges balanced, the balanced limit, every refusal.

Exact limit: the outputs stay within 1e-5 (relative); a stream whose scales are all 1 (alpha=0
with equal weight ranges of its readers) is left alone byte for byte.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from onnxcompress.errors import CalibrationError, OptionError
from onnxcompress.options import parse_options
from onnxcompress.pass_base import PassContext
from onnxcompress.passes.equalize_residual import EqualizeResidual, EqualizeResidualOptions
from tests.graphs import Builder, apply_and_compare, assert_left_alone, random_feeds, records, run

C = 6


def _weights(rng, n, c, k=1, spread=None):
    """Random n×c×k×k weights, output channel i scaled by spread[i]."""
    w = rng.standard_normal((n, c, k, k)) * 0.3
    if spread is not None:
        w = w * np.asarray(spread, np.float64).reshape(-1, 1, 1, 1)
    return w.astype(np.float32)


def residual_net(seed=0, spread=(1, 1, 1, 20, 1, 1), reader="conv", output_in_stream=False, shared=False,
                 reader_weights=None) -> ir.Model:
    """x → stem conv (channel ranges ``spread``) = P → relu(conv_a(P)) → conv_b → Q;
    S = Add(P, Q) → reader (a 1×1 conv by default) → y."""
    rng = np.random.default_rng(seed)
    b = Builder()
    x = b.input("x", [1, 3, 8, 8])
    stem_w = b.init("stem_w", _weights(rng, C, 3, 3, spread))
    p = b.op("Conv", [x, stem_w, b.init("stem_b", rng.standard_normal(C).astype(np.float32))], name="stem",
             pads=[1, 1, 1, 1])
    a_w = reader_weights[0] if reader_weights is not None else _weights(rng, 8, C)
    h = b.op("Relu", [b.op("Conv", [p, b.init("a_w", a_w), b.init("a_b", np.zeros(8, np.float32))], name="conv_a")],
             name="relu_a")
    q = b.op("Conv", [h, b.init("b_w", _weights(rng, C, 8)), b.init("b_b", rng.standard_normal(C).astype(np.float32) * 0.1)],
             name="conv_b")
    s = b.op("Add", [p, q], name="residual", output_names=["s"] if output_in_stream else None)
    if reader == "conv":
        c_w = b.init("c_w", reader_weights[1] if reader_weights is not None else _weights(rng, 4, C))
        y = b.op("Conv", [s, c_w], name="reader", output_names=["y"])
        if shared:  # a second reader of the same weight tensor
            return b.model([y, b.op("Conv", [s, c_w], name="reader2", output_names=["y2"])])
    else:
        y = b.op(reader, [s], name="reader", output_names=["y"])
    return b.model([y, s] if output_in_stream else [y])


def _pass(model, **options) -> EqualizeResidual:
    feeds = [random_feeds(model, seed=i) for i in range(6)]
    return EqualizeResidual(parse_options(EqualizeResidualOptions, {k: str(v) for k, v in options.items()}),
                            PassContext(calibration=feeds))


def _stream_ratio(model, feeds) -> float:
    """Largest / median channel range of the residual sum (the graph's tensor read by 'reader')."""
    reader = next(n for n in model.graph if n.name == "reader")
    name = reader.inputs[0].name
    from onnxcompress.activations import capture

    values = np.concatenate(capture(model, [name], feeds)[name])
    r = np.abs(values).max(axis=(0, 2, 3))
    return float(r.max() / np.median(r))


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_exact_in_float_and_the_stream_is_balanced(alpha):
    model = residual_net()
    feeds = [random_feeds(model, seed=i) for i in range(6)]
    before = _stream_ratio(model, feeds)
    pass_ = apply_and_compare(model, _pass(model, alpha=alpha))
    after = _stream_ratio(model, feeds)
    assert after < before / 3, (before, after)  # one channel 20× the others, before
    detail = records(pass_, "rewritten")[0].detail
    assert records(pass_, "rewritten")[0].node == "stem"
    assert "stream of 3 tensors, 6 channels, 2 writers, 2 readers" in detail
    assert next(n for n in model.graph if n.name == "residual").outputs[0].name.endswith("_balanced")


def test_the_weights_move_as_the_rule_says():
    """s_c = r_c^alpha / w_c^(1-alpha), geometric mean 1: writers' rows divided, readers' columns multiplied."""
    model = residual_net()
    stem_w = next(n for n in model.graph if n.name == "stem").inputs[1].const_value.numpy().copy()
    a_w = next(n for n in model.graph if n.name == "conv_a").inputs[1].const_value.numpy().copy()
    pass_ = _pass(model)
    assert pass_(model).modified
    new_stem = next(n for n in model.graph if n.name == "stem").inputs[1].const_value.numpy()
    new_a = next(n for n in model.graph if n.name == "conv_a").inputs[1].const_value.numpy()
    s = stem_w[:, 0, 0, 0] / new_stem[:, 0, 0, 0]
    np.testing.assert_allclose(new_a[0, :, 0, 0] / a_w[0, :, 0, 0], s, rtol=1e-5)
    np.testing.assert_allclose(np.exp(np.mean(np.log(s))), 1.0, rtol=1e-5)
    assert s[3] == pytest.approx(s.min(), rel=1e-6) or s[3] == pytest.approx(s.max(), rel=1e-6)
    assert s[3] > 1  # the wide channel is divided down


def test_a_balanced_stream_is_left_alone():
    """alpha=0 and readers whose input channels all reach the same magnitude: every s_c is 1."""
    rng = np.random.default_rng(3)
    flat = [np.where(rng.random((n, C, 1, 1)) < 0.5, -0.5, 0.5).astype(np.float32) for n in (8, 4)]
    model = residual_net(reader_weights=flat)
    assert_left_alone(_pass(model, alpha=0), model, "already balanced within tolerance", "stem")


@pytest.mark.parametrize("reader, reason", [
    ("Relu", "is read by Relu 'reader'"),
    ("GlobalAveragePool", "is read by GlobalAveragePool 'reader'"),
])
def test_a_stream_read_by_another_op_is_refused(reader, reason):
    model = residual_net(reader=reader)
    assert_left_alone(_pass(model), model, reason, "stem")


def test_a_stream_that_is_a_graph_output_is_refused():
    model = residual_net(output_in_stream=True)
    assert_left_alone(_pass(model), model, "'s' is a graph output", "stem")


def test_a_shared_weight_is_refused():
    model = residual_net(shared=True)
    assert_left_alone(_pass(model), model, "'c_w' of 'reader' is also read by another node", "stem")


def test_exclude_leaves_the_stream_alone():
    model = residual_net()
    assert_left_alone(_pass(model, exclude="^conv_b$"), model, "excluded by exclude=^conv_b$", "stem")


def test_without_calibration_one_clear_error():
    with pytest.raises(CalibrationError, match="equalize-residual needs calibration data"):
        EqualizeResidual()(residual_net())


def test_a_model_without_streams_needs_no_data_and_is_unchanged():
    b = Builder()
    x = b.input("x", [1, 3, 4, 4])
    y = b.op("Conv", [x, b.init("w", np.ones((2, 3, 1, 1), np.float32))], name="conv", output_names=["y"])
    model = b.model([y])
    assert not EqualizeResidual()(model).modified


@pytest.mark.parametrize("options, message", [({"alpha": "1.5"}, "alpha"), ({"tolerance": "-1"}, "tolerance"),
                                              ({"exclude": "("}, "exclude")])
def test_bad_options_are_one_clear_error(options, message):
    with pytest.raises(OptionError, match=message):
        parse_options(EqualizeResidualOptions, options)


def test_outputs_match_on_other_inputs_too():
    """Exact on any input, not only the calibration feeds (the rewrite is linear)."""
    model = residual_net(seed=5)
    reference = ir.from_proto(ir.to_proto(model))
    assert _pass(model)(model).modified
    for seed in (11, 12):
        feeds = random_feeds(model, seed=seed)
        for e, a in zip(run(reference, feeds), run(model, feeds)):
            np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-5 * np.abs(e).max())
