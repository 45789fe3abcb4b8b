"""onnxcompress: compiler-style compression passes for ONNX models."""

from onnxcompress.api import Result, compress, load_model, pack, save_model, unpack

__all__ = ["Result", "compress", "load_model", "pack", "save_model", "tune", "unpack"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "tune":  # the tuner loads on first use
        from onnxcompress.tuning import tune

        return tune
    raise AttributeError(f"module 'onnxcompress' has no attribute {name!r}")
