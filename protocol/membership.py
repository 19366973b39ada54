"""Who is in the cluster: SWIM membership with Lifeguard, as a sans-IO state machine.

This module owns one cell's view of the cluster: which cells are alive, suspect, dead or
gone, at which address and zone, and what it must send to keep that view right. It
never does I/O, never reads a clock and never draws randomness from the OS: the caller
passes `now` (seconds, never going back; an epoch all cells share, such as Unix time,
lets their probes interlock, see "Who probes whom") and an `rng: random.Random`, and
sends and delivers the messages (protocol/wire.py types) itself. So the daemon
(celld/gossip.py, over UDP) and the simulator (simulations/model/, thousands of cells in
one process) run exactly this code.

How to drive it
---------------
::

    m = Membership("cell-a", "10.0.0.1:7946", "zone-1", Config(), random.Random(seed))
    out = m.join(["10.0.0.2:7946"], now)        # seed addresses; [] for the first cell
    loop:
        for o in out: send wire.encode(o.msg, ...) to o.addr      # Outgoing(addr, msg)
        wait until m.next_deadline() or a datagram arrives, then either
            out = m.tick(now)                          # timers: probes, gossip, suspicion
            out = m.receive(decoded.msg, from_addr, now)   # a MEMBERSHIP_MESSAGES type
        while (ev := m.next_event()) is not None: react (MemberJoined, MemberDead, ...)
        if m.epoch changed: members = m.live_ids()    # e.g. for placement's homes
    out = m.leave(now); keep ticking until m.done_leaving, then stop.

`tick` may be called as often or as rarely as the caller likes: it catches up on every
deadline that passed, but a late tick makes the protocol late too. Between ticks,
`next_deadline()` says when the next timer fires; ask it again after every call.

Theory of operation
-------------------
Every member row holds (incarnation, status) and changes only through four rules, the
same whether the news came piggybacked, by gossip or by push-pull (`_apply`):

* Alive(n, i) wins over anything about n with an incarnation below i. A new name adds a
  row (MemberJoined); a dead or left row coming back is a rejoin (MemberJoined);
  a suspect one is cleared (MemberAlive).
* Suspect(n, i, by) wins over Alive(n, i') with i' <= i; a second Suspect at the same
  incarnation from another cell is a Lifeguard confirmation that shortens the timer.
* Dead(n, i, by) wins over Alive and Suspect with incarnation <= i; by == n is a leave.
* About ourselves, Suspect or Dead at our incarnation or above (and Alive above it) is
  refuted: our incarnation becomes theirs + 1 and a fresh Alive is gossiped. Only our
  own leave is never refuted.

Each accepted change is queued for dissemination (`_Broadcasts`): updates ride on every
Ping, Ack, Nack and PingReq we send and on Gossip messages to `gossip_nodes` random
members, each sent at most retransmit_mult * ceil(log10(N+1)) times, fewest-sent first;
a newer update about a cell replaces an older one, and deaths and our own refutations
go before everything else. A gossip round runs whenever `gossip_interval` has passed
since the last one and news is queued, so news reaching a cell whose queue was empty is
relayed at once (an epidemic that covers 1,000 cells in ~0.3 s), then every interval.

Failure detection is one probe at a time, one probe a period: Ping the target; no Ack
within probe_timeout / 2 -> Ping it once more; none within probe_timeout -> PingReq
`indirect_checks` others, who ping it and relay its Ack, or a Nack if it stays silent; no
Ack by the end of the probe interval -> Suspect(target).

Who probes whom. With N cells each probing a random target (or walking its own shuffled
list, SWIM's round-robin) a member is left unprobed by all N for a period with
probability (1 - 1/N)^N ~ 1/e, and for k periods ~e^-k: at 1,000 cells and ten crashes
one of them typically waits 3-6 periods for its first prober. So the probing is made
collective: every cell orders the live members it knows (alive or suspect, itself
included) by a blake3 hash of their names (`_Ring`; the same order on every cell, no
dict order or hash seed in it), and in probe period k = floor(t / probe_interval), where
t is the time its probe was scheduled for, the cell at position p probes the member at
position (p + 1 + k mod (N - 1)) mod N, never itself. While the cells agree on the
members and share a clock (the simulator's; NTP's in a fleet, if the caller's `now` is
wall-clock based), that is a cyclic shift, a permutation: every member has exactly one
prober each period, and the message load is the same, one probe a cell a period. Probers
keep their random phases within the period, so a crashed cell is probed by its current
period's prober if that one has not had its turn yet, else by the next one's: within one
period if it crashes as a period starts, within two at worst, and first suspected when
that probe fails one period later. The offset moves every period, so a member meets each
other cell as its prober once every N - 1 periods, and a prober that is itself dead,
leaving, or slowed by its health score (it probes only every health + 1 periods and so
skips the other periods' targets) costs its target one period, not a blind spot. Where
views differ (a join or death still spreading, which shifts positions) or clocks are
skewed or `now` has another epoch on each cell, targets collide and the coverage falls
back towards that of random targets.

A suspect is declared dead when its suspicion timer runs out (Lifeguard's dynamic
suspicion, memberlist's formula): it starts at max = suspicion_max_timeout_mult * min
and shrinks logarithmically to min = suspicion_mult * log10(N) * probe_interval as K =
suspicion_confirmations independent accusers confirm it. memberlist gets confirmations
from ordinary probing, about one a period, and so needs a long min (4 log10 N periods,
12 s at N = 1,000) to keep a live cell from dying of K unlucky probes. We ask for them:
an accuser sends its new suspicion at once to `suspicion_verifiers` random members
besides its gossip targets, and every cell that hears a suspicion first hand from its
accuser probes the suspect out of turn (a "check", up to max_checks at once), with the
Suspect in the Ping so that a live suspect refutes on the spot. A dead cell then has
its K confirmations about one period after the first suspicion, and a short min (1.5 s
at N = 1,000) decides; a live one answers the checks, and an accusation nobody
confirms waits the max (12 s at N = 1,000) for a refutation that takes ~0.3 s. Whoever
declares first gossips Dead, which every cell takes at once. Measured at 1,000 cells
(simulations/scenarios/failure_1000.toml, seeds 1-3, crashes at a period's start): first
suspicion at most 2.0 s after a crash (mean 1.3-1.6 s), dead everywhere at most 3.9 s
after it (mean 3.0-3.4 s); loss_5pct/10pct_1000: no live cell declared dead in 10 minutes.

A suspicion can outrun its refutation: a cell that hears Suspect(n, i) after the
Alive(n, i+1) epidemic has passed it would keep it to its timer's end and declare a live
cell dead. Two guards: a cell that receives news about n older than what it knows (or
about itself, older than its incarnation) answers the sender directly with its current
Alive for n (`_corrections`; on the Ack too when the news came on a Ping), so the stale
cell's own gossip brings it the answer; and a suspicion nobody confirmed is declared
dead only after a last check, one probe of our own carrying the suspicion, fails too.

Our own health score (Lifeguard's local health awareness, 0 .. awareness_max - 1) grows
on failed probes (by the number of missing Nacks, which tell "my network is bad" from
"the target is dead") and on refutations, shrinks on each Ack, and multiplies our probe
interval and timeout, so a struggling cell probes less and accuses nobody in haste.

Every `push_pull_interval` (scaled up with log2 N past 32 cells, as memberlist does) we
send our whole table to one random member in chunks that fit a datagram; it merges
each chunk and answers with its own table. That repairs whatever gossip lost. Joining is
the same exchange with seed addresses, retried until some other member is known.
Dead and left rows are kept for `dead_retention` (to stop old Alive news from
resurrecting them and to keep gossiping to the dead so a live cell can refute) and then
forgotten.
"""

