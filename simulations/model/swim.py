"""The membership layer of a simulation: one real `protocol.membership.Membership` a cell.

Owns: starting each cell's membership (from a converged table, or joining through
seeds), its timer, turning its `Outgoing` messages into sealed datagrams and datagrams
back into `receive` calls, and reporting view changes to the world.
Never: decides anything about membership itself; every probe, suspicion and gossip
decision is the protocol's. The only shortcut is the start: the initial cells begin
with each other's rows preloaded (`Membership.preload`), as if they had converged long
before the scenario begins.
"""

from __future__ import annotations

import math
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from protocol import membership as mp
from protocol.wire import MemberState, Status
from simulations.model.scenario import ScenarioError

if TYPE_CHECKING:
    from simulations.model.world import World

_EVENT_STATE = {
    mp.MemberJoined: "alive",
    mp.MemberAlive: "alive",
    mp.MemberSuspected: "suspect",
    mp.MemberDead: "dead",
    mp.MemberLeft: "dead",
}


def membership_config(params: tuple[tuple[str, Any], ...]) -> mp.Config:
    """The protocol's Config from a scenario's [membership] table (keys by field name)."""
    known = {f.name for f in fields(mp.Config)}
    unknown = sorted(k for k, _ in params if k not in known)
    if unknown:
        raise ScenarioError(
            f"[membership]: unknown key(s) {', '.join(unknown)}; "
            f"known: mode, seeds, {', '.join(sorted(known))}"
        )
    return mp.Config(**dict(params))


class SwimMembership:
    """SWIM for every cell of a world."""

    def __init__(self, world: World) -> None:
        self.w = world
        self.config = membership_config(world.sc.membership)
        n = world.n_cells
        self.m: list[mp.Membership | None] = [None] * n
        self.due = [math.inf] * n  # time of the earliest timer event queued per cell
        self._seed_rng = world.rng("swim/seeds")
        self.left_done = 0

    # -- life of a cell ----------------------------------------------------------------

    def _new(self, cell: int) -> mp.Membership:
        w = self.w
        m = mp.Membership(
            w.names[cell], w.addrs[cell], w.zone_name(cell), self.config, w.rng(f"swim/{cell}")
        )
        self.m[cell] = m
        return m

    def start(self) -> None:
        w = self.w
        now = w.engine.now
        # one table shared read-only by every cell (each copies a row when it changes)
        snapshot = mp.Snapshot(
            MemberState(w.names[c], 0, w.addrs[c], w.zone_name(c), Status.ALIVE)
            for c in range(w.n_initial)
        )
        for cell in range(w.n_initial):
            self._new(cell).preload(snapshot, now)
            self._arm(cell)

    def _seeds(self, cell: int) -> list[str]:
        w = self.w
        live = [c for c in range(w.n_initial) if c != cell and w.is_live(c)]
        k = min(w.sc.seeds, len(live))
        return [w.addrs[c] for c in self._seed_rng.sample(live, k)]

    def join(self, cell: int) -> None:
        w = self.w
        w.new_codec(cell)
        m = self._new(cell)
        self._send(cell, m.join(self._seeds(cell), w.engine.now))
        self._after(cell, m)

    restart = join

    def crash(self, cell: int) -> None:
        self.m[cell] = None

    def leave(self, cell: int) -> None:
        m = self.m[cell]
        if m is None:
            return
        self._send(cell, m.leave(self.w.engine.now))
        self._after(cell, m)

    # -- views -------------------------------------------------------------------------

    def live_view(self, cell: int) -> frozenset[str]:
        """The names this cell believes alive (itself included). Cells whose view still
        equals the preloaded snapshot share one object, so placement's caches hit."""
        m = self.m[cell]
        return m.live_ids() if m is not None else frozenset()

    def summary(self) -> dict[str, object]:
        stats: dict[str, int] = {}
        for m in self.m:
            if m is not None:
                for k, v in m.stats.items():
                    stats[k] = stats.get(k, 0) + v
        return {"mode": "swim", "stats": dict(sorted(stats.items()))}

    # -- driving -----------------------------------------------------------------------

    def receive(self, cell: int, src: int, msg: Any) -> None:
        m = self.m[cell]
        if m is None:
            return
        self._send(cell, m.receive(msg, self.w.addrs[src], self.w.engine.now))
        self._after(cell, m)

    def heard(self, cell: int, src: int, sender: str) -> None:
        m = self.m[cell]
        if m is None:
            return
        out = m.heard(sender, self.w.addrs[src], self.w.engine.now)
        if out:
            self._send(cell, out)
            self._after(cell, m)

    def _tick(self, arg: tuple[int, float]) -> None:
        cell, due = arg
        if self.due[cell] != due:
            return
        self.due[cell] = math.inf
        m = self.m[cell]
        if m is None:
            return
        self._send(cell, m.tick(self.w.engine.now))
        self._after(cell, m)

    def _send(self, cell: int, out: list[mp.Outgoing]) -> None:
        w = self.w
        for o in out:
            w.send_msg(cell, w.node_of_addr[o.addr], o.msg)

    def _after(self, cell: int, m: mp.Membership) -> None:
        """Report the events of the last call, then re-arm the cell's timer."""
        w = self.w
        ev = m.next_event()
        while ev is not None:
            member = w.node_of_name.get(ev.node)
            if member is not None:
                w.view_changed(cell, member, _EVENT_STATE[type(ev)])
            ev = m.next_event()
        if m.done_leaving:
            self.m[cell] = None
            self.left_done += 1
            w.left(cell)
            return
        self._arm(cell)

    def _arm(self, cell: int) -> None:
        m = self.m[cell]
        if m is None:
            return
        when = m.next_deadline()
        if when < self.due[cell]:
            self.due[cell] = when
            self.w.engine.call_at(when, self._tick, (cell, when))
