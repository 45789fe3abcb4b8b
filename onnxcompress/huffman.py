"""Canonical Huffman coding of byte symbols, vectorised with numpy.

``encode(symbols)`` turns a uint8 array into a self-describing stream and ``decode(stream)``
turns it back. Neither loops over the symbols in Python: encoding lays the codes out with
whole-array operations, chunk by chunk (memory stays bounded for 100M-symbol tensors);
decoding splits the symbols into blocks of ``B`` whose starting bit offsets are in the stream
and decodes every block at once, one table lookup per position inside a block (per pair of
positions when codes are short). Large inputs are split among a few threads.

Stream format (integers little-endian)::

    offset   size        field
    0        8           n: number of symbols (u64)
    8        4           CRC-32 of the n symbols (zlib.crc32); checked by decode
    -- the rest is present only when n > 0 --
    12       2           k: number of distinct symbols (u16, 1..256)
    14       T           the code lengths (1..16) of the symbols present, in one of two forms,
                         whichever is smaller for k (pairs when k <= 21):
                         pairs: k times (symbol u8, length u8), in increasing symbol order, T = 2k;
                         bitmap: 32 bytes flagging the symbols present (bit 7 of byte 0 is
                         symbol 0), then length - 1 of each, 4 bits apiece, high nibble first,
                         T = 32 + ceil(k / 2)
    14+T     2           B: symbols per block (u16, 1..4094); nb = ceil(n / B) blocks, all of
                         B symbols but the last, which holds n - (nb - 1) * B
    16+T     8           S: total bits of the codes (u64)
    -- block lengths, only when nb > 1 --
    24+T     2           base: the smallest bit length among blocks 0..nb-2 (u16)
    26+T     1           w: bits per length difference (u8, 0..16)
    27+T     D           bit length - base of blocks 0..nb-2, w bits each, most significant
                         bit first, D = ceil((nb - 1) * w / 8); the last block has the rest of S
    ...      ceil(S/8)   the codes, most significant bit first, block after block; the last
                         byte is padded with zero bits

Codes are canonical: symbols sorted by (length, symbol) get consecutive codes, the first
being all zeros, each next code ``(code + 1) << (its length - previous length)``. The lengths
must form a complete prefix code (Kraft sum exactly 1), except that a single distinct symbol
has the one code ``0`` (length 1). Lengths are limited to 16 bits by halving the symbol
frequencies (``f = max(1, f >> 1)``) until the Huffman code fits.

A malformed stream (truncated, trailing bytes, impossible lengths, blocks whose codes do not
end where the next block starts, a CRC mismatch) raises ``ValueError``.
"""

from __future__ import annotations

import heapq
import os
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np

MAX_CODE_LENGTH = 16
MAX_BLOCK = 4094  # a block's bit length, at most MAX_BLOCK * 16, must fit a u16
# Decoding costs a fixed ~14 us per position inside a block (one vectorised step over all
# blocks), so short blocks decode faster, while each block's bit length costs a few more bits
# in the stream. Blocks of about BLOCK_BITS code bits keep that table at 1-2% of the stream:
# mobilenet_v2 with 256 shared values (7-bit codes, ~70-symbol blocks) unpacks about 1.5x as
# fast as with blocks of n / 256 symbols, for 1% more bytes.
BLOCK_BITS = 512
BLOCK_FROM, BLOCK_UP_TO = 32, 1024
PAIRS_UP_TO = 21  # distinct symbols up to which (symbol, length) pairs beat the bitmap table
PAIRS_FROM = 1 << 15  # symbols from which pairs are coded together
ENCODE_CHUNK = 1 << 20  # symbols laid out per step of the encoder
DECODE_GROUP = 1 << 23  # symbols decoded per step of the decoder (bounds its memory)
MIN_GROUP = 4096  # blocks decoded together at least: shorter vectors cost more than a thread gains
WORKERS = max(1, min(4, os.cpu_count() or 1))

_COUNT = struct.Struct("<QI")
_U16 = struct.Struct("<H")
_BLOCKS = struct.Struct("<HQ")
_SPREAD = struct.Struct("<HB")


