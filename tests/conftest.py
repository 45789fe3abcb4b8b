"""Shared fixtures: a tiny classifier model and its calibration data on disk."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from tests.tiny import tiny_classifier, tiny_feeds  # also registers the test-only passes


@pytest.fixture
def tiny_path(tmp_path):
    path = tmp_path / "tiny.onnx"
    onnx.save(tiny_classifier(), path)
    return path


@pytest.fixture
def tiny_calib(tmp_path):
    folder = tmp_path / "calib"
    folder.mkdir()
    for i, feed in enumerate(tiny_feeds()):
        np.savez(folder / f"f{i}.npz", **feed)
    return folder
