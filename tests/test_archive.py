"""The .onnxz archive: bit-exact round trips on every kind of tensor and place a tensor can
live, the encodings pack chooses, every error with its message, and safe files."""

from __future__ import annotations

import hashlib
import json
import logging
import struct

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import models
from onnxcompress import archive as onnxz
from onnxcompress.errors import ArchiveError, ModelLoadError, OnnxCompressError

RNG = np.random.default_rng(7)
OPSET = 17


# --------------------------------------------------------------------------- model builders


def _model(tensors: list[TensorProto], nodes: list[onnx.NodeProto] = (), outputs: list[str] = (),
           **graph_fields) -> onnx.ModelProto:
    """Each initializer feeds an Identity whose output is a graph output, plus ``nodes`` whose
    float ``outputs`` are graph outputs too."""
    all_nodes = [helper.make_node("Identity", [t.name], [f"{t.name}.out"]) for t in tensors] + list(nodes)
    values = [helper.make_tensor_value_info(f"{t.name}.out", t.data_type, list(t.dims)) for t in tensors]
    values += [_float_output(name) for name in outputs]
    graph = helper.make_graph(all_nodes, "g", [], values, list(tensors), **graph_fields)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def _float_output(name: str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [None, None])


def _init(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(array, name)


def _raw(name: str, data_type: int, dims: list[int], data: bytes) -> TensorProto:
    return helper.make_tensor(name, data_type, dims, vals=data, raw=True)


def _dense(shape=(64, 96)) -> np.ndarray:
    return (RNG.standard_normal(shape) * 0.05).astype(np.float32)


def _clustered(shape=(128, 64), k=16, dtype=np.float32) -> np.ndarray:
    centroids = np.sort(RNG.standard_normal(k) * 0.05).astype(dtype)
    index = np.clip(np.round(RNG.normal((k - 1) / 2, k / 5, shape)), 0, k - 1).astype(int)
    return centroids[index]


def _sparse(shape=(128, 64), density=0.1) -> np.ndarray:
    array = _dense(shape)
    array[RNG.random(shape) >= density] = 0
    return array


def _int8(shape=(128, 64)) -> np.ndarray:
    return np.clip(np.round(RNG.laplace(0, 12, shape)), -127, 127).astype(np.int8)


def _special_floats(count=4096) -> np.ndarray:
    """NaNs with payloads (quiet and signalling, both signs), -0.0, +0.0, denormals, infinities."""
    patterns = np.array([0x7FC00001, 0xFFC12345, 0x7F800001, 0x80000000, 0x00000000, 0x00000001,
                         0x807FFFFF, 0x7F800000, 0xFF800000], dtype=np.uint32)
    return patterns[RNG.integers(0, patterns.size, count)].view(np.float32)


def _serialized(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString()


def _header(archive: bytes) -> dict:
    _, _, size = struct.unpack_from("<6sHI", archive)
    return json.loads(archive[12 : 12 + size])


def _split(archive: bytes) -> tuple[dict, bytes]:
    _, _, size = struct.unpack_from("<6sHI", archive)
    return json.loads(archive[12 : 12 + size]), archive[12 + size :]


def _join(header: dict, blobs: bytes, version: int = 1) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<6sHI", b"ONNXZ\0", version, len(text)) + text + blobs


def _encodings(archive: bytes) -> dict[str, str]:
    return {entry["name"]: entry["encoding"] for entry in _header(archive)["tensors"]}


def _round_trip(data: bytes) -> bytes:
    archive = onnxz.pack_bytes(data)
    assert onnxz.unpack_bytes(archive) == data
    return archive


# --------------------------------------------------------------------------- round trips


def _zoo() -> dict[str, onnx.ModelProto]:
    special = _special_floats()
    then_graph = helper.make_graph(
        [helper.make_node("Constant", [], ["then_c"], value=_init("", _clustered((40, 40)))),
         helper.make_node("Add", ["then_c", "then_w"], ["then_out"])],
        "then", [], [_float_output("then_out")], [_init("then_w", _dense((40, 40)))])
    else_graph = helper.make_graph(
        [helper.make_node("Constant", [], ["else_out"], value=_init("", _sparse((40, 40))))],
        "else", [], [_float_output("else_out")])
    cond = _init("cond", np.array(True))
    if_node = helper.make_node("If", ["cond"], ["if_out"], then_branch=then_graph, else_branch=else_graph)
    float_data = helper.make_tensor("typed", TensorProto.FLOAT, [600], _dense((600,)).tolist())
    bf16 = _raw("bf16", TensorProto.BFLOAT16, [2048], (_clustered((2048,)).view(np.uint32) >> 16).astype("<u2").tobytes())
    int4 = _raw("int4", TensorProto.INT4, [4096], RNG.integers(0, 256, 2048, dtype=np.uint8).tobytes())
    return {
        "dense": _model([_init("w", _dense())]),
        "clustered": _model([_init("w", _clustered())]),
        "int8": _model([_init("w", _int8())]),
        "sparse": _model([_init("w", _sparse())]),
        "float16": _model([_init("w", _dense().astype(np.float16)), _init("c", _clustered(dtype=np.float16))]),
        "float64": _model([_init("w", _clustered(dtype=np.float64)), _init("d", _dense().astype(np.float64))]),
        "special-floats": _model([_init("w", special), _init("s", np.where(RNG.random(4096) < 0.8, 0, special))]),
        "constant-node": _model([], [helper.make_node("Constant", [], ["c"], value=_init("", _clustered()))], ["c"]),
        "if-subgraphs": _model([cond], [if_node], ["if_out"]),
        "float-data": _model([float_data, _init("w", _dense())]),
        "bfloat16-int4": _model([bf16, int4]),
        "small-tensors": _model([_init("shape", np.array([1, 64], np.int64)), _init("b", _dense((16,)))]),
        "empty-tensor": _model([_init("e", np.zeros((0, 5), np.float32)), _init("w", _dense())]),
        "all-zero": _model([_init("z", np.zeros((100, 100), np.float32))]),
        "no-tensors": _model([], [helper.make_node("Constant", [], ["c"], value_float=1.0)], ["c"]),
    }


@pytest.mark.parametrize("case", sorted(_zoo()))
def test_unpack_of_pack_is_the_same_bytes(case):
    data = _serialized(_zoo()[case])
    archive = _round_trip(data)
    assert _header(archive)["encoding"] == "tensors"


@pytest.mark.parametrize("case", sorted(_zoo()))
def test_bytes_written_into_the_wire_format_are_what_protobuf_serializes(case):
    from onnxcompress import wire

    model = _zoo()[case]
    sites = [site for site in onnxz._walk_model(model) if site.tensor.HasField("raw_data")]
    payloads = {site.locator: bytes(site.tensor.raw_data) + b"\x07" * (i * 61) for i, site in enumerate(sites)}
    for site in sites:
        site.tensor.raw_data = b""
    emptied = model.SerializeToString()
    for site in sites:
        site.tensor.raw_data = payloads[site.locator]
    assert wire.fill_raw_data(emptied, payloads) == model.SerializeToString()


def test_wire_refuses_a_tensor_that_was_not_emptied():
    from onnxcompress import wire

    data = _serialized(_model([_init("w", _dense())]))
    with pytest.raises(wire.WireError, match="graph.initializer\\[0\\] was not emptied"):
        wire.fill_raw_data(data, {"graph.initializer[0]": b"x"})
    with pytest.raises(wire.WireError, match="no emptied tensor at graph.initializer\\[5\\]"):
        wire.fill_raw_data(data, {"graph.initializer[5]": b"x"})


def test_archive_is_deterministic():
    data = _serialized(_zoo()["if-subgraphs"])
    assert onnxz.pack_bytes(data) == onnxz.pack_bytes(data)


def test_every_walked_place_is_taken_out():
    sparse_values = _init("sv", _dense((600,)))
    sparse_indices = _init("si", np.sort(RNG.choice(100_000, 600, replace=False)).astype(np.int64))
    sparse = helper.make_sparse_tensor(sparse_values, sparse_indices, [100_000])
    function = helper.make_function(
        "local", "F", [], ["y"], [helper.make_node("Constant", [], ["y"], value=_init("", _dense((30, 30))))],
        [helper.make_opsetid("", OPSET)])
    model = _model([_init("w", _dense())], [helper.make_node("F", [], ["f_out"], domain="local")], ["f_out"],
                   sparse_initializer=[sparse])
    model.functions.append(function)
    model.opset_import.append(helper.make_opsetid("local", 1))
    zoo_if = _zoo()["if-subgraphs"]
    locators = {e["locator"]: e["name"] for e in _header(_round_trip(_serialized(model)))["tensors"]}
    assert locators == {
        "graph.initializer[0]": "w",
        "graph.sparse_initializer[0].values": "sv",
        "graph.sparse_initializer[0].indices": "sv.indices",
        "functions[0].node[0].value": "y",
    }
    locators = {e["locator"]: e["name"] for e in _header(_round_trip(_serialized(zoo_if)))["tensors"]}
    assert locators == {
        "graph.node[1].then_branch.initializer[0]": "then_w",
        "graph.node[1].then_branch.node[0].value": "then_c",
        "graph.node[1].else_branch.node[0].value": "else_out",
    }


def test_small_and_typed_tensors_stay_in_the_graph():
    archive = _round_trip(_serialized(_zoo()["float-data"]))
    assert list(_encodings(archive)) == ["w"]  # 'typed' is in float_data
    archive = _round_trip(_serialized(_zoo()["small-tensors"]))
    assert _header(archive)["tensors"] == []


# --------------------------------------------------------------------------- chosen encodings


def _report(model: onnx.ModelProto) -> dict[str, onnxz.TensorStorage]:
    return {entry.name: entry for entry in onnxz.storage_report(_serialized(model))}


def _low_bit_int8(shape=(256, 256)) -> np.ndarray:
    """Ternary weights stored as int8, as low-bit quantization leaves them."""
    return RNG.choice(np.array([-1, 0, 1], np.int8), shape, p=[0.25, 0.5, 0.25])


def test_each_kind_of_weight_gets_its_encoding_smaller_than_zlib():
    model = _model([_init("clustered", _clustered((256, 256))), _init("sparse", _sparse((256, 256))),
                    _init("int8", _low_bit_int8()), _init("dense", _dense((256, 256)))])
    archive = _round_trip(_serialized(model))
    assert _encodings(archive) == {"clustered": "codebook", "sparse": "sparse", "int8": "bytes-huffman",
                                   "dense": "zlib"}
    report = _report(model)
    for name in ("clustered", "sparse", "int8"):
        assert report[name].chosen_bytes < 0.9 * report[name].size("zlib"), name
    assert report["clustered"].chosen_bytes < 0.15 * report["clustered"].raw_bytes  # ~4 bits of 32
    assert report["sparse"].chosen_bytes < 0.35 * report["sparse"].raw_bytes
    assert report["int8"].chosen_bytes < 0.2 * report["int8"].raw_bytes  # 1.5 bits of 8


def test_int8_weights_cost_their_entropy():
    """Laplace-distributed int8 weights: bytes-huffman and zlib (deflate is a Huffman coder too)
    come within 2.5% of each other and of the entropy (Huffman's block-length table, which
    buys its fast decoding, is ~2% of 6-bit codes); pack takes the smaller."""
    array = _int8((512, 512))
    report = _report(_model([_init("w", array)]))["w"]
    p = np.bincount(array.view(np.uint8).ravel(), minlength=256) / array.size
    entropy = -(p[p > 0] * np.log2(p[p > 0])).sum() * array.size / 8
    assert entropy < report.size("bytes-huffman") < 1.025 * entropy
    assert abs(report.size("bytes-huffman") / report.size("zlib") - 1) < 0.025
    assert report.chosen_bytes == min(report.size("bytes-huffman"), report.size("zlib"))


def test_report_agrees_with_the_archive():
    model = _zoo()["if-subgraphs"]
    data = _serialized(model)
    entries = {e["name"]: e for e in _header(onnxz.pack_bytes(data))["tensors"]}
    report = _report(model)
    for name, entry in entries.items():
        storage = report[name]
        assert storage.chosen == entry["encoding"]
        assert storage.chosen_bytes == entry["length"]
        assert storage.raw_bytes == entry["size"]
    assert report["cond"].chosen == "inline"


def test_storage_report_fields():
    report = _report(_model([_init("c", _clustered((128, 64), k=16))]))["c"]
    assert isinstance(report, onnxz.TensorStorage)
    assert (report.dtype, report.elements, report.raw_bytes, report.locator) == ("float32", 8192, 32768, "graph.initializer[0]")
    names = [e.encoding for e in report.encodings]
    assert names[0] == "stored" and "codebook" in names and "zlib" in names
    for entry in report.encodings:
        assert entry.bits_per_element == pytest.approx(8 * entry.bytes / 8192)
    assert report.size("stored") == 32768
    assert report.chosen == "codebook" and report.chosen_bytes == min(e.bytes for e in report.encodings)
    with pytest.raises(KeyError):
        report.size("bytes-huffman")
    with pytest.raises(Exception):
        report.chosen = "stored"  # frozen


def test_codebook_keeps_nan_payloads_and_signed_zeros():
    special = _special_floats()
    archive = _round_trip(_serialized(_model([_init("w", special)])))
    assert _encodings(archive) == {"w": "codebook"}
    entry = _header(archive)["tensors"][0]
    assert entry["params"]["values"] == 9


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_codebook_for_other_float_widths(dtype):
    archive = _round_trip(_serialized(_model([_init("w", _clustered((128, 64), dtype=dtype))])))
    assert _encodings(archive) == {"w": "codebook"}


def test_codebook_with_values_the_sample_misses():
    array = _clustered((300, 300), k=8)
    flat = array.reshape(-1)
    flat[RNG.choice(flat.size, 200, replace=False)] = np.arange(200, dtype=np.float32) + 10  # rare values
    archive = _round_trip(_serialized(_model([_init("w", array)])))
    assert _encodings(archive) == {"w": "codebook"}
    assert _header(archive)["tensors"][0]["params"]["values"] == 208


def test_no_codebook_over_256_values():
    array = _clustered((300, 300), k=8)
    array.reshape(-1)[:248] = np.arange(248, dtype=np.float32) + 10  # 8 + 248 = 256 values
    assert "codebook" in [e.encoding for e in _report(_model([_init("w", array)]))["w"].encodings]
    array.reshape(-1)[:249] = np.arange(249, dtype=np.float32) + 10
    assert "codebook" not in [e.encoding for e in _report(_model([_init("w", array)]))["w"].encodings]


@pytest.mark.parametrize(
    "positions, size",
    [
        ([0, 1, 2, 1000, 1256, 1257, 1513, 99_000], 100_000),  # gaps of 255, 256, 0, long runs
        ([99_999], 100_000),  # one nonzero at the end: fillers all the way
        ([0], 100_000),  # trailing zeros only
        (list(range(0, 100_000, 256)), 100_000),  # gaps of exactly 255
        (list(range(0, 100_000, 257)), 100_000),  # gaps of 256: a filler each
    ],
)
def test_sparse_gaps_and_fillers(positions, size):
    array = np.zeros(size, np.float32)
    array[positions] = RNG.standard_normal(len(positions)).astype(np.float32) + 3
    archive = _round_trip(_serialized(_model([_init("w", array)])))
    assert _encodings(archive) == {"w": "sparse"}
    params = _header(archive)["tensors"][0]["params"]
    gaps = np.diff(np.array(positions), prepend=-1) - 1
    assert params["entries"] == len(positions) + int((gaps // 256).sum())


def test_sparse_keeps_negative_zero_as_a_value():
    array = np.zeros(10_000, np.float32)
    array[::50] = -0.0
    array[7::50] = 1.5
    data = _serialized(_model([_init("w", array)]))
    archive = _round_trip(data)
    assert _encodings(archive)["w"] == "sparse"
    assert _header(archive)["tensors"][0]["params"]["entries"] == 400


def test_all_zero_tensor_is_a_few_bytes():
    archive = _round_trip(_serialized(_zoo()["all-zero"]))
    entry = _header(archive)["tensors"][0]
    assert entry["encoding"] == "sparse" and entry["length"] < 40


def test_incompressible_bytes_are_stored():
    data = _serialized(_model([_init("w", RNG.integers(-2**31, 2**31, 5000, dtype=np.int64).astype(np.int32))]))
    assert _encodings(_round_trip(data)) == {"w": "stored"}


def test_random_floats_compress_their_exponent_plane():
    array = _dense((512, 512))
    archive = _round_trip(_serialized(_model([_init("w", array)])))
    entry = _header(archive)["tensors"][0]
    assert entry["encoding"] == "zlib"
    assert [codec for codec, _ in entry["params"]["parts"]] == ["stored", "stored", "stored", "zlib"]
    assert entry["length"] < 0.88 * array.nbytes


# --------------------------------------------------------------------------- whole-file fallback


def test_a_file_protobuf_would_rewrite_is_packed_whole(caplog):
    data = _serialized(_model([_init("w", _clustered())]))
    data += bytes([0x08, 0x07])  # ir_version again: valid protobuf, re-serialized differently
    with caplog.at_level(logging.WARNING, logger="onnxcompress.archive"):
        archive = _round_trip(data)
    header = _header(archive)
    assert header["encoding"] == "whole-file" and header["tensors"] == []
    assert "whole file" in caplog.text


# --------------------------------------------------------------------------- pack's own check


def test_pack_decodes_each_tensor_once_and_the_archive_check_reuses_it(monkeypatch):
    data = _serialized(_model([_init("c", _clustered()), _init("d", _dense()), _init("z", _sparse())]))
    in_workers, in_unpack = [], []
    real_decode, real_entry = onnxz.tensor_codecs.decode, onnxz._decode_entry
    monkeypatch.setattr(onnxz.tensor_codecs, "decode", lambda *a: in_workers.append(a[0]) or real_decode(*a))
    monkeypatch.setattr(onnxz, "_decode_entry", lambda entry, *a: in_unpack.append(entry["name"]) or real_entry(entry, *a))
    archive = onnxz.pack_bytes(data)
    assert {"codebook", "sparse", "zlib"} <= set(in_workers) and in_unpack == []
    assert onnxz.unpack_bytes(archive) == data and sorted(in_unpack) == ["c", "d", "z"]


def test_an_encoding_that_does_not_decode_to_its_tensor_is_stored_instead(monkeypatch, caplog):
    data = _serialized(_model([_init("c", _clustered()), _init("d", _dense())]))
    real_encode = onnxz.tensor_codecs.encode

    def broken_codebook(raw, kind, planes, known=()):
        found = real_encode(raw, kind, planes, known)
        if found.encoding != "codebook":
            return found
        blob = bytearray(found.blob)
        blob[0] ^= 1  # the first codebook value: still decodes, to other bytes
        return onnxz.tensor_codecs.Encoded(found.encoding, found.params, bytes(blob))

    monkeypatch.setattr(onnxz.tensor_codecs, "encode", broken_codebook)
    with caplog.at_level(logging.WARNING, logger="onnxcompress.archive"):
        archive = onnxz.pack_bytes(data)
    assert _encodings(archive) == {"c": "stored", "d": "zlib"}
    assert caplog.text.count("stored as it is") == 1 and "tensor 'c'" in caplog.text
    assert "decodes to other bytes" in caplog.text
    assert onnxz.unpack_bytes(archive) == data


def test_the_archive_check_still_catches_a_header_that_does_not_match_the_checked_tensors(monkeypatch, caplog):
    data = _serialized(_model([_init("c", _clustered()), _init("d", _dense())]))
    real_assemble = onnxz._assemble

    def wrong_offsets(header, blobs):  # the blobs of c and d swapped in the header
        if header["encoding"] == "tensors":
            first, second = header["tensors"]
            for key in ("offset", "length"):
                first[key], second[key] = second[key], first[key]
        return real_assemble(header, blobs)

    monkeypatch.setattr(onnxz, "_assemble", wrong_offsets)
    with caplog.at_level(logging.WARNING, logger="onnxcompress.archive"):
        archive = onnxz.pack_bytes(data)
    assert _header(archive)["encoding"] == "whole-file"
    assert "whole file under zlib: tensor 'c' (graph.initializer[0]): codebook blob does not decode" in caplog.text
    assert onnxz.unpack_bytes(archive) == data


# --------------------------------------------------------------------------- errors


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert message and "\n" not in message
    assert isinstance(exc.value, OnnxCompressError)
    return message


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty input"),
        (b"\xff\xff\xff\xff garbage", "not a valid ONNX model"),
        (b"hello, this is text and not a model", "not a valid ONNX model"),
        (helper.make_model(helper.make_graph([], "g", [], [])).SerializeToString(), "no graph"),
    ],
)
def test_packing_what_is_not_a_model(data, message):
    with pytest.raises(ModelLoadError) as exc:
        onnxz.pack_bytes(data)
    assert message in _one_line(exc)


def test_packing_an_archive_again():
    archive = onnxz.pack_bytes(_serialized(_zoo()["dense"]))
    with pytest.raises(ModelLoadError, match="already an .onnxz archive"):
        onnxz.pack_bytes(archive)


def test_external_data_is_refused():
    model = _model([_init("big", _dense())])
    tensor = model.graph.initializer[0]
    onnx.external_data_helper.set_external_data(tensor, "weights.bin", offset=0, length=len(tensor.raw_data))
    tensor.ClearField("raw_data")
    for call in (onnxz.pack_bytes, onnxz.storage_report):
        with pytest.raises(ArchiveError) as exc:
            call(_serialized(model))
        assert _one_line(exc) == ("tensor 'big' (graph.initializer[0]) uses external data; "
                                  "pack the model with its weights inline")


@pytest.fixture(scope="module")
def archive() -> bytes:
    model = _model([_init("c", _clustered((64, 64))), _init("s", RNG.integers(-2**31, 2**31, 2000).astype(np.int32)),
                    _init("d", _dense((64, 64))), _init("z", _sparse((64, 64))), _init("q", _low_bit_int8((64, 64)))])
    archive = onnxz.pack_bytes(_serialized(model))
    assert _encodings(archive) == {"c": "codebook", "s": "stored", "d": "zlib", "z": "sparse", "q": "bytes-huffman"}
    return archive


def _tamper(archive: bytes, change) -> bytes:
    header, blobs = _split(archive)
    change(header)
    return _join(header, blobs)


def _entry(header: dict, name: str) -> dict:
    return next(e for e in header["tensors"] if e["name"] == name)


def _flip(archive: bytes, name: str, at: int) -> bytes:
    header, blobs = _split(archive)
    entry = _entry(header, name)
    blobs = bytearray(blobs)
    blobs[entry["offset"] + (at if at >= 0 else entry["length"] + at)] ^= 0xFF
    return _join(header, bytes(blobs))


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda a: b"ONNXY\0" + a[6:], "not an .onnxz archive (bad magic)"),
        (lambda a: b"PK\x03\x04", "not an .onnxz archive (bad magic)"),
        (lambda a: a[:9], "truncated archive"),
        (lambda a: a[:40], "truncated archive: the header needs"),
        (lambda a: a[:-1], "truncated archive: "),
        (lambda a: a + b"\0", "1 bytes after its last blob"),
        (lambda a: a[:6] + struct.pack("<H", 2) + a[8:], "archive format version 2 is newer than this onnxcompress reads (1)"),
        (lambda a: a[:6] + struct.pack("<H", 0) + a[8:], "unknown archive format version 0"),
        (lambda a: a[:12] + b"x" + a[13:], "archive header is not valid JSON"),
        (lambda a: _tamper(a, lambda h: h.pop("original")), "archive header malformed: header has no valid 'original'"),
        (lambda a: _tamper(a, lambda h: h.update(encoding="zstd")), "unknown encoding 'zstd'"),
        (lambda a: _tamper(a, lambda h: _entry(h, "s").update(offset=h["blobs"])), "tensor 's': blob at offset"),
        (lambda a: _tamper(a, lambda h: _entry(h, "s").update(offset=-1)), "has no valid 'offset'"),
        (lambda a: _tamper(a, lambda h: h["graph"].update(length=h["blobs"] + 1)), "graph: blob at offset 0"),
        (lambda a: _tamper(a, lambda h: h["graph"].update(codec="brotli")), "graph blob does not decode (brotli)"),
        (lambda a: _tamper(a, lambda h: _entry(h, "c").update(locator="graph.initializer[9]")), "is not in the archived graph"),
        (lambda a: _tamper(a, lambda h: _entry(h, "c").update(encoding="lz4")), "unknown encoding 'lz4'"),
        (lambda a: _tamper(a, lambda h: _entry(h, "c")["params"].update(values=300)), "codebook blob does not decode"),
        (lambda a: _tamper(a, lambda h: _entry(h, "s").update(size=100)), "stored blob decodes to 8000 bytes, the header says 100"),
        (lambda a: _tamper(a, lambda h: _entry(h, "d")["params"]["parts"].pop()), "zlib blob does not decode"),
        (lambda a: _tamper(a, lambda h: _entry(h, "d")["params"]["parts"][0].__setitem__(0, "lzma")), "zlib blob does not decode"),
        (lambda a: _tamper(a, lambda h: _entry(h, "c").update(size=10**15)), "more than the whole model's"),
        (lambda a: _tamper(a, lambda h: _entry(h, "c").update(params=[])), "has no valid 'params'"),
        (lambda a: _flip(a, "c", 200), "codebook blob does not decode"),
        (lambda a: _flip(a, "d", -10), "zlib blob does not decode"),  # in the exponent plane's stream
        (lambda a: _flip(a, "s", 100), "does not match the SHA-256"),
        (lambda a: _tamper(a, lambda h: h["original"].update(sha256="0" * 64)), "does not match the SHA-256"),
    ],
)
def test_every_bad_archive_is_an_archive_error(archive, corrupt, message):
    with pytest.raises(ArchiveError) as exc:
        onnxz.unpack_bytes(corrupt(archive))
    assert message in _one_line(exc)


