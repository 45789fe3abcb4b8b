"""The registry of passes by name, and of named presets (pipeline strings)."""

from __future__ import annotations

from onnxcompress.errors import PipelineError

_PASSES: dict[str, type] = {}

# Presets expand to pipeline strings. Later issues add more (int8, max-compression, ...).
PRESETS: dict[str, tuple[str, str]] = {
    "default": (
        "lift-constants,fold-constants,fold-batchnorm,cleanup,infer-shapes",
        "lossless normalisation: lift Constant weights, fold constants and BatchNorm, clean up",
    ),
    "fast": ("lift-constants,cleanup", "only lift Constant-node weights and remove dead nodes"),
    "int8": (
        "lift-constants,fold-constants,fold-batchnorm,cleanup,infer-shapes,equalize-cross-layer{relu6=calibrated},"
        "equalize-residual,quantize-qdq{calibration=mse,rounding=gptq,matmul_only=leave},quantize-dynamic",
        "int8 for onnxruntime: normalise, equalize channel ranges (weights, then residual streams), static "
        "QDQ with mse-calibrated activations and GPTQ-rounded weights (needs --calib); a model without "
        "convolutions (a transformer) gets dynamic int8 instead",
    ),
    "int8-dynamic": (
        "lift-constants,fold-constants,cleanup,quantize-dynamic",
        "int8 weights, activations quantized at run time (transformers; no calibration needed)",
    ),
}


def register(cls):
    """Class decorator: make a pass available under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    existing = _PASSES.get(cls.name)
    if existing is not None and existing is not cls:
        raise ValueError(f"pass name '{cls.name}' is taken by {existing.__name__}")
    _PASSES[cls.name] = cls
    return cls


def _load_builtin() -> None:
    import onnxcompress.passes  # noqa: F401  (each module registers its pass)


def get_pass(name: str) -> type:
    _load_builtin()
    try:
        return _PASSES[name]
    except KeyError:
        raise PipelineError(
            f"unknown pass '{name}'; run 'onnxcompress list-passes' to see the passes"
        ) from None


def pass_names() -> list[str]:
    _load_builtin()
    return sorted(_PASSES)


def all_passes() -> list[type]:
    return [_PASSES[n] for n in pass_names()]


def builtin_passes() -> list[type]:
    """The passes that ship with onnxcompress (not ones registered by user code or tests)."""
    return [c for c in all_passes() if c.__module__.startswith("onnxcompress.passes.")]
