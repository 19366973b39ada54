"""Pieces of a blob: the size policy, per-piece blake3 tables, and bitmaps of held pieces.

Owns: how a blob is cut into pieces, the table of blake3 hashes that lets a cell check
each piece on its own (and pin a bad one on the peer that sent it), the binary encoding
of that table for the peer API, and the bitmap helpers every other module uses to say
"which pieces".
Never: touches a file, a socket or a clock. The sha256 digest of the whole blob stays the
root of trust; nothing here decides that a blob is good, only that a piece matches the
table it was checked against.

How to drive it::

    size = piece_size_for(blob_size)                  # the policy (1 MiB ... 16 MiB)
    hasher = PieceHasher(blob_size, size)
    for chunk in stream:                              # any chunking, in order
        for index, digest in hasher.feed(chunk):      # pieces completed by this chunk
            ...                                       # announce / serve piece `index`
    table = hasher.finish()                           # PieceTable, complete
    table.verify(index, data) -> bool                 # a piece received from a peer
    blob = table.encode(); PieceTable.decode(blob)    # -> PieceTable | PieceTableError

Bitmaps are plain Python ints: bit i set = piece i held. Big-int operations run in C, so
"pieces this peer has that I still want and have not requested" is one expression,
`peer_have & wanted & ~inflight`, whatever the number of pieces. On the wire a bitmap is
`bitmap_to_bytes(bits, count)`: ceil(count / 8) bytes, little-endian (bit i of the int is
bit i % 8 of byte i // 8).

Why 1 MiB, growing to 16 MiB. A piece is the unit a cell can relay onward, so its
transfer time is the store-and-forward delay of every hop of the swarm, and an uploader
shares its link among its 4 slots: a 4 MiB piece took 0.7 s a hop between the testbed's
cells at 200 Mbit/s, and the storm's last pieces from the Hub reach the last cells in
2-3 hops, most of its time over the physical limit. Where the links bind (50 Mbit/s:
every cell's downlink as fast as the Hub's, so what it idles waiting for a hop is never
made up) 1 MiB beats 2 MiB side by side on the testbed: 12 cells p99/limit 1.23-1.28
against 1.28-1.32, 8 cells 1.18 against 1.23 (simulated testbed_12_50mbit: p99 51.8 s
against 54.0). It costs twice the requests per byte, ~15% more daemon CPU, so where the
testbed's 2 cores bind (8 cells at 200 Mbit/s) it is slower: 1.94-2.00 against 1.81-1.89
(4 MiB, then 2 MiB, were chosen there: README, "Testbed"). Past 512 pieces (512 MiB)
the pieces grow instead, so the table (32 bytes a piece) and the bitmap (one bit a
piece, 64 bytes at 512, which fits beside other fields in a 1,400-byte datagram) stay
small: Kraken's 1.5 GB layers get 4 MiB pieces (its own are 4 MB), 14 ms at its 300 MB/s.
16 MiB caps the relay delay (56 ms a hop at 300 MB/s). Beyond 8 GiB the count grows past
512 rather than the piece size.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

import blake3

MiB = 1 << 20
HASH_SIZE = 32

__all__ = [
    "DEFAULT_POLICY",
    "HASH_SIZE",
    "MiB",
    "PieceHasher",
    "PiecePolicy",
    "PieceTable",
    "PieceTableError",
    "bitmap_from_bytes",
    "bitmap_full",
    "bitmap_indices",
    "bitmap_ranges",
    "bitmap_to_bytes",
    "nth_set_bit",
    "piece_count",
    "piece_hash",
    "piece_size_for",
    "piece_span",
]


# ---------------------------------------------------------------------------------------
# Size policy


@dataclass(frozen=True, slots=True)
class PiecePolicy:
    """Smallest power-of-two piece size >= min_size that keeps the count <= target_count,
    capped at max_size. Powers of two keep piece boundaries aligned with page and Range
    arithmetic."""

    min_size: int = 1 * MiB
    max_size: int = 16 * MiB
    target_count: int = 512

    def piece_size(self, blob_size: int) -> int:
        size = self.min_size
        while size < self.max_size and -(-blob_size // size) > self.target_count:
            size *= 2
        return min(size, self.max_size)


DEFAULT_POLICY = PiecePolicy()


def piece_size_for(blob_size: int, policy: PiecePolicy = DEFAULT_POLICY) -> int:
    """The piece size every cell uses for a blob of this size (the table records it too,
    so a cell with another policy still reads a peer's table right)."""
    if blob_size < 0:
        raise ValueError("blob size must be >= 0")
    return policy.piece_size(blob_size)


def piece_count(blob_size: int, piece_size: int) -> int:
    """Number of pieces; an empty blob has none (its sha256 alone proves it)."""
    return -(-blob_size // piece_size)


def piece_span(index: int, blob_size: int, piece_size: int) -> tuple[int, int]:
    """(offset, length) of piece `index`; the last piece is short."""
    offset = index * piece_size
    if index < 0 or offset >= blob_size:
        raise IndexError(f"piece {index} outside a blob of {blob_size} bytes")
    return offset, min(piece_size, blob_size - offset)


def piece_hash(data: bytes | memoryview) -> bytes:
    """blake3 of one piece (32 bytes)."""
    return blake3.blake3(data).digest()


# ---------------------------------------------------------------------------------------
# Bitmaps (ints)


def bitmap_full(count: int) -> int:
    return (1 << count) - 1


def bitmap_to_bytes(bits: int, count: int) -> bytes:
    return bits.to_bytes((count + 7) // 8, "little")


def bitmap_from_bytes(data: bytes, count: int) -> int | None:
    """The bitmap, or None when the length is wrong or a bit past `count` is set: a peer's
    malformed bitmap is a value to drop, not an exception."""
    if len(data) != (count + 7) // 8:
        return None
    bits = int.from_bytes(data, "little")
    if bits >> count:
        return None
    return bits


def bitmap_indices(bits: int) -> Iterator[int]:
    """Set bits, lowest first; cost proportional to the number of set bits."""
    while bits:
        low = bits & -bits
        yield low.bit_length() - 1
        bits ^= low


def bitmap_ranges(bits: int) -> list[tuple[int, int]]:
    """Runs of set bits as half-open (start, stop) ranges, lowest first."""
    out: list[tuple[int, int]] = []
    pos = 0
    while bits:
        skip = (bits & -bits).bit_length() - 1
        bits >>= skip
        pos += skip
        run = (~bits & (bits + 1)).bit_length() - 1  # number of trailing ones
        out.append((pos, pos + run))
        bits >>= run
        pos += run
    return out


def nth_set_bit(bits: int, n: int) -> int:
    """Index of the n-th (0-based) set bit. Halves the range with bit_count (C speed) until
    a 64-bit window is left, so a uniform random pick among k candidates costs O(log size)
    big-int operations rather than a Python loop over every bit."""
    if n < 0 or n >= bits.bit_count():
        raise IndexError("fewer set bits than asked for")
    lo, hi = 0, bits.bit_length()
    while hi - lo > 64:
        mid = (lo + hi) // 2
        c = ((bits >> lo) & ((1 << (mid - lo)) - 1)).bit_count()
        if n < c:
            hi = mid
        else:
            n -= c
            lo = mid
    window = (bits >> lo) & ((1 << (hi - lo)) - 1)
    for _ in range(n):
        window &= window - 1
    return lo + (window & -window).bit_length() - 1


# ---------------------------------------------------------------------------------------
# Tables


@dataclass(frozen=True, slots=True)
class PieceTableError:
    """Why bytes from a peer are not a piece table."""

    reason: str


_MAGIC = b"CPT"
_VERSION = 1
_FLAG_PARTIAL = 1
_HEADER = struct.Struct(">3sBBQII")  # magic, version, flags, blob_size, piece_size, count
MAX_PIECES = 1 << 20  # 16 TiB at 16 MiB: anything larger is garbage


@dataclass(frozen=True, slots=True)
class PieceTable:
    """The blake3 hash of every piece of one blob.

    A table may be partial: a cell still downloading serves the hashes of the pieces it
    has checked (None for the others), so a peer taking pieces from it can check them too.
    Hashes come from the cell that first read the blob from a registry (the lease holder)
    and are passed along unchanged; a piece that fails its hash is pinned on the sender,
    and the whole blob's sha256 still decides whether the result is stored."""

    blob_size: int
    piece_size: int
    hashes: tuple[bytes | None, ...]

    def __post_init__(self) -> None:
        if self.piece_size <= 0:
            raise ValueError("piece_size must be > 0")
        if len(self.hashes) != piece_count(self.blob_size, self.piece_size):
            raise ValueError("hash count does not match blob and piece size")

    @property
    def count(self) -> int:
        return len(self.hashes)

    @property
    def known(self) -> int:
        """Bitmap of pieces whose hash this table holds."""
        bits = 0
        for i, h in enumerate(self.hashes):
            if h is not None:
                bits |= 1 << i
        return bits

    @property
    def complete(self) -> bool:
        return None not in self.hashes

    def span(self, index: int) -> tuple[int, int]:
        return piece_span(index, self.blob_size, self.piece_size)

    def verify(self, index: int, data: bytes | memoryview) -> bool:
        """True when `data` is exactly piece `index`; False for a wrong length, an unknown
        hash or a mismatch (never raises on a peer's input)."""
        if not 0 <= index < len(self.hashes):
            return False
        expected = self.hashes[index]
        if expected is None:
            return False
        if len(data) != min(self.piece_size, self.blob_size - index * self.piece_size):
            return False
        return piece_hash(data) == expected

    def merge(self, other: PieceTable) -> PieceTable | PieceTableError:
        """Union of the hashes two tables know; an error if they disagree anywhere (then
        one of the two senders is wrong and neither table should be trusted blindly)."""
        if (other.blob_size, other.piece_size) != (self.blob_size, self.piece_size):
            return PieceTableError("tables describe different piece layouts")
        merged: list[bytes | None] = []
        for a, b in zip(self.hashes, other.hashes, strict=True):
            if a is not None and b is not None and a != b:
                return PieceTableError("tables disagree on a piece hash")
            merged.append(a if a is not None else b)
        return PieceTable(self.blob_size, self.piece_size, tuple(merged))

    def with_hash(self, index: int, piece_hash: bytes) -> PieceTable | PieceTableError:
        """This table with piece `index`'s hash, as a peer sent it beside the piece (the
        same trust as its table: see celld.peer); an error if this table knows another."""
        known = self.hashes[index]
        if known == piece_hash:
            return self
        if known is not None:
            return PieceTableError("tables disagree on a piece hash")
        if len(piece_hash) != HASH_SIZE:
            return PieceTableError("not a piece hash")
        hashes = (*self.hashes[:index], piece_hash, *self.hashes[index + 1 :])
        return PieceTable(self.blob_size, self.piece_size, hashes)

    def encode(self) -> bytes:
        """Header, then (partial tables only) the known bitmap, then the known hashes in
        index order: 32 bytes a piece, 32 KiB for a 1,024-piece blob."""
        partial = not self.complete
        parts = [
            _HEADER.pack(
                _MAGIC,
                _VERSION,
                _FLAG_PARTIAL if partial else 0,
                self.blob_size,
                self.piece_size,
                self.count,
            )
        ]
        if partial:
            parts.append(bitmap_to_bytes(self.known, self.count))
        parts.extend(h for h in self.hashes if h is not None)
        return b"".join(parts)

    @classmethod
    def decode(cls, data: bytes) -> PieceTable | PieceTableError:
        if len(data) < _HEADER.size:
            return PieceTableError("truncated header")
        magic, version, flags, blob_size, psize, count = _HEADER.unpack_from(data)
        if magic != _MAGIC:
            return PieceTableError("not a piece table")
        if version != _VERSION:
            return PieceTableError(f"unsupported version {version}")
        if flags & ~_FLAG_PARTIAL:
            return PieceTableError("unknown flags")
        if psize == 0 or count > MAX_PIECES or count != piece_count(blob_size, psize):
            return PieceTableError("inconsistent sizes")
        pos = _HEADER.size
        if flags & _FLAG_PARTIAL:
            nbytes = (count + 7) // 8
            known = bitmap_from_bytes(data[pos : pos + nbytes], count)
            if known is None:
                return PieceTableError("bad known-pieces bitmap")
            pos += nbytes
        else:
            known = bitmap_full(count)
        n = known.bit_count()
        if len(data) != pos + n * HASH_SIZE:
            return PieceTableError("wrong length for the hashes it announces")
        hashes: list[bytes | None] = [None] * count
        for i in bitmap_indices(known):
            hashes[i] = bytes(data[pos : pos + HASH_SIZE])
            pos += HASH_SIZE
        return cls(blob_size, psize, tuple(hashes))

    @classmethod
    def from_bytes(cls, blob: bytes, piece_size: int | None = None) -> PieceTable:
        hasher = PieceHasher(len(blob), piece_size)
        hasher.feed(blob)
        return hasher.finish()


class PieceHasher:
    """Builds a PieceTable from the blob's bytes as they stream in (any chunk sizes, in
    order), reporting each piece the moment it is complete so the cell can announce and
    serve it before the rest arrives."""

    __slots__ = ("_buf", "_hasher", "_hashes", "_pos", "blob_size", "piece_size")

    def __init__(self, blob_size: int, piece_size: int | None = None) -> None:
        self.blob_size = blob_size
        self.piece_size = piece_size if piece_size is not None else piece_size_for(blob_size)
        self._hashes: list[bytes] = []
        self._hasher = blake3.blake3()
        self._buf = 0  # bytes fed into the current piece
        self._pos = 0

    def feed(self, chunk: bytes | memoryview) -> list[tuple[int, bytes]]:
        """Hash `chunk`; returns (index, blake3) of every piece it completed."""
        view = memoryview(chunk)
        if self._pos + len(view) > self.blob_size:
            raise ValueError("more bytes than the blob's size")
        done: list[tuple[int, bytes]] = []
        while view:
            index = len(self._hashes)
            need = min(self.piece_size, self.blob_size - index * self.piece_size) - self._buf
            take = view[:need]
            self._hasher.update(take)
            self._buf += len(take)
            self._pos += len(take)
            view = view[len(take) :]
            if len(take) == need:
                digest = self._hasher.digest()
                self._hashes.append(digest)
                done.append((index, digest))
                self._hasher = blake3.blake3()
                self._buf = 0
        return done

    @property
    def pieces_done(self) -> int:
        return len(self._hashes)

    def finish(self) -> PieceTable:
        if self._pos != self.blob_size:
            raise ValueError(f"fed {self._pos} bytes of a {self.blob_size}-byte blob")
        return PieceTable(self.blob_size, self.piece_size, tuple(self._hashes))

    def partial(self) -> PieceTable:
        """The table so far (the hashes of completed pieces), to serve while downloading."""
        n = piece_count(self.blob_size, self.piece_size)
        hashes: list[bytes | None] = list(self._hashes)
        hashes.extend([None] * (n - len(hashes)))
        return PieceTable(self.blob_size, self.piece_size, tuple(hashes))