def test_every_truncation_of_an_archive_is_an_error(archive):
    for cut in list(range(0, 200)) + list(range(200, len(archive), 97)):
        with pytest.raises(ArchiveError):
            onnxz.unpack_bytes(archive[:cut])


def test_every_flipped_blob_byte_is_an_error_or_exact(archive):
    header, blobs = _split(archive)
    original = onnxz.unpack_bytes(archive)
    for at in range(0, len(blobs), max(1, len(blobs) // 500)):
        bad = bytearray(blobs)
        bad[at] ^= 0x10
        try:
            result = onnxz.unpack_bytes(_join(header, bytes(bad)))
        except ArchiveError:
            continue
        assert result == original  # never a wrong model


def _paths(value, path=()):
    """Every (path, leaf) in a JSON value."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, path + (key,))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _paths(item, path + (i,))
    else:
        yield path, value


@pytest.mark.parametrize("replacement", [None, -1, 0, 1, 10**12, "x", [], {}, True, 1.5])
def test_every_header_field_replaced_is_an_error_or_exact(archive, replacement):
    header, blobs = _split(archive)
    original = onnxz.unpack_bytes(archive)
    for path, _ in _paths(header):
        changed = json.loads(json.dumps(header))
        target = changed
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = replacement
        try:
            result = onnxz.unpack_bytes(_join(changed, blobs))
        except ArchiveError as exc:
            assert "\n" not in str(exc)
            continue
        assert result == original, path


# --------------------------------------------------------------------------- files


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _leftovers(folder) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_pack_and_unpack_files(tmp_path):
    src = tmp_path / "model.onnx"
    src.write_bytes(_serialized(_zoo()["if-subgraphs"]))
    before, mtime = _digest(src), src.stat().st_mtime_ns
    archive = onnxz.pack_file(src, tmp_path / "out" / "model.onnxz")
    assert archive == tmp_path / "out" / "model.onnxz" and archive.stat().st_size < src.stat().st_size
    restored = onnxz.unpack_file(archive, tmp_path / "restored.onnx")
    assert restored.read_bytes() == src.read_bytes()
    assert _digest(src) == before and src.stat().st_mtime_ns == mtime
    onnx.checker.check_model(str(restored))
    assert not _leftovers(tmp_path) and not _leftovers(tmp_path / "out")


def test_pack_overwrites_an_existing_archive(tmp_path):
    src, dst = tmp_path / "m.onnx", tmp_path / "m.onnxz"
    src.write_bytes(_serialized(_zoo()["dense"]))
    dst.write_bytes(b"old")
    onnxz.pack_file(src, dst)
    assert onnxz.unpack_bytes(dst.read_bytes()) == src.read_bytes()


def test_refuses_to_write_onto_the_input(tmp_path):
    src = tmp_path / "m.onnx"
    src.write_bytes(_serialized(_zoo()["dense"]))
    before = _digest(src)
    link = tmp_path / "link.onnx"
    link.symlink_to(src)
    for dst in (src, tmp_path / "." / "m.onnx", link):
        with pytest.raises(ArchiveError) as exc:
            onnxz.pack_file(src, dst)
        assert "is the input file" in _one_line(exc)
    archive = tmp_path / "m.onnxz"
    onnxz.pack_file(src, archive)
    with pytest.raises(ArchiveError, match="is the input file"):
        onnxz.unpack_file(archive, archive)
    assert _digest(src) == before and onnxz.unpack_bytes(archive.read_bytes()) == src.read_bytes()


def test_nothing_written_on_error(tmp_path):
    bad_model, bad_archive = tmp_path / "bad.onnx", tmp_path / "bad.onnxz"
    bad_model.write_bytes(b"not a model at all")
    bad_archive.write_bytes(onnxz.pack_bytes(_serialized(_zoo()["dense"]))[:-3])
    with pytest.raises(ModelLoadError):
        onnxz.pack_file(bad_model, tmp_path / "new.onnxz")
    with pytest.raises(ArchiveError):
        onnxz.unpack_file(bad_archive, tmp_path / "new.onnx")
    existing = tmp_path / "existing.onnx"
    existing.write_bytes(b"keep me")
    with pytest.raises(ArchiveError):
        onnxz.unpack_file(bad_archive, existing)
    assert existing.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx", "bad.onnxz", "existing.onnx"]


def test_refuses_a_folder_as_target(tmp_path):
    src = tmp_path / "m.onnx"
    src.write_bytes(_serialized(_zoo()["dense"]))
    (tmp_path / "folder").mkdir()
    with pytest.raises(ArchiveError, match="is a folder"):
        onnxz.pack_file(src, tmp_path / "folder")
    assert list((tmp_path / "folder").iterdir()) == []


def test_missing_inputs(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        onnxz.pack_file(tmp_path / "nope.onnx", tmp_path / "x.onnxz")
    with pytest.raises(ArchiveError, match="no such file"):
        onnxz.unpack_file(tmp_path / "nope.onnxz", tmp_path / "x.onnx")
    with pytest.raises(ArchiveError, match="is a folder"):
        onnxz.unpack_file(tmp_path, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists() and not (tmp_path / "x.onnxz").exists()


# --------------------------------------------------------------------------- real models


@pytest.mark.real_model
@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_real_models_unpack_bit_for_bit(name, tmp_path):
    path = models.fetch(name)
    data = path.read_bytes()
    archive = onnxz.pack_bytes(data)
    assert onnxz.unpack_bytes(archive) == data
    header = _header(archive)
    assert header["encoding"] == "tensors"
    assert len(archive) < 0.9 * len(data)
    out = onnxz.unpack_file(onnxz.pack_file(path, tmp_path / f"{name}.onnxz"), tmp_path / f"{name}.onnx")
    assert out.read_bytes() == data and path.read_bytes() == data


# --------------------------------------------------------------------------- the Python API


def test_api_packs_paths_protos_ir_models_and_results_alike(tmp_path):
    import onnx_ir as ir

    import onnxcompress

    w = np.random.default_rng(0).choice(np.float32([-1, 0.5, 2]), size=(64, 64))
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
                              [numpy_helper.from_array(w, "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    source = tmp_path / "m.onnx"
    onnx.save(proto, source)
    result = onnxcompress.compress(source, "cleanup")
    plain = result.save(tmp_path / "plain.onnx").read_bytes()
    archives = [onnxcompress.pack(source, tmp_path / "a.onnxz"), onnxcompress.pack(proto, tmp_path / "b.onnxz"),
                onnxcompress.pack(ir.serde.deserialize_model(proto), tmp_path / "c.onnxz"),
                result.save(tmp_path / "d.onnxz")]
    expected = [source.read_bytes(), proto.SerializeToString(), None, plain]
    for archive, want in zip(archives, expected):
        back = onnxcompress.unpack(archive, archive.with_suffix(".onnx")).read_bytes()
        if want is not None:
            assert back == want
        onnx.checker.check_model(onnx.load_model_from_string(back))
        assert archive.stat().st_size < len(back)
    with pytest.raises(ArchiveError, match="cannot pack a dict"):
        onnxcompress.pack({}, tmp_path / "e.onnxz")
    with pytest.raises(ArchiveError, match="external_data does not apply"):
        result.save(tmp_path / "f.onnxz", external_data=True)
    assert not (tmp_path / "e.onnxz").exists() and not (tmp_path / "f.onnxz").exists()
