"""low-rank-gemm: exact limits, every refusal, options, data-aware fitting, minilm_l6.

Exactness: at full rank the factors multiply back to the weight (tested on the math in
onnxcompress.factorize, since the pass refuses full rank: it would not shrink), and a weight
of true rank r is reproduced to float tolerance at rank r (accepted, since it shrinks).
"""

from __future__ import annotations

import time

import numpy as np
import onnx_ir as ir
import pytest
from onnxcompress.passes.low_rank_gemm import LowRankGemm, LowRankGemmOptions

import onnxcompress
from onnxcompress.errors import CalibrationError, OptionError
from onnxcompress.factorize import RankRule, gram_of, low_rank_factors, plan, whitening
from onnxcompress.pass_base import PassContext
from onnxcompress.pipeline import Pipeline
from tests.graphs import (
    Builder,
    assert_close,
    assert_left_alone,
    check,
    find_node,
    ops,
    random_feeds,
    records,
    run,
)

RNG = np.random.default_rng(0)


def low_rank(k: int, n: int, r: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((k, r)) @ rng.standard_normal((r, n)) / np.sqrt(r)).astype(np.float32)


def matmul_model(w: np.ndarray, x_shape=("B", "T", None), name="mm") -> ir.Model:
    """x[B, T, K] @ W → y."""
    b = Builder()
    x = b.input("x", [d if d is not None else w.shape[0] for d in x_shape])
    y = b.op("MatMul", [x, b.init("W", w)], name=name, output_names=["y"])
    return b.model([y])


def gemm_model(w: np.ndarray, trans_b=1, alpha=1.0, beta=1.0, bias=True, trans_a=0) -> ir.Model:
    k = w.shape[1] if trans_b else w.shape[0]
    n = w.shape[0] if trans_b else w.shape[1]
    b = Builder()
    x = b.input("x", [k, "M"] if trans_a else ["M", k])
    inputs = [x, b.init("W", w)]
    if bias:
        inputs.append(b.init("C", RNG.standard_normal(n).astype(np.float32)))
    y = b.op("Gemm", inputs, name="gemm", output_names=["y"], transA=trans_a, transB=trans_b, alpha=alpha, beta=beta)
    return b.model([y])


def apply(model: ir.Model, feeds=None, **options) -> LowRankGemm:
    options.setdefault("min_elements", 0)
    p = LowRankGemm(LowRankGemmOptions(**options), PassContext(calibration=feeds))
    p(model)
    return p


def assert_untouched(model: ir.Model, reason: str, node: str = "mm", **options) -> None:
    assert_left_alone(LowRankGemm(LowRankGemmOptions(**{"min_elements": 0, **options})), model, reason, node)


# ---------------------------------------------------------------------------- the math


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (32, 32)])
def test_full_rank_factors_reproduce_the_weight(shape):
    w = RNG.standard_normal(shape)
    a, b = low_rank_factors(w, min(shape))
    assert a.shape == (shape[0], min(shape)) and b.shape == (min(shape), shape[1])
    np.testing.assert_allclose(a @ b, w, atol=1e-10)
    x = RNG.standard_normal((5, shape[0])).astype(np.float32)  # the layer in float32
    np.testing.assert_allclose(x @ a.astype(np.float32) @ b.astype(np.float32), x @ w.astype(np.float32),
                               rtol=1e-4, atol=1e-4)


def test_full_rank_data_aware_factors_reproduce_the_weight():
    w = RNG.standard_normal((48, 20))
    x = RNG.standard_normal((30, 48)) * np.linspace(0.01, 10, 48)  # fewer rows than inputs
    a, b = low_rank_factors(w, 20, gram=gram_of(x))
    np.testing.assert_allclose(a @ b, w, atol=1e-8)


