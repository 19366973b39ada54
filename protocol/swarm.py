"""Which piece to ask whom for, and who may take a cell's upload slots.

Owns: the downloading side of one blob (`Download`: rarest first, bounded requests in
flight, endgame, timeouts, bans of peers that send bad pieces, the switch to the
registries when the cell holds the fetch lease) and the uploading side of one cell
(`Uploader`: a fixed number of upload slots, a short queue, "busy" beyond it, and the
have-queries parked until the cell holds something the asker wants).
Never: opens a socket, reads a clock, draws OS randomness, hashes bytes. Whether a piece
is good is the caller's to say (`ok=`, from `PieceTable.verify`), so the simulator can
run thousands of cells without moving real bytes; time is `now`; randomness is the
`random.Random` passed in.

How to drive a download (events out are to be acted on in order)::

    dl = Download(digest, piece_count, self_id="cell-a", zone="z1", rng=rng)
    dl.start(now)                                  -> [NeedProviders]
    lookup result (placement.LookupResult):
        dl.add_providers(result.providers, now, lease_holder=result.lease_holder)
        if result.lease == GRANTED: dl.grant_lease(now) -> [FetchUpstream(ranges), ...]
    the cell's policy across its downloads, after a lease is granted and after a
    download completes: registry_first(cell_downloads, now) -> [(download, event)]
    replies from a peer (each carries the peer's current bitmap, `have`):
        dl.on_piece(peer, index, ok, now, have=)   -> events   (ok: verified)
        dl.on_busy(peer, index, now, have=) / dl.on_missing(peer, index, now, have=)
        dl.on_have(peer, have, complete, now)      (the answer to a QueryHave)
        dl.on_error(peer, index, now)              (connection failed)
    pieces read from the registries: dl.on_piece(UPSTREAM, index, True, now)
    membership says a peer died / it withdrew: dl.remove_provider(peer, now)
    timers: dl.poll(now) at dl.next_deadline()
    events: RequestPiece, CancelPiece, QueryHave, NeedProviders, FetchUpstream,
            BadPiece, PeerBanned, DownloadComplete.

How to drive the uploader (one per cell)::

    up = Uploader("cell-a", slots=4)
    up.add_seed(digest, piece_count, have=bits); up.piece_added(digest, i) -> [(to, HaveReply)]
    up.on_request(sender, PieceRequest, now) -> PieceReply(status=OK: send the piece now,
                              QUEUED: it starts later, from on_done; BUSY/MISSING: reply)
    up.on_done(peer, digest, index) -> [(peer, PieceRequest) to start now]  (upload ended)
    up.on_cancel(sender, PieceCancel) -> same as on_done
    up.on_have_query(sender, HaveQuery, now) -> HaveReply | None (parked)
    up.poll(now) -> [(to, HaveReply)]                  (parked queries whose wait is over)

Theory of operation (Download)
------------------------------
Sets of pieces are int bitmaps (pieces.py): `held`, `wanted` (= all & ~held), the pieces
with at least one request in flight, the pieces with `endgame_copies` requests in flight,
the pieces expected from the registries. Each known peer has `have` (a lower bound: the
last bitmap it sent or was announced with; pieces only accumulate), its requests in
flight (index -> deadline), a busy-until time and counters of bad pieces and failures.

Rarest first. The availability of every piece over the known peers is kept as a
bit-sliced counter: plane k holds bit k of every piece's count, so adding a peer's new
pieces is a ripple-carry over a few big ints, whatever the piece count, and the rarest
pieces of a candidate set fall out of one pass over the planes from the top (keep the
candidates whose bit is 0 when any are). The candidates are the wanted pieces that a
peer ready to take a request holds (not backing off after "busy", under its cap): a
piece whose holders are all busy is not drawn at all. One random piece among the rarest
candidates is chosen (uniformly, with the rng), then its holder among the ready peers:
a peer in the same zone first, then the one with the fewest of our requests in flight,
ties at random.
Each peer takes at most `max_inflight_per_peer` requests, the download at most
`max_inflight`, except that the only peer a download knows, when complete, takes the
whole budget (one request at a time leaves its link idle a round trip and a write per
piece: a cell's intake from one peer was half its intake from a registry). The defaults (2 a download, 1 a peer) keep few flows on every link:
more flows share the same bandwidth, so each piece takes longer to become available
to relay, and in the simulated Kraken storm 8 in flight cost 3 s at the median.

The runtime's next pieces first. The runtime is streamed the blob's verified prefix in
order as it grows, so the lowest piece not held holds up its next byte: with rarest
first alone, piece 0 of a blob from one complete peer comes at a random point of the
transfer, and so does the runtime's first byte. Before drawing the rarest, the download
asks for the `stream_ahead` lowest pieces not held (lowest first) when a ready complete
peer has them and no request for them is out; the rest of the budget goes to the
rarest. Only from complete peers: a piece a complete peer holds is never scarce, so
taking it in order costs the swarm nothing, while a piece only downloading cells hold is
rarest first's to place (every cell asking for its next piece would make the pieces
just read from the registries the ones everybody waits on: in the simulated Kraken storm,
in-order from any peer cost 0.4 s at p99, and in a storm the pieces enter in order
anyway, from the lease holder's registry read). One (the default) keeps one request of
the two on the runtime's stream; 0 is rarest first only.

Endgame. When every piece still wanted is requested, the idle capacity asks a second
peer for pieces in flight (up to `endgame_copies` requests a piece); the first copy to
arrive cancels the others.

Failures. A request that passes its deadline or fails counts against the peer and goes
back to the pool; `max_failures` in a row drop the peer. The deadline follows the
pieces' measured time (`timeout_factor` times its moving average, never under
`request_timeout`) and doubles when a request sent with it times out, up to
`max_request_timeout`, as TCP's retransmission timer does: a fixed one collapses a cell
whose link is slower than it assumed. A late cell pulling a 12-layer image from idle peers over 50 Mbit/s asks for 24
pieces at once, each then takes ~8 s, every request timed out at 4 s and was asked
again, and the cell never finished (the simulator, until this). "Busy" backs off from that peer
(doubling, jittered) and asks elsewhere; the download is woken when the back-off ends
only if it still has requests to spend then (otherwise the next reply wakes it). A piece that fails verification is charged to
the peer that sent it (`BadPiece`); at `max_bad_pieces` the peer is banned for this blob
(`PeerBanned`), its requests cancelled and its pieces taken elsewhere.

Knowing more. Replies carry the sender's bitmap, so peers in use stay current. An idle
peer with nothing we want gets a `QueryHave` (the uploader parks it until it has
something we want and a free upload slot, up to `have_wait`; a peer that answers at once
with nothing wanted has no room to park it, and is asked again only after `have_wait`,
so a crowd of new cells does not poll the few that hold pieces). When no known peer can help, or fewer than
`min_peers` are known, `NeedProviders` asks the homes again (at most every
`lookup_interval`).

Lease. Holding the fetch lease (`grant_lease`), the download asks the registries
(`FetchUpstream`) for the wanted pieces no known peer has, and keeps taking the others
from peers; if a peer holding a piece dies before we got it, the piece is added to the
registry fetch. A download that bans the lease holder (it sent bad pieces) acts as if it
held a lease itself: the pieces only the holder had would never come otherwise. That
costs extra registry reads only while a corrupt cell holds a lease, one per cell that
caught it.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol

from protocol.pieces import bitmap_full, bitmap_indices, bitmap_ranges, nth_set_bit

__all__ = [
    "UPSTREAM",
    "BadPiece",
    "CancelPiece",
    "Download",
    "DownloadComplete",
    "FetchUpstream",
    "HaveQuery",
    "HaveReply",
    "NeedProviders",
    "PeerBanned",
    "PieceCancel",
    "PieceReply",
    "PieceRequest",
    "PieceStatus",
    "QueryHave",
    "RequestPiece",
    "SwarmConfig",
    "Uploader",
    "registry_first",
]

UPSTREAM = "<upstream>"  # the pseudo-peer of pieces read from the registries

MemberId = str
Digest = str


@dataclass(frozen=True, slots=True)
class SwarmConfig:
    max_inflight_per_peer: int = 1
    max_inflight: int = 2
    max_peers: int = 24
    min_peers: int = 4
    request_timeout: float = 4.0  # seconds for one piece (2-4 MiB at 0.5-1 MB/s), at first
    # ... then `timeout_factor` times the pieces' measured time, doubled after each
    # timeout, at most max_request_timeout: see Download's "Failures"
    timeout_factor: float = 3.0
    max_request_timeout: float = 60.0
    busy_backoff: float = 0.02  # first back-off after "busy"; doubles, jittered
    # ... and at least this share of the time a piece takes to arrive (measured): a busy
    # uploader frees a slot about once per piece time / its slots, so asking sooner
    # mostly gets "busy" again, and on a real cell each answer costs both ends CPU
    busy_backoff_share: float = 0.25
    max_backoff: float = 0.5
    have_wait: float = 1.0  # how long an uploader may park a HaveQuery
    have_min_interval: float = 0.05  # spacing of queries to one peer
    max_have_queries: int = 4  # outstanding at once
    endgame_copies: int = 2
    max_bad_pieces: int = 2
    max_failures: int = 3
    lookup_interval: float = 1.0
    stall_lookup: float = 2.0  # no piece for this long: ask the homes (every lookup_interval)
    inflight_while_fetching: int = 1  # budget of a cell's other downloads, see registry_first
    stream_ahead: int = 1  # the runtime's next pieces, asked for before the rarest


# ---------------------------------------------------------------------------------------
# Messages between a downloader and an uploader (peer API; wire.py may encode them too).
# As in placement.py the sender is not a field: the transport authenticates it and passes
# it to the Uploader's methods (and to the Download's on_* as `peer_id`).


class PieceStatus(IntEnum):
    OK = 0  # the piece follows (HTTP body / simulated flow)
    QUEUED = 1  # accepted, starts when a slot frees (uploader-internal: no reply yet)
    BUSY = 2  # every slot and the queue are full: ask someone else
    MISSING = 3  # the uploader does not hold that piece (see `have`)


@dataclass(frozen=True, slots=True)
class PieceRequest:
    digest: Digest
    index: int


@dataclass(frozen=True, slots=True)
class PieceReply:
    digest: Digest
    index: int
    status: PieceStatus
    have: int  # the responder's bitmap now (piggybacked)
    complete: bool


@dataclass(frozen=True, slots=True)
class PieceCancel:
    digest: Digest
    index: int


@dataclass(frozen=True, slots=True)
class HaveQuery:
    """'Tell me your pieces once you hold one of `want`' (parked up to have_wait)."""

    digest: Digest
    want: int


@dataclass(frozen=True, slots=True)
class HaveReply:
    digest: Digest
    have: int
    complete: bool


# ---------------------------------------------------------------------------------------
# Events a Download asks its caller to act on


@dataclass(frozen=True, slots=True)
class RequestPiece:
    """Send PieceRequest(digest, index) to `peer`."""

    peer: MemberId
    digest: Digest
    index: int


@dataclass(frozen=True, slots=True)
class CancelPiece:
    """Abort the transfer of `index` from `peer` (another copy arrived, or it timed out)."""

    peer: MemberId
    digest: Digest
    index: int


@dataclass(frozen=True, slots=True)
class QueryHave:
    """Send HaveQuery(digest, want) to `peer`."""

    peer: MemberId
    digest: Digest
    want: int


@dataclass(frozen=True, slots=True)
class NeedProviders:
    """Look the digest up at its homes (placement.ProviderLookup) and feed the result."""

    digest: Digest


@dataclass(frozen=True, slots=True)
class FetchUpstream:
    """This cell holds the lease: read these piece ranges (half-open, in piece indices)
    from the registries, in order, and feed each piece with on_piece(UPSTREAM, ...)."""

    digest: Digest
    ranges: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class BadPiece:
    digest: Digest
    index: int
    peer: MemberId


@dataclass(frozen=True, slots=True)
class PeerBanned:
    digest: Digest
    peer: MemberId
    bad_pieces: int


@dataclass(frozen=True, slots=True)
class DownloadComplete:
    """Every piece is held and verified; check the blob's sha256 before announcing it."""

    digest: Digest


