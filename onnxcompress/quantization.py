"""Integer grids shared by the quantization passes: types, scales, rounding, and detection.

Conventions follow onnxruntime's QuantizeLinear / DequantizeLinear:
``q = saturate(round_half_even(x / scale) + zero_point)``, ``x' = (q - zero_point) · scale``.

- Weights are symmetric (zero point 0). int8 weights use the narrow range [-127, 127], as
  onnxruntime's quantizer does, so that ``-q`` is always representable; a per-channel scale
  is ``max|w| / 127`` over every axis but the channel axis.
- Activations are affine, uint8 [0, 255] or int8 [-128, 127]; the calibrated range is
  widened to contain 0 so that 0 (padding, Relu's floor) is exactly representable.
- Biases are int32 at ``input_scale · weight_scale`` with zero point 0 (what onnxruntime's
  QLinearConv / QGemm fusion needs).

Never change a tensor in place: these functions return new arrays.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir


@dataclasses.dataclass(frozen=True)
class QType:
    """An integer type with the range a quantized value may take."""

    name: str
    numpy: type
    qmin: int
    qmax: int
    ir_type: ir.DataType

    @property
    def levels(self) -> int:
        return self.qmax - self.qmin


UINT8 = QType("uint8", np.uint8, 0, 255, ir.DataType.UINT8)
INT8 = QType("int8", np.int8, -128, 127, ir.DataType.INT8)
INT8_NARROW = QType("int8", np.int8, -127, 127, ir.DataType.INT8)  # symmetric weights
# 7-bit symmetric weights: u8·s8 products summed in pairs stay inside int16, so x86 CPUs
# without VNNI (whose u8s8 kernel adds pairs with int16 saturation) compute them exactly.
INT7 = QType("int8", np.int8, -63, 63, ir.DataType.INT8)
# uint8 weights centred on 128: onnxruntime's u8u8 kernels widen to 16 bits, no saturation.
UINT8_CENTRED = QType("uint8", np.uint8, 1, 255, ir.DataType.UINT8)
INT32 = QType("int32", np.int32, -(2**31), 2**31 - 1, ir.DataType.INT32)
INT4 = QType("int4", np.int8, -8, 7, ir.DataType.INT4)
UINT4 = QType("uint4", np.uint8, 0, 15, ir.DataType.UINT4)

ACTIVATION_TYPES = {"uint8": UINT8, "int8": INT8}
# Weight grids: (type, zero point). The symmetric scale is max|w| / (qmax - zero point).
WEIGHT_TYPES = {"int8": (INT8_NARROW, 0), "int7": (INT7, 0), "uint8": (UINT8_CENTRED, 128)}

# Ops whose presence means the model was quantized already (by us or by another tool).
QUANTIZED_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
    "ConvInteger", "MatMulInteger", "QLinearAdd", "QLinearMul", "QGemm", "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat", "MatMulNBits", "QAttention", "DynamicQuantizeLSTM", "QLinearConcat",
    "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearSigmoid", "QLinearLeakyRelu",
    "GatherBlockQuantized",
})


def quantized_reason(model: ir.Model) -> str:
    """Why ``model`` counts as already quantized ("" when it does not), naming the ops found."""
    found: dict[str, int] = {}
    for graph in model.graphs():
        for node in graph:
            if node.op_type in QUANTIZED_OPS:
                found[node.op_type] = found.get(node.op_type, 0) + 1
    if not found:
        return ""
    listed = ", ".join(f"{count} {op}" for op, count in sorted(found.items(), key=lambda kv: -kv[1]))
    return f"the model is already quantized ({listed}); quantizing it again would stack grids"


def round_half_even(x: np.ndarray) -> np.ndarray:
    """onnxruntime's rounding (numpy's ``rint`` rounds halves to even too)."""
    return np.rint(x)


def _broadcast(values: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    if axis is None or np.ndim(values) == 0:
        return np.asarray(values)
    shape = [1] * ndim
    shape[axis] = -1
    return np.asarray(values).reshape(shape)


def quantize(x: np.ndarray, scale, zero_point, qtype: QType, axis: int | None = None) -> np.ndarray:
    """``saturate(round(x / scale) + zero_point)`` as ``qtype`` (per tensor, or along ``axis``)."""
    x = np.asarray(x, dtype=np.float64)
    s = _broadcast(np.asarray(scale, dtype=np.float64), x.ndim, axis)
    z = _broadcast(np.asarray(zero_point, dtype=np.float64), x.ndim, axis)
    q = round_half_even(x / s) + z
    return np.clip(q, qtype.qmin, qtype.qmax).astype(qtype.numpy)


def dequantize(q: np.ndarray, scale, zero_point=0, axis: int | None = None) -> np.ndarray:
    """``(q - zero_point) · scale`` in float32, as DequantizeLinear computes it."""
    q = np.asarray(q)
    s = _broadcast(np.asarray(scale, dtype=np.float32), q.ndim, axis)
    z = _broadcast(np.asarray(zero_point, dtype=np.float32), q.ndim, axis)
    return ((q.astype(np.float32) - z) * s).astype(np.float32)


def symmetric_scales(w: np.ndarray, axis: int | None, qtype: QType = INT8_NARROW, zero_point: int = 0) -> np.ndarray:
    """Per-channel (``axis``) or per-tensor (``axis=None``) symmetric scales
    ``max|w| / (qmax - zero_point)``.

    A channel that is all zero gets scale 1 (any scale represents it exactly; DequantizeLinear
    needs a positive one)."""
    w = np.asarray(w, dtype=np.float64)
    if axis is None:
        peak = np.array(np.max(np.abs(w)) if w.size else 0.0)
    else:
        reduce = tuple(i for i in range(w.ndim) if i != axis)
        peak = np.max(np.abs(w), axis=reduce) if reduce else np.abs(w)
    scale = peak / (qtype.qmax - zero_point)
    return np.where(scale > 0, scale, 1.0).astype(np.float32)


def quantize_weight(w: np.ndarray, axis: int | None, qtype: QType = INT8_NARROW, zero_point: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric quantization of a weight around ``zero_point``: ``(q, scale)``."""
    scale = symmetric_scales(w, axis, qtype, zero_point)
    return quantize(w, scale, zero_point, qtype, axis), scale