def test_truncation_is_optimal_and_balanced():
    w = RNG.standard_normal((30, 20))
    a, b = low_rank_factors(w, 5)
    s = np.linalg.svd(w, compute_uv=False)
    assert np.linalg.norm(w - a @ b) == pytest.approx(np.sqrt(np.sum(s[5:] ** 2)), rel=1e-9)
    np.testing.assert_allclose(np.linalg.norm(a, axis=0), np.linalg.norm(b, axis=1))  # √Σ on both sides


def test_data_aware_minimises_the_output_error():
    w = RNG.standard_normal((40, 30))
    x = RNG.standard_normal((400, 40)) * np.geomspace(0.01, 10, 40)  # very anisotropic inputs
    plain_a, plain_b = low_rank_factors(w, 8)
    aware_a, aware_b = low_rank_factors(w, 8, gram=gram_of(x), damping=1e-6)
    plain = np.linalg.norm(x @ w - x @ plain_a @ plain_b)
    aware = np.linalg.norm(x @ w - x @ aware_a @ aware_b)
    assert aware < 0.5 * plain
    # The energy of the whitened spectrum is the share of output energy kept on the data.
    p = plan(w, RankRule(rank=8), gram=gram_of(x), damping=1e-6)
    assert 1 - p.energy == pytest.approx(aware**2 / np.linalg.norm(x @ w) ** 2, rel=1e-3)


def test_whitening_survives_a_singular_covariance():
    s, _ = whitening(np.zeros((6, 6)), 0.01)
    assert np.all(np.isfinite(s))


def test_rank_rule():
    squares = np.array([50.0, 30.0, 15.0, 4.0, 1.0])
    assert RankRule(energy=0.8).choose(squares) == 2
    assert RankRule(energy=0.81).choose(squares) == 3
    assert RankRule(energy=1.0).choose(squares) == 5
    assert RankRule(ratio=0.5).choose(squares) == 3  # rounded up
    assert RankRule(ratio=0.2).choose(squares) == 1
    assert RankRule(rank=7).choose(squares) == 7  # the pass refuses it
    assert RankRule().choose(np.zeros(4)) == 0


def test_randomized_svd_for_a_small_rank_of_a_large_matrix():
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((600, 40)) @ rng.standard_normal((40, 700))) + 0.01 * rng.standard_normal((600, 700))
    p = plan(w, RankRule(rank=40))
    assert p.svd is None and p.method() == "randomized svd"
    a, b = p.factors()
    optimal = np.sqrt(np.sum(p.squares[40:]))
    assert np.linalg.norm(w - a @ b) <= 1.001 * optimal
    assert plan(w, RankRule(rank=200)).method() == "svd"  # above a tenth of the full rank


# ---------------------------------------------------------------------------- the pass: exact cases


def test_true_rank_weight_is_reproduced_at_its_rank():
    model = matmul_model(low_rank(64, 48, 3))
    feeds = random_feeds(model)
    before = run(model, feeds)
    p = apply(model, rank=3)
    assert [r.action for r in records(p)] == ["rewritten"]
    detail = records(p)[0].detail
    assert "rank 3 of 48" in detail and "3,072 → 336 parameters" in detail
    assert ops(model) == ["MatMul", "MatMul"]
    assert find_node(model, "mm").inputs[0].producer().name == "mm/lowrank_a"
    assert "W" not in model.graph.initializers  # the old weight is gone
    assert [v.name for v in model.graph.outputs] == ["y"]
    check(model)
    assert_close(before, run(model, feeds), rel=1e-5)


def test_energy_finds_the_true_rank():
    model = matmul_model(low_rank(64, 48, 5))
    feeds = random_feeds(model)
    before = run(model, feeds)
    p = apply(model, energy=0.999999)
    assert "rank 5 of 48" in records(p)[0].detail
    assert_close(before, run(model, feeds), rel=1e-5)


