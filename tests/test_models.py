"""Tests of the model zoo in ``models/``: fetch, ONNX validity, calibration feeds, metrics.

Models other than the committed digits_cnn are marked ``real_model``: they need the
Debian packages and wheels listed in models/requirements.txt and are built into the
cache on first use (fmnist_cnn trains for ~1.5 min cold; the others take seconds).
They never skip: a missing dependency fails with ModelUnavailable's message.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

import models
from models import MODEL_NAMES, ModelUnavailable
from models._common import session

ROOT = Path(__file__).resolve().parents[1]

ORT_DTYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64}

# name -> (evaluation limit, {metric: (min, max)})
EXPECT = {
    "digits_cnn": (None, {"accuracy": (0.95, 1.0)}),
    "fmnist_cnn": (None, {"accuracy": (0.88, 1.0)}),
    "mobilenet_v2": (90, {"top1_agreement": (1.0, 1.0), "kl": (0.0, 1e-6)}),
    "minilm_l6": (490, {"accuracy": (0.75, 1.0), "cosine": (0.9999, 1.0001)}),
    "ppocrv4_rec": (100, {"exact": (0.85, 1.0), "cer": (0.0, 0.05)}),
}


def _params():
    out = []
    for name in MODEL_NAMES:
        marks = [] if name == "digits_cnn" else [pytest.mark.real_model]
        out.append(pytest.param(name, marks=marks, id=name))
    return out


def _fetch(name: str) -> Path:
    try:
        return models.fetch(name)
    except ModelUnavailable as exc:  # fail loudly, never skip
        pytest.fail(f"{name} unavailable: {exc}")


# --------------------------------------------------------------------------- interface
def test_model_names():
    assert MODEL_NAMES == ("digits_cnn", "fmnist_cnn", "mobilenet_v2", "minilm_l6", "ppocrv4_rec")
    assert set(EXPECT) == set(MODEL_NAMES)
    for name in MODEL_NAMES:
        mod = models.model_module(name)
        for fn in ("build", "calibration_feeds", "evaluate"):
            assert callable(getattr(mod, fn)), (name, fn)


def test_unknown_model():
    with pytest.raises(KeyError):
        models.fetch("no_such_model")


def test_cache_dir_env(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "cache"
    monkeypatch.setenv("ONNXCOMPRESS_CACHE", str(target))
    assert models.cache_dir() == target
    assert target.is_dir()


def test_cache_dir_default(tmp_path, monkeypatch):
    monkeypatch.delenv("ONNXCOMPRESS_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert models.cache_dir() == tmp_path / ".cache" / "onnxcompress"
    assert models.cache_dir().is_dir()


def test_missing_data_raises_and_leaves_nothing(tmp_path, monkeypatch):
    from models import fmnist_cnn

    monkeypatch.setenv("ONNXCOMPRESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fmnist_cnn, "DATA_DIR", tmp_path / "nowhere")
    fmnist_cnn._data.cache_clear()
    try:
        with pytest.raises(ModelUnavailable, match="apt-get install dataset-fashion-mnist"):
            models.fetch("fmnist_cnn")
        with pytest.raises(ModelUnavailable, match="apt-get install dataset-fashion-mnist"):
            models.calibration_feeds("fmnist_cnn", count=2)
    finally:
        fmnist_cnn._data.cache_clear()
    assert list((tmp_path / "cache").iterdir()) == []  # atomic: no partial file


def test_missing_font_raises(tmp_path, monkeypatch):
    from models import ppocrv4_rec

    monkeypatch.setattr(ppocrv4_rec, "FONT_DIR", tmp_path)
    with pytest.raises(ModelUnavailable, match="apt-get install fonts-dejavu-core"):
        ppocrv4_rec.render("abc", 0)


# --------------------------------------------------------------------------- per model
@pytest.mark.parametrize("name", _params())
def test_fetch_is_valid_onnx(name):
    path = _fetch(name)
    assert path.suffix == ".onnx" and path.is_file()
    onnx.checker.check_model(str(path))
    t0 = time.perf_counter()
    assert models.fetch(name) == path  # warm: same path, fast
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.parametrize("name", _params())
def test_calibration_feeds(name):
    path = _fetch(name)
    sess = session(path)
    inputs = {i.name: i for i in sess.get_inputs()}
    feeds = models.calibration_feeds(name, count=4, seed=0)
    assert isinstance(feeds, list) and len(feeds) == 4
    for feed in feeds:
        assert set(feed) == set(inputs)
        for key, arr in feed.items():
            assert isinstance(arr, np.ndarray)
            assert arr.dtype == ORT_DTYPES[inputs[key].type], (key, arr.dtype)
            assert arr.ndim == len(inputs[key].shape)
            assert arr.shape[0] == 1
            assert np.isfinite(arr).all()
    # deterministic for a seed, different for another seed
    again = models.calibration_feeds(name, count=4, seed=0)
    for a, b in zip(feeds, again):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    other = models.calibration_feeds(name, count=4, seed=1)
    assert any(
        a[k].shape != b[k].shape or not np.array_equal(a[k], b[k])
        for a, b in zip(feeds, other) for k in a
    )
    # the feeds run through the model
    out = sess.run(None, feeds[0])
    assert np.isfinite(out[0]).all()


@pytest.mark.parametrize("name", _params())
def test_fp32_metrics(name):
    path = _fetch(name)
    limit, expect = EXPECT[name]
    metrics = models.evaluate(name, path, limit=limit)
    assert set(metrics) == set(expect), metrics
    for key, (lo, hi) in expect.items():
        assert isinstance(metrics[key], float)
        assert lo <= metrics[key] <= hi, (name, metrics)


# --------------------------------------------------------------------------- model specifics
def test_digits_committed_model():
    from models import digits_cnn

    path = models.fetch("digits_cnn")
    assert path == ROOT / "models" / "digits_cnn.onnx"
    m = onnx.load(str(path))
    ops = [n.op_type for n in m.graph.node]
    assert ops.count("Conv") == 3 and ops.count("Gemm") == 2
    assert ops.count("BatchNormalization") == 3  # kept for the fold-batchnorm pass
    assert [i.name for i in m.graph.input] == ["input"]
    assert [o.name for o in m.graph.output] == ["logits"]
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    params = sum(int(np.prod(t.dims)) for t in m.graph.initializer)
    assert 100_000 <= params <= 200_000
    # batch of several works
    sess = session(path)
    out = sess.run(None, {"input": np.zeros((5, 1, 8, 8), np.float32)})[0]
    assert out.shape == (5, 10)
    # calibration comes from the train split, never the test split
    _, _, x_te, _ = digits_cnn._split()
    test_rows = {x.tobytes() for x in x_te}
    for feed in models.calibration_feeds("digits_cnn", count=32):
        assert feed["input"].shape == (1, 1, 8, 8)
        assert feed["input"][0].tobytes() not in test_rows


def test_digits_calib_npz():
    z = np.load(ROOT / "models" / "digits_calib.npz")
    assert list(z.keys()) == ["input"]
    assert z["input"].shape == (16, 1, 8, 8) and z["input"].dtype == np.float32
    feeds = models.calibration_feeds("digits_cnn", count=16, seed=0)
    np.testing.assert_array_equal(z["input"], np.concatenate([f["input"] for f in feeds]))


def test_digits_limit():
    path = models.fetch("digits_cnn")
    assert set(models.evaluate("digits_cnn", path, limit=10)) == {"accuracy"}


def test_cli_eval_and_fetch():
    path = ROOT / "models" / "digits_cnn.onnx"
    run = subprocess.run([sys.executable, "-m", "models", "eval", "digits_cnn", str(path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert '"accuracy"' in run.stdout
    run = subprocess.run([sys.executable, "-m", "models", "fetch", "digits_cnn"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert str(path) in run.stdout and "accuracy" in run.stdout


@pytest.mark.real_model
def test_mobilenet_metric_moves(tmp_path):
    """A perturbed classifier must lose agreement: the metric is not vacuous."""
    path = _fetch("mobilenet_v2")
    m = onnx.load(str(path))
    gemm = next(n for n in m.graph.node if n.op_type == "Gemm")
    inits = {t.name: t for t in m.graph.initializer}
    w = onnx.numpy_helper.to_array(inits[gemm.input[1]])
    noisy = w + np.random.default_rng(0).normal(0, 3 * w.std(), w.shape).astype(np.float32)
    inits[gemm.input[1]].CopyFrom(onnx.numpy_helper.from_array(noisy, gemm.input[1]))
    bad = tmp_path / "bad.onnx"
    onnx.save(m, str(bad))
    metrics = models.evaluate("mobilenet_v2", bad, limit=45)
    assert metrics["top1_agreement"] < 0.9 and metrics["kl"] > 0.01


@pytest.mark.real_model
def test_mobilenet_structure():
    m = onnx.load(str(_fetch("mobilenet_v2")))
    convs = [n for n in m.graph.node if n.op_type == "Conv"]
    group = lambda n: next((a.i for a in n.attribute if a.name == "group"), 1)  # noqa: E731
    assert sum(group(n) > 1 for n in convs) == 17
    assert any(n.op_type == "BatchNormalization" for n in m.graph.node)
    assert [i.name for i in m.graph.input] == ["input"]


@pytest.mark.real_model
def test_minilm_structure():
    m = onnx.load(str(_fetch("minilm_l6")))
    assert [i.name for i in m.graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in m.graph.output] == ["embedding"]
    inits = {t.name for t in m.graph.initializer}
    assert sum(n.op_type == "MatMul" and n.input[1] in inits for n in m.graph.node) == 36
    sess = session(_fetch("minilm_l6"))
    feed = models.calibration_feeds("minilm_l6", count=1)[0]
    emb = sess.run(None, feed)[0]
    assert emb.shape == (1, 384)
    assert abs(float(np.linalg.norm(emb)) - 1.0) < 1e-4  # L2-normalised inside the graph


@pytest.mark.real_model
def test_minilm_calibration_disjoint():
    from models import minilm_l6

    assert not set(minilm_l6._calib_texts()) & set(minilm_l6._eval_set()[0])


@pytest.mark.real_model
def test_ppocr_model_as_shipped():
    from models import ppocrv4_rec

    m = onnx.load(str(_fetch("ppocrv4_rec")))
    assert len(m.graph.initializer) == 0  # weights live in Constant nodes
    assert sum(n.op_type == "Constant" for n in m.graph.node) > 100
    assert len(ppocrv4_rec.characters()) == 6625
    assert not set(ppocrv4_rec._lines(ppocrv4_rec.CALIB_SEED, 32, frozenset(ppocrv4_rec.eval_lines()))) \
        & set(ppocrv4_rec.eval_lines())


def test_wheel_dir_uses_local_wheel(tmp_path, monkeypatch):
    """A wheel already in cache_dir()/wheels is used without any download."""
    import zipfile

    from models._common import wheel_dir

    monkeypatch.setenv("ONNXCOMPRESS_CACHE", str(tmp_path))
    (tmp_path / "wheels").mkdir()
    with zipfile.ZipFile(tmp_path / "wheels" / "fake_pkg-1.0-py3-none-any.whl", "w") as zf:
        zf.writestr("fake_pkg/data/a.txt", "A")
        zf.writestr("fake_pkg/data/b.txt", "B")
        zf.writestr("fake_pkg/other.py", "")
    root = wheel_dir("fake-pkg", "1.0", ["fake_pkg/data/"])
    assert (root / "fake_pkg/data/a.txt").read_text() == "A"
    assert not (root / "fake_pkg/other.py").exists()
    assert wheel_dir("fake-pkg", "1.0", ["fake_pkg/data/"]) == root  # warm
    with pytest.raises(ModelUnavailable, match="has no fake_pkg/missing.bin"):
        wheel_dir("fake-pkg", "1.0", ["fake_pkg/missing.bin"])