Event = (
    RequestPiece
    | CancelPiece
    | QueryHave
    | NeedProviders
    | FetchUpstream
    | BadPiece
    | PeerBanned
    | DownloadComplete
)


class ProviderLike(Protocol):
    @property
    def member(self) -> MemberId: ...
    @property
    def zone(self) -> str: ...
    @property
    def complete(self) -> bool: ...
    @property
    def pieces(self) -> int: ...


# ---------------------------------------------------------------------------------------
# Download


class _Peer:
    __slots__ = (
        "asked",
        "backoff",
        "bad",
        "busy_until",
        "complete",
        "failures",
        "have",
        "id",
        "inflight",
        "local",
        "next_query",
        "query_deadline",
        "requested",
    )

    def __init__(self, peer: MemberId, local: bool) -> None:
        self.id = peer
        self.local = local
        self.have = 0
        self.complete = False
        self.inflight: dict[int, float] = {}  # index -> deadline
        self.asked: dict[int, float] = {}  # index -> when it was asked for
        self.requested = 0  # bitmap of self.inflight's keys
        self.busy_until = 0.0
        self.backoff = 0.0
        self.bad = 0
        self.failures = 0
        self.query_deadline: float | None = None
        self.next_query = 0.0


_T_REQUEST, _T_QUERY, _T_WAKE = 0, 1, 2


class Download:
    """One blob being fetched by one cell (see the module docstring)."""

    def __init__(
        self,
        digest: Digest,
        piece_count: int,
        *,
        self_id: MemberId,
        zone: str,
        rng: random.Random,
        config: SwarmConfig = SwarmConfig(),
        held: int = 0,
    ) -> None:
        self.digest = digest
        self.piece_count = piece_count
        self.self_id = self_id
        self.zone = zone
        self.config = config
        self._rng = rng
        self._full = bitmap_full(piece_count)
        self.held = held & self._full
        self._wanted = self._full & ~self.held
        self._inflight = 0  # pieces with >= 1 request out
        self._saturated = 0  # pieces with endgame_copies requests out
        self._upstream = 0  # pieces expected from the registries
        self._copies: dict[int, list[MemberId]] = {}
        self._n_inflight = 0
        self._piece_time = 0.0  # moving average of request-to-arrival, for busy back-offs
        self._timeout = config.request_timeout  # a request's deadline, from when it is sent
        self._peers: dict[MemberId, _Peer] = {}
        self._banned: set[MemberId] = set()
        self._planes: list[int] = []
        # the OR of the planes: the pieces some known peer holds, kept by _avail_add and
        # _avail_sub rather than computed, since _step asks after every input
        self._held_somewhere = 0
        self._timers: list[tuple[float, int, int, MemberId, int]] = []
        self._seq = 0
        self._backoffs: list[float] = []  # ends of peers' back-offs, not yet a timer
        self._wake_at = math.inf  # the back-off wake-up timer queued, if any
        self._queries = 0
        self._next_query_scan = 0.0
        self._query_timer = False
        self.max_inflight = config.max_inflight
        self._next_lookup = 0.0
        self._lookup_timer = False
        self._done_reported = False
        self.lease = False
        self._lease_holder: MemberId = ""
        # the lease holder died and no live one is known yet: look up every
        # lookup_interval, even while asking the other downloaders what they have
        self._holder_lost = False
        self._progress_at = 0.0  # when a piece last arrived (or the download started)
        # counters for reports
        self.pieces_from: dict[MemberId, int] = {}
        self.duplicates = 0
        self.bad_pieces = 0

    # -- public state -----------------------------------------------------------------

    @property
    def complete(self) -> bool:
        return self.held == self._full

    @property
    def peers(self) -> list[MemberId]:
        return list(self._peers)

    @property
    def banned(self) -> frozenset[MemberId]:
        return frozenset(self._banned)

    @property
    def fetching_upstream(self) -> bool:
        """This cell holds the lease and still expects pieces from the registries."""
        return self.lease and bool(self._upstream)

    @property
    def inflight(self) -> int:
        """Requests out to peers (the registries not counted)."""
        return self._n_inflight

    def availability(self, index: int) -> int:
        """How many known peers hold piece `index` (for tests and reports)."""
        return sum(((plane >> index) & 1) << k for k, plane in enumerate(self._planes))

    # -- availability counter (bit-sliced) --------------------------------------------

    def _avail_add(self, bits: int) -> None:
        self._held_somewhere |= bits  # a count only grows here
        planes = self._planes
        carry = bits
        for k in range(len(planes)):
            if not carry:
                return
            p = planes[k]
            planes[k] = p ^ carry
            carry &= p
        if carry:
            planes.append(carry)

    def _avail_sub(self, bits: int) -> None:
        planes = self._planes
        borrow = bits
        for k in range(len(planes)):
            if not borrow:
                break
            p = planes[k]
            planes[k] = p ^ borrow
            borrow &= ~p
        while planes and not planes[-1]:
            planes.pop()
        bits = 0
        for plane in planes:
            bits |= plane
        self._held_somewhere = bits

    def _rarest(self, cand: int) -> int:
        for plane in reversed(self._planes):
            low = cand & ~plane
            if low:
                cand = low
        return cand

    # -- timers -----------------------------------------------------------------------

    def _timer(self, when: float, kind: int, peer: MemberId = "", index: int = -1) -> None:
        self._seq += 1
        heapq.heappush(self._timers, (when, self._seq, kind, peer, index))

    def next_deadline(self) -> float | None:
        """When poll() next has something to do (None: nothing scheduled)."""
        timers = self._timers
        peers = self._peers
        while timers:
            when, _, kind, peer_id, index = timers[0]
            if kind == _T_WAKE:
                stale = index == -1 and when != self._wake_at
            else:
                peer = peers.get(peer_id)
                stale = peer is None or (
                    peer.inflight.get(index) != when
                    if kind == _T_REQUEST
                    else peer.query_deadline != when
                )
            if not stale:
                return when
            heapq.heappop(timers)
        return None

    # -- entry points -----------------------------------------------------------------

    def start(self, now: float) -> list[Event]:
        out: list[Event] = []
        if self.complete:
            self._check_done(out)
            return out
        self._progress_at = now
        self._next_lookup = now + self.config.lookup_interval
        out.append(NeedProviders(self.digest))
        return out

    def add_providers(
        self, providers: Iterable[ProviderLike], now: float, *, lease_holder: MemberId = ""
    ) -> list[Event]:
        """Providers from a lookup (or any other source). Bitmaps only grow knowledge.
        `lease_holder`: the cell the homes say is fetching from the registries (the
        lookup result's), remembered so that banning it makes this cell fetch for
        itself instead of starving behind a cell that sends bad pieces."""
        if lease_holder and lease_holder != self.self_id:
            self._lease_holder = lease_holder
            self._holder_lost = False
        for info in providers:
            member = info.member
            if member == self.self_id or member in self._banned:
                continue
            peer = self._peers.get(member)
            if peer is None:
                if len(self._peers) >= self.config.max_peers:
                    continue
                peer = self._peers[member] = _Peer(member, info.zone == self.zone)
            self._learn(peer, self._full if info.complete else info.pieces, info.complete)
        out: list[Event] = []
        self._step(now, out)
        return out

    def remove_provider(self, peer_id: MemberId, now: float) -> list[Event]:
        """The peer is gone (membership says dead, or it withdrew the blob). When it was
        the lease holder the homes are asked again at once: the pieces it had not sent
        yet come from nobody else, and a download busy asking the other downloaders
        what they have would not count as starving, so it would never ask them (in the
        testbed, every cell waited 30 s for pieces of a lease holder killed mid-read)."""
        out: list[Event] = []
        peer = self._peers.get(peer_id)
        if peer is not None:
            self._drop(peer, out, cancel=False)
        self._holder_gone(peer_id, now, out)
        self._step(now, out)
        return out

    def _holder_gone(self, peer_id: MemberId, now: float, out: list[Event]) -> None:
        """`peer_id` is gone (dead, withdrawn, or it failed every request): when it was
        the lease holder, ask the homes at once, and again every lookup_interval until
        a live holder is known or the lease comes here. Once is not enough: a home
        that has not heard of the death yet names the dead holder again, and then
        nothing else would make this cell ask (one kill storm in 15: 30 s stalled)."""
        if peer_id == self._lease_holder and not self.lease and not self.complete:
            self._lease_holder = ""
            self._holder_lost = True
            self._next_lookup = now + self.config.lookup_interval
            out.append(NeedProviders(self.digest))

    def grant_lease(self, now: float) -> list[Event]:
        """The homes chose this cell to read the blob from the registries."""
        self.lease = True
        self._holder_lost = False
        out: list[Event] = []
        self._step(now, out)
        return out

    def release_lease(self, now: float) -> list[Event]:
        """The registries failed (or another cell holds the lease after all): stop
        expecting pieces from them; the caller withdraws its lease announcement."""
        self.lease = False
        self._upstream = 0
        out: list[Event] = []
        self._step(now, out)
        return out

    def on_piece(
        self,
        peer_id: MemberId,
        index: int,
        ok: bool,
        now: float,
        *,
        have: int | None = None,
        complete: bool = False,
    ) -> list[Event]:
        """A piece arrived from `peer_id` (or UPSTREAM); `ok` says it verified."""
        out: list[Event] = []
        if not 0 <= index < self.piece_count:
            return out
        bit = 1 << index
        if peer_id == UPSTREAM:
            self._upstream &= ~bit
            if ok:
                self._progress_at = now
                self._store(index, bit, UPSTREAM, out)
            else:
                self._wanted |= bit & ~self.held  # re-plan it (from peers or upstream)
            self._step(now, out)
            return out
        peer = self._peers.get(peer_id)
        if peer is not None:
            asked = peer.asked.get(index)
            if ok and asked is not None:
                took = now - asked
                self._piece_time = (
                    took if not self._piece_time else (0.8 * self._piece_time + 0.2 * took)
                )
                cfg = self.config
                self._timeout = min(
                    cfg.max_request_timeout,
                    max(cfg.request_timeout, cfg.timeout_factor * self._piece_time),
                )
            self._unrequest(peer, index)
            if have is not None:
                self._learn(peer, have, complete)
        if ok:
            self._progress_at = now
            if peer is not None:
                peer.failures = 0
                peer.backoff = 0.0
            self._store(index, bit, peer_id, out)
        else:
            self.bad_pieces += 1
            out.append(BadPiece(self.digest, index, peer_id))
            if peer is not None:
                peer.bad += 1
                if peer.bad >= self.config.max_bad_pieces:
                    self._banned.add(peer_id)
                    out.append(PeerBanned(self.digest, peer_id, peer.bad))
                    self._drop(peer, out, cancel=True)
                    if peer_id == self._lease_holder:
                        self.lease = True  # a lease of our own: see add_providers
        self._step(now, out)
        return out

    def on_busy(
        self, peer_id: MemberId, index: int, now: float, *, have: int | None = None
    ) -> list[Event]:
        out: list[Event] = []
        peer = self._peers.get(peer_id)
        if peer is not None:
            self._unrequest(peer, index)
            if have is not None:
                self._learn(peer, have, peer.complete)
            cfg = self.config
            first = max(cfg.busy_backoff, cfg.busy_backoff_share * self._piece_time)
            peer.backoff = min(cfg.max_backoff, max(first, 2 * peer.backoff))
            peer.busy_until = now + peer.backoff * (0.5 + self._rng.random())
            heapq.heappush(self._backoffs, peer.busy_until)
        self._step(now, out)
        return out

    def on_missing(
        self, peer_id: MemberId, index: int, now: float, *, have: int | None = None
    ) -> list[Event]:
        out: list[Event] = []
        peer = self._peers.get(peer_id)
        if peer is not None:
            self._unrequest(peer, index)
            if have is not None:
                # The peer lost pieces (eviction): replace rather than merge.
                self._avail_sub(peer.have & ~have)
                peer.have &= have
                self._learn(peer, have, False)
            else:
                self._avail_sub(peer.have & (1 << index))
                peer.have &= ~(1 << index)
        self._step(now, out)
        return out

    def on_have(self, peer_id: MemberId, have: int, complete: bool, now: float) -> list[Event]:
        out: list[Event] = []
        peer = self._peers.get(peer_id)
        if peer is not None:
            if peer.query_deadline is not None:
                wait = self.config.have_wait
                asked = peer.query_deadline - 2 * wait
                if not complete and not have & self._wanted and now - asked < wait:
                    # Answered at once with nothing we want: the peer could not park the
                    # query (too many parked already). Asking it again in a few ms would
                    # only poll; give it the time a parked query would have had.
                    peer.next_query = max(peer.next_query, asked + wait / 4)
                peer.query_deadline = None
                self._queries -= 1
            self._learn(peer, have, complete)
        self._step(now, out)
        return out

    def on_error(self, peer_id: MemberId, index: int, now: float) -> list[Event]:
        """The transfer of `index` from the peer failed (connection refused, reset...)."""
        out: list[Event] = []
        peer = self._peers.get(peer_id)
        if peer is not None:
            self._unrequest(peer, index)
            self._failed(peer, now, out)
        self._step(now, out)
        return out

    def poll(self, now: float) -> list[Event]:
        """Timeouts and back-offs due at `now`, then whatever can be asked for."""
        out: list[Event] = []
        timers = self._timers
        while timers and timers[0][0] <= now:
            when, _, kind, peer_id, index = heapq.heappop(timers)
            peer = self._peers.get(peer_id)
            if kind == _T_REQUEST:
                if peer is not None and peer.inflight.get(index) == when:
                    if when >= peer.asked[index] + self._timeout:
                        # sent with the current deadline (`_request` added the same two
                        # floats): double it, once for all the requests that one
                        # congested link times out together
                        self._timeout = min(self.config.max_request_timeout, 2 * self._timeout)
                    self._unrequest(peer, index)
                    out.append(CancelPiece(peer_id, self.digest, index))
                    self._failed(peer, now, out)
            elif kind == _T_QUERY:
                if peer is not None and peer.query_deadline == when:
                    peer.query_deadline = None
                    self._queries -= 1
            elif kind == _T_WAKE and index == -1:
                if when == self._wake_at:
                    self._wake_at = math.inf
            elif kind == _T_WAKE and index == -2:
                self._lookup_timer = False
            elif kind == _T_WAKE and index == -3:
                self._query_timer = False
        self._step(now, out)
        return out

    # -- internals --------------------------------------------------------------------

    def _learn(self, peer: _Peer, have: int, complete: bool) -> None:
        have &= self._full
        if complete:
            have = self._full
            peer.complete = True
        new = have & ~peer.have
        if new:
            peer.have |= new
            self._avail_add(new)

    def _unrequest(self, peer: _Peer, index: int) -> None:
        if peer.inflight.pop(index, None) is None:
            return
        del peer.asked[index]
        bit = 1 << index
        peer.requested &= ~bit
        self._n_inflight -= 1
        holders = self._copies[index]
        holders.remove(peer.id)
        if len(holders) < self.config.endgame_copies:
            self._saturated &= ~bit
        if not holders:
            del self._copies[index]
            self._inflight &= ~bit

    def _request(self, peer: _Peer, index: int, now: float, out: list[Event]) -> None:
        deadline = now + self._timeout
        peer.inflight[index] = deadline
        peer.asked[index] = now
        bit = 1 << index
        peer.requested |= bit
        self._n_inflight += 1
        self._inflight |= bit
        holders = self._copies.setdefault(index, [])
        holders.append(peer.id)
        if len(holders) >= self.config.endgame_copies:
            self._saturated |= bit
        self._timer(deadline, _T_REQUEST, peer.id, index)
        out.append(RequestPiece(peer.id, self.digest, index))

    def _store(self, index: int, bit: int, source: MemberId, out: list[Event]) -> None:
        if self.held & bit:
            self.duplicates += 1
            return
        self.held |= bit
        self._wanted &= ~bit
        self.pieces_from[source] = self.pieces_from.get(source, 0) + 1
        for other in list(self._copies.get(index, ())):
            peer = self._peers[other]
            self._unrequest(peer, index)
            out.append(CancelPiece(other, self.digest, index))
        self._check_done(out)

    def _check_done(self, out: list[Event]) -> None:
        if self.held == self._full and not self._done_reported:
            self._done_reported = True
            out.append(DownloadComplete(self.digest))

    def _failed(self, peer: _Peer, now: float, out: list[Event]) -> None:
        peer.failures += 1
        if peer.failures >= self.config.max_failures:
            self._drop(peer, out, cancel=True)
            self._holder_gone(peer.id, now, out)
        else:
            peer.busy_until = now + self.config.busy_backoff * (1 << peer.failures)
            heapq.heappush(self._backoffs, peer.busy_until)

    def _drop(self, peer: _Peer, out: list[Event], *, cancel: bool) -> None:
        for index in list(peer.inflight):
            self._unrequest(peer, index)
            if cancel:
                out.append(CancelPiece(peer.id, self.digest, index))
        if peer.query_deadline is not None:
            self._queries -= 1
        self._avail_sub(peer.have)
        del self._peers[peer.id]

    def _step(self, now: float, out: list[Event]) -> None:
        """Ask for everything that can be asked for now, in order of preference. Runs
        after every input, so it first checks with a few big-int operations whether
        anything can be asked for at all (in a storm, mostly nothing can)."""
        if self.held == self._full:
            return
        avail = self._held_somewhere
        free = self._wanted & ~(self._inflight | self._upstream)
        if self.lease:
            missing = free & ~avail
            if missing:
                self._upstream |= missing
                free &= ~missing
                out.append(FetchUpstream(self.digest, tuple(bitmap_ranges(missing))))
        if self._n_inflight < self.max_inflight and (
            free & avail or (not free and self._wanted & self._inflight & ~self._saturated)
        ):
            self._fill(now, out)
        if self._n_inflight < self.max_inflight and free:
            self._query(now, out, free)
        self._maybe_lookup(now, out)
        if self._backoffs and self._n_inflight < self.max_inflight:
            self._wake_after_backoff(now)

    def _wake_after_backoff(self, now: float) -> None:
        """Queue a wake-up for when the next peer's back-off ends, only while the budget
        is not spent: a download with its requests out is woken by their replies anyway,
        and in a storm most back-offs end unnoticed that way (one timer event saved per
        busy reply)."""
        ends = self._backoffs
        while ends and ends[0] <= now:
            heapq.heappop(ends)
        if ends and ends[0] < self._wake_at:
            self._wake_at = ends[0]
            self._timer(ends[0], _T_WAKE, "", -1)

    def set_max_inflight(self, limit: int, now: float) -> list[Event]:
        """Change this download's budget of requests in flight (the cell may lower it
        while it reads another blob from the registries, see Download's docstring)."""
        self.max_inflight = limit
        out: list[Event] = []
        self._step(now, out)
        return out

    def _fill(self, now: float, out: list[Event]) -> None:
        """Spend the budget of requests: the rarest askable piece, then its holder.

        "Askable" is decided before drawing: one pass over the peers ORs together what
        each peer ready for a request (under its cap, not backing off) holds and was not
        asked for, so the draw always finds a holder. Rarity still counts every known
        peer (the availability counter), so the piece drawn is the rarest in the swarm
        among those that can be asked for now. One pass over the peers and one over the
        ready ones a request."""
        cap = self.config.max_inflight_per_peer
        ahead = self.config.stream_ahead
        peers = self._peers.values()
        if len(self._peers) == 1 and next(iter(peers)).complete:
            # A lone complete peer: no other peer's link to spread over, so the whole
            # budget goes to it, and its link never idles for a round trip between
            # pieces; and nothing is rarer than anything else, so all of it in order
            # (the sha256 follows the prefix: pieces out of order wait to be hashed),
            # unless the config asks for rarest first only.
            cap = max(cap, self.max_inflight)
            if ahead:
                ahead = max(ahead, self.max_inflight)
        random = self._rng.random
        while self._n_inflight < self.max_inflight:
            # the pieces nobody was asked for; in the endgame (all asked for), the ones
            # in flight to fewer than endgame_copies peers, to ask a second peer
            want = self._wanted & ~(self._inflight | self._upstream) or (
                self._wanted & self._inflight & ~self._saturated
            )
            if not want:
                return
            ready: list[_Peer] = []
            cand = 0
            seeded = 0  # what complete peers among them can give
            for p in peers:
                # the tests in order of how often they fail in a storm: most known peers
                # hold nothing still wanted
                askable = p.have & want
                if askable and p.busy_until <= now and len(p.inflight) < cap:
                    if p.requested:
                        askable &= ~p.requested
                    if askable:
                        ready.append(p)
                        cand |= askable
                        if p.complete:
                            seeded |= askable
            if not cand:
                return
            urgent = seeded & self._stream_window(ahead) if seeded else 0
            if urgent:
                bit = urgent & -urgent  # the runtime reads in order: the lowest first
                index = bit.bit_length() - 1
            else:
                rare = self._rarest(cand)
                n = rare.bit_count()
                pick = int(random() * n)  # drawn even for one candidate: same rng stream
                index = rare.bit_length() - 1 if n == 1 else nth_set_bit(rare, pick)
                bit = 1 << index
            # Same zone first, then the fewest of our requests in flight; one rng draw
            # among the ties (this loop runs once a piece: keep it lean).
            best_key = 1 << 30
            holders: list[_Peer] = []
            for p in ready:
                if not p.have & bit or p.requested & bit:
                    continue
                key = len(p.inflight) if p.local else 1024 + len(p.inflight)
                if key < best_key:
                    best_key = key
                    holders = [p]
                elif key == best_key:
                    holders.append(p)
            best = holders[int(random() * len(holders))] if len(holders) > 1 else holders[0]
            self._request(best, index, now, out)

    def _stream_window(self, ahead: int) -> int:
        """The `ahead` lowest pieces not held: what the runtime, streamed the blob's
        verified prefix in order, waits for next (the first of them holds up its next
        byte)."""
        window = 0
        wanted = self._wanted
        for _ in range(ahead):
            low = wanted & -wanted
            if not low:
                break
            window |= low
            wanted ^= low
        return window

    def _query(self, now: float, out: list[Event], free: int) -> None:
        cfg = self.config
        if self._queries >= cfg.max_have_queries:
            return
        if now < self._next_query_scan:
            # Scans are spaced by have_min_interval; make sure one happens even if
            # nothing else wakes this download up.
            if not self._n_inflight and not self._query_timer:
                self._query_timer = True
                self._timer(self._next_query_scan, _T_WAKE, "", -3)
            return
        self._next_query_scan = now + cfg.have_min_interval
        # the tests in order of how often they fail in a storm (the big-int one last)
        idle = [
            p
            for p in self._peers.values()
            if p.busy_until <= now
            and not p.inflight
            and p.query_deadline is None
            and p.next_query <= now
            and not p.complete
            and not p.have & free
        ]
        if not idle:
            return
        slots = cfg.max_have_queries - self._queries
        if len(idle) > slots:
            idle = self._rng.sample(idle, slots)
        for p in idle:
            p.query_deadline = now + 2 * cfg.have_wait
            p.next_query = now + cfg.have_min_interval
            self._queries += 1
            self._timer(p.query_deadline, _T_QUERY, p.id)
            out.append(QueryHave(p.id, self.digest, self._wanted))

    def _maybe_lookup(self, now: float, out: list[Event]) -> None:
        cfg = self.config
        # Asking peers what they have is no progress when none has anything: a lease
        # holder that never reads (its grant's reply was lost, and it follows another
        # cell) would hold every cell's download for good, the homes never asked again.
        stalled = not self._upstream and now - self._progress_at >= cfg.stall_lookup
        starving = (
            self._holder_lost
            or stalled
            or (not self._n_inflight and not self._upstream and not (self._queries and self._peers))
        )
        if not starving and len(self._peers) >= cfg.min_peers:
            return
        if self.lease and not starving:
            return
        if now >= self._next_lookup:
            self._next_lookup = now + cfg.lookup_interval
            out.append(NeedProviders(self.digest))
        elif not self._lookup_timer:
            self._lookup_timer = True
            self._timer(self._next_lookup, _T_WAKE, "", -2)


def registry_first(downloads: Iterable[Download], now: float) -> list[tuple[Download, Event]]:
    """The cell's policy across its downloads: while one of them reads from the
    registries (it holds a lease), the others ask peers for at most
    `inflight_while_fetching` pieces each (0: they wait), so that the registry read
    keeps most of the cell's download link. The lease holder is the only way a new blob
    enters the swarm: every other cell waits on its read, so it must not share its link
    with the cell's own other layers more than it has to.

    The default is 1. Links split among their flows, so with a budget of b the read
    keeps 1/(b+1) of a link it would fill alone: half with 1. When the registry is
    slower than the link, the read leaves the link mostly idle, and one request for
    each other layer is enough to use it. Both storms measured (simulated, seed 1):
    - Kraken's (2 layers, 300 MB/s a cell, a 10 Gbit/s upstream: the read fills the
      link), 260 cells: p50 11.1 s, p99 12.4 s with 1, against 11.3 / 12.6 s with 0 and
      12.3 / 12.5 s with 2; with 2 the slower read also made every cell ask and be
      refused more (6.6 messages a cell a second against 4.6 with 1).
    - The testbed's (4 layers, the Hub and the cells at 200 Mbit/s, leases on 4
      cells: the read leaves the link idle): p99 13.5 s with 1, 13.6 s with 2 and
      19.0 s with 0, where every lease holder finished last (seeds 1-5: p99
      13.2-13.9 s with 1, 13.4-13.6 s with 2).

    Call it whenever a download of the cell gains or loses a lease or completes;
    returns the events of the downloads whose budget changed (act on them as usual)."""
    downloads = list(downloads)
    fetching = any(d.fetching_upstream for d in downloads)
    out: list[tuple[Download, Event]] = []
    for d in downloads:
        if d.complete:
            continue
        cfg = d.config
        limit = cfg.inflight_while_fetching if fetching and not d.lease else cfg.max_inflight
        if d.max_inflight != limit:
            out.extend((d, ev) for ev in d.set_max_inflight(limit, now))
    return out


# ---------------------------------------------------------------------------------------
# Uploader


class _Seed:
    __slots__ = ("complete", "have", "origin", "parked", "piece_count", "satisfied", "spread")

    def __init__(self, piece_count: int, have: int) -> None:
        self.piece_count = piece_count
        self.have = have
        self.complete = have == bitmap_full(piece_count)
        self.origin = False  # the cell reads this blob from the registries (the lease)
        self.spread = 0  # an origin's pieces it has begun uploading once
        self.parked: dict[MemberId, tuple[int, float]] = {}  # requester -> (want, until)
        # parked requesters that want a piece held now, waiting for a free upload slot
        self.satisfied: dict[MemberId, None] = {}


def _shown(seed: _Seed, have: int) -> int:
    """`have` as an asker is told it (see Uploader.shown)."""
    if not seed.origin:
        return have
    fresh = have & ~seed.spread
    return fresh if fresh else have


class Uploader:
    """One cell's upload side: `slots` uploads at once, then a queue of `queue`, then
    BUSY so the asker goes elsewhere rather than wait behind a crowd. A fixed number of
    slots (not one per asker) keeps each upload fast: a piece sent at full speed to one
    peer becomes a source twice sooner than two pieces sent at half speed."""

    def __init__(
        self,
        self_id: MemberId,
        *,
        slots: int = 4,
        queue: int = 0,
        max_parked: int = 32,
        have_wait: float = 1.0,
    ) -> None:
        self.self_id = self_id
        self.slots = slots
        self.queue_limit = queue
        self.max_parked = max_parked
        self.have_wait = have_wait
        self._seeds: dict[Digest, _Seed] = {}
        self._active: set[tuple[MemberId, Digest, int]] = set()
        self._queue: deque[tuple[MemberId, Digest, int]] = deque()
        self._parked_deadlines: list[tuple[float, Digest, MemberId]] = []
        self.uploads_done = 0
        self.busy_replies = 0

    @property
    def load(self) -> int:
        """Uploads in progress (what announcements report)."""
        return len(self._active)

    def have(self, digest: Digest) -> int:
        seed = self._seeds.get(digest)
        return seed.have if seed is not None else 0

    def set_origin(self, digest: Digest, origin: bool) -> None:
        """The cell holds the fetch lease of `digest` and reads it from the registries
        (True), or no longer (False): see `shown`."""
        seed = self._seeds.get(digest)
        if seed is not None:
            seed.origin = origin
            seed.spread = 0

    def shown(self, digest: Digest, have: int) -> int:
        """The pieces of `have` this cell tells askers it holds. An origin (the lease
        holder, still reading from the registries) is the only source of the pieces it
        just read, and its upload link the narrowest pipe of the whole storm: every new
        piece must leave it at least once. Sending the newest piece to each asker in
        turn spends that link on copies the askers could take from each other. So, like
        BitTorrent's super-seeding (BEP 16), an origin shows only the pieces it has not
        begun uploading yet (all of them once every held piece went out once): a piece
        it sent goes on from the cell that got it."""
        seed = self._seeds.get(digest)
        return have if seed is None else _shown(seed, have)

    def add_seed(
        self, digest: Digest, piece_count: int, have: int = 0
    ) -> list[tuple[MemberId, HaveReply]]:
        seed = self._seeds.get(digest)
        if seed is None:
            self._seeds[digest] = _Seed(piece_count, have)
            return []
        out: list[tuple[MemberId, HaveReply]] = []
        for index in bitmap_indices(have & ~seed.have):
            out.extend(self.piece_added(digest, index))
        return out

    def remove_seed(self, digest: Digest) -> None:
        """Evicted: later requests get MISSING with an empty bitmap."""
        self._seeds.pop(digest, None)

    def piece_added(self, digest: Digest, index: int) -> list[tuple[MemberId, HaveReply]]:
        """The cell now holds piece `index`: the parked queries that wanted it are
        answered, as (requester, reply) pairs to send."""
        seed = self._seeds.get(digest)
        if seed is None:
            return []
        bit = 1 << index
        seed.have |= bit
        seed.complete = seed.have == bitmap_full(seed.piece_count)
        if not seed.parked:
            return []
        free = self.slots - len(self._active)
        out: list[tuple[MemberId, HaveReply]] = []
        for r, (want, _) in seed.parked.items():
            if want & bit and r not in seed.satisfied:
                if len(out) < free:
                    out.append((r, HaveReply(digest, _shown(seed, seed.have), seed.complete)))
                else:
                    seed.satisfied[r] = None
        for r, _ in out:
            del seed.parked[r]
        return out

    def wake_parked(self) -> list[tuple[MemberId, HaveReply]]:
        """Answers for parked queries that want a piece held now, as many as there are
        free upload slots: call after a slot frees (on_done, on_cancel). A new piece
        wakes only as many askers as the cell can serve at once (piece_added); waking all
        of them sends a crowd that mostly gets BUSY and backs off, and the rest wait
        here for a slot instead (or for `have_wait`)."""
        free = self.slots - len(self._active)
        out: list[tuple[MemberId, HaveReply]] = []
        if free <= 0:
            return out
        for digest, seed in self._seeds.items():
            while seed.satisfied and len(out) < free:
                requester = next(iter(seed.satisfied))
                out.append(self._answer(digest, seed, requester))
        return out

    def _answer(
        self, digest: Digest, seed: _Seed, requester: MemberId
    ) -> tuple[MemberId, HaveReply]:
        seed.parked.pop(requester, None)
        seed.satisfied.pop(requester, None)
        return requester, HaveReply(digest, _shown(seed, seed.have), seed.complete)

    def on_have_query(self, sender: MemberId, q: HaveQuery, now: float) -> HaveReply | None:
        """The answer now, or None when parked (it comes from piece_added or poll)."""
        seed = self._seeds.get(q.digest)
        if seed is None:
            return HaveReply(q.digest, 0, False)
        if seed.have & q.want or seed.complete or len(seed.parked) >= self.max_parked:
            seed.parked.pop(sender, None)
            seed.satisfied.pop(sender, None)
            return HaveReply(q.digest, _shown(seed, seed.have), seed.complete)
        until = now + self.have_wait
        seed.parked[sender] = (q.want, until)
        heapq.heappush(self._parked_deadlines, (until, q.digest, sender))
        return None

    def poll(self, now: float) -> list[tuple[MemberId, HaveReply]]:
        """Parked queries whose wait is over, answered with the bitmap as it is."""
        out: list[tuple[MemberId, HaveReply]] = []
        heap = self._parked_deadlines
        while heap and heap[0][0] <= now:
            until, digest, requester = heapq.heappop(heap)
            seed = self._seeds.get(digest)
            if seed is None:
                continue
            parked = seed.parked.get(requester)
            if parked is not None and parked[1] == until:
                out.append(self._answer(digest, seed, requester))
        return out

    def next_deadline(self) -> float | None:
        """When poll() next has a parked query to answer. Deadlines of queries answered
        since (most of them, by piece_added or wake_parked) are dropped here, so that a
        caller timing poll() by this is not woken for nothing."""
        heap = self._parked_deadlines
        while heap:
            until, digest, requester = heap[0]
            seed = self._seeds.get(digest)
            parked = seed.parked.get(requester) if seed is not None else None
            if parked is not None and parked[1] == until:
                return until
            heapq.heappop(heap)
        return None

    def on_request(self, sender: MemberId, req: PieceRequest, now: float) -> PieceReply:
        """OK: start sending now. QUEUED: on_done will start it. BUSY/MISSING: sent back
        at once, with this cell's bitmap."""
        seed = self._seeds.get(req.digest)
        shown = _shown(seed, seed.have) if seed is not None else 0
        if seed is None or req.index < 0 or not (shown >> req.index) & 1:
            complete = seed.complete if seed is not None else False
            return PieceReply(req.digest, req.index, PieceStatus.MISSING, shown, complete)
        key = (sender, req.digest, req.index)
        if len(self._active) < self.slots:
            self._active.add(key)
            status = PieceStatus.OK
        elif len(self._queue) < self.queue_limit:
            self._queue.append(key)
            status = PieceStatus.QUEUED
        else:
            self.busy_replies += 1
            status = PieceStatus.BUSY
        if status is not PieceStatus.BUSY and seed.origin:
            seed.spread |= 1 << req.index
            shown = _shown(seed, seed.have)
        return PieceReply(req.digest, req.index, status, shown, seed.complete)

    def on_done(
        self, requester: MemberId, digest: Digest, index: int
    ) -> list[tuple[MemberId, PieceRequest]]:
        """An upload finished (or failed): frees its slot; returns the queued requests
        that start now, as (requester, request): send each piece as for OK."""
        key = (requester, digest, index)
        if key in self._active:
            self._active.discard(key)
            self.uploads_done += 1
        started: list[tuple[MemberId, PieceRequest]] = []
        while self._queue and len(self._active) < self.slots:
            key = self._queue.popleft()
            self._active.add(key)
            started.append((key[0], PieceRequest(key[1], key[2])))
        return started

    def on_cancel(self, sender: MemberId, msg: PieceCancel) -> list[tuple[MemberId, PieceRequest]]:
        """The requester no longer wants it: drop it from the queue, or free its slot."""
        key = (sender, msg.digest, msg.index)
        if key in self._queue:
            self._queue.remove(key)
            return []
        return self.on_done(sender, msg.digest, msg.index)

    def piece_reply(self, digest: Digest, index: int) -> PieceReply:
        """The OK reply that goes with a piece (carries the current bitmap)."""
        seed = self._seeds.get(digest)
        have, complete = (
            (_shown(seed, seed.have), seed.complete) if seed is not None else (0, False)
        )
        return PieceReply(digest, index, PieceStatus.OK, have, complete)