@pytest.mark.parametrize("trans_b, alpha, beta, bias", [(1, 1.0, 1.0, True), (0, 0.5, 2.0, True), (1, 2.0, 1.0, False)])
def test_gemm_keeps_bias_alpha_beta_and_trans_b(trans_b, alpha, beta, bias):
    w = low_rank(40, 30, 4)
    model = gemm_model(w.T.copy() if trans_b else w, trans_b, alpha, beta, bias)
    feeds = random_feeds(model)
    before = run(model, feeds)
    p = apply(model, rank=4)
    assert p.records[0].action == "rewritten"
    assert ops(model) == ["MatMul", "Gemm"]
    gemm = find_node(model, "gemm")
    assert gemm.attributes.get_int("transB", 0) == trans_b
    assert len(gemm.inputs) == (3 if bias else 2)
    check(model)
    assert_close(before, run(model, feeds), rel=1e-5)


def test_lossy_rank_and_lineage_through_compress():
    w = RNG.standard_normal((64, 64)).astype(np.float32)
    model = matmul_model(w)
    result = onnxcompress.compress(model, "low-rank-gemm{rank=8,min_elements=0}")
    entry = next(p for p in result.report.passes if p.name == "low-rank-gemm")
    assert entry.status == "changed"
    new = [n for n in result.model.graph if n.op_type == "MatMul"]
    assert len(new) == 2 and all(n.metadata_props.get("onnxcompress.pass") == "low-rank-gemm" for n in new)
    assert result.report.final_cost["params"] == 8 * (64 + 64)
    feeds = random_feeds(model)
    error = np.linalg.norm(run(model, feeds)[0] - run(result.model, feeds)[0])
    assert 0 < error < np.linalg.norm(run(model, feeds)[0])


def test_shared_weight_is_factored_once():
    w = low_rank(32, 32, 2)
    b = Builder()
    x = b.input("x", ["N", 32])
    weight = b.init("W", w)
    y1 = b.op("MatMul", [x, weight], name="mm1")
    y2 = b.op("MatMul", [b.op("Relu", [y1]), weight], name="mm2", output_names=["y"])
    model = b.model([y2])
    feeds = random_feeds(model)
    before = run(model, feeds)
    p = apply(model, rank=2)
    assert [r.action for r in records(p)] == ["rewritten", "rewritten"]
    assert "shared by 2 nodes" in records(p)[0].detail
    assert sorted(model.graph.initializers) == ["W.lowrank_a", "W.lowrank_b"]
    assert_close(before, run(model, feeds), rel=1e-5)


# ---------------------------------------------------------------------------- refusals


def test_full_rank_would_not_shrink():
    model = matmul_model(RNG.standard_normal((64, 48)).astype(np.float32))
    assert_untouched(model, "would not shrink: r(K+N)=48·(64+48)=5,376 ≥ K·N=64·48=3,072", ratio=1.0)
    assert_untouched(model, "would not shrink: r(K+N)=28·(64+48)", rank=28)  # 28·112 = 3136 ≥ 3072
    assert_untouched(model, "would not shrink", energy=0.95)  # a random matrix has a flat spectrum


def test_rank_above_full_rank_is_refused():
    model = matmul_model(RNG.standard_normal((64, 48)).astype(np.float32))
    assert_untouched(model, "rank=60 is more than the full rank min(K, N)=min(64, 48)=48", rank=60)


def test_all_zero_weight_is_refused():
    assert_untouched(matmul_model(np.zeros((64, 48), np.float32)), "all zero")


def test_non_constant_weights_are_refused():
    b = Builder()
    x = b.input("x", ["N", 8])
    w = b.input("w", [8, 8])
    y1 = b.op("MatMul", [x, w], name="mm")
    t = b.op("Transpose", [x], name="tr")
    y2 = b.op("MatMul", [x, t], name="mm2")
    model = b.model([y1, y2])
    assert_untouched(model, "weight 'w' is a graph input, not a constant", "mm")
    assert_untouched(model, "is not constant (computed by Transpose 'tr')", "mm2")


