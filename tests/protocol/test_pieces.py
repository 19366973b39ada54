"""Piece size policy, piece tables (blake3 per piece) and bitmaps."""

from __future__ import annotations

import itertools
import os

from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.pieces import (
    MiB,
    PieceHasher,
    PiecePolicy,
    PieceTable,
    PieceTableError,
    bitmap_from_bytes,
    bitmap_full,
    bitmap_indices,
    bitmap_ranges,
    bitmap_to_bytes,
    nth_set_bit,
    piece_count,
    piece_hash,
    piece_size_for,
    piece_span,
)

GiB = 1024 * MiB


# -- policy ------------------------------------------------------------------------------


def test_layers_up_to_512_mib_use_1_mib_pieces() -> None:
    assert piece_size_for(0) == 1 * MiB
    assert piece_size_for(1) == 1 * MiB
    assert piece_size_for(64 * MiB) == 1 * MiB  # the testbed's layers: 64 pieces
    assert piece_size_for(512 * MiB) == 1 * MiB
    assert piece_size_for(512 * MiB + 1) == 2 * MiB
    assert piece_size_for(1 * GiB) == 2 * MiB


def test_piece_size_grows_to_keep_at_most_512_pieces_then_caps_at_16_mib() -> None:
    assert piece_size_for(1 * GiB + 1) == 4 * MiB
    # Kraken's benchmark image: 3 GB in 2 layers of 1.5 GB -> 358 pieces of 4 MiB each.
    assert piece_size_for(1_500_000_000) == 4 * MiB
    assert piece_count(1_500_000_000, 4 * MiB) == 358
    assert piece_size_for(2 * GiB + 1) == 8 * MiB
    assert piece_size_for(4 * GiB + 1) == 16 * MiB
    assert piece_size_for(100 * GiB) == 16 * MiB
    for size in (1, 300 * MiB, 600 * MiB, 1 * GiB + 1, 3 * GiB, 8 * GiB):
        assert piece_count(size, piece_size_for(size)) <= 512


def test_a_policy_is_a_value_that_can_be_changed() -> None:
    policy = PiecePolicy(min_size=1 * MiB, max_size=2 * MiB, target_count=10)
    assert piece_size_for(5 * MiB, policy) == 1 * MiB
    assert piece_size_for(11 * MiB, policy) == 2 * MiB
    assert piece_size_for(100 * MiB, policy) == 2 * MiB


def test_last_piece_is_short_and_spans_tile_the_blob() -> None:
    size, psize = 10 * MiB + 3, 4 * MiB
    spans = [piece_span(i, size, psize) for i in range(piece_count(size, psize))]
    assert spans == [(0, 4 * MiB), (4 * MiB, 4 * MiB), (8 * MiB, 2 * MiB + 3)]
    for bad in (-1, 3):
        try:
            piece_span(bad, size, psize)
        except IndexError:
            continue
        raise AssertionError(f"piece {bad} should be outside")


# -- tables --------------------------------------------------------------------------------


def test_verify_accepts_the_piece_and_rejects_a_flipped_byte_or_wrong_length() -> None:
    blob = os.urandom(9 * 1024)
    table = PieceTable.from_bytes(blob, piece_size=4096)
    assert table.count == 3
    for i in range(3):
        off, n = table.span(i)
        assert table.verify(i, blob[off : off + n])
    piece = bytearray(blob[4096:8192])
    piece[100] ^= 1
    assert not table.verify(1, bytes(piece))
    assert not table.verify(0, blob[4096:8192])  # a real piece, in the wrong place
    assert not table.verify(2, blob[8192:] + b"x")
    assert not table.verify(3, b"")
    assert not table.verify(-1, b"")


def test_hasher_reports_each_piece_in_the_chunk_that_completes_it() -> None:
    blob = os.urandom(10_000)
    hasher = PieceHasher(len(blob), 4096)
    assert hasher.feed(blob[:4000]) == []
    done = hasher.feed(blob[4000:8200])
    assert [i for i, _ in done] == [0, 1]
    assert done[1][1] == piece_hash(blob[4096:8192])
    partial = hasher.partial()
    assert partial.known == 0b011 and not partial.complete
    assert [i for i, _ in hasher.feed(blob[8200:])] == [2]
    assert hasher.finish() == PieceTable.from_bytes(blob, 4096)


def test_hasher_refuses_too_many_or_too_few_bytes() -> None:
    hasher = PieceHasher(10, 4)
    hasher.feed(b"12345")
    for action in (lambda: hasher.finish(), lambda: hasher.feed(b"123456")):
        try:
            action()
        except ValueError:
            continue
        raise AssertionError("should refuse")


@settings(max_examples=60, deadline=None)
@given(
    blob=st.binary(max_size=3000),
    psize=st.integers(1, 700),
    cuts=st.lists(st.integers(0, 3000), max_size=8),
)
def test_any_chunking_gives_the_same_table(blob: bytes, psize: int, cuts: list[int]) -> None:
    hasher = PieceHasher(len(blob), psize)
    reported = []
    prev = 0
    for cut in [*sorted(c for c in cuts if c <= len(blob)), len(blob)]:
        reported.extend(hasher.feed(blob[prev:cut]))
        prev = cut
    table = hasher.finish()
    assert [i for i, _ in reported] == list(range(table.count))
    assert table.hashes == tuple(h for _, h in reported)
    assert table == PieceTable.from_bytes(blob, psize)


