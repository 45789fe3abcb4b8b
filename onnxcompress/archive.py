"""The ``.onnxz`` archive: Deep Compression storage that unpacks bit-exactly to the ONNX file.

Packing takes the raw bytes of the model's weight tensors out of the protobuf, stores each
under the smallest of several exact encodings (byte-shuffled zlib, a codebook of distinct
values with Huffman-coded indices, Huffman-coded bytes, relative-indexed sparse), and
compresses what is left of the model (the graph) separately. Unpacking writes every tensor's
bytes back into its emptied field of the serialized graph (the bytes re-serializing would give,
without re-encoding the rest: :mod:`onnxcompress.wire`); the result is checked against the
original's SHA-256. Packing
checks, before it returns, that unpacking reproduces its input byte for byte: each tensor's
encoding is decoded in the worker that made it (one that does not decode to the tensor's
bytes is stored as it is, with a warning), then the archive is unpacked with those checked
tensors. When that would not reproduce the input (protobuf re-serialization is canonical for
files written by onnx, not for every writer), the archive holds the whole file under zlib
instead (``"encoding": "whole-file"``).

File layout (integers little-endian)::

    offset  size  field
    0       6     magic b"ONNXZ\\0"
    6       2     format version (u16), 1
    8       4     header length H (u32)
    12      H     header: a UTF-8 JSON object (below)
    12+H    ...   the blob area: the graph blob and the tensor blobs, each at the offset
                  (from the start of the blob area) and length the header gives; the file
                  ends where the blob area ends

Header (version 1)::

    {"original": {"size": <bytes of the ONNX file>, "sha256": "<hex digest of it>"},
     "encoding": "tensors" | "whole-file",
     "blobs": <length of the blob area>,
     "graph": {"codec": "zlib" | "lzma", "offset": int, "length": int},
     "tensors": [{"locator": str, "name": str, "dtype": str, "shape": [int, ...],
                  "size": <raw bytes>, "encoding": str, "params": {...},
                  "offset": int, "length": int}, ...]}

``"whole-file"``: the graph blob is the original file under ``codec``; ``tensors`` is empty.
``"tensors"``: the graph blob is the model with the ``raw_data`` of every listed tensor set to
empty bytes, serialized, under ``codec``. Tensors are visited in a fixed order: per graph, its
``initializer`` list, its ``sparse_initializer`` list (values, then indices), then its nodes
and their attributes (TENSOR, TENSORS, SPARSE_TENSOR(S); GRAPH and GRAPHS attributes recursed
into, as for If/Loop/Scan bodies); the main graph, then the nodes of every local function.
A ``locator`` names the tensor's place in that walk, e.g. ``graph.initializer[3]``,
``graph.node[7].then_branch.node[0].value``, ``functions[0].node[2].value``; ``name`` is the
tensor's name, or for an unnamed attribute tensor its node's first output. Tensors that carry
``raw_data`` of at least ``MIN_TENSOR_BYTES`` (1024) bytes are listed, in walk order; smaller
ones stay in the graph blob, as do tensors stored in typed fields (``float_data`` etc.) and
those of ``training_info`` graphs.
``dtype`` is the ONNX data type's name in lower case (``float32`` and ``float64`` for FLOAT
and DOUBLE), informative only; ``size`` is the length of the tensor's raw bytes.

Tensor encodings: see :mod:`onnxcompress.tensor_codecs`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import lzma
import math
import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import onnx
from google.protobuf.message import DecodeError

from onnxcompress import tensor_codecs, wire
from onnxcompress.errors import ArchiveError, ModelLoadError
from onnxcompress.modelio import write_atomically

logger = logging.getLogger(__name__)

MAGIC = b"ONNXZ\0"
FORMAT_VERSION = 1
_PREAMBLE = struct.Struct("<6sHI")

MIN_TENSOR_BYTES = 1024  # smaller tensors stay in the graph blob: a header entry would cost more
WHOLE_FILE_LEVEL = 6
LZMA_UP_TO = 4 << 20  # the graph blob is tried under lzma too when at most this large
WORKERS = max(1, min(4, os.cpu_count() or 1))


@dataclass(frozen=True)
class EncodingSize:
    """The size of one tensor under one encoding."""

    encoding: str
    bytes: int
    bits_per_element: float


@dataclass(frozen=True)
class TensorStorage:
    """How one tensor would be stored in an archive: every applicable encoding and pack's choice.

    ``chosen`` is ``"inline"`` for a tensor under ``MIN_TENSOR_BYTES`` that stays in the graph blob.
    """

    name: str
    locator: str
    dtype: str
    elements: int
    raw_bytes: int
    encodings: tuple[EncodingSize, ...]
    chosen: str

    @property
    def chosen_bytes(self) -> int:
        return self.size(self.chosen) if self.chosen != "inline" else self.raw_bytes

    def size(self, encoding: str) -> int:
        """Bytes under ``encoding``; KeyError if it does not apply to this tensor."""
        for entry in self.encodings:
            if entry.encoding == encoding:
                return entry.bytes
        raise KeyError(f"encoding {encoding!r} does not apply to tensor '{self.name}'")


# --------------------------------------------------------------------------- public API


def pack_bytes(onnx_bytes: bytes) -> bytes:
    """The ``.onnxz`` archive of an ONNX model's serialized bytes (checked to unpack exactly)."""
    original = bytes(onnx_bytes)
    model = _parse_model(original)
    described = _original_field(original)
    archive, checked = _pack_tensors(described, model, _weights(model))
    problem = _unpack_problem(archive, original, described, checked)
    if problem is not None:
        logger.warning("packing the model as a whole file under zlib: %s", problem)
        archive = _pack_whole_file(original, described)
        problem = _unpack_problem(archive, original, described, {})
        if problem is not None:
            raise ArchiveError(f"the whole-file archive does not unpack to the model ({problem}); nothing written")
    return archive