def fake_quantize_weight(w: np.ndarray, axis: int | None, qtype: QType = INT8_NARROW, zero_point: int = 0) -> np.ndarray:
    """The float weight onnxruntime computes with after symmetric quantization."""
    q, scale = quantize_weight(w, axis, qtype, zero_point)
    return dequantize(q, scale, zero_point, axis)


def affine_params(lo: float, hi: float, qtype: QType) -> tuple[np.float32, int]:
    """Scale and zero point covering [lo, hi] (widened to contain 0) on ``qtype``'s grid.

    The zero point is rounded to an integer, so the covered range can shift by half a step;
    a range of width 0 (a constant-zero tensor) gets scale 1 and zero point at 0's place.
    (:func:`affine_params_array` for one range at a time.)"""
    scale, zero_point = affine_params_array(lo, hi, qtype)
    return np.float32(scale), int(zero_point)


def bias_scale(input_scale: float, weight_scale: np.ndarray) -> np.ndarray:
    """The int32 bias scale onnxruntime's fused kernels assume: input_scale · weight_scale."""
    return (np.float32(input_scale) * np.asarray(weight_scale, dtype=np.float32)).astype(np.float32)


def quantize_bias(bias: np.ndarray, input_scale: float, weight_scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(int32 bias, its scale)``, the scale shaped as ``weight_scale`` (one per channel, or one);
    raises OverflowError when a value does not fit int32."""
    scale = bias_scale(input_scale, weight_scale)
    q = round_half_even(np.asarray(bias, dtype=np.float64) / scale.astype(np.float64))
    if q.size and (q.max() > INT32.qmax or q.min() < INT32.qmin):
        raise OverflowError("bias does not fit int32 at input_scale · weight_scale")
    return q.astype(np.int32), scale


# ---------------------------------------------------------------------------- weight-only grids


def affine_params_array(lo: np.ndarray, hi: np.ndarray, qtype: QType) -> tuple[np.ndarray, np.ndarray]:
    """:func:`affine_params` element-wise: float32 scales and integer zero points (as ``qtype``)
    for ranges ``[lo, hi]``, each widened to contain 0; an empty range gets scale 1."""
    lo = np.minimum(np.asarray(lo, dtype=np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, dtype=np.float64), 0.0)
    width = hi - lo
    scale = np.where(width > 0, width / qtype.levels, 1.0)
    zero_point = np.where(width > 0, np.rint(qtype.qmin - lo / scale), 0.0)
    zero_point = np.clip(zero_point, qtype.qmin, qtype.qmax)
    return scale.astype(np.float32), zero_point.astype(qtype.numpy)


def dynamic_activation_params(x: np.ndarray) -> tuple[np.float32, np.uint8]:
    """The uint8 scale and zero point DynamicQuantizeLinear (and DynamicQuantizeMatMul) pick for
    a float tensor at run time, in float32 as onnxruntime computes them: the range is widened
    to contain 0, ``scale = (max - min) / 255`` (1 for an all-zero tensor),
    ``zero_point = saturate(round(-min / scale))``."""
    x = np.asarray(x, dtype=np.float32)
    lo = np.float32(min(float(x.min()) if x.size else 0.0, 0.0))
    hi = np.float32(max(float(x.max()) if x.size else 0.0, 0.0))
    scale = np.float32(1.0) if hi == lo else np.float32((hi - lo) / np.float32(UINT8.levels))
    zero_point = np.clip(np.float32(UINT8.qmin) - lo / scale, UINT8.qmin, UINT8.qmax)
    return scale, np.uint8(round_half_even(zero_point))


def dynamic_quantize(x: np.ndarray) -> tuple[np.ndarray, np.float32, np.uint8]:
    """``(q, scale, zero_point)`` as DynamicQuantizeLinear computes them (float32 arithmetic)."""
    scale, zero_point = dynamic_activation_params(x)
    q = round_half_even(np.asarray(x, dtype=np.float32) / scale) + np.float32(zero_point)
    return np.clip(q, UINT8.qmin, UINT8.qmax).astype(np.uint8), scale, zero_point


@dataclasses.dataclass(frozen=True)
class Blocks:
    """A K×N weight quantized in blocks of ``block_size`` along K (the reduction axis), laid out
    column by column as MatMulNBits stores it: ``q`` [N, n_blocks, block_size] (K padded with
    zeros to a multiple of the block size), ``scale`` and ``zero_point`` [N, n_blocks]."""

    q: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    rows: int  # K before padding

    @property
    def block_size(self) -> int:
        return self.q.shape[2]

    def dequantize(self) -> np.ndarray:
        """The K×N float32 weight the quantized blocks stand for."""
        w = (self.q.astype(np.float32) - self.zero_point[..., None].astype(np.float32)) * self.scale[..., None]
        return np.ascontiguousarray(w.reshape(w.shape[0], -1)[:, : self.rows].T)


def quantize_blocks(w: np.ndarray, block_size: int, qtype: QType, symmetric: bool) -> Blocks:
    """Blockwise quantization of a K×N weight along K on ``qtype``'s grid.

    Affine (``symmetric=False``): each block's range widened to contain 0, as
    :func:`affine_params`. Symmetric: scale ``max|block| / qmax`` on the narrow range
    ``[-qmax, qmax]`` (int4: [-7, 7]) and zero point 0; ``qtype`` must then be signed."""
    w = np.asarray(w, dtype=np.float64)
    k, n = w.shape
    n_blocks = -(-k // block_size)
    padded = np.zeros((n_blocks * block_size, n))
    padded[:k] = w
    blocks = padded.T.reshape(n, n_blocks, block_size)
    scale, zero_point, lo = block_grid(blocks, qtype, symmetric)
    q = round_half_even(blocks / scale[..., None].astype(np.float64)) + zero_point[..., None]
    return Blocks(np.clip(q, lo, qtype.qmax).astype(qtype.numpy), scale, zero_point, k)


def block_grid(blocks: np.ndarray, qtype: QType, symmetric: bool) -> tuple[np.ndarray, np.ndarray, int]:
    """(float32 scale, zero point, lowest code) of each block, the blocks along the last axis
    of ``blocks``: symmetric ``max|block| / qmax`` on ``[-qmax, qmax]``, or affine over the
    block's range widened to contain 0."""
    if symmetric:
        peak = np.max(np.abs(blocks), axis=-1)
        scale = np.where(peak > 0, peak / qtype.qmax, 1.0).astype(np.float32)
        return scale, np.zeros(scale.shape, dtype=qtype.numpy), -qtype.qmax
    scale, zero_point = affine_params_array(blocks.min(axis=-1), blocks.max(axis=-1), qtype)
    return scale, zero_point, qtype.qmin


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """4-bit codes (0..15) packed two per byte along the last axis, the first in the low
    nibble (MatMulNBits, GatherBlockQuantized); an odd last axis is padded with a 0 code."""
    codes = np.asarray(codes, dtype=np.uint8)
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros((*codes.shape[:-1], 1), np.uint8)], axis=-1)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
