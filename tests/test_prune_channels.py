"""prune-channels: one synthetic graph per coupling rule, exact limits, refusals, importance, reconstruction.

The exactness checks zero some channels of the sources (weights and bias), so that those are the
least important; removing them must then leave every output unchanged. A wrong slice anywhere
(BatchNorm, Concat offsets, Split sizes, Flatten blocks, depthwise weights, per-channel
constants) would change the outputs or break the model.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

import onnxcompress
from onnxcompress.analysis.channels import channel_groups
from onnxcompress.errors import OptionError
from onnxcompress.pipeline import Pipeline
from onnxcompress.runtime import make_session, run_all

RNG = np.random.default_rng(0)


class Net:
    """A tiny ONNX graph builder: float weights as initializers, shapes on inputs/outputs."""

    def __init__(self, input_shape, name="x"):
        self.nodes, self.inits = [], []
        self.per_op: dict[str, int] = {}
        self.inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, input_shape)]
        self.count = 0

    def w(self, array, name=None):
        self.count += 1
        name = name or f"w{self.count}"
        self.inits.append(onnx.numpy_helper.from_array(np.asarray(array, dtype=np.float32), name))
        return name

    def op(self, op_type, inputs, n_out=1, **attrs):
        self.count += 1
        self.per_op[op_type] = self.per_op.get(op_type, 0) + 1
        name = f"{op_type.lower()}{self.per_op[op_type]}"  # conv1, conv2, relu1, ...
        outs = [f"{name}_out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, **attrs))
        return outs[0] if n_out == 1 else outs

    def conv(self, x, c_in, c_out, k=3, zero=(), group=1, bias=True, **attrs):
        w = RNG.standard_normal((c_out, c_in // group, k, k)) * 0.5
        b = RNG.standard_normal(c_out) * 0.1
        for c in zero:
            w[c] = 0
            b[c] = 0
        inputs = [x, self.w(w)] + ([self.w(b)] if bias else [])
        return self.op("Conv", inputs, pads=[k // 2] * 4, group=group, **attrs)

    def bn(self, x, c, zero=()):
        scale, beta = RNG.uniform(0.5, 1.5, c), RNG.standard_normal(c) * 0.1
        mean, var = RNG.standard_normal(c) * 0.1, RNG.uniform(0.5, 1.5, c)
        for i in zero:  # a zero channel stays zero through BN only with zero mean and beta
            mean[i] = beta[i] = 0
        return self.op("BatchNormalization", [x, self.w(scale), self.w(beta), self.w(mean), self.w(var)])

    def gemm(self, x, k, n, zero=()):
        w = RNG.standard_normal((n, k)) * 0.3
        b = RNG.standard_normal(n) * 0.1
        for c in zero:
            w[c] = 0
            b[c] = 0
        return self.op("Gemm", [x, self.w(w), self.w(b)], transB=1)

    def model(self, output):
        graph = helper.make_graph(self.nodes, "g", self.inputs, [onnx.ValueInfoProto(name=output)], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        model = onnx.shape_inference.infer_shapes(model)  # types the output
        model.graph.ClearField("value_info")
        onnx.checker.check_model(model, full_check=True)
        return model


def feeds_for(model: onnx.ModelProto, count=6, seed=1):
    rng = np.random.default_rng(seed)
    dims = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim]
    return [{model.graph.input[0].name: rng.standard_normal(dims).astype(np.float32)} for _ in range(count)]


def prune(model, pipeline, feeds=None):
    result = onnxcompress.compress(model, pipeline, calibration=feeds)
    onnx.checker.check_model(ir.to_proto(result.model), full_check=True)
    (entry,) = [p for p in result.report.passes if p.name == "prune-channels"]
    return result, entry


def outputs(model, feeds):
    return [o for r in run_all(make_session(model), feeds) for o in r.values()]


def assert_same_outputs(a, b, feeds, tol=1e-5):
    for x, y in zip(outputs(a, feeds), outputs(b, feeds)):
        assert x.shape == y.shape
        np.testing.assert_allclose(x, y, rtol=tol, atol=tol * max(1.0, float(np.abs(x).max())))


def weight_shapes(model: ir.Model) -> dict[str, tuple]:
    return {n.name: tuple(n.inputs[1].const_value.shape) for n in model.graph if n.op_type in ("Conv", "Gemm", "MatMul")}


# -- graphs, one per coupling rule -------------------------------------------------------------


def chain_bn():
    n = Net([1, 3, 8, 8])
    y = n.op("Relu", [n.bn(n.conv("x", 3, 8, zero=(2, 5)), 8, zero=(2, 5))])
    return n.model(n.conv(y, 8, 4)), {"conv1": 6}


def residual_add():
    n = Net([1, 3, 8, 8])
    a = n.op("Relu", [n.conv("x", 3, 8, zero=(1, 6))])
    b = n.conv(a, 8, 8, zero=(1, 6))
    s = n.op("Relu", [n.op("Add", [a, b])])
    return n.model(n.conv(s, 8, 4)), {"conv1": 6, "conv2": 6}


def concat_branches():
    n = Net([1, 3, 8, 8])
    a = n.op("Relu", [n.conv("x", 3, 4, zero=(1,))])
    b = n.op("Relu", [n.conv("x", 3, 4, zero=(3,))])
    c = n.op("Concat", [a, b], axis=1)
    return n.model(n.conv(c, 8, 4)), {"conv1": 3, "conv2": 3}


def split_branches():
    n = Net([1, 3, 8, 8])
    a = n.op("Relu", [n.conv("x", 3, 8, zero=(1, 6))])
    p, q = n.op("Split", [a, n.w(np.array([4, 4]), "sizes")], n_out=2, axis=1)
    n.inits[-1] = onnx.numpy_helper.from_array(np.array([4, 4], dtype=np.int64), "sizes")
    s = n.op("Add", [n.conv(p, 4, 4), n.conv(q, 4, 4)])
    return n.model(s), {"conv1": 6}


def flatten_gemm():
    n = Net([1, 3, 6, 6])
    a = n.op("MaxPool", [n.op("Relu", [n.conv("x", 3, 4, zero=(2,))])], kernel_shape=[2, 2], strides=[2, 2])
    f = n.op("Flatten", [a], axis=1)
    h = n.op("Relu", [n.gemm(f, 36, 8, zero=(0, 7))])
    return n.model(n.gemm(h, 8, 3)), {"conv1": 3, "gemm1": 6}


def reshape_gemm():
    n = Net([1, 3, 4, 4])
    a = n.op("Relu", [n.conv("x", 3, 4, zero=(0,))])
    shape = onnx.numpy_helper.from_array(np.array([1, 64], dtype=np.int64), "target")
    n.inits.append(shape)
    f = n.op("Reshape", [a, "target"])
    return n.model(n.gemm(f, 64, 3)), {"conv1": 3}


def depthwise():
    n = Net([1, 3, 8, 8])
    a = n.op("Relu", [n.conv("x", 3, 8, zero=(3, 4))])
    d = n.op("Relu", [n.conv(a, 8, 8, group=8, zero=(3, 4))])
    return n.model(n.conv(d, 8, 4, k=1)), {"conv1": 6}


def per_channel_ops():
    n = Net([1, 3, 8, 8])
    a = n.conv("x", 3, 8, zero=(0, 4))
    slope = n.w(RNG.uniform(0.1, 0.3, (8, 1, 1)))
    b = n.op("PRelu", [a, slope])
    m = n.op("Mul", [b, n.w(RNG.uniform(0.5, 2.0, (1, 8, 1, 1)))])
    p = n.op("AveragePool", [m], kernel_shape=[2, 2], strides=[2, 2])
    g = n.op("GlobalAveragePool", [p])
    return n.model(n.conv(g, 8, 4, k=1)), {"conv1": 6}


def transformer_ffn():
    n = Net([1, 5, 8])
    w1 = RNG.standard_normal((8, 16)) * 0.3
    b1 = RNG.standard_normal(16) * 0.1
    for c in (3, 9, 12, 15):
        w1[:, c] = 0
        b1[c] = 0
    h = n.op("Add", [n.op("MatMul", ["x", n.w(w1)]), n.w(b1)])
    g = n.op("Relu", [h])
    y = n.op("MatMul", [g, n.w(RNG.standard_normal((16, 8)) * 0.3)])
    return n.model(n.op("Add", ["x", y])), {"matmul1": 12}


def conv_transpose():
    n = Net([1, 3, 4, 4])
    a = n.op("Relu", [n.conv("x", 3, 8, zero=(2, 3))])
    w = RNG.standard_normal((8, 4, 2, 2)) * 0.3
    t = n.op("ConvTranspose", [a, n.w(w), n.w(np.zeros(4))], strides=[2, 2])
    return n.model(n.conv(n.op("Relu", [t]), 4, 2)), {"conv1": 6}


def slice_resize_pad():
    n = Net([1, 3, 6, 6])
    a = n.op("Relu", [n.conv("x", 3, 8, zero=(1, 6))])
    for name, values in (("starts", [1]), ("ends", [8]), ("axes", [1])):
        n.inits.append(onnx.numpy_helper.from_array(np.array(values, dtype=np.int64), name))
    b = n.op("Slice", [a, "starts", "ends", "axes"])  # channels 1..7: 6 survives, 1 is cut off
    n.inits.append(onnx.numpy_helper.from_array(np.array([1, 1, 2, 2], dtype=np.float32), "scales"))
    r = n.op("Resize", [b, "", "scales"], mode="nearest")
    n.inits.append(onnx.numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], dtype=np.int64), "pads"))
    p = n.op("Pad", [r, "pads"])
    inorm = n.op("InstanceNormalization", [p, n.w(RNG.uniform(0.5, 1.5, 7)), n.w(np.zeros(7))])
    return n.model(n.conv(inorm, 7, 2)), {"conv1": 6}


GRAPHS = [slice_resize_pad, chain_bn, residual_add, concat_branches, split_branches, flatten_gemm, reshape_gemm, depthwise,
          per_channel_ops, transformer_ffn, conv_transpose]


@pytest.mark.parametrize("build", GRAPHS, ids=[g.__name__ for g in GRAPHS])
def test_removing_zero_channels_changes_no_output(build):
    model, expected_out = build()
    # Every zeroed source has a quarter of its channels zero; other sources are excluded.
    keep = "|".join(n.name for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul", "ConvTranspose")
                    and n.name not in expected_out)
    feeds = feeds_for(model)
    options = "ratio=0.25" + (f',exclude="^({keep})$"' if keep else "")
    result, entry = prune(model, f"prune-channels{{{options}}}")
    assert entry.status == "changed"
    assert_same_outputs(model, result.model, feeds)
    shapes = weight_shapes(result.model)
    for node, channels in expected_out.items():
        source = next(n for n in result.model.graph if n.name == node)
        axis = 1 if source.op_type == "MatMul" else 0
        assert shapes[node][axis] == channels, (node, shapes[node])
    assert result.report.final_cost["params"] < result.report.input_cost["params"]


def test_split_sizes_follow_the_removed_channels():
    model, _ = split_branches()
    result, _ = prune(model, "prune-channels{ratio=0.25}")
    split = next(n for n in result.model.graph if n.op_type == "Split")
    assert split.inputs[1].const_value.numpy().tolist() == [3, 3]


def test_concat_offsets_cut_the_right_consumer_rows():
    model, _ = concat_branches()
    result, _ = prune(model, "prune-channels{ratio=0.25}")
    original = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    consumer = next(n for n in result.model.graph if n.name == "conv3")
    kept = consumer.inputs[1].const_value.numpy()
    # branch a lost its channel 1, branch b its channel 3 (index 4 + 3 = 7 of the concat)
    consumer_weight = original[next(n.input[1] for n in model.graph.node if n.name == "conv3")]
    np.testing.assert_array_equal(kept, consumer_weight[:, [0, 2, 3, 4, 5, 6]])


def test_ratio_zero_is_a_no_op():
    model, _ = chain_bn()
    result = onnxcompress.compress(model, "lift-constants,fold-batchnorm,infer-shapes")
    again = onnxcompress.compress(result.model, "prune-channels{ratio=0.0}")
    entry = next(p for p in again.report.passes if p.name == "prune-channels")
    assert entry.status == "unchanged" and entry.records == []


def test_graph_output_and_unknown_ops_are_refused_with_reasons():
    n = Net([1, 3, 8, 8])
    a = n.conv("x", 3, 8)
    s = n.op("Softmax", [a], axis=1)  # mixes channels: not understood as a pass-through
    b = n.conv(s, 8, 4)
    model = n.model(b)
    result, entry = prune(model, "prune-channels{ratio=0.5}")
    refused = {r.node: r.detail for r in entry.records if r.action == "refused"}
    assert "Softmax" in refused["conv1"] and "does not handle" in refused["conv1"]
    assert "reaches graph output" in refused["conv2"]
    assert entry.status == "unchanged"
    assert_same_outputs(model, result.model, feeds_for(model))


def test_grouped_conv_is_refused():
    n = Net([1, 4, 8, 8])
    a = n.op("Relu", [n.conv("x", 4, 8)])
    g = n.conv(a, 8, 8, group=2)
    model = n.model(n.conv(g, 8, 2))
    _, entry = prune(model, "prune-channels{ratio=0.5}")
    refused = {r.node: r.detail for r in entry.records if r.action == "refused"}
    assert "grouped conv" in refused["conv1"] and "grouped conv" in refused["conv2"]


def test_exclude_keeps_matching_sources():
    model, _ = residual_add()
    _, entry = prune(model, "prune-channels{ratio=0.25,exclude=conv2}")
    refused = {r.node: r.detail for r in entry.records if r.action == "refused"}
    assert "excluded" in refused["conv1"] and "excluded" in refused["conv2"]  # coupled by the Add


def test_min_channels_and_round_to():
    n = Net([1, 3, 8, 8])
    a = n.op("Relu", [n.conv("x", 3, 16)])
    model = n.model(n.conv(a, 16, 2))
    result, _ = prune(model, "prune-channels{ratio=0.6,round_to=8}")
    assert weight_shapes(result.model)["conv1"][0] == 8  # 16 - 9 = 7 kept, rounded up to 8
    result, _ = prune(model, "prune-channels{ratio=0.9,min_channels=4}")
    assert weight_shapes(result.model)["conv1"][0] == 4


def test_global_scope_ranks_across_groups():
    n = Net([1, 3, 8, 8])
    a = n.op("Relu", [n.conv("x", 3, 8)])
    b = n.op("Relu", [n.conv(a, 8, 8)])
    model = n.model(n.conv(b, 8, 2))
    weights = {t.name: t for t in model.graph.initializer}
    name = next(n.input[1] for n in model.graph.node if n.name == "conv2")
    small = onnx.numpy_helper.to_array(weights[name]) * 0.01  # the second conv's filters are all tiny
    weights[name].CopyFrom(onnx.numpy_helper.from_array(small.astype(np.float32), name))
    _, entry = prune(model, "prune-channels{ratio=0.25,scope=global}")
    removed = {r.node: r.detail for r in entry.records if r.action == "rewritten"}
    # Normalised by each group's mean, the layer of tiny filters is not emptied first: 4 of the
    # 16 channels go, spread over both layers by their relative importance.
    counts = sorted(int(d.split()[1]) for d in removed.values())
    assert sum(counts) == 4 and counts[-1] < 4


def test_apoz_removes_channels_that_are_always_zero():
    n = Net([1, 3, 8, 8])
    w = RNG.standard_normal((8, 3, 3, 3)) * 0.5
    b = np.zeros(8)
    b[5] = -100.0  # channel 5 is dead after the ReLU, though its weights are large
    w[5] *= 4
    a = n.op("Relu", [n.op("Conv", ["x", n.w(w), n.w(b)], pads=[1, 1, 1, 1])])
    model = n.model(n.conv(a, 8, 2))
    feeds = feeds_for(model)
    result, _ = prune(model, "prune-channels{ratio=0.125,importance=apoz}", feeds)
    assert min(shape[0] for shape in weight_shapes(result.model).values()) == 2
    assert sorted(s[0] for s in weight_shapes(result.model).values()) == [2, 7]
    assert_same_outputs(model, result.model, feeds)  # the dead channel contributed nothing
    l1, _ = prune(model, "prune-channels{ratio=0.125,importance=l1}", feeds)
    out = outputs(model, feeds)[0]
    assert np.abs(outputs(l1.model, feeds)[0] - out).max() > 1e-3  # l1 removes a live channel instead


def test_lasso_finds_channels_the_next_layer_ignores():
    n = Net([1, 3, 8, 8])
    a = n.op("Relu", [n.conv("x", 3, 8)])
    w2 = RNG.standard_normal((4, 8, 3, 3)) * 0.5
    w2[:, 2] = 0  # the next layer ignores channel 2, whatever its own weights
    model = n.model(n.op("Conv", [a, n.w(w2), n.w(np.zeros(4))], pads=[1, 1, 1, 1]))
    weights = {t.name: t for t in model.graph.initializer}
    big = onnx.numpy_helper.to_array(weights["w1"]).copy()
    big[2] *= 10
    weights["w1"].CopyFrom(onnx.numpy_helper.from_array(big, "w1"))
    feeds = feeds_for(model)
    result, _ = prune(model, "prune-channels{ratio=0.125,importance=lasso}", feeds)
    assert_same_outputs(model, result.model, feeds)


def _ffn_with_ignored_neuron(ignored=5):
    n = Net([1, 6, 8])
    w1 = RNG.standard_normal((8, 16)) * 0.3
    w1[:, ignored] *= 10  # the largest neuron by weight norm ...
    h = n.op("Relu", [n.op("Add", [n.op("MatMul", ["x", n.w(w1)]), n.w(RNG.standard_normal(16) * 0.1)])])
    w2 = RNG.standard_normal((16, 8)) * 0.3
    w2[ignored] = 0  # ... is one the next layer ignores
    return n.model(n.op("MatMul", [h, n.w(w2)]))


def test_lasso_finds_the_ffn_neuron_the_next_matmul_ignores():
    model = _ffn_with_ignored_neuron()
    feeds = feeds_for(model)
    result, _ = prune(model, "prune-channels{ratio=0.0625,importance=lasso}", feeds)
    assert weight_shapes(result.model)["matmul1"] == (8, 15)
    assert_same_outputs(model, result.model, feeds)


def _explicit_contribution_gram(model: ir.Model, feeds) -> np.ndarray:
    """⟨z_u, z_v⟩ from the contributions themselves: channel u of the sink's input times its
    weights, over every row and output (what the lasso importance forms without holding z)."""
    from onnxcompress.activations import capture
    from onnxcompress.reconstruct import sink_rows, weight_matrix

    sink = [n for n in model.graph if n.op_type in ("Conv", "MatMul")][-1]
    weight = sink.inputs[1].const_value.numpy().astype(np.float64)
    matrix = weight_matrix(sink, weight)
    rows = np.concatenate([sink_rows(sink, x.astype(np.float64), weight)
                           for x in capture(model, [sink.inputs[0].name], feeds)[sink.inputs[0].name]])
    channels = sink.inputs[0].shape[1] if sink.op_type == "Conv" else sink.inputs[0].shape[-1]
    width = matrix.shape[0] // channels
    z = np.stack([(rows[:, u * width:(u + 1) * width] @ matrix[u * width:(u + 1) * width]).ravel()
                  for u in range(channels)], axis=1)
    return z.T @ z


@pytest.mark.parametrize("kind", ["matmul", "conv3x3"])
def test_lasso_gram_equals_the_gram_of_the_contributions(kind):
    """The exact form ((XᵀX) ∘ (WWᵀ), MatMul sink) and the streamed k×k form (every row and
    output kept: below the sampling limits) both equal zᵀz computed from z itself."""
    from onnxcompress.activations import stream
    from onnxcompress.channel_importance import _contribution_grams, _sink_inputs

    if kind == "matmul":
        onnx_model = _ffn_with_ignored_neuron()
    else:
        n = Net([1, 3, 6, 6])
        a = n.op("Relu", [n.conv("x", 3, 8)])
        onnx_model = n.model(n.op("Conv", [a, n.w(RNG.standard_normal((4, 8, 3, 3))), n.w(np.zeros(4))],
                                  pads=[1, 1, 1, 1]))
    feeds = feeds_for(onnx_model)
    model = onnxcompress.compress(onnx_model, "lift-constants,fold-batchnorm,infer-shapes").model
    groups = channel_groups(model)
    sinks = _sink_inputs(groups)
    ((units, gram),) = _contribution_grams(groups, sinks, stream(model, [s[1] for s in sinks], feeds), len(feeds))
    assert units == [groups.unit(a) for a in sinks[0][3]]  # one unit per input channel, in order
    expected = _explicit_contribution_gram(model, feeds)
    np.testing.assert_allclose(gram, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())


def test_lasso_entry_order_ranks_silent_and_faint_units_last():
    from onnxcompress.channel_importance import lasso_entry_order

    rng = np.random.default_rng(3)
    z = rng.standard_normal((200, 5)) * np.array([3.0, 2.0, 1.0, 0.01, 0.0])  # unit 4 adds nothing
    score = lasso_entry_order(z.T @ z)
    assert list(np.argsort(-score)) == [0, 1, 2, 3, 4]
    assert score[4] == -40.0  # never enters the path (LASSO_ALPHAS steps)


def test_reconstruction_beats_plain_pruning():
    n = Net([1, 3, 8, 8])
    a = n.op("Relu", [n.conv("x", 3, 16)])
    b = n.op("Relu", [n.conv(a, 16, 16)])
    model = n.model(n.conv(b, 16, 4))
    feeds = feeds_for(model, count=16)
    held_out = feeds_for(model, count=8, seed=99)
    ref = outputs(model, held_out)

    def error(m):
        return sum(float(np.linalg.norm(x - r)) for x, r in zip(outputs(m, held_out), ref))

    plain, _ = prune(model, "prune-channels{ratio=0.5}", feeds)
    refit, entry = prune(model, "prune-channels{ratio=0.5,reconstruct=true}", feeds)
    assert error(refit.model) < 0.8 * error(plain.model)
    details = [r.detail for r in entry.records if "refitted" in r.detail]
    assert len(details) == 2


def test_refits_fed_to_one_session_match_a_fresh_capture_of_the_refitted_model(monkeypatch):
    """The second sink's input is read with the first sink's refit fed to the one session; a
    capture of the model with that refit written in must give the same refit."""
    import onnxcompress.reconstruct as reconstruct

    n = Net([1, 3, 8, 8])
    a = n.op("Relu", [n.conv("x", 3, 16)])
    b = n.op("Relu", [n.conv(a, 16, 16)])
    model = n.model(n.conv(b, 16, 4))
    feeds = feeds_for(model, count=12)
    one_session, _ = prune(model, "prune-channels{ratio=0.5,reconstruct=true}", feeds)

    def fresh_capture(pruned, names, feeds_, overridable=()):
        return lambda name, overrides: reconstruct.capture(pruned, [name], feeds_)[name]

    monkeypatch.setattr(reconstruct, "reader", fresh_capture)
    captured, _ = prune(model, "prune-channels{ratio=0.5,reconstruct=true}", feeds)
    weights = {k: v.const_value.numpy() for k, v in captured.model.graph.initializers.items()}
    refits = [k for k in weights if k.endswith(".refit")]
    assert len(refits) >= 2
    for name in refits:
        np.testing.assert_allclose(one_session.model.graph.initializers[name].const_value.numpy(), weights[name],
                                   rtol=1e-6, atol=1e-7)


def test_reconstruction_of_zero_channels_stays_exact():
    model, _ = chain_bn()
    feeds = feeds_for(model, count=8)
    result, _ = prune(model, "prune-channels{ratio=0.25,reconstruct=true}", feeds)
    assert_same_outputs(model, result.model, feeds, tol=1e-4)


def test_data_methods_need_calibration():
    model, _ = chain_bn()
    from onnxcompress.errors import CalibrationError

    with pytest.raises(CalibrationError, match="needs calibration data"):
        onnxcompress.compress(model, "prune-channels{importance=apoz}")


@pytest.mark.parametrize(
    "text, message",
    [
        ("prune-channels{ratio=1.0}", "ratio' must lie in"),
        ("prune-channels{round_to=0}", "round_to' must be at least 1"),
        ("prune-channels{importance=l3}", "must be one of l1|l2|apoz|lasso"),
        ("prune-channels{exclude=(}", "not a valid regular expression"),
    ],
)
def test_bad_options(text, message):
    with pytest.raises(OptionError, match=message):
        Pipeline.parse(text)


def test_prerequisites_are_inserted():
    assert str(Pipeline.parse("prune-channels")) == "lift-constants,fold-batchnorm,infer-shapes,prune-channels"


def test_channel_groups_of_a_residual_couple_both_sources():
    model, _ = residual_add()
    result = onnxcompress.compress(model, "lift-constants,infer-shapes")
    groups = channel_groups(result.model)
    coupled = [g for g in groups.groups if len(groups.sources_of_group(g)) == 2]
    assert len(coupled) == 1 and len(coupled[0]) == 8



def _ffn(n: Net, x: str, w1, b1, w2, activation: str | None = "Relu", rng=RNG) -> str:
    """x + W2·act(W1·x + b1) + b2, with the bias Add between the second MatMul and the
    residual Add, as exporters write it."""
    h = n.op("Add", [n.op("MatMul", [x, n.w(w1)]), n.w(b1)])
    h = n.op(activation, [h]) if activation else h
    return n.op("Add", [n.w(rng.standard_normal(w2.shape[1]) * 0.1), n.op("MatMul", [h, n.w(w2)])])


def _drifting_residual(width=8, hidden=16, seed=0):
    """Two residual FFNs. The first is linear, and the neurons l1 drops carry almost nothing
    but a large bias: what they added is a constant that its refit cannot make (its kept
    neurons are zero-mean and a MatMul has no bias to refit), so the residual stream drifts by
    a constant. The second FFN's ReLU neurons can make a constant."""
    rng = np.random.default_rng(seed)
    n = Net([1, 6, width])
    w1 = rng.standard_normal((width, hidden)) * 0.5
    b1 = np.zeros(hidden)
    w1[:, hidden // 2:] *= 0.01
    b1[hidden // 2:] = 2.0
    s1 = n.op("Add", [_ffn(n, "x", w1, b1, rng.standard_normal((hidden, width)) * 0.5, activation=None, rng=rng), "x"])
    y2 = _ffn(n, s1, rng.standard_normal((width, hidden)) * 0.5, rng.standard_normal(hidden) * 0.1,
              rng.standard_normal((hidden, width)) * 0.5, rng=rng)
    return n.model(n.op("Relu", [n.op("Add", [y2, s1])]))


def _refits(result) -> dict[str, np.ndarray]:
    return {k: v.const_value.numpy() for k, v in result.model.graph.initializers.items() if k.endswith(".refit")}


def test_a_sink_feeding_a_residual_is_fitted_to_the_original_sum(monkeypatch):
    """The second FFN's input and residual both drift after the first is pruned; fitting its
    output to the original sum less the drifted residual leaves much less error at the output
    than fitting it to its own original output."""
    import onnxcompress.reconstruct as reconstruct

    model = _drifting_residual()
    feeds, held_out = feeds_for(model, count=24), feeds_for(model, count=8, seed=99)
    ref = outputs(model, held_out)

    def error(m):
        return sum(float(np.linalg.norm(x - r)) for x, r in zip(outputs(m, held_out), ref))

    compensated, entry = prune(model, "prune-channels{ratio=0.5,reconstruct=true}", feeds)
    (detail,) = [r.detail for r in entry.records if "refitted" in r.detail]
    assert "to the sum of residual Add add6" in detail
    monkeypatch.setattr(reconstruct, "residual_join", lambda node: None)
    own_output, _ = prune(model, "prune-channels{ratio=0.5,reconstruct=true}", feeds)
    assert error(compensated.model) < 0.9 * error(own_output.model)


def test_a_residual_that_did_not_drift_gives_the_own_output_refit(monkeypatch):
    """Exact limit: the FFN's residual is the graph input, which pruning leaves alone, so the
    original sum less it is the sink's own original output: both targets give one refit."""
    import onnxcompress.reconstruct as reconstruct

    n = Net([1, 6, 8])
    y = _ffn(n, "x", RNG.standard_normal((8, 16)), RNG.standard_normal(16), RNG.standard_normal((16, 8)))
    model = n.model(n.op("Relu", [n.op("Add", ["x", y])]))
    feeds = feeds_for(model, count=24)
    compensated, entry = prune(model, "prune-channels{ratio=0.5,reconstruct=true}", feeds)
    assert any("to the sum of residual Add" in r.detail for r in entry.records)
    monkeypatch.setattr(reconstruct, "residual_join", lambda node: None)
    own_output, _ = prune(model, "prune-channels{ratio=0.5,reconstruct=true}", feeds)
    (name,) = _refits(compensated)
    np.testing.assert_allclose(_refits(compensated)[name], _refits(own_output)[name], rtol=1e-5, atol=1e-6)


def test_a_broadcast_residual_is_not_used_as_a_target():
    """A residual operand of another shape (here a mean over tokens) is broadcast into the sum:
    the sink is fitted to its own output."""
    n = Net([1, 6, 8])
    y = _ffn(n, "x", RNG.standard_normal((8, 16)), RNG.standard_normal(16), RNG.standard_normal((16, 8)))
    model = n.model(n.op("Relu", [n.op("Add", [y, n.op("ReduceMean", ["x"], axes=[1], keepdims=1)])]))
    feeds = feeds_for(model, count=12)
    _, entry = prune(model, "prune-channels{ratio=0.5,reconstruct=true}", feeds)
    (detail,) = [r.detail for r in entry.records if "refitted" in r.detail]
    assert "residual" not in detail


def test_uniform_row_weights_give_the_unweighted_refit():
    """Exact limit of the LayerNorm weighting: every row weighted alike is the plain fit (the
    ridge strength scales with the rows)."""
    from onnxcompress.reconstruct import fit_layer

    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((20, 6)) for _ in range(8)]
    ys = [x @ rng.standard_normal((6, 4)) + 0.1 * rng.standard_normal((20, 4)) for x in xs]
    anchor = rng.standard_normal((6, 4))
    plain = fit_layer(xs, ys, anchor, np.zeros(4))
    weighted = fit_layer(xs, ys, anchor, np.zeros(4), [np.full((20, 1), 7.0) for _ in xs])
    assert plain[2] == weighted[2]
    np.testing.assert_allclose(weighted[0], plain[0], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(weighted[1], plain[1], rtol=1e-9, atol=1e-12)


def _ffn_into_layer_norm(seed=0):
    rng = np.random.default_rng(seed)
    n = Net([1, 12, 8])
    y = _ffn(n, "x", rng.standard_normal((8, 32)) * 0.5, rng.standard_normal(32) * 0.1,
             rng.standard_normal((32, 8)) * 0.5, rng=rng)
    norm = n.op("LayerNormalization", [n.op("Add", [y, "x"]), n.w(np.ones(8)), n.w(np.zeros(8))], axis=-1)
    return n.model(n.op("Relu", [norm]))


def test_a_sum_read_by_layer_norm_is_fitted_with_its_tokens_weighted(monkeypatch):
    """Tokens of very different spread: the LayerNorm divides each token's error by its σ, so
    weighting the fit the same way leaves less error after the LayerNorm."""
    import onnxcompress.reconstruct as reconstruct

    model = _ffn_into_layer_norm()
    spread = np.geomspace(0.05, 20.0, 12).reshape(1, 12, 1).astype(np.float32)
    feeds = [{"x": f["x"] * spread} for f in feeds_for(model, count=24)]
    held_out = [{"x": f["x"] * spread} for f in feeds_for(model, count=8, seed=99)]
    ref = outputs(model, held_out)

    def error(m):
        return sum(float(np.linalg.norm(x - r)) for x, r in zip(outputs(m, held_out), ref))

    weighted, entry = prune(model, "prune-channels{ratio=0.5,reconstruct=true}", feeds)
    assert any("weighted as its LayerNormalization sees it" in r.detail for r in entry.records)
    monkeypatch.setattr(reconstruct, "_layer_norm_weights", lambda node, add, sums: None)
    unweighted, _ = prune(model, "prune-channels{ratio=0.5,reconstruct=true}", feeds)
    assert error(weighted.model) < 0.9 * error(unweighted.model)


def test_a_residual_gone_after_the_rewrite_leaves_the_sink_unfitted(monkeypatch):
    """The target was read through a residual Add that the rewritten model no longer shows:
    the sink is reported as not refitted, not fitted to the wrong values."""
    import onnxcompress.reconstruct as reconstruct

    real, seen = reconstruct.residual_join, set()

    def only_before_the_rewrite(node):
        if node.name in seen:
            return None
        seen.add(node.name)
        return real(node)

    monkeypatch.setattr(reconstruct, "residual_join", only_before_the_rewrite)
    n = Net([1, 6, 8])
    y = _ffn(n, "x", RNG.standard_normal((8, 16)), RNG.standard_normal(16), RNG.standard_normal((16, 8)))
    model = n.model(n.op("Relu", [n.op("Add", ["x", y])]))
    _, entry = prune(model, "prune-channels{ratio=0.5,reconstruct=true}", feeds_for(model, count=12))
    (detail,) = [r.detail for r in entry.records if r.node == "matmul2" and r.action == "rewritten"]
    assert detail == "not refitted: the residual Add it was to be fitted through is gone after the rewrite"