def _unpack_problem(archive: bytes, original: bytes, described: dict, checked: dict[int, _Checked]) -> str | None:
    """Why unpacking ``archive`` would not give ``original`` (``described``: its size and
    SHA-256) back, or None if it does. A tensor entry that names exactly the encoding and
    blob of one in ``checked`` (by blob offset) takes that tensor's bytes instead of being
    decoded again."""

    def decode(entry: dict, blob: memoryview, site: _Site, limit: int) -> bytes:
        known = checked.get(entry.get("offset"))
        if known is not None and known.made(entry, blob):
            return known.raw
        return _decode_entry(entry, blob, site, limit)

    try:
        result, recorded = _unpack(archive, decode)
    except ArchiveError as exc:
        return str(exc)
    if recorded != described:
        return f"the header records {recorded}, not the model's size and SHA-256"
    if result != original:
        return "re-serializing the model does not reproduce the file"
    return None


def unpack_bytes(archive: bytes) -> bytes:
    """The exact ONNX bytes an archive was packed from; ArchiveError if it is not a sound archive."""
    result, recorded = _unpack(archive, _decode_entry)
    if len(result) != recorded["size"] or hashlib.sha256(result).hexdigest() != recorded["sha256"]:
        raise ArchiveError("unpacked model does not match the SHA-256 recorded in the archive (corrupt archive)")
    return result


def _unpack(archive: bytes, decode) -> tuple[bytes, dict]:
    """The bytes an archive unpacks to, its tensors decoded by ``decode`` (as
    :func:`_decode_entry`), and the size and SHA-256 its header records for them."""
    view = memoryview(archive).cast("B")
    header, blobs = _read_archive(view)
    original = _field(header, "original", dict, "header")
    size = _field(original, "size", int, "original")
    digest = _field(original, "sha256", str, "original")
    encoding = _field(header, "encoding", str, "header")
    graph = _graph_bytes(header, blobs, size)
    if encoding == "whole-file":
        result = graph
    elif encoding == "tensors":
        result = _restore_tensors(graph, header, blobs, size, decode)
    else:
        raise ArchiveError(f"archive header names an unknown encoding {encoding!r}")
    return result, {"size": size, "sha256": digest}


def pack_file(src, dst) -> Path:
    """Pack the ONNX file ``src`` into the archive ``dst`` (written atomically; ``src`` untouched)."""
    src, dst = Path(src), Path(dst)
    data = _read_input(src, ModelLoadError, "ONNX model")
    _check_target(src, dst)
    return write_atomically(dst, pack_bytes(data))


