"""Canonical Huffman coding: exact round trips, near-entropy sizes, canonical codes, and a
ValueError (never wrong data, never a hang) for every malformed stream."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from onnxcompress import huffman

RNG = np.random.default_rng(20240601)


def _source(kind: str, n: int, rng=RNG) -> np.ndarray:
    if kind == "uniform":
        return rng.integers(0, 256, n, dtype=np.uint8)
    if kind == "one":
        return np.full(n, 201, dtype=np.uint8)
    if kind == "two":
        return np.where(rng.random(n) < 0.9, 3, 250).astype(np.uint8)
    if kind == "indices":  # 16 cluster indices: codes of at most 8 bits, decoded two at a time
        return np.clip(np.round(rng.normal(7.5, 3, n)), 0, 15).astype(np.uint8)
    if kind == "geometric":
        return np.minimum(rng.geometric(0.35, n), 255).astype(np.uint8)
    if kind == "long-tail":  # codes up to 16 bits: decoded one symbol at a time
        return np.minimum(rng.zipf(1.3, n), 255).astype(np.uint8)
    if kind == "all256":
        return np.tile(np.arange(256, dtype=np.uint8), -(-n // 256))[:n][rng.permutation(n)]
    raise AssertionError(kind)


KINDS = ["uniform", "one", "two", "indices", "geometric", "long-tail", "all256"]
SIZES = [0, 1, 2, 3, 63, 64, 65, 127, 1000, 4097, 100_003]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", SIZES)
def test_round_trip(kind, n):
    symbols = _source(kind, n)
    stream = huffman.encode(symbols)
    decoded = huffman.decode(stream)
    assert decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, symbols)


def test_the_round_trips_cover_both_decoders():
    """Short codes on long inputs go two symbols per step, the rest one: both are above."""
    for kind, paired in (("indices", True), ("two", True), ("geometric", False), ("long-tail", False)):
        symbols = _source(kind, 100_003)
        lengths = huffman.code_lengths(np.bincount(symbols, minlength=256))
        mean_bits = float(np.bincount(symbols, minlength=256) @ lengths) / symbols.size
        assert huffman._paired(lengths, huffman.block_size(symbols.size, mean_bits), symbols.size) == paired, kind
    block = huffman.block_size(100_003, 3.0)
    assert block % 2 == 0 and (100_003 % block) % 2 == 1


@pytest.mark.parametrize("seed", range(40))
def test_round_trip_random_alphabets(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 30_000))
    k = int(rng.integers(1, 257))
    probabilities = rng.dirichlet(np.full(k, rng.choice([0.03, 0.3, 3.0])))
    alphabet = rng.choice(256, k, replace=False).astype(np.uint8)
    symbols = alphabet[rng.choice(k, n, p=probabilities)]
    np.testing.assert_array_equal(huffman.decode(huffman.encode(symbols)), symbols)


@pytest.mark.parametrize("kind", ["indices", "long-tail", "uniform"])
def test_chunk_and_group_boundaries(kind, monkeypatch):
    """Small encoder chunks and decoder groups: codes straddle every kind of boundary."""
    monkeypatch.setattr(huffman, "ENCODE_CHUNK", 1000)
    monkeypatch.setattr(huffman, "DECODE_GROUP", 3000)
    symbols = _source(kind, 250_001)
    stream = huffman.encode(symbols)
    np.testing.assert_array_equal(huffman.decode(stream), symbols)
    monkeypatch.undo()
    assert huffman.encode(symbols) == stream  # the layout does not depend on the chunking


def test_multidimensional_input_and_buffer_types():
    symbols = _source("geometric", 6000).reshape(20, 300)
    stream = huffman.encode(symbols)
    for data in (stream, bytearray(stream), memoryview(stream)):
        np.testing.assert_array_equal(huffman.decode(data), symbols.ravel())


def test_rejects_other_dtypes():
    with pytest.raises(TypeError, match="uint8"):
        huffman.encode(np.arange(10, dtype=np.int32))


def test_empty_stream_is_the_header_only():
    assert len(huffman.encode(np.zeros(0, dtype=np.uint8))) == 12


def _table_bytes(k: int) -> int:
    return 2 * k if k <= huffman.PAIRS_UP_TO else 32 + -(-k // 2)


def test_single_symbol_gets_a_one_bit_code():
    n = 10_000
    stream = huffman.encode(np.full(n, 7, dtype=np.uint8))
    lengths = huffman.code_lengths(np.bincount(np.full(n, 7), minlength=256))
    assert lengths[7] == 1 and np.count_nonzero(lengths) == 1
    # every full block is B bits, so their lengths take 0 bits each beyond the base
    assert len(stream) == 12 + 2 + _table_bytes(1) + 10 + 3 + n // 8


def test_all_256_symbols_uniform_take_eight_bits():
    symbols = _source("all256", 256 * 400)
    lengths = huffman.code_lengths(np.bincount(symbols, minlength=256))
    assert set(lengths.tolist()) == {8}
    assert len(huffman.encode(symbols)) == 12 + 2 + _table_bytes(256) + 10 + 3 + symbols.size


def _entropy_bits(symbols: np.ndarray) -> float:
    p = np.bincount(symbols, minlength=256) / symbols.size
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum() * symbols.size)


@pytest.mark.parametrize("n", [200_000, 1_500_000])
@pytest.mark.parametrize("alphabet", [64, 200])
def test_size_within_one_percent_of_entropy(n, alphabet):
    """A skewed source (quantized Laplace, like clustered weight indices): the stream is within
    1% of the entropy bound plus the overhead (header, code lengths, block lengths)."""
    symbols = np.clip(np.round(RNG.laplace(alphabet / 2, alphabet / 12, n)), 0, alphabet - 1).astype(np.uint8)
    stream = huffman.encode(symbols)
    counts = np.bincount(symbols, minlength=256)
    blocks = -(-n // huffman.block_size(n, float(counts @ huffman.code_lengths(counts)) / n))
    k = np.count_nonzero(counts)
    overhead = 12 + 2 + _table_bytes(k) + 10 + 3 + 2 * blocks  # block lengths: at most 16 bits each
    entropy_bytes = _entropy_bits(symbols) / 8
    assert entropy_bytes <= len(stream) <= 1.01 * entropy_bytes + overhead


def _codes(lengths: np.ndarray) -> dict[int, str]:
    codes = huffman.canonical_codes(lengths)
    return {s: format(int(codes[s]), f"0{int(lengths[s])}b") for s in np.flatnonzero(lengths)}


@pytest.mark.parametrize("kind", ["geometric", "long-tail", "all256", "two"])
def test_codes_are_canonical_and_prefix_free(kind):
    lengths = huffman.code_lengths(np.bincount(_source(kind, 50_000), minlength=256))
    codes = _codes(lengths)
    order = sorted(codes, key=lambda s: (lengths[s], s))
    assert set(codes[order[0]]) == {"0"}  # the first code is all zeros
    for previous, symbol in zip(order, order[1:]):
        expected = (int(codes[previous], 2) + 1) << int(lengths[symbol] - lengths[previous])
        assert int(codes[symbol], 2) == expected
    words = sorted(codes.values())
    assert not any(b.startswith(a) for a, b in zip(words, words[1:]))
    assert sum(2.0 ** -len(c) for c in words) == 1.0  # complete


def test_code_lengths_are_optimal_for_dyadic_probabilities():
    counts = np.zeros(256, dtype=np.int64)
    counts[[10, 20, 30, 40]] = [8, 4, 2, 2]
    lengths = huffman.code_lengths(counts)
    assert lengths[[10, 20, 30, 40]].tolist() == [1, 2, 3, 3]


def test_lengths_are_limited_to_16_bits():
    counts = np.zeros(256, dtype=np.int64)
    fib = [1, 1]
    while len(fib) < 40:
        fib.append(fib[-1] + fib[-2])
    counts[:40] = fib  # unlimited Huffman would need 39-bit codes
    lengths = huffman.code_lengths(counts)
    assert lengths.max() == 16
    assert sum(2.0 ** -int(l) for l in lengths[lengths > 0]) == 1.0
    symbols = np.repeat(np.arange(40, dtype=np.uint8), [min(f, 3000) for f in fib])
    np.testing.assert_array_equal(huffman.decode(huffman.encode(symbols)), symbols)


# --------------------------------------------------------------------------- malformed streams


def _stream(n=5000, kind="geometric") -> bytes:
    return huffman.encode(_source(kind, n, np.random.default_rng(5)))


def test_every_truncation_is_an_error():
    stream = _stream(3000)
    for cut in range(len(stream)):
        with pytest.raises(ValueError):
            huffman.decode(stream[:cut])


def test_trailing_bytes_are_an_error():
    with pytest.raises(ValueError, match="trailing"):
        huffman.decode(_stream() + b"\0")
    with pytest.raises(ValueError, match="trailing"):
        huffman.decode(huffman.encode(np.zeros(0, np.uint8)) + b"x")


@pytest.mark.parametrize("kind, n", [("indices", 40_000), ("geometric", 700), ("long-tail", 700), ("one", 700)])
def test_every_flipped_byte_is_an_error(kind, n):
    stream = bytearray(_stream(n, kind))
    for at in range(0, len(stream), max(1, len(stream) // 600)):
        bad = bytearray(stream)
        bad[at] ^= 0x5A
        with pytest.raises(ValueError):
            huffman.decode(bytes(bad))


def _with_table(pairs: list[tuple[int, int]], payload: bytes = b"\0", n: int = 1) -> bytes:
    table = struct.pack("<H", len(pairs)) + b"".join(bytes(p) for p in pairs)
    return struct.pack("<QI", n, 0) + table + struct.pack("<HQ", 64, 8 * len(payload)) + payload


@pytest.mark.parametrize(
    "pairs, message",
    [
        ([(1, 1), (2, 1), (3, 1)], "oversubscribed"),
        ([(1, 1), (2, 2)], "incomplete"),
        ([(1, 17), (2, 1)], "exceeds 16"),
        ([(1, 0), (2, 1)], "length 0"),
        ([(2, 1), (1, 1)], "out of order"),
        ([(1, 2)], "one symbol"),
    ],
)
def test_bad_code_lengths(pairs, message):
    with pytest.raises(ValueError, match=message):
        huffman.decode(_with_table(pairs))


def test_bad_bitmap_table():
    stream = bytearray(huffman.encode(_source("uniform", 5000)))
    stream[14] ^= 0x80  # unflag symbol 0: the bitmap no longer counts k symbols
    with pytest.raises(ValueError, match="flags 255 symbols"):
        huffman.decode(bytes(stream))


def test_bad_symbol_count_and_block_size():
    head = struct.pack("<QI", 5, 0)
    with pytest.raises(ValueError, match="distinct symbols"):
        huffman.decode(head + struct.pack("<H", 0))
    with pytest.raises(ValueError, match="distinct symbols"):
        huffman.decode(head + struct.pack("<H", 300) + bytes(256))
    with pytest.raises(ValueError, match="block size"):
        huffman.decode(head + struct.pack("<H", 2) + bytes([1, 1, 2, 1]) + struct.pack("<HQ", 0, 5))


def test_block_lengths_that_do_not_match_the_codes(monkeypatch):
    symbols = _source("geometric", 5000, np.random.default_rng(2))
    table = huffman._block_bits_table

    def shifted(block_bits):  # one bit moved from block 0 to block 1: the same total
        block_bits = block_bits.copy()
        block_bits[0] += 1
        block_bits[1] -= 1
        return table(block_bits)

    monkeypatch.setattr(huffman, "_block_bits_table", shifted)
    stream = huffman.encode(symbols)
    with pytest.raises(ValueError, match="do not end where the next block starts"):
        huffman.decode(stream)


def test_block_lengths_over_the_total():
    stream = bytearray(huffman.encode(_source("geometric", 5000)))
    k = np.count_nonzero(np.bincount(_source("geometric", 5000), minlength=256))
    at = 12 + 2 + _table_bytes(k) + 2
    total = struct.unpack_from("<Q", stream, at)[0]
    struct.pack_into("<Q", stream, at, total // 2)
    with pytest.raises(ValueError):
        huffman.decode(bytes(stream))


def test_crc_mismatch():
    stream = bytearray(_stream())
    stream[8] ^= 1
    with pytest.raises(ValueError, match="CRC"):
        huffman.decode(bytes(stream))
