"""One simulated cluster running one strategy: cells, registries, faults and pulls.

Owns: building the nodes of a scenario, scheduling its faults and pulls, knowing which
cells are live, and routing what happens (a flow ends, a layer completes, a view
changes) to the metrics.
Never: decides what a cell does; that is the membership layer's and the pull strategy's
job, and both are thin shells around protocol/ (or, for the baselines, a model of
another system).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, Protocol

from protocol.wire import MEMBERSHIP_MESSAGES, Codec, DecodeError, Message
from simulations.model.baselines import CentralOnly, Spegel
from simulations.model.engine import Engine
from simulations.model.flows import Flow, Resource
from simulations.model.metrics import Metrics, Tracked, r
from simulations.model.network import Network
from simulations.model.rng import derive, derive_bytes
from simulations.model.scenario import Fault, Scenario

MEMBERSHIP_TYPES = frozenset(MEMBERSHIP_MESSAGES)


class Puller(Protocol):
    def start(self, cell: int) -> None: ...
    def on_crash(self, cell: int) -> None: ...
    def receive(self, cell: int, sender: str, msg: Any) -> None: ...
    def member_changed(self, observer: int, member: int, state: str) -> None: ...
    def summary(self) -> dict[str, int]: ...


class Members(Protocol):
    """The membership layer: SWIM driving protocol.membership, or a static oracle."""

    def start(self) -> None: ...
    def crash(self, cell: int) -> None: ...
    def restart(self, cell: int) -> None: ...
    def join(self, cell: int) -> None: ...
    def leave(self, cell: int) -> None: ...
    def live_view(self, cell: int) -> frozenset[str]: ...
    def receive(self, cell: int, src: int, msg: Any) -> None: ...
    def heard(self, cell: int, src: int, sender: str) -> None: ...
    def summary(self) -> dict[str, object]: ...


class World:
    """The cluster of one run; `run()` returns the run's report section."""

    def __init__(self, sc: Scenario, strategy: str) -> None:
        self.sc = sc
        self.strategy = strategy
        self.engine = Engine()
        self.net = Network(self.engine, sc.link, self.rng("latency"), self.rng("loss"), sc.quantum)
        self.n_initial = sc.cells.count
        self.n_cells = self.n_initial + sum(f.count for f in sc.faults if f.kind == "join")
        zones = sc.cells.zones
        rate, shared = sc.cells.intake, None
        if rate and sc.cells.intake_shared:
            shared = Resource("cells.intake", rate)
        for i in range(self.n_cells):
            intake = shared or (Resource(f"cell-{i}.intake", rate) if rate else None)
            self.net.add_node(
                f"cell-{i}", i % len(zones), sc.cells.upload, sc.cells.download, intake=intake
            )
        self.central = self.net.add_node(
            "central", -1, sc.central.bandwidth, sc.central.bandwidth, sc.central.latency_s
        )
        self.upstream = self.net.add_node(
            "upstream", -2, sc.upstream.bandwidth, sc.upstream.bandwidth, sc.upstream.latency_s
        )
        # cells that have not joined yet, or have left, are not members
        self.member = [i < self.n_initial for i in range(self.n_cells)]
        for i in range(self.n_initial, self.n_cells):
            self.net.alive[i] = False
        self.names = [f"cell-{i}" for i in range(self.n_cells)]
        self.addrs = [f"n{i}" for i in range(self.n_cells)]
        self.node_of_name = {name: i for i, name in enumerate(self.names)}
        self.node_of_addr = {addr: i for i, addr in enumerate(self.addrs)}
        self.key = derive_bytes(sc.seed, "cluster-key")
        self.codecs: list[Codec | None] = [None] * self.n_cells
        for i in range(self.n_cells):
            self.net.listen(i, self._receiver(i))
        for i in range(self.n_initial):
            self.new_codec(i)
        self._next_joiner = self.n_initial
        self.timeline: list[tuple[float, float, float, float]] = []
        self._live_count = self.n_initial
        self._pulls_scheduled = 0
        self._pulls_lost = 0  # pulls of cells that crashed or left before completing
        self.metrics = Metrics(self.n_cells, sc.image_size)
        self._layers_done: dict[int, int] = {}
        self.members: Members = _make_members(self)
        self.puller: Puller | None = _make_puller(self) if sc.pull else None

    def rng(self, concern: str) -> random.Random:
        return derive(self.sc.seed, f"{self.strategy}/{concern}")

    def zone_name(self, cell: int) -> str:
        return self.sc.cells.zones[self.net.zone[cell]]

    # -- datagrams: every message between cells is sealed and opened by wire.py --------

    def new_codec(self, cell: int) -> None:
        """A (re)started cell's end of the wire; its counter starts from the clock, as
        the daemon's does, so a restarted cell's datagrams are not taken as replays."""
        now = self.engine.now
        self.codecs[cell] = Codec(self.key, self.names[cell], now=now, first_seq=int(now * 1e6))

    def send_msg(self, src: int, dst: int, msg: Message) -> None:
        codec = self.codecs[src]
        if codec is not None and self.net.alive[src]:
            self.net.send(src, dst, codec.seal(msg, self.engine.now))

    def _receiver(self, cell: int) -> Callable[[int, bytes], None]:
        def receive(src: int, data: bytes) -> None:
            codec = self.codecs[cell]
            if codec is None:
                return
            got = codec.open(data, self.engine.now)
            if isinstance(got, DecodeError):
                self.metrics.count_error(got.reason.value)
                return
            msg = got.msg
            if type(msg) in MEMBERSHIP_TYPES:
                self.members.receive(cell, src, msg)
            elif self.puller is not None:
                self.puller.receive(cell, got.sender, msg)
            self.members.heard(cell, src, got.sender)  # as celld.gossip, for every datagram

        return receive

    # -- liveness --------------------------------------------------------------------

    def is_live(self, cell: int) -> bool:
        """Running and a member (not crashed, joined and not left)."""
        return self.net.alive[cell] and self.member[cell]

    def live_cells(self) -> list[int]:
        return [c for c in range(self.n_cells) if self.is_live(c)]

    # -- running ---------------------------------------------------------------------

    def run(self) -> dict[str, object]:
        self.members.start()
        for fault in self.sc.faults:
            self.engine.call_at(fault.at, self._fault, fault)
        if self.sc.pull is not None:
            pull = self.sc.pull
            who = self.n_initial if pull.cells < 0 else pull.cells
            prng = self.rng("pull")
            self._pulls_scheduled = who
            for cell in range(who):
                at = pull.start + (prng.uniform(0.0, pull.spread) if pull.spread > 0 else 0.0)
                self.engine.call_at(at, self._start_pull, cell)
        self._run_until_done()
        return self.report()

    def _run_until_done(self) -> None:
        """Run to the scenario's duration, or stop early once every pull has completed
        and no fault is still to come (a storm's baselines need hours of simulated time;
        the membership scenarios, which pull nothing, always run their full duration)."""
        end = self.sc.duration
        if self.sc.pull is None:
            self.engine.run(end)
            return
        last_fault = max((f.at for f in self.sc.faults), default=0.0)
        next_sample = self.sc.pull.start
        while self.engine.now < end:
            self.engine.run(min(end, self.engine.now + 0.5))
            if self.engine.now >= next_sample:
                self._sample()
                # every 0.5 s at first, then 5% of the elapsed time: a few hundred samples
                # even for a baseline that takes hours
                next_sample += max(0.5, 0.05 * (self.engine.now - self.sc.pull.start))
            pulls_over = self._pulls_scheduled == len(self.metrics.pull_done) + self._pulls_lost
            if pulls_over and self.engine.now >= last_fault:
                self._sample()
                break

    def _sample(self) -> None:
        """One point of the timeline: cells done, peers' upload use, registries' output."""
        net = self.net
        cells = self.n_cells
        up = 0.0
        for c in range(cells):
            for f in net.up[c].flows.values():
                up += f.rate
        capacity = sum(net.up[c].capacity for c in range(cells) if self.is_live(c)) or 1.0
        origin = sum(f.rate for f in net.up[self.upstream].flows.values())
        origin += sum(f.rate for f in net.up[self.central].flows.values() if f.src == self.central)
        done = len(self.metrics.pull_done) / max(1, self._pulls_scheduled)
        self.timeline.append((self.engine.now, done, up / capacity, origin / 1e6))

    def report(self) -> dict[str, object]:
        m = self.metrics
        net = self.net
        cells = range(self.n_cells)
        sent = sum(net.sent[c] for c in cells)
        nbytes = sum(net.bytes_sent[c] for c in cells)
        per_cell_s = max(1, self.n_initial) * max(self.engine.now, 1e-9)
        out: dict[str, object] = {
            "simulated_s": r(self.engine.now),
            "messages": {
                "sent": sent,
                "bytes": nbytes,
                "per_cell_per_s": r(sent / per_cell_s),
                "bytes_per_cell_per_s": r(nbytes / per_cell_s),
                "lost": net.dropped_loss,
                "to_down_cell": net.dropped_down,
                "across_partition": net.dropped_partition,
                "protocol_errors": dict(sorted(m.protocol_errors.items())),
            },
            "membership": {**m.membership_summary(), **self.members.summary()},
            "engine": {"events": self.engine.events_run, "rebalances": net.flows.rebalances},
        }
        if self.sc.pull is not None:
            out["pull"] = m.pull_summary()
            out["bytes"] = m.bytes_summary()
            out["upload"] = m.upload_summary()
            out["timeline"] = {
                "columns": ["t_s", "done_fraction", "peer_upload_use", "origin_MB_per_s"],
                "rows": [[r(x) for x in row] for row in self.timeline],
            }
            if self.puller is not None:
                out["strategy"] = self.puller.summary()
        return out

    def _start_pull(self, cell: int) -> None:
        if not self.is_live(cell) or self.puller is None:
            self._pulls_lost += 1
            return
        self.metrics.pull_started[cell] = self.engine.now
        self._layers_done[cell] = 0
        for layer in range(len(self.sc.layers)):  # a restarted cell streams anew
            self.metrics.first_byte.pop((cell, layer), None)
        self.puller.start(cell)

    # -- what strategies report ------------------------------------------------------

    def layer_complete(self, cell: int, layer: int) -> bool:
        """A cell has a whole, verified layer; True when that completes its image."""
        done = self._layers_done.get(cell, 0) + 1
        self._layers_done[cell] = done
        if done == len(self.sc.layers):
            self.metrics.pull_done[cell] = self.engine.now
            return True
        return False

    def layer_first_byte(self, cell: int, layer: int) -> None:
        """The first piece of a layer is held: its runtime's stream can start."""
        if cell in self.metrics.pull_started:
            self.metrics.first_byte.setdefault((cell, layer), self.engine.now)

    def account(self, flow: Flow, ok: bool) -> None:
        """Count the bytes a flow moved (all of them, or as far as it got)."""
        moved = flow.size if ok else flow.size - flow.remaining
        m = self.metrics
        src = flow.src
        if src == self.upstream:
            m.upstream_sent += moved
            if flow.resources[1] is self.net.down[self.central]:
                m.from_central += moved
            else:
                m.from_upstream += moved
        elif src == self.central:
            m.from_central += moved
        else:
            m.from_peers += moved
            m.uploaded[src] += moved
        if not ok:
            m.downloads_failed += 1

    def view_changed(self, observer: int, member: int, state: str) -> None:
        """An observer's view of `member` became alive / suspect / dead (or left)."""
        m = self.metrics
        actually_up = self.is_live(member) and self.net.group[member] == self.net.group[observer]
        if state == "dead" and actually_up:
            m.false_dead.append((self.engine.now, observer, member))
        elif state == "suspect" and actually_up:
            m.false_suspect += 1
        if self.puller is not None:
            self.puller.member_changed(observer, member, state)
        for t in m.tracked:
            if t.member != member:
                continue
            if t.kind == "dead" and state != "alive" and t.first_suspect is None:
                t.first_suspect = self.engine.now
            knows = state == "alive" if t.kind == "join" else state == "dead"
            if knows and observer not in t.knowers:
                t.knowers.add(observer)
                t.live_knowers += self.is_live(observer)
                self._record(t)
            elif not knows and observer in t.knowers:
                t.knowers.discard(observer)
                t.live_knowers -= self.is_live(observer)
                self._record(t)

    def _record(self, t: Tracked) -> None:
        observers = self._observers(t.member)
        have = t.live_knowers
        t.curve.append((self.engine.now, have / observers if observers else 1.0))

    def _observers(self, member: int) -> int:
        n = self._live_count
        return n - 1 if self.is_live(member) else n

    def _track(self, kind: str, member: int) -> None:
        t = Tracked(kind, member, self.engine.now)
        self.metrics.tracked.append(t)
        t.curve.append((self.engine.now, 0.0))

    # -- faults ----------------------------------------------------------------------

    def _fault(self, fault: Fault) -> None:
        self._apply(fault)
        self._recount()

    def _recount(self) -> None:
        """Liveness changed (a fault): recount the live cells, and the live knowers of
        every followed event (a knower that crashed no longer counts)."""
        self._live_count = sum(1 for c in range(self.n_cells) if self.is_live(c))
        for t in self.metrics.tracked:
            live = sum(1 for c in t.knowers if self.is_live(c))
            if live != t.live_knowers:
                t.live_knowers = live
                self._record(t)

    def left(self, cell: int) -> None:
        """A leaving cell has gossiped its leave: it stops."""
        self.net.crash(cell)
        self.codecs[cell] = None

    def _pull_lost(self, cell: int) -> None:
        m = self.metrics
        if cell in m.pull_started and cell not in m.pull_done:
            self._pulls_lost += 1

    def _apply(self, fault: Fault) -> None:
        kind = fault.kind
        if kind == "partition":
            cut = set(fault.zones)
            zones = self.sc.cells.zones
            groups = [0] * len(self.net.names)
            for c in range(self.n_cells):
                if zones[self.net.zone[c]] in cut:
                    groups[c] = 1
            self.net.partition(groups)
            return
        if kind == "heal":
            self.net.heal()
            return
        if kind == "join":
            for _ in range(fault.count):
                cell = self._next_joiner
                self._next_joiner += 1
                self.net.restart(cell)
                self.member[cell] = True
                self._recount()
                self._track("join", cell)
                self.members.join(cell)
            return
        for cell in fault.cells:
            if kind == "crash" and self.is_live(cell):
                self._track("dead", cell)
                self._pull_lost(cell)
                self.net.crash(cell)
                self._recount()
                self.members.crash(cell)
                if self.puller is not None:
                    self.puller.on_crash(cell)
            elif kind == "leave" and self.is_live(cell):
                self._track("dead", cell)
                self._pull_lost(cell)
                self.member[cell] = False
                self._recount()
                if self.puller is not None:
                    self.puller.on_crash(cell)
                self.members.leave(cell)  # gossips its leave, then calls left()
            elif kind == "restart" and not self.net.alive[cell]:
                self.net.restart(cell)
                self.new_codec(cell)
                self.member[cell] = True
                self._recount()
                self._track("join", cell)
                self.members.restart(cell)