def test_excluded_and_small_weights_are_refused():
    model = matmul_model(low_rank(64, 48, 3))
    assert_untouched(model, "excluded by exclude=^m", rank=3, exclude="^m")
    assert_untouched(model, "weight 'W' has 3,072 elements, fewer than min_elements=4,096", rank=3, min_elements=4096)
    assert not LowRankGemm().candidates(model)  # below the default min_elements too


def test_gemm_trans_a_is_refused():
    model = gemm_model(low_rank(40, 30, 3), trans_b=0, trans_a=1)
    assert_untouched(model, "transA=1", "gemm", rank=3)


def test_weight_shared_with_another_op_is_refused():
    b = Builder()
    x = b.input("x", ["N", 32])
    weight = b.init("W", low_rank(32, 32, 2))
    y1 = b.op("MatMul", [x, weight], name="mm")
    y2 = b.op("Add", [y1, weight], name="add", output_names=["y"])
    model = b.model([y2])
    assert_untouched(model, "weight 'W' is also read by 'add' (Add), which is not factorised with it", rank=2)


def test_three_dim_weight_is_refused():
    b = Builder()
    x = b.input("x", [2, 4, 16])
    y = b.op("MatMul", [x, b.init("W", RNG.standard_normal((2, 16, 16)).astype(np.float32))], name="mm")
    assert_untouched(b.model([y]), "3-D [2, 16, 16], only 2-D weights", rank=2)


# ---------------------------------------------------------------------------- data-aware


def anisotropic_model_and_feeds():
    k, n = 48, 40
    w = RNG.standard_normal((k, n)).astype(np.float32)
    model = matmul_model(w, x_shape=("B", 6, None))
    scale = np.geomspace(0.02, 5, k).astype(np.float32)
    rng = np.random.default_rng(7)
    feeds = [{"x": (rng.standard_normal((2, 6, k)) * scale).astype(np.float32)} for _ in range(8)]
    return model, feeds


def test_data_aware_beats_plain_at_the_same_rank():
    model, feeds = anisotropic_model_and_feeds()
    held_out = anisotropic_model_and_feeds()[1]
    ref = [run(model, f)[0] for f in held_out]

    def error(m):
        return sum(float(np.linalg.norm(run(m, f)[0] - r)) for f, r in zip(held_out, ref))

    plain, aware = ir.from_proto(ir.to_proto(model)), ir.from_proto(ir.to_proto(model))
    apply(plain, rank=8)
    p = apply(aware, feeds, rank=8, data_aware=True)
    assert "data-aware" in records(p)[0].detail
    assert error(aware) < 0.5 * error(plain)
    check(aware)


def test_data_aware_needs_calibration():
    model, _ = anisotropic_model_and_feeds()
    with pytest.raises(CalibrationError, match="data_aware=true needs calibration data"):
        apply(model, rank=8, data_aware=True)
    with pytest.raises(CalibrationError, match="needs calibration data"):  # the user's error, as is
        onnxcompress.compress(model, "low-rank-gemm{rank=8,data_aware=true}")


# ---------------------------------------------------------------------------- options, candidates


