"""One cell's driver of the placement and swarm objects: the daemon's and the simulator's.

Owns: the protocol objects of one running cell (its `ProviderAnnouncer`,
`ProviderDirectory`, `Uploader`, its `Download`s and `ProviderLookup`s) and every rule
that joins them: a download that needs providers looks the digest up at its homes; a
lookup's result feeds the download; a granted lease is announced and the cell's other
downloads give way to its registry read (`swarm.registry_first`); a piece stored is served
and announced; a slot freed wakes the parked have-queries; one deadline for them all.
Never: opens a socket, reads a clock, sleeps, hashes bytes or draws OS randomness. Time
is `now`; randomness is the `random.Random` passed in; what the cell must do on the
network comes back as a list of actions, in the order to carry them out. The daemon
(celld/peering.py) and the simulator (simulations/model/celld.py) are two transports
around this one class, so that they run the same protocol with the same parameters.

How to drive it (one cell; `members` are the live ids of membership.py, self included)::

    cell = Cell("cell-a", "z1", placement=PlacementConfig(), swarm=SwarmConfig(),
                upload_slots=4, upload_queue=1, rng=random.Random(seed))
    cell.set_members(members, now)        -> actions  (each time the live set changes)
    cell.member_dead(name, now)           -> actions  (membership: dead or left)
    on a placement datagram (Lookup, LookupReply, Announce, Withdraw) from `sender`:
        cell.receive(sender, msg, now)    -> actions  (a Lookup's reply is a Send)
    timers: sleep until cell.next_deadline() (None: nothing due), then cell.tick(now)

  asking for a blob:
    cell.lookup(digest, now)              -> actions; Located(result) comes back later
        (result.piece_count: the blob's, when a home knows a provider; else 0. A
        GRANTED result is the fetch lease: start the download with it at once, since
        the homes keep a lease only lease_ttl without the holder's announcement)
    cell.download(digest, piece_count, now, located=result) -> actions
        (`located`: a LookupResult the caller already has, so it is not asked twice;
        without it the download looks the digest up itself)
    its transfers (the transport reports what its RequestPiece / QueryHave /
    FetchUpstream became):
        cell.piece_arrived(peer, digest, index, ok, now, have=, complete=)  (ok: verified)
        cell.piece_refused(peer, reply, now)         (reply.status BUSY or MISSING)
        cell.request_failed(peer, digest, index, now)  (connection error, reset)
        cell.have_arrived(peer, reply, now)          (the HaveReply to a QueryHave)
        cell.registry_piece(digest, index, ok, now)  (a piece read from the registries)
    DownloadComplete: check the blob's sha256, store it, then cell.hold(...); if the
    check fails, cell.abandon(digest, now)

  serving pieces:
    cell.piece_request(sender, digest, index, now) -> PieceReply
        OK: send the piece now, then upload_done; QUEUED: a StartUpload action
        starts it later; BUSY / MISSING: send the reply back
    cell.upload_done(to, digest, index, now)   -> actions (the upload ended, ok or not;
        also for a StartUpload the transport did not carry out)
    cell.upload_cancelled(sender, digest, index, now) -> actions (the asker cancelled)
    cell.have_query(sender, digest, want, now) -> HaveReply now, or None: a SendHave
        action answers it later

  the store:
    cell.hold(digest, piece_count, now)   -> actions  (a complete blob is in the store:
        at start-up for every blob it holds, and after a download's sha256 checked out)
    cell.drop(digest, now)                -> actions  (evicted or removed by gc)
    cell.abandon(digest, now)             -> actions  (a download given up; the
        transport stops its own transfers of the digest)

Actions, to carry out in order: `placement.Send` (a datagram to `to`, which may be the
cell itself: deliver that one locally), `swarm.RequestPiece`, `CancelPiece`,
`QueryHave`, `FetchUpstream` (read those piece ranges from the registries, feed each
piece to registry_piece), `DownloadComplete`, `BadPiece` and `PeerBanned` (to log and
count), `StartUpload` (a queued upload starts: send the piece with its reply),
`SendHave` (answer a parked have-query), `Located` (the answer to `lookup`), and
`LeaseGranted` (this cell reads the blob from the registries; FetchUpstream follows).
What the objects ask of each other (NeedProviders, registry_first, announcing progress,
waking parked queries) is done here and never reaches the transport.

Theory of operation
-------------------
Every input runs the objects it concerns and collects what they ask for, in the order
they ask: an event of a download is acted on before the next one, and an event this
class handles itself (a lookup to start, a result to feed) puts its own actions in that
place. So the transport sees exactly the sequence the objects produced, and carrying
actions out in order is enough. The transport may call back into the cell while it
carries out a list (`hold` after DownloadComplete, `upload_done` for a StartUpload it
drops, another input when its delivery is immediate): the rest of the list stays valid.

Deadlines. Every input notes the deadlines of the objects it touched, and
`next_deadline()` is the earliest noted since the last tick; `tick` recomputes it over
every object. So it is never late, costs nothing to ask (the simulator asks after every
input of 2,600 cells), and may be early when a deadline moved later: that tick finds
nothing due. Any input may move it earlier, so ask again after each one. Right after
`tick(now)` a deadline can still read <= now (an object compares elapsed times, and
floats round); it is then reported one millisecond after that tick, so a transport that
sleeps until next_deadline() never spins.

A complete download is forgotten at `hold` (the uploader and the announcer know the
blob from then on); until then late replies for it are taken and ignored by its
Download. Replies for a digest the cell no longer downloads are ignored.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass

from protocol import placement as pl
from protocol import swarm as sw
from protocol.pieces import bitmap_full

__all__ = [
    "Action",
    "Cell",
    "LeaseGranted",
    "Located",
    "SendHave",
    "StartUpload",
]

MemberId = str
Digest = str

_PLACEMENT = pl.PlacementConfig()
_SWARM = sw.SwarmConfig()
# Requests a cell with every upload slot taken holds for the next free one rather than
# answer BUSY. On the testbed (tbf links, 10-35 ms round trips under load) a BUSY costs
# its asker a round trip and a back-off, and the slot it would have taken starts a
# round trip late; a queue of one keeps the upload link busy from one piece to the
# next. Eight cells, seven storms each, interleaved: p99 1.33-1.38 x the limit with it
# (median 1.34), 1.33-1.50 without (median 1.38); busy replies 688-909 against
# 1102-1717 a storm. A queue of two: 1.34-1.39 in three.
UPLOAD_QUEUE = 1
_NEVER = float("inf")
_SPIN_GUARD = 1e-3  # seconds: how far after a tick a still-due deadline is reported


@dataclass(frozen=True, slots=True)
class StartUpload:
    """A queued request may start now: send piece `reply.index` of `reply.digest` to
    `to`, with `reply` (status OK, the current bitmap). If the transport no longer has
    that request (the asker went away), it calls `upload_done` to give the slot back."""

    to: MemberId
    reply: sw.PieceReply


@dataclass(frozen=True, slots=True)
class SendHave:
    """Send `reply` to `to`: the answer to a have-query that was parked."""

    to: MemberId
    reply: sw.HaveReply


@dataclass(frozen=True, slots=True)
class Located:
    """The answer to `Cell.lookup`: who provides the digest, and the lease decision
    (GRANTED: this cell was chosen to read it from the registries)."""

    result: pl.LookupResult


@dataclass(frozen=True, slots=True)
class LeaseGranted:
    """A download of this cell holds the fetch lease (FetchUpstream follows)."""

    digest: Digest


Action = (
    pl.Send
    | sw.RequestPiece
    | sw.CancelPiece
    | sw.QueryHave
    | sw.FetchUpstream
    | sw.DownloadComplete
    | sw.BadPiece
    | sw.PeerBanned
    | StartUpload
    | SendHave
    | Located
    | LeaseGranted
)

# the events of a Download that go to the transport as they are
_PASS_THROUGH = frozenset(
    {
        sw.RequestPiece,
        sw.CancelPiece,
        sw.QueryHave,
        sw.FetchUpstream,
        sw.BadPiece,
        sw.PeerBanned,
    }
)


class Cell:
    """The placement and swarm objects of one running cell (see the module docstring)."""

    __slots__ = (
        "_declined",
        "_deferred",
        "_granted",
        "_reported",
        "_soonest",
        "announcer",
        "directory",
        "downloads",
        "lookups",
        "lookups_started",
        "name",
        "next_request",
        "placement",
        "rng",
        "swarm",
        "uploader",
        "zone",
    )

    def __init__(
        self,
        name: MemberId,
        zone: str,
        *,
        placement: pl.PlacementConfig = _PLACEMENT,
        swarm: sw.SwarmConfig = _SWARM,
        upload_slots: int = 4,
        upload_queue: int = UPLOAD_QUEUE,
        rng: random.Random,
    ) -> None:
        self.name = name
        self.zone = zone
        self.placement = placement
        self.swarm = swarm
        self.rng = rng
        self.announcer = pl.ProviderAnnouncer(name, zone, config=placement)
        self.directory = pl.ProviderDirectory(name, rng=rng, config=placement)
        self.uploader = sw.Uploader(
            name, slots=upload_slots, queue=upload_queue, have_wait=swarm.have_wait
        )
        self.downloads: dict[Digest, sw.Download] = {}
        self.lookups: dict[int, pl.ProviderLookup] = {}
        self.next_request = 0
        self.lookups_started = 0
        self._reported: set[int] = set()  # request ids of lookups the caller asked for
        self._granted: dict[Digest, float] = {}  # leases granted to this cell -> when
        self._declined: set[Digest] = set()  # leases it gave back once (see _give_back)
        self._deferred: dict[Digest, tuple[float, bool]] = {}  # lookups to redo: when, report
        self._soonest = _NEVER  # no object's deadline is earlier (see next_deadline)

    # -- membership and placement datagrams ------------------------------------------

    def set_members(self, live_ids: frozenset[MemberId], now: float) -> list[Action]:
        """The live members changed (self included): the directory forgets the dead's
        records and leases; announcements go to the homes the cell's digests gained.
        Pass the same frozenset object to many cells to share placement's caches."""
        self.directory.set_members(live_ids, now)
        out: list[Action] = list(self.announcer.set_members(live_ids, now))
        self._sooner(self.announcer.next_deadline())
        return out

    def member_dead(self, name: MemberId, now: float) -> list[Action]:
        """Membership says `name` is dead or left: stop asking it for pieces (its
        requests in flight go back to the pool; the transport drops its connections)."""
        out: list[Action] = []
        for dl in list(self.downloads.values()):
            if not dl.complete:
                self._events(dl, dl.remove_provider(name, now), now, out)
        return out

    def receive(self, sender: MemberId, msg: pl.Message, now: float) -> list[Action]:
        """A placement datagram from `sender` (its authenticated id)."""
        out: list[Action] = []
        kind = type(msg)
        if kind is pl.Lookup:
            out.append(pl.Send(sender, self.directory.receive_lookup(sender, msg, now)))
            self._sooner(self.directory.next_deadline())  # a lease granted expires
        elif kind is pl.LookupReply:
            look = self.lookups.get(msg.request_id)
            if look is not None:
                result = look.receive(sender, msg, now)
                if result is not None:
                    del self.lookups[msg.request_id]
                    self._lookup_result(msg.request_id, result, now, out)
            elif msg.lease == pl.LeaseStatus.GRANTED and msg.lease_holder == self.name:
                self._release_stray(msg.digest, (sender,), out)
        elif kind is pl.Announce:
            self.directory.receive_announce(sender, msg, now)
            self._sooner(self.directory.next_deadline())
        elif kind is pl.Withdraw:
            self.directory.receive_withdraw(sender, msg, now)
        return out

    # -- timers ----------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """When to call tick() next (None: nothing scheduled). Never later than the
        earliest deadline of the cell's objects; it may be earlier (a deadline that
        moved later since the last tick), and then that tick does nothing but find the
        next one. Right after tick(now) it is later than `now` (see the module
        docstring), so a transport that sleeps until it does not spin."""
        return None if self._soonest == _NEVER else self._soonest

    def _sooner(self, when: float | None) -> None:
        """An object's deadline may have moved earlier: keep next_deadline() no later."""
        if when is not None and when < self._soonest:
            self._soonest = when

    def _earliest(self) -> float:
        """The earliest deadline of every object of the cell (_NEVER: none)."""
        when = _NEVER
        for dl in self.downloads.values():
            t = dl.next_deadline()
            if t is not None and t < when:
                when = t
        for look in self.lookups.values():
            t = look.next_deadline()
            if t is not None and t < when:
                when = t
        for t, _ in self._deferred.values():
            if t < when:
                when = t
        for t in (
            self.uploader.next_deadline(),
            self.announcer.next_deadline(),
            self.directory.next_deadline(),
        ):
            if t is not None and t < when:
                when = t
        return when

    def tick(self, now: float) -> list[Action]:
        """Run every object whose deadline has come."""
        out: list[Action] = []
        t = self.directory.next_deadline()
        if t is not None and t <= now:
            self.directory.expire(now)
        t = self.announcer.next_deadline()
        if t is not None and t <= now:
            out.extend(self.announcer.tick(now, load=self.uploader.load))
        t = self.uploader.next_deadline()
        if t is not None and t <= now:
            out.extend(SendHave(to, reply) for to, reply in self.uploader.poll(now))
        if self._deferred:
            for digest, (when, report) in list(self._deferred.items()):
                if when <= now:
                    del self._deferred[digest]
                    self._lookup(digest, now, out, report=report)
        if self.lookups:
            for rid in list(self.lookups):
                look = self.lookups[rid]
                t = look.next_deadline()
                if t is not None and t <= now:
                    out.extend(look.poll(now))
                    if look.done:
                        del self.lookups[rid]
                        self._lookup_result(rid, look.result, now, out)
        for dl in self.downloads.values():
            t = dl.next_deadline()
            if t is not None and t <= now:
                self._events(dl, dl.poll(now), now, out)
        when = self._earliest()
        # a deadline still due (an elapsed-time test rounded the other way) would spin
        self._soonest = now + _SPIN_GUARD if when <= now else when
        return out

    # -- asking for a blob -----------------------------------------------------------

    def lookup(self, digest: Digest, now: float) -> list[Action]:
        """Ask the digest's homes who provides it (and for the lease when nobody does);
        the answer comes back as a Located action, also fed to the digest's download if
        one runs."""
        out: list[Action] = []
        self._lookup(digest, now, out, report=True)
        return out

    def download(
        self,
        digest: Digest,
        piece_count: int,
        now: float,
        *,
        located: pl.LookupResult | None = None,
    ) -> list[Action]:
        """Start downloading `digest` (a no-op when it runs already or the blob is
        held). Its pieces are served and announced as they arrive. `located`: a lookup
        result the caller already has (from `lookup`), used instead of a lookup of its
        own; its `piece_count` is the blob's when a provider is known (0 otherwise)."""
        out: list[Action] = []
        full = bitmap_full(piece_count)
        if digest in self.downloads or (full and self.uploader.have(digest) == full):
            return out
        dl = sw.Download(
            digest, piece_count, self_id=self.name, zone=self.zone, rng=self.rng, config=self.swarm
        )
        self.downloads[digest] = dl
        self.uploader.add_seed(digest, piece_count, 0)
        # A lease this cell was granted is announced as such from the start: the homes
        # take an announcement without it from their lease holder as a release.
        leased = located is not None and located.lease == pl.LeaseStatus.GRANTED
        out.extend(
            self.announcer.update(
                digest, complete=False, pieces=0, piece_count=piece_count, now=now, lease=leased
            )
        )
        self._sooner(self.announcer.next_deadline())
        events = dl.start(now)  # also spaces the download's own lookups
        if located is None:
            self._events(dl, events, now, out)
        else:
            rest = [ev for ev in events if type(ev) is not sw.NeedProviders]
            self._events(dl, rest, now, out)
            self._feed(dl, located, now, out)
        return out

    def piece_arrived(
        self,
        peer: MemberId,
        digest: Digest,
        index: int,
        ok: bool,
        now: float,
        *,
        have: int | None = None,
        complete: bool = False,
    ) -> list[Action]:
        """Piece `index` came from `peer` with its reply's bitmap; `ok`: it verified."""
        out: list[Action] = []
        dl = self.downloads.get(digest)
        if dl is not None:
            had = dl.held >> index & 1
            events = dl.on_piece(peer, index, ok, now, have=have, complete=complete)
            if ok and not had and dl.held >> index & 1:
                self._stored(dl, index, now, out)
            self._events(dl, events, now, out)
        return out

    def registry_piece(self, digest: Digest, index: int, ok: bool, now: float) -> list[Action]:
        """Piece `index` read from the registries (ok: it verified; not ok: the read
        failed, and the piece is planned again)."""
        return self.piece_arrived(sw.UPSTREAM, digest, index, ok, now)

    def piece_refused(self, peer: MemberId, reply: sw.PieceReply, now: float) -> list[Action]:
        """`peer` answered a piece request with BUSY or MISSING."""
        out: list[Action] = []
        dl = self.downloads.get(reply.digest)
        if dl is not None:
            if reply.status == sw.PieceStatus.BUSY:
                events = dl.on_busy(peer, reply.index, now, have=reply.have)
            else:
                events = dl.on_missing(peer, reply.index, now, have=reply.have)
            self._events(dl, events, now, out)
        return out

    def request_failed(
        self, peer: MemberId, digest: Digest, index: int, now: float
    ) -> list[Action]:
        """The request of `index` from `peer` failed (connect error, reset, cut flow)."""
        out: list[Action] = []
        dl = self.downloads.get(digest)
        if dl is not None:
            self._events(dl, dl.on_error(peer, index, now), now, out)
        return out

    def have_arrived(self, peer: MemberId, reply: sw.HaveReply, now: float) -> list[Action]:
        """`peer` answered a QueryHave."""
        out: list[Action] = []
        dl = self.downloads.get(reply.digest)
        if dl is not None and not dl.complete:
            self._events(dl, dl.on_have(peer, reply.have, reply.complete, now), now, out)
        return out

    # -- serving pieces --------------------------------------------------------------

    def piece_request(
        self, sender: MemberId, digest: Digest, index: int, now: float
    ) -> sw.PieceReply:
        """`sender` asks for a piece: OK (send it now, then upload_done), QUEUED (a
        StartUpload follows), BUSY or MISSING (send the reply back)."""
        return self.uploader.on_request(sender, sw.PieceRequest(digest, index), now)

    def upload_done(self, to: MemberId, digest: Digest, index: int, now: float) -> list[Action]:
        """An upload to `to` ended (sent, failed, or never started): its slot is free."""
        return self._slot_freed(self.uploader.on_done(to, digest, index))

    def upload_cancelled(
        self, sender: MemberId, digest: Digest, index: int, now: float
    ) -> list[Action]:
        """`sender` no longer wants the piece (queued or being sent)."""
        return self._slot_freed(self.uploader.on_cancel(sender, sw.PieceCancel(digest, index)))

    def _slot_freed(self, started: list[tuple[MemberId, sw.PieceRequest]]) -> list[Action]:
        """Queued uploads that start now, then parked have-queries the cell can serve."""
        up = self.uploader
        out: list[Action] = [
            StartUpload(requester, up.piece_reply(req.digest, req.index))
            for requester, req in started
        ]
        woken = up.wake_parked()
        if woken:
            out.extend(SendHave(to, reply) for to, reply in woken)
        return out

    def have_query(
        self, sender: MemberId, digest: Digest, want: int, now: float
    ) -> sw.HaveReply | None:
        """The answer to send now, or None: parked, a SendHave answers it later."""
        reply = self.uploader.on_have_query(sender, sw.HaveQuery(digest, want), now)
        if reply is None:
            self._sooner(self.uploader.next_deadline())
        return reply

    # -- the store -------------------------------------------------------------------

    def hold(self, digest: Digest, piece_count: int, now: float) -> list[Action]:
        """A complete, verified blob is in the store: serve it and announce it complete.
        Its download, if any, is over."""
        full = bitmap_full(piece_count)
        self.downloads.pop(digest, None)
        self._settled(digest)
        self.uploader.set_origin(digest, False)  # complete: every piece to anyone
        out: list[Action] = [
            SendHave(to, reply) for to, reply in self.uploader.add_seed(digest, piece_count, full)
        ]
        out.extend(
            self.announcer.update(
                digest, complete=True, pieces=full, piece_count=piece_count, now=now
            )
        )
        self._sooner(self.announcer.next_deadline())
        return out

    def drop(self, digest: Digest, now: float) -> list[Action]:
        """The blob left the store (eviction, gc): withdraw it, stop serving it."""
        return self._forget(digest, now)

    def abandon(self, digest: Digest, now: float) -> list[Action]:
        """A download is given up (registries failed, sha256 mismatch, nobody wants it):
        withdraw it (a lease it held is released), forget its pieces; the cell's other
        downloads get their full budget back if it was the one reading the registries."""
        return self._forget(digest, now)

    # -- internals -------------------------------------------------------------------

    def _settled(self, digest: Digest) -> None:
        """The digest is held or given up: its lease and lookups are over."""
        self._granted.pop(digest, None)
        self._declined.discard(digest)
        self._deferred.pop(digest, None)

    def _forget(self, digest: Digest, now: float) -> list[Action]:
        self._settled(digest)
        out: list[Action] = list(self.announcer.withdraw(digest, now))
        self.uploader.remove_seed(digest)
        if self.downloads.pop(digest, None) is not None:
            self._registry_first(now, out)
        return out

    def _events(
        self, dl: sw.Download, events: list[sw.Event], now: float, out: list[Action]
    ) -> None:
        for ev in events:
            kind = type(ev)
            if kind in _PASS_THROUGH:
                out.append(ev)
            elif kind is sw.NeedProviders:
                self._lookup(ev.digest, now, out, report=False)
            elif kind is sw.DownloadComplete:
                out.append(ev)
                self._registry_first(now, out)
        when = dl.next_deadline()  # _sooner(when), inlined: this runs after every input
        if when is not None and when < self._soonest:
            self._soonest = when

    def _lookup(self, digest: Digest, now: float, out: list[Action], *, report: bool) -> None:
        self.next_request = rid = (self.next_request + 1) & 0xFFFFFFFF
        look = pl.ProviderLookup(
            digest, self.zone, self.announcer.homes(digest), request_id=rid, config=self.placement
        )
        self.lookups_started += 1
        self.lookups[rid] = look
        if report:
            self._reported.add(rid)
        out.extend(look.start(now))
        if look.done:
            del self.lookups[rid]
            self._lookup_result(rid, look.result, now, out)
        else:
            self._sooner(look.next_deadline())

    def _lookup_result(
        self, rid: int, result: pl.LookupResult | None, now: float, out: list[Action]
    ) -> None:
        if result is None:
            return
        if result.stray_grants:
            self._release_stray(result.digest, result.stray_grants, out)
        if result.lease == pl.LeaseStatus.GRANTED:
            if self._give_back(result.digest, now, out, report=rid in self._reported):
                self._reported.discard(rid)
                return
            self._granted[result.digest] = now
        if rid in self._reported:
            self._reported.discard(rid)
            out.append(Located(result))
        dl = self.downloads.get(result.digest)
        if dl is not None and not dl.complete:
            self._feed(dl, result, now, out)

    def _release_stray(self, digest: Digest, homes: Iterable[MemberId], out: list[Action]) -> None:
        """Homes granted this cell a lease it does not use (the lookup took another
        answer, or theirs came after it ended): a Withdraw frees it, or every cell that
        asks them would wait on this one for a blob it never reads, until the lease
        expires. A cell that holds the lease already keeps it, and one still asking
        waits for that answer: the home may be granting it again right now."""
        if self._holds_lease(digest):
            return
        if any(look.digest == digest for look in self.lookups.values()):
            return
        withdraw = pl.Withdraw(digest)
        out.extend(pl.Send(home, withdraw) for home in homes)

    def _holds_lease(self, digest: Digest) -> bool:
        """This cell kept a grant of `digest`'s lease, or its download reads under it."""
        dl = self.downloads.get(digest)
        return digest in self._granted or (dl is not None and dl.lease)

    def _give_back(self, digest: Digest, now: float, out: list[Action], *, report: bool) -> bool:
        """A lease granted while the cell reads another blob from the registries is given
        back once (a Withdraw to the digest's homes), and the digest looked up again
        after `lease_defer`: True when it was.

        Whoever asks first is granted the lease, and the first runtime of a storm to ask
        for an image asks for all its layers at once: one cell took the lease of all
        four layers in every testbed run, so its download link alone brought every byte
        into the swarm and its upload link alone sent each one on, and the others
        finished twice as late. Given back, the lease goes to a cell that asks in the
        meantime, and the image enters the swarm through several cells. Asked again, the
        cell keeps what it is granted: a lone cell pays `lease_defer` once for each
        layer after the first."""
        if not self.placement.lease_defer or self._holds_lease(digest):
            return False  # off, or a lease this cell holds already (a renewed ask)
        if digest in self._declined:
            self._declined.discard(digest)  # the second answer stands
            return False
        for other, when in list(self._granted.items()):  # leases no longer read
            odl = self.downloads.get(other)
            active = odl is not None and odl.lease and not odl.complete
            if not active and now - when >= self.placement.lease_ttl:
                del self._granted[other]
        if not any(other != digest for other in self._granted):
            return False
        self._declined.add(digest)
        withdraw = pl.Withdraw(digest)
        out.extend(pl.Send(home, withdraw) for home in self.announcer.homes(digest))
        when = now + self.placement.lease_defer
        self._deferred[digest] = (when, report)
        self._sooner(when)
        return True

    def _feed(
        self, dl: sw.Download, result: pl.LookupResult, now: float, out: list[Action]
    ) -> None:
        """A lookup's result reaches a download: its providers, and the lease. A home
        that has not heard of a death yet may name the dead: they are left out, and
        a dead lease holder counts as none (the download asks again)."""
        live = self.directory.is_live
        providers = [p for p in result.providers if live(p.member)]
        holder = result.lease_holder if live(result.lease_holder) else ""
        events = dl.add_providers(providers, now, lease_holder=holder)
        if result.lease_holder and not holder:
            events += dl.remove_provider(result.lease_holder, now)
        granted = result.lease == pl.LeaseStatus.GRANTED and not dl.lease
        if granted:
            events += dl.grant_lease(now)
            self.uploader.set_origin(dl.digest, True)
            out.append(LeaseGranted(dl.digest))
            out.extend(self._announce(dl, now))
        self._events(dl, events, now, out)
        if granted:
            self._registry_first(now, out)

    def _registry_first(self, now: float, out: list[Action]) -> None:
        """The cell's policy across its downloads (swarm.registry_first): while one reads
        from a registry, the others keep a smaller budget, so the read keeps most of the
        cell's link."""
        for dl, ev in sw.registry_first(self.downloads.values(), now):
            self._events(dl, [ev], now, out)

    def _announce(self, dl: sw.Download, now: float) -> list[pl.Send]:
        return self.announcer.update(
            dl.digest,
            complete=dl.complete,
            pieces=dl.held,
            piece_count=dl.piece_count,
            now=now,
            lease=dl.lease and not dl.complete,
        )

    def _stored(self, dl: sw.Download, index: int, now: float, out: list[Action]) -> None:
        """A piece is now held: serve it, wake parked queries, announce progress (the
        complete blob is announced by `hold`, once its sha256 checked out)."""
        woken = self.uploader.piece_added(dl.digest, index)
        if woken:
            out.extend(SendHave(to, reply) for to, reply in woken)
        if not dl.complete:
            out.extend(self._announce(dl, now))
