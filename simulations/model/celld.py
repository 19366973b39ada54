"""celld's strategy in the simulator: each cell runs the real placement and swarm objects.

Owns: what the daemon's sources.py, gossip.py and peer.py do around the protocol, as
the simulator models it: datagrams for placement (lookups, announcements,
lease grants) through `World.send_msg`; a piece request as one latency to the peer; an
accepted piece as one flow from the peer (its reply, carrying the peer's bitmap, comes
with the piece); the lease holder's read from a registry as back-to-back piece flows on
one stream; the timers of every protocol object of a cell folded into one event.
Never: chooses a piece, a peer, a home or a lease holder itself. Those are
`protocol.swarm.Download`, `protocol.swarm.Uploader`, `protocol.placement.*`.

Modelling choices, each a simplification to know about:
- A peer's piece request and the busy/missing replies are HTTP in the daemon, modelled
  as one network latency each way (no bytes on the wire model, no loss: TCP).
- Pieces are not corrupted and no bytes are hashed: `ok=True` for every piece that
  arrives whole; a flow cut by a crash or a partition is a connection error.
- A request to a crashed or unreachable cell fails after `connect_timeout` seconds.
- Placement datagrams (lookups, replies, announcements) are sealed and opened by
  wire.py like the membership ones: real bytes, real MAC, real size.
"""

from __future__ import annotations

import hashlib
from collections import deque
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from protocol import placement as pl
from protocol import swarm as sw
from protocol.pieces import DEFAULT_POLICY, PiecePolicy, piece_count, piece_size_for
from simulations.model.flows import Flow
from simulations.model.scenario import ScenarioError, parse_size

if TYPE_CHECKING:
    from simulations.model.world import World

Key = tuple[int, int, str, int]  # (uploader node, downloader node, digest, piece index)


def swarm_settings(
    params: tuple[tuple[str, Any], ...],
) -> tuple[pl.PlacementConfig, sw.SwarmConfig, dict[str, Any]]:
    """Split a scenario's [swarm] table among PlacementConfig, SwarmConfig and the
    simulator's own knobs: upload_slots and upload_queue (the Uploader's), the
    connect_timeout of a request to a dead cell, and piece_size (the smallest piece of
    the PiecePolicy; unset means pieces.py's default policy)."""
    own: dict[str, Any] = {
        "upload_slots": 4,
        "upload_queue": 0,
        "connect_timeout": 1.0,
        "piece_size": None,
    }
    p_names = {f.name for f in fields(pl.PlacementConfig)}
    s_names = {f.name for f in fields(sw.SwarmConfig)}
    p_args: dict[str, Any] = {}
    s_args: dict[str, Any] = {}
    for key, value in params:
        if key in own:
            own[key] = value
        elif key in p_names:
            p_args[key] = value
        elif key in s_names:
            s_args[key] = value
        else:
            raise ScenarioError(
                f"[swarm]: unknown key {key}; known: {', '.join(sorted(own))}, "
                f"{', '.join(sorted(p_names | s_names))}"
            )
    return pl.PlacementConfig(**p_args), sw.SwarmConfig(**s_args), own


class _Cell:
    """The protocol objects of one running cell."""

    __slots__ = (
        "announcer",
        "directory",
        "downloads",
        "lookups",
        "name",
        "next_request",
        "node",
        "rng",
        "uploader",
        "view",
        "zone",
    )

    def __init__(self, puller: CelldPuller, node: int) -> None:
        w = puller.w
        self.node = node
        self.name = w.names[node]
        self.zone = w.zone_name(node)
        self.rng = w.rng(f"celld/cell/{node}")
        cfg = puller.placement
        self.announcer = pl.ProviderAnnouncer(self.name, self.zone, config=cfg)
        self.directory = pl.ProviderDirectory(self.name, rng=self.rng, config=cfg)
        self.uploader = sw.Uploader(
            self.name,
            slots=puller.upload_slots,
            queue=puller.upload_queue,
            have_wait=puller.swarm.have_wait,
        )
        self.downloads: dict[str, sw.Download] = {}
        self.lookups: dict[int, pl.ProviderLookup] = {}
        self.next_request = 0
        self.view: frozenset[str] | None = None


