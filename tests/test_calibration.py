"""Calibration data is checked against the model's inputs with one clear error line."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from onnxcompress.calibration import load_calibration, random_feeds, save_feeds
from onnxcompress.errors import CalibrationError
from tests.tiny import tiny_classifier, tiny_feeds


@pytest.fixture
def model():
    return ir.from_proto(tiny_classifier())


def test_folder_of_npz_in_name_order(model, tiny_calib):
    feeds = load_calibration(tiny_calib, model)
    expected = tiny_feeds()
    assert len(feeds) == len(expected)
    for got, want in zip(feeds, expected):
        np.testing.assert_array_equal(got["x"], want["x"])


def test_stacked_npz_splits_into_samples(model, tmp_path):
    np.savez(tmp_path / "s.npz", x=np.zeros((5, 3, 4), np.float32))
    feeds = load_calibration(tmp_path / "s.npz", model)
    assert len(feeds) == 5 and feeds[0]["x"].shape == (3, 4)


def test_limit_and_iterables(model):
    generator = ({"x": np.ones((1, 4), np.float32)} for _ in range(10))
    assert len(load_calibration(generator, model, limit=3)) == 3


def test_saved_feeds_load_back(model, tmp_path):
    feeds = tiny_feeds(3)
    save_feeds(feeds, tmp_path / "f")
    again = load_calibration(tmp_path / "f", model)
    for a, b in zip(feeds, again):
        np.testing.assert_array_equal(a["x"], b["x"])


@pytest.mark.parametrize(
    "feed, message",
    [
        ({"y": np.zeros((1, 4), np.float32)}, "'y' is not an input of the model; its inputs are x"),
        ({}, "no data for model input 'x' \\(expected float32 \\[N,4\\]\\)"),
        ({"x": np.zeros((1, 4), np.float64)}, "input 'x' expects float32 \\[N,4\\], got float64 \\[1, 4\\] \\(wrong dtype\\)"),
        ({"x": np.zeros((1, 2, 3, 4), np.float32)}, "wrong rank"),
        ({"x": np.zeros((1, 5), np.float32)}, "axis 1 must be 4"),
    ],
    ids=["unknown-name", "missing", "dtype", "rank", "dim"],
)
def test_mismatches_name_the_input(model, feed, message):
    with pytest.raises(CalibrationError, match=message) as info:
        load_calibration([feed], model)
    assert "\n" not in str(info.value)


def test_bad_sources(model, tmp_path):
    with pytest.raises(CalibrationError, match="no such file or folder"):
        load_calibration(tmp_path / "nope", model)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationError, match="has no .npz files"):
        load_calibration(tmp_path / "empty", model)
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(CalibrationError, match="not a readable .npz"):
        load_calibration(tmp_path / "bad.npz", model)
    with pytest.raises(CalibrationError, match="holds no samples"):
        load_calibration([], model)
    with pytest.raises(CalibrationError, match="not a dict"):
        load_calibration([np.zeros(3)], model)
    with pytest.raises(CalibrationError, match="not a single dict"):
        load_calibration({"x": np.zeros((1, 4), np.float32)}, model)


def test_random_feeds_match_inputs(model):
    feeds = random_feeds(model, 3, seed=0)
    load_calibration(feeds, model)  # valid by construction
    assert feeds[0]["x"].shape == (1, 4)
    again = random_feeds(model, 3, seed=0)
    np.testing.assert_array_equal(feeds[2]["x"], again[2]["x"])