def write_archive(onnx_bytes: bytes, dst) -> Path:
    """Pack a serialized ONNX model into the archive ``dst`` (written atomically)."""
    dst = Path(dst)
    if dst.is_dir():
        raise ArchiveError(f"{dst}: is a folder; give the path of the file to write")
    return write_atomically(dst, pack_bytes(onnx_bytes))


def unpack_file(src, dst) -> Path:
    """Unpack the archive ``src`` into the ONNX file ``dst`` (written atomically; ``src`` untouched)."""
    src, dst = Path(src), Path(dst)
    data = _read_input(src, ArchiveError, "archive")
    _check_target(src, dst)
    return write_atomically(dst, unpack_bytes(data))


def storage_report(onnx_bytes: bytes) -> list[TensorStorage]:
    """Every tensor with ``raw_data``, its size under each applicable encoding and pack's choice."""
    model = _parse_model(bytes(onnx_bytes))
    report = []
    with ThreadPoolExecutor(WORKERS) as planes:
        for site in _walk_model(model):
            if site.tensor.data_location == onnx.TensorProto.EXTERNAL:
                raise _external_data_error(site)
            if not site.tensor.HasField("raw_data"):
                continue
            data = site.tensor.raw_data
            kind = tensor_codecs.Kind.of(site.tensor.data_type, len(data))
            candidates, best = tensor_codecs.encodings(data, kind, planes, known=_known(data, *_described(site.tensor)))
            elements = math.prod(site.tensor.dims)
            sizes = tuple(EncodingSize(c.encoding, len(c.blob), 8 * len(c.blob) / max(elements, 1)) for c in candidates)
            chosen = best.encoding if len(data) >= MIN_TENSOR_BYTES else "inline"
            report.append(TensorStorage(site.name, site.locator, tensor_codecs.dtype_name(site.tensor.data_type), elements,
                                        len(data), sizes, chosen))
    return report


# --------------------------------------------------------------------------- the tensor walk


@dataclass(frozen=True)
class _Site:
    locator: str
    name: str
    tensor: onnx.TensorProto


def _walk_model(model: onnx.ModelProto) -> Iterator[_Site]:
    yield from _walk_graph(model.graph, "graph")
    for f, function in enumerate(model.functions):
        for i, node in enumerate(function.node):
            yield from _walk_node(node, f"functions[{f}].node[{i}]")


def _walk_graph(graph: onnx.GraphProto, where: str) -> Iterator[_Site]:
    for i, tensor in enumerate(graph.initializer):
        yield _Site(f"{where}.initializer[{i}]", tensor.name, tensor)
    for i, sparse in enumerate(graph.sparse_initializer):
        yield from _walk_sparse(sparse, f"{where}.sparse_initializer[{i}]", sparse.values.name)
    for i, node in enumerate(graph.node):
        yield from _walk_node(node, f"{where}.node[{i}]")


def _walk_sparse(sparse: onnx.SparseTensorProto, where: str, name: str) -> Iterator[_Site]:
    yield _Site(f"{where}.values", sparse.values.name or name, sparse.values)
    yield _Site(f"{where}.indices", f"{sparse.values.name or name}.indices", sparse.indices)


def _walk_node(node: onnx.NodeProto, where: str) -> Iterator[_Site]:
    owner = node.output[0] if node.output and node.output[0] else (node.name or node.op_type)
    kinds = onnx.AttributeProto
    for attr in node.attribute:
        at = f"{where}.{attr.name}"
        if attr.type == kinds.TENSOR:
            yield _Site(at, attr.t.name or owner, attr.t)
        elif attr.type == kinds.TENSORS:
            for j, tensor in enumerate(attr.tensors):
                yield _Site(f"{at}[{j}]", tensor.name or f"{owner}.{attr.name}[{j}]", tensor)
        elif attr.type == kinds.SPARSE_TENSOR:
            yield from _walk_sparse(attr.sparse_tensor, at, owner)
        elif attr.type == kinds.SPARSE_TENSORS:
            for j, sparse in enumerate(attr.sparse_tensors):
                yield from _walk_sparse(sparse, f"{at}[{j}]", f"{owner}.{attr.name}[{j}]")
        elif attr.type == kinds.GRAPH:
            yield from _walk_graph(attr.g, at)
        elif attr.type == kinds.GRAPHS:
            for j, graph in enumerate(attr.graphs):
                yield from _walk_graph(graph, f"{at}[{j}]")


