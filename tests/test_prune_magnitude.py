"""prune-magnitude: exact zero counts, global threshold, N:M groups, refusals, sparse storage."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import onnxcompress
from onnxcompress.errors import OptionError
from onnxcompress.passes.prune_magnitude import PruneMagnitude, PruneMagnitudeOptions
from onnxcompress.sparse_storage import STORAGE_KEY, from_sparse_storage, to_sparse_storage
from onnxcompress.pipeline import Pipeline
from tests.graphs import (
    Builder,
    assert_identical,
    check,
    clone,
    random_feeds,
    records,
    refusals,
    run,
)

Opts = PruneMagnitudeOptions


def prune(model: ir.Model, **options) -> tuple[PruneMagnitude, bool]:
    pass_ = PruneMagnitude(Opts(**options))
    return pass_, pass_(model).modified


def weight(model: ir.Model, name: str) -> np.ndarray:
    return model.graph.initializers[name].const_value.numpy()


def three_layer_model(seed: int = 0, zeros: float = 0.0) -> ir.Model:
    """x[N,8,6,6] -> conv(W1 16x8x3x3) -> Relu -> Flatten -> gemm(W2 576x40, transB=0) -> Relu
    -> matmul(W3 40x24) -> y. The layers have different scales (for the global threshold);
    ``zeros``: share of each weight already exactly zero."""
    rng = np.random.default_rng(seed)

    def w(shape, scale):
        array = (scale * rng.standard_normal(shape)).astype(np.float32)
        array[rng.random(shape) < zeros] = 0.0
        return array

    b = Builder()
    x = b.input("x", ["N", 8, 6, 6])
    h = b.op("Conv", [x, b.init("W1", w((16, 8, 3, 3), 0.3)), b.init("b1", w(16, 0.1))], name="conv", pads=[1, 1, 1, 1])
    h = b.op("Flatten", [b.op("Relu", [h], name="relu1")], name="flatten")
    h = b.op("Gemm", [h, b.init("W2", w((576, 40), 0.05)), b.init("b2", w(40, 0.1))], name="gemm")
    h = b.op("Relu", [h], name="relu2")
    y = b.op("MatMul", [h, b.init("W3", w((40, 24), 1.0))], name="matmul", output_names=["y"])
    return b.model([y])


SIZES = {"W1": 16 * 8 * 9, "W2": 576 * 40, "W3": 40 * 24}


# ---------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    "text, message",
    [
        ("sparsity=1.5", "option 'sparsity' must lie in [0, 1), got 1.5"),
        ("sparsity=1.0", "option 'sparsity' must lie in [0, 1)"),
        ("sparsity=-0.1", "option 'sparsity' must lie in [0, 1)"),
        ("pattern=4:2", "option 'pattern' must be 'N:M' with 0 < N < M (e.g. 2:4), got '4:2'"),
        ("pattern=abc", "option 'pattern' must be 'N:M' with 0 < N < M (e.g. 2:4), got 'abc'"),
        ("pattern=0:4", "option 'pattern' must be 'N:M'"),
        ("pattern=2:4,sparsity=0.9", "option 'sparsity' 0.9 contradicts pattern=2:4, which implies 0.5"),
        ("pattern=2:4,scope=global", "option 'scope' global has no meaning with pattern=2:4"),
        ("min_elements=-1", "option 'min_elements' must be at least 0"),
        ("exclude=(", "option 'exclude' is not a valid regular expression"),
        ("scope=model", "option 'scope' must be one of layer|global, got 'model'"),
    ],
)
def test_invalid_options_are_option_errors(text, message):
    with pytest.raises(OptionError) as info:
        Pipeline.parse(f"prune-magnitude{{{text}}}")
    assert str(info.value).startswith("prune-magnitude: ")
    assert message in str(info.value)


def test_options_print_back_and_pattern_implies_sparsity():
    pipe = Pipeline.parse("prune-magnitude{pattern=1:4,sparse_storage=true}")
    assert str(pipe) == "lift-constants,fold-batchnorm,prune-magnitude{pattern=1:4,sparse_storage=true}"
    assert Opts(pattern="1:4").target == 0.75 and Opts(pattern="1:4", sparsity=0.75).nm == (1, 4)
    assert Opts(sparsity=0.3).target == 0.3


# ---------------------------------------------------------------------------- exact limits


def test_sparsity_zero_is_a_bit_identical_no_op():
    model = three_layer_model()
    before = ir.to_proto(model).SerializeToString()
    pass_, modified = prune(model, sparsity=0.0, sparse_storage=True, min_elements=0)
    assert modified is False and records(pass_) == []
    assert ir.to_proto(model).SerializeToString() == before


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.77, 0.95])
def test_layer_scope_zeroes_exactly_floor_s_n_smallest(sparsity):
    model = three_layer_model()
    original = {k: weight(model, k).copy() for k in SIZES}
    pass_, modified = prune(model, sparsity=sparsity, min_elements=0)
    assert modified
    for name, size in SIZES.items():
        old, new = original[name], weight(model, name)
        pruned = new == 0
        assert pruned.sum() == math.floor(sparsity * size)
        assert np.array_equal(new[~pruned], old[~pruned])  # survivors keep their exact value
        assert np.abs(old[~pruned]).min() >= np.abs(old[pruned]).max()
    for bias in ("b1", "b2"):  # biases are never touched
        assert np.count_nonzero(weight(model, bias)) == weight(model, bias).size
    assert {r.node for r in records(pass_, "rewritten")} == {"conv", "gemm", "matmul"}
    detail = next(r.detail for r in records(pass_) if r.node == "gemm")
    assert detail.startswith(f"sparsity 0.0% -> {math.floor(sparsity * SIZES['W2']) / SIZES['W2']:.1%}")


def test_already_zero_weights_stay_zero_and_count_towards_the_target():
    model = three_layer_model(zeros=0.3)
    zero_before = {k: weight(model, k) == 0 for k in SIZES}
    prune(model, sparsity=0.5, min_elements=0)
    for name, size in SIZES.items():
        new = weight(model, name)
        assert np.all(new[zero_before[name]] == 0)
        assert (new == 0).sum() == max(zero_before[name].sum(), math.floor(0.5 * size))


def test_a_layer_already_sparser_than_the_target_is_refused_unchanged():
    model = three_layer_model(zeros=0.6)
    before = ir.to_proto(model).SerializeToString()
    pass_, modified = prune(model, sparsity=0.5, min_elements=0)
    assert modified is False
    assert ir.to_proto(model).SerializeToString() == before
    assert all("already" in r and "zero, at or above the target" in r for r in refusals(pass_))
    assert len(refusals(pass_)) == 3


def test_global_scope_uses_one_threshold_across_layers():
    model = three_layer_model()
    original = {k: weight(model, k).copy() for k in SIZES}
    pass_, modified = prune(model, sparsity=0.6, scope="global", min_elements=0)
    assert modified
    pruned = np.concatenate([np.abs(original[k][weight(model, k) == 0]) for k in SIZES])
    kept = np.concatenate([np.abs(original[k][weight(model, k) != 0]) for k in SIZES])
    assert pruned.size == math.floor(0.6 * sum(SIZES.values()))
    assert kept.min() >= pruned.max()
    shares = {k: float(np.mean(weight(model, k) == 0)) for k in SIZES}
    assert shares["W2"] > 0.6 > 0.2 > shares["W1"] > shares["W3"]  # the small-scale layer takes most


def test_global_scope_breaks_ties_to_the_exact_count():
    b = Builder()
    x = b.input("x", ["N", 4])
    h = b.op("MatMul", [x, b.init("A", np.ones((4, 5), np.float32))], name="a")
    y = b.op("MatMul", [h, b.init("B", np.full((5, 3), -1.0, np.float32))], name="b", output_names=["y"])
    model = b.model([y])
    prune(model, sparsity=0.5, scope="global", min_elements=0)
    assert (weight(model, "A") == 0).sum() + (weight(model, "B") == 0).sum() == math.floor(0.5 * 35)


# ---------------------------------------------------------------------------- N:M


def assert_n_of_m(old: np.ndarray, new: np.ndarray, axis: int, n: int, m: int) -> None:
    """Along ``axis``, every group of m keeps (at most) the n largest |w| and zeroes the rest."""
    o = np.moveaxis(old, axis, -1).reshape(-1, m)
    w = np.moveaxis(new, axis, -1).reshape(-1, m)
    assert np.all((w == 0).sum(axis=1) >= m - n)
    for group_old, group_new in zip(o, w):
        kept = np.abs(group_old[group_new != 0])
        dropped = np.abs(group_old[group_new == 0])
        if kept.size and dropped.size:
            assert kept.min() >= dropped.max()
        assert np.array_equal(group_new[group_new != 0], group_old[group_new != 0])


@pytest.mark.parametrize("trans_b", [0, 1])
def test_two_of_four_along_the_reduction_axis(trans_b):
    rng = np.random.default_rng(3)
    b = Builder()
    x = b.input("x", ["N", 8, 5, 5])
    h = b.op("Conv", [x, b.init("Wc", rng.standard_normal((12, 8, 3, 3)).astype(np.float32))], name="conv")
    h = b.op("Conv", [h, b.init("Wd", rng.standard_normal((8, 12, 1, 1)).astype(np.float32))], name="conv2")
    h = b.op("Flatten", [h], name="flat")  # [N, 72]
    gemm_w = rng.standard_normal((12, 72) if trans_b else (72, 12)).astype(np.float32)
    h = b.op("Gemm", [h, b.init("Wg", gemm_w)], name="gemm", transB=trans_b)
    y = b.op("MatMul", [h, b.init("Wm", rng.standard_normal((12, 6)).astype(np.float32))], name="mm",
             output_names=["y"])
    model = b.model([y])
    old = {k: weight(model, k).copy() for k in ("Wc", "Wd", "Wg", "Wm")}
    pass_, modified = prune(model, pattern="2:4", min_elements=0)
    assert modified
    check(model)
    assert_n_of_m(old["Wc"], weight(model, "Wc"), 1, 2, 4)
    assert_n_of_m(old["Wd"], weight(model, "Wd"), 1, 2, 4)
    assert_n_of_m(old["Wg"], weight(model, "Wg"), 1 if trans_b else 0, 2, 4)
    assert_n_of_m(old["Wm"], weight(model, "Wm"), 0, 2, 4)
    for name in old:
        assert np.mean(weight(model, name) == 0) == 0.5


def test_conv_transpose_groups_run_along_its_input_channels():
    rng = np.random.default_rng(4)
    b = Builder()
    x = b.input("x", ["N", 8, 3, 3])
    w = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)  # [C_in, C_out, k, k]: reduction axis 0
    y = b.op("ConvTranspose", [x, b.init("W", w)], name="convt", output_names=["y"])
    model = b.model([y])
    pass_, modified = prune(model, pattern="1:4", min_elements=0)
    assert modified and "1:4 along axis 0" in records(pass_, "rewritten")[0].detail
    assert_n_of_m(w, weight(model, "W"), 0, 1, 4)
    assert np.mean(weight(model, "W") == 0) == 0.75


def test_pattern_refuses_a_reduction_length_not_divisible_by_m():
    b = Builder()
    x = b.input("x", ["N", 3, 4, 4])
    y = b.op("Conv", [x, b.init("W", np.ones((8, 3, 3, 3), np.float32))], name="conv", output_names=["y"])
    pass_, modified = prune(b.model([y]), pattern="2:4", min_elements=0)
    assert modified is False
    assert refusals(pass_, "conv") == ["reduction axis 1 has length 3, not a multiple of 4 (pattern=2:4)"]


# ---------------------------------------------------------------------------- refusals


def test_min_elements_and_exclude_are_refused_with_reasons():
    model = three_layer_model()
    w1, w3 = weight(model, "W1").copy(), weight(model, "W3").copy()
    pass_, modified = prune(model, sparsity=0.5, exclude="^mat")  # W1: 1152 elements, W3: 960
    assert modified
    assert refusals(pass_, "matmul") == ["excluded by exclude=^mat"]
    assert refusals(pass_, "conv") == []
    pass_, _ = prune(model, sparsity=0.5, min_elements=5000)
    assert refusals(pass_, "conv") == ["only 1152 elements (< min_elements=5000)"]
    assert np.array_equal(weight(model, "W3"), w3) and not np.array_equal(weight(model, "W1"), w1)


def test_shared_weight_is_pruned_once_and_unsafe_weights_are_refused():
    rng = np.random.default_rng(0)
    b = Builder()
    x = b.input("x", ["N", 16])
    p = b.input("P", [16, 16])  # a graph input used as a weight: may be fed at run time
    shared = b.init("S", rng.standard_normal((16, 16)).astype(np.float32))
    other = b.init("T", rng.standard_normal((16, 16)).astype(np.float32))
    h = b.op("MatMul", [x, shared], name="m1")
    h = b.op("Gemm", [h, shared], name="g2")
    h = b.op("MatMul", [h, p], name="m3")
    h = b.op("MatMul", [h, other], name="m4")
    y = b.op("Add", [h, b.op("ReduceSum", [other], name="rs", keepdims=0)], name="add", output_names=["y"])
    model = b.model([y])
    t_before = weight(model, "T").copy()
    pass_, modified = prune(model, sparsity=0.5, min_elements=0)
    assert modified
    assert (weight(model, "S") == 0).sum() == 128  # once, not 0.5 then 0.75
    assert {r.node for r in records(pass_, "rewritten")} == {"m1", "g2"}
    assert "shared by 2 nodes, pruned once" in records(pass_, "rewritten")[0].detail
    assert refusals(pass_, "m3") == ["weight input is not an initializer"]
    assert refusals(pass_, "m4") == ["weight 'T' is also input 0 of ReduceSum 'rs'; pruning would change that too"]
    assert np.array_equal(weight(model, "T"), t_before)
    check(model)


def test_original_tensors_are_not_modified_in_place():
    model = three_layer_model()
    tensor = model.graph.initializers["W2"].const_value
    array = tensor.numpy()
    copy = array.copy()
    duplicate = model.clone()  # shares the tensors
    prune(model, sparsity=0.5)
    assert np.array_equal(array, copy)
    assert model.graph.initializers["W2"].const_value is not tensor
    assert np.array_equal(weight(duplicate, "W2"), copy)


def test_output_passes_checker_and_runs_in_onnxruntime():
    model = three_layer_model()
    feeds = random_feeds(model)
    reference = clone(model)
    prune(model, sparsity=0.5, min_elements=0)
    check(model)
    # the pruned model computes what the original computes with the pruned weights put in
    for name in SIZES:
        reference.graph.initializers[name].const_value = ir.tensor(weight(model, name), name=name)
    assert_identical(run(reference, feeds), run(model, feeds))


def test_candidates_list_eligible_weights():
    model = three_layer_model()
    found = PruneMagnitude(Opts(min_elements=1000)).candidates(model)
    assert [(c.node, c.op_type) for c in found] == [("conv", "Conv"), ("gemm", "Gemm")]
    assert found[1].what == "weight 'W2' [576, 40]: 23040 elements, 0.0% zero now"


# ---------------------------------------------------------------------------- sparse storage


def test_sparse_storage_shrinks_the_file_and_runs_bit_exactly():
    dense_model, sparse_model = three_layer_model(), three_layer_model()
    prune(dense_model, sparsity=0.9, min_elements=0)
    pass_, _ = prune(sparse_model, sparsity=0.9, min_elements=0, sparse_storage=True)
    assert "sparse storage 92160 B -> 27648 B" in records(pass_, "rewritten")[1].detail
    assert any("file size with sparse storage" in n for n in pass_.notes)
    dense = ir.to_proto(dense_model)
    stored = to_sparse_storage(ir.to_proto(sparse_model))
    assert len(stored.graph.initializer) == 2  # only the biases stay dense
    assert [n.op_type for n in stored.graph.node[:3]] == ["Constant"] * 3
    assert stored.ByteSize() < 0.4 * dense.ByteSize()
    onnx.checker.check_model(stored, full_check=True)
    feeds = random_feeds(dense)
    for optimize in (False, True):
        assert_identical(run(dense, feeds, optimize), run(stored, feeds, optimize))
    # back to dense initializers, as onnx_ir needs them, bit for bit
    restored = ir.from_proto(from_sparse_storage(stored))
    for name in SIZES:
        assert weight(restored, name).tobytes() == weight(dense_model, name).tobytes()


def test_sparse_storage_keeps_dense_what_would_grow():
    model = three_layer_model()
    pass_, modified = prune(model, sparsity=0.5, min_elements=0, sparse_storage=True)
    assert modified
    assert all("kept dense: sparse storage would take" in r.detail for r in records(pass_, "rewritten"))
    assert all(STORAGE_KEY not in v.const_value.metadata_props for v in model.graph.initializers.values())
    proto = ir.to_proto(model)
    assert to_sparse_storage(proto).graph.node[0].op_type == "Conv"


def test_float16_weights_are_pruned_and_stored_sparse_in_their_dtype():
    rng = np.random.default_rng(5)
    b = Builder()
    x = b.input("x", ["N", 64], ir.DataType.FLOAT16)
    y = b.op("MatMul", [x, b.init("W", rng.standard_normal((64, 32)).astype(np.float16))], name="mm",
             output_names=["y"])
    model = b.model([y], ir.DataType.FLOAT16)
    pass_, _ = prune(model, sparsity=0.9, min_elements=0, sparse_storage=True)
    assert weight(model, "W").dtype == np.float16 and (weight(model, "W") == 0).sum() == 1843
    assert records(pass_, "rewritten")[0].detail.endswith("sparse storage 4096 B -> 2050 B")
    dense = ir.to_proto(model)
    stored = to_sparse_storage(ir.to_proto(model))
    assert stored.graph.node[0].attribute[0].sparse_tensor.values.data_type == onnx.TensorProto.FLOAT16
    feeds = random_feeds(dense)
    assert_identical(run(dense, feeds), run(stored, feeds))


def test_from_sparse_storage_reads_sparse_initializers():
    values = onnx.numpy_helper.from_array(np.array([2.0, -3.0], np.float32), "W")
    indices = onnx.numpy_helper.from_array(np.array([[0, 1], [2, 0]], np.int64), "")
    sparse = onnx.helper.make_sparse_tensor(values, indices, [3, 2])
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2])],
        sparse_initializer=[sparse])
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model = ir.from_proto(from_sparse_storage(proto))
    np.testing.assert_array_equal(weight(model, "W"), [[0, 2], [0, 0], [-3, 0]])


# ---------------------------------------------------------------------------- real model


def test_digits_cnn_keeps_accuracy_at_half_sparsity(tmp_path):
    models = pytest.importorskip("models")
    path = models.fetch("digits_cnn")
    result = onnxcompress.compress(path, "prune-magnitude{sparsity=0.5}")
    entry = result.report.passes[-1]
    assert entry.name == "prune-magnitude" and entry.status == "changed"
    assert len([r for r in entry.records if r.action == "rewritten"]) == 4  # the 288-weight first conv is refused
    out = result.save(tmp_path / "pruned.onnx")
    assert models.evaluate("digits_cnn", str(out))["accuracy"] >= 0.95


def test_saving_writes_sparse_storage_and_loading_reads_it_back(tmp_path):
    import onnxcompress
    from onnxcompress.runtime import make_session, run_all

    result = onnxcompress.compress("models/digits_cnn.onnx", "prune-magnitude{sparsity=0.9,sparse_storage=true}")
    dense, sparse = tmp_path / "dense.onnx", tmp_path / "sparse.onnx"
    ir.save(result.model, dense)
    result.save(sparse)
    assert sparse.stat().st_size < 0.5 * dense.stat().st_size
    assert any(n.op_type == "Constant" for n in onnx.load(sparse).graph.node)
    rng = np.random.default_rng(0)
    feeds = [{"input": rng.standard_normal((2, 1, 8, 8)).astype(np.float32)}]
    a = run_all(make_session(str(dense)), feeds)[0]["logits"]
    b = run_all(make_session(str(sparse)), feeds)[0]["logits"]
    np.testing.assert_array_equal(a, b)
    again = onnxcompress.compress(sparse, "cleanup")  # loads through onnx_ir, marks kept
    again.save(tmp_path / "again.onnx")
    assert (tmp_path / "again.onnx").stat().st_size == sparse.stat().st_size
