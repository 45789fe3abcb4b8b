"""quantize-dynamic on LSTMs: DynamicQuantizeLSTM's weights, its exact limit, and every refusal.

The exact limit is on the weights: W and R already on their int8 grid are stored so that the
codes times the scales give them back bit for bit. The outputs then differ from the float
LSTM only by what onnxruntime's kernel quantizes at run time (the input and the hidden state,
each step, to uint8), which the tests bound.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnxcompress.passes.quantize_dynamic import QuantizeDynamic, QuantizeDynamicOptions

from tests.graphs import Builder, assert_left_alone, check, clone, find_node, ops, records, run

T, BATCH, INPUT, HIDDEN = 7, 2, 12, 16
# Largest output difference, relative to the output's largest magnitude, that the run-time
# uint8 quantization of the input and the hidden state leaves on these layers (measured up to
# 0.024 with weights on their grid).
ACTIVATION_ERROR = 0.03


def on_int8_rows(shape, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(w, scale)``: a [directions, 4·hidden, columns] weight whose gate rows lie on their
    int8 grid (each reaching ±127), and those rows' scales."""
    rng = np.random.default_rng(seed)
    directions, rows, columns = shape
    q = rng.integers(-127, 128, shape)
    q[np.arange(directions)[:, None], np.arange(rows)[None, :], rng.integers(0, columns, (directions, rows))] = 127
    scale = rng.uniform(0.001, 0.004, (directions, rows)).astype(np.float32)
    return (q * scale[..., None]).astype(np.float32), scale


def lstm_model(w, r, direction="forward", layout=None, op="LSTM", gates=4, extra_reader=False) -> ir.Model:
    directions = w.shape[0]
    rng = np.random.default_rng(5)
    b = Builder()
    x = b.input("x", [T, BATCH, INPUT])
    h0 = b.input("h0", [directions, BATCH, HIDDEN])
    inputs = [x, b.init("W", w), b.init("R", r),
              b.init("B", (rng.standard_normal((directions, 2 * gates * HIDDEN)) * 0.1).astype(np.float32)),
              None, h0]
    attrs = {"hidden_size": HIDDEN, "direction": direction}
    if layout is not None:
        attrs["layout"] = layout
    outs = b.op(op, inputs, name="rnn", num_outputs=2, output_names=["y", "y_h"], **attrs)
    outputs = list(outs)
    if extra_reader:
        outputs.append(b.op("ReduceSum", [inputs[1]], name="reader", output_names=["w_sum"], keepdims=0))
    return b.model(outputs)


def feeds(model: ir.Model, seed: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {v.name: rng.standard_normal([d if isinstance(d, int) else BATCH for d in v.shape]).astype(np.float32)
            for v in model.graph.inputs}


def apply(model: ir.Model, **options) -> QuantizeDynamic:
    p = QuantizeDynamic(QuantizeDynamicOptions(**options))
    p(model)
    return p


def stored_weight(model: ir.Model, name: str) -> np.ndarray:
    """A DynamicQuantizeLSTM weight as float, back in the LSTM's [directions, 4·hidden, columns]."""
    node = find_node(model, "rnn")
    index = {"W": (1, 8, 9), "R": (2, 10, 11)}[name]
    codes, scale, zero_point = (node.inputs[i].const_value.numpy() for i in index)
    q = codes.astype(np.int64) - (zero_point.astype(np.int64)[:, None, :] if zero_point.ndim == 2
                                  else zero_point.astype(np.int64)[:, None, None])
    per_row = scale[:, None, :] if scale.ndim == 2 else scale[:, None, None]
    return (q * per_row).astype(np.float32).transpose(0, 2, 1)


def relative_error(expected, actual) -> float:
    return max(float(np.abs(e - a).max() / np.abs(e).max()) for e, a in zip(expected, actual))


@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
def test_weights_on_their_grid_are_stored_exactly(direction):
    """Per gate row (``lstm_per_channel=true``): rows on their own int8 grids."""
    directions = 2 if direction == "bidirectional" else 1
    w, _ = on_int8_rows((directions, 4 * HIDDEN, INPUT), seed=1)
    r, _ = on_int8_rows((directions, 4 * HIDDEN, HIDDEN), seed=2)
    model = lstm_model(w, r, direction)
    original, x = clone(model), feeds(model)
    p = apply(model, lstm_per_channel=True)
    check(model)
    assert ops(model) == ["DynamicQuantizeLSTM"]
    node = find_node(model, "rnn")
    assert node.attributes["direction"].value == direction and node.attributes["hidden_size"].value == HIDDEN
    assert node.inputs[5].name == "h0" and node.inputs[4] is None  # optional inputs keep their places
    # The codes are the grid's integers; with their scales (max|row|/127, which can differ from
    # the scale the rows were made with by an ulp) they give the weights back to float rounding.
    np.testing.assert_allclose(stored_weight(model, "W"), w, rtol=3e-7, atol=0)
    np.testing.assert_allclose(stored_weight(model, "R"), r, rtol=3e-7, atol=0)
    # Only the run-time uint8 quantization of the input and hidden state remains.
    assert relative_error(run(original, x), run(model, x)) < ACTIVATION_ERROR
    (record,) = records(p, "rewritten")
    assert "per gate row" in record.detail
    assert node.inputs[1].const_value.dtype == ir.DataType.INT8 and node.inputs[8].const_value.shape == (directions, 4 * HIDDEN)


def test_per_direction_scales_by_default():
    w, _ = on_int8_rows((2, 4 * HIDDEN, INPUT), seed=1)
    r, _ = on_int8_rows((2, 4 * HIDDEN, HIDDEN), seed=2)
    scale = np.float32(0.01)
    w = (np.rint(w / np.abs(w).max(axis=(1, 2), keepdims=True) * 127) * scale).astype(np.float32)
    r = (np.rint(r / np.abs(r).max(axis=(1, 2), keepdims=True) * 127) * scale).astype(np.float32)
    model = lstm_model(w, r, "bidirectional")
    original, x = clone(model), feeds(model)
    (record,) = records(apply(model), "rewritten")
    assert "per direction" in record.detail
    node = find_node(model, "rnn")
    assert node.inputs[8].const_value.shape == (2,) and node.inputs[10].const_value.shape == (2,)
    np.testing.assert_allclose(stored_weight(model, "W"), w, rtol=3e-7, atol=0)
    np.testing.assert_allclose(stored_weight(model, "R"), r, rtol=3e-7, atol=0)
    assert relative_error(run(original, x), run(model, x)) < ACTIVATION_ERROR


def test_random_weights_stay_within_the_quantization_error():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((1, 4 * HIDDEN, INPUT)) * 0.3).astype(np.float32)
    r = (rng.standard_normal((1, 4 * HIDDEN, HIDDEN)) * 0.3).astype(np.float32)
    model = lstm_model(w, r)
    original, x = clone(model), feeds(model)
    apply(model, lstm_per_channel=True)
    stored = stored_weight(model, "W")
    step = np.abs(w).max(axis=2, keepdims=True) / 127
    assert np.all(np.abs(stored - w) <= step / 2 * (1 + 1e-6))  # half a step per gate row
    assert relative_error(run(original, x), run(model, x)) < ACTIVATION_ERROR + 0.01
    assert relative_error(run(original, x, optimize=True), run(model, x, optimize=True)) < ACTIVATION_ERROR + 0.01