from __future__ import annotations

import bisect
import math
import random
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import blake3

from protocol import wire
from protocol.wire import (
    Ack,
    Alive,
    Dead,
    Gossip,
    MemberState,
    Message,
    Nack,
    Ping,
    PingReq,
    PushPull,
    Status,
    Suspect,
    Update,
)


@dataclass(frozen=True, slots=True)
class Config:
    """Timing of the protocol. Probing, gossip and push-pull follow memberlist's
    DefaultLANConfig (serf and Consul run it on LANs of thousands of nodes) with the gossip
    interval and fanout of issue 4 (200 ms, 3); the suspicion constants are ours, because
    verification probes (module docstring) give a real death its confirmations within one
    probe period, where memberlist waits for them from ordinary probing.

    - probe_interval 1 s, probe_timeout 500 ms: memberlist's, for a datacenter round trip
      of < 50 ms, each cell at ~1 probe/s however big the cluster.
    - a second Ping at probe_timeout / 2 (memberlist's TCP fallback ping, here one more
      datagram), then indirect_checks 5 (memberlist: 3) at probe_timeout: under 10% loss
      a live cell's probe fails 0.19 x 0.19 x 0.34^5 = 1.7e-4 of the time, 45x less than
      with memberlist's 3 checks and no retry (0.19 x 0.34^3 = 7.7e-3; measured in
      loss_10pct_1000: 103 failures in 599,337 probes = 1.7e-4). Each false suspicion
      costs an epidemic there and back (~15,000 Gossip datagrams at N = 1,000), so this
      is also what keeps lossy clusters cheap (5.8 instead of 19 datagrams a cell a
      second at 10% loss); the retry first means the 5 relays are needed for 3.6% of
      the probes instead of 19%.
    - suspicion_mult 0.5: min = 0.5 log10(N) probe periods, 1.5 s at N = 1,000 (memberlist:
      4 log10(N) = 12 s). The min is only reached with suspicion_confirmations (K = 3)
      independent confirmations, i.e. when 4 cells (the accuser and 3 others) each
      failed a whole probe of the suspect while it was told, in the very pings that
      failed, that it is suspected; 1.5 s is 5x the ~0.3 s a refutation takes to reach
      every cell of 1,000. The price: a live cell that cannot answer anyone for ~2.5 s
      (a long pause) is declared dead, and rejoins with a higher incarnation.
    - suspicion_max_timeout_mult 8 (memberlist 6): a suspicion nobody confirms waits
      8 min = 12 s at N = 1,000 (memberlist: 72 s), 40x that refutation time, and then
      one last probe of our own must fail too.
    - suspicion_verifiers 4, max_checks 4: an accuser sends its new suspicion at once to
      4 random members besides its 3 gossip targets; each of those 7 probes the suspect
      out of turn, so a dead cell collects its K = 3 confirmations ~1 period after the
      first suspicion (memberlist collects them from ordinary probing, ~1 a period).
    - retransmit_mult 4 sends each update 4 ceil(log10(N+1)) times (20 at N = 10,000),
      enough for an epidemic to reach everyone with high probability.
    """

    probe_interval: float = 1.0
    probe_timeout: float = 0.5
    indirect_checks: int = 5
    direct_retry: bool = True  # ping the target again at probe_timeout / 2
    gossip_interval: float = 0.2
    gossip_nodes: int = 3
    retransmit_mult: int = 4
    suspicion_mult: float = 0.5
    suspicion_max_timeout_mult: float = 8.0
    suspicion_confirmations: int = 3  # Lifeguard's K
    suspicion_verifiers: int = 4
    max_checks: int = 4  # verification probes in flight at once
    push_pull_interval: float = 30.0
    awareness_max: int = 8
    dead_retention: float = 30.0
    join_retry: float = 2.0
    nack_fraction: float = 0.8  # a relay nacks after this share of probe_timeout
    record_events: bool = True  # a simulator of 10,000 cells may not want 10^8 events


@dataclass(frozen=True, slots=True)
class Outgoing:
    """Send `msg` to `addr`."""

    addr: str
    msg: Message


@dataclass(frozen=True, slots=True)
class MemberJoined:
    node: str
    addr: str
    zone: str
    incarnation: int
    at: float


@dataclass(frozen=True, slots=True)
class MemberAlive:
    """A suspect refuted the suspicion."""

    node: str
    incarnation: int
    at: float


@dataclass(frozen=True, slots=True)
class MemberSuspected:
    node: str
    incarnation: int
    by: str
    at: float


@dataclass(frozen=True, slots=True)
class MemberDead:
    node: str
    incarnation: int
    by: str
    at: float


@dataclass(frozen=True, slots=True)
class MemberLeft:
    node: str
    incarnation: int
    at: float


Event = MemberJoined | MemberAlive | MemberSuspected | MemberDead | MemberLeft


class _Member:
    __slots__ = ("addr", "incarnation", "node", "since", "status", "zone")

    def __init__(
        self, node: str, addr: str, zone: str, incarnation: int, status: Status, since: float
    ) -> None:
        self.node = node
        self.addr = addr
        self.zone = zone
        self.incarnation = incarnation
        self.status = status
        self.since = since

    def state(self) -> MemberState:
        return MemberState(self.node, self.incarnation, self.addr, self.zone, self.status)


