"""Where a layer is: home cells by rendezvous hashing, provider records, fetch leases.

Owns: which R cells are the "homes" of a digest (`home_cells`, `Homes`); the directory a
home keeps of who provides a digest (`ProviderDirectory`), including the fetch lease that
sends only one cell upstream; the provider's side that announces itself to the right
homes and moves its announcements when membership changes (`ProviderAnnouncer`); and the
asker's side that queries the homes, hedged (`ProviderLookup`).
Never: opens a socket, reads a clock, draws OS randomness or encodes bytes. Time is the
`now` argument (seconds, any origin, same on one cell); randomness is a `random.Random`
passed in; messages are the frozen dataclasses below, which wire.py encodes 1:1.

How to drive it (one cell; `send(to, msg)` is the caller's datagram sender; `to` may be
the cell itself, a home of its own digests, so deliver those locally)::

    members = membership.live_ids()                    # ids of live cells, self included
    ann = ProviderAnnouncer("cell-a", zone="z1")
    ann.set_members(members, now)                      # -> [Send] (re-announcements)
    ann.update(digest, complete=False, pieces=0, piece_count=n, now=now)  # -> [Send]
    ann.tick(now, load=uploads.active)                 # -> [Send] refreshes before TTL

    dirs = ProviderDirectory("cell-a", rng=random.Random(seed))
    dirs.set_members(members, now)                     # drops the dead's records/leases
    on Announce/Withdraw:  dirs.receive_announce(sender, msg, now) / receive_withdraw(..)
    on Lookup:             send(sender, dirs.receive_lookup(sender, msg, now))
    every second or so:    dirs.expire(now)

    look = ProviderLookup(digest, "z1", ann.homes(digest), request_id=7)
    look.start(now) -> [Send]; look.poll(now) -> [Send] (hedge, escalation)
    look.receive(sender, reply, now) -> LookupResult | None;   look.done / look.result

Theory of operation
-------------------
Homes. Every cell knows the live members (membership.py), so every cell computes the same
homes for a digest with no tracker and no DHT walk: each member gets a score
`mix64(member_key ^ digest_key)` and the R highest scores are the homes. The keys are the
first 8 bytes of blake3 (a PRF) of the member id and of the digest, and mix64 (the
splitmix64 finalizer, a bijection with full avalanche) decorrelates the XOR, so for any
digest the ranking of members is an independent uniform permutation: each member is a
home of R/N of all digests (uniform), and a member joining or leaving changes only the
home sets it enters or leaves (stable: about R/N of the digests move, the least any
scheme can move). Computing homes costs one multiply-xor chain per member; `Homes` keeps
the top R of the digests a cell tracks and updates them in O(1) per joining member, so a
membership change costs O(N) only for digests whose home died.

Records. A provider announces (digest, complete or downloading + pieces bitmap, load) to
each home with a TTL; a home keeps the record until the TTL runs out, a withdrawal, or
membership declares the provider dead. Announcements are refreshed at TTL/3, so a lost
datagram costs nothing and a dead provider is forgotten within a TTL at worst.

Lookups. A home answers with up to `max_providers` live records (the asker excluded),
same zone as the asker first, then the fewest active uploads. The announced load is
stale between refreshes, so every provider handed out counts as one more upload in the
home's estimate until its next announcement: a storm of askers is spread over the
providers instead of herding on the least loaded one. Ties are broken with the rng. When
a complete provider exists, one is always in the reply (the asker is told no lease is
needed, so it must be able to reach every piece). With thousands of records for a digest
(a storm), only a random sample of 32 plus a random few complete ones is ranked, drawn
in O(sample) from lists kept beside the records (a sample never copies the records, and
its order never depends on string hashing), so a lookup costs the same whatever the
crowd. Each record and lease has its own entry in the expiry heap.

Fetch lease. While no complete provider and no live lease exist for a digest, the first
asker is granted a lease: it alone goes to the registries. Later askers get the holder
(and everyone downloading) as providers and take pieces as they arrive. Only the
*authority* grants: the first live home of the digest (the caller says whether it is, or
it is computed from `set_members`), so three homes answering one hedged lookup do not
grant three leases; a lookup marked `escalate` (the asker heard nothing useful from the
authority in time) may be granted by any home. The holder announces itself with
`lease=True`, which renews the lease (TTL `lease_ttl`) and tells the other homes about
it, so the lease survives its granting home. The lease ends when the holder announces
the blob complete, withdraws, stops renewing, or dies; then the next asker is granted it,
and takes from peers what they already hold, fetching only the rest.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from functools import lru_cache

import blake3

__all__ = [
    "Announce",
    "Homes",
    "LeaseStatus",
    "Lookup",
    "LookupReply",
    "LookupResult",
    "PlacementConfig",
    "ProviderAnnouncer",
    "ProviderDirectory",
    "ProviderInfo",
    "ProviderLookup",
    "Send",
    "Withdraw",
    "home_cells",
    "rendezvous_score",
]

MemberId = str
Digest = str  # "sha256:<hex>", as in OCI


# ---------------------------------------------------------------------------------------
# Messages (wire.py encodes each 1:1). The sender is not a field: it travels in the
# datagram's MAC-covered header, so a cell cannot announce or ask in another's name, and
# every receive_* takes it as `sender`. Bitmaps are ints (see pieces.py); TTLs are
# relative seconds because cells share no clock.


@dataclass(frozen=True, slots=True)
class Announce:
    """Provider -> home: I hold (or am downloading) `digest`; keep me for `ttl` seconds."""

    digest: Digest
    zone: str
    complete: bool
    pieces: int  # bitmap of pieces held (all ones when complete)
    piece_count: int
    load: int  # uploads in progress at the provider
    ttl: float
    lease: bool = False  # the provider holds the fetch lease: renew it


@dataclass(frozen=True, slots=True)
class Withdraw:
    """Provider -> home: forget me for `digest` (evicted, or the download was abandoned;
    a lease the provider held is released)."""

    digest: Digest


@dataclass(frozen=True, slots=True)
class Lookup:
    """Asker -> home: who provides `digest`? `escalate`: the asker heard nothing useful
    from the digest's first home in time, so any home may grant the lease."""

    digest: Digest
    zone: str
    request_id: int
    escalate: bool = False


