"""Bulk transfers as flows that share bandwidth, with one event per flow completion.

Owns: the rate of every running transfer and when it completes.
Never: models individual packets or chunks (a piece of 16 MiB is one flow with one
completion event), and never lets a resource carry more than its capacity.

Theory of operation. A *resource* is one direction of one node's link (a cell's upload,
a cell's download, the upstream's upload) with a capacity in bytes/s. A *flow* crosses
a few resources (usually the sender's upload and the receiver's download; a pull-through
from upstream via the central registry crosses four) and runs at

    rate = min over its resources r of  r.capacity / len(r.flows)

that is, each resource splits its capacity equally among the flows crossing it, and a
flow takes the smallest of its equal shares. This is cheaper than exact max-min
fairness (progressive filling over the whole flow graph, which changes every flow's
rate whenever any flow starts or ends) because a change at resource r only changes the
rates of the flows crossing r: a rebalance touches the flows of the resources whose
flow set changed, nothing else. The allocation is always feasible (the shares at a
resource sum to at most its capacity) and never faster than max-min fairness, so the
completion times it gives are upper bounds, a little pessimistic when a flow is limited
at one end and leaves unused share at the other. Two flows out of one sender with
ample download each get half of the sender's upload, exactly.

Rebalances are batched: starts and ends mark their resources dirty, and one rebalance
runs at the next multiple of `quantum` seconds (0 means at the same instant, after the
events already due). A flow's completion is exact for the rates it was given; the
bandwidth it frees is handed to the others at the next rebalance, at most `quantum`
later. A few thousand flows ending within a few milliseconds on one registry then cost
a few rebalances instead of one each.

Completion events are invalidated, not removed. A flow remembers the time of the
earliest completion event it has queued (`due`). A rate change that brings the finish
earlier queues a new event; one that pushes it later queues nothing: the queued event
fires early, sees bytes left, and re-queues itself at the new time. An event whose time
is no longer the flow's `due` does nothing. Rates fall far more often than they rise
(every new flow lowers its neighbours' shares), so this keeps the heap small.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from simulations.model.engine import Engine


class Resource:
    """One direction of one node's link: a capacity shared equally by its flows."""

    __slots__ = ("capacity", "dirty", "flows", "name", "share")

    def __init__(self, name: str, capacity: float) -> None:
        self.name = name
        self.capacity = float(capacity)
        self.flows: dict[int, Flow] = {}
        self.dirty = False
        # capacity / len(flows) as of the last rebalance that found it dirty: every change
        # of `flows` marks it dirty, so it is current whenever a rebalance reads it
        self.share = math.inf


class Flow:
    """A transfer of `size` bytes across `resources`; `on_end(flow, completed)` when over."""

    __slots__ = (
        "dst",
        "due",
        "ended",
        "fid",
        "mark",
        "on_end",
        "rate",
        "remaining",
        "resources",
        "size",
        "src",
        "started",
        "tag",
        "updated",
    )

    def __init__(
        self,
        fid: int,
        resources: tuple[Resource, ...],
        size: float,
        on_end: Callable[[Flow, bool], None],
        src: int,
        dst: int,
        tag: Any,
        now: float,
    ) -> None:
        self.fid = fid
        self.resources = resources
        self.size = float(size)
        self.remaining = float(size)
        self.rate = 0.0
        self.updated = now
        self.started = now
        self.due = math.inf  # time of the earliest completion event queued
        self.mark = 0
        self.on_end = on_end
        self.src = src
        self.dst = dst
        self.tag = tag
        self.ended = False

    def transferred(self, now: float) -> float:
        """Bytes moved so far (the whole size once completed)."""
        done = self.size - self.remaining + self.rate * (now - self.updated)
        return min(self.size, max(0.0, done))


