"""onnxcompress: compiler-style compression passes for ONNX models."""

from onnxcompress.api import Result, compress, load_model, pack, save_model, unpack

__all__ = ["Result", "compress", "load_model", "pack", "save_model", "unpack"]
__version__ = "0.1.0"