@dataclass(frozen=True, slots=True)
class ProviderInfo:
    member: MemberId
    zone: str
    complete: bool
    pieces: int  # bitmap as last announced (a lower bound: pieces only accumulate)
    load: int


class LeaseStatus(IntEnum):
    NONE = 0  # no lease known here (providers may still be listed)
    GRANTED = 1  # the asker holds the lease: fetch from the registries
    HELD = 2  # someone else (lease_holder) is fetching: take pieces from it
    COMPLETE = 3  # a complete provider exists; no lease needed


@dataclass(frozen=True, slots=True)
class LookupReply:
    """Home -> asker. `lease_holder` is "" when there is none."""

    digest: Digest
    request_id: int
    providers: tuple[ProviderInfo, ...]
    lease: LeaseStatus
    lease_holder: MemberId
    piece_count: int  # 0 when the home knows no provider
    authority: bool  # the responder is the digest's first live home


@dataclass(frozen=True, slots=True)
class Send:
    """An outgoing message for the caller to deliver to member `to`."""

    to: MemberId
    message: Announce | Withdraw | Lookup | LookupReply


Message = Announce | Withdraw | Lookup | LookupReply


@dataclass(frozen=True, slots=True)
class PlacementConfig:
    replicas: int = 3  # R homes per digest
    ttl: float = 30.0  # provider record lifetime
    lease_ttl: float = 10.0  # lease lifetime without a renewing announcement
    progress_interval: float = 2.0  # min seconds between progress-only announcements
    max_providers: int = 6  # per reply: 6 x (id + zone + 128-byte bitmap) < 1,400 bytes
    hedge_first: int = 2  # homes asked at once; the rest after hedge_delay
    hedge_delay: float = 0.05
    lookup_timeout: float = 0.5  # then escalate (any home may grant the lease)
    lookup_give_up: float = 2.0  # then report whatever was heard (maybe nothing)
    escalate_wait: float = 0.2  # an escalated grant waits this long for the other homes
    lease_defer: float = 0.2  # a cell already reading one blob gives a second lease back


# ---------------------------------------------------------------------------------------
# Rendezvous hashing

_M64 = (1 << 64) - 1


@lru_cache(maxsize=1 << 16)
def _key(name: str) -> int:
    return int.from_bytes(blake3.blake3(name.encode()).digest(8), "little")


def _mix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def rendezvous_score(member: MemberId, digest: Digest) -> int:
    """The member's weight for the digest; the R largest are its homes."""
    return _mix64(_key(member) ^ _key(digest))


def _top(digest: Digest, members: Iterable[MemberId], r: int) -> list[MemberId]:
    dk = _key(digest)
    key = _key
    mix = _mix64
    scored = [(mix(key(m) ^ dk), m) for m in members]
    return [m for _, m in heapq.nlargest(r, scored)]


@lru_cache(maxsize=4096)
def _top_scored(
    digest: Digest, members: frozenset[MemberId], r: int
) -> tuple[tuple[int, MemberId], ...]:
    """The R best (score, member) pairs, memoized on the frozenset: the cells of one
    view (a simulator's thousands) share one O(N) computation per digest."""
    dk = _key(digest)
    key = _key
    mix = _mix64
    return tuple(heapq.nlargest(r, [(mix(key(m) ^ dk), m) for m in members]))


def _top_cached(digest: Digest, members: frozenset[MemberId], r: int) -> tuple[MemberId, ...]:
    return tuple(m for _, m in _top_scored(digest, members, r))


def home_cells(digest: Digest, live_members: Iterable[MemberId], r: int = 3) -> list[MemberId]:
    """The R homes of `digest`, best first. Pass a frozenset to share the result between
    callers with the same view (a simulator's thousands of cells): frozensets cache their
    hash, so a repeated call costs a dictionary lookup instead of O(N) hashing."""
    if isinstance(live_members, frozenset):
        return list(_top_cached(digest, live_members, r))
    return _top(digest, live_members, r)


class Homes:
    """The homes of the digests one cell tracks, kept up to date as members come and go.

    A joining member is compared against each tracked digest's R-th score (O(1) a digest);
    only a digest that lost one of its homes is recomputed over all members."""

    __slots__ = ("_homes", "_members", "r")

    def __init__(self, r: int = 3) -> None:
        self.r = r
        self._members: frozenset[MemberId] = frozenset()
        self._homes: dict[Digest, list[tuple[int, MemberId]]] = {}

    @property
    def members(self) -> frozenset[MemberId]:
        return self._members

    def track(self, digest: Digest) -> list[MemberId]:
        if digest not in self._homes:
            self._homes[digest] = list(_top_scored(digest, self._members, self.r))
        return self.of(digest)

    def untrack(self, digest: Digest) -> None:
        self._homes.pop(digest, None)

    def of(self, digest: Digest) -> list[MemberId]:
        top = self._homes.get(digest)
        if top is None:
            return home_cells(digest, self._members, self.r)
        return [m for _, m in top]

    def is_authority(self, digest: Digest, member: MemberId) -> bool:
        homes = self.of(digest)
        return bool(homes) and homes[0] == member

    def set_members(
        self, members: Iterable[MemberId]
    ) -> dict[Digest, tuple[list[MemberId], list[MemberId]]]:
        """Install the new live set; returns {digest: (old homes, new homes)} for every
        tracked digest whose homes changed."""
        new = members if isinstance(members, frozenset) else frozenset(members)
        added = new - self._members
        removed = self._members - new
        self._members = new
        changed: dict[Digest, tuple[list[MemberId], list[MemberId]]] = {}
        if not self._homes or (not added and not removed):
            return changed
        added_keys = [(_key(m), m) for m in added]
        for digest, top in self._homes.items():
            old = [m for _, m in top]
            if removed and any(m in removed for m in old):
                top = list(_top_scored(digest, new, self.r))
            elif added_keys:
                dk = _key(digest)
                for k, m in added_keys:
                    s = _mix64(k ^ dk)
                    if len(top) < self.r or (s, m) > top[-1]:
                        top.append((s, m))
                        top.sort(reverse=True)
                        del top[self.r :]
            self._homes[digest] = top
            now_homes = [m for _, m in top]
            if now_homes != old:
                changed[digest] = (old, now_homes)
        return changed


# ---------------------------------------------------------------------------------------
# Home side: the directory

_LEASE = ""  # the member field of a lease's entry in the expiry heap (no member is "")


@dataclass(slots=True)
class _Record:
    zone: str
    complete: bool
    pieces: int
    piece_count: int
    load: int
    expires: float
    handouts: int = 0


@dataclass(slots=True)
class _Lease:
    holder: MemberId
    expires: float
    # The holder announced it (lease=True): it reads the blob. A grant alone is not
    # proof: its reply may have been lost, and then the holder follows someone else.
    confirmed: bool = False
    granted: float = 0.0  # when this home granted it (unconfirmed leases)


class _Bag:
    """A set of members that also draws a random sample in O(sample size): a list for
    indexing plus each member's position (removal swaps the last one in). Its order
    depends only on the calls made, never on string hashing, so a seeded rng draws the
    same sample in every process."""

    __slots__ = ("_items", "_pos")

    def __init__(self) -> None:
        self._items: list[MemberId] = []
        self._pos: dict[MemberId, int] = {}

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, member: object) -> bool:
        return member in self._pos

    def __iter__(self) -> Iterator[MemberId]:
        return iter(self._items)

    def add(self, member: MemberId) -> None:
        if member not in self._pos:
            self._pos[member] = len(self._items)
            self._items.append(member)

    def discard(self, member: MemberId) -> None:
        i = self._pos.pop(member, None)
        if i is None:
            return
        last = self._items.pop()
        if i < len(self._items):
            self._items[i] = last
            self._pos[last] = i

    def sample(self, rng: random.Random, k: int) -> list[MemberId]:
        """Up to k distinct members, uniformly at random (all of them when k >= size)."""
        if len(self._items) <= k:
            return list(self._items)
        return rng.sample(self._items, k)


@dataclass(slots=True)
class _Entry:
    records: dict[MemberId, _Record] = field(default_factory=dict)
    members: _Bag = field(default_factory=_Bag)  # the keys of records, for sampling
    complete: _Bag = field(default_factory=_Bag)  # members with a complete record
    lease: _Lease | None = None
    piece_count: int = 0


class ProviderDirectory:
    """What one home knows about the digests it is home of (see the module docstring).

    A lookup costs O(max_providers + sample), not O(providers): in a storm a home holds
    thousands of downloading records for one digest, and ranks only a random sample of
    them (plus a few complete ones and the lease holder), which also spreads the askers."""

    SAMPLE = 32

    def __init__(
        self,
        self_id: MemberId,
        *,
        rng: random.Random,
        config: PlacementConfig = PlacementConfig(),
    ) -> None:
        self.self_id = self_id
        self.config = config
        self._rng = rng
        self._entries: dict[Digest, _Entry] = {}
        self._by_member: dict[MemberId, set[Digest]] = {}
        # (when, digest, member or _LEASE), one per record or lease written; lazy: an
        # entry whose record was refreshed since is skipped when it comes up
        self._expiry: list[tuple[float, Digest, MemberId]] = []
        self._members: frozenset[MemberId] | None = None
        self.leases_granted = 0

    # -- membership -----------------------------------------------------------------

    def is_live(self, member: MemberId) -> bool:
        """In the live set last installed (everyone, before the first)."""
        return self._members is None or member in self._members

    def set_members(self, members: Iterable[MemberId], now: float) -> None:
        """Install the live set: records and leases of members gone are dropped at once
        (a dead lease holder frees the lease for the next asker), and the authority for
        lease grants is computed from it."""
        new = members if isinstance(members, frozenset) else frozenset(members)
        if self._members is not None:
            for gone in self._members - new:
                self.member_dead(gone, now)
        self._members = new

    def member_dead(self, member: MemberId, now: float) -> None:
        for digest in self._by_member.pop(member, ()):
            entry = self._entries.get(digest)
            if entry is not None:
                self._forget(digest, entry, member)

    def _forget(self, digest: Digest, entry: _Entry, member: MemberId) -> None:
        entry.records.pop(member, None)
        entry.members.discard(member)
        entry.complete.discard(member)
        if entry.lease is not None and entry.lease.holder == member:
            entry.lease = None
        if not entry.records and entry.lease is None:
            del self._entries[digest]

    def _is_authority(self, digest: Digest) -> bool:
        if self._members is None:
            return False
        homes = home_cells(digest, self._members, self.config.replicas)
        return bool(homes) and homes[0] == self.self_id

    # -- records --------------------------------------------------------------------

    def receive_announce(self, sender: MemberId, msg: Announce, now: float) -> None:
        entry = self._entries.get(msg.digest)
        if entry is None:
            entry = self._entries[msg.digest] = _Entry()
        expires = now + msg.ttl
        entry.records[sender] = _Record(
            msg.zone, msg.complete, msg.pieces, msg.piece_count, msg.load, expires
        )
        entry.members.add(sender)
        entry.piece_count = msg.piece_count
        self._by_member.setdefault(sender, set()).add(msg.digest)
        heapq.heappush(self._expiry, (expires, msg.digest, sender))
        lease = entry.lease
        if msg.complete:
            entry.complete.add(sender)
            if lease is not None and lease.holder == sender:
                entry.lease = None
            return
        entry.complete.discard(sender)
        if msg.lease:
            if (
                lease is None
                or lease.holder == sender
                or lease.expires <= now
                or not lease.confirmed
            ):
                # A renewal, or news of a lease another home granted. A different holder
                # that confirmed keeps it (two grants raced; the announcer sees HELD on its
                # next lookup); one only granted gives way to the cell that reads.
                entry.lease = _Lease(sender, now + self.config.lease_ttl, confirmed=True)
                heapq.heappush(self._expiry, (now + self.config.lease_ttl, msg.digest, _LEASE))
        elif (
            lease is not None
            and lease.holder == sender
            and (lease.confirmed or now - lease.granted >= self.config.lookup_timeout)
        ):
            # The holder downloads it without the lease: the grant's reply was lost, or it
            # gave the lease back and the withdrawal was. Kept, the lease would send
            # every asker to a cell that never reads the blob. (Sent just before the
            # holder's lookup, such an announcement may arrive after the grant.)
            entry.lease = None

    def receive_withdraw(self, sender: MemberId, msg: Withdraw, now: float) -> None:
        entry = self._entries.get(msg.digest)
        if entry is None:
            return
        digests = self._by_member.get(sender)
        if digests is not None:
            digests.discard(msg.digest)
        self._forget(msg.digest, entry, sender)

    def expire(self, now: float) -> None:
        """Drop records and leases whose time has passed (O(log n) a record: each one
        has its own entry in the expiry heap)."""
        heap = self._expiry
        while heap and heap[0][0] <= now:
            _, digest, member = heapq.heappop(heap)
            entry = self._entries.get(digest)
            if entry is None:
                continue
            if member == _LEASE:
                if entry.lease is not None and entry.lease.expires <= now:
                    entry.lease = None
                    if not entry.records:
                        del self._entries[digest]
                continue
            record = entry.records.get(member)
            if record is not None and record.expires <= now:
                digests = self._by_member.get(member)
                if digests is not None:
                    digests.discard(digest)
                self._forget(digest, entry, member)

    def next_deadline(self) -> float | None:
        return self._expiry[0][0] if self._expiry else None

    # -- lookups --------------------------------------------------------------------

    def receive_lookup(
        self, sender: MemberId, msg: Lookup, now: float, *, authority: bool | None = None
    ) -> LookupReply:
        """The answer to send back to `sender`. `authority`: whether this cell is the
        digest's first live home (computed from set_members when not given)."""
        if authority is None:
            authority = self._is_authority(msg.digest)
        entry = self._entries.get(msg.digest)
        if entry is None:
            entry = _Entry()
        records = entry.records
        asker = sender

        rng = self._rng
        k = self.config.max_providers
        # A random few complete providers (one more than a reply holds, in case the asker
        # is one of them); all of them only if every one drawn has expired.
        complete = [
            (m, records[m])
            for m in entry.complete.sample(rng, k + 1)
            if m != asker and records[m].expires > now
        ]
        if not complete and len(entry.complete) > k + 1:
            complete = [
                (m, records[m]) for m in entry.complete if m != asker and records[m].expires > now
            ]
        lease = entry.lease
        if lease is not None and lease.expires <= now:
            lease = entry.lease = None
        status = LeaseStatus.NONE
        holder: MemberId = ""
        if complete:
            status = LeaseStatus.COMPLETE
        elif lease is not None and lease.holder == asker:
            status, holder = LeaseStatus.GRANTED, asker  # a duplicate (hedged) ask
        elif lease is not None:
            status, holder = LeaseStatus.HELD, lease.holder
        elif authority or msg.escalate:
            status, holder = LeaseStatus.GRANTED, asker
            self.leases_granted += 1
            self._entries[msg.digest] = entry
            entry.lease = _Lease(asker, now + self.config.lease_ttl, granted=now)
            heapq.heappush(self._expiry, (now + self.config.lease_ttl, msg.digest, _LEASE))
            self._by_member.setdefault(asker, set()).add(msg.digest)

        if len(records) <= self.SAMPLE:
            pool = list(records.items())
        else:
            pool = [(m, records[m]) for m in entry.members.sample(rng, self.SAMPLE)]
            pool.extend(complete[:k])
        seen: set[MemberId] = {asker}
        cand: list[tuple[bool, int, bool, float, MemberId, _Record]] = []
        for m, r in pool:
            if m in seen or r.expires <= now:
                continue
            seen.add(m)
            cand.append(
                (r.zone != msg.zone, r.load + r.handouts, not r.complete, rng.random(), m, r)
            )
        ranked = heapq.nsmallest(k, cand)
        if complete and ranked and not any(c[5].complete for c in ranked):
            # Always offer a complete provider when one exists: the asker was told no
            # lease is needed, so it must be able to reach every piece.
            ranked[-1] = min(c for c in cand if c[5].complete)
        providers = [
            ProviderInfo(m, r.zone, r.complete, r.pieces, r.load + r.handouts)
            for _, _, _, _, m, r in ranked
        ]
        for *_, r in ranked:
            r.handouts += 1
        if status == LeaseStatus.HELD and holder not in {p.member for p in providers}:
            rec = records.get(holder)
            info = (
                ProviderInfo(holder, rec.zone, False, rec.pieces, rec.load + rec.handouts)
                if rec is not None
                else ProviderInfo(holder, "", False, 0, 0)
            )
            providers = [info, *providers[: self.config.max_providers - 1]]
        return LookupReply(
            digest=msg.digest,
            request_id=msg.request_id,
            providers=tuple(providers),
            lease=status,
            lease_holder=holder,
            piece_count=entry.piece_count,
            authority=authority,
        )

    # -- inspection (tests, metrics, simulator reports) -------------------------------

    def providers(self, digest: Digest, now: float) -> dict[MemberId, ProviderInfo]:
        entry = self._entries.get(digest)
        if entry is None:
            return {}
        return {
            m: ProviderInfo(m, r.zone, r.complete, r.pieces, r.load)
            for m, r in entry.records.items()
            if r.expires > now
        }

    def lease_holder(self, digest: Digest, now: float) -> MemberId | None:
        entry = self._entries.get(digest)
        if entry is None or entry.lease is None or entry.lease.expires <= now:
            return None
        return entry.lease.holder

    def digests(self) -> list[Digest]:
        return list(self._entries)


# ---------------------------------------------------------------------------------------
# Provider side: announcements


@dataclass(slots=True)
class _Held:
    complete: bool
    pieces: int
    piece_count: int
    lease: bool
    last_sent: float  # when the last announcement went out
    homes: list[MemberId]


class ProviderAnnouncer:
    """A cell's announcements of what it holds, to the right homes, at the right rate.

    State changes (new digest, complete, lease taken or given up) go out at once; mere
    progress (more pieces) at most every `progress_interval`; everything is refreshed at
    a third of its TTL (a lease at a third of the lease TTL). When membership moves a
    digest's homes, the new homes get an announcement at once; the old ones forget by TTL.
    """

    def __init__(
        self,
        self_id: MemberId,
        zone: str,
        *,
        config: PlacementConfig = PlacementConfig(),
    ) -> None:
        self.self_id = self_id
        self.zone = zone
        self.config = config
        self.homes_index = Homes(config.replicas)
        self._held: dict[Digest, _Held] = {}
        self._load = 0
        self._deadline: float | None = None
        self._deadline_stale = True  # next_deadline() is asked far more often than it moves

    def homes(self, digest: Digest) -> list[MemberId]:
        return self.homes_index.of(digest)

    def held(self) -> list[Digest]:
        return list(self._held)

    def _announce(self, digest: Digest, h: _Held, to: Iterable[MemberId], now: float) -> list[Send]:
        h.last_sent = now
        self._deadline_stale = True
        msg = Announce(
            digest=digest,
            zone=self.zone,
            complete=h.complete,
            pieces=h.pieces,
            piece_count=h.piece_count,
            load=self._load,
            ttl=self.config.ttl,
            lease=h.lease,
        )
        return [Send(m, msg) for m in to]

    def set_members(self, members: Iterable[MemberId], now: float) -> list[Send]:
        """Membership changed: announce every held digest to the homes it gained."""
        out: list[Send] = []
        for digest, (old, new) in self.homes_index.set_members(members).items():
            h = self._held.get(digest)
            if h is None:
                continue
            h.homes = new
            gained = [m for m in new if m not in old]
            if gained:
                last = h.last_sent
                out.extend(self._announce(digest, h, gained, now))
                h.last_sent = last  # the other homes keep their refresh schedule
        return out

    def update(
        self,
        digest: Digest,
        *,
        complete: bool,
        pieces: int,
        piece_count: int,
        now: float,
        lease: bool = False,
    ) -> list[Send]:
        """The cell's state for `digest` changed; returns the announcements due now."""
        h = self._held.get(digest)
        if h is None:
            homes = self.homes_index.track(digest)
            h = self._held[digest] = _Held(complete, pieces, piece_count, lease, now, homes)
            return self._announce(digest, h, h.homes, now)
        changed_state = h.complete != complete or h.lease != lease
        if changed_state:
            self._deadline_stale = True  # the refresh period depends on the state
        h.complete, h.pieces, h.piece_count, h.lease = complete, pieces, piece_count, lease
        if changed_state or now - h.last_sent >= self.config.progress_interval:
            return self._announce(digest, h, h.homes, now)
        return []

    def withdraw(self, digest: Digest, now: float) -> list[Send]:
        h = self._held.pop(digest, None)
        self._deadline_stale = True
        self.homes_index.untrack(digest)
        if h is None:
            return []
        msg = Withdraw(digest)
        return [Send(m, msg) for m in h.homes]

    def _refresh_after(self, h: _Held) -> float:
        if h.lease:
            return self.config.lease_ttl / 3
        if not h.complete:
            return min(self.config.ttl / 3, self.config.progress_interval)
        return self.config.ttl / 3

    def tick(self, now: float, load: int | None = None) -> list[Send]:
        """Refreshes due at `now` (call at next_deadline() or on any timer)."""
        if load is not None:
            self._load = load
        out: list[Send] = []
        for digest, h in self._held.items():
            if now - h.last_sent >= self._refresh_after(h):
                out.extend(self._announce(digest, h, h.homes, now))
        return out

    def next_deadline(self) -> float | None:
        if self._deadline_stale:
            self._deadline = min(
                (h.last_sent + self._refresh_after(h) for h in self._held.values()), default=None
            )
            self._deadline_stale = False
        return self._deadline


# ---------------------------------------------------------------------------------------
# Asker side: hedged lookups


@dataclass(frozen=True, slots=True)
class LookupResult:
    digest: Digest
    providers: tuple[ProviderInfo, ...]
    lease: LeaseStatus  # GRANTED: go to the registries; HELD/COMPLETE/NONE: use providers
    lease_holder: MemberId  # "" when none
    piece_count: int
    answered_by: tuple[MemberId, ...]
    # homes that granted the asker the lease when the result is not GRANTED (a late
    # authority or an escalated home): their grants are released (see Cell)
    stray_grants: tuple[MemberId, ...] = ()


class ProviderLookup:
    """One hedged lookup of a digest: ask `hedge_first` homes now, the rest after
    `hedge_delay`; the first *useful* reply wins: one that carries a lease decision
    (granted, held by someone, or a complete provider exists) or comes from the authority.
    Providers listed by every reply heard are merged into the result. If the authority
    stays silent for `lookup_timeout`, every home is asked again with `escalate` so that
    the lease is not stuck behind a dead first home; after `lookup_give_up` the lookup
    ends with whatever it heard.

    An escalated grant from a home that is not the authority is held for up to
    `escalate_wait` until the other homes answered: a silent authority is more often a
    lost datagram than a dead cell, and another home may know the holder it chose (the
    asker's own directory, a home too, answers first and knows least). A reply that
    names a holder, or the authority's, then wins over such a grant."""

    def __init__(
        self,
        digest: Digest,
        zone: str,
        homes: Sequence[MemberId],
        *,
        request_id: int,
        config: PlacementConfig = PlacementConfig(),
    ) -> None:
        self.digest = digest
        self.zone = zone
        self.homes = list(homes)
        self.request_id = request_id
        self.config = config
        self.result: LookupResult | None = None
        self._started = 0.0
        self._asked: set[MemberId] = set()
        self._escalated = False
        self._since_escalation: set[MemberId] = set()  # homes that answered the escalation
        self._grant_held = False  # an escalated grant waits (see the class docstring)
        self._replies: list[tuple[MemberId, LookupReply]] = []

    @property
    def done(self) -> bool:
        return self.result is not None

    def _ask(self, homes: Iterable[MemberId], escalate: bool) -> list[Send]:
        msg = Lookup(self.digest, self.zone, self.request_id, escalate)
        out = []
        for m in homes:
            self._asked.add(m)
            out.append(Send(m, msg))
        return out

    def start(self, now: float) -> list[Send]:
        self._started = now
        if not self.homes:
            self._finish(now)
            return []
        return self._ask(self.homes[: self.config.hedge_first], False)

    def receive(self, sender: MemberId, reply: LookupReply, now: float) -> LookupResult | None:
        if self.result is not None or reply.request_id != self.request_id:
            return None
        if reply.digest != self.digest or sender not in self._asked:
            return None
        self._replies.append((sender, reply))
        if self._escalated:
            self._since_escalation.add(sender)
        heard_all = self._escalated and len(self._since_escalation) >= len(self.homes)
        if reply.lease == LeaseStatus.GRANTED and self._escalated and not reply.authority:
            self._grant_held = True
            return self._finish(now) if heard_all else None
        # A bare list from a home that cannot grant the lease is not final: if nobody is
        # fetching, this asker may be the one the authority sends upstream.
        useful = reply.lease != LeaseStatus.NONE or reply.authority or heard_all
        if useful:
            return self._finish(now)
        return None

    def poll(self, now: float) -> list[Send]:
        """Hedge and escalate when their time has come; check `done` afterwards."""
        if self.result is not None:
            return []
        elapsed = now - self._started
        out: list[Send] = []
        if elapsed >= self.config.lookup_give_up or (
            self._grant_held and elapsed >= self._grant_deadline()
        ):
            self._finish(now)
            return out
        if elapsed >= self.config.lookup_timeout and not self._escalated:
            self._escalated = True
            return self._ask(self.homes, True)
        if elapsed >= self.config.hedge_delay:
            rest = [m for m in self.homes if m not in self._asked]
            out.extend(self._ask(rest, False))
        return out

    def next_deadline(self) -> float | None:
        if self.result is not None:
            return None
        if any(m not in self._asked for m in self.homes):
            return self._started + self.config.hedge_delay
        if not self._escalated:
            return self._started + self.config.lookup_timeout
        if self._grant_held:
            return self._started + min(self._grant_deadline(), self.config.lookup_give_up)
        return self._started + self.config.lookup_give_up

    def _grant_deadline(self) -> float:
        """Seconds from the start an escalated grant waits for the other homes."""
        return self.config.lookup_timeout + self.config.escalate_wait

    def _finish(self, now: float) -> LookupResult:
        replies = [r for _, r in self._replies]
        # the authority's decision, else one naming a holder (or a complete provider),
        # else a grant: see the class docstring
        decided = sorted(
            (r for r in replies if r.lease != LeaseStatus.NONE),
            key=lambda r: (not r.authority, r.lease == LeaseStatus.GRANTED),
        )
        best = decided[0] if decided else (replies[-1] if replies else None)
        providers: dict[MemberId, ProviderInfo] = {}
        for r in replies:
            for p in r.providers:
                known = providers.get(p.member)
                if known is None or p.pieces.bit_count() > known.pieces.bit_count():
                    providers[p.member] = p
        self.result = LookupResult(
            digest=self.digest,
            providers=tuple(providers.values()),
            lease=best.lease if best is not None else LeaseStatus.NONE,
            lease_holder=best.lease_holder if best is not None else "",
            piece_count=max((r.piece_count for r in replies), default=0),
            answered_by=tuple(m for m, _ in self._replies),
            stray_grants=()
            if best is None or best.lease == LeaseStatus.GRANTED
            else tuple(m for m, r in self._replies if r.lease == LeaseStatus.GRANTED),
        )
        return self.result
