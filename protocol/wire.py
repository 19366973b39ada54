"""Datagrams cells send each other: message types, their binary encoding, MAC and replay window.

This module owns the bytes on the wire between cells: every message type (membership,
placement, swarm), one versioned compact encoding for all of them, the blake3 keyed MAC
under the cluster key, and the replay window. It never does I/O, never reads a clock
(callers pass `now`) and never raises on what a peer sent: `decode` turns any input at
all into a `Decoded` or a `DecodeError` value, to count and drop.

Layout of a datagram (big endian)::

    version u8 | type u8 | seq u64 | timestamp f64 | sender (u8 len + utf-8) | body | mac[16]

The MAC is blake3 in keyed mode over every byte before it, under a key derived from the
32-byte cluster key (`derive_key("celld wire v1 mac")`), so a datagram's MAC can never
be confused with a pull token or a peer-HTTP MAC made from the same cluster key.
It is truncated to 16 bytes: a forger must guess 128 bits online, one datagram per try,
with no offline check possible without the key (the same tag length as Poly1305 and
GCM); the 16 bytes saved make room for about one more piggybacked update.

`seq` is a per-sender counter that must grow across restarts too (start it at
`int(now * 1e6)`, see `Codec`), and `timestamp` is the sender's clock: a `ReplayWindow`
rejects a datagram whose timestamp is more than `max_skew` away from the receiver's
`now` (STALE), or whose counter it has already seen or that fell out of its window
(REPLAYED).

Message types are frozen dataclasses registered with `@message(type_byte, field=codec,
...)` (or `message(...)(cls)` for a class another module owns, as placement.py's and
swarm.py's are); adding one is a dataclass and a decorator, nothing else. The schema
must name the dataclass's fields in order, or importing this module fails at once.
Records that travel in lists (membership updates, member states, providers) are
registered with `record` and share one kind-byte space per list codec. Type bytes:
0x01-0x1f membership, 0x20-0x3f placement, 0x40-0x5f swarm; an unknown one decodes to
UNKNOWN_TYPE, so a newer cell may add types without breaking older ones.
"""

from __future__ import annotations

import enum
import hmac
import math
import struct
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any, TypeVar

import blake3

from protocol import placement, swarm

# 2: pieces of 1 MiB (protocol.pieces). A have query's and a reply's bitmaps count other
# pieces than version 1's (2 MiB), so the two must not share: each drops the other's
# datagrams as bad_version, and in a rolling upgrade each version shares among its own.
VERSION = 2
MAX_DATAGRAM = 1400
MAC_LEN = 16
KEY_LEN = 32

_HEADER = struct.Struct("!BBQd")
_U8 = struct.Struct("!B")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_U64 = struct.Struct("!Q")
_F64 = struct.Struct("!d")
MIN_DATAGRAM = _HEADER.size + 2 + MAC_LEN  # header, a 1-byte sender id, the MAC

_T = TypeVar("_T")


class Reason(enum.Enum):
    """Why a datagram was dropped; a counter label, so the names are stable."""

    TRUNCATED = "truncated"  # shorter than the smallest possible datagram
    OVERSIZED = "oversized"  # longer than MAX_DATAGRAM
    BAD_VERSION = "bad_version"  # a protocol version this cell does not speak
    BAD_MAC = "bad_mac"  # unsigned, wrongly signed, or altered in transit
    UNKNOWN_TYPE = "unknown_type"  # signed by a cell that speaks a newer minor version
    MALFORMED = "malformed"  # signed but does not parse: a bug in the sender
    REPLAYED = "replayed"  # counter already seen, or too old for the window
    STALE = "stale"  # timestamp outside the allowed clock skew


@dataclass(frozen=True, slots=True)
class DecodeError:
    """A datagram that was dropped, and why. A value to count, never raised."""

    reason: Reason
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Decoded:
    """An authenticated, fresh, well-formed datagram."""

    msg: Message
    sender: str
    seq: int
    timestamp: float


class EncodeError(ValueError):
    """A local bug: a message that cannot be encoded (too big, a field out of range)."""


