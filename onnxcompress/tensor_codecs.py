"""Exact encodings of one tensor's raw bytes, for the ``.onnxz`` archive (:mod:`onnxcompress.archive`).

Tensor encodings (the blob of each tensor, ``params`` in its header entry). A tensor's bytes
are read as ``unit``-byte little-endian elements: 2 for 16-bit types, 4 for FLOAT, INT32,
UINT32 and COMPLEX64 (its float halves), 8 for DOUBLE, INT64, UINT64 and COMPLEX128; 1 for
8-bit types, packed 4-bit types, others, and any tensor whose size ``unit`` does not divide.

- ``stored``: the raw bytes. ``params`` = {}.
- ``zlib``: the bytes split into ``unit`` byte planes (plane k holds byte k of every element,
  as blosc's shuffle does), each plane cut into parts of ``segment`` bytes (the last part of
  a plane may be shorter), each part a zlib stream of its own (deflated with the run-length
  strategy, which inflating need not know) or stored.
  ``params`` = {"unit": u, "segment": s, "parts": [["zlib" | "stored", length], ...]}, the
  parts plane by plane; the blob is the parts one after the other. A part is stored when
  zlib saves under 2% on it; a part of 64 KiB or more is compressed only if a sample of it
  (4 slices spread evenly, of 32 KiB or an eighth of the part if less) shrinks by 2%. Used
  only when it saves at least 2% over ``stored``.
- ``codebook``: ``unit`` in {2, 4, 8} and at most 256 distinct elements (what k-means weight
  sharing gives): the distinct elements sorted by bit pattern (raw, ``k * unit`` bytes), then
  the Huffman stream (``onnxcompress.huffman``) of each element's index into them.
  ``params`` = {"unit": u, "values": k}.
- ``scaled-codebook``: a float tensor that ``cluster-weights{granularity=channel}`` wrote,
  ``codebook[index] * scale[channel]`` with one codebook shared by the channels along
  ``axis`` (the tensor's metadata ``onnxcompress.codebook*`` names them; pack uses it only
  when the product, in the tensor's dtype, rebuilds every element bit for bit): the
  codebook (raw, ``k`` elements), the scales (raw, ``shape[axis]`` elements), then the
  Huffman stream of the indices. ``params`` = {"dtype": "float32" | "float16" | "float64",
  "shape": [int, ...], "axis": a, "values": k}.
- ``bytes-huffman``: ``unit`` 1 (int8/uint8/bool/float8 and packed 4-bit types: quantized
  weights): the Huffman stream of the raw bytes. ``params`` = {}.
- ``sparse``: more than half of the elements bitwise zero (so -0.0 is kept as a value):
  relative indexing as in Deep Compression (Han et al.): entry i records how many zero
  elements precede it since the previous entry, 0..255; a run of zeros longer than 255 is
  broken by filler entries (a count of 255 and a zero value). The blob is the Huffman stream
  of the counts, then the entries' elements (fillers included) under the best of
  ``codebook``, ``bytes-huffman``, ``zlib`` and ``stored``. ``params`` = {"unit": u,
  "entries": m, "gaps": <length of the counts stream>, "values": {"encoding": str,
  "params": {...}}}. Elements after the last entry are zero.

Every encoding works on bytes, so NaN payloads, -0.0 and denormals come back exactly. Of the
encodings that apply to a tensor, pack keeps the smallest; on a tie the first of ``stored``,
``codebook``, ``bytes-huffman``, ``sparse``, ``zlib``. zlib, the slow one, is left out
without being computed when the samples of its parts put it at over 1.5 times the best of
the others (``storage_report`` computes it anyway and shows it, but chooses as pack does).
"""

from __future__ import annotations

import lzma
import zlib
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
import onnx

from onnxcompress import huffman
from onnxcompress.clustering import CODEBOOK_KEY, Clustered, from_codebook_metadata