@pytest.mark.parametrize(
    "text, message",
    [
        ("low-rank-gemm{rank=-1}", "'rank' must be a positive integer"),
        ("low-rank-gemm{ratio=1.5}", "'ratio' must lie in (0, 1]"),
        ("low-rank-gemm{energy=0}", "'energy' must lie in (0, 1]"),
        ("low-rank-gemm{energy=1.2}", "'energy' must lie in (0, 1]"),
        ("low-rank-gemm{rank=8,ratio=0.5}", "'ratio' cannot be combined with rank"),
        ("low-rank-gemm{rank=8,energy=0.9}", "'energy' cannot be combined with rank"),
        ("low-rank-gemm{ratio=0.5,energy=0.9}", "'energy' cannot be combined with ratio"),
        ("low-rank-gemm{damping=0}", "'damping' must be a positive number"),
        ("low-rank-gemm{min_elements=-1}", "'min_elements' must be 0 or more"),
        ("low-rank-gemm{exclude=(}", "'exclude' is not a valid regular expression"),
        ("low-rank-gemm{rank=x}", "'rank' must be an integer"),
        ("low-rank-gemm{ranks=3}", "unknown option 'ranks'"),
    ],
)
def test_bad_options(text, message):
    with pytest.raises(OptionError, match="low-rank-gemm: .*" + message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        Pipeline.parse(text)


def test_pipeline_prints_back_and_inserts_prerequisites():
    text = "lift-constants,fold-batchnorm,low-rank-gemm{ratio=0.25,data_aware=true}"
    assert str(Pipeline.parse(text)) == text
    assert str(Pipeline.parse("low-rank-gemm")) == "lift-constants,fold-batchnorm,low-rank-gemm"


def test_candidates_show_rank_and_saving():
    model = matmul_model(low_rank(128, 96, 4))
    (candidate,) = LowRankGemm().candidates(model)
    assert candidate.node == "mm" and "rank 4 of 96" in candidate.what and "→ 896 parameters" in candidate.what
    assert ir.to_onnx_text(model) == ir.to_onnx_text(matmul_model(low_rank(128, 96, 4)))  # unchanged
    assert LowRankGemm().candidates(matmul_model(RNG.standard_normal((128, 96)).astype(np.float32))) == []


# ---------------------------------------------------------------------------- minilm_l6


@pytest.fixture(scope="module")
def minilm():
    import models

    return ir.load(models.fetch("minilm_l6")), models.calibration_feeds("minilm_l6", 12)


def _sqnr(model, reference, feeds) -> float:
    from onnxcompress.metrics import tensor_drift
    from onnxcompress.runtime import make_session, run_all

    outputs = run_all(make_session(model), feeds)
    return tensor_drift(reference, [o["embedding"] for o in outputs]).sqnr_db


@pytest.mark.real_model
def test_minilm_weight_matmuls_are_factorised_or_refused_with_reasons(minilm):
    base, _ = minilm
    model = base.clone()
    start = time.perf_counter()
    p = apply(model, energy=0.95, min_elements=4096)
    elapsed = time.perf_counter() - start
    weight_nodes = [n.name for n in base.graph if n.op_type == "MatMul" and n.inputs[1].const_value is not None]
    assert len(weight_nodes) == 36
    by_node = {r.node: r for r in p.records}
    for name in weight_nodes:
        record = by_node[name]
        assert record.action == "rewritten" or "would not shrink" in record.detail, record
    rewritten = [r for r in p.records if r.action == "rewritten"]
    kept = [float(r.detail.split("weight energy kept ")[1].split(",")[0]) for r in rewritten]
    assert rewritten and all(0.95 <= e < 0.96 for e in kept)
    others = [r for r in p.records if r.node not in weight_nodes]
    assert len(others) == 12 and all("is not constant (computed by" in r.detail for r in others)
    check(model, full=False)
    print(f"minilm low-rank-gemm{{energy=0.95}}: {len(rewritten)} rewritten in {elapsed:.1f} s")


@pytest.mark.real_model
def test_minilm_data_aware_beats_plain_at_the_same_rank(minilm):
    base, feeds = minilm
    from onnxcompress.runtime import make_session, run_all

    reference = [o["embedding"] for o in run_all(make_session(base), feeds)]
    plain, aware = base.clone(), base.clone()
    apply(plain, ratio=0.375, min_elements=4096)
    start = time.perf_counter()
    p = apply(aware, feeds, ratio=0.375, data_aware=True, min_elements=4096)
    elapsed = time.perf_counter() - start
    assert sum(r.action == "rewritten" for r in p.records) == 36
    plain_db, aware_db = _sqnr(plain, reference, feeds), _sqnr(aware, reference, feeds)
    print(f"minilm ratio=0.375: SQNR plain {plain_db:.2f} dB, data-aware {aware_db:.2f} dB ({elapsed:.1f} s)")
    assert aware_db >= plain_db + 3