class _Malformed(Exception):
    """Internal: raised by field decoders, turned into DecodeError(MALFORMED)."""


# ---------------------------------------------------------------------------------------
# Field codecs. Each has put(out, value), get(data, off) -> (value, off) and size(value),
# and may give source snippets of the same three so that `_Layout` compiles one straight-
# line encoder and decoder per record and message class: a datagram full of updates then
# costs tens of microseconds, not hundreds. get() raises _Malformed, struct.error,
# IndexError, KeyError, ValueError or UnicodeDecodeError on bad input; decode() turns
# all of them into MALFORMED.


class Field:
    """How one field is laid out on the wire."""

    __slots__ = ()

    def put(self, out: bytearray, value: Any) -> None:
        raise NotImplementedError

    def get(self, data: bytes, off: int) -> tuple[Any, int]:
        raise NotImplementedError

    def size(self, value: Any) -> int:
        raise NotImplementedError

    # Source snippets for _Layout: `me` is this field's name in the compiled namespace,
    # `v` a local holding the value, `out` the bytearray, `d`/`o` the data and offset.
    def names(self, me: str) -> dict[str, Any]:
        return {me: self}

    def put_src(self, v: str, me: str) -> list[str]:
        return [f"{me}.put(out, {v})"]

    def get_src(self, v: str, me: str) -> list[str]:
        return [f"{v}, o = {me}.get(d, o)"]

    def size_src(self, v: str, me: str) -> str:
        return f"{me}.size({v})"


class _Int(Field):
    __slots__ = ("_max", "_n", "_s")

    def __init__(self, s: struct.Struct) -> None:
        self._s = s
        self._n = s.size
        self._max = (1 << (8 * s.size)) - 1

    def put(self, out: bytearray, value: int) -> None:
        if type(value) is not int or not 0 <= value <= self._max:
            raise EncodeError(f"integer {value!r} out of range 0..{self._max}")
        out += self._s.pack(value)

    def get(self, data: bytes, off: int) -> tuple[int, int]:
        return self._s.unpack_from(data, off)[0], off + self._n

    def size(self, value: int) -> int:
        return self._n

    def names(self, me: str) -> dict[str, Any]:
        return {me: self, f"{me}_pack": self._s.pack, f"{me}_unpack": self._s.unpack_from}

    def put_src(self, v: str, me: str) -> list[str]:
        return [
            f"if {v}.__class__ is not int or not 0 <= {v} <= {self._max}:",
            f"    raise EncodeError('integer %r out of range 0..{self._max}' % ({v},))",
            f"out += {me}_pack({v})",
        ]

    def get_src(self, v: str, me: str) -> list[str]:
        return [f"{v}, = {me}_unpack(d, o)", f"o += {self._n}"]

    def size_src(self, v: str, me: str) -> str:
        return str(self._n)


class _Bool(Field):
    __slots__ = ()

    def put(self, out: bytearray, value: bool) -> None:
        out.append(1 if value else 0)

    def get(self, data: bytes, off: int) -> tuple[bool, int]:
        b = data[off]
        if b > 1:
            raise _Malformed("bool")
        return b == 1, off + 1

    def size(self, value: bool) -> int:
        return 1

    def size_src(self, v: str, me: str) -> str:
        return "1"


class _Seconds(Field):
    """A duration or instant in seconds: a finite, non-negative f64 (exact round trip)."""

    __slots__ = ()

    def put(self, out: bytearray, value: float) -> None:
        if not (math.isfinite(value) and value >= 0):
            raise EncodeError(f"seconds must be finite and >= 0, not {value!r}")
        out += _F64.pack(value)

    def get(self, data: bytes, off: int) -> tuple[float, int]:
        v = _F64.unpack_from(data, off)[0]
        if not (math.isfinite(v) and v >= 0):
            raise _Malformed("seconds")
        return v, off + 8

    def size(self, value: float) -> int:
        return 8

    def size_src(self, v: str, me: str) -> str:
        return "8"


class _Str(Field):
    """UTF-8 text with a u8 length: cell ids, addresses, zones (at most 255 bytes)."""

    __slots__ = ()

    def put(self, out: bytearray, value: str) -> None:
        b = value.encode()
        if len(b) > 255:
            raise EncodeError(f"string longer than 255 bytes: {value[:40]!r}...")
        out.append(len(b))
        out += b

    def get(self, data: bytes, off: int) -> tuple[str, int]:
        end = off + 1 + data[off]
        if end > len(data):
            raise _Malformed("string past the end")
        return data[off + 1 : end].decode(), end

    def size(self, value: str) -> int:
        return 1 + (len(value) if value.isascii() else len(value.encode()))

    def put_src(self, v: str, me: str) -> list[str]:
        return [
            f"{v} = {v}.encode()",
            f"if len({v}) > 255:",
            "    raise EncodeError('string longer than 255 bytes')",
            f"out.append(len({v}))",
            f"out += {v}",
        ]

    def get_src(self, v: str, me: str) -> list[str]:
        return [
            "e = o + 1 + d[o]",
            "if e > len(d):",
            "    raise _Malformed('string past the end')",
            f"{v} = d[o + 1 : e].decode()",
            "o = e",
        ]

    def size_src(self, v: str, me: str) -> str:
        return f"(1 + len({v}) if {v}.isascii() else 1 + len({v}.encode()))"


class _Bytes(Field):
    """Opaque bytes with a u16 length (piece bitmaps)."""

    __slots__ = ()

    def put(self, out: bytearray, value: bytes) -> None:
        if len(value) > 0xFFFF:
            raise EncodeError("bytes longer than 65535")
        out += _U16.pack(len(value))
        out += value

    def get(self, data: bytes, off: int) -> tuple[bytes, int]:
        n = _U16.unpack_from(data, off)[0]
        end = off + 2 + n
        if end > len(data):
            raise _Malformed("bytes past the end")
        return bytes(data[off + 2 : end]), end

    def size(self, value: bytes) -> int:
        return 2 + len(value)


_HEX = frozenset("0123456789abcdef")


class _Digest(Field):
    """An OCI digest: `sha256:<64 lowercase hex>` as 1+32 bytes, anything else as text."""

    __slots__ = ()

    @staticmethod
    def _raw(value: str) -> bytes | None:
        if len(value) == 71 and value.startswith("sha256:") and _HEX.issuperset(value[7:]):
            return bytes.fromhex(value[7:])
        return None

    def put(self, out: bytearray, value: str) -> None:
        raw = self._raw(value)
        if raw is not None:
            out.append(1)
            out += raw
        else:
            out.append(0)
            STR.put(out, value)

    def get(self, data: bytes, off: int) -> tuple[str, int]:
        tag = data[off]
        if tag == 1:
            if off + 33 > len(data):
                raise _Malformed("digest past the end")
            return "sha256:" + data[off + 1 : off + 33].hex(), off + 33
        if tag == 0:
            text, off = STR.get(data, off + 1)
            if self._raw(text) is not None:  # one encoding per value: it had to be tag 1
                raise _Malformed("non-canonical digest")
            return text, off
        raise _Malformed("digest tag")

    def size(self, value: str) -> int:
        return 33 if self._raw(value) is not None else 1 + STR.size(value)


class _Enum(Field):
    """An enum.Enum whose values are small ints, as one byte."""

    __slots__ = ("_members",)

    def __init__(self, cls: type[enum.Enum]) -> None:
        self._members = {m.value: m for m in cls}

    def put(self, out: bytearray, value: enum.Enum) -> None:
        out.append(value.value)

    def get(self, data: bytes, off: int) -> tuple[Any, int]:
        return self._members[data[off]], off + 1

    def size(self, value: enum.Enum) -> int:
        return 1

    def names(self, me: str) -> dict[str, Any]:
        return {me: self, f"{me}_members": self._members}

    def put_src(self, v: str, me: str) -> list[str]:
        return [f"out.append({v}.value)"]

    def get_src(self, v: str, me: str) -> list[str]:
        return [f"{v} = {me}_members[d[o]]", "o += 1"]

    def size_src(self, v: str, me: str) -> str:
        return "1"


class _Layout:
    """The compiled encoder, decoder and sizer of one record or message class."""

    __slots__ = ("cls", "get", "names", "put", "size")

    def __init__(self, cls: type, schema: dict[str, Field]) -> None:
        names = tuple(f.name for f in fields(cls))
        if names != tuple(schema):
            raise TypeError(f"{cls.__name__}: wire fields {tuple(schema)} != dataclass {names}")
        self.cls = cls
        self.names = names
        ns: dict[str, Any] = {"cls": cls, "EncodeError": EncodeError, "_Malformed": _Malformed}
        put = ["def put(out, m):"]
        get = ["def get(d, o):"]
        sizes = []
        for i, (name, codec) in enumerate(schema.items()):
            me, v = f"f{i}", f"v{i}"
            ns.update(codec.names(me))
            put += [f"    {v} = m.{name}"] + ["    " + line for line in codec.put_src(v, me)]
            get += ["    " + line for line in codec.get_src(v, me)]
            sizes.append(codec.size_src(f"m.{name}", me))
        put.append("    return None")
        if hasattr(cls, "__slots__") and not hasattr(cls, "__post_init__"):
            # Frozen dataclass __init__ goes through object.__setattr__ per field; setting
            # the slots directly builds the same value a third faster, which counts when
            # a push-pull chunk carries 40 rows.
            get.append("    r = new(cls)")
            for i, name in enumerate(names):
                ns[f"set{i}"] = getattr(cls, name).__set__
                get.append(f"    set{i}(r, v{i})")
            get.append("    return r, o")
            ns["new"] = object.__new__
        else:
            get.append(f"    return cls({', '.join(f'v{i}' for i in range(len(schema)))}), o")
        size = ["def size(m):", f"    return {' + '.join(sizes) or '0'}"]
        exec("\n".join(put + get + size), ns)
        self.put: Callable[[bytearray, Any], None] = ns["put"]
        self.get: Callable[[bytes, int], tuple[Any, int]] = ns["get"]
        self.size: Callable[[Any], int] = ns["size"]


class _Records(Field):
    """A u16-counted list of records, each a kind byte then its fields."""

    __slots__ = ("_by_kind", "_kind_of")

    def __init__(self) -> None:
        self._by_kind: dict[int, _Layout] = {}
        self._kind_of: dict[type, tuple[bytes, _Layout]] = {}

    def register(self, kind: int, layout: _Layout) -> None:
        if kind in self._by_kind or not 0 <= kind < 256:
            raise ValueError(f"record kind {kind:#x} invalid or registered twice")
        self._by_kind[kind] = layout
        self._kind_of[layout.cls] = (bytes((kind,)), layout)

    def put(self, out: bytearray, value: Sequence[Any]) -> None:
        out += _U16.pack(len(value))
        kind_of = self._kind_of
        for item in value:
            kind, layout = kind_of[type(item)]
            out += kind
            layout.put(out, item)

    def get(self, data: bytes, off: int) -> tuple[tuple[Any, ...], int]:
        n = _U16.unpack_from(data, off)[0]
        off += 2
        if n > len(data) - off:  # every record takes at least one byte
            raise _Malformed("record count past the end")
        items = []
        by_kind = self._by_kind
        for _ in range(n):
            item, off = by_kind[data[off]].get(data, off + 1)
            items.append(item)
        return tuple(items), off

    def size(self, value: Sequence[Any]) -> int:
        kind_of = self._kind_of
        return 2 + sum(1 + kind_of[type(item)][1].size(item) for item in value)

    def size_one(self, item: Any) -> int:
        return 1 + self._kind_of[type(item)][1].size(item)


U8 = _Int(_U8)
U16 = _Int(_U16)
U32 = _Int(_U32)
U64 = _Int(_U64)
BOOL = _Bool()
SECONDS = _Seconds()
STR = _Str()
BYTES = _Bytes()
DIGEST = _Digest()


_RECORD_SIZE: dict[type, Callable[[Any], int]] = {}


def record(kind: int, into: _Records, **schema: Field) -> Callable[[type[_T]], type[_T]]:
    """Register a frozen dataclass as a record kind of the list codec `into`."""

    def deco(cls: type[_T]) -> type[_T]:
        layout = _Layout(cls, schema)
        into.register(kind, layout)
        _RECORD_SIZE[cls] = layout.size
        return cls

    return deco


_MESSAGES: dict[int, _Layout] = {}
_TYPE_OF: dict[type, tuple[int, _Layout]] = {}


def message(type_byte: int, **schema: Field) -> Callable[[type[_T]], type[_T]]:
    """Register a frozen dataclass as a message type with its wire schema (in field order)."""

    def deco(cls: type[_T]) -> type[_T]:
        if type_byte in _MESSAGES or not 0 < type_byte < 256:
            raise ValueError(f"message type {type_byte:#x} invalid or registered twice")
        layout = _Layout(cls, schema)
        _MESSAGES[type_byte] = layout
        _TYPE_OF[cls] = (type_byte, layout)
        cls.TYPE = type_byte  # type: ignore[attr-defined]
        return cls

    return deco


def message_types() -> dict[int, type]:
    """Every registered message class by its type byte (for tests and dispatch tables)."""
    return {t: layout.cls for t, layout in _MESSAGES.items()}


# ---------------------------------------------------------------------------------------
# Membership records and messages (protocol/membership.py).

UPDATES = _Records()  # piggybacked membership updates: Alive, Suspect, Dead
STATES = _Records()  # full member states in push-pull


class Status(enum.Enum):
    """A member's state as one cell sees it."""

    ALIVE = 0
    SUSPECT = 1
    DEAD = 2
    LEFT = 3


@record(1, UPDATES, node=STR, incarnation=U32, addr=STR, zone=STR)
@dataclass(frozen=True, slots=True)
class Alive:
    """`node` is alive at `incarnation`, reachable at `addr`, in `zone`."""

    node: str
    incarnation: int
    addr: str
    zone: str


@record(2, UPDATES, node=STR, incarnation=U32, by=STR)
@dataclass(frozen=True, slots=True)
class Suspect:
    """`by` suspects `node` at `incarnation` (it missed a direct and indirect probe)."""

    node: str
    incarnation: int
    by: str


@record(3, UPDATES, node=STR, incarnation=U32, by=STR)
@dataclass(frozen=True, slots=True)
class Dead:
    """`by` declares `node` dead at `incarnation`; `by == node` means it left gracefully."""

    node: str
    incarnation: int
    by: str


Update = Alive | Suspect | Dead


@record(1, STATES, node=STR, incarnation=U32, addr=STR, zone=STR, status=_Enum(Status))
@dataclass(frozen=True, slots=True)
class MemberState:
    """One row of a cell's member table, as exchanged by push-pull."""

    node: str
    incarnation: int
    addr: str
    zone: str
    status: Status


@message(0x01, probe=U32, target=STR, updates=UPDATES)
@dataclass(frozen=True, slots=True)
class Ping:
    """Are you alive? `target` guards against an address now used by another cell."""

    probe: int
    target: str
    updates: tuple[Update, ...] = ()


@message(0x02, probe=U32, updates=UPDATES)
@dataclass(frozen=True, slots=True)
class Ack:
    """Answer to a Ping (or relayed answer to a PingReq) with the same probe number."""

    probe: int
    updates: tuple[Update, ...] = ()


@message(0x03, probe=U32, updates=UPDATES)
@dataclass(frozen=True, slots=True)
class Nack:
    """From a PingReq relay: the target did not answer me either (Lifeguard)."""

    probe: int
    updates: tuple[Update, ...] = ()


@message(0x04, probe=U32, target=STR, target_addr=STR, nack=BOOL, updates=UPDATES)
@dataclass(frozen=True, slots=True)
class PingReq:
    """Please ping `target` for me and relay its Ack (and a Nack if it stays silent)."""

    probe: int
    target: str
    target_addr: str
    nack: bool = True
    updates: tuple[Update, ...] = ()


@message(0x05, updates=UPDATES)
@dataclass(frozen=True, slots=True)
class Gossip:
    """Updates only, sent to a few random members every gossip interval."""

    updates: tuple[Update, ...]


@message(0x06, exchange=U32, join=BOOL, reply=BOOL, part=U16, parts=U16, states=STATES)
@dataclass(frozen=True, slots=True)
class PushPull:
    """One chunk of a full member table. Each chunk is merged on its own, so a lost
    chunk costs only its rows; the receiver of part 0 of a non-reply answers with its
    own table (reply=True). `join` asks the receiver to treat the sender as new."""

    exchange: int
    join: bool
    reply: bool
    part: int
    parts: int
    states: tuple[MemberState, ...]


MEMBERSHIP_MESSAGES: tuple[type, ...] = (Ping, Ack, Nack, PingReq, Gossip, PushPull)

# ---------------------------------------------------------------------------------------
# Placement and swarm messages. placement.py and swarm.py own these dataclasses (their
# logic reads them); this module only gives each a type byte and a layout. Piece
# bitmaps are ints there and BITMAP here: little-endian bytes, as few as the value needs.


class _Bitmap(Field):
    """A non-negative int bitmap as u16 length + little-endian bytes, no trailing zeros."""

    __slots__ = ()

    def put(self, out: bytearray, value: int) -> None:
        if type(value) is not int or value < 0:
            raise EncodeError(f"bitmap must be a non-negative int, not {value!r}")
        n = (value.bit_length() + 7) // 8
        if n > 0xFFFF:
            raise EncodeError("bitmap longer than 65535 bytes")
        out += _U16.pack(n)
        out += value.to_bytes(n, "little")

    def get(self, data: bytes, off: int) -> tuple[int, int]:
        n = _U16.unpack_from(data, off)[0]
        end = off + 2 + n
        if end > len(data):
            raise _Malformed("bitmap past the end")
        if n and data[end - 1] == 0:  # one encoding per value
            raise _Malformed("non-canonical bitmap")
        return int.from_bytes(data[off + 2 : end], "little"), end

    def size(self, value: int) -> int:
        return 2 + (value.bit_length() + 7) // 8


BITMAP = _Bitmap()
PROVIDERS = _Records()

record(1, PROVIDERS, member=STR, zone=STR, complete=BOOL, pieces=BITMAP, load=U32)(
    placement.ProviderInfo
)
message(
    0x20,
    digest=DIGEST,
    zone=STR,
    complete=BOOL,
    pieces=BITMAP,
    piece_count=U32,
    load=U32,
    ttl=SECONDS,
    lease=BOOL,
)(placement.Announce)
message(0x21, digest=DIGEST)(placement.Withdraw)
message(0x22, digest=DIGEST, zone=STR, request_id=U32, escalate=BOOL)(placement.Lookup)
message(
    0x23,
    digest=DIGEST,
    request_id=U32,
    providers=PROVIDERS,
    lease=_Enum(placement.LeaseStatus),
    lease_holder=STR,
    piece_count=U32,
    authority=BOOL,
)(placement.LookupReply)

message(0x40, digest=DIGEST, index=U32)(swarm.PieceRequest)
message(
    0x41,
    digest=DIGEST,
    index=U32,
    status=_Enum(swarm.PieceStatus),
    have=BITMAP,
    complete=BOOL,
)(swarm.PieceReply)
message(0x42, digest=DIGEST, index=U32)(swarm.PieceCancel)
message(0x43, digest=DIGEST, want=BITMAP)(swarm.HaveQuery)
message(0x44, digest=DIGEST, have=BITMAP, complete=BOOL)(swarm.HaveReply)

PLACEMENT_MESSAGES: tuple[type, ...] = (
    placement.Announce,
    placement.Withdraw,
    placement.Lookup,
    placement.LookupReply,
)
SWARM_MESSAGES: tuple[type, ...] = (
    swarm.PieceRequest,
    swarm.PieceReply,
    swarm.PieceCancel,
    swarm.HaveQuery,
    swarm.HaveReply,
)

Message = (
    Ping
    | Ack
    | Nack
    | PingReq
    | Gossip
    | PushPull
    | placement.Announce
    | placement.Withdraw
    | placement.Lookup
    | placement.LookupReply
    | swarm.PieceRequest
    | swarm.PieceReply
    | swarm.PieceCancel
    | swarm.HaveQuery
    | swarm.HaveReply
)


# ---------------------------------------------------------------------------------------
# Encoding, MAC, decoding.

_MAC_KEYS: dict[bytes, bytes] = {}


def _mac_key(cluster_key: bytes) -> bytes:
    k = _MAC_KEYS.get(cluster_key)
    if k is None:
        if len(cluster_key) != KEY_LEN:
            raise ValueError(f"cluster key must be {KEY_LEN} bytes, not {len(cluster_key)}")
        k = blake3.blake3(cluster_key, derive_key_context="celld wire v1 mac").digest()
        if len(_MAC_KEYS) > 16:  # keys rotate rarely; keep the cache bounded anyway
            _MAC_KEYS.clear()
        _MAC_KEYS[cluster_key] = k
    return k


def overhead(sender: str) -> int:
    """Bytes a datagram from `sender` spends outside its body."""
    return _HEADER.size + STR.size(sender) + MAC_LEN


def body_size(msg: Message) -> int:
    """Encoded size of a message's body, without encoding it."""
    return _TYPE_OF[type(msg)][1].size(msg)


def record_size(item: Update | MemberState | placement.ProviderInfo) -> int:
    """Bytes one record adds to a list field (Update, MemberState, ProviderInfo)."""
    return 1 + _RECORD_SIZE[type(item)](item)


def room(msg: Message, sender: str) -> int:
    """Bytes left in a datagram from `sender` carrying `msg`: what more records may use."""
    return MAX_DATAGRAM - overhead(sender) - body_size(msg)


def encode(msg: Message, *, key: bytes, sender: str, seq: int, now: float) -> bytes:
    """Sign and encode one message. Raises EncodeError if it would not fit a datagram:
    the caller chooses what to piggyback (see `room`), so that is a local bug."""
    try:
        type_byte, layout = _TYPE_OF[type(msg)]
    except KeyError:
        raise EncodeError(f"not a registered message: {type(msg).__name__}") from None
    if not sender:
        raise EncodeError("empty sender id")
    try:
        out = bytearray(_HEADER.pack(VERSION, type_byte, seq, now))
    except struct.error as exc:
        raise EncodeError(f"seq {seq!r} or now {now!r}: {exc}") from None
    STR.put(out, sender)
    layout.put(out, msg)
    if len(out) + MAC_LEN > MAX_DATAGRAM:
        raise EncodeError(f"{type(msg).__name__} is {len(out) + MAC_LEN} bytes > {MAX_DATAGRAM}")
    out += blake3.blake3(out, key=_mac_key(key)).digest(MAC_LEN)
    return bytes(out)


def decode(
    data: bytes, *, key: bytes, now: float, replay: ReplayWindow | None
) -> Decoded | DecodeError:
    """Authenticate and parse one datagram. Never raises, whatever `data` holds.

    Checks run cheapest and least trusting first: size, version, MAC (nothing else is
    parsed before it passes), then header, type, body, and last the replay window, which
    records the counter only for a datagram that passed everything else."""
    try:
        return _decode(bytes(data), key, now, replay)
    except Exception as exc:  # a decoder bug must not become a peer's way to crash a cell
        return DecodeError(Reason.MALFORMED, f"decoder: {type(exc).__name__}")


def _decode(
    data: bytes, key: bytes, now: float, replay: ReplayWindow | None
) -> Decoded | DecodeError:
    n = len(data)
    if n < MIN_DATAGRAM:
        return DecodeError(Reason.TRUNCATED, f"{n} bytes")
    if n > MAX_DATAGRAM:
        return DecodeError(Reason.OVERSIZED, f"{n} bytes")
    if data[0] != VERSION:
        return DecodeError(Reason.BAD_VERSION, f"version {data[0]}")
    body_end = n - MAC_LEN
    expected = blake3.blake3(data[:body_end], key=_mac_key(key)).digest(MAC_LEN)
    if not hmac.compare_digest(expected, data[body_end:]):
        return DecodeError(Reason.BAD_MAC)
    try:
        _, type_byte, seq, ts = _HEADER.unpack_from(data, 0)
        sender, off = STR.get(data, _HEADER.size)
        if not sender:
            raise _Malformed("empty sender")
        layout = _MESSAGES.get(type_byte)
        if layout is None:
            return DecodeError(Reason.UNKNOWN_TYPE, f"type {type_byte:#x}")
        msg, off = layout.get(data[:body_end], off)
        if off != body_end:
            raise _Malformed(f"{body_end - off} trailing bytes")
    except (_Malformed, struct.error, IndexError, KeyError, ValueError) as exc:
        return DecodeError(Reason.MALFORMED, f"{type(exc).__name__}: {exc}")
    if replay is not None:
        reason = replay.accept(sender, seq, ts, now)
        if reason is not None:
            return DecodeError(reason, f"seq {seq} ts {ts}")
    return Decoded(msg, sender, seq, ts)


class ReplayWindow:
    """Remembers, per sender, the highest counter seen and which of the `window` counters
    below it were seen, like IPsec's anti-replay window; and rejects timestamps more
    than `max_skew` seconds from the receiver's clock. A sender silent for 2 x max_skew
    is forgotten: anything it sent before then is STALE by now, so no replay slips
    through, and memory stays bounded by the senders of the last minute.
    """

    __slots__ = ("_last_prune", "_senders", "max_skew", "window")

    def __init__(self, *, window: int = 1024, max_skew: float = 30.0) -> None:
        self.window = window
        self.max_skew = max_skew
        # sender -> [highest seq, bitmap of seen counters (bit i = highest - i), last seen]
        self._senders: dict[str, list[Any]] = {}
        self._last_prune = -math.inf

    def accept(self, sender: str, seq: int, timestamp: float, now: float) -> Reason | None:
        """Record (sender, seq) and return None if fresh; else the reason to drop it."""
        if not abs(now - timestamp) <= self.max_skew:  # NaN compares false: stale
            return Reason.STALE
        if now - self._last_prune > self.max_skew:
            self._prune(now)
        st = self._senders.get(sender)
        if st is None:
            self._senders[sender] = [seq, 1, now]
            return None
        high, bits, _ = st
        if seq > high:
            shift = seq - high
            bits = ((bits << shift) | 1) & ((1 << self.window) - 1) if shift < self.window else 1
            st[0] = seq
        else:
            back = high - seq
            if back >= self.window or (bits >> back) & 1:
                return Reason.REPLAYED
            bits |= 1 << back
        st[1] = bits
        st[2] = now
        return None

    def _prune(self, now: float) -> None:
        self._last_prune = now
        horizon = now - 2 * self.max_skew
        for s in [s for s, st in self._senders.items() if st[2] < horizon]:
            del self._senders[s]

    def __len__(self) -> int:
        return len(self._senders)


class Codec:
    """One cell's end of the wire: signs with an increasing counter, checks and counts
    what arrives. Holds no socket; the daemon and the simulator call it around their I/O.

    `first_seq` must exceed every counter this cell id used before a restart; the
    default `int(now * 1e6)` does that unless a cell sends more than a million datagrams
    a second or its clock steps back.
    """

    def __init__(
        self,
        key: bytes,
        sender: str,
        *,
        now: float,
        first_seq: int | None = None,
        replay: ReplayWindow | None = None,
    ) -> None:
        _mac_key(key)  # fail early on a bad key
        self.key = key
        self.sender = sender
        self.seq = int(now * 1e6) if first_seq is None else first_seq
        self.replay = ReplayWindow() if replay is None else replay
        self.errors: Counter[Reason] = Counter()
        self.sent = 0
        self.received = 0

    def seal(self, msg: Message, now: float) -> bytes:
        self.seq += 1
        self.sent += 1
        return encode(msg, key=self.key, sender=self.sender, seq=self.seq, now=now)

    def open(self, data: bytes, now: float) -> Decoded | DecodeError:
        out = decode(data, key=self.key, now=now, replay=self.replay)
        if isinstance(out, DecodeError):
            self.errors[out.reason] += 1
        else:
            self.received += 1
        return out