@pytest.mark.parametrize("op,gates,reason", [
    ("GRU", 3, "onnxruntime has no dynamically quantized GRU kernel"),
    ("RNN", 1, "onnxruntime has no dynamically quantized RNN kernel"),
])
def test_gru_and_rnn_stay_float_with_the_reason(op, gates, reason):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((1, gates * HIDDEN, INPUT)) * 0.3).astype(np.float32)
    r = (rng.standard_normal((1, gates * HIDDEN, HIDDEN)) * 0.3).astype(np.float32)
    assert_left_alone(QuantizeDynamic(QuantizeDynamicOptions()), lstm_model(w, r, op=op, gates=gates), reason, "rnn")


def _weights():
    rng = np.random.default_rng(0)
    return ((rng.standard_normal((1, 4 * HIDDEN, INPUT)) * 0.3).astype(np.float32),
            (rng.standard_normal((1, 4 * HIDDEN, HIDDEN)) * 0.3).astype(np.float32))


@pytest.mark.parametrize("build,options,reason", [
    (lambda w, r: lstm_model(w, r, layout=1), {}, "layout=1"),
    (lambda w, r: lstm_model(w, r, extra_reader=True), {}, "W 'W' is also read by 'reader'"),
    (lambda w, r: lstm_model(w, r), {"exclude": "rn"}, "excluded by exclude=rn"),
    (lambda w, r: lstm_model(w, r), {"min_elements": 10**6}, "fewer than min_elements"),
])
def test_lstm_refusals(build, options, reason):
    w, r = _weights()
    assert_left_alone(QuantizeDynamic(QuantizeDynamicOptions(**options)), build(w, r), reason, "rnn")


def test_weight_that_is_a_graph_input_is_refused():
    w, r = _weights()
    model = lstm_model(w, r)
    model.graph.inputs.append(model.graph.initializers["W"])
    assert_left_alone(QuantizeDynamic(QuantizeDynamicOptions()), model, "is a graph input, not a constant", "rnn")


def test_recurrent_false_leaves_lstms_alone():
    w, r = _weights()
    model = lstm_model(w, r)
    snapshot = ir.to_onnx_text(model)
    assert not QuantizeDynamic(QuantizeDynamicOptions(recurrent=False))(model).modified
    assert ir.to_onnx_text(model) == snapshot


def test_per_node_skip_and_options():
    w, r = _weights()
    from onnxcompress.pipeline import Pipeline

    (entry,) = Pipeline.parse('quantize-dynamic{@rnn{lstm_per_channel=true}}').entries[-1:]
    model = lstm_model(w, r)
    QuantizeDynamic(entry.options, overrides=entry.overrides)(model)
    assert find_node(model, "rnn").inputs[8].const_value.shape == (1, 4 * HIDDEN)
    (entry,) = Pipeline.parse('quantize-dynamic{@rnn{skip=true}}').entries[-1:]
    assert_left_alone(QuantizeDynamic(entry.options, overrides=entry.overrides), lstm_model(w, r), "left alone by the per-node plan (@rnn)", "rnn")
