"""Calibration feeds: loaded, checked against the model's inputs, or random when asked for.

A source is an ``.npz`` file, a folder of them (read in name order), or any iterable of
dicts ``{input name: array}``. In an ``.npz`` each array is keyed by input name; an array
whose rank is the input's rank is one batch, one with an extra leading axis is a stack of
batches. Each feed is checked against the model's inputs: names, dtypes, ranks and fixed
dimensions, and an error names the input, what was expected and what came.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx_ir as ir

from onnxcompress.errors import CalibrationError


@dataclasses.dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple  # ints for fixed dims, str/None for symbolic ones

    def describe(self) -> str:
        dims = ",".join(str(d) if d is not None else "?" for d in self.shape)
        return f"{self.dtype} [{dims}]"


def input_specs(model: ir.Model) -> list[InputSpec]:
    """The model's real inputs (not initializers listed as inputs)."""
    specs = []
    for value in model.graph.inputs:
        if value.is_initializer():
            continue
        dtype = value.dtype.numpy() if value.dtype is not None else np.dtype(np.float32)
        shape = tuple(
            (d if isinstance(d, int) else (d.value if d.value is not None else None))
            for d in (value.shape or [])
        ) if value.shape is not None else ()
        specs.append(InputSpec(value.name, np.dtype(dtype), shape))
    return specs


def load_calibration(source, model: ir.Model, limit: int | None = None) -> list[dict[str, np.ndarray]]:
    """Feeds from ``source``, validated against ``model``; at most ``limit`` of them."""
    specs = input_specs(model)
    feeds: list[dict[str, np.ndarray]] = []
    for origin, raw in _raw_feeds(source):
        for feed in _split(raw, specs, origin):
            _check_feed(feed, specs, origin)
            feeds.append(feed)
            if limit is not None and len(feeds) >= limit:
                return feeds
    if not feeds:
        raise CalibrationError(f"calibration data {_describe(source)} holds no samples")
    return feeds


def _describe(source) -> str:
    return f"'{source}'" if isinstance(source, (str, os.PathLike)) else f"({type(source).__name__})"


def _raw_feeds(source) -> Iterable[tuple[str, dict]]:
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            files = sorted(path.glob("*.npz"))
            if not files:
                raise CalibrationError(f"calibration folder '{path}' has no .npz files")
            for file in files:
                yield str(file), _read_npz(file)
        elif path.is_file():
            yield str(path), _read_npz(path)
        else:
            raise CalibrationError(f"calibration data '{path}': no such file or folder")
        return
    if isinstance(source, dict):
        raise CalibrationError("calibration data must be a list or iterable of dicts, not a single dict")
    try:
        iterator = iter(source)
    except TypeError:
        raise CalibrationError(
            f"calibration data of type {type(source).__name__} is not a path, a folder or an iterable of dicts"
        ) from None
    for i, item in enumerate(iterator):
        if not isinstance(item, dict):
            raise CalibrationError(f"calibration sample {i} is a {type(item).__name__}, not a dict of input arrays")
        yield f"sample {i}", {k: np.asarray(v) for k, v in item.items()}


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise CalibrationError(f"calibration file '{path}' is not a readable .npz: {exc}") from None


def _split(raw: dict, specs: list[InputSpec], origin: str) -> list[dict]:
    """One feed, or several when every array carries an extra leading (stack) axis."""
    by_name = {s.name: s for s in specs}
    missing = [s.name for s in specs if s.name not in raw]
    unknown = [k for k in raw if k not in by_name]
    if unknown:
        raise CalibrationError(
            f"{origin}: '{unknown[0]}' is not an input of the model; its inputs are {', '.join(by_name)}"
        )
    if missing:
        raise CalibrationError(f"{origin}: no data for model input '{missing[0]}' (expected {by_name[missing[0]].describe()})")
    stacked = [k for k, a in raw.items() if a.ndim == len(by_name[k].shape) + 1]
    if stacked and len(stacked) == len(raw):
        counts = {raw[k].shape[0] for k in raw}
        if len(counts) != 1:
            raise CalibrationError(f"{origin}: stacked inputs have different sample counts {sorted(counts)}")
        return [{k: raw[k][i] for k in raw} for i in range(counts.pop())]
    return [raw]


def _check_feed(feed: dict, specs: list[InputSpec], origin: str) -> None:
    for spec in specs:
        array = feed[spec.name]
        got = f"{array.dtype} {list(array.shape)}"
        if array.dtype != spec.dtype:
            raise CalibrationError(
                f"{origin}: input '{spec.name}' expects {spec.describe()}, got {got} (wrong dtype)"
            )
        if spec.shape and array.ndim != len(spec.shape):
            raise CalibrationError(
                f"{origin}: input '{spec.name}' expects {spec.describe()}, got {got} (wrong rank)"
            )
        for axis, (want, have) in enumerate(zip(spec.shape, array.shape)):
            if isinstance(want, int) and want != have:
                raise CalibrationError(
                    f"{origin}: input '{spec.name}' expects {spec.describe()}, got {got} (axis {axis} must be {want})"
                )


def random_feeds(model: ir.Model, count: int, seed: int = 0, symbolic_size: int = 1) -> list[dict[str, np.ndarray]]:
    """Random feeds shaped like the inputs; symbolic dims take ``symbolic_size``.

    Only for when the user asks for random data: the report says the drift was measured on it.
    Floats are standard normal; integers are drawn from [0, 100) (token ids, indices).
    """
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(count):
        feed = {}
        for spec in input_specs(model):
            shape = [d if isinstance(d, int) else symbolic_size for d in spec.shape]
            if spec.dtype.kind == "f":
                feed[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
            elif spec.dtype.kind in "iu":
                feed[spec.name] = rng.integers(0, 100, size=shape).astype(spec.dtype)
            elif spec.dtype.kind == "b":
                feed[spec.name] = rng.integers(0, 2, size=shape).astype(bool)
            else:
                raise CalibrationError(f"cannot make random data for input '{spec.name}' of type {spec.dtype}")
        feeds.append(feed)
    return feeds


def save_feeds(feeds: list[dict[str, np.ndarray]], folder: Path) -> Path:
    """One ``.npz`` per feed in ``folder``; loadable again with :func:`load_calibration`."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, feed in enumerate(feeds):
        np.savez(folder / f"feed_{i:04d}.npz", **feed)
    return folder