# Byte planes are deflated with the run-length strategy: on the exponent planes of float
# weights it compresses better than string matching (minilm_l6: 0.34 of the plane, against
# 0.44 at level 1 and 0.41 at level 6) and faster (1.4x level 1, 12x level 6).
ZLIB_LEVEL, ZLIB_STRATEGY = 1, zlib.Z_RLE
MIN_GAIN = 0.98  # compress only what shrinks by at least 2%
PROBE_FROM = 1 << 16  # parts at least this large are sampled before being compressed whole
PROBE_SLICES, PROBE_SLICE = 4, 1 << 15  # the sample: 4 slices of up to 32 KiB (an eighth of the part)
DEFLATE_STEP = 1 << 20  # input fed to zlib between checks of the size budget
ZLIB_SEGMENT = 1 << 22  # planes are cut into parts of this many bytes, compressed in parallel
MAX_CODEBOOK = 256
CODEBOOK_SAMPLE = 8192
COUNT_CHUNK = 1 << 20
ZLIB_HOPELESS = 1.5  # zlib is not tried when its sampled estimate is this much over the best other


@dataclass(frozen=True)
class Encoded:
    encoding: str
    params: dict
    blob: bytes

def inflate(codec: str, blob: memoryview, limit: int) -> bytes:
    """Decompress a whole ``codec`` stream of at most ``limit`` bytes; ValueError if it is not one."""
    if codec == "zlib":
        decoder = zlib.decompressobj()
    elif codec == "lzma":
        decoder = lzma.LZMADecompressor()
    else:
        raise ValueError(f"unknown codec {codec!r}")
    out = decoder.decompress(blob, limit + 1)
    if len(out) > limit:
        raise ValueError(f"decompresses to more than {limit} bytes")
    if not decoder.eof or decoder.unused_data:
        raise ValueError("truncated stream" if not decoder.eof else "bytes after the end of the stream")
    return out


_UNIT_BY_TYPE = {
    **dict.fromkeys(["UINT16", "INT16", "FLOAT16", "BFLOAT16"], 2),
    **dict.fromkeys(["FLOAT", "INT32", "UINT32", "COMPLEX64"], 4),
    **dict.fromkeys(["DOUBLE", "INT64", "UINT64", "COMPLEX128"], 8),
}
_UNITS = {getattr(onnx.TensorProto, name): unit for name, unit in _UNIT_BY_TYPE.items()
          if hasattr(onnx.TensorProto, name)}


@dataclass(frozen=True)
class Kind:
    """How a tensor's bytes are read: ``unit``-byte elements (1 for 8-bit, packed and unknown types)."""

    unit: int

    @classmethod
    def of(cls, data_type: int, size: int) -> Kind:
        unit = _UNITS.get(data_type, 1)
        return cls(unit if size % unit == 0 else 1)


def dtype_name(data_type: int) -> str:
    try:
        name = onnx.TensorProto.DataType.Name(data_type)
    except ValueError:
        return f"type{data_type}"
    return {"FLOAT": "float32", "DOUBLE": "float64"}.get(name, name.lower())


def encode(data: bytes, kind: Kind, planes: Executor | None, known: tuple[Encoded, ...] = ()) -> Encoded:
    return encodings(data, kind, planes, full=False, known=known)[1]


def encodings(data: bytes, kind: Kind, planes: Executor | None, *, sparse: bool = True,
               full: bool = True, known: tuple[Encoded, ...] = ()) -> tuple[list[Encoded], Encoded]:
    """The encodings that apply to the bytes (stored, codebook, bytes-huffman, sparse, zlib,
    and those in ``known``, computed from what the tensor's metadata says) and the one pack
    keeps.

    Pack keeps the smallest, where zlib competes only if its estimate from samples is under
    ZLIB_HOPELESS times the best of the others. With ``full=False`` (packing) zlib is not
    computed when it does not compete, and given up as soon as its output reaches the best
    of the others; with ``full=True`` (the storage report) it is computed whole. When packing a
    tensor with a ``known`` encoding, the codebook of distinct values and zlib are not tried:
    the known codebook is what the tensor was built from, and on every clustered model in the
    benchmark it was smaller than both (the storage report still computes them).
    """
    stored = Encoded("stored", {}, bytes(data))
    if not data:
        return [stored], stored
    units = np.frombuffer(data, dtype=f"<u{kind.unit}")
    found = [stored, *known]
    generic = full or not known
    if kind.unit > 1 and generic:
        book = _codebook_encode(units)
        if book is not None:
            found.append(book)
    if kind.unit == 1:
        found.append(Encoded("bytes-huffman", {}, huffman.encode(units)))
    if sparse and 2 * np.count_nonzero(units) < units.size:
        found.append(_sparse_encode(units, kind, planes, full))
    best = min(found, key=lambda c: len(c.blob))
    if not generic:
        return found, best
    parts = _ZlibParts(data, kind.unit, planes)
    competes = parts.estimate() < ZLIB_HOPELESS * len(best.blob)
    if full or competes:
        shuffled = parts.encode(None if full else len(best.blob))
        if shuffled is not None:
            found.append(shuffled)
            if competes and len(shuffled.blob) < len(best.blob):
                best = shuffled
    return found, best