class CelldPuller:
    """Pulls an image the way celld does, for every cell of a world."""

    def __init__(self, world: World) -> None:
        self.w = world
        sc = world.sc
        self.placement, self.swarm, own = swarm_settings(sc.swarm)
        self.upload_slots = int(own["upload_slots"])
        self.upload_queue = int(own["upload_queue"])
        self.connect_timeout = float(own["connect_timeout"])
        policy = DEFAULT_POLICY
        if own["piece_size"] is not None:
            smallest = int(parse_size(own["piece_size"], "swarm.piece_size"))
            policy = PiecePolicy(min_size=smallest, max_size=max(smallest, DEFAULT_POLICY.max_size))
        self.digests = [
            "sha256:" + hashlib.sha256(f"{sc.name}/layer/{i}".encode()).hexdigest()
            for i in range(len(sc.layers))
        ]
        self.layer_of = {d: i for i, d in enumerate(self.digests)}
        self.size = {d: sc.layers[i] for i, d in enumerate(self.digests)}
        self.psize = {d: piece_size_for(self.size[d], policy) for d in self.digests}
        self.pcount = {d: piece_count(self.size[d], self.psize[d]) for d in self.digests}
        self.cells: list[_Cell | None] = [None] * world.n_cells
        self.due = [float("inf")] * world.n_cells
        self.requests: dict[Key, Any] = {}  # "sent" | "queued" | Flow
        self.registry_queue: dict[tuple[int, str], deque[int]] = {}
        self.registry_busy: set[tuple[int, str]] = set()
        self.stats = {
            "pieces_from_peers": 0,
            "pieces_from_registry": 0,
            "busy_replies": 0,
            "missing_replies": 0,
            "cancelled": 0,
            "connect_errors": 0,
            "leases": 0,
            "lookups": 0,
        }

    # -- helpers -----------------------------------------------------------------------

    def _cell(self, node: int) -> _Cell | None:
        c = self.cells[node]
        if c is None and self.w.is_live(node):
            c = self.cells[node] = _Cell(self, node)
        return c

    def _sync_view(self, c: _Cell) -> None:
        """Give the cell's placement objects its current view of the live members."""
        view = self.w.members.live_view(c.node)
        if view is c.view:
            return
        c.view = view
        now = self.w.engine.now
        c.directory.set_members(view, now)
        self._send(c, c.announcer.set_members(view, now))

    def _send(self, c: _Cell, sends: list[pl.Send]) -> None:
        w = self.w
        node_of = w.node_of_name
        for s in sends:
            dst = node_of.get(s.to)
            if dst is not None:
                w.send_msg(c.node, dst, s.message)

    def _arm(self, c: _Cell) -> None:
        """Queue one event at the earliest deadline of the cell's protocol objects."""
        when = float("inf")
        for dl in c.downloads.values():
            t = dl.next_deadline()
            if t is not None and t < when:
                when = t
        for look in c.lookups.values():
            t = look.next_deadline()
            if t is not None and t < when:
                when = t
        for t in (
            c.uploader.next_deadline(),
            c.announcer.next_deadline(),
            c.directory.next_deadline(),
        ):
            if t is not None and t < when:
                when = t
        if when < self.due[c.node]:
            self.due[c.node] = when
            self.w.engine.call_at(when, self._timer, (c.node, when))

    def _arm_at(self, c: _Cell, when: float | None) -> None:
        """Queue the cell's event earlier if one object it just touched is due sooner.
        Enough after a call into one object: the others' deadlines did not move, and a
        deadline that moved later only makes the queued event fire early, harmlessly."""
        if when is not None and when < self.due[c.node]:
            self.due[c.node] = when
            self.w.engine.call_at(when, self._timer, (c.node, when))

    def _timer(self, arg: tuple[int, float]) -> None:
        node, due = arg
        if self.due[node] != due:
            return
        self.due[node] = float("inf")
        c = self.cells[node]
        if c is None or not self.w.is_live(node):
            return
        now = self.w.engine.now
        self._sync_view(c)
        t = c.directory.next_deadline()
        if t is not None and t <= now:
            c.directory.expire(now)
        t = c.announcer.next_deadline()
        if t is not None and t <= now:
            self._send(c, c.announcer.tick(now, load=c.uploader.load))
        t = c.uploader.next_deadline()
        if t is not None and t <= now:
            for to, reply in c.uploader.poll(now):
                self._have_reply(c, to, reply)
        if c.lookups:
            for rid in list(c.lookups):
                look = c.lookups[rid]
                t = look.next_deadline()
                if t is not None and t <= now:
                    self._send(c, look.poll(now))
                    if look.done:
                        del c.lookups[rid]
                        self._lookup_result(c, look.result)
        for dl in c.downloads.values():
            t = dl.next_deadline()
            if t is not None and t <= now:
                self._events(c, dl, dl.poll(now))
        # a deadline that stayed due would spin: re-arm strictly later
        self._arm_after(c, now)

    def _arm_after(self, c: _Cell, now: float) -> None:
        self._arm(c)
        if self.due[c.node] <= now:
            self.due[c.node] = now + 1e-3
            self.w.engine.call_at(now + 1e-3, self._timer, (c.node, now + 1e-3))

    # -- the world's calls -------------------------------------------------------------

    def start(self, node: int) -> None:
        c = self._cell(node)
        if c is None:
            return
        now = self.w.engine.now
        self._sync_view(c)
        for digest in self.digests:
            n = self.pcount[digest]
            dl = sw.Download(digest, n, self_id=c.name, zone=c.zone, rng=c.rng, config=self.swarm)
            c.downloads[digest] = dl
            c.uploader.add_seed(digest, n, 0)
            self._send(
                c, c.announcer.update(digest, complete=False, pieces=0, piece_count=n, now=now)
            )
            self._events(c, dl, dl.start(now))
        self._arm(c)

    def on_crash(self, node: int) -> None:
        """The cell stops: its state is gone (a restart begins with an empty store)."""
        self.cells[node] = None
        self.due[node] = float("inf")
        for key in [k for k in self.registry_queue if k[0] == node]:
            del self.registry_queue[key]
            self.registry_busy.discard(key)

    def member_changed(self, observer: int, member: int, state: str) -> None:
        """Membership told `observer` that `member` is dead: stop asking it for pieces."""
        if state != "dead":
            return
        c = self.cells[observer]
        if c is None:
            return
        now = self.w.engine.now
        name = self.w.names[member]
        for dl in list(c.downloads.values()):
            if not dl.complete:
                self._events(c, dl, dl.remove_provider(name, now))
        self._arm(c)

    def receive(self, node: int, sender: str, msg: Any) -> None:
        """A placement datagram from `sender` (its authenticated name) arrived at `node`."""
        c = self._cell(node)
        if c is None:
            return
        now = self.w.engine.now
        self._sync_view(c)
        kind = type(msg)
        if kind is pl.Lookup:
            reply = c.directory.receive_lookup(sender, msg, now)
            if reply.lease == pl.LeaseStatus.GRANTED and reply.lease_holder == sender:
                self.stats["leases"] += 1
            src = self.w.node_of_name.get(sender)
            if src is not None:
                self.w.send_msg(node, src, reply)
        elif kind is pl.LookupReply:
            look = c.lookups.get(msg.request_id)
            if look is not None:
                result = look.receive(sender, msg, now)
                if result is not None:
                    del c.lookups[msg.request_id]
                    self._lookup_result(c, result)
        elif kind is pl.Announce:
            c.directory.receive_announce(sender, msg, now)
        elif kind is pl.Withdraw:
            c.directory.receive_withdraw(sender, msg, now)
        self._arm(c)

    def summary(self) -> dict[str, int]:
        return dict(sorted(self.stats.items()))

    # -- download events ---------------------------------------------------------------

    def _events(self, c: _Cell, dl: sw.Download, events: list[sw.Event]) -> None:
        for ev in events:
            kind = type(ev)
            if kind is sw.RequestPiece:
                self._request_piece(c, ev.peer, ev.digest, ev.index)
            elif kind is sw.CancelPiece:
                self._cancel_piece(c, ev.peer, ev.digest, ev.index)
            elif kind is sw.QueryHave:
                self._query_have(c, ev.peer, ev.digest, ev.want)
            elif kind is sw.NeedProviders:
                self._lookup(c, ev.digest)
            elif kind is sw.FetchUpstream:
                self._fetch_registry(c, ev.digest, ev.ranges)
            elif kind is sw.DownloadComplete:
                self._complete(c, dl)

    def _lookup(self, c: _Cell, digest: str) -> None:
        now = self.w.engine.now
        self._sync_view(c)
        c.next_request = (c.next_request + 1) & 0xFFFFFFFF
        look = pl.ProviderLookup(
            digest,
            c.zone,
            c.announcer.homes(digest),
            request_id=c.next_request,
            config=self.placement,
        )
        self.stats["lookups"] += 1
        c.lookups[c.next_request] = look
        self._send(c, look.start(now))
        if look.done:
            del c.lookups[c.next_request]
            self._lookup_result(c, look.result)
        else:
            self._arm_at(c, look.next_deadline())

    def _lookup_result(self, c: _Cell, result: pl.LookupResult | None) -> None:
        if result is None:
            return
        dl = c.downloads.get(result.digest)
        if dl is None or dl.complete:
            return
        now = self.w.engine.now
        events = dl.add_providers(result.providers, now, lease_holder=result.lease_holder)
        granted = result.lease == pl.LeaseStatus.GRANTED and not dl.lease
        if granted:
            events += dl.grant_lease(now)
            self._send(c, self._announce(c, dl, now))
        self._events(c, dl, events)
        if granted:
            self._registry_first(c)

    def _registry_first(self, c: _Cell) -> None:
        """The cell's policy across its downloads (swarm.registry_first): while one reads
        from a registry, the others wait, so the read has the cell's link to itself."""
        for dl, ev in sw.registry_first(c.downloads.values(), self.w.engine.now):
            self._events(c, dl, [ev])
            self._arm_at(c, dl.next_deadline())

    def _announce(self, c: _Cell, dl: sw.Download, now: float) -> list[pl.Send]:
        return c.announcer.update(
            dl.digest,
            complete=dl.complete,
            pieces=dl.held,
            piece_count=dl.piece_count,
            now=now,
            lease=dl.lease and not dl.complete,
        )

    def _complete(self, c: _Cell, dl: sw.Download) -> None:
        now = self.w.engine.now
        self._send(c, self._announce(c, dl, now))
        self.w.layer_complete(c.node, self.layer_of[dl.digest])
        self._registry_first(c)

    def _stored(self, c: _Cell, dl: sw.Download, index: int) -> None:
        """A piece is now held: serve it, wake parked queries, announce progress."""
        for to, reply in c.uploader.piece_added(dl.digest, index):
            self._have_reply(c, to, reply)
        if not dl.complete:
            self._send(c, self._announce(c, dl, self.w.engine.now))

    # -- pieces between cells ----------------------------------------------------------

    def _piece_bytes(self, digest: str, index: int) -> int:
        ps = self.psize[digest]
        return min(ps, self.size[digest] - index * ps)

    def _request_piece(self, c: _Cell, peer: str, digest: str, index: int) -> None:
        w = self.w
        p = w.node_of_name[peer]
        key = (p, c.node, digest, index)
        self.requests[key] = "sent"
        if w.net.reachable(c.node, p):
            w.engine.call_at(w.engine.now + w.net.latency(c.node, p), self._request_arrives, key)
        else:
            w.engine.call_at(w.engine.now + self.connect_timeout, self._connect_failed, key)

    def _connect_failed(self, key: Key) -> None:
        if self.requests.get(key) != "sent":
            return
        del self.requests[key]
        self.stats["connect_errors"] += 1
        p, d, digest, index = key
        c = self.cells[d]
        dl = c.downloads.get(digest) if c is not None else None
        if dl is not None:
            self._events(c, dl, dl.on_error(self.w.names[p], index, self.w.engine.now))
            self._arm_at(c, dl.next_deadline())

    def _request_arrives(self, key: Key) -> None:
        if self.requests.get(key) != "sent":
            return  # cancelled on the way
        w = self.w
        p, d, digest, index = key
        up = self.cells[p]
        if up is None or not w.is_live(p) or not w.net.reachable(p, d):
            w.engine.call_at(w.engine.now + self.connect_timeout, self._connect_failed, key)
            return
        now = w.engine.now
        reply = up.uploader.on_request(w.names[d], sw.PieceRequest(digest, index), now)
        status = reply.status
        if status == sw.PieceStatus.OK:
            self._upload(key, reply)
        elif status == sw.PieceStatus.QUEUED:
            self.requests[key] = "queued"
        else:
            del self.requests[key]
            self.stats["busy_replies" if status == sw.PieceStatus.BUSY else "missing_replies"] += 1
            w.engine.call_at(now + w.net.latency(p, d), self._refused, (key, reply))

    def _refused(self, arg: tuple[Key, sw.PieceReply]) -> None:
        key, reply = arg
        p, d, digest, index = key
        c = self.cells[d]
        dl = c.downloads.get(digest) if c is not None else None
        if dl is None or not self.w.is_live(d):
            return
        now = self.w.engine.now
        peer = self.w.names[p]
        if reply.status == sw.PieceStatus.BUSY:
            events = dl.on_busy(peer, index, now, have=reply.have)
        else:
            events = dl.on_missing(peer, index, now, have=reply.have)
        self._events(c, dl, events)
        self._arm_at(c, dl.next_deadline())

    def _upload(self, key: Key, reply: sw.PieceReply) -> None:
        p, d, digest, index = key
        flow = self.w.net.transfer(
            p, d, self._piece_bytes(digest, index), self._uploaded, tag=(key, reply)
        )
        if not flow.ended:
            self.requests[key] = flow

    def _uploaded(self, flow: Flow, ok: bool) -> None:
        w = self.w
        key, reply = flow.tag
        p, d, digest, index = key
        w.account(flow, ok)
        if self.requests.get(key) is flow:
            del self.requests[key]
        self._free_slot(p, d, digest, index)
        c = self.cells[d]
        dl = c.downloads.get(digest) if c is not None else None
        if dl is None or not w.is_live(d):
            return
        now = w.engine.now
        peer = w.names[p]
        if ok:
            self.stats["pieces_from_peers"] += 1
            had = dl.held >> index & 1
            events = dl.on_piece(peer, index, True, now, have=reply.have, complete=reply.complete)
            if not had and dl.held >> index & 1:
                self._stored(c, dl, index)
        else:
            events = dl.on_error(peer, index, now)
        self._events(c, dl, events)
        self._arm_at(c, dl.next_deadline())

    def _free_slot(self, p: int, d: int, digest: str, index: int) -> None:
        up = self.cells[p]
        if up is None or not self.w.is_live(p):
            return
        for requester, req in up.uploader.on_done(self.w.names[d], digest, index):
            self._start_queued(up, requester, req)
        self._wake_parked(up)

    def _wake_parked(self, up: _Cell) -> None:
        """A slot is free: parked have-queries that the cell can now serve are answered."""
        for to, reply in up.uploader.wake_parked():
            self._have_reply(up, to, reply)

    def _start_queued(self, up: _Cell, requester: str, req: sw.PieceRequest) -> None:
        w = self.w
        key = (up.node, w.node_of_name[requester], req.digest, req.index)
        if self.requests.get(key) == "queued":
            self._upload(key, up.uploader.piece_reply(req.digest, req.index))
        else:  # cancelled meanwhile: give the slot back
            for who, r in up.uploader.on_done(requester, req.digest, req.index):
                self._start_queued(up, who, r)

    def _cancel_piece(self, c: _Cell, peer: str, digest: str, index: int) -> None:
        w = self.w
        p = w.node_of_name[peer]
        key = (p, c.node, digest, index)
        state = self.requests.pop(key, None)
        if state is None:
            return
        self.stats["cancelled"] += 1
        up = self.cells[p]
        if isinstance(state, Flow):
            w.net.flows.abort(state)
            w.account(state, False)
        if state != "sent" and up is not None and w.is_live(p):
            for requester, req in up.uploader.on_cancel(c.name, sw.PieceCancel(digest, index)):
                self._start_queued(up, requester, req)
            self._wake_parked(up)

    # -- have queries ------------------------------------------------------------------

    def _query_have(self, c: _Cell, peer: str, digest: str, want: int) -> None:
        w = self.w
        p = w.node_of_name[peer]
        if w.net.reachable(c.node, p):
            w.engine.call_at(
                w.engine.now + w.net.latency(c.node, p),
                self._query_arrives,
                (p, c.name, sw.HaveQuery(digest, want)),
            )

    def _query_arrives(self, arg: tuple[int, str, sw.HaveQuery]) -> None:
        p, requester, query = arg
        up = self.cells[p]
        if up is None or not self.w.is_live(p):
            return
        reply = up.uploader.on_have_query(requester, query, self.w.engine.now)
        if reply is not None:
            self._have_reply(up, requester, reply)
        else:
            self._arm_at(up, up.uploader.next_deadline())

    def _have_reply(self, up: _Cell, to: str, reply: sw.HaveReply) -> None:
        w = self.w
        d = w.node_of_name[to]
        if w.net.reachable(up.node, d):
            w.engine.call_at(
                w.engine.now + w.net.latency(up.node, d), self._have_arrives, (d, up.name, reply)
            )

    def _have_arrives(self, arg: tuple[int, str, sw.HaveReply]) -> None:
        d, responder, reply = arg
        c = self.cells[d]
        dl = c.downloads.get(reply.digest) if c is not None else None
        if dl is None or dl.complete or not self.w.is_live(d):
            return
        self._events(c, dl, dl.on_have(responder, reply.have, reply.complete, self.w.engine.now))
        self._arm_at(c, dl.next_deadline())

    # -- the lease holder reads from a registry ----------------------------------------

    def _origin(self) -> int:
        """The registry that has the image: the central one if staged, else upstream."""
        w = self.w
        return w.central if w.sc.central.has_image else w.upstream

    def _fetch_registry(self, c: _Cell, digest: str, ranges: tuple[tuple[int, int], ...]) -> None:
        w = self.w
        key = (c.node, digest)
        queue = self.registry_queue.setdefault(key, deque())
        for start, stop in ranges:
            queue.extend(range(start, stop))
        if key not in self.registry_busy:
            self.registry_busy.add(key)
            origin = self._origin()
            delay = w.net.latency(c.node, origin) + w.net.latency(origin, c.node)
            if origin == w.upstream:  # the central registry said 404 first
                delay += w.net.latency(c.node, w.central) + w.net.latency(w.central, c.node)
            w.engine.call_at(w.engine.now + delay, self._registry_next, key)

    def _registry_next(self, key: tuple[int, str]) -> None:
        queue = self.registry_queue.get(key)
        if not queue or not self.w.is_live(key[0]):
            self.registry_busy.discard(key)
            return
        index = queue.popleft()
        origin = self._origin()
        self.w.net.transfer(
            origin, key[0], self._piece_bytes(key[1], index), self._registry_piece, tag=(key, index)
        )

    def _registry_piece(self, flow: Flow, ok: bool) -> None:
        w = self.w
        key, index = flow.tag
        node, digest = key
        w.account(flow, ok)
        c = self.cells[node]
        dl = c.downloads.get(digest) if c is not None else None
        if dl is None or not w.is_live(node):
            return
        now = w.engine.now
        if ok:
            self.stats["pieces_from_registry"] += 1
            had = dl.held >> index & 1
            events = dl.on_piece(sw.UPSTREAM, index, True, now)
            if not had and dl.held >> index & 1:
                self._stored(c, dl, index)
            self._registry_next(key)
        else:
            events = dl.on_piece(sw.UPSTREAM, index, False, now)
            self.registry_busy.discard(key)
        self._events(c, dl, events)
        self._arm_at(c, dl.next_deadline())
