"""onnxcompress: compiler-style compression passes for ONNX models."""

from onnxcompress.api import Result, compress, load_model, save_model

__all__ = ["Result", "compress", "load_model", "save_model"]
__version__ = "0.1.0"
