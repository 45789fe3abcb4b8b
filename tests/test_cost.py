"""Cost analysis: parameters, bytes and MACs checked against numbers worked out by hand."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
import onnx_ir as ir
import pytest

from onnxcompress.analysis import AnalysisManager, analysis_names
from onnxcompress.analysis.cost import ModelCost, NodeCost, compute_cost


def build(text: str, **initializers: np.ndarray) -> ir.Model:
    """An IR model from ONNX text plus numpy initializers."""
    proto = onnx.parser.parse_model(text)
    for name, array in initializers.items():
        proto.graph.initializer.append(onh.from_array(array, name))
    return ir.from_proto(proto)


def f32(*shape: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def by_op(cost: ModelCost, op_type: str) -> list[NodeCost]:
    return [n for n in cost.nodes if n.op_type == op_type]


def assert_consistent(cost: ModelCost) -> None:
    assert sum(n.params for n in cost.nodes) == cost.params
    assert sum(n.bytes for n in cost.nodes) == cost.bytes
    assert sum(n.macs for n in cost.nodes) == cost.macs


HEAD = '<ir_version: 8, opset_import: ["" : 17]>'


# ---------------------------------------------------------------------------------- convolutions


def test_conv_3x3_stride2_padded_with_bias():
    m = build(
        HEAD + """
        g (float[1, 3, 32, 32] x) => (float[1, 16, 16, 16] y) {
          y = Conv <kernel_shape=[3,3], pads=[1,1,1,1], strides=[2,2]> (x, w, b)
        }""",
        w=f32(16, 3, 3, 3),
        b=f32(16),
    )
    c = compute_cost(m)
    # 16 out channels x 16x16 outputs x (3 in channels x 3x3 kernel)
    assert c.macs == 16 * 16 * 16 * 3 * 9 == 110592
    assert c.params == 16 * 27 + 16 == 448
    assert c.bytes == 448 * 4
    assert c.unknown_shape_nodes == []
    assert c.op_histogram == {"Conv": 1}
    assert_consistent(c)


def test_grouped_conv():
    m = build(
        HEAD + """
        g (float[1, 8, 10, 10] x) => (float[1, 12, 8, 8] y) {
          y = Conv <group=2> (x, w)
        }""",
        w=f32(12, 4, 3, 3),
    )
    # N*C_out*8*8 * (C_in/group=4) * 9
    assert compute_cost(m).macs == 12 * 64 * 4 * 9 == 27648


def test_depthwise_conv():
    m = build(
        HEAD + """
        g (float[1, 8, 10, 10] x) => (float[1, 8, 10, 10] y) {
          y = Conv <group=8, pads=[1,1,1,1]> (x, w)
        }""",
        w=f32(8, 1, 3, 3),
    )
    c = compute_cost(m)
    assert c.macs == 8 * 100 * 9 == 7200
    assert c.params == 72


def test_dilated_conv():
    m = build(
        HEAD + """
        g (float[1, 2, 10, 10] x) => (float[1, 4, 6, 6] y) {
          y = Conv <dilations=[2,2]> (x, w)
        }""",
        w=f32(4, 2, 3, 3),
    )
    # effective kernel 5 -> 6x6 outputs; the kernel still has 3x3 taps
    assert compute_cost(m).macs == 4 * 36 * 2 * 9 == 2592


def test_conv_1d():
    m = build(
        HEAD + """
        g (float[2, 4, 20] x) => (float[2, 6, 16] y) {
          y = Conv (x, w)
        }""",
        w=f32(6, 4, 5),
    )
    assert compute_cost(m).macs == 2 * 6 * 16 * 4 * 5 == 3840


def test_conv_3d_strided():
    m = build(
        HEAD + """
        g (float[1, 2, 8, 8, 8] x) => (float[1, 3, 4, 4, 4] y) {
          y = Conv <strides=[2,2,2], pads=[1,1,1,1,1,1]> (x, w)
        }""",
        w=f32(3, 2, 3, 3, 3),
    )
    assert compute_cost(m).macs == 3 * 64 * 2 * 27 == 10368


def test_conv_transpose():
    m = build(
        HEAD + """
        g (float[1, 4, 5, 5] x) => (float[1, 3, 11, 11] y) {
          y = ConvTranspose <strides=[2,2]> (x, w)
        }""",
        w=f32(4, 3, 3, 3),
    )
    # every input element scatters into C_out x 3x3 outputs: N*C_in*5*5 * C_out * 9
    assert compute_cost(m).macs == 4 * 25 * 3 * 9 == 2700


def test_conv_transpose_grouped():
    m = build(
        HEAD + """
        g (float[1, 4, 5, 5] x) => (float[1, 4, 7, 7] y) {
          y = ConvTranspose <group=2> (x, w)
        }""",
        w=f32(4, 2, 3, 3),
    )
    # C_out/group = 2
    assert compute_cost(m).macs == 4 * 25 * 2 * 9 == 1800


def test_quantized_conv_and_matmul_count_like_float():
    m = build(
        HEAD + """
        g (uint8[1, 2, 5, 5] x, uint8[4, 8] a) => (uint8[1, 3, 3, 3] y, int32[4, 3] z) {
          y = QLinearConv (x, xs, xz, w, ws, wz, ys, yz)
          z = MatMulInteger (a, bm)
        }""",
        xs=np.array(0.1, np.float32),
        xz=np.array(0, np.uint8),
        w=np.ones((3, 2, 3, 3), np.uint8),
        ws=np.array(0.1, np.float32),
        wz=np.array(0, np.uint8),
        ys=np.array(0.1, np.float32),
        yz=np.array(0, np.uint8),
        bm=np.ones((8, 3), np.uint8),
    )
    c = compute_cost(m)
    assert by_op(c, "QLinearConv")[0].macs == 3 * 9 * 2 * 9 == 486
    assert by_op(c, "MatMulInteger")[0].macs == 4 * 3 * 8 == 96
    # uint8 weights: 1 byte each; 3 float scales, 3 uint8 zero points
    assert c.params == 54 + 24 + 6
    assert c.bytes == 54 + 24 + 3 * 4 + 3 * 1
    assert_consistent(c)


# ---------------------------------------------------------------------------------- Gemm / MatMul


def test_gemm_trans_b():
    m = build(
        HEAD + """
        g (float[8, 64] a) => (float[8, 32] y) {
          y = Gemm <transB=1> (a, w, b)
        }""",
        w=f32(32, 64),
        b=f32(32),
    )
    c = compute_cost(m)
    assert c.macs == 8 * 32 * 64 == 16384
    assert c.params == 32 * 64 + 32


def test_gemm_trans_a():
    m = build(
        HEAD + """
        g (float[64, 8] a) => (float[8, 32] y) {
          y = Gemm <transA=1> (a, w)
        }""",
        w=f32(64, 32),
    )
    assert compute_cost(m).macs == 8 * 32 * 64


def test_matmul_batch_broadcast_and_vectors():
    m = build(
        HEAD + """
        g (float[2, 1, 5, 6] a, float[6] v, float[4, 5, 6] c) => (float[2, 3, 5, 7] y, float[7] z, float[4, 5] t) {
          y = MatMul (a, w)
          z = MatMul (v, w2)
          t = MatMul (c, v)
        }""",
        w=f32(3, 6, 7),
        w2=f32(6, 7),
    )
    c = compute_cost(m)
    macs = [n.macs for n in by_op(c, "MatMul")]
    # batch dims (2,1) x (3,) broadcast to (2,3); 1-D operands are vectors
    assert macs == [2 * 3 * 5 * 7 * 6, 7 * 6, 4 * 5 * 6]
    assert c.macs == 1260 + 42 + 120


def test_attention_matmuls_have_macs_but_no_params():
    m = build(
        HEAD + """
        g (float[1, 4, 10, 16] q, float[1, 4, 10, 16] k, float[1, 4, 10, 16] v) => (float[1, 4, 10, 16] o) {
          kt = Transpose <perm=[0,1,3,2]> (k)
          s = MatMul (q, kt)
          p = Softmax <axis=-1> (s)
          o = MatMul (p, v)
        }""",
    )
    c = compute_cost(m)
    # QK^T: 4 heads x 10x10 scores x 16; AV: 4 heads x 10x16 outputs x 10
    assert [n.macs for n in by_op(c, "MatMul")] == [6400, 6400]
    assert c.macs == 12800
    assert c.params == 0 and c.bytes == 0
    assert by_op(c, "Softmax")[0].macs == 0 and by_op(c, "Transpose")[0].macs == 0


def test_onnx_attention_op():
    m = build(
        '<ir_version: 10, opset_import: ["" : 23]>'
        """
        g (float[1, 10, 64] q, float[1, 12, 32] k, float[1, 12, 32] v) => (float[1, 10, 64] o) {
          o = Attention <q_num_heads=4, kv_num_heads=2> (q, k, v)
        }""",
    )
    # head size 16; 4 query heads: QK^T 4*10*12*16 + AV 4*10*12*16
    assert compute_cost(m).macs == 2 * 4 * 10 * 12 * 16 == 15360


def test_einsum():
    m = build(
        HEAD + """
        g (float[2, 3, 4] a, float[2, 4, 5] b, float[2, 3, 4] c) => (float[2, 3, 5] y, float[2, 3] s) {
          y = Einsum <equation="bij,bjk->bik"> (a, b)
          s = Einsum <equation="...j->..."> (c)
        }""",
    )
    c = compute_cost(m)
    assert [n.macs for n in by_op(c, "Einsum")] == [2 * 3 * 4 * 5, 0]


def test_matmul_nbits_contrib():
    n, k, block = 32, 64, 32
    m = build(
        '<ir_version: 8, opset_import: ["" : 17, "com.microsoft" : 1]>'
        """
        g (float[2, 64] a) => (float[2, 32] y) {
          y = com.microsoft.MatMulNBits <K=64, N=32, bits=4, block_size=32> (a, b, s)
        }""",
        b=np.zeros((n, k // block, block // 2), np.uint8),
        s=np.ones(n * (k // block), np.float32),
    )
    c = compute_cost(m)
    assert c.macs == 2 * n * k == 4096
    assert c.params == n * 2 * 16 + n * 2  # packed uint8 storage elements + scales
    assert c.bytes == 1024 + 64 * 4
    assert c.unknown_shape_nodes == []


def test_shapes_flow_through_dynamic_quantize_matmul():
    """ONNX shape inference does not know the contrib op: without a standard stand-in the
    MatMul after it would have no shape and no MACs."""
    m = build(
        '<ir_version: 8, opset_import: ["" : 17, "com.microsoft" : 1]>'
        """
        g (float[N, 7, 64] a) => (float[N, 7, 7] y) {
          h = com.microsoft.DynamicQuantizeMatMul (a, b, s, z)
          t = Transpose <perm=[0, 2, 1]> (h)
          y = MatMul (h, t)
        }""",
        b=np.zeros((64, 32), np.int8),
        s=np.ones(32, np.float32),
        z=np.zeros(32, np.int8),
    )
    c = compute_cost(m, batch=2)
    assert [n.macs for n in c.nodes] == [2 * 7 * 64 * 32, 0, 2 * 7 * 7 * 32]
    assert c.unknown_shape_nodes == []


@pytest.mark.parametrize("bits, codes", [(4, np.zeros((10, 32), np.uint8)), (8, np.zeros((10, 64), np.uint8))])
def test_shapes_flow_through_gather_block_quantized(bits, codes):
    """An embedding table quantized for GatherBlockQuantized (4-bit codes packed two per byte,
    or 8-bit ones), small enough to keep its data: the MatMul after it still has its MACs."""
    m = build(
        '<ir_version: 8, opset_import: ["" : 17, "com.microsoft" : 1]>'
        f"""
        g (int64[N, 7] ids) => (float[N, 7, 16] y) {{
          e = com.microsoft.GatherBlockQuantized <gather_axis=0, quantize_axis=1, block_size=32, bits={bits}> (t, ids, s)
          y = MatMul (e, w)
        }}""",
        t=codes,
        s=np.ones((10, 2), np.float32),
        w=f32(64, 16),
    )
    c = compute_cost(m, batch=2)
    assert [n.macs for n in c.nodes] == [0, 2 * 7 * 64 * 16]
    assert c.unknown_shape_nodes == []


def test_onnxruntime_contrib_attention_and_fused_matmul():
    m = build(
        '<ir_version: 8, opset_import: ["" : 17, "com.microsoft" : 1]>'
        """
        g (float[1, 10, 64] q, float[1, 12, 64] k, float[1, 12, 64] v, float[2, 3, 4] a)
          => (float[1, 10, 64] o, float[1, 10, 64] p, float[2, 3, 5] f) {
          o = com.microsoft.MultiHeadAttention <num_heads=4> (q, k, v)
          p = com.microsoft.Attention <num_heads=4> (q, wqkv, bqkv)
          f = com.microsoft.FusedMatMul <transB=1> (a, b)
        }""",
        wqkv=f32(64, 192),
        bqkv=f32(192),
        b=f32(5, 4),
    )
    c = compute_cost(m)
    assert by_op(c, "MultiHeadAttention")[0].macs == 10 * 12 * (64 + 64)
    # QKV projection 10x64 @ 64x192, then attention over 10 positions, head dims 64 + 64
    assert by_op(c, "Attention")[0].macs == 10 * 64 * 192 + 10 * 10 * (64 + 64)
    assert by_op(c, "FusedMatMul")[0].macs == 2 * 3 * 5 * 4
    assert c.unknown_shape_nodes == []


# ---------------------------------------------------------------------------------- recurrent


def test_lstm():
    m = build(
        HEAD + """
        g (float[5, 2, 10] x) => (float[5, 1, 2, 8] y) {
          y = LSTM <hidden_size=8> (x, w, r, b)
        }""",
        w=f32(1, 32, 10),
        r=f32(1, 32, 8),
        b=f32(1, 64),
    )
    c = compute_cost(m)
    assert c.params == 320 + 256 + 64 == 640
    # seq * batch * dirs * 4 gates * hidden * (input + hidden)
    assert c.macs == 5 * 2 * 1 * 4 * 8 * (10 + 8) == 5760


def test_lstm_bidirectional_batch_first():
    m = build(
        '<ir_version: 8, opset_import: ["" : 14]>'
        """
        g (float[2, 5, 10] x) => (float[2, 5, 2, 8] y) {
          y = LSTM <hidden_size=8, direction="bidirectional", layout=1> (x, w, r)
        }""",
        w=f32(2, 32, 10),
        r=f32(2, 32, 8),
    )
    assert compute_cost(m).macs == 2 * 5760


def test_gru_and_rnn():
    m = build(
        HEAD + """
        g (float[5, 2, 10] x) => (float[5, 1, 2, 8] y, float[5, 1, 2, 8] z) {
          y = GRU <hidden_size=8> (x, w, r, b)
          z = RNN <hidden_size=8> (x, w1, r1)
        }""",
        w=f32(1, 24, 10),
        r=f32(1, 24, 8),
        b=f32(1, 48),
        w1=f32(1, 8, 10),
        r1=f32(1, 8, 8),
    )
    c = compute_cost(m)
    gru, rnn = by_op(c, "GRU")[0], by_op(c, "RNN")[0]
    assert gru.params == 240 + 192 + 48 == 480
    assert gru.macs == 5 * 2 * 3 * 8 * (10 + 8) == 4320
    assert rnn.params == 80 + 64
    assert rnn.macs == 5 * 2 * 8 * (10 + 8) == 1440


# ---------------------------------------------------------------------------------- params / bytes


def test_shared_initializer_counted_once_attributed_to_first_reader():
    m = build(
        HEAD + """
        g (float[3, 4] x) => (float[3, 4] y) {
          h = MatMul (x, w)
          y = MatMul (h, w)
        }""",
        w=f32(4, 4),
    )
    c = compute_cost(m)
    assert c.params == 16 and c.bytes == 64
    assert [(n.params, n.macs) for n in by_op(c, "MatMul")] == [(16, 48), (0, 48)]
    assert_consistent(c)


def test_constant_node_weights_count_like_initializers():
    # 2048 elements: large enough to take the weight-free path to shape inference
    w = f32(32, 64)
    text = HEAD + """
        g (float[N, 32] x) => (float[N, 64] y) {
          w = Constant <value = float[32, 64] w_data> ()
          s = Constant <value_floats=[1.0, 2.0, 3.0]> ()
          y = MatMul (x, w)
        }"""
    proto = onnx.parser.parse_model(text.replace("float[32, 64] w_data", "float[1] {0.0}"))
    const = proto.graph.node[0]
    const.attribute[0].t.CopyFrom(onh.from_array(w, "w"))
    with_constants = compute_cost(ir.from_proto(proto), batch=2)

    lifted = build(
        HEAD + """
        g (float[N, 32] x) => (float[N, 64] y) {
          y = MatMul (x, w)
        }""",
        w=w,
        s=np.array([1.0, 2.0, 3.0], np.float32),
    )
    c = compute_cost(lifted, batch=2)
    assert with_constants.params == c.params == 2048 + 3
    assert with_constants.bytes == c.bytes == (2048 + 3) * 4
    assert with_constants.macs == c.macs == 2 * 32 * 64
    # the weight is attributed to the MatMul reading it; the unread Constant keeps its own 3
    assert by_op(with_constants, "MatMul")[0].params == 2048
    assert [n.params for n in by_op(with_constants, "Constant")] == [0, 3]
    assert_consistent(with_constants)


@pytest.mark.parametrize(
    ("dtype", "shape", "expected_bytes"),
    [
        (ir.DataType.INT8, (10, 10), 100),
        (ir.DataType.FLOAT16, (10, 10), 200),
        (ir.DataType.INT4, (3, 5), 8),  # 15 nibbles -> 7.5 bytes, rounded up per tensor
        (ir.DataType.DOUBLE, (2, 3), 48),
    ],
)
def test_bytes_by_dtype(dtype, shape, expected_bytes):
    w = ir.Value(name="w", const_value=ir.tensor(np.ones(shape, dtype=dtype.numpy()), dtype=dtype))
    node = ir.node("Identity", [w])
    graph = ir.Graph([], node.outputs, nodes=[node], initializers=[w], opset_imports={"": 21})
    c = compute_cost(ir.Model(graph, ir_version=10))
    assert c.params == int(np.prod(shape))
    assert c.bytes == expected_bytes
    assert c.nodes[0].bytes == expected_bytes


def test_subgraph_params_and_macs_are_included():
    then_branch = oh.make_graph(
        [oh.make_node("MatMul", ["x", "wt"], ["yt"])],
        "then",
        [],
        [oh.make_tensor_value_info("yt", onnx.TensorProto.FLOAT, [2, 5])],
        [onh.from_array(f32(4, 5), "wt")],
    )
    else_branch = oh.make_graph(  # reads an initializer of the outer graph
        [oh.make_node("MatMul", ["x", "wo"], ["ye"])],
        "else",
        [],
        [oh.make_tensor_value_info("ye", onnx.TensorProto.FLOAT, [2, 5])],
    )
    graph = oh.make_graph(
        [oh.make_node("If", ["c"], ["y"], then_branch=then_branch, else_branch=else_branch)],
        "g",
        [
            oh.make_tensor_value_info("c", onnx.TensorProto.BOOL, []),
            oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4]),
        ],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 5])],
        [onh.from_array(f32(4, 5), "wo")],
    )
    proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    c = compute_cost(ir.from_proto(proto))
    assert c.params == 40
    assert c.op_histogram == {"If": 1, "MatMul": 2}
    # both branches, once each; each MatMul owns the weight it reads, wherever that lives
    assert [(n.params, n.macs) for n in by_op(c, "MatMul")] == [(20, 40), (20, 40)]
    assert by_op(c, "If")[0].params == 0
    assert_consistent(c)


# ---------------------------------------------------------------------------------- shapes


CONV_SYMBOLIC = HEAD + """
    g (float[N, 3, 32, 32] x) => (float[N, 16, 16, 16] y) {
      y = Conv <pads=[1,1,1,1], strides=[2,2]> (x, w)
    }"""


def test_symbolic_batch_dim():
    m = build(CONV_SYMBOLIC, w=f32(16, 3, 3, 3))
    assert compute_cost(m).macs == 110592
    assert compute_cost(m, batch=1).macs == 110592
    assert compute_cost(m, batch=4).macs == 4 * 110592
    assert compute_cost(m, input_shapes={"x": [3, 3, 32, 32]}).macs == 3 * 110592


def test_batch_flows_through_data_propagation():
    # Shape -> Gather -> Concat -> Reshape: the MatMul's shape needs the value of the batch dim
    m = build(
        HEAD + """
        g (float[N, 4, 8] x) => (float[N, 10] y) {
          s = Shape (x)
          n = Gather <axis=0> (s, zero)
          shape = Concat <axis=0> (n, minus_one)
          flat = Reshape (x, shape)
          y = MatMul (flat, w)
        }""",
        zero=np.array([0], np.int64),
        minus_one=np.array([-1], np.int64),
        w=f32(32, 10),
    )
    c = compute_cost(m, batch=3)
    assert c.macs == 3 * 32 * 10
    assert c.unknown_shape_nodes == []


POSITION_IDS = HEAD + """
    g (float[N, S, 8] x) => (float[N, S, 4] y) {
      s = Shape (x)
      len = Gather <axis=0> (s, one)
      end = Unsqueeze (len, zero)
      pos = Slice (table, zero, end, axes)
      emb = Gather (embedding, pos)
      h = Add (x, emb)
      y = MatMul (h, w)
    }"""


def position_ids_model() -> ir.Model:
    # position ids sliced by a runtime length, as exported BERTs do: ONNX's data propagation
    # loses the dims here; onnxruntime's symbolic shape inference recovers them
    return build(
        POSITION_IDS,
        one=np.array(1, np.int64),
        axes=np.array([1], np.int64),
        zero=np.array([0], np.int64),
        table=np.arange(16, dtype=np.int64).reshape(1, 16),
        embedding=f32(16, 8),
        w=f32(8, 4),
    )


def test_symbolic_inference_completes_what_onnx_inference_misses(monkeypatch):
    import onnxcompress.analysis.cost as cost

    c = compute_cost(position_ids_model(), input_shapes={"x": [1, 5, 8]})
    assert c.macs == 5 * 8 * 4 and c.unknown_shape_nodes == []

    monkeypatch.setattr(cost, "_onnxruntime_symbolic_inference", lambda proto: None)
    c = compute_cost(position_ids_model(), input_shapes={"x": [1, 5, 8]})
    assert c.macs == 0 and len(c.unknown_shape_nodes) == 1  # ONNX inference alone cannot


def test_falls_back_to_stored_shapes_when_inference_fails(monkeypatch):
    import onnxcompress.analysis.cost as cost

    def fail(*args, **kwargs):
        raise RuntimeError("inference broke")

    monkeypatch.setattr(cost.onnx.shape_inference, "infer_shapes", fail)
    monkeypatch.setattr(cost, "_onnxruntime_symbolic_inference", fail)
    m = build(CONV_SYMBOLIC, w=f32(16, 3, 3, 3))
    # the graph output's stored shape [N, 16, 16, 16] with N = batch
    assert compute_cost(m, batch=4).macs == 4 * 110592


def test_weights_in_external_data(tmp_path):
    # every tensor external, the Reshape target too: shape inference must still see its values
    m = build(
        HEAD + """
        g (float[N, 4, 8] x) => (float[N, 10] y) {
          flat = Reshape (x, shape)
          y = MatMul (flat, w)
        }""",
        shape=np.array([0, -1], np.int64),
        w=f32(32, 10),
    )
    path = tmp_path / "m.onnx"
    onnx.save_model(
        ir.to_proto(m), path, save_as_external_data=True, location="m.data", size_threshold=0
    )
    loaded = ir.load(path)
    assert isinstance(loaded.graph.initializers["w"].const_value, ir.ExternalTensor)
    c = compute_cost(loaded, batch=2)
    assert c.macs == 2 * 32 * 10
    assert c.params == 320 + 2 and c.bytes == 1280 + 16


def test_unknown_dims_are_listed_and_input_shapes_fix_them():
    m = build(
        HEAD + """
        g (float[batch, seq, 16] x, float[batch, 16, seq] k)
          => (float[batch, seq, 32] y, float[batch, seq, seq] s) {
          y = MatMul (x, w)
          s = MatMul (x, k)
          r = Relu (y)
        }""",
        w=f32(16, 32),
    )
    c = compute_cost(m, batch=2)
    assert c.macs == 0
    assert len(c.unknown_shape_nodes) == 2  # the Relu needs no shape, so it is not listed
    assert c.params == 512  # params do not depend on shapes

    # fixing x's seq fixes k's too (same symbol); batch comes from input_shapes, not `batch`
    c = compute_cost(m, batch=5, input_shapes={"x": [2, 128, 16]})
    assert c.unknown_shape_nodes == []
    assert c.macs == 2 * 128 * 16 * 32 + 2 * 128 * 128 * 16


def test_input_shapes_are_validated():
    m = build(CONV_SYMBOLIC, w=f32(16, 3, 3, 3))
    with pytest.raises(ValueError, match="'nope'"):
        compute_cost(m, input_shapes={"nope": [1]})
    with pytest.raises(ValueError, match="rank"):
        compute_cost(m, input_shapes={"x": [1, 3, 32]})
    with pytest.raises(ValueError, match="batch"):
        compute_cost(m, batch=0)


# ---------------------------------------------------------------------------------- contract


def test_model_is_not_modified():
    text = HEAD + """
        g (float[N, 8] x) => (float[N, 4] y) {
          w = Constant <value = float[8, 200] w_data> ()
          h = MatMul (x, w)
          y = Gemm <transB=1> (h, w2)
        }"""
    proto = onnx.parser.parse_model(text.replace("float[8, 200] w_data", "float[1] {0.0}"))
    proto.graph.node[0].attribute[0].t.CopyFrom(onh.from_array(f32(8, 200), "w"))
    proto.graph.initializer.append(onh.from_array(f32(4, 200), "w2"))
    m = ir.from_proto(proto)
    before = ir.to_proto(m).SerializeToString(deterministic=True)
    shapes_before = [(v.name, v.shape) for n in m.graph for v in n.outputs]
    c = compute_cost(m, batch=4, input_shapes={"x": [4, 8]})
    assert c.macs == 4 * 8 * 200 + 4 * 4 * 200
    assert ir.to_proto(m).SerializeToString(deterministic=True) == before
    assert [(v.name, v.shape) for n in m.graph for v in n.outputs] == shapes_before
    assert m.graph.inputs[0].shape[0] == ir.SymbolicDim("N")


def test_registered_and_serialisable():
    assert "cost" in analysis_names()
    m = build(CONV_SYMBOLIC, w=f32(16, 3, 3, 3))
    manager = AnalysisManager()
    c = manager.get("cost", m)
    assert isinstance(c, ModelCost) and c.macs == 110592
    assert manager.get("cost", m) is c  # cached
    d = json.loads(json.dumps(c.to_dict()))
    assert d["params"] == 432 and d["nodes"][0]["macs"] == 110592
    assert set(d) >= {"nodes", "params", "bytes", "macs", "op_histogram", "unknown_shape_nodes"}