def _weights(model: onnx.ModelProto) -> list[tuple[_Site, bytes]]:
    """The tensors pack takes out of the model and their raw bytes, in walk order; refuses
    external data."""
    weights = []
    for site in _walk_model(model):
        if site.tensor.data_location == onnx.TensorProto.EXTERNAL:
            raise _external_data_error(site)
        if site.tensor.HasField("raw_data"):
            raw = site.tensor.raw_data
            if len(raw) >= MIN_TENSOR_BYTES:
                weights.append((site, raw))
    return weights


def _external_data_error(site: _Site) -> ArchiveError:
    return ArchiveError(f"tensor '{site.name}' ({site.locator}) uses external data; "
                        "pack the model with its weights inline")


# --------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class _Checked:
    """A tensor's encoding, checked to decode to its bytes."""

    encoded: tensor_codecs.Encoded
    raw: bytes

    def made(self, entry: dict, blob: memoryview) -> bool:
        """Whether a header entry and its blob are this encoding's."""
        return (entry.get("encoding") == self.encoded.encoding and entry.get("params") == self.encoded.params
                and blob == self.encoded.blob)


def _pack_tensors(described: dict, model: onnx.ModelProto,
                  weights: list[tuple[_Site, bytes]]) -> tuple[bytes, dict[int, _Checked]]:
    """The archive of the model with the weights taken out (``model`` is emptied of them;
    ``described``: the original file's size and SHA-256), and every tensor's checked
    encoding by the offset of its blob."""
    sites = [site for site, _ in weights]
    raws = [raw for _, raw in weights]
    with ThreadPoolExecutor(WORKERS) as planes, ThreadPoolExecutor(WORKERS) as tensors:
        kinds = [tensor_codecs.Kind.of(site.tensor.data_type, len(raw)) for site, raw in weights]
        # largest first, so that one big tensor does not start last
        order = sorted(range(len(sites)), key=lambda i: -len(raws[i]))
        # the workers get plain values, never the protobuf messages the main thread changes
        futures = {i: tensors.submit(_encode_checked, raws[i], kinds[i], planes, sites[i].name,
                                     *_described(sites[i].tensor)) for i in order}
        for site in sites:  # the raw bytes were copied out: the graph compresses beside the tensors
            site.tensor.raw_data = b""
        codec, graph_blob = _compress_graph(model.SerializeToString())
        encoded = [futures[i].result() for i in range(len(sites))]
    entries, blobs, offset, checked = [], [graph_blob], len(graph_blob), {}
    for site, raw, enc in zip(sites, raws, encoded):
        checked[offset] = _Checked(enc, raw)
        entries.append({"locator": site.locator, "name": site.name, "dtype": tensor_codecs.dtype_name(site.tensor.data_type),
                        "shape": list(site.tensor.dims), "size": len(raw), "encoding": enc.encoding,
                        "params": enc.params, "offset": offset, "length": len(enc.blob)})
        blobs.append(enc.blob)
        offset += len(enc.blob)
    _log_choices(entries)
    header = {"original": described, "encoding": "tensors", "blobs": offset,
              "graph": {"codec": codec, "offset": 0, "length": len(graph_blob)}, "tensors": entries}
    return _assemble(header, blobs), checked


def _described(tensor: onnx.TensorProto) -> tuple[int, list[int], dict[str, str]]:
    return tensor.data_type, list(tensor.dims), {p.key: p.value for p in tensor.metadata_props}


def _encode_checked(raw: bytes, kind: tensor_codecs.Kind, planes, name: str, data_type: int, dims: list[int],
                    metadata: dict[str, str]) -> tensor_codecs.Encoded:
    """The encoding pack keeps for one tensor, checked to decode to its bytes (run in a worker
    thread, metadata codebooks too); ``stored`` if it does not."""
    encoded = tensor_codecs.encode(raw, kind, planes, _known(raw, data_type, dims, metadata))
    try:
        problem = None if tensor_codecs.decode(encoded.encoding, encoded.params, memoryview(encoded.blob),
                                               len(raw)) == raw else "decodes to other bytes"
    except (ValueError, KeyError, TypeError, IndexError, OverflowError, zlib.error) as exc:
        problem = f"does not decode: {exc}"
    if problem is None:
        return encoded
    logger.warning("tensor '%s' stored as it is: its %s encoding %s", name, encoded.encoding, problem)
    return tensor_codecs.Encoded("stored", {}, raw)