@st.composite
def tables(draw: st.DrawFn) -> PieceTable:
    psize = draw(st.integers(1, 1 << 24))
    count = draw(st.integers(0, 40))
    size = 0 if count == 0 else (count - 1) * psize + draw(st.integers(1, psize))
    known = draw(st.lists(st.booleans(), min_size=count, max_size=count))
    hashes = tuple(draw(st.binary(min_size=32, max_size=32)) if k else None for k in known)
    return PieceTable(size, psize, hashes)


@given(tables())
def test_tables_round_trip_through_their_encoding(table: PieceTable) -> None:
    data = table.encode()
    assert PieceTable.decode(data) == table
    # Any truncation or extension is an error value, never an exception or a wrong table.
    for cut in {0, 1, len(data) // 2, len(data) - 1}:
        if cut < len(data):
            assert isinstance(PieceTable.decode(data[:cut]), PieceTableError)
    assert isinstance(PieceTable.decode(data + b"\0"), PieceTableError)


@given(st.binary(max_size=400))
def test_decoding_garbage_returns_an_error_value(data: bytes) -> None:
    result = PieceTable.decode(data)
    assert isinstance(result, PieceTable | PieceTableError)


def test_decoding_rejects_a_table_with_inconsistent_sizes_or_a_bad_bitmap() -> None:
    good = PieceTable(10, 4, (b"a" * 32, None, b"c" * 32)).encode()
    lying_count = good[:17] + (4).to_bytes(4, "big") + good[21:]
    assert PieceTable.decode(lying_count) == PieceTableError("inconsistent sizes")
    stray_bit = good[:21] + bytes([good[21] | 0x80]) + good[22:]
    assert PieceTable.decode(stray_bit) == PieceTableError("bad known-pieces bitmap")
    assert PieceTable.decode(b"XYZ" + good[3:]) == PieceTableError("not a piece table")
    assert PieceTable.decode(good[:3] + b"\x09" + good[4:]) == PieceTableError(
        "unsupported version 9"
    )


def test_merging_partial_tables_unites_them_and_disagreement_is_an_error() -> None:
    a = PieceTable(12, 4, (b"a" * 32, None, None))
    b = PieceTable(12, 4, (None, b"b" * 32, None))
    merged = a.merge(b)
    assert merged == PieceTable(12, 4, (b"a" * 32, b"b" * 32, None))
    liar = PieceTable(12, 4, (b"x" * 32, None, None))
    assert isinstance(a.merge(liar), PieceTableError)
    assert isinstance(a.merge(PieceTable(12, 6, (None, None))), PieceTableError)


def test_a_hash_sent_beside_its_piece_fills_a_gap_and_never_overwrites() -> None:
    table = PieceTable(12, 4, (b"a" * 32, None, None))
    assert table.with_hash(1, b"b" * 32) == PieceTable(12, 4, (b"a" * 32, b"b" * 32, None))
    assert table.with_hash(0, b"a" * 32) is table
    assert isinstance(table.with_hash(0, b"x" * 32), PieceTableError)  # disagrees
    assert isinstance(table.with_hash(1, b"short"), PieceTableError)
    assert isinstance(table.with_hash(1, b""), PieceTableError)  # none was sent


def test_an_empty_blob_has_no_pieces_and_a_complete_table() -> None:
    table = PieceTable.from_bytes(b"")
    assert table.count == 0 and table.complete
    assert PieceTable.decode(table.encode()) == table


# -- bitmaps ------------------------------------------------------------------------------

bitmaps = st.integers(0, 2000).flatmap(
    lambda n: st.tuples(st.just(n), st.integers(0, (1 << n) - 1 if n else 0))
)


@given(bitmaps)
def test_bitmaps_round_trip_through_bytes(nb: tuple[int, int]) -> None:
    n, bits = nb
    data = bitmap_to_bytes(bits, n)
    assert len(data) == (n + 7) // 8
    assert bitmap_from_bytes(data, n) == bits


@given(bitmaps)
def test_bitmap_from_bytes_rejects_bits_past_the_count_and_wrong_lengths(
    nb: tuple[int, int],
) -> None:
    n, bits = nb
    data = bitmap_to_bytes(bits, n)
    assert bitmap_from_bytes(data + b"\0", n) is None
    if n % 8:
        stray = bytearray(data)
        stray[-1] |= 0x80
        assert bitmap_from_bytes(bytes(stray), n) is None


@given(st.integers(0, 1 << 900))
def test_indices_ranges_and_nth_set_bit_agree_with_a_plain_scan(bits: int) -> None:
    plain = [i for i in range(bits.bit_length()) if bits >> i & 1]
    assert list(bitmap_indices(bits)) == plain
    rebuilt = 0
    for start, stop in bitmap_ranges(bits):
        assert start < stop
        rebuilt |= ((1 << (stop - start)) - 1) << start
    assert rebuilt == bits
    runs = bitmap_ranges(bits)
    assert all(b[1] < c[0] for b, c in itertools.pairwise(runs))
    for k in {0, len(plain) // 3, len(plain) - 1} if plain else ():
        assert nth_set_bit(bits, k) == plain[k]


def test_bitmap_full_and_nth_set_bit_bounds() -> None:
    assert bitmap_full(0) == 0 and bitmap_full(5) == 0b11111
    for bits, n in ((0, 0), (0b101, 2), (0b101, -1)):
        try:
            nth_set_bit(bits, n)
        except IndexError:
            continue
        raise AssertionError("should be out of range")