def decode(encoding: str, params: dict, blob: memoryview, size: int) -> bytes:
    """The raw bytes (``size`` of them) of a blob; ValueError (or KeyError...) if it is malformed."""
    if encoding == "stored":
        return bytes(blob)
    if encoding == "zlib":
        return _zlib_decode(params, blob, size)
    if encoding == "codebook":
        return _codebook_decode(params, blob, size)
    if encoding == "bytes-huffman":
        return huffman.decode(blob).tobytes()
    if encoding == "scaled-codebook":
        return _scaled_codebook_decode(params, blob, size)
    if encoding == "sparse":
        return _sparse_decode(params, blob, size)
    raise ValueError(f"unknown encoding {encoding!r}")


def _unit_param(params: dict, size: int) -> int:
    unit = params["unit"]
    if unit not in (1, 2, 4, 8) or size % unit:
        raise ValueError(f"element size {unit!r} does not divide the tensor's {size} bytes")
    return unit


# zlib over byte planes


class _ZlibParts:
    """The parts of one tensor's ``zlib`` encoding: byte planes cut into ZLIB_SEGMENT pieces.

    A part under PROBE_FROM bytes is compressed right away; a larger one gets the zlib ratio
    of a sample (slices spread evenly over it) and is compressed on demand.
    """

    def __init__(self, data: bytes, unit: int, planes: Executor | None):
        matrix = np.frombuffer(data, dtype=np.uint8).reshape(-1, unit)
        self.size, self.unit, self.pool = len(data), unit, planes
        self.parts = [matrix[start : start + ZLIB_SEGMENT, k] for k in range(unit)
                      for start in range(0, matrix.shape[0], ZLIB_SEGMENT)]
        self.probes = self._map(_probe, self.parts)

    def estimate(self) -> float:
        """The bytes zlib would take by the samples' ratios (exact for small parts)."""
        return sum(min(part.size, probe.estimate) for part, probe in zip(self.parts, self.probes))

    def encode(self, limit: int | None) -> Encoded | None:
        """The encoding, or None if it saves under 2% over stored or reaches ``limit`` bytes."""
        cap = MIN_GAIN * self.size if limit is None else min(limit, MIN_GAIN * self.size)
        budget = _Budget(cap, len(self.parts))
        results = self._map(lambda i: _deflate_part(self.parts[i], self.probes[i], i, budget), range(len(self.parts)))
        if budget.exceeded() or all(codec == "stored" for codec, _ in results):
            return None
        params = {"unit": self.unit, "segment": ZLIB_SEGMENT, "parts": [[codec, len(blob)] for codec, blob in results]}
        return Encoded("zlib", params, b"".join(blob for _, blob in results))

    def _map(self, function, items) -> list:
        items = list(items)
        if self.pool is not None and len(items) > 1:
            return list(self.pool.map(function, items))
        return [function(item) for item in items]


@dataclass(frozen=True)
class _Probe:
    estimate: float  # compressed bytes, estimated from a sample or exact
    packed: bytes | None  # the whole part compressed, when it was small enough to do at once


def _probe(part: np.ndarray) -> _Probe:
    if part.size < PROBE_FROM:
        packed = _deflate(part.tobytes())
        return _Probe(len(packed), packed)
    step, width = part.size // PROBE_SLICES, min(PROBE_SLICE, part.size // (2 * PROBE_SLICES))
    sample = b"".join(part[i * step : i * step + width].tobytes() for i in range(PROBE_SLICES))
    return _Probe(part.size * len(_deflate(sample)) / len(sample), None)


