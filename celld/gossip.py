"""The cell's UDP socket among its peers: membership (SWIM) and placement datagrams.

Owns the one UDP socket on `[cluster] listen`, the `protocol.membership.Membership`
of this cell, and the `protocol.wire.Codec` that seals what goes out and opens what
comes in. Every datagram in is authenticated, fresh and well-formed or it is dropped
and counted by reason (`wire.Reason`), never raised. Membership's timers run from
its `next_deadline`; `now` is Unix time, the epoch every cell shares, so the
collective probe schedule of membership.py interlocks across real cells as it does
in the simulator.

Never: decides anything about membership or placement (protocol/ does), nor
speaks HTTP (celld/peer.py carries pieces). Placement datagrams are handed to
whoever listens (`Listener`, the daemon's peering driver) with their
authenticated sender; placement's replies go out through `send`.
"""

from __future__ import annotations

import logging
import math
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge

from protocol import membership as mp
from protocol import wire
from protocol.wire import MemberState, Status

log = logging.getLogger(__name__)

RECV_SIZE = 2048  # > wire.MAX_DATAGRAM: an oversized datagram is seen whole, and counted
LEAVE_TIMEOUT = 2.0  # seconds SIGTERM waits for the leave to be gossiped

_EVENT_LEVEL = {
    mp.MemberJoined: logging.INFO,
    mp.MemberAlive: logging.INFO,
    mp.MemberSuspected: logging.WARNING,
    mp.MemberDead: logging.WARNING,
    mp.MemberLeft: logging.INFO,
}


class Listener(Protocol):
    """What the daemon's peering driver hears from gossip."""

    def members_changed(self, live: frozenset[str], now: float) -> None: ...

    def member_gone(self, name: str, now: float) -> None: ...

    def datagram(self, sender: str, msg: Any, now: float) -> None: ...


@dataclass
class GossipMetrics:
    """Gossip's figures on the daemon's registry (celld_gossip_*)."""

    registry: CollectorRegistry
    members: Gauge = field(init=False)
    sent: Counter = field(init=False)
    received: Counter = field(init=False)
    dropped: Counter = field(init=False)
    probe_failures: Counter = field(init=False)

    def __post_init__(self) -> None:
        r = self.registry
        self.members = Gauge(
            "celld_gossip_members", "Members of the cluster by state, as this cell sees them",
            ["state"], registry=r,
        )  # fmt: skip
        self.sent = Counter(
            "celld_gossip_datagrams_sent", "Datagrams sent by kind", ["kind"], registry=r
        )
        self.received = Counter(
            "celld_gossip_datagrams_received",
            "Authenticated datagrams received by kind",
            ["kind"],
            registry=r,
        )
        self.dropped = Counter(
            "celld_gossip_datagrams_dropped",
            "Datagrams dropped: unsigned, stale, replayed, malformed, or unsendable",
            ["reason"],
            registry=r,
        )
        self.probe_failures = Counter(
            "celld_gossip_probe_failures",
            "Probes of a member that got no answer, direct or indirect",
            registry=r,
        )
        for state in Status:
            self.members.labels(state.name.lower())
        for reason in wire.Reason:
            self.dropped.labels(reason.value)


@dataclass(frozen=True)
class Peer:
    """One row of `celld peers`."""

    name: str
    addr: str
    zone: str
    state: str
    incarnation: int
    last_heard: float | None  # Unix time of its last authenticated datagram
    blobs_announced: int = 0  # to this cell, as one of the digests' homes (celld.peering)


def split_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


