"""quantize-dynamic: int8 weights with activations quantized at run time (DynamicQuantizeMatMul,
DynamicQuantizeLSTM), uint8 embedding tables (GatherBlockQuantized).

The selection of MatMul/Gemm weights, their refusals and the bias folding are in
:mod:`onnxcompress.weight_sites`, shared with quantize-weights-int4; the LSTM rewrite is in
:mod:`onnxcompress.recurrent_quantization`.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxcompress.conv_split import prepared
from onnxcompress.executed import exact_u8s8_grid
from onnxcompress.initializers import Names, drop_if_unused, new_initializer, take_over
from onnxcompress.options import PassOptions, option
from onnxcompress.pass_base import Candidate, CompressionPass, node_label
from onnxcompress.quantization import (
    INT7,
    INT8_NARROW,
    UINT8,
    affine_params_array,
    pack_nibbles,
    quantize,
    quantize_weight,
    quantized_reason,
)
from onnxcompress.recurrent_quantization import lstm_nodes, lstm_sizes, rewrite_lstm
from onnxcompress.registry import register
from onnxcompress.weight_sites import (
    FLOAT,
    FLOAT_BYTES,
    MS_DOMAIN,
    Outcomes,
    Refuse,
    WeightSite,
    check_selection,
    excluded,
    replace_with,
    shrink_reason,
    size_text,
    use_microsoft_domain,
    weight_sites,
)

UINT8_OFFSET = 128  # int8 code q is stored as the uint8 q + 128 with zero point 128


@dataclasses.dataclass(frozen=True)
class QuantizeDynamicOptions(PassOptions):
    """Options of quantize-dynamic."""

    per_channel: bool = option(True, "one weight scale per output column (false: one per weight)")
    storage: Literal["auto", "uint8", "int8", "int7"] = option(
        "auto", "how the int8 weight codes are stored: uint8 (code + 128, zero point 128; exact on "
                "every x86 CPU, slow kernel), int8 (no zero point; its int8 kernel can saturate on "
                "x86 CPUs without VNNI), int7 (int8 codes in [-63, 63]: exact and as fast as int8 "
                "on such a CPU, one bit coarser) or auto (int7 on an x86 CPU without VNNI, int8 "
                "elsewhere)")
    tables: bool = option(True, "also store float Gather tables (embeddings) as uint8 with a "
                                "scale and zero point per row")
    recurrent: bool = option(True, "also quantize LSTM weights for DynamicQuantizeLSTM (GRU and RNN have "
                                   "no such kernel in onnxruntime and stay float)")
    lstm_per_channel: bool = option(False, "one LSTM weight scale per gate row (false: one per direction, "
                                           "measured the more accurate in onnxruntime's kernel)")
    table_bits: int = option(8, "bits per table element: 8 (uint8, per-row scale and zero point) or 4 "
                                "(symmetric int4 in blocks of table_block along the row, packed two per byte)")
    table_block: int = option(32, "table_bits=4: elements per block of a row, each with its own scale; "
                                  "a power of two, 16 or more, dividing the row length")
    mixed: bool = option(False, "also quantize the float weights left in a model that is already partly "
                                "quantized (mixed precision per node); weights already quantized are "
                                "never touched. false: a quantized model is left alone")
    min_elements: int = option(0, "leave weights and tables with fewer elements alone")
    exclude: str = option("", "regular expression: nodes whose name matches are left alone")

    def __post_init__(self):
        if self.table_bits not in (4, 8):
            self.fail("table_bits", f"must be 8 or 4, got {self.table_bits}")
        if self.table_block < 16 or self.table_block & (self.table_block - 1):
            self.fail("table_block", f"must be a power of two, 16 or more, got {self.table_block}")
        check_selection(self)


@dataclasses.dataclass
class _Table:
    """A Gather from a constant 2-D float32 table by computed indices."""

    node: ir.Node
    table: ir.Value

    @property
    def shape(self) -> tuple[int, int]:
        rows, cols = self.table.const_value.shape
        return rows, cols


@register
class QuantizeDynamic(CompressionPass):
    """Quantize constant MatMul/Gemm weights to int8 for DynamicQuantizeMatMul, embedding tables to uint8.

    ``Y = A·W (+ b)`` with W a constant float32 K×N initializer becomes onnxruntime's
    ``com.microsoft.DynamicQuantizeMatMul(A, W_q, scale, zero_point, b)``: W symmetric on
    the int8 grid [-127, 127] (one scale ``max|w|/127`` per output column, or one per weight
    with ``per_channel=false``), A quantized at run time to uint8, affine over its own
    [min, max] widened to 0 (as DynamicQuantizeLinear does), the product accumulated in
    int32 and scaled back to float. Gemm's ``transB`` is honoured (the codes are stored K×N)
    and its ``C`` becomes the bias; the bias of a MatMul's following ``Add`` (a constant
    float32 [N] on either side, the Add alone reading the MatMul's output, which is no graph
    output) is folded in the same way. A weight read by several such nodes is quantized once.

    Storage (measured on this project's AVX2 machines, onnxruntime 1.32): onnxruntime's
    uint8×int8 kernel on x86 CPUs without VNNI sums pairs of products in int16 and saturates
    when int8 codes reach 127 (random 64×8 layers: errors of 0.5–4.6 on outputs of size ~20,
    against a quantization error of ~0.2). ``storage=int7`` stores int8 codes on the 7-bit
    grid [-63, 63] (scale = largest magnitude / 63), without a zero point: sums of two
    products stay inside int16 (255 · 63 · 2 < 32767), so that fast kernel is exact, for one
    bit of weight precision. ``storage=uint8`` keeps the full int8 grid exact there another
    way, stored as uint8 ``q + 128`` with zero point 128, but runs onnxruntime's slow
    uint8×uint8 kernel; ``storage=int8`` keeps int8 codes without a zero point (exact with
    VNNI, and on other CPUs). ``storage=auto``, the default, is int7 on an x86 CPU without
    VNNI and int8 elsewhere. minilm_l6 after ``default``, 2 threads, latency ratio to FP32:
    0.87 with uint8 storage, 0.56 with int8, 0.56 with int7; accuracy on its 970 texts 0.814
    (FP32), 0.814 (uint8), 0.810 (int7).

    Tables (``tables=true``): a Gather from a constant float32 2-D table (axis 0, computed
    indices: an embedding) becomes ``com.microsoft.GatherBlockQuantized`` with uint8 codes
    and one scale and zero point per row (affine over the row's range widened to 0; one
    block per row, block_size the power of two ≥ the row length), dequantized after the
    gather, so only the gathered rows are expanded. Chosen over Gather(codes) → Gather(scale),
    Gather(zero point) → Cast/Sub/Mul because it is one kernel and faster (measured: 1,024
    ids from a 30,522×384 table, 0.37 ms against 0.45 ms; the float Gather takes 0.17 ms).
    ``table_bits=4`` stores symmetric int4 codes in [-7, 7] instead, one scale per block of
    ``table_block`` elements along the row (the block's largest magnitude / 7), packed two per
    byte as the kernel reads them (code + 8, low nibble first, its default zero point 8):
    about 8× smaller than float32.

    LSTMs (``recurrent=true``): an LSTM with constant float32 W and R becomes
    ``com.microsoft.DynamicQuantizeLSTM``, its weights int8 symmetric with one scale per
    direction (``lstm_per_channel=true``: per gate row), stored transposed as the kernel reads
    them; the input and the hidden state are quantized to uint8 at run time, each step. Every
    other input and attribute is kept. The codes stay int8: this kernel does not saturate on
    CPUs without VNNI (uint8 storage measured bit-identical, and slower). On a two-layer
    bidirectional 256-unit encoder (``bench/lstm_dynamic.py``) both granularities ran at 0.40
    of FP32's latency, and per-direction scales were the more accurate (largest output error
    1.1 % against 1.4 % per gate row), as onnxruntime's own quantizer chooses. GRU and RNN stay
    float: onnxruntime has no such kernel for them.

    Exact limit: a weight already on the per-column grid of its storage (``w = q·s``, |q|
    reaching 127 in each column, 63 with int7) gives the output of an integer reference (A quantized as
    DynamicQuantizeLinear does, integer product, times the scales) to float rounding, and
    with A itself on a uint8 grid over its [min, max] the float product A·W to ~1e-5
    relative; a table already on its per-row uint8 grid (or, with ``table_bits=4``, on its
    per-block int4 grid) is reproduced to float rounding; LSTM weights on their per-row int8
    grid are stored as exactly those codes, and their scales give them back to float rounding.
    Folding a bias changes nothing beyond float rounding.

    Refused, with the reason: a model already quantized (nothing is touched, unless
    ``mixed=true``: then only its float weights and tables are quantized); a weight that
    is not a constant initializer (attention's activation × activation products), not
    2-D, not float32, or also read by another kind of node (or transposed by one reader and
    not by another); Gemm with ``transA=1``, ``alpha≠1``, or a ``C`` that is not a
    constant float32 [N] at ``beta=1``; fewer than ``min_elements`` elements; names
    matching ``exclude``; a rewrite that would not shrink. Tables: not float32 or not 2-D,
    a Gather axis other than 0, constant indices (constant folding's job), a table read by
    another kind of node, rows that ``table_block`` does not divide (``table_bits=4``). LSTMs:
    ``layout=1``, W or R not a constant float32 3-D initializer or also read by another node;
    GRU and RNN. Nodes inside If/Loop/Scan bodies are not visited.

    Per node (``@PATTERN{...}``): ``per_channel`` and ``storage`` of a MatMul/Gemm weight,
    ``table_bits`` and ``table_block`` of a Gather's table, ``lstm_per_channel`` of an LSTM, or ``skip=true`` to leave a MatMul, Gemm, Gather or LSTM alone (refused, naming the pattern). A
    weight read by several nodes is quantized once, with the options of its first reader in
    graph order; a reader left alone keeps the float weight, so all its readers are refused
    (tables likewise).
    """

    name = "quantize-dynamic"
    Options = QuantizeDynamicOptions
    per_node = ("per_channel", "storage", "table_bits", "table_block", "lstm_per_channel")
    prerequisites = ("lift-constants",)
    lossless = False

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if not self.options.mixed and self.left_alone_as_quantized(model):
            return ir.passes.PassResult(model, modified=False)
        names = Names(model)
        outcomes = Outcomes(model)
        matmuls = tables = 0
        for weight, sites in weight_sites(model, self.options, outcomes.refuse, self.skipped_by_plan).items():
            options = self.node_options(sites[0].node)  # a shared weight follows its first reader
            before, after = _sizes(sites[0], options)
            if reason := shrink_reason(f"the {sites[0].shape[0]}×{sites[0].shape[1]} weight", before, after):
                outcomes.add([site.node for site in sites], False, reason)
                continue
            detail = self._rewrite_weight(model, weight, sites, names, options)
            bias = {site.node: site.bias_text() for site in sites}
            outcomes.add(bias, True, lambda node: detail + bias[node])
            matmuls += len(sites)
        if self.options.tables:
            for table, gathers in self._tables(model, outcomes.refuse).items():
                options = self.node_options(gathers[0].node)
                before, after = _table_sizes(gathers[0], options)
                reason = shrink_reason(f"table '{table.name}'", before, after) or _block_reason(gathers[0], options)
                if reason:
                    outcomes.add([g.node for g in gathers], False, reason)
                    continue
                detail = self._rewrite_table(model, table, gathers, names, options)
                outcomes.add([g.node for g in gathers], True, detail)
                tables += len(gathers)
        lstms = self._quantize_lstms(model, names, outcomes) if self.options.recurrent else 0
        outcomes.report(self)
        if matmuls or tables or lstms:
            use_microsoft_domain(model)
            self.note(f"quantized {matmuls} MatMul/Gemm weights to int8 and {tables} Gather tables"
                      f"{f'; {lstms} LSTMs to DynamicQuantizeLSTM' if lstms else ''}")
        return ir.passes.PassResult(model, modified=bool(matmuls or tables or lstms))

    def _quantize_lstms(self, model: ir.Model, names: Names, outcomes: Outcomes) -> int:
        count = 0
        for node in lstm_nodes(model, self.options, outcomes.refuse, self.skipped_by_plan):
            options = self.node_options(node)
            before, after = lstm_sizes(node, options.lstm_per_channel)
            if reason := shrink_reason("the LSTM's weights", before, after):
                outcomes.refuse(node, reason)
                continue
            outcomes.add([node], True, rewrite_lstm(model, node, names, options.lstm_per_channel))
            count += 1
        return count

    def candidates(self, model: ir.Model) -> list[Candidate]:
        model = prepared(model, self.prerequisites)
        if not self.options.mixed and quantized_reason(model):
            return []
        ignore = lambda node, reason: None  # noqa: E731
        out = []
        for sites in weight_sites(model, self.options, ignore, self.skipped_by_plan).values():
            options = self.node_options(sites[0].node)
            before, after = _sizes(sites[0], options)
            if after < before:
                k, n = sites[0].shape
                grid = "int7" if stored_codes(options.storage) == "int7" else "int8"
                what = f"{grid} weight {k}×{n}: {size_text(before, after, k * n)}"
                out += [Candidate(self.name, node_label(s.node), s.node.op_type, what) for s in sites]
        if self.options.recurrent:
            for node in lstm_nodes(model, self.options, ignore, self.skipped_by_plan):
                before, after = lstm_sizes(node, self.node_options(node).lstm_per_channel)
                if after < before:
                    what = f"int8 LSTM weights: {before:,} → {after:,} bytes"
                    out.append(Candidate(self.name, node_label(node), "LSTM", what))
        if self.options.tables:
            for gathers in self._tables(model, ignore).values():
                before, after = _table_sizes(gathers[0], self.node_options(gathers[0].node))
                if after < before:
                    rows, cols = gathers[0].shape
                    what = f"uint8 table {rows}×{cols}: {size_text(before, after, rows * cols)}"
                    out += [Candidate(self.name, node_label(g.node), "Gather", what) for g in gathers]
        return out

    # ------------------------------------------------------------------------ weights

    def _rewrite_weight(self, model: ir.Model, weight: ir.Value, sites: list[WeightSite], names: Names,
                        options: QuantizeDynamicOptions) -> str:
        w = sites[0].matrix()
        k, n = w.shape
        storage = stored_codes(options.storage)
        grid_bits = "int7" if storage == "int7" else "int8"
        q, scale = quantize_weight(w, 1 if options.per_channel else None, INT7 if grid_bits == "int7" else INT8_NARROW)
        scale = np.atleast_1d(scale).astype(np.float32)
        base = weight.name or "weight"
        if storage == "uint8":
            codes = (q.astype(np.int16) + UINT8_OFFSET).astype(np.uint8)
            zero_point = np.full(scale.shape, UINT8_OFFSET, np.uint8)
            zp_value = new_initializer(model, names.unique(f"{base}_zero_point"), zero_point)
        else:
            codes, zp_value = q, None
        codes_value = new_initializer(model, names.unique(f"{base}_quantized"), np.ascontiguousarray(codes))
        scale_value = new_initializer(model, names.unique(f"{base}_scale"), scale)
        for site in sites:
            inputs = [site.node.inputs[0], codes_value, scale_value, zp_value, site.bias]
            while inputs[-1] is None:
                inputs.pop()
            new = ir.node("DynamicQuantizeMatMul", inputs, domain=MS_DOMAIN, name=site.node.name or None)
            replace_with(site, new)
        drop_if_unused(weight)
        before, after = _sizes(sites[0], options)
        grid = f"per-column ({n} scales)" if options.per_channel else "per-tensor (1 scale)"
        shared = f"; shared by {len(sites)} nodes" if len(sites) > 1 else ""
        stored = "uint8" if storage == "uint8" else "int8"
        return f"{grid_bits} {grid}, stored as {stored}, weight {k}×{n}: {size_text(before, after, k * n)}{shared}"

    # ------------------------------------------------------------------------ tables

    def _tables(self, model: ir.Model, refuse: Refuse) -> dict[ir.Value, list[_Table]]:
        groups: dict[ir.Value, list[_Table]] = {}
        for node in model.graph:
            if not (node.op_type == "Gather" and node.domain == "" and len(node.inputs) == 2):
                continue
            table = node.inputs[0]
            if table.const_value is None or not table.is_initializer():
                continue  # not a table (e.g. a Gather from a Shape)
            if reason := self._table_reason(node):
                refuse(node, reason)
            else:
                groups.setdefault(table, []).append(_Table(node, table))
        eligible = {}
        for table, gathers in groups.items():
            others = [u.node for u in table.uses() if not any(u.node is g.node and u.idx == 0 for g in gathers)]
            if table.is_graph_output() or table.is_graph_input():
                reason = f"table '{table.name}' is a graph input or output"
            elif others:
                reason = f"table '{table.name}' is also read by '{node_label(others[0])}' ({others[0].op_type})"
            else:
                eligible[table] = gathers
                continue
            for g in gathers:
                refuse(g.node, reason)
        return eligible

    def _table_reason(self, node: ir.Node) -> str:
        table, indices = node.inputs
        tensor = table.const_value
        if excluded(self.options, node):
            return f"excluded by exclude={self.options.exclude}"
        if reason := self.skipped_by_plan(node):
            return reason
        if tensor.dtype != FLOAT:
            return f"table '{table.name}' is {tensor.dtype.name}; only FLOAT (float32) tables are quantized"
        if len(tensor.shape) != 2:
            return f"table '{table.name}' is {len(tensor.shape)}-D {list(tensor.shape)}, only 2-D tables are quantized"
        if node.attributes.get_int("axis", 0) not in (0, -2):
            return f"Gather axis={node.attributes.get_int('axis', 0)}; only tables gathered along axis 0 are quantized"
        if indices.const_value is not None:
            return f"indices '{indices.name}' are constant: fold-constants computes this Gather once"
        size = tensor.shape[0] * tensor.shape[1]
        if size < self.options.min_elements:
            return f"table '{table.name}' has {size:,} elements, fewer than min_elements={self.options.min_elements:,}"
        return ""

    def _rewrite_table(self, model: ir.Model, table: ir.Value, gathers: list[_Table], names: Names,
                       options: QuantizeDynamicOptions) -> str:
        t = table.const_value.numpy()
        rows, cols = t.shape
        coded = _int4_table(t, options.table_block) if options.table_bits == 4 else _uint8_table(t)
        base = table.name or "table"
        constants = [new_initializer(model, names.unique(f"{base}_quantized"), coded.data),
                     new_initializer(model, names.unique(f"{base}_scale"), coded.scale)]
        if coded.zero_point is not None:
            constants.append(new_initializer(model, names.unique(f"{base}_zero_point"), coded.zero_point))
        attributes = {"gather_axis": 0, "quantize_axis": 1, "block_size": coded.block, "bits": coded.bits}
        for g in gathers:
            new = ir.node("GatherBlockQuantized", [constants[0], g.node.inputs[1], *constants[1:]], attributes,
                          domain=MS_DOMAIN, name=g.node.name or None)
            g.node.graph.insert_before(g.node, new)
            take_over(g.node.outputs[0], new.outputs[0])
            g.node.graph.remove(g.node, safe=True)
        drop_if_unused(table)
        before, after = _table_sizes(gathers[0], options)
        shared = f"; shared by {len(gathers)} Gathers" if len(gathers) > 1 else ""
        return f"{coded.what}, table {rows}×{cols}: {size_text(before, after, rows * cols)}{shared}"


@dataclasses.dataclass
class _CodedTable:
    """A table as GatherBlockQuantized stores it."""

    data: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray | None
    block: int
    bits: int
    what: str


def _uint8_table(t: np.ndarray) -> _CodedTable:
    rows, cols = t.shape
    scale, zero_point = affine_params_array(t.min(axis=1), t.max(axis=1), UINT8)
    codes = quantize(t, scale, zero_point, UINT8, axis=0)
    block = max(16, 1 << (cols - 1).bit_length())  # one block spans the whole row
    return _CodedTable(codes, scale.reshape(rows, 1), zero_point.reshape(rows, 1), block, 8,
                       "uint8 per-row (scale and zero point per row)")


def _int4_table(t: np.ndarray, block: int) -> _CodedTable:
    rows, cols = t.shape
    blocks = t.reshape(rows, cols // block, block).astype(np.float64)
    scale = np.abs(blocks).max(axis=2) / 7.0
    scale[scale == 0] = 1.0  # an all-zero block: any scale reproduces it
    codes = np.clip(np.rint(blocks / scale[..., None]), -7, 7).astype(np.int64).reshape(rows, cols)
    # 4-bit codes stored as the code + 8 (the kernel's default zero point), two per byte
    return _CodedTable(pack_nibbles(codes + 8), scale.astype(np.float32), None, block, 4,
                       f"int4 in blocks of {block} (a scale per block)")


def _table_sizes(gather: _Table, options: QuantizeDynamicOptions) -> tuple[int, int]:
    """Bytes of a table as float32, and as codes with their scales (and zero points)."""
    rows, cols = gather.shape
    if options.table_bits == 4:
        return FLOAT_BYTES * rows * cols, rows * ((cols + 1) // 2) + FLOAT_BYTES * rows * -(-cols // options.table_block)
    return FLOAT_BYTES * rows * cols, rows * cols + (FLOAT_BYTES + 1) * rows


def _block_reason(gather: _Table, options: QuantizeDynamicOptions) -> str:
    cols = gather.shape[1]
    if options.table_bits == 4 and cols % options.table_block:
        return f"rows of {cols} elements do not split into blocks of table_block={options.table_block}"
    return ""


def stored_codes(storage: str) -> str:
    """The storage ``auto`` stands for on this CPU (see the pass's docstring); others as given."""
    if storage != "auto":
        return storage
    return exact_u8s8_grid()


def _sizes(site: WeightSite, options: QuantizeDynamicOptions) -> tuple[int, int]:
    """Bytes of the site's weight as float32 and as int8 codes with their scales (and zero points)."""
    k, n = site.shape
    columns = n if options.per_channel else 1
    zero_points = columns if stored_codes(options.storage) == "uint8" else 0
    return FLOAT_BYTES * k * n, k * n + FLOAT_BYTES * columns + zero_points
