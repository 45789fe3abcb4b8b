"""fold-batchnorm: BN folded into Conv/ConvTranspose/Gemm/MatMul within 1e-5; every refusal."""

from __future__ import annotations


import numpy as np
import onnx_ir as ir
import pytest

import models

from onnxcompress.passes.fold_batchnorm import FoldBatchNorm
from onnxcompress.passes.lift_constants import LiftConstants
from tests.graphs import (
    Builder,
    assert_close,
    bn_params,
    check,
    clone,
    conv_bn_model,
    conv_transpose_bn_model,
    find_node,
    gemm_bn_model,
    matmul_bn_model,
    ops,
    random_feeds,
    records,
    refusals,
    run,
)




def fold_and_compare(model: ir.Model, producer: str) -> FoldBatchNorm:
    """Fold, then check: BN gone, outputs within 1e-5 of their scale, checker, idempotent."""
    feeds = random_feeds(model, seed=3)
    before = run(model, feeds)
    p = FoldBatchNorm()
    assert p(model).modified
    assert "BatchNormalization" not in ops(model)
    assert [r.detail for r in records(p)] == [f"folded into {producer}"]
    assert [v.name for v in model.graph.outputs] == ["y"]
    check(model)
    assert_close(before, run(model, feeds), rel=1e-5)
    assert not FoldBatchNorm()(model).modified
    return p


def assert_refused(model: ir.Model, reason: str) -> None:
    """The BN named 'bn' stays, untouched, with ``reason`` among the pass's refusals."""
    snapshot = ir.to_onnx_text(model)
    p = FoldBatchNorm()
    assert not p(model).modified
    assert find_node(model, "bn").op_type == "BatchNormalization"
    assert ir.to_onnx_text(model) == snapshot
    assert refusals(p, "bn") == [reason]
    assert FoldBatchNorm().candidates(model) == []


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("group", [1, 2])
def test_conv(bias, group):
    fold_and_compare(conv_bn_model(c_in=4, c_out=6, group=group, bias=bias), "Conv 'conv'")

@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("group", [1, 2])
def test_conv_transpose(bias, group):
    model = conv_transpose_bn_model(c_in=4, c_out=6, group=group, bias=bias)
    fold_and_compare(model, "ConvTranspose 'convt'")


def test_conv_transpose_group_2_scales_each_groups_own_channels():
    model = conv_transpose_bn_model(c_in=4, c_out=6, group=2)
    w = model.graph.initializers["W"].const_value.numpy().copy()
    s = bn_params(6, seed=1)
    scale = s["scale"].astype(np.float64) / np.sqrt(s["var"].astype(np.float64) + 1e-5)
    fold_and_compare(model, "ConvTranspose 'convt'")
    folded = model.graph.initializers["W"].const_value.numpy()
    # Output channel o = g * 3 + j reads W[g*2:(g+1)*2, j].
    for g in range(2):
        for j in range(3):
            expected = w[g * 2:(g + 1) * 2, j] * scale[g * 3 + j]
            np.testing.assert_allclose(folded[g * 2:(g + 1) * 2, j], expected, rtol=1e-6)


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bias", [True, False])
def test_gemm(trans_b, bias):
    model = gemm_bn_model(trans_b=trans_b, bias=bias, alpha=1.5, beta=0.5)
    fold_and_compare(model, "Gemm 'gemm'")
    gemm = find_node(model, "gemm")
    assert "beta" not in gemm.attributes
    assert gemm.attributes.get_float("alpha") == 1.5


def test_matmul_gets_an_add_in_place_of_the_bn():
    model = matmul_bn_model()
    fold_and_compare(model, "MatMul 'matmul'")
    assert ops(model) == ["MatMul", "Add"]
    add = find_node(model, "bn")
    assert add.op_type == "Add" and add.outputs[0].name == "y"
    assert add.inputs[0].name != "matmul_out0"  # its values changed, so its name did
    assert add.inputs[1].is_initializer()