def _deflater():
    return zlib.compressobj(ZLIB_LEVEL, zlib.DEFLATED, 15, 9, ZLIB_STRATEGY)


def _deflate(data: bytes) -> bytes:
    compressor = _deflater()
    return compressor.compress(data) + compressor.flush()


class _Budget:
    """The bytes the parts of one zlib encoding may take together; parts compressed in
    parallel report their output so far, and all stop once the total reaches the limit."""

    def __init__(self, limit: float, parts: int):
        self.limit = limit
        self.sizes = [0] * parts

    def spend(self, part: int, size: int) -> bool:
        """Record a part's output so far; False once the total has reached the limit."""
        self.sizes[part] = size
        return not self.exceeded()

    def exceeded(self) -> bool:
        return sum(self.sizes) >= self.limit


def _deflate_part(view: np.ndarray, probe: _Probe, index: int, budget: _Budget) -> tuple[str, bytes]:
    """A part zlib-compressed, or as it is when that saves under 2%. A large part whose sample
    does not shrink by 2% is stored without compressing the rest: the low mantissa bytes of
    float weights are noise, and deflating them is slow."""
    part = view.tobytes()
    if probe.packed is not None:
        packed = probe.packed
    elif probe.estimate >= MIN_GAIN * len(part):
        packed = None
    else:
        packed = _deflate_within(part, index, budget)
    if packed is not None and len(packed) < MIN_GAIN * len(part):
        budget.spend(index, len(packed))
        return "zlib", packed
    budget.spend(index, len(part))
    return "stored", part


def _deflate_within(part: bytes, index: int, budget: _Budget) -> bytes | None:
    """zlib of the part, or None once the budget is spent (the part would not be used)."""
    compressor = _deflater()
    pieces, size = [], 0
    for start in range(0, len(part), DEFLATE_STEP):
        pieces.append(compressor.compress(part[start : start + DEFLATE_STEP]))
        size += len(pieces[-1])
        if not budget.spend(index, min(size, len(part))):  # the part is stored if zlib does not pay
            return None
    pieces.append(compressor.flush())
    return b"".join(pieces)


