"""The Python API: ``compress(model, pipeline, ...) -> Result``.

    import onnxcompress
    result = onnxcompress.compress("model.onnx", "default", calibration="calib/", drift="sqnr=40")
    result.save("model.opt.onnx")
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Literal, Sequence

import onnx
import onnx_ir as ir

from onnxcompress import calibration as calib
from onnxcompress.errors import ArchiveError, CalibrationError
from onnxcompress.instruments import CostTracking, DriftCheck, Instrument, Lineage, Reproducer, Timing, Verify
from onnxcompress.manager import PassManager
from onnxcompress.metrics import DriftBudget
from onnxcompress.modelio import LOAD_NOTES, load_model, model_bytes, save_model, write_atomically
from onnxcompress.archive import pack_file, unpack_file, write_archive
from onnxcompress.pipeline import Pipeline
from onnxcompress.report import Report

__all__ = ["Result", "compress", "load_model", "pack", "save_model", "unpack"]

ARCHIVE_SUFFIX = ".onnxz"


@dataclasses.dataclass
class Result:
    model: ir.Model
    report: Report

    def save(self, path, report: str | os.PathLike | None = None, external_data: str | bool | None = None) -> Path:
        """Write the model atomically (a path ending in ``.onnxz``: as an archive, see
        :func:`pack`), and the JSON report if a path is given."""
        if Path(path).suffix == ARCHIVE_SUFFIX:
            if external_data:
                raise ArchiveError("an .onnxz archive holds the weights itself; external_data does not apply")
            out = write_archive(model_bytes(self.model), path)
        else:
            out = save_model(self.model, path, external_data=external_data)
        if report is not None:
            write_atomically(Path(report), (self.report.to_json() + "\n").encode())
        return out

    def to_proto(self):
        return ir.to_proto(self.model)


def pack(model, path) -> Path:
    """Store ``model`` (a path to an ONNX file, an ``onnx.ModelProto`` or an ``onnx_ir.Model``)
    in the ``.onnxz`` archive ``path``: every weight under its smallest exact encoding
    (sparse, codebook, Huffman-coded bytes, zlib). :func:`unpack` gives the ONNX file back bit
    for bit. A path is packed as its bytes are, without loading it."""
    if isinstance(model, (str, os.PathLike)):
        return pack_file(model, path)
    if isinstance(model, onnx.ModelProto):
        return write_archive(model.SerializeToString(), path)
    if isinstance(model, ir.Model):
        return write_archive(model_bytes(model), path)
    raise ArchiveError(f"cannot pack a {type(model).__name__}: give a path, an onnx.ModelProto or an onnx_ir.Model")


def unpack(archive, path) -> Path:
    """Write the ONNX file the ``.onnxz`` archive holds to ``path``, checked bit for bit
    against the SHA-256 recorded when it was packed."""
    return unpack_file(archive, path)


def compress(
    model,
    pipeline: str | Pipeline = "default",
    *,
    calibration=None,
    random_calibration: int | None = None,
    calibration_limit: int | None = None,
    drift: str | DriftBudget | None = None,
    on_drift: Literal["rollback", "fail"] = "rollback",
    localize_drift: bool = False,
    reference=None,
    instruments: Sequence[Instrument] = (),
    reproducer_dir: str | os.PathLike | None = None,
    verify: bool = True,
) -> Result:
    """Run ``pipeline`` on ``model`` (a path, ``onnx.ModelProto`` or ``onnx_ir.Model``).

    The input is never modified. ``calibration``: an ``.npz`` file, a folder of them, or an
    iterable of ``{input name: array}`` dicts; ``random_calibration=N`` uses N random feeds
    instead (and the report says so). ``drift``: a budget such as ``"sqnr=30"`` or
    ``"top1=0.99"``; a pass over it is rolled back or fails the run, per ``on_drift``.
    ``instruments`` are added after the built-in ones (timing, cost, drift, verify,
    lineage, reproducer).
    """
    ir_model = load_model(model)
    pipe = pipeline if isinstance(pipeline, Pipeline) else Pipeline.parse(pipeline)
    budget = DriftBudget.parse(drift) if isinstance(drift, str) else drift
    feeds, note = _feeds(ir_model, calibration, random_calibration, calibration_limit)
    if budget is not None and feeds is None:
        raise CalibrationError(
            f"a drift budget ({budget}) needs calibration data: pass calibration=... (--calib) or random_calibration=N (--random-calib N)"
        )
    reference_model = load_model(reference) if reference is not None else None
    built_in: list[Instrument] = [Timing(), CostTracking()]
    built_in.append(DriftCheck(budget, on_drift, localize_drift, reference_model))
    if verify:
        built_in.append(Verify())
    built_in += [Lineage(), Reproducer(reproducer_dir, str(budget) if budget else None)]
    manager = PassManager(pipe, [*built_in, *instruments], feeds, note)
    load_notes = list(ir_model.meta.get(LOAD_NOTES, []))
    out, report = manager.run(ir_model)
    report.notes = load_notes + report.notes
    report.drift_budget = str(budget) if budget else None
    report.on_drift = on_drift if budget else None
    return Result(out, report)


def _feeds(model, calibration, random_count, limit):
    if calibration is not None and random_count:
        raise CalibrationError("give calibration data or ask for random feeds, not both")
    if random_count:
        return calib.random_feeds(model, random_count), f"{random_count} RANDOM feeds (no real data given)"
    if calibration is None:
        return None, "none (no drift measured)"
    feeds = calib.load_calibration(calibration, model, limit)
    where = f" from {calibration}" if isinstance(calibration, (str, os.PathLike)) else ""
    return feeds, f"{len(feeds)} feeds{where}"