def test_bn_output_name_moves_to_the_producer_and_consumers_follow():
    b = Builder()
    x = b.input("x", ["N", 2, 4, 4])
    w = b.init("W", np.random.default_rng(0).standard_normal((3, 2, 1, 1)).astype(np.float32))
    h = b.op("Conv", [x, w], name="conv")
    params = [b.init(f"p{k}", v) for k, v in enumerate(bn_params(3).values())]
    n = b.op("BatchNormalization", [h, *params], name="bn", output_names=["normed"])
    y = b.op("Relu", [n], name="relu", output_names=["y"])
    model = b.model([y])
    fold_and_compare(model, "Conv 'conv'")
    assert find_node(model, "relu").inputs[0].name == "normed"
    assert find_node(model, "conv").outputs[0].name == "normed"
    assert set(model.graph.initializers) == {"W", "W_bias"}  # BN params dropped


def test_bn_inside_an_if_branch_folds():
    base = conv_bn_model(c_in=3, c_out=3)  # so that the else branch, Neg(x), has its shape
    conv, bn = list(base.graph)
    # Move Conv+BN into the then-branch; the weights stay outer-scope initializers.
    base.graph.remove([conv, bn])
    inner_out = bn.outputs[0]
    base.graph.outputs.clear()
    then_g = ir.Graph([], [inner_out], nodes=[conv, bn], name="then_g")
    inner_out.name = "t"
    neg = ir.node("Neg", [conv.inputs[0]], name="neg")
    neg.outputs[0].name = "e"
    neg.outputs[0].dtype, neg.outputs[0].shape = inner_out.dtype, inner_out.shape
    else_g = ir.Graph([], [neg.outputs[0]], nodes=[neg], name="else_g")
    cond = ir.val("c", ir.DataType.BOOL, [])
    base.graph.inputs.append(cond)
    node = ir.node("If", [cond], {"then_branch": then_g, "else_branch": else_g}, name="if")
    node.outputs[0].name = "y"
    node.outputs[0].dtype, node.outputs[0].shape = inner_out.dtype, inner_out.shape
    base.graph.append(node)
    base.graph.outputs.append(node.outputs[0])
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3, 6, 6)).astype(np.float32),
             "c": np.array(True)}
    before = run(base, feeds)
    p = FoldBatchNorm()
    assert p(base).modified
    assert "BatchNormalization" not in ops(base)
    check(base)
    assert_close(before, run(base, feeds), rel=1e-5)


def test_shared_bn_parameters_fold_in_both_and_are_dropped_after():
    b = Builder()
    x = b.input("x", ["N", 2, 4, 4])
    rng = np.random.default_rng(0)
    params = [b.init(k, v) for k, v in bn_params(3).items()]
    outs = []
    for i in range(2):
        w = b.init(f"W{i}", rng.standard_normal((3, 2, 1, 1)).astype(np.float32))
        h = b.op("Conv", [x, w], name=f"conv{i}")
        outs.append(b.op("BatchNormalization", [h, *params], name=f"bn{i}"))
    y = b.op("Add", outs, name="add", output_names=["y"])
    model = b.model([y])
    feeds = random_feeds(model)
    before = run(model, feeds)
    p = FoldBatchNorm()
    assert p(model).modified
    assert len(records(p, "rewritten")) == 2
    assert set(model.graph.initializers) == {"W0", "W1", "W0_bias", "W1_bias"}
    check(model)
    assert_close(before, run(model, feeds))


def test_candidates_name_foldable_bns_only():
    model = conv_bn_model()
    text = ir.to_onnx_text(model)
    found = FoldBatchNorm().candidates(model)
    assert [(c.node, c.what) for c in found] == [("bn", "fold into Conv 'conv'")]
    assert ir.to_onnx_text(model) == text


def test_nothing_to_do_is_unmodified():
    b = Builder()
    x = b.input("x", ["N", 3])
    y = b.op("Relu", [x], output_names=["y"])
    p = FoldBatchNorm()
    assert not p(b.model([y])).modified
    assert p.records == [] and p.notes == []


