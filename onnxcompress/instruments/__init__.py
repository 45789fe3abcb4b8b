"""Instruments: drift, dump, bisect, timing, verify, lineage, cost, reproducer."""

from onnxcompress.instruments.base import Instrument, RunState
from onnxcompress.instruments.bisect import Bisect
from onnxcompress.instruments.cost import CostTracking
from onnxcompress.instruments.drift import DriftCheck
from onnxcompress.instruments.dump import Dump
from onnxcompress.instruments.lineage import LINEAGE_KEY, Lineage
from onnxcompress.instruments.reproducer import Reproducer
from onnxcompress.instruments.timing import Timing
from onnxcompress.instruments.verify import Verify

__all__ = [
    "Bisect", "CostTracking", "DriftCheck", "Dump", "Instrument", "LINEAGE_KEY", "Lineage",
    "Reproducer", "RunState", "Timing", "Verify",
]
