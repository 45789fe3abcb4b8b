"""Real pretrained models (and their data) for testing and benchmarking onnxcompress.

Each model lives in its own module (``models/<name>.py``) with ``build(dest)``,
``calibration_feeds(count, seed)`` and ``evaluate(path, limit)``; this package
dispatches to them and keeps the built FP32 files in a cache:

- :func:`fetch` returns the path of a model's FP32 ``.onnx`` (built on first call);
- :func:`calibration_feeds` returns real input samples, disjoint from the evaluation data;
- :func:`evaluate` runs any ONNX file of that model with onnxruntime (CPU, 2 threads)
  on the evaluation data and returns its metric(s).

Metric keys: digits_cnn, fmnist_cnn -> accuracy; mobilenet_v2 -> top1_agreement, kl
(vs the FP32 model); minilm_l6 -> accuracy, cosine (vs FP32); ppocrv4_rec -> exact, cer.
"""

from __future__ import annotations

import importlib
import os
import time
from pathlib import Path

import numpy as np

from ._common import ModelUnavailable, atomic_path, cache_dir

__all__ = [
    "MODEL_NAMES",
    "ModelUnavailable",
    "cache_dir",
    "fetch",
    "calibration_feeds",
    "evaluate",
    "model_module",
]

MODEL_NAMES = ("digits_cnn", "fmnist_cnn", "mobilenet_v2", "minilm_l6", "ppocrv4_rec")

# Bump a model's version when its build changes, so stale cache entries are not reused.
_VERSIONS = {
    "digits_cnn": 1,
    "fmnist_cnn": 1,
    "mobilenet_v2": 1,
    "minilm_l6": 1,
    "ppocrv4_rec": 1,
}


def model_module(name: str):
    """The module implementing model ``name``."""
    if name not in MODEL_NAMES:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(MODEL_NAMES)}")
    return importlib.import_module(f"{__name__}.{name}")


def cached_path(name: str) -> Path:
    """Where :func:`fetch` keeps model ``name`` (it may not exist yet)."""
    mod = model_module(name)
    committed = getattr(mod, "COMMITTED", None)
    if committed is not None and Path(committed).exists():
        return Path(committed)
    return cache_dir() / f"{name}-v{_VERSIONS[name]}.onnx"


def fetch(name: str) -> Path:
    """Path to model ``name``'s FP32 .onnx, building it into the cache on first call.

    Idempotent and atomic: the model is built into a temporary file that is renamed into
    place, so an interrupted build leaves nothing behind. Raises :class:`ModelUnavailable`
    when something it needs (a Debian package, a wheel, torch) cannot be had.
    """
    path = cached_path(name)
    if path.exists():
        return path
    mod = model_module(name)
    with atomic_path(path) as tmp:
        mod.build(tmp)
    return path


def calibration_feeds(name: str, count: int = 32, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """``count`` real input samples (batch 1 each) keyed by the model's input names.

    Drawn from data disjoint from what :func:`evaluate` uses; deterministic for a seed.
    """
    return model_module(name).calibration_feeds(count=count, seed=seed)


def evaluate(name: str, model: str | os.PathLike, limit: int | None = None) -> dict[str, float]:
    """Metric(s) of the ONNX file ``model`` (a variant of model ``name``) on its eval data.

    ``limit`` caps the number of evaluation samples (for fast tests).
    """
    if not Path(model).exists():
        raise FileNotFoundError(model)
    return model_module(name).evaluate(Path(model), limit=limit)


def fetch_and_report(name: str, limit: int | None = None) -> tuple[Path, dict[str, float], float, float]:
    """Fetch ``name`` and evaluate its FP32 model: (path, metrics, fetch_s, eval_s)."""
    t0 = time.perf_counter()
    path = fetch(name)
    t1 = time.perf_counter()
    metrics = evaluate(name, path, limit=limit)
    return path, metrics, t1 - t0, time.perf_counter() - t1