def _known(raw: bytes, data_type: int, dims: list[int], metadata: dict[str, str]) -> tuple[tensor_codecs.Encoded, ...]:
    """Encodings the tensor's metadata makes possible (a codebook shared by scaled channels)."""
    found = tensor_codecs.scaled_codebook_encode(raw, data_type, dims, metadata) if metadata else None
    return (found,) if found is not None else ()


def _pack_whole_file(original: bytes, described: dict) -> bytes:
    blob = zlib.compress(original, WHOLE_FILE_LEVEL)
    header = {"original": described, "encoding": "whole-file", "blobs": len(blob),
              "graph": {"codec": "zlib", "offset": 0, "length": len(blob)}, "tensors": []}
    return _assemble(header, [blob])


def _original_field(original: bytes) -> dict:
    return {"size": len(original), "sha256": hashlib.sha256(original).hexdigest()}


def _assemble(header: dict, blobs: list[bytes]) -> bytes:
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return b"".join([_PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(text)), text, *blobs])


def _compress_graph(graph: bytes) -> tuple[str, bytes]:
    best = ("zlib", zlib.compress(graph, 9))
    if len(graph) <= LZMA_UP_TO:
        # a dictionary the size of the input: the default 8 MiB one costs more to set up than to use
        dictionary = max(1 << 16, 1 << (len(graph) - 1).bit_length())
        packed = lzma.compress(graph, filters=[{"id": lzma.FILTER_LZMA2, "preset": 6, "dict_size": dictionary}])
        if len(packed) < len(best[1]):
            best = ("lzma", packed)
    return best


def _log_choices(entries: list[dict]) -> None:
    if logger.isEnabledFor(logging.INFO):
        raw = sum(e["size"] for e in entries)
        packed = sum(e["length"] for e in entries)
        counts: dict[str, int] = {}
        for e in entries:
            counts[e["encoding"]] = counts.get(e["encoding"], 0) + 1
        logger.info("packed %d tensors, %d -> %d bytes (%s)", len(entries), raw, packed,
                    ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))


def _parse_model(data: bytes) -> onnx.ModelProto:
    if not data:
        raise ModelLoadError("empty input, not an ONNX model")
    if data.startswith(MAGIC):
        raise ModelLoadError("input is already an .onnxz archive, not an ONNX model")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise ModelLoadError(f"not a valid ONNX model (truncated or another format): {exc}") from None
    if not model.HasField("graph") or (not model.graph.node and not model.graph.output):
        raise ModelLoadError("not a valid ONNX model (no graph)")
    return model


# --------------------------------------------------------------------------- reading


