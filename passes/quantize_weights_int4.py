"""quantize-weights-int4: blocked 4-bit weight-only quantization of MatMul/Gemm weights (MatMulNBits)."""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxcompress.activations import stream
from onnxcompress.conv_split import prepared
from onnxcompress.errors import CalibrationError
from onnxcompress.gptq import input_gram, quantize_blocks_gptq
from onnxcompress.initializers import Names, drop_if_unused, new_initializer
from onnxcompress.options import PassOptions, option
from onnxcompress.pass_base import Candidate, CompressionPass, node_label
from onnxcompress.weight_sites import (
    FLOAT_BYTES,
    MS_DOMAIN,
    Outcomes,
    WeightSite,
    check_selection,
    replace_with,
    shrink_reason,
    size_text,
    use_microsoft_domain,
    weight_sites,
)
from onnxcompress.quantization import INT4, UINT4, pack_nibbles, quantize_blocks, quantized_reason
from onnxcompress.registry import register

BITS = 4
SYMMETRIC_ZERO_POINT = 8  # MatMulNBits' implicit zero point for 4 bits: codes are q + 8


@dataclasses.dataclass(frozen=True)
class QuantizeWeightsInt4Options(PassOptions):
    """Options of quantize-weights-int4."""

    block_size: int = option(32, "weights per block along K, each block with its own scale (and zero "
                                 "point); a power of two, 16 or more")
    symmetric: bool = option(False, "int4 [-7, 7] with no zero point (false: uint4 with a zero point "
                                    "per block, packed two per byte)")
    accuracy_level: int = option(4, "MatMulNBits' accuracy_level: 4 quantizes the activations to int8 "
                                    "per block at run time (faster), 0 or 1 computes in float32; 2 and "
                                    "3 (float16, bfloat16) fall back to float32 on x86")
    mixed: bool = option(False, "also quantize the float weights left in a model that is already partly "
                                "quantized (mixed precision per node); weights already quantized are "
                                "never touched. false: a quantized model is left alone")
    method: Literal["rtn", "gptq"] = option("rtn", "round each weight to the nearest code (rtn), or GPTQ: "
                                                   "quantize K rows in order, moving each row's error onto the "
                                                   "rows left so the output on calibration data moves least "
                                                   "(needs --calib)")
    damp: float = option(0.01, "gptq: share of the mean diagonal of XᵀX added to it, in (0, 1]")
    min_elements: int = option(0, "leave weights with fewer elements alone")
    exclude: str = option("", "regular expression: nodes whose name matches are left alone")

    def __post_init__(self):
        if not 0 < self.damp <= 1:
            self.fail("damp", f"must be in (0, 1], got {self.damp}")
        size = self.block_size
        if size < 16 or size & (size - 1):
            self.fail("block_size", f"must be a power of two, 16 or more, got {size}")
        if self.accuracy_level not in range(5):
            self.fail("accuracy_level", f"must be 0, 1, 2, 3 or 4, got {self.accuracy_level}")
        check_selection(self)