class FlowNet:
    """Starts, ends and re-rates flows on an `Engine`."""

    __slots__ = ("_dirty", "_epoch", "_next_fid", "_pending", "engine", "quantum", "rebalances")

    def __init__(self, engine: Engine, quantum: float = 0.0) -> None:
        self.engine = engine
        self.quantum = quantum
        self._dirty: list[Resource] = []
        self._pending = False
        self._next_fid = 0
        self._epoch = 0
        self.rebalances = 0

    def start(
        self,
        resources: tuple[Resource, ...],
        size: float,
        on_end: Callable[[Flow, bool], None],
        src: int = -1,
        dst: int = -1,
        tag: Any = None,
    ) -> Flow:
        """Begin moving `size` bytes; the rate is set at the next rebalance."""
        self._next_fid += 1
        flow = Flow(self._next_fid, resources, size, on_end, src, dst, tag, self.engine.now)
        if size <= 0:
            flow.remaining = 0.0
            flow.ended = True
            self.engine.call_at(self.engine.now, self._finish_empty, flow)
            return flow
        for r in resources:
            r.flows[flow.fid] = flow
            self._touch(r)
        return flow

    def abort(self, flow: Flow) -> float:
        """Stop `flow` now without calling its `on_end`; returns the bytes it had moved."""
        if flow.ended:
            return flow.size - flow.remaining
        self._settle(flow)
        flow.ended = True
        for r in flow.resources:
            del r.flows[flow.fid]
            self._touch(r)
        return flow.size - flow.remaining

    def fail_resource(self, resource: Resource) -> None:
        """End every flow crossing `resource` as failed (a crash or a reset link)."""
        for flow in list(resource.flows.values()):
            self.abort(flow)
            flow.on_end(flow, False)

    # -- internals ---------------------------------------------------------------------

    def _finish_empty(self, flow: Flow) -> None:
        flow.on_end(flow, True)

    def _settle(self, flow: Flow) -> None:
        now = self.engine.now
        if flow.rate > 0.0:
            flow.remaining = max(0.0, flow.remaining - flow.rate * (now - flow.updated))
        flow.updated = now

    def _touch(self, r: Resource) -> None:
        if not r.dirty:
            r.dirty = True
            self._dirty.append(r)
        if not self._pending:
            self._pending = True
            now = self.engine.now
            q = self.quantum
            when = math.ceil(now / q) * q if q > 0.0 else now
            self.engine.call_at(when, self._rebalance)

    def _rebalance(self, _: object = None) -> None:
        self._pending = False
        self.rebalances += 1
        self._epoch += 1
        epoch = self._epoch
        dirty = self._dirty
        self._dirty = []
        now = self.engine.now
        call_at = self.engine.call_at
        complete = self._complete
        for r in dirty:
            r.dirty = False
            n = len(r.flows)
            r.share = r.capacity / n if n else math.inf
        for r in dirty:
            for flow in r.flows.values():
                if flow.mark == epoch:
                    continue
                flow.mark = epoch
                rate = math.inf
                for res in flow.resources:
                    share = res.share
                    if share < rate:
                        rate = share
                old = flow.rate
                if rate == old:
                    continue
                if old > 0.0:
                    left = flow.remaining - old * (now - flow.updated)
                    flow.remaining = left if left > 0.0 else 0.0
                flow.updated = now
                flow.rate = rate
                if rate > 0.0:
                    due = now + flow.remaining / rate
                    # An earlier finish needs a new event; a later one is found by the
                    # event already queued, which re-queues itself (fewer heap entries).
                    if due < flow.due:
                        flow.due = due
                        call_at(due, complete, (flow, due))

    def _complete(self, arg: tuple[Flow, float]) -> None:
        flow, due = arg
        if flow.ended or due != flow.due:
            return
        now = self.engine.now
        left = flow.remaining - flow.rate * (now - flow.updated)
        if left > flow.size * 1e-9 + 1e-6:
            # the rate dropped after this event was queued: finish later
            flow.remaining = left
            flow.updated = now
            flow.due = now + left / flow.rate
            self.engine.call_at(flow.due, self._complete, (flow, flow.due))
            return
        flow.ended = True
        flow.remaining = 0.0
        flow.updated = now
        for r in flow.resources:
            del r.flows[flow.fid]
            self._touch(r)
        flow.on_end(flow, True)
