"""The simulated network: datagrams with latency and loss, bulk flows, crashes, partitions.

Owns: which node can reach which, when a datagram arrives (or that it is lost), and the
links' bandwidth (through `FlowNet`). Nodes are small integers: cells are 0..n-1, then
the central registry and the upstream (Hub) have their own ids.
Never: looks inside a datagram (protocol bytes are opaque here), or decides anything a
cell's protocol should decide.

Latency of one datagram = the base latency of the zone pair (same zone lower) plus a
lognormal jitter drawn per datagram (plus a fixed extra for a far registry). A bulk
transfer runs as a flow; the caller delays its start by the latency of its request. Loss drops each datagram independently with the
scenario's probability; flows are TCP and are not lost, only slowed by sharing.
A node may have an intake too (its CPU: see scenario.Cells), one more resource that
every flow into it crosses; nodes may share one (cells on one machine).
A crashed node neither sends nor receives, and every flow it takes part in fails. A
partition splits nodes into groups: datagrams across groups are dropped and flows
across groups fail when it starts.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

from simulations.model.engine import Engine
from simulations.model.flows import Flow, FlowNet, Resource

Receiver = Callable[[int, bytes], None]
JITTER_BITS = 16


@dataclass(frozen=True)
class LinkModel:
    """Latency and loss of the cells' network, in seconds and probability."""

    same_zone_s: float = 0.0005
    cross_zone_s: float = 0.002
    jitter_median_s: float = 0.0002
    jitter_sigma: float = 0.5
    loss: float = 0.0


class Network:
    """Delivers datagrams between nodes and runs their bulk transfers."""

    __slots__ = (
        "_draw",
        "_jitter",
        "_latency_rng",
        "_loss_rng",
        "alive",
        "bytes_sent",
        "down",
        "dropped_down",
        "dropped_loss",
        "dropped_partition",
        "engine",
        "extra",
        "flows",
        "group",
        "intake",
        "link",
        "names",
        "receivers",
        "sent",
        "up",
        "zone",
    )

    def __init__(
        self,
        engine: Engine,
        link: LinkModel,
        latency_rng: random.Random,
        loss_rng: random.Random,
        quantum: float,
    ) -> None:
        self.engine = engine
        self.link = link
        self._latency_rng = latency_rng
        self._draw = latency_rng.getrandbits  # bound once: latency() runs once a message
        self._loss_rng = loss_rng
        self._jitter: list[float] | None = None
        if link.jitter_median_s > 0:
            # 65,536 lognormal draws made once, then picked uniformly per datagram:
            # the same distribution for a fraction of the cost of a draw each
            mu = math.log(link.jitter_median_s)
            self._jitter = [
                math.exp(latency_rng.gauss(mu, link.jitter_sigma)) for _ in range(1 << JITTER_BITS)
            ]
        self.flows = FlowNet(engine, quantum)
        self.names: list[str] = []
        self.zone: list[int] = []
        self.extra: list[float] = []
        self.up: list[Resource] = []
        self.down: list[Resource] = []
        self.intake: list[Resource | None] = []
        self.alive: list[bool] = []
        self.group: list[int] = []
        self.receivers: list[Receiver | None] = []
        self.sent: list[int] = []
        self.bytes_sent: list[int] = []
        self.dropped_loss = 0
        self.dropped_down = 0
        self.dropped_partition = 0

    def add_node(
        self,
        name: str,
        zone: int,
        upload: float,
        download: float,
        extra_latency: float = 0.0,
        intake: Resource | None = None,
    ) -> int:
        """A node with its link capacities; `extra_latency` is added to each of its hops
        (a registry far away); `intake` bounds what flows into it together (its CPU)."""
        node = len(self.names)
        self.names.append(name)
        self.zone.append(zone)
        self.extra.append(extra_latency)
        self.up.append(Resource(f"{name}.up", upload))
        self.down.append(Resource(f"{name}.down", download))
        self.intake.append(intake)
        self.alive.append(True)
        self.group.append(0)
        self.receivers.append(None)
        self.sent.append(0)
        self.bytes_sent.append(0)
        return node

    def listen(self, node: int, receiver: Receiver) -> None:
        self.receivers[node] = receiver

    # -- datagrams -------------------------------------------------------------------

    def latency(self, src: int, dst: int) -> float:
        link = self.link
        zone = self.zone
        extra = self.extra
        base = link.same_zone_s if zone[src] == zone[dst] else link.cross_zone_s
        base += extra[src] + extra[dst]
        jitter = self._jitter
        if jitter is None:
            return base
        return base + jitter[self._draw(JITTER_BITS)]

    def reachable(self, src: int, dst: int) -> bool:
        return self.alive[src] and self.alive[dst] and self.group[src] == self.group[dst]

    def send(self, src: int, dst: int, data: bytes) -> None:
        """Send one datagram; it arrives after a latency, or is lost, or finds no one."""
        if not self.alive[src]:
            return
        self.sent[src] += 1
        self.bytes_sent[src] += len(data)
        if self.group[src] != self.group[dst]:
            self.dropped_partition += 1
            return
        loss = self.link.loss
        if loss > 0.0 and self._loss_rng.random() < loss:
            self.dropped_loss += 1
            return
        self.engine.call_at(
            self.engine.now + self.latency(src, dst), self._deliver, (src, dst, data)
        )

    def _deliver(self, arg: tuple[int, int, bytes]) -> None:
        src, dst, data = arg
        receiver = self.receivers[dst]
        if not self.alive[dst] or receiver is None:
            self.dropped_down += 1
            return
        if self.group[src] != self.group[dst]:
            self.dropped_partition += 1
            return
        receiver(src, data)

    # -- bulk transfers --------------------------------------------------------------

    def transfer(
        self,
        src: int,
        dst: int,
        size: float,
        on_end: Callable[[Flow, bool], None],
        tag: object = None,
        via: int | None = None,
    ) -> Flow:
        """Move `size` bytes from src to dst (through `via`'s links if given) as one flow."""
        if via is None:
            resources: tuple[Resource, ...] = (self.up[src], self.down[dst])
        else:
            resources = (self.up[src], self.down[via], self.up[via], self.down[dst])
        intake = self.intake[dst]
        if intake is not None:
            resources = (*resources, intake)
        flow = self.flows.start(resources, size, on_end, src=src, dst=dst, tag=tag)
        if not (self.reachable(src, dst) and (via is None or self.reachable(src, via))):
            self.flows.abort(flow)
            self.engine.call_at(self.engine.now, _fail, flow)
        return flow

    # -- faults ----------------------------------------------------------------------

    def crash(self, node: int) -> None:
        """The node stops: no datagrams in or out, its flows fail."""
        self.alive[node] = False
        self.flows.fail_resource(self.up[node])
        self.flows.fail_resource(self.down[node])

    def restart(self, node: int) -> None:
        self.alive[node] = True

    def partition(self, groups: list[int]) -> None:
        """Assign each node a group; flows across groups fail now."""
        self.group = list(groups)
        for r in self.up:
            for flow in list(r.flows.values()):
                if self.group[flow.src] != self.group[flow.dst]:
                    self.flows.abort(flow)
                    flow.on_end(flow, False)

    def heal(self) -> None:
        self.group = [0] * len(self.names)


def _fail(flow: Flow) -> None:
    flow.on_end(flow, False)