def block_size(n: int, mean_bits: float) -> int:
    """Symbols per decoding block for ``n`` symbols of codes ``mean_bits`` long on average:
    about BLOCK_BITS code bits, within [32, 1024] and at most ``n / 32`` when that is more
    than 32; even, so that short codes can be decoded two at a time."""
    wanted = BLOCK_BITS / max(mean_bits, 1.0)
    return int(np.clip(min(wanted, max(n // 32, BLOCK_FROM)), BLOCK_FROM, BLOCK_UP_TO)) & ~1


def encode(symbols: np.ndarray) -> bytes:
    """The Huffman stream of a uint8 array (flattened in C order)."""
    symbols = np.asarray(symbols)
    if symbols.dtype != np.uint8:
        raise TypeError(f"huffman.encode takes uint8 symbols, not {symbols.dtype}")
    symbols = np.ascontiguousarray(symbols).reshape(-1)
    n = symbols.size
    head = _COUNT.pack(n, zlib.crc32(symbols))
    if n == 0:
        return head
    counts = _counts(symbols, ENCODE_CHUNK)
    lengths = code_lengths(np.sum(counts, axis=0))
    block = block_size(n, float(np.sum(counts, axis=0) @ lengths) / n)
    chunk = block * max(1, ENCODE_CHUNK // block)
    # recounted only when the chunks differ: below ENCODE_CHUNK symbols both are one chunk
    chunk_counts = counts if chunk == ENCODE_CHUNK or n <= chunk else _counts(symbols, chunk)
    codes = canonical_codes(lengths)
    payload, block_bits = _lay_out_codes(symbols, codes, lengths, block, chunk, chunk_counts)
    return b"".join([head, _length_table(lengths), _BLOCKS.pack(block, int(block_bits.sum())),
                     _block_bits_table(block_bits), payload])


def _counts(symbols: np.ndarray, chunk: int) -> list[np.ndarray]:
    """Each chunk's symbol counts (chunk by chunk: bincount widens its input to int64)."""
    return _parallel(lambda start: np.bincount(symbols[start : start + chunk], minlength=256),
                     range(0, symbols.size, chunk))


def decode(data: bytes | bytearray | memoryview) -> np.ndarray:
    """The uint8 symbols of a Huffman stream; ``ValueError`` if the stream is malformed."""
    view = memoryview(data).cast("B")
    if len(view) < _COUNT.size:
        raise ValueError(f"huffman stream truncated: {len(view)} bytes, the header alone needs {_COUNT.size}")
    n, crc = _COUNT.unpack_from(view, 0)
    if n == 0:
        if len(view) != _COUNT.size:
            raise ValueError(f"huffman stream of 0 symbols has {len(view) - _COUNT.size} trailing bytes")
        return np.zeros(0, dtype=np.uint8)
    lengths, at = _read_length_table(view, _COUNT.size)
    if len(view) - at < _BLOCKS.size:
        raise ValueError("huffman stream truncated before its block size")
    block, total_bits = _BLOCKS.unpack_from(view, at)
    if not 1 <= block <= MAX_BLOCK:
        raise ValueError(f"huffman block size {block} is out of range 1..{MAX_BLOCK}")
    # bounds before anything is allocated: every symbol takes a bit, every bit is in the stream
    if total_bits > 8 * len(view):
        raise ValueError(f"huffman stream truncated: {total_bits} code bits in a {len(view)}-byte stream")
    if n > total_bits:
        raise ValueError(f"huffman stream corrupt: {n} symbols in {total_bits} code bits")
    offsets, at = _read_block_offsets(view, at + _BLOCKS.size, -(-n // block), total_bits)
    payload = np.frombuffer(view, dtype=np.uint8, offset=at)
    if payload.size != -(-total_bits // 8):
        what = "truncated" if payload.size < -(-total_bits // 8) else "followed by trailing bytes"
        raise ValueError(f"huffman stream {what}: {payload.size} code bytes for {total_bits} bits")
    if np.count_nonzero(lengths) == 1:
        symbols = _decode_single_symbol(n, lengths, block, offsets, payload)
    else:
        symbols = _decode_blocks(n, block, offsets, payload, lengths)
    if zlib.crc32(symbols) != crc:
        raise ValueError("huffman stream corrupt: the decoded symbols do not match their CRC-32")
    return symbols


def code_lengths(counts: np.ndarray, limit: int = MAX_CODE_LENGTH) -> np.ndarray:
    """Huffman code lengths (uint8, 0 for absent symbols) for 256 symbol counts, at most ``limit`` bits."""
    freqs = np.asarray(counts, dtype=np.int64).copy()
    present = np.flatnonzero(freqs)
    lengths = np.zeros(freqs.size, dtype=np.uint8)
    if present.size == 1:
        lengths[present] = 1
    elif present.size > 1:
        while True:
            found = _huffman_lengths(freqs[present].tolist())
            if max(found) <= limit:
                break
            freqs[present] = np.maximum(1, freqs[present] >> 1)
        lengths[present] = found
    return lengths


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """The canonical code (uint64, right-aligned) of every symbol with a nonzero length."""
    lengths = np.asarray(lengths)
    codes = np.zeros(lengths.size, dtype=np.uint64)
    order = _canonical_order(lengths)
    if order.size:
        # in canonical order, a code is the Kraft sum of the codes before it, read at its length
        room = lengths[order].max().astype(np.uint64) - lengths[order].astype(np.uint64)
        span = np.uint64(1) << room
        codes[order] = (np.cumsum(span) - span) >> room
    return codes


def _canonical_order(lengths: np.ndarray) -> np.ndarray:
    """The symbols with a code, sorted by (length, symbol): the order of their canonical codes."""
    order = np.lexsort((np.arange(lengths.size), lengths))
    return order[lengths[order] > 0]


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _parallel(function, items) -> list:
    """``[function(item) for item in items]``, on a shared thread pool when there are several
    (numpy releases the GIL inside its loops)."""
    items = list(items)
    if len(items) < 2 or WORKERS < 2:
        return [function(item) for item in items]
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(WORKERS, thread_name_prefix="huffman")
    return list(_POOL.map(function, items))


def _huffman_lengths(freqs: list[int]) -> list[int]:
    """Huffman code lengths for the frequencies; ties broken by position, so deterministic."""
    heap = [(f, i) for i, f in enumerate(freqs)]
    heapq.heapify(heap)
    parent = list(range(len(freqs)))
    next_id = len(freqs)
    while len(heap) > 1:
        fa, a = heapq.heappop(heap)
        fb, b = heapq.heappop(heap)
        parent.append(next_id)
        parent[a] = parent[b] = next_id
        heapq.heappush(heap, (fa + fb, next_id))
        next_id += 1
    depth = [0] * next_id
    for node in range(next_id - 2, -1, -1):  # parents have larger ids than their children
        depth[node] = depth[parent[node]] + 1
    return depth[: len(freqs)]


def _length_table(lengths: np.ndarray) -> bytes:
    present = np.flatnonzero(lengths)
    head = _U16.pack(present.size)
    if present.size <= PAIRS_UP_TO:
        return head + np.stack([present.astype(np.uint8), lengths[present]], axis=1).tobytes()
    nibbles = lengths[present] - 1
    if nibbles.size % 2:
        nibbles = np.append(nibbles, 0)
    return head + np.packbits(lengths > 0).tobytes() + (nibbles[0::2] << 4 | nibbles[1::2]).astype(np.uint8).tobytes()


def _read_length_table(view: memoryview, at: int) -> tuple[np.ndarray, int]:
    k, at = _read_u16(view, at, "symbol count")
    if not 1 <= k <= 256:
        raise ValueError(f"huffman stream names {k} distinct symbols (1..256 allowed)")
    size = 2 * k if k <= PAIRS_UP_TO else 32 + -(-k // 2)
    if len(view) - at < size:
        raise ValueError("huffman stream truncated in its code-length table")
    raw = np.frombuffer(view, dtype=np.uint8, count=size, offset=at)
    lengths = np.zeros(256, dtype=np.uint8)
    if k <= PAIRS_UP_TO:
        symbols, found = raw[0::2], raw[1::2]
        if np.any(np.diff(symbols.astype(np.int16)) <= 0):
            raise ValueError("huffman code-length table lists symbols out of order")
        if np.any(found == 0):
            raise ValueError("huffman code-length table lists a symbol with length 0")
        lengths[symbols] = found
    else:
        present = np.flatnonzero(np.unpackbits(raw[:32]))
        if present.size != k:
            raise ValueError(f"huffman code-length table flags {present.size} symbols, its header says {k}")
        nibbles = np.stack([raw[32:] >> 4, raw[32:] & 15], axis=1).reshape(-1)
        lengths[present] = nibbles[:k] + 1
    _check_lengths(lengths)
    return lengths, at + size


def _block_bits_table(block_bits: np.ndarray) -> bytes:
    """All but the last block's bit lengths, as differences from their minimum in w bits each."""
    heads = block_bits[:-1]
    if heads.size == 0:
        return b""
    base = int(heads.min())
    spread = heads - base
    width = int(spread.max()).bit_length()
    bits = np.unpackbits(spread.astype(">u2").view(np.uint8)).reshape(-1, 16)[:, 16 - width :]
    return _SPREAD.pack(base, width) + np.packbits(bits.reshape(-1)).tobytes()


def _read_block_offsets(view: memoryview, at: int, blocks: int, total_bits: int) -> tuple[np.ndarray, int]:
    """The bit offset of every block and of the end (``blocks + 1`` values)."""
    offsets = np.zeros(blocks + 1, dtype=np.int64)
    offsets[-1] = total_bits
    if blocks == 1:
        return offsets, at
    if len(view) - at < _SPREAD.size:
        raise ValueError("huffman stream truncated before its block lengths")
    base, width = _SPREAD.unpack_from(view, at)
    at += _SPREAD.size
    if width > 16:
        raise ValueError(f"huffman block lengths of {width} bits")
    size = -(-(blocks - 1) * width // 8)
    if len(view) - at < size:
        raise ValueError(f"huffman stream truncated: {blocks} block lengths do not fit in {len(view) - at} bytes")
    all_bits = np.unpackbits(np.frombuffer(view, dtype=np.uint8, count=size, offset=at))
    if all_bits[(blocks - 1) * width :].any():
        raise ValueError("huffman block lengths table has nonzero padding bits")
    bits = all_bits[: (blocks - 1) * width]
    spread = bits.reshape(blocks - 1, width).astype(np.int64) @ (1 << np.arange(width - 1, -1, -1, dtype=np.int64))
    np.cumsum(spread + base, out=offsets[1:-1])
    if offsets[-2] > total_bits:
        raise ValueError(f"huffman block lengths add up to more than the stream's {total_bits} bits")
    return offsets, at + size


def _check_lengths(lengths: np.ndarray) -> None:
    used = lengths[lengths > 0].astype(np.int64)
    if used.max() > MAX_CODE_LENGTH:
        raise ValueError(f"huffman code length {int(used.max())} exceeds {MAX_CODE_LENGTH}")
    if used.size == 1:
        if used[0] != 1:
            raise ValueError("huffman stream with one symbol must give it length 1")
        return
    kraft = int(np.sum(np.left_shift(1, MAX_CODE_LENGTH - used)))
    if kraft != 1 << MAX_CODE_LENGTH:
        state = "oversubscribed" if kraft > 1 << MAX_CODE_LENGTH else "incomplete"
        raise ValueError(f"huffman code lengths form an {state} prefix code")


def _read_u16(view: memoryview, at: int, what: str) -> tuple[int, int]:
    if len(view) - at < _U16.size:
        raise ValueError(f"huffman stream truncated before its {what}")
    return _U16.unpack_from(view, at)[0], at + _U16.size


def _lay_out_codes(symbols: np.ndarray, codes: np.ndarray, lengths: np.ndarray, block: int, chunk: int,
                   chunk_counts: list[np.ndarray]) -> tuple[bytes, np.ndarray]:
    """The concatenated codes (bytes) and the bit length of every block of ``block`` symbols,
    laid out ``chunk`` symbols at a time (``chunk_counts``: each chunk's symbol counts).

    When no code is longer than 8 bits and blocks have an even length, symbols go two at a
    time: a pair's code (at most 16 bits) comes from a 65536-entry table, halving the work.
    Chunks of symbols are laid out in parallel, each at the bit where the previous ones end
    (known from the chunks' symbol counts), and joined in order.
    """
    items = _CodeItems(codes, lengths, paired=_paired(lengths, block, symbols.size))
    per_block = block // 2 if items.paired else block
    starts = range(0, symbols.size, chunk)
    chunk_bits = [int(counts @ lengths.astype(np.int64)) for counts in chunk_counts]
    first_bits = np.concatenate(([0], np.cumsum(chunk_bits)))

    def lay_out(i: int) -> tuple[np.ndarray, np.ndarray]:
        code, lens = items.of(symbols[starts[i] : starts[i] + chunk])
        ends = np.cumsum(lens, dtype=np.uint32)
        block_ends = ends[per_block - 1 :: per_block].astype(np.int64)
        bits = [np.diff(block_ends, prepend=0)]
        if lens.size % per_block:
            bits.append(ends[-1:].astype(np.int64) - (block_ends[-1] if block_ends.size else 0))
        words, _ = _pack_words(code, lens, ends, int(first_bits[i]) & 15)
        return words, np.concatenate(bits)

    parts, block_bits, carry = [], [], np.uint32(0)
    window = 2 * WORKERS  # chunks in flight: bounds the memory
    for first in range(0, len(starts), window):
        batch = range(first, min(first + window, len(starts)))
        for i, (words, bits) in zip(batch, _parallel(lay_out, batch)):
            words[0] += carry  # the previous chunk's last, partial word
            end = (int(first_bits[i]) & 15) + int(chunk_bits[i])
            parts.append(words[: end >> 4].astype(">u2").tobytes())
            carry = words[end >> 4]
            block_bits.append(bits)
    total = int(first_bits[-1])
    if total & 15:
        parts.append(np.array([carry], dtype=">u2").tobytes())
    return b"".join(parts)[: -(-total // 8)], np.concatenate(block_bits)


def _paired(lengths: np.ndarray, block: int, n: int) -> bool:
    """Whether to code two symbols at a time: codes of at most 8 bits, even blocks, and
    enough symbols to pay for the 65536-entry pair tables."""
    return int(lengths.max()) <= 8 and block % 2 == 0 and n >= PAIRS_FROM


class _CodeItems:
    """Codes and lengths (uint32) of the symbols, one by one or in pairs."""

    def __init__(self, codes: np.ndarray, lengths: np.ndarray, paired: bool):
        self.paired = paired
        self.code = codes.astype(np.uint32)
        self.length = lengths.astype(np.uint32)
        if paired:  # pair (a, b) at index a << 8 | b
            self.pair_code = ((self.code[:, None] << self.length[None, :]) | self.code[None, :]).reshape(-1)
            self.pair_length = (self.length[:, None] + self.length[None, :]).reshape(-1)

    def of(self, piece: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not self.paired:
            return self.code[piece], self.length[piece]
        even = piece.size & ~1
        pairs = piece[:even].view(">u2")
        code, lens = self.pair_code[pairs], self.pair_length[pairs]
        if piece.size > even:
            code = np.append(code, self.code[piece[-1]])
            lens = np.append(lens, self.length[piece[-1]])
        return code, lens


def _pack_words(code: np.ndarray, lens: np.ndarray, ends: np.ndarray, first: int) -> tuple[np.ndarray, int]:
    """16-bit words (in uint32) holding the codes from bit ``first`` of the first word on
    (the bits before are zero), and the bit where the codes end.

    Each code (at most 16 bits) is shifted to its place in the 32-bit window that starts at
    its 16-bit word: the high half lands in that word, the low half in the next. Codes do not
    overlap, so adding them up per start word gives the OR of both halves without carries.
    Every word has a code starting in it (no code is longer than a word), so ``reduceat``
    over the runs of equal start words yields all words in order.
    """
    starts = ends - lens
    starts += first
    shift = np.bitwise_and(starts, 15)
    np.subtract(32, shift, out=shift)
    shift -= lens
    shifted = code << shift
    starts >>= 4
    runs = np.flatnonzero(starts[1:] != starts[:-1])
    runs += 1
    runs = np.concatenate(([0], runs))
    sums = np.add.reduceat(shifted, runs)
    words = np.zeros(runs.size + 1, dtype=np.uint32)
    words[:-1] = sums >> 16
    words[1:] += sums & 0xFFFF
    return words, first + int(ends[-1])


def _decode_single_symbol(n: int, lengths: np.ndarray, block: int, offsets: np.ndarray,
                          payload: np.ndarray) -> np.ndarray:
    """One distinct symbol: its code is the single bit 0, so block i starts at bit i * B."""
    if not np.array_equal(offsets, np.minimum(np.arange(offsets.size, dtype=np.int64) * block, n)):
        raise ValueError("huffman stream of one symbol has block lengths other than one bit per symbol")
    if np.any(payload):
        raise ValueError("huffman stream of one symbol has a code other than 0")
    return np.full(n, np.flatnonzero(lengths)[0], dtype=np.uint8)


class _DecodeTable:
    """Lookup table over the next ``width`` bits of a stream: the one symbol (or, when every
    code is at most 8 bits, the two symbols) they start with.

    Entry layout (uint32): bits 0-7 the first symbol, 8-15 the second, 16-23 the first
    symbol's code length, 24-31 the length of all the symbols the entry decodes.
    """

    def __init__(self, lengths: np.ndarray, block: int, n: int):
        longest = int(lengths.max())
        # canonical codes in (length, symbol) order fill the table in consecutive runs, one of
        # 2^(longest - length) entries per symbol (all of it but for a lone symbol's code 0)
        order = _canonical_order(lengths)
        entry = order.astype(np.uint32) | lengths[order].astype(np.uint32) * np.uint32(1 << 16 | 1 << 24)
        runs = np.repeat(entry, 1 << (longest - lengths[order].astype(np.int64)))
        single = np.zeros(1 << longest, dtype=np.uint32)
        single[: runs.size] = runs
        self.per_step = 2 if _paired(lengths, block, n) else 1
        if self.per_step == 1:
            self.table, self.width = single, longest
            return
        self.width = 2 * longest
        patterns = np.arange(1 << self.width, dtype=np.uint32)
        head = single[patterns >> longest]
        head_length = (head >> 16) & 0xFF
        tail = single[(patterns >> (longest - head_length)) & ((1 << longest) - 1)]
        self.table = (head & 0xFF) | (tail & 0xFF) << 8 | head_length << 16 | (head_length + (tail >> 24)) << 24


def _decode_blocks(n: int, block: int, offsets: np.ndarray, payload: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    table = _DecodeTable(lengths, block, n)
    blocks = offsets.size - 1
    out = np.empty((blocks, block), dtype=np.uint8)
    # groups of blocks decoded in parallel: at least MIN_GROUP blocks (shorter vectors cost
    # more than a second thread gains), at most DECODE_GROUP symbols (bounds the memory)
    group = min(max(MIN_GROUP, -(-blocks // WORKERS)), max(1, DECODE_GROUP // block))
    last_count = n - (blocks - 1) * block

    def decode_group(first: int) -> None:
        stop = min(first + group, blocks)
        out[first:stop] = _decode_group(offsets[first : stop + 1], payload, table, block,
                                        last_count if stop == blocks else block)

    _parallel(decode_group, range(0, blocks, group))
    return out.reshape(-1)[:n]


def _byte_windows(data: np.ndarray) -> np.ndarray:
    """uint32 ``w[i] = data[i] << 24 | data[i+1] << 16 | data[i+2] << 8 | data[i+3]``."""
    windows = data[:-3].astype(np.uint32) << 24
    for k, shift in ((1, 16), (2, 8)):
        windows |= data[k : data.size - 3 + k].astype(np.uint32) << shift
    windows |= data[3:]
    return windows


def _decode_group(offsets: np.ndarray, payload: np.ndarray, table: _DecodeTable, block: int,
                  last_count: int) -> np.ndarray:
    """Decode the blocks starting at ``offsets[:-1]`` (the last one holding ``last_count``
    symbols) together: step j decodes the j-th symbol (or pair) of every block with one
    table lookup.

    ``windows[i]`` holds bytes i..i+3 as a big-endian 32-bit number; ``width + 7 <= 32`` bits
    of a window are enough for the table's width at any bit phase. Zero padding past the
    end lets the last block run on to B symbols harmlessly.
    """
    low = int(offsets[0]) >> 3
    high = -(-int(offsets[-1]) // 8)
    pad = (block * MAX_CODE_LENGTH) // 8 + 8
    padded = np.zeros(high - low + pad, dtype=np.uint8)
    padded[: high - low] = payload[low:high]
    windows = _byte_windows(padded)
    pos = offsets[:-1] - low * 8
    ends = offsets[1:] - low * 8
    count, per_step = pos.size, table.per_step
    steps = block // per_step
    out = np.empty((steps, count), dtype=np.uint8 if per_step == 1 else "<u2")
    index = np.empty(count, dtype=np.int64)
    phase = np.empty(count, dtype=np.uint32)
    window = np.empty(count, dtype=np.uint32)
    entry = np.empty(count, dtype=np.uint32)
    drop = np.uint32(32 - table.width)
    last_step = (last_count - 1) // per_step
    last_end = None
    for j in range(steps):
        np.right_shift(pos, 3, out=index)
        windows.take(index, out=window)
        np.bitwise_and(pos, 7, out=phase, casting="unsafe")
        np.left_shift(window, phase, out=window)
        np.right_shift(window, drop, out=window)
        table.table.take(window, out=entry)
        np.copyto(out[j], entry, casting="unsafe")
        if j == last_step and last_count % per_step:  # the block ends after this pair's first symbol
            last_end = int(pos[-1]) + int((entry[-1] >> 16) & 0xFF)
        pos += entry >> 24
        if j == last_step and last_end is None:
            last_end = int(pos[-1])
    if last_end != int(ends[-1]) or not np.array_equal(pos[:-1], ends[:-1]):
        raise ValueError("huffman stream corrupt: a block's codes do not end where the next block starts")
    return np.ascontiguousarray(out.T).view(np.uint8)
