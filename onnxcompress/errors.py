"""Errors a user can see. Each carries a one-line message naming what is at fault."""

from __future__ import annotations


class OnnxCompressError(Exception):
    """Base of every error this package raises on purpose."""

    exit_code = 2


class ModelLoadError(OnnxCompressError):
    """The input is not a loadable, well-formed ONNX model."""


class UnsafeExternalData(ModelLoadError):
    """An external-data reference points outside the model's folder."""


class PipelineError(OnnxCompressError):
    """A pipeline string does not parse, or names an unknown pass or preset."""


class OptionError(PipelineError):
    """A pass option is unknown or has an invalid value."""


class OrderingError(PipelineError):
    """Pass prerequisites form a cycle."""


class CalibrationError(OnnxCompressError):
    """Calibration data does not match the model's inputs."""


class DriftBudgetError(OnnxCompressError):
    """A drift budget string is malformed."""


class PassFailure(OnnxCompressError):
    """A pass raised, or produced a model over the drift budget with on_drift=fail."""

    exit_code = 3

    def __init__(self, message: str, *, pass_name: str, reproducer: str | None = None):
        if reproducer:
            message = f"{message} (reproducer: {reproducer})"
        super().__init__(message)
        self.pass_name = pass_name
        self.reproducer = reproducer


class ArchiveError(OnnxCompressError):
    """An ``.onnxz`` archive cannot be written or read back exactly: not an archive, a newer
    format, truncated, corrupt, or a model the archive cannot hold."""