# ------------------------------------------------------------------------------- refusals


def test_refuses_when_the_conv_output_feeds_another_node():
    model = conv_bn_model()
    conv_out = find_node(model, "conv").outputs[0]
    extra = ir.node("Relu", [conv_out], name="side")
    extra.outputs[0].name = "side_out"
    extra.outputs[0].dtype, extra.outputs[0].shape = ir.DataType.FLOAT, model.graph.outputs[0].shape
    model.graph.append(extra)
    model.graph.outputs.append(extra.outputs[0])
    assert_refused(model, "the Conv output 'conv_out0' also feeds 'side'")


def test_refuses_when_the_conv_output_is_a_graph_output():
    model = conv_bn_model()
    conv_out = find_node(model, "conv").outputs[0]
    conv_out.dtype, conv_out.shape = ir.DataType.FLOAT, model.graph.outputs[0].shape
    model.graph.outputs.append(conv_out)
    assert_refused(model, "the Conv output 'conv_out0' is also a graph output")


def test_refuses_a_weight_shared_with_another_node():
    model = conv_bn_model()
    conv = find_node(model, "conv")
    other = ir.node("Conv", [conv.inputs[0], conv.inputs[1]], {"pads": [1, 1, 1, 1]}, name="other")
    other.outputs[0].name = "other_out"
    other.outputs[0].dtype, other.outputs[0].shape = ir.DataType.FLOAT, model.graph.outputs[0].shape
    model.graph.append(other)
    model.graph.outputs.append(other.outputs[0])
    assert_refused(model, "weight 'W' is shared with node 'other'")


def test_refuses_a_bias_shared_with_another_node():
    model = conv_bn_model()
    bias = find_node(model, "conv").inputs[2]
    other = ir.node("Neg", [bias], name="other")
    other.outputs[0].name = "other_out"
    other.outputs[0].dtype, other.outputs[0].shape = ir.DataType.FLOAT, ir.Shape([8])
    model.graph.append(other)
    model.graph.outputs.append(other.outputs[0])
    assert_refused(model, "bias 'b' is shared with node 'other'")


def test_refuses_a_weight_that_is_a_graph_input():
    model = conv_bn_model()
    model.graph.inputs.append(model.graph.initializers["W"])
    assert_refused(model, "weight 'W' is a graph input")


def test_refuses_a_weight_computed_at_run_time():
    b = Builder()
    x = b.input("x", ["N", 2, 4, 4])
    w_in = b.input("w", [3, 2, 1, 1])
    w = b.op("Abs", [w_in], name="abs", output_names=["w_abs"])
    h = b.op("Conv", [x, w], name="conv")
    params = [b.init(k, v) for k, v in bn_params(3).items()]
    y = b.op("BatchNormalization", [h, *params], name="bn", output_names=["y"])
    assert_refused(b.model([y]), "weight 'w_abs' is not a constant initializer")


def test_refuses_bn_parameters_that_are_not_initializers():
    model = conv_bn_model()
    model.graph.inputs.append(model.graph.initializers["bn_mean"])
    assert_refused(model, "parameter 'bn_mean' is a graph input")


def test_refuses_bn_parameters_in_constant_nodes_until_lifted():
    # Paddle-style: BN parameters held by Constant nodes; lift-constants (a prerequisite) fixes it.
    b = Builder()
    x = b.input("x", ["N", 2, 4, 4])
    w = b.init("W", np.random.default_rng(0).standard_normal((3, 2, 1, 1)).astype(np.float32))
    h = b.op("Conv", [x, w], name="conv")
    params = [b.const(k, v) for k, v in bn_params(3).items()]
    y = b.op("BatchNormalization", [h, *params], name="bn", output_names=["y"])
    model = b.model([y])
    assert_refused(model, "parameter 'scale' is not a constant initializer")
    assert FoldBatchNorm.prerequisites == ("lift-constants",)
    LiftConstants()(model)
    fold_and_compare(model, "Conv 'conv'")