class Gossip:
    """One cell's membership over UDP. `run` binds and serves until cancelled;
    `leave` gossips a graceful leave first (SIGTERM)."""

    def __init__(
        self,
        name: str,
        listen: tuple[str, int],
        advertise: str,
        zone: str,
        key: bytes,
        seeds: list[str],
        registry: CollectorRegistry,
        *,
        config: mp.Config | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.name = name
        self.listen = listen
        self.clock = clock
        self.seeds = [s for s in seeds if s != advertise]
        now = clock()
        self.membership = mp.Membership(
            name, advertise, zone, config or mp.Config(), rng or random.Random(f"{name}/{now}")
        )
        self.codec = wire.Codec(key, name, now=now)
        self.metrics = GossipMetrics(registry)
        self.listener: Listener | None = None
        self.last_heard: dict[str, float] = {}
        self._sock: socket.socket | None = None
        self._wake = trio.Event()
        self._epoch = -1
        self._probe_failures = 0

    # -- life ------------------------------------------------------------------------

    async def bind(self) -> tuple[str, int]:
        """Opens the socket; the caller names the key in the error if this fails."""
        family = socket.AF_INET6 if ":" in self.listen[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.bind(self.listen)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        await trio.lowlevel.checkpoint()
        return sock.getsockname()[:2]

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        if self._sock is None:
            await self.bind()
        assert self._sock is not None
        try:
            now = self.clock()
            self._flush(self.membership.join(self.seeds, now), now)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._receive_loop)
                nursery.start_soon(self._timer_loop)
                task_status.started()
        finally:
            self._sock.close()

    async def leave(self, timeout: float = LEAVE_TIMEOUT) -> None:
        """Gossip our own Dead(by=self) until membership says it went out as often as
        its retransmit limit asks, or `timeout`: peers then stop asking us at once
        instead of waiting to detect a failure."""
        now = self.clock()
        self._flush(self.membership.leave(now), now)
        with trio.move_on_after(timeout):
            while not self.membership.done_leaving:
                await self._sleep_until(self.membership.next_deadline())
                now = self.clock()
                self._flush(self.membership.tick(now), now)
        log.info("left the cluster (%s)", "gossiped" if self.membership.done_leaving else "timeout")

    # -- what the daemon asks --------------------------------------------------------

    def send(self, to: str, msg: Any) -> None:
        """A placement or swarm datagram to member `to` (by name); unknown or dead: dropped."""
        m = self.membership.member(to)
        if m is None or m.status in (Status.DEAD, Status.LEFT):
            self.metrics.dropped.labels("no_route").inc()
            return
        self._send_to(m.addr, msg, self.clock())

    def live_ids(self) -> frozenset[str]:
        return self.membership.live_ids()

    def peers(self) -> list[Peer]:
        return [
            Peer(
                s.node,
                s.addr,
                s.zone,
                s.status.name.lower(),
                s.incarnation,
                self.last_heard.get(s.node),
            )
            for s in sorted(self.membership.members(), key=lambda s: s.node)
        ]

    # -- the socket ------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        assert self._sock is not None
        sock = self._sock
        while True:
            await trio.lowlevel.wait_readable(sock)
            for _ in range(64):  # a burst at once, then let the timers run
                try:
                    data, addr = sock.recvfrom(RECV_SIZE)
                except BlockingIOError:
                    break
                except OSError as exc:  # an ICMP error surfacing on the socket: not fatal
                    log.debug("gossip socket: %s", exc)
                    continue
                self._datagram(data, f"{addr[0]}:{addr[1]}", self.clock())
            self._wake.set()

    def _datagram(self, data: bytes, source: str, now: float) -> None:
        opened = self.codec.open(data, now)
        if isinstance(opened, wire.DecodeError):
            self.metrics.dropped.labels(opened.reason.value).inc()
            log.debug(
                "dropped a datagram from %s: %s %s", source, opened.reason.value, opened.detail
            )
            return
        msg = opened.msg
        kind = type(msg)
        self.metrics.received.labels(kind.__name__).inc()
        if opened.sender == self.name:  # our own name from elsewhere: a misconfigured twin
            self.metrics.dropped.labels("own_name").inc()
            log.warning("a datagram from %s claims this cell's name %s", source, self.name)
            return
        self.last_heard[opened.sender] = now
        if kind in wire.MEMBERSHIP_MESSAGES:
            self._flush(self.membership.receive(msg, source, now), now)
        elif self.listener is not None:
            self.listener.datagram(opened.sender, msg, now)
        # After the message itself, which may have brought the sender's row (a push-pull)
        stranger = self.membership.heard(opened.sender, source, now)
        if stranger:
            self._flush(stranger, now)

    def _send_to(self, addr: str, msg: Any, now: float) -> None:
        assert self._sock is not None
        try:
            data = self.codec.seal(msg, now)
            self._sock.sendto(data, split_addr(addr))
        except wire.EncodeError as exc:
            self.metrics.dropped.labels("encode").inc()
            log.error("cannot encode %s: %s", type(msg).__name__, exc)
            return
        except (OSError, ValueError) as exc:
            reason = "buffer_full" if isinstance(exc, BlockingIOError) else "send_error"
            self.metrics.dropped.labels(reason).inc()
            log.debug("cannot send to %s: %s", addr, exc)
            return
        self.metrics.sent.labels(type(msg).__name__).inc()

    def _flush(self, out: list[mp.Outgoing], now: float) -> None:
        for o in out:
            self._send_to(o.addr, o.msg, now)
        self._events(now)

    # -- timers and events -----------------------------------------------------------

    async def _sleep_until(self, deadline: float) -> None:
        """Sleep until Unix time `deadline` or a datagram arrives."""
        delay = deadline - self.clock()
        if delay > 0:
            with trio.move_on_after(delay if math.isfinite(delay) else 3600):
                await self._wake.wait()
        self._wake = trio.Event()

    async def _timer_loop(self) -> None:
        while True:
            await self._sleep_until(self.membership.next_deadline())
            now = self.clock()
            self._flush(self.membership.tick(now), now)

    def _events(self, now: float) -> None:
        m = self.membership
        changed = self._epoch < 0
        while (ev := m.next_event()) is not None:
            changed = True
            level = _EVENT_LEVEL[type(ev)]
            log.log(level, "member %s: %s", ev.node, _describe(ev))
            if self.listener is not None and isinstance(ev, mp.MemberDead | mp.MemberLeft):
                self.listener.member_gone(ev.node, now)
        failures = m.stats["probe_failures"]
        if failures != self._probe_failures:
            self.metrics.probe_failures.inc(failures - self._probe_failures)
            self._probe_failures = failures
        if changed:
            self._count_members(m.members())
        if m.epoch != self._epoch:
            self._epoch = m.epoch
            if self.listener is not None:
                self.listener.members_changed(m.live_ids(), now)

    def _count_members(self, members: list[MemberState]) -> None:
        counts = {s: 0 for s in Status}
        for s in members:
            counts[s.status] += 1
        for s, n in counts.items():
            self.metrics.members.labels(s.name.lower()).set(n)


def _describe(ev: mp.Event) -> str:
    if isinstance(ev, mp.MemberJoined):
        return f"joined from {ev.addr} (zone {ev.zone or '-'}, incarnation {ev.incarnation})"
    if isinstance(ev, mp.MemberAlive):
        return f"refuted its suspicion (incarnation {ev.incarnation})"
    if isinstance(ev, mp.MemberSuspected):
        return f"suspected by {ev.by}"
    if isinstance(ev, mp.MemberDead):
        return f"declared dead by {ev.by}"
    return "left the cluster"