@register
class QuantizeWeightsInt4(CompressionPass):
    """Quantize constant MatMul/Gemm weights to 4 bits in blocks along K, for MatMulNBits.

    ``Y = A·W (+ b)`` with W a constant float32 K×N initializer becomes onnxruntime's
    ``com.microsoft.MatMulNBits(A, B, scales, zero_points, bias)`` (``bits=4``): W is cut
    into blocks of ``block_size`` consecutive rows of each column (K padded with zeros to a
    multiple of the block size), each block affine on uint4 [0, 15] over its range widened
    to 0 (``symmetric=false``; zero points packed two per byte, ``[N·⌈blocks/2⌉]``) or
    symmetric on [-7, 7] with scale ``max|w|/7`` (``symmetric=true``; stored as ``q + 8``,
    MatMulNBits' implicit zero point). B is ``[N, blocks, block_size/2]`` uint8, two codes
    per byte, the first in the low nibble; scales ``[N·blocks]``. ``accuracy_level`` is
    passed through: 4 (default) lets onnxruntime quantize A to int8 per block at run time,
    0 keeps A in float32. Weights read by one MatMul/Gemm whose output goes only to an Add
    of a constant float32 [N] get that Add folded into MatMulNBits' bias (onnxruntime 1.32
    runs the bias on CPU), as does Gemm's ``C``; Gemm's ``transB`` is honoured.

    K smaller than the block size is accepted: the one block per column is padded, and the
    size check below refuses it when the padding makes it grow.

    Form: MatMulNBits rather than the opset-21 QDQ form (DequantizeLinear of a uint4 weight
    with ``block_size`` → MatMul), which onnxruntime 1.32 fuses into the same MatMulNBits
    when it builds the session: on minilm_l6 (blocks of 32, one thread, median per sentence
    on a shared 2-core machine) 13.0 ms for MatMulNBits against 14.3 ms for QDQ, within the
    noise (FP32: 19.4 ms); MatMulNBits needs no opset 21 and no graph optimisation.

    ``method=gptq`` (Frantar et al. 2023, :mod:`onnxcompress.gptq`) fills the same blocks
    from the calibration data: one run of the model as it is before the pass reads each
    weight's input X, and the rows of W are quantized in order, each row's rounding error
    moved onto the rows not yet quantized through (XᵀX + λI)⁻¹, so X·W moves least. It needs
    calibration data (CalibrationError otherwise) and gives round-to-nearest's codes when no
    input correlates with another.

    Exact limit: a weight already on its block grid (each block ``(q - z)·s`` with codes
    reaching 0 and 15, or ±7 when symmetric) reproduces the float MatMul to 1e-5 relative
    with ``accuracy_level=0``.

    Refused, with the reason: a model already quantized (nothing is touched, unless
    ``mixed=true``: then only its float weights are quantized); a weight
    that is not a constant initializer (attention's activation × activation products),
    not 2-D, not float32, or also read by another kind of node (or transposed by one reader
    and not by another); Gemm with ``transA=1``, ``alpha≠1``, or a ``C`` that is not a
    constant float32 [N] at ``beta=1``; fewer than ``min_elements`` elements; names
    matching ``exclude``; a weight whose quantized form would not be smaller (a small K
    padded to a whole block). Nodes inside If/Loop/Scan bodies are not visited.

    Per node (``@PATTERN{...}``): ``block_size``, ``symmetric``, ``accuracy_level`` and
    ``method``, or ``skip=true`` to leave the node alone (refused, naming the pattern). A
    weight read by several nodes is quantized once, with the options of its first reader in
    graph order (its GPTQ inputs pooled over its readers); a reader left alone keeps the float
    weight, so all its readers are refused.
    """

    name = "quantize-weights-int4"
    Options = QuantizeWeightsInt4Options
    per_node = ("block_size", "symmetric", "accuracy_level", "method")
    prerequisites = ("lift-constants",)
    lossless = False

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if not self.options.mixed and self.left_alone_as_quantized(model):
            return ir.passes.PassResult(model, modified=False)
        names = Names(model)
        outcomes = Outcomes(model)
        changed = 0
        chosen = {}
        for weight, sites in weight_sites(model, self.options, outcomes.refuse, self.skipped_by_plan).items():
            options = self.node_options(sites[0].node)  # a shared weight follows its first reader
            k, n = sites[0].shape
            before, after = FLOAT_BYTES * k * n, _size_after(k, n, options)
            if reason := shrink_reason(f"the {k}×{n} weight in blocks of {options.block_size}", before, after):
                outcomes.add([site.node for site in sites], False, reason)
                continue
            chosen[weight] = sites, options
        grams = self._input_grams(model, [sites for sites, options in chosen.values() if options.method == "gptq"])
        for weight, (sites, options) in chosen.items():
            detail = self._rewrite(model, weight, sites, names, options, grams.get(weight))
            bias = {site.node: site.bias_text() for site in sites}
            outcomes.add(bias, True, lambda node: detail + bias[node])
            changed += len(sites)
        outcomes.report(self)
        if changed:
            use_microsoft_domain(model)
            self.note(f"quantized {changed} MatMul/Gemm weights to 4 bits (MatMulNBits)")
        return ir.passes.PassResult(model, modified=bool(changed))

    def candidates(self, model: ir.Model) -> list[Candidate]:
        model = prepared(model, self.prerequisites)
        if not self.options.mixed and quantized_reason(model):
            return []
        out = []
        for sites in weight_sites(model, self.options, lambda node, reason: None, self.skipped_by_plan).values():
            options = self.node_options(sites[0].node)
            k, n = sites[0].shape
            before, after = FLOAT_BYTES * k * n, _size_after(k, n, options)
            if after < before:
                what = f"int4 weight {k}×{n}, blocks of {options.block_size}: {size_text(before, after, k * n)}"
                out += [Candidate(self.name, node_label(s.node), s.node.op_type, what) for s in sites]
        return out

    def _input_grams(self, model: ir.Model, chosen: list[list[WeightSite]]) -> dict[ir.Value, np.ndarray]:
        """XᵀX of each GPTQ weight's inputs on the calibration feeds (summed over its readers),
        read in one run of the float model before any weight changes."""
        if not chosen:
            return {}
        if not self.context.calibration:
            raise CalibrationError("quantize-weights-int4 with method=gptq needs calibration data (--calib)")
        readers: dict[str, list[WeightSite]] = {}  # input name -> the sites it feeds (Q, K, V share one)
        for sites in chosen:
            for site in sites:
                readers.setdefault(site.node.inputs[0].name, []).append(site)
        grams = {name: np.zeros((sites[0].shape[0],) * 2) for name, sites in readers.items()}
        for values in stream(model, list(readers), self.context.calibration):
            for name, gram in grams.items():
                gram += input_gram([values[name]], gram.shape[0])
        per_weight: dict[ir.Value, np.ndarray] = {}
        for name, sites in readers.items():
            for site in sites:
                per_weight[site.weight] = per_weight.get(site.weight, 0.0) + grams[name]
        return per_weight

    def _rewrite(self, model: ir.Model, weight: ir.Value, sites: list[WeightSite], names: Names,
                 options: QuantizeWeightsInt4Options, gram: np.ndarray | None) -> str:
        w = sites[0].matrix()
        k, n = w.shape
        qtype = INT4 if options.symmetric else UINT4
        if gram is not None:
            blocks = quantize_blocks_gptq(w, gram, options.block_size, qtype, options.symmetric, options.damp)
        else:
            blocks = quantize_blocks(w, options.block_size, qtype, symmetric=options.symmetric)
        if options.symmetric:
            codes = (blocks.q.astype(np.int16) + SYMMETRIC_ZERO_POINT).astype(np.uint8)
        else:
            codes = blocks.q
        base = weight.name or "weight"
        b_value = new_initializer(model, names.unique(f"{base}_int4"), pack_nibbles(codes))
        scale_value = new_initializer(model, names.unique(f"{base}_scale"), blocks.scale.reshape(-1))
        zp_value = None
        if not options.symmetric:
            packed = pack_nibbles(blocks.zero_point).reshape(-1)
            zp_value = new_initializer(model, names.unique(f"{base}_zero_point"), packed)
        attributes = {"K": k, "N": n, "bits": BITS, "block_size": options.block_size,
                      "accuracy_level": options.accuracy_level}
        for site in sites:
            inputs = [site.node.inputs[0], b_value, scale_value, zp_value, None, site.bias]
            while inputs[-1] is None:
                inputs.pop()
            new = ir.node("MatMulNBits", inputs, attributes, domain=MS_DOMAIN, name=site.node.name or None)
            replace_with(site, new)
        drop_if_unused(weight)
        before, after = FLOAT_BYTES * k * n, _size_after(k, n, options)
        grid = "int4 symmetric" if options.symmetric else "uint4 with zero points"
        grid += ", GPTQ on the calibration inputs" if gram is not None else ""
        shared = f"; shared by {len(sites)} nodes" if len(sites) > 1 else ""
        return (f"{grid}, blocks of {options.block_size} along K ({blocks.q.shape[1]} per column), "
                f"weight {k}×{n}: {size_text(before, after, k * n)}{shared}")


def _size_after(k: int, n: int, options: QuantizeWeightsInt4Options) -> int:
    """Bytes of the MatMulNBits form of a K×N weight: packed codes, scales, zero points."""
    blocks = -(-k // options.block_size)
    codes = n * blocks * options.block_size * BITS // 8
    zero_points = 0 if options.symmetric else n * -(-blocks * BITS // 8)
    return codes + FLOAT_BYTES * n * blocks + zero_points