class _Suspicion:
    """Lifeguard's dynamic suspicion timer for one suspect at one incarnation.

    It starts at `max` and shrinks logarithmically to `min` as the k confirmations
    arrive (memberlist's formula). With k = 0 (a cluster too small to confirm anything)
    it stays at `max`: memberlist uses min there, but our min is too short to stand
    alone, without confirmations, against packet loss."""

    __slots__ = ("checked", "confirmers", "deadline", "incarnation", "k", "max", "min", "start")

    def __init__(
        self, by: str, incarnation: int, k: int, lo: float, hi: float, start: float
    ) -> None:
        self.checked = False  # the last check before an unconfirmed death was made
        self.confirmers = {by}
        self.incarnation = incarnation
        self.k = k
        self.min = lo
        self.max = hi
        self.start = start
        self.deadline = start + hi

    def confirm(self, by: str) -> bool:
        """Count an independent confirmation; True if it was new (and so worth gossiping)."""
        if by in self.confirmers or len(self.confirmers) - 1 >= self.k:
            return False
        self.confirmers.add(by)
        c = len(self.confirmers) - 1
        frac = math.log(c + 1) / math.log(self.k + 1)
        self.deadline = self.start + max(self.min, self.max - (self.max - self.min) * frac)
        return True


class _Probe:
    """One probe: Ping at start, Ping again at retry_at, PingReqs at timeout_at, failed
    at end_at unless an Ack came. `next_at` is the next of those still to come."""

    __slots__ = (
        "end_at",
        "expected_nacks",
        "id",
        "indirect",
        "nacks",
        "next_at",
        "retry_at",
        "target",
        "timeout_at",
    )

    def __init__(
        self, pid: int, target: str, retry_at: float, timeout_at: float, end_at: float
    ) -> None:
        self.id = pid
        self.target = target
        self.retry_at = retry_at
        self.timeout_at = timeout_at
        self.end_at = end_at
        self.next_at = retry_at
        self.indirect = False
        self.expected_nacks = 0
        self.nacks = 0


class _Relay:
    """A ping we send on behalf of a PingReq."""

    __slots__ = ("nack_at", "origin", "origin_probe", "until", "want_nack")

    def __init__(
        self, origin: str, origin_probe: int, want_nack: bool, nack_at: float, until: float
    ) -> None:
        self.origin = origin
        self.origin_probe = origin_probe
        self.want_nack = want_nack
        self.nack_at = nack_at
        self.until = until


class _Broadcasts:
    """Updates waiting to be piggybacked, one per node: urgent ones first (deaths and our
    own refutations, which change who is live), then fewest transmissions first.

    Buckets by transmit count keep `take` proportional to what it returns, not to the
    queue length, which matters when 10,000 cells join at once."""

    __slots__ = ("_lanes", "_where")

    def __init__(self) -> None:
        # lane 0: urgent, lane 1: the rest; each a list of buckets by transmit count
        self._lanes: tuple[list[dict[str, tuple[Update, int]]], ...] = ([{}], [{}])
        self._where: dict[str, tuple[int, int]] = {}

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, node: str) -> bool:
        return node in self._where

    def push(self, update: Update, urgent: bool = False) -> None:
        node = update.node
        w = self._where.get(node)
        if w is not None:
            del self._lanes[w[0]][w[1]][node]
        lane = 0 if urgent else 1
        self._lanes[lane][0][node] = (update, wire.record_size(update))
        self._where[node] = (lane, 0)

    def take(self, budget: int, limit: int) -> list[Update]:
        """Up to `budget` bytes of updates (urgent, fewest sent, newest first); counts
        them sent."""
        if not self._where or budget < _MIN_UPDATE:
            return []
        picked: list[tuple[int, int, str, Update, int]] = []
        for lane, buckets in enumerate(self._lanes):
            for t, bucket in enumerate(buckets):
                for node in reversed(bucket):
                    update, size = bucket[node]
                    if size <= budget:
                        picked.append((lane, t, node, update, size))
                        budget -= size
                        if budget < _MIN_UPDATE:
                            break
                if budget < _MIN_UPDATE:
                    break
            if budget < _MIN_UPDATE:
                break
        where = self._where
        for lane, t, node, update, size in picked:
            buckets = self._lanes[lane]
            del buckets[t][node]
            if t + 1 >= limit:
                del where[node]
                continue
            if t + 1 == len(buckets):
                buckets.append({})
            buckets[t + 1][node] = (update, size)
            where[node] = (lane, t + 1)
        return [p[3] for p in picked]


_MIN_UPDATE = 9  # the smallest update: kind, 1-byte name, u32, 1-byte name


class Snapshot:
    """A member table that many cells share read-only (see `Membership.preload`).

    A simulator of N cells that each start knowing all N would otherwise build N^2 rows
    (10^8 at N = 10,000: gigabytes, and minutes before the first tick). With a shared
    snapshot each cell copies a row only when its view of that member changes."""

    __slots__ = ("live", "names", "ring_index", "ring_keys", "ring_names", "rows")

    def __init__(self, states: Iterable[MemberState]) -> None:
        self.rows: dict[str, MemberState] = {s.node: s for s in states}
        self.names: list[str] = list(self.rows)
        self.live = frozenset(n for n, s in self.rows.items() if _live(s))
        # The probe ring's shared part (`_Ring`): the live members in ring order.
        ring = sorted((_ring_key(n), n) for n in self.live)
        self.ring_keys: list[bytes] = [k for k, _ in ring]
        self.ring_names: list[str] = [n for _, n in ring]
        self.ring_index: dict[str, int] = {n: i for i, n in enumerate(self.ring_names)}


def _ring_key(node: str) -> bytes:
    """A member's place in the probe ring: the same on every cell, whatever the order
    in which it learnt its members (blake3, not Python's salted hash()); the name
    after the hash makes the order total."""
    return blake3.blake3(node.encode()).digest(8) + node.encode()


_EMPTY = Snapshot(())


