"""What onnxruntime actually executes: the graph after its own optimizer, read back.

onnxruntime fuses DequantizeLinear → op → QuantizeLinear groups into int8 kernels
(QLinearConv, QLinearMatMul, …) only where it has one; elsewhere the op runs in float
between a DQ and a Q, which costs time and buys nothing. Asking onnxruntime to write the
graph it optimized (``optimized_model_filepath``, extended level: where the QDQ fusions
happen) and reading which kernel each node became is the only reliable way to know.
A fused node keeps the name of the op it replaced; a node onnxruntime decomposed into
other float ops disappears from the graph.
"""

from __future__ import annotations

import functools
import os
import platform
import tempfile

import onnx
import onnx_ir as ir
import onnxruntime as ort

from onnxcompress.modelio import EXTERNAL_DATA_THRESHOLD, initializer_bytes
from onnxcompress.runtime import session_options

INT8_KERNELS = frozenset({
    "QLinearConv", "QLinearMatMul", "MatMulIntegerToFloat", "QLinearAdd", "QLinearMul", "QLinearConcat",
    "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax",
    "QGemm", "ConvInteger", "MatMulInteger", "QLinearConvTranspose", "DynamicQuantizeMatMul", "MatMulNBits",
})


def executed_kernels(model: ir.Model) -> dict[str, tuple[str, str]]:
    """``{node name: (domain, op type)}`` of the graph onnxruntime runs for ``model``."""
    options = session_options()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "model.onnx")
        target = os.path.join(tmp, "optimized.onnx")
        ir.save(model, source, external_data="model.onnx.data" if _large(model) else None)
        options.optimized_model_filepath = target
        ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(target, load_external_data=False)
    return {node.name: (node.domain, node.op_type) for node in optimized.graph.node if node.name}


def int8_kernel(kernels: dict[str, tuple[str, str]], name: str) -> str | None:
    """The int8 kernel node ``name`` became, or None if it runs in float (or was decomposed)."""
    found = kernels.get(name)
    if found is None:
        return None
    return found[1] if found[1] in INT8_KERNELS else None


def float_reason(kernels: dict[str, tuple[str, str]], name: str) -> str:
    found = kernels.get(name)
    if found is None:
        return "onnxruntime decomposes it into float ops, so it would run in float between Q and DQ"
    return f"onnxruntime has no int8 kernel for it here and would run it as float {found[1]} between Q and DQ"


def exact_u8s8_grid() -> str:
    """The weight grid onnxruntime's fast u8s8 kernels run exactly on this CPU: ``int7`` where
    they saturate (:func:`saturating_u8s8`), ``int8`` elsewhere (what ``auto`` stands for)."""
    return "int7" if saturating_u8s8() else "int8"


@functools.cache
def saturating_u8s8() -> bool:
    """Whether this CPU is an x86 one without VNNI: onnxruntime's u8s8 kernels (uint8
    activations × int8 weights) then add products in pairs with int16 saturation, which
    255 · 127 · 2 exceeds; 7-bit weights (255 · 63 · 2 < 32767) stay exact."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return False
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    except OSError:
        return False
    return not {"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags)


def _large(model: ir.Model) -> bool:
    return initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD
