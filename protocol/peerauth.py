"""Request MACs of the peer API: which cell sent an HTTP request, and that it is fresh.

Owns: the four headers a cell adds to every request it sends another cell (`Celld-Cell`,
`Celld-Time`, `Celld-Nonce`, `Celld-Mac`), the MAC over them, and the `Verifier` that
checks a request's MAC, its age and that its nonce was not seen before.
Never: reads a clock, draws randomness or touches a socket: callers pass `now` and the
nonce (16 bytes from os.urandom in celld), so tests and the simulator run it as is.

The MAC is blake3 in keyed mode under a key derived from the 32-byte cluster key with
the context "celld peer v1 mac": distinct from the datagram key (wire.py, "celld wire v1
mac") and from the pull-token MAC (auth.py), so a value made for one can never pass as
another. It covers the method, the request target as sent (path and query), the sender's
name, the time and the nonce, each length-prefixed so no two requests sign the same
bytes. The header values are signed exactly as they travel: the verifier checks the MAC
before it parses anything but sizes, and only then reads the time and the name.

Freshness, like wire.ReplayWindow for datagrams: a request whose time is more than
`max_skew` (30 s) from the receiver's clock is STALE; a nonce seen within that window is
REPLAYED. Nonces are remembered until their request's time leaves the window (after
which a replay is STALE anyway), so the cache holds at most the nonces of the last
minute (a forgotten nonce's time becomes the `floor` too, so a clock that steps back
does not reopen the window). It is bounded too (`max_nonces`): when full, the oldest is forgotten and the
`floor` rises to its time, and any request not newer than the floor is REPLAYED, since
it can no longer be proven new. Only requests that passed the MAC reach the cache, so
only a cell of the cluster can fill it.
"""

from __future__ import annotations

import enum
import functools
import heapq
import hmac
import math
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import quote, unquote

import blake3

__all__ = [
    "CELL",
    "MAC",
    "MAX_SKEW",
    "NONCE",
    "TIME",
    "Authenticated",
    "Reason",
    "Rejected",
    "Verifier",
    "peer_key",
    "sign",
]

KEY_LEN = 32
MAX_SKEW = 30.0
NONCE_LEN = 16  # bytes, sent as 32 hex digits
MAC_LEN = 32

# Header names as h11 hands them to a server (lower case); HTTP names are case-blind.
CELL = b"celld-cell"
TIME = b"celld-time"
NONCE = b"celld-nonce"
MAC = b"celld-mac"
_NAMES = (CELL, TIME, NONCE, MAC)

_TIME_RE = re.compile(rb"[0-9]{1,12}(\.[0-9]{1,6})?")
_HEX_RE = re.compile(rb"[0-9a-f]+")
_MAX_CELL = 255  # bytes of the encoded name
_U16 = struct.Struct("!H")


class Reason(enum.Enum):
    """Why a request was refused; a counter label, so the names are stable."""

    MISSING = "missing"  # a header absent (or sent twice)
    MALFORMED = "malformed"  # a header of the wrong shape or size
    BAD_MAC = "bad_mac"  # not signed with the cluster key, or altered
    STALE = "stale"  # its time is outside the allowed clock skew
    REPLAYED = "replayed"  # its nonce was already used, or is too old to tell


@dataclass(frozen=True, slots=True)
class Authenticated:
    cell: str  # the sender's name, as it signed it


@dataclass(frozen=True, slots=True)
class Rejected:
    reason: Reason


@functools.lru_cache(maxsize=8)
def peer_key(cluster_key: bytes) -> bytes:
    """The peer-API MAC key of a cluster key (cached: keys rotate rarely)."""
    if len(cluster_key) != KEY_LEN:
        raise ValueError(f"cluster key must be {KEY_LEN} bytes, not {len(cluster_key)}")
    return blake3.blake3(cluster_key, derive_key_context="celld peer v1 mac").digest()


def _mac(key: bytes, method: bytes, target: bytes, fields: tuple[bytes, ...]) -> bytes:
    h = blake3.blake3(key=key)
    for part in (method, target, *fields):
        h.update(_U16.pack(len(part)))
        h.update(part)
    return h.digest(MAC_LEN)


def _time_text(now: float) -> bytes:
    if not (math.isfinite(now) and now >= 0):
        raise ValueError(f"not a usable time: {now!r}")
    return b"%.3f" % now


def sign(
    cluster_key: bytes, cell: str, method: bytes, target: bytes, now: float, nonce: bytes
) -> list[tuple[bytes, bytes]]:
    """The headers that authenticate a request of `cell` for `method target` at `now`.

    `target` is the request target exactly as sent (path and query); `nonce` must be
    `NONCE_LEN` random bytes, new for every request."""
    if len(nonce) != NONCE_LEN:
        raise ValueError(f"nonce must be {NONCE_LEN} bytes")
    name = quote(cell, safe="").encode("ascii")
    if not name or len(name) > _MAX_CELL:
        raise ValueError(f"cell name must encode to 1..{_MAX_CELL} bytes")
    fields = (name, _time_text(now), nonce.hex().encode("ascii"))
    mac = _mac(peer_key(cluster_key), method, target, fields).hex().encode("ascii")
    return [(b"Celld-Cell", fields[0]), (b"Celld-Time", fields[1]), (b"Celld-Nonce", fields[2]),
            (b"Celld-Mac", mac)]  # fmt: skip


class Verifier:
    """Checks signed requests and remembers their nonces (one per server)."""

    __slots__ = ("_heap", "_key", "_seen", "floor", "max_nonces", "max_skew")

    def __init__(
        self, cluster_key: bytes, *, max_skew: float = MAX_SKEW, max_nonces: int = 1 << 16
    ) -> None:
        self._key = peer_key(cluster_key)
        self.max_skew = max_skew
        self.max_nonces = max_nonces
        self._seen: set[bytes] = set()
        self._heap: list[tuple[float, bytes]] = []  # (request time, nonce), oldest first
        self.floor = -math.inf  # requests at or before this time can't be proven new

    def __len__(self) -> int:
        return len(self._seen)

    def verify(
        self,
        method: bytes,
        target: bytes,
        headers: Iterable[tuple[bytes, bytes]],
        now: float,
    ) -> Authenticated | Rejected:
        """Who sent this request, or why it is refused. Never raises on what a peer sent;
        records the nonce only when everything else passed."""
        found: dict[bytes, bytes | None] = {}
        for name, value in headers:
            name = name.lower()
            if name in _NAMES:
                found[name] = None if name in found else value  # a repeat is no value
        cell, time_, nonce, mac = (found.get(name) for name in _NAMES)
        if cell is None or time_ is None or nonce is None or mac is None:
            return Rejected(Reason.MISSING)
        if (
            not 0 < len(cell) <= _MAX_CELL
            or not _TIME_RE.fullmatch(time_)
            or len(nonce) != 2 * NONCE_LEN
            or not _HEX_RE.fullmatch(nonce)
            or len(mac) != 2 * MAC_LEN
            or not _HEX_RE.fullmatch(mac)
        ):
            return Rejected(Reason.MALFORMED)
        expected = _mac(self._key, method, target, (cell, time_, nonce))
        if not hmac.compare_digest(expected, bytes.fromhex(mac.decode("ascii"))):
            return Rejected(Reason.BAD_MAC)
        try:
            name = unquote(cell.decode("ascii"), errors="strict")
        except UnicodeError:
            return Rejected(Reason.MALFORMED)  # signed, but by a broken sender
        sent = float(time_)
        self._prune(now)
        if not abs(now - sent) <= self.max_skew:
            return Rejected(Reason.STALE)
        if nonce in self._seen or sent <= self.floor:
            return Rejected(Reason.REPLAYED)
        self._seen.add(nonce)
        heapq.heappush(self._heap, (sent, nonce))
        while len(self._seen) > self.max_nonces:
            oldest, forgotten = heapq.heappop(self._heap)
            self._seen.discard(forgotten)
            self.floor = max(self.floor, oldest)
        return Authenticated(name)

    def _prune(self, now: float) -> None:
        """Forgets nonces whose request time is out of the window: a replay is STALE
        now, and REPLAYED by the floor should the clock step back."""
        horizon = now - self.max_skew
        heap = self._heap
        while heap and heap[0][0] < horizon:
            sent, nonce = heapq.heappop(heap)
            self._seen.discard(nonce)
            self.floor = max(self.floor, sent)