class _Ring:
    """The live members (alive or suspect, us included) in ring order, as a shared
    Snapshot's ring minus `gone` plus `extra`: rank and select in O(log N) time, and
    memory proportional to how far this cell's view has moved from the snapshot, not
    to N (10,000 simulated cells each holding a sorted list of 10,000 would be 10^8)."""

    __slots__ = ("base", "extra_keys", "extra_names", "gone")

    def __init__(self) -> None:
        self.base = _EMPTY
        self.gone: list[int] = []  # sorted indexes into base.ring_* no longer live here
        self.extra_keys: list[bytes] = []  # sorted keys of live members not in base's ring
        self.extra_names: list[str] = []

    def __len__(self) -> int:
        return len(self.base.ring_keys) - len(self.gone) + len(self.extra_keys)

    def set_live(self, node: str, live: bool) -> None:
        i = self.base.ring_index.get(node)
        if i is not None:
            j = bisect.bisect_left(self.gone, i)
            present = j < len(self.gone) and self.gone[j] == i
            if live and present:
                del self.gone[j]
            elif not live and not present:
                self.gone.insert(j, i)
            return
        key = _ring_key(node)
        j = bisect.bisect_left(self.extra_keys, key)
        present = j < len(self.extra_keys) and self.extra_keys[j] == key
        if live and not present:
            self.extra_keys.insert(j, key)
            self.extra_names.insert(j, node)
        elif not live and present:
            del self.extra_keys[j]
            del self.extra_names[j]

    def _base_before(self, key: bytes) -> int:
        """Live base members with a key below `key`."""
        i = bisect.bisect_left(self.base.ring_keys, key)
        return i - bisect.bisect_left(self.gone, i)

    def rank(self, node: str) -> int:
        """The position of a live member in ring order."""
        i = self.base.ring_index.get(node)
        key = self.base.ring_keys[i] if i is not None else _ring_key(node)
        return self._base_before(key) + bisect.bisect_left(self.extra_keys, key)

    def select(self, q: int) -> str:
        """The live member at position q (0 <= q < len(self))."""
        keys = self.extra_keys
        # the last extra at or before position q: extra j sits at j + base members below it
        lo, hi = 0, len(keys)
        while lo < hi:
            mid = (lo + hi) // 2
            if mid + self._base_before(keys[mid]) <= q:
                lo = mid + 1
            else:
                hi = mid
        if lo and lo - 1 + self._base_before(keys[lo - 1]) == q:
            return self.extra_names[lo - 1]
        # else the (q - lo)-th live base member: the least i with i - |gone <= i| = r
        r, gone, i = q - lo, self.gone, q - lo
        while True:
            nxt = r + bisect.bisect_right(gone, i)
            if nxt == i:
                return self.base.ring_names[i]
            i = nxt


_NOT_OWN = object()

Row = _Member | MemberState  # both have node, addr, zone, incarnation, status


class _Roster:
    """node -> row, copy-on-write over a shared Snapshot; indexable for random picks.

    `own` holds this cell's rows: changed or new ones, and None for a snapshot row that
    was forgotten. Indexes 0 .. size-1 cover the snapshot's names, then `extra` (nodes
    that are not in the snapshot), so a uniform index is a uniform member."""

    __slots__ = ("base", "extra", "own")

    def __init__(self) -> None:
        self.base = _EMPTY
        self.own: dict[str, _Member | None] = {}
        self.extra: list[str] = []

    def get(self, node: str) -> Row | None:
        r = self.own.get(node, _NOT_OWN)
        if r is _NOT_OWN:
            return self.base.rows.get(node)
        return r  # type: ignore[return-value]

    def mutable(self, node: str) -> _Member:
        """The row of a known member, copied out of the snapshot if need be."""
        r = self.own.get(node)
        if r is None:
            s = self.base.rows[node]
            r = _Member(s.node, s.addr, s.zone, s.incarnation, s.status, 0.0)
            self.own[node] = r
        return r

    def add(self, row: _Member) -> None:
        if row.node not in self.base.rows:
            self.extra.append(row.node)
        self.own[row.node] = row

    def forget(self, nodes: Iterable[str]) -> None:
        dropped = set()
        for node in nodes:
            if node in self.base.rows:
                self.own[node] = None
            else:
                del self.own[node]
                dropped.add(node)
        if dropped:
            self.extra = [n for n in self.extra if n not in dropped]

    def size(self) -> int:
        return len(self.base.names) + len(self.extra)

    def name(self, i: int) -> str:
        names = self.base.names
        return names[i] if i < len(names) else self.extra[i - len(names)]

    def rows(self) -> Iterable[Row]:
        for node in self.base.names:
            r = self.get(node)
            if r is not None:
                yield r
        own = self.own
        for node in self.extra:
            yield own[node]  # type: ignore[misc]


def _state(r: Row) -> MemberState:
    return r if type(r) is MemberState else r.state()  # type: ignore[union-attr]


def _live(r: Row | None) -> bool:
    return r is not None and (r.status is Status.ALIVE or r.status is Status.SUSPECT)