class StaticMembership:
    """Every cell sees exactly the live members at once (an oracle, no traffic): for
    scenarios about pulls, where membership is not what is studied."""

    def __init__(self, world: World) -> None:
        self.w = world
        self._view: frozenset[str] | None = None

    def start(self) -> None:
        pass

    def _announce(self, member: int, state: str) -> None:
        self._view = None
        for c in self.w.live_cells():
            if c != member:
                self.w.view_changed(c, member, state)

    def crash(self, cell: int) -> None:
        self._announce(cell, "dead")

    def leave(self, cell: int) -> None:
        self._announce(cell, "dead")
        self.w.left(cell)

    def receive(self, cell: int, src: int, msg: Any) -> None:
        pass

    def heard(self, cell: int, src: int, sender: str) -> None:
        pass

    def restart(self, cell: int) -> None:
        self._announce(cell, "alive")

    join = restart

    def live_view(self, cell: int) -> frozenset[str]:
        if self._view is None:
            self._view = frozenset(self.w.names[c] for c in self.w.live_cells())
        return self._view

    def summary(self) -> dict[str, object]:
        return {"mode": "static"}


def _make_members(world: World) -> Members:
    # The baselines model other systems, whose membership is not what is compared.
    if world.sc.membership_mode == "static" or world.strategy != "celld":
        return StaticMembership(world)
    from simulations.model.swim import SwimMembership

    return SwimMembership(world)


def _make_puller(world: World) -> Puller:
    if world.strategy == "central-only":
        return CentralOnly(world)
    if world.strategy == "spegel":
        return Spegel(world)
    from simulations.model.celld import CelldPuller

    return CelldPuller(world)