def _read_archive(view: memoryview) -> tuple[dict, memoryview]:
    """The header and the blob area of an archive, after the structural checks."""
    if len(view) < len(MAGIC) or bytes(view[: len(MAGIC)]) != MAGIC:
        raise ArchiveError("not an .onnxz archive (bad magic)")
    if len(view) < _PREAMBLE.size:
        raise ArchiveError(f"truncated archive: {len(view)} bytes, the preamble alone is {_PREAMBLE.size}")
    _, version, header_size = _PREAMBLE.unpack_from(view, 0)
    if version > FORMAT_VERSION:
        raise ArchiveError(f"archive format version {version} is newer than this onnxcompress reads ({FORMAT_VERSION})")
    if version != FORMAT_VERSION:
        raise ArchiveError(f"unknown archive format version {version}")
    if len(view) < _PREAMBLE.size + header_size:
        raise ArchiveError(f"truncated archive: the header needs {header_size} bytes, "
                           f"{len(view) - _PREAMBLE.size} follow")
    try:
        header = json.loads(bytes(view[_PREAMBLE.size : _PREAMBLE.size + header_size]))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ArchiveError(f"archive header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ArchiveError("archive header is not a JSON object")
    blobs = view[_PREAMBLE.size + header_size :]
    expected = _field(header, "blobs", int, "header")
    if len(blobs) < expected:
        raise ArchiveError(f"truncated archive: {len(blobs)} bytes of blobs, the header says {expected}")
    if len(blobs) > expected:
        raise ArchiveError(f"archive has {len(blobs) - expected} bytes after its last blob")
    return header, blobs


def _field(obj: dict, key: str, kind: type, where: str):
    value = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(value, kind) or (kind is int and (isinstance(value, bool) or value < 0)):
        raise ArchiveError(f"archive header malformed: {where} has no valid '{key}'")
    return value


def _blob(entry: dict, blobs: memoryview, what: str) -> memoryview:
    offset = _field(entry, "offset", int, what)
    length = _field(entry, "length", int, what)
    if offset + length > len(blobs):
        raise ArchiveError(f"{what}: blob at offset {offset}, length {length} lies outside "
                           f"the blob area ({len(blobs)} bytes)")
    return blobs[offset : offset + length]


def _graph_bytes(header: dict, blobs: memoryview, limit: int) -> bytes:
    graph = _field(header, "graph", dict, "header")
    codec = _field(graph, "codec", str, "graph")
    blob = _blob(graph, blobs, "graph")
    try:
        return tensor_codecs.inflate(codec, blob, limit)
    except (ValueError, zlib.error, lzma.LZMAError) as exc:
        raise ArchiveError(f"graph blob does not decode ({codec}): {exc}") from None


def _restore_tensors(graph: bytes, header: dict, blobs: memoryview, limit: int, decode) -> bytes:
    """The model with every listed tensor's bytes put back (no tensor is over ``limit`` bytes;
    each decoded by ``decode``, as :func:`_decode_entry`):
    the graph blob is parsed to check the entries against it, and the bytes are written into
    its empty ``raw_data`` fields in place (:mod:`onnxcompress.wire`), as re-serializing would."""
    entries = _field(header, "tensors", list, "header")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(graph)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise ArchiveError(f"graph blob is not a serialized ONNX model: {exc}") from None
    sites = {site.locator: site for site in _walk_model(model)}
    targets = [_target(entry, sites) for entry in entries]
    work = [(entry, _blob(entry, blobs, f"tensor '{site.name}'"), site, limit) for entry, site in zip(entries, targets)]
    with ThreadPoolExecutor(WORKERS) as pool:
        decoded = list(pool.map(lambda item: decode(*item), work))
    try:
        return wire.fill_raw_data(graph, {site.locator: data for site, data in zip(targets, decoded)})
    except wire.WireError as exc:
        raise ArchiveError(f"graph blob does not take its tensors back: {exc}") from None


def _target(entry: dict, sites: dict[str, _Site]) -> _Site:
    locator = _field(entry, "locator", str, "tensor entry")
    name = _field(entry, "name", str, f"tensor entry {locator}")
    site = sites.get(locator)
    if site is None or site.name != name:
        raise ArchiveError(f"tensor '{name}' ({locator}) is not in the archived graph")
    if not site.tensor.HasField("raw_data") or site.tensor.raw_data:
        raise ArchiveError(f"tensor '{name}' ({locator}) in the archived graph was not emptied by pack")
    return site


def _decode_entry(entry: dict, blob: memoryview, site: _Site, limit: int) -> bytes:
    what = f"tensor '{site.name}' ({site.locator})"
    size = _field(entry, "size", int, what)
    encoding = _field(entry, "encoding", str, what)
    params = _field(entry, "params", dict, what)
    if size > limit:
        raise ArchiveError(f"{what}: {size} bytes, more than the whole model's {limit}")
    try:
        data = tensor_codecs.decode(encoding, params, blob, size)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, OverflowError, zlib.error) as exc:
        raise ArchiveError(f"{what}: {encoding} blob does not decode: {exc}") from None
    except MemoryError:
        raise ArchiveError(f"{what}: {encoding} blob of {size} bytes does not fit in memory") from None
    if len(data) != size:
        raise ArchiveError(f"{what}: {encoding} blob decodes to {len(data)} bytes, the header says {size}")
    return data


def _read_input(path: Path, error: type, what: str) -> bytes:
    if not path.exists():
        raise error(f"{path}: no such file")
    if path.is_dir():
        raise error(f"{path}: is a folder, not an {what}")
    return path.read_bytes()


def _check_target(src: Path, dst: Path) -> None:
    if src.resolve() == dst.resolve() or (dst.exists() and os.path.samefile(src, dst)):
        raise ArchiveError(f"{dst}: is the input file; refusing to overwrite it")
    if dst.is_dir():
        raise ArchiveError(f"{dst}: is a folder; give the path of the file to write")