def _zlib_decode(params: dict, blob: memoryview, size: int) -> bytes:
    unit = _unit_param(params, size)
    segment, parts = params["segment"], params["parts"]
    count = size // unit
    if not isinstance(segment, int) or segment < 1:
        raise ValueError(f"segment size {segment!r}")
    per_plane = -(-count // segment)
    if not isinstance(parts, list) or len(parts) != unit * per_plane:
        raise ValueError(f"{len(parts) if isinstance(parts, list) else 'no'} parts for {unit} planes of {count} bytes")
    out = np.empty((count, unit), dtype=np.uint8)
    at = 0
    for index, (codec, length) in enumerate(parts):
        if codec not in ("zlib", "stored") or not isinstance(length, int) or not 0 <= length <= len(blob) - at:
            raise ValueError(f"part {index} ({codec!r}, {length!r}) does not fit the blob")
        k, start = divmod(index, per_plane)
        start *= segment
        expected = min(segment, count - start)
        piece = blob[at : at + length]
        part = bytes(piece) if codec == "stored" else inflate(codec, piece, expected)
        if len(part) != expected:
            raise ValueError(f"part {index} holds {len(part)} bytes, not {expected}")
        out[start : start + expected, k] = np.frombuffer(part, dtype=np.uint8)
        at += length
    if at != len(blob):
        raise ValueError(f"{len(blob) - at} bytes after the last part")
    return out.tobytes()


# codebook


def _codebook_encode(units: np.ndarray) -> Encoded | None:
    found = _distinct_indices(units)
    if found is None:
        return None
    values, indices = found
    params = {"unit": units.dtype.itemsize, "values": int(values.size)}
    return Encoded("codebook", params, values.astype(units.dtype).tobytes() + huffman.encode(indices))


def _distinct_indices(units: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The sorted distinct elements and every element's index into them, or None if over 256."""
    if units.dtype.itemsize == 2:
        counts = np.zeros(1 << 16, dtype=np.int64)
        for start in range(0, units.size, COUNT_CHUNK):  # bincount widens its input to int64
            counts += np.bincount(units[start : start + COUNT_CHUNK], minlength=1 << 16)
        values = np.flatnonzero(counts)
        if values.size > MAX_CODEBOOK:
            return None
        lookup = np.zeros(1 << 16, dtype=np.uint8)
        lookup[values] = np.arange(values.size, dtype=np.uint8)
        return values.astype(units.dtype), lookup[units]
    sample = units[:: max(1, units.size // CODEBOOK_SAMPLE)]
    if np.unique(sample[:4 * MAX_CODEBOOK]).size > MAX_CODEBOOK:  # most float weights end here, cheaply
        return None
    values = np.unique(sample)
    while values.size <= MAX_CODEBOOK:
        indices = _codebook_lookup(values, units)
        missing = values[indices] != units
        if not missing.any():
            return values, indices
        # more distinct elements than the sample showed: add those among the first mismatches
        values = np.union1d(values, np.unique(units[missing][: 16 * CODEBOOK_SAMPLE]))
    return None


_HASH_BITS = 20
_HASH_MULTIPLIERS = {
    4: [np.uint32(m) for m in (0x9E3779B1, 0x85EBCA6B, 0xC2B2AE35, 0x27D4EB2F, 0x165667B1)],
    8: [np.uint64(m) for m in (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93)],
}


def _codebook_lookup(values: np.ndarray, units: np.ndarray) -> np.ndarray:
    """uint8 indices with ``values[i] == unit`` for every unit among the (sorted) values; any
    index for the others. A multiplicative hash into 2^20 slots that keeps the values apart
    makes this one table lookup per element; sorted search when no multiplier does."""
    shift = units.dtype.type(8 * units.dtype.itemsize - _HASH_BITS)
    for multiplier in _HASH_MULTIPLIERS[units.dtype.itemsize]:
        slots = (values * multiplier) >> shift
        if np.unique(slots).size == values.size:
            lookup = np.zeros(1 << _HASH_BITS, dtype=np.uint8)
            lookup[slots] = np.arange(values.size, dtype=np.uint8)
            hashed = units * multiplier
            hashed >>= shift
            return lookup[hashed]
    indices = np.searchsorted(values, units)
    np.minimum(indices, values.size - 1, out=indices)
    return indices.astype(np.uint8)


def _codebook_decode(params: dict, blob: memoryview, size: int) -> bytes:
    unit = _unit_param(params, size)
    count = params["values"]
    if not isinstance(count, int) or not 1 <= count <= MAX_CODEBOOK or unit not in (2, 4, 8):
        raise ValueError(f"codebook of {count!r} values of {unit} bytes")
    if len(blob) < count * unit:
        raise ValueError("blob shorter than its codebook")
    values = np.frombuffer(blob, dtype=f"<u{unit}", count=count)
    indices = huffman.decode(blob[count * unit :])
    if indices.size * unit != size:
        raise ValueError(f"{indices.size} indices for {size // unit} elements")
    if indices.size and int(indices.max()) >= count:
        raise ValueError(f"index {int(indices.max())} outside a codebook of {count} values")
    return values[indices].tobytes()


# sparse (relative indexing)

MAX_SKIP = 255


def _sparse_encode(units: np.ndarray, kind: Kind, planes: Executor | None, full: bool) -> Encoded:
    positions = np.flatnonzero(units)
    gaps = np.diff(positions, prepend=-1) - 1
    fillers = gaps // (MAX_SKIP + 1)
    real = np.cumsum(fillers + 1) - 1
    entries = int(real[-1]) + 1 if real.size else 0
    skips = np.full(entries, MAX_SKIP, dtype=np.uint8)
    skips[real] = gaps % (MAX_SKIP + 1)
    values = np.zeros(entries, dtype=units.dtype)
    values[real] = units[positions]
    gap_stream = huffman.encode(skips)
    inner = encodings(values.tobytes(), kind, planes, sparse=False, full=full)[1]
    params = {"unit": kind.unit, "entries": entries, "gaps": len(gap_stream),
              "values": {"encoding": inner.encoding, "params": inner.params}}
    return Encoded("sparse", params, gap_stream + inner.blob)


def _sparse_decode(params: dict, blob: memoryview, size: int) -> bytes:
    unit = _unit_param(params, size)
    entries, gap_length, inner = params["entries"], params["gaps"], params["values"]
    if not isinstance(entries, int) or not isinstance(inner, dict):
        raise ValueError(f"sparse parameters {params!r}")
    if not isinstance(gap_length, int) or not 0 <= gap_length <= len(blob):
        raise ValueError(f"counts stream length {gap_length!r} outside the blob")
    skips = huffman.decode(blob[:gap_length])
    if skips.size != entries:
        raise ValueError(f"{skips.size} counts for {entries} entries")
    if inner.get("encoding") == "sparse":
        raise ValueError("sparse values cannot be sparse again")
    values = decode(inner["encoding"], inner["params"], blob[gap_length:], entries * unit)
    if len(values) != entries * unit:
        raise ValueError(f"{len(values)} bytes of values for {entries} entries")
    count = size // unit
    dense = np.zeros(count, dtype=f"<u{unit}")
    if entries:
        positions = np.cumsum(skips.astype(np.int64) + 1) - 1
        if positions[-1] >= count:
            raise ValueError(f"entries run past the tensor's {count} elements")
        dense[positions] = np.frombuffer(values, dtype=dense.dtype)
    return dense.tobytes()


# codebook shared by scaled channels (cluster-weights{granularity=channel})

_FLOAT_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
                 onnx.TensorProto.DOUBLE: "float64"}


def scaled_codebook_encode(data: bytes, data_type: int, shape: list[int], metadata: dict[str, str]) -> Encoded | None:
    """The ``scaled-codebook`` encoding of a tensor whose metadata names its codebook, scales
    and axis and whose bytes they rebuild exactly; None otherwise."""
    name = _FLOAT_DTYPES.get(data_type)
    if name is None or CODEBOOK_KEY not in metadata:
        return None
    dtype = np.dtype(name).newbyteorder("<")
    if len(data) != dtype.itemsize * int(np.prod(shape)):
        return None
    found = from_codebook_metadata(np.frombuffer(data, dtype).reshape(shape), metadata)
    if found is None:
        return None
    blob = found.codebook.astype(dtype).tobytes() + found.scales.astype(dtype).tobytes()
    params = {"dtype": name, "shape": list(shape), "axis": found.axis, "values": int(found.codebook.size)}
    return Encoded("scaled-codebook", params, blob + huffman.encode(found.indices.ravel()))


def _scaled_codebook_decode(params: dict, blob: memoryview, size: int) -> bytes:
    name, shape, axis, count = params["dtype"], params["shape"], params["axis"], params["values"]
    if name not in _FLOAT_DTYPES.values():
        raise ValueError(f"dtype {name!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ValueError(f"shape {shape!r}")
    if not isinstance(axis, int) or not 0 <= axis < len(shape):
        raise ValueError(f"axis {axis!r} of a {len(shape)}-d tensor")
    dtype = np.dtype(name).newbyteorder("<")
    if not isinstance(count, int) or not 1 <= count <= MAX_CODEBOOK or size != dtype.itemsize * int(np.prod(shape)):
        raise ValueError(f"codebook of {count!r} values for a {shape} {name} tensor of {size} bytes")
    head = (count + shape[axis]) * dtype.itemsize
    if len(blob) < head:
        raise ValueError("blob shorter than its codebook and scales")
    codebook = np.frombuffer(blob, dtype, count=count)
    scales = np.frombuffer(blob, dtype, count=shape[axis], offset=count * dtype.itemsize)
    indices = huffman.decode(blob[head:])
    if indices.size != int(np.prod(shape)):
        raise ValueError(f"{indices.size} indices for {int(np.prod(shape))} elements")
    if indices.size and int(indices.max()) >= count:
        raise ValueError(f"index {int(indices.max())} outside a codebook of {count} values")
    return Clustered(codebook, indices.reshape(shape), scales, axis).rebuild().astype(dtype).tobytes()