def test_refuses_training_mode():
    model = conv_bn_model()
    find_node(model, "bn").attributes["training_mode"] = ir.AttrInt64("training_mode", 1)
    assert_refused(model, "training_mode=1")


def test_refuses_a_bn_with_several_outputs():
    model = conv_bn_model()
    bn = find_node(model, "bn")
    bn.resize_outputs(3)
    assert_refused(model, "it has 3 outputs (training mode)")


def test_refuses_non_positive_variance():
    model = conv_bn_model()
    var = model.graph.initializers["bn_var"]
    array = var.const_value.numpy().copy()
    array[2] = -1.0
    var.const_value = ir.tensor(array, name="bn_var")
    assert_refused(model, "var + epsilon is not positive for every channel")


def test_refuses_a_bn_after_another_op():
    b = Builder()
    x = b.input("x", ["N", 3, 4, 4])
    r = b.op("Relu", [x], name="relu")
    params = [b.init(k, v) for k, v in bn_params(3).items()]
    y = b.op("BatchNormalization", [r, *params], name="bn", output_names=["y"])
    reason = "its input comes from Relu, not from Conv, ConvTranspose, Gemm or MatMul"
    assert_refused(b.model([y]), reason)


def test_refuses_a_bn_on_a_graph_input():
    b = Builder()
    x = b.input("x", ["N", 3, 4, 4])
    params = [b.init(k, v) for k, v in bn_params(3).items()]
    y = b.op("BatchNormalization", [x, *params], name="bn", output_names=["y"])
    reason = "its input comes from a graph input, not from Conv, ConvTranspose, Gemm or MatMul"
    assert_refused(b.model([y]), reason)


def test_refuses_a_matmul_whose_output_is_3d():
    # BN normalises axis 1 (here 3 rows); the MatMul's features are the last axis.
    b = Builder()
    x = b.input("x", ["N", 3, 5])
    w = b.init("W", np.ones((5, 4), np.float32))
    h = b.op("MatMul", [x, w], name="matmul")
    params = [b.init(k, v) for k, v in bn_params(3).items()]
    y = b.op("BatchNormalization", [h, *params], name="bn", output_names=["y"])
    model = b.model([y])
    run(model, random_feeds(model))  # a valid model
    assert_refused(
        model,
        "the MatMul output is 3-D: BatchNormalization normalises axis 1, "
        "the MatMul's features are the last axis",
    )


def test_refuses_a_matmul_of_unknown_rank():
    b = Builder()
    x = b.input("x", ["N", 5])
    x.shape = None
    w = b.init("W", np.ones((5, 4), np.float32))
    h = b.op("MatMul", [x, w], name="matmul")
    params = [b.init(k, v) for k, v in bn_params(4).items()]
    y = b.op("BatchNormalization", [h, *params], name="bn", output_names=["y"])
    y.shape = ir.Shape(["N", 4])
    assert_refused(b.model([y]), "the MatMul output's rank is unknown (run infer-shapes first)")


def test_refuses_a_matmul_weight_that_is_not_2d():
    b = Builder()
    x = b.input("x", [2, 3, 5])
    w = b.init("W", np.ones((2, 5, 4), np.float32))
    h = b.op("MatMul", [x, w], name="matmul")
    params = [b.init(k, v) for k, v in bn_params(3).items()]
    y = b.op("BatchNormalization", [h, *params], name="bn", output_names=["y"])
    assert_refused(b.model([y]), "the MatMul weight is 3-D, only 2-D weights fold")


def test_digits_cnn_folds_every_bn():
    model = ir.load(models.fetch("digits_cnn"))
    feeds = random_feeds(model, batch=16)
    before = run(model, feeds)
    reference = clone(model)
    p = FoldBatchNorm()
    assert p(model).modified
    assert "BatchNormalization" in ops(reference) and "BatchNormalization" not in ops(model)
    assert not refusals(p)
    check(model)
    assert_close(before, run(model, feeds), rel=1e-5)