class Membership:
    """One cell's SWIM + Lifeguard membership. See the module docstring for how to drive it."""

    def __init__(
        self, self_id: str, addr: str, zone: str, config: Config, rng: random.Random
    ) -> None:
        self.id = self_id
        self.addr = addr
        self.zone = zone
        self.config = config
        self.rng = rng
        self.incarnation = 0
        self.health = 0  # Lifeguard local health score, 0 .. awareness_max - 1
        self.epoch = 0  # bumped whenever the set of live members changes
        self.stats: Counter[str] = Counter()
        self._me = _Member(self_id, addr, zone, 0, Status.ALIVE, 0.0)
        self._roster = _Roster()
        self._roster.add(self._me)
        self._ring = _Ring()  # live members in probe order (module docstring)
        self._ring.set_live(self_id, True)
        self._slot = -1  # the probe period of our last probe
        self._probes_since_forget = 0
        self._n_live = 1  # members alive or suspect, us included
        self._bcast = _Broadcasts()
        self._suspicions: dict[str, _Suspicion] = {}
        self._probe: _Probe | None = None  # the round-robin probe
        self._checks: dict[int, _Probe] = {}  # verification probes of suspects, by id
        self._fan_out: list[Suspect] = []  # our new accusations, to send to verifiers
        self._to_verify: list[str] = []  # suspects an accuser just told us about
        self._sender: str | None = None  # address of the message being received
        self._correct: list[str] = []  # members its sender accused with stale news
        self._relays: dict[int, _Relay] = {}
        self._next_id = rng.randrange(1 << 31)
        self._events: deque[Event] = deque()
        self._leaving = False
        self._seeds: list[str] = []
        self._started = False
        self._next_probe = math.inf
        self._next_gossip = math.inf
        self._next_push_pull = math.inf
        self._next_join = math.inf
        self._exchange = 0
        self._strangers: dict[str, float] = {}  # unknown senders -> when we synced with them
        self._live_ids: tuple[int, frozenset[str]] | None = None

    # ----------------------------------------------------------------- public API

    def join(self, seeds: Sequence[str], now: float) -> list[Outgoing]:
        """Start the protocol, and join the cluster through `seeds` (addresses other than
        our own; none for the first cell). Retries every join_retry until a member is known."""
        self._start(now)
        self._seeds = [s for s in seeds if s != self.addr]
        if not self._seeds:
            return []
        self._next_join = now + self.config.join_retry
        return self._join_messages()

    def preload(self, states: Snapshot | Iterable[MemberState], now: float) -> None:
        """Start as if a push-pull had just brought `states` (live members), without
        events or gossip, instead of joining. Pass one `Snapshot` to every cell of a
        simulation so that they share its rows instead of each copying N of them."""
        if self._roster.size() > 1 or self._roster.base is not _EMPTY:
            raise RuntimeError("preload replaces the starting table: call it first, once")
        snap = states if isinstance(states, Snapshot) else Snapshot(states)
        roster = self._roster
        roster.base = snap
        if self.id in snap.rows:
            roster.extra.remove(self.id)  # our row stays our own, indexed by the snapshot
        self._ring.set_live(self.id, False)
        self._ring.base = snap
        self._ring.set_live(self.id, True)
        self._n_live = len(snap.live) + (self.id not in snap.live)
        self.epoch += 1
        self._start(now)

    def leave(self, now: float) -> list[Outgoing]:
        """Leave gracefully: gossip Dead(self, by=self) now and on later ticks until
        `done_leaving`; stop probing. Others report MemberLeft, not MemberDead."""
        if self._leaving:
            return []
        self._leaving = True
        self.epoch += 1
        self._me.status = Status.LEFT
        self._ring.set_live(self.id, False)
        self._probe = None
        self._checks.clear()
        self._bcast.push(Dead(self.id, self.incarnation, self.id), urgent=True)
        return self._gossip(now)

    @property
    def done_leaving(self) -> bool:
        """True once the leave has been gossiped as often as the retransmit limit asks."""
        return self._leaving and len(self._bcast) == 0

    def tick(self, now: float) -> list[Outgoing]:
        """Run every timer that is due at `now`."""
        out: list[Outgoing] = []
        if not self._started:
            return out
        if now >= self._next_join:
            if self._n_live > 1 or self._leaving:
                self._next_join = math.inf
                # Joined: one more exchange, now, with a random member rather than a
                # seed. Cells that start together joined through seeds that had not
                # heard of each other yet; the periodic push-pull may be 30 s away.
                self._next_push_pull = now
            else:
                self._next_join = now + self.config.join_retry
                out += self._join_messages()
        if self._relays:
            out += self._tick_relays(now)
        if self._suspicions:
            out += self._tick_suspicions(now)
        if not self._leaving:
            out += self._tick_probe(now)
            if now >= self._next_push_pull:
                self._next_push_pull = now + self._push_pull_interval()
                target = self._random_others(1, live_only=True)
                if target:
                    out += self._push_pull(target[0].addr, reply=False, join=False)
        if self._fan_out:
            out += self._verification(now)
        if now >= self._next_gossip:
            k = math.floor((now - self._next_gossip) / self.config.gossip_interval) + 1
            self._next_gossip += k * self.config.gossip_interval
            out += self._gossip(now)
        return out

    def next_deadline(self) -> float:
        """When `tick` next has something to do (math.inf: nothing until a message comes)."""
        if not self._started:
            return math.inf
        t = self._next_join
        if not self._leaving and self._probe is None:  # one probe at a time
            t = min(t, self._next_probe)
        if self._bcast:
            t = min(t, self._next_gossip)
        if not self._leaving:
            t = min(t, self._next_push_pull)
        p = self._probe
        if p is not None:
            t = min(t, p.next_at)
        for p in self._checks.values():
            t = min(t, p.next_at)
        for r in self._relays.values():
            t = min(t, r.nack_at if r.want_nack else r.until)
        for s in self._suspicions.values():
            t = min(t, s.deadline)
        return t

    def receive(self, msg: Message, sender_addr: str, now: float) -> list[Outgoing]:
        """Handle one decoded membership message that came from `sender_addr`."""
        if not self._started:
            return []
        self.stats["received"] += 1
        updates = getattr(msg, "updates", ())
        if updates:
            self._sender = sender_addr
            for u in updates:
                self._apply(u, now)
            self._sender = None
        out = self._verification(now) if self._to_verify or self._fan_out else []
        fix = self._corrections() if self._correct else ()
        if fix:
            out.append(Outgoing(sender_addr, Gossip(fix)))
        kind = type(msg)
        if kind is Ping:
            if msg.target != self.id:
                self.stats["misdirected_ping"] += 1
                return out
            ack = self._piggyback(Ack(msg.probe), Ack, (msg.probe,), fix)  # fix: twice
            out.append(Outgoing(sender_addr, ack))
        elif kind is Ack:
            out += self._on_ack(msg.probe, now)
        elif kind is Nack:
            p = self._probe
            if p is None or p.id != msg.probe:
                p = self._checks.get(msg.probe)
            if p is not None:
                p.nacks += 1
        elif kind is PingReq:
            out += self._on_ping_req(msg, sender_addr, now)
        elif kind is PushPull:
            out += self._on_push_pull(msg, sender_addr, now)
        return out

    def heard(self, sender: str, sender_addr: str, now: float) -> list[Outgoing]:
        """A signed datagram of any kind (membership or placement) came from member
        `sender` at `sender_addr`. One we have no row for gets a push-pull at once, at
        most one per `join_retry` each, instead of waiting for the periodic one.

        Cells that start together join through seeds that do not know each other yet,
        and a join's news is gossiped a bounded number of times, to the members its
        gossipers know then: a cell can miss it and stay blind to a live member until
        its next push-pull, up to push_pull_interval later (seen on the testbed: one
        cell of eight blind to three others for 20 s; the lease holder it was told of
        was a name it could not reach, and it read the layer from the Hub). Its peers
        keep sending it datagrams meanwhile (probes, lookups, announcements), and the
        MAC proves each sender a member: one exchange with it brings its whole table."""
        if not self._started or self._leaving or sender == self.id:
            return []
        strangers = self._strangers
        if self._roster.get(sender) is not None:
            if strangers:
                strangers.pop(sender, None)
            return []
        last = strangers.get(sender)
        if last is not None and now - last < self.config.join_retry:
            return []
        if len(strangers) >= 64:  # members only (signed), but keep it small regardless
            for name, when in list(strangers.items()):
                if now - when >= self.config.join_retry:
                    del strangers[name]
        strangers[sender] = now
        self.stats["stranger_syncs"] += 1
        return self._push_pull(sender_addr, reply=False, join=False)

    def next_event(self) -> Event | None:
        """The oldest event not yet taken, or None."""
        return self._events.popleft() if self._events else None

    def members(self) -> list[MemberState]:
        """Every row of the table, us included, dead and left ones until forgotten."""
        self._me.incarnation = self.incarnation
        return [_state(r) for r in self._roster.rows()]

    def live_members(self) -> list[MemberState]:
        """Members alive or suspect (a suspect may well be alive), us included."""
        return [_state(r) for r in self._roster.rows() if _live(r)]

    def live_ids(self) -> frozenset[str]:
        """Names of the members alive or suspect, us included (unless leaving): what
        placement hashes homes over. Recomputed only when `epoch` moves; while a cell's
        view still equals its preloaded Snapshot, every such cell returns the snapshot's
        own frozenset, so a simulator's caches keyed by it are shared."""
        if self._live_ids is not None and self._live_ids[0] == self.epoch:
            return self._live_ids[1]
        roster = self._roster
        if len(roster.own) == 1 and not roster.extra and self.id in roster.base.live:
            ids = roster.base.live
        else:
            ids = frozenset(r.node for r in roster.rows() if _live(r))
        if self._leaving:
            ids = ids - {self.id}
        self._live_ids = (self.epoch, ids)
        return ids

    def status_of(self, node: str) -> Status | None:
        r = self._roster.get(node)
        return None if r is None else r.status

    def member(self, node: str) -> MemberState | None:
        r = self._roster.get(node)
        return None if r is None else _state(r)

    @property
    def num_live(self) -> int:
        return self._n_live

    @property
    def pending_broadcasts(self) -> int:
        return len(self._bcast)

    # ----------------------------------------------------------------- rules

    def _start(self, now: float) -> None:
        if self._started:
            return
        self._started = True
        c = self.config
        self._me.since = now
        # Random phases so that cells started together do not probe and gossip in step.
        self._next_probe = now + self.rng.uniform(0, c.probe_interval)
        self._next_gossip = now + self.rng.uniform(0, c.gossip_interval)
        self._next_push_pull = now + self.rng.uniform(0, self._push_pull_interval())

    def _emit(self, ev: Event) -> None:
        if self.config.record_events:
            self._events.append(ev)

    def _add(
        self, node: str, addr: str, zone: str, inc: int, status: Status, now: float
    ) -> _Member:
        m = _Member(node, addr, zone, inc, status, now)
        self._roster.add(m)
        if status is Status.ALIVE or status is Status.SUSPECT:
            self._n_live += 1
            self.epoch += 1
            self._ring.set_live(node, True)
        return m

    def _apply(self, u: Update, now: float) -> None:
        kind = type(u)
        if kind is Alive:
            self._on_alive(u, now)
        elif kind is Suspect:
            self._on_suspect(u, now)
        else:
            self._on_dead(u, now)

    def _on_alive(self, a: Alive, now: float) -> None:
        if a.node == self.id:
            if a.incarnation > self.incarnation and not self._leaving:
                self._refute(a.incarnation)
            return
        r = self._roster.get(a.node)
        if r is None:
            self._add(a.node, a.addr, a.zone, a.incarnation, Status.ALIVE, now)
            self._bcast.push(a)
            self._emit(MemberJoined(a.node, a.addr, a.zone, a.incarnation, now))
            return
        if a.incarnation <= r.incarnation:
            return
        m = self._roster.mutable(a.node)
        old = m.status
        m.incarnation, m.addr, m.zone, m.status, m.since = (
            a.incarnation,
            a.addr,
            a.zone,
            Status.ALIVE,
            now,
        )
        self._suspicions.pop(a.node, None)
        self._bcast.push(a)
        if old is Status.SUSPECT:
            self._emit(MemberAlive(a.node, a.incarnation, now))
        elif old is Status.DEAD or old is Status.LEFT:
            self._n_live += 1
            self.epoch += 1
            self._ring.set_live(a.node, True)
            self._emit(MemberJoined(a.node, a.addr, a.zone, a.incarnation, now))

    def _on_suspect(self, s: Suspect, now: float, *, probed: bool = False) -> None:
        """`probed`: our own probe of s.node just failed (s.by is us)."""
        if s.node == self.id:
            if s.incarnation >= self.incarnation and not self._leaving:
                self._refute(s.incarnation)
            elif not self._leaving:
                self._stale(s.node)
            return
        r = self._roster.get(s.node)
        if r is None:
            return
        if s.incarnation < r.incarnation:
            self._stale(s.node)
            return
        if r.status is Status.DEAD or r.status is Status.LEFT:
            return
        if r.status is Status.SUSPECT and s.incarnation == r.incarnation:
            timer = self._suspicions.get(s.node)
            if timer is not None and timer.confirm(s.by):
                self.stats["suspicion_confirmations"] += 1
                self._bcast.push(s)
            return
        m = self._roster.mutable(s.node)
        m.incarnation, m.status, m.since = s.incarnation, Status.SUSPECT, now
        c = self.config
        n = self._n_live
        k = max(0, min(c.suspicion_confirmations, n - 2))
        lo = c.suspicion_mult * max(1.0, math.log10(n)) * c.probe_interval
        self._suspicions[s.node] = _Suspicion(
            s.by, s.incarnation, k, lo, c.suspicion_max_timeout_mult * lo, now
        )
        self._bcast.push(s)
        self.stats["suspected"] += 1
        if probed:
            self._fan_out.append(s)
        elif self._sender is not None and not self._leaving:
            accuser = self._roster.get(s.by)
            if accuser is not None and accuser.addr == self._sender:
                self._to_verify.append(s.node)  # fresh news, first hand: check it
        self._emit(MemberSuspected(s.node, s.incarnation, s.by, now))

    def _on_dead(self, d: Dead, now: float) -> None:
        if d.node == self.id:
            if d.incarnation >= self.incarnation and not self._leaving:
                self._refute(d.incarnation)
            elif not self._leaving:
                self._stale(d.node)
            return
        r = self._roster.get(d.node)
        if r is None:
            return
        if d.incarnation < r.incarnation:
            self._stale(d.node)
            return
        if r.status is Status.DEAD or r.status is Status.LEFT:
            return
        m = self._roster.mutable(d.node)
        left = d.by == d.node
        m.incarnation, m.since = d.incarnation, now
        m.status = Status.LEFT if left else Status.DEAD
        self._suspicions.pop(d.node, None)
        self._n_live -= 1
        self.epoch += 1
        self._ring.set_live(d.node, False)
        self._bcast.push(d, urgent=True)
        if left:
            self._emit(MemberLeft(d.node, d.incarnation, now))
        else:
            self.stats["declared_dead"] += 1
            self._emit(MemberDead(d.node, d.incarnation, d.by, now))

    def _stale(self, node: str) -> None:
        """The sender of the message being received still accuses `node` at an
        incarnation it has since refuted: tell it directly (see `_corrections`)."""
        if self._sender is not None and node not in self._correct:
            self._correct.append(node)

    def _corrections(self) -> tuple[Update, ...]:
        """The newer Alive of every member the sender accused with stale news. A cell
        that heard a suspicion after the refutation's epidemic had passed would
        otherwise keep it, unrefuted, until its timer declared a live cell dead; its
        own gossip of the stale news is what brings it the answer."""
        ups: list[Update] = []
        for node in self._correct:
            r = self._me if node == self.id else self._roster.get(node)
            if r is not None and r.status is Status.ALIVE:
                inc = self.incarnation if r is self._me else r.incarnation
                ups.append(Alive(node, inc, r.addr, r.zone))
        self._correct.clear()
        self.stats["corrections"] += len(ups)
        return tuple(ups[:8])

    def _refute(self, seen: int) -> None:
        self.incarnation = max(self.incarnation, seen) + 1
        self._me.incarnation = self.incarnation
        self._bcast.push(Alive(self.id, self.incarnation, self.addr, self.zone), urgent=True)
        self._health(+1)
        self.stats["refuted"] += 1

    def _health(self, delta: int) -> None:
        self.health = min(max(self.health + delta, 0), self.config.awareness_max - 1)

    # ----------------------------------------------------------------- probing

    def _new_id(self) -> int:
        self._next_id = (self._next_id + 1) & 0xFFFFFFFF
        return self._next_id

    def _next_target(self, slot: int, now: float) -> Row | None:
        """The member we probe in probe period `slot`: in ring order, the one
        1 + slot mod (N - 1) places after us (module docstring, "Who probes whom")."""
        self._probes_since_forget += 1
        if self._probes_since_forget >= self._roster.size():
            self._forget_dead(now)
        ring = self._ring
        n = len(ring)
        if n < 2:
            return None
        node = ring.select((ring.rank(self.id) + 1 + slot % (n - 1)) % n)
        return self._roster.get(node)

    def _forget_dead(self, now: float) -> None:
        """Forget rows dead or left longer than dead_retention (checked about every N
        probes, so at most ~N periods late)."""
        self._probes_since_forget = 0
        horizon = now - self.config.dead_retention
        self._roster.forget(
            [
                node
                for node, m in self._roster.own.items()
                if m is not None
                and (m.status is Status.DEAD or m.status is Status.LEFT)
                and m.since < horizon
                and m is not self._me
            ]
        )

    def _tick_probe(self, now: float) -> list[Outgoing]:
        out: list[Outgoing] = []
        c = self.config
        p = self._probe
        if p is not None and self._probe_step(p, now, out):
            self._probe = None
        if self._checks:
            for pid, q in list(self._checks.items()):
                if self._probe_step(q, now, out):
                    del self._checks[pid]
        if self._probe is None and now >= self._next_probe:
            # The period of the scheduled time, not of `now`: a late tick must not make
            # us probe another cell's share. Two probes never share a period.
            slot = max(math.floor(self._next_probe / c.probe_interval), self._slot + 1)
            self._slot = slot
            m = self._next_target(slot, now)
            self._next_probe = max(self._next_probe + c.probe_interval * (self.health + 1), now)
            if m is None:
                return out
            self._probe = self._start_probe(m, now, out)
            self.stats["probes"] += 1
        return out

    def _start_probe(self, m: Row, now: float, out: list[Outgoing]) -> _Probe:
        c = self.config
        scale = self.health + 1
        timeout = c.probe_timeout * scale
        retry = now + timeout / 2 if c.direct_retry else math.inf
        p = _Probe(self._new_id(), m.node, retry, now + timeout, now + c.probe_interval * scale)
        p.next_at = min(retry, p.timeout_at)
        out.append(self._ping(p, m))
        return p

    def _ping(self, p: _Probe, m: Row) -> Outgoing:
        first: list[Update] = []
        if m.status is Status.SUSPECT:  # tell it, so that it can refute at once
            first.append(Suspect(m.node, m.incarnation, self.id))
        return Outgoing(m.addr, self._piggyback(Ping(p.id, m.node), Ping, (p.id, m.node), first))

    def _probe_step(self, p: _Probe, now: float, out: list[Outgoing]) -> bool:
        """Advance one probe's timers; True when it has failed (and is over)."""
        c = self.config
        if now >= p.retry_at:  # a lost Ping or Ack costs one datagram, not 5 PingReqs
            p.retry_at = math.inf
            p.next_at = p.timeout_at
            target = self._roster.get(p.target)
            if target is not None:
                out.append(self._ping(p, target))
        if not p.indirect and now >= p.timeout_at:
            p.indirect = True
            p.next_at = p.end_at
            target = self._roster.get(p.target)
            if target is not None:
                for relay in self._random_others(c.indirect_checks, live_only=True, skip=p.target):
                    base = (p.id, p.target, target.addr, True)
                    out.append(Outgoing(relay.addr, self._piggyback(PingReq(*base), PingReq, base)))
                    p.expected_nacks += 1
                self.stats["indirect_probes"] += 1
        if now < p.end_at:
            return False
        missing = p.expected_nacks - p.nacks if p.expected_nacks else 1
        self._health(missing)
        self.stats["probe_failures"] += 1
        m = self._roster.get(p.target)
        if m is not None and _live(m):
            self._on_suspect(Suspect(m.node, m.incarnation, self.id), now, probed=True)
        return True

    def _verification(self, now: float) -> list[Outgoing]:
        """Send our new accusations to `suspicion_verifiers` random members, and probe
        out of turn the suspects an accuser told us about first hand: a dead cell then
        collects its confirmations within about one probe period."""
        out: list[Outgoing] = []
        c = self.config
        for s in self._fan_out:
            for member in self._random_others(c.suspicion_verifiers, live_only=True, skip=s.node):
                out.append(Outgoing(member.addr, Gossip((s,))))
        self._fan_out.clear()
        for node in self._to_verify:
            if len(self._checks) >= c.max_checks:
                break
            m = self._roster.get(node)
            if m is None or m.status is not Status.SUSPECT:
                continue
            if (self._probe is not None and self._probe.target == node) or any(
                q.target == node for q in self._checks.values()
            ):
                continue
            p = self._start_probe(m, now, out)
            self._checks[p.id] = p
            self.stats["verify_probes"] += 1
        self._to_verify.clear()
        return out

    def _on_ack(self, probe: int, now: float) -> list[Outgoing]:
        p = self._probe
        if p is not None and p.id == probe:
            self._probe = None
            self._health(-1)
            return []
        p = self._checks.pop(probe, None)
        if p is not None:
            self._health(-1)
            s = self._suspicions.get(p.target)
            if s is not None and s.checked:  # alive after all: give it a full timeout more
                s.checked = False
                s.deadline = now + s.max
            return []
        r = self._relays.pop(probe, None)
        if r is not None:
            return [
                Outgoing(r.origin, self._piggyback(Ack(r.origin_probe), Ack, (r.origin_probe,)))
            ]
        return []

    def _on_ping_req(self, msg: PingReq, sender_addr: str, now: float) -> list[Outgoing]:
        c = self.config
        pid = self._new_id()
        self._relays[pid] = _Relay(
            sender_addr,
            msg.probe,
            msg.nack,
            now + c.probe_timeout * c.nack_fraction,
            now + c.probe_interval,
        )
        self.stats["relayed"] += 1
        return [
            Outgoing(
                msg.target_addr, self._piggyback(Ping(pid, msg.target), Ping, (pid, msg.target))
            )
        ]

    def _tick_relays(self, now: float) -> list[Outgoing]:
        out = []
        for pid, r in list(self._relays.items()):
            if r.want_nack and now >= r.nack_at:
                r.want_nack = False
                out.append(
                    Outgoing(
                        r.origin, self._piggyback(Nack(r.origin_probe), Nack, (r.origin_probe,))
                    )
                )
            if now >= r.until:
                del self._relays[pid]
        return out

    def _tick_suspicions(self, now: float) -> list[Outgoing]:
        out: list[Outgoing] = []
        for node, s in list(self._suspicions.items()):
            if now < s.deadline:
                continue
            m = self._roster.get(node)
            if m is None or m.status is not Status.SUSPECT or m.incarnation != s.incarnation:
                del self._suspicions[node]
                continue
            if len(s.confirmers) == 1 and not s.checked and not self._leaving:
                # Nobody confirmed it: before declaring a death on one cell's word, probe
                # the suspect ourselves (the Ping carries the suspicion). If it answers,
                # it refutes or corrects us; if not, it is dead when the check ends.
                s.checked = True
                if not any(q.target == node for q in self._checks.values()):
                    p = self._start_probe(m, now, out)
                    self._checks[p.id] = p
                    self.stats["last_checks"] += 1
                    s.deadline = p.end_at
                continue
            del self._suspicions[node]
            self._on_dead(Dead(node, s.incarnation, self.id), now)
        return out

    # ----------------------------------------------------------------- dissemination

    def _retransmit_limit(self) -> int:
        return self.config.retransmit_mult * math.ceil(math.log10(self._n_live + 1))

    def _piggyback(
        self, base: Message, cls: type, args: tuple, first: Sequence[Update] = ()
    ) -> Message:
        """`cls(*args, updates=...)` with as many queued updates as fit in a datagram."""
        budget = wire.room(base, self.id)
        ups = list(first)
        for u in first:
            budget -= wire.record_size(u)
        ups += self._bcast.take(budget, self._retransmit_limit())
        if not ups:
            return base
        return cls(*args, updates=tuple(ups))

    def _random_others(self, k: int, *, live_only: bool, skip: str = "") -> list[Row]:
        """Up to k distinct random other members (alive or suspect; with live_only False,
        also dead ones within dead_retention, so that gossip reaches the dead to refute)."""
        roster = self._roster
        size = roster.size()
        if size <= 1 or k <= 0:
            return []

        def eligible(r: Row | None) -> bool:
            if r is None or r is self._me or r.node == skip or r in picked:
                return False
            return _live(r) or (not live_only and r.status is Status.DEAD)

        picked: list[Row] = []
        rand = self.rng.randrange
        for _ in range(3 * k + 3):
            r = roster.get(roster.name(rand(size)))
            if eligible(r):
                picked.append(r)  # type: ignore[arg-type]
                if len(picked) == k:
                    return picked
        # Few eligible members among many rows: fall back to filtering them all.
        rest = [r for r in roster.rows() if eligible(r)]
        picked += self.rng.sample(rest, min(k - len(picked), len(rest)))
        return picked

    def _gossip(self, now: float) -> list[Outgoing]:
        if not self._bcast:
            return []
        out = []
        limit = self._retransmit_limit()
        budget = wire.room(Gossip(()), self.id)
        for member in self._random_others(self.config.gossip_nodes, live_only=False):
            ups = self._bcast.take(budget, limit)
            if not ups:
                break
            out.append(Outgoing(member.addr, Gossip(tuple(ups))))
        self.stats["gossip_sent"] += len(out)
        return out

    # ----------------------------------------------------------------- push-pull, join

    def _push_pull_interval(self) -> float:
        """memberlist's pushPullScale: past 32 nodes, one more interval per doubling."""
        n = self._n_live
        base = self.config.push_pull_interval
        if n <= 32:
            return base
        return base * (math.ceil(math.log2(n) - math.log2(32)) + 1)

    def _states(self) -> list[MemberState]:
        self._me.incarnation = self.incarnation
        return [_state(r) for r in self._roster.rows()]

    def _push_pull(self, addr: str, *, reply: bool, join: bool) -> list[Outgoing]:
        self._exchange = (self._exchange + 1) & 0xFFFFFFFF
        budget = wire.room(PushPull(0, join, reply, 0, 0, ()), self.id)
        chunks: list[list[MemberState]] = [[]]
        used = 0
        for s in self._states():
            size = wire.record_size(s)
            if used + size > budget:
                chunks.append([])
                used = 0
            chunks[-1].append(s)
            used += size
        self.stats["push_pull_sent"] += 1
        return [
            Outgoing(addr, PushPull(self._exchange, join, reply, i, len(chunks), tuple(c)))
            for i, c in enumerate(chunks)
        ]

    def _join_messages(self) -> list[Outgoing]:
        out = []
        for seed in self._seeds:
            out += self._push_pull(seed, reply=False, join=True)
        return out

    def _on_push_pull(self, msg: PushPull, sender_addr: str, now: float) -> list[Outgoing]:
        for s in msg.states:
            self._merge(s, now)
        if not msg.reply and msg.part == 0:
            return self._push_pull(sender_addr, reply=True, join=False)
        return []

    def _merge(self, s: MemberState, now: float) -> None:
        """One row of a peer's table. A remote DEAD only makes us suspect (memberlist's
        rule): the cell gets its chance to refute before we declare it dead ourselves."""
        st = s.status
        r = self._roster.get(s.node)
        if r is not None and r.incarnation == s.incarnation and r.status is st:
            return  # the common case: we already agree
        if st is Status.ALIVE or st is Status.SUSPECT:
            if st is Status.ALIVE or r is None:
                self._on_alive(Alive(s.node, s.incarnation, s.addr, s.zone), now)
            if st is Status.SUSPECT:
                self._on_suspect(Suspect(s.node, s.incarnation, self.id), now)
        elif st is Status.DEAD:
            self._on_suspect(Suspect(s.node, s.incarnation, self.id), now)
        else:
            self._on_dead(Dead(s.node, s.incarnation, s.node), now)
