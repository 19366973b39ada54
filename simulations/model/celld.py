"""celld's strategy in the simulator: a transport around each cell's `protocol.cell.Cell`.

Owns: what the daemon's gossip.py and peering.py do around the protocol, as the
simulator models it: placement datagrams (lookups, announcements, lease grants) through
`World.send_msg`; a piece request as one latency to the peer; an accepted piece as one
flow from the peer (its reply, carrying the peer's bitmap, comes with the piece); the
lease holder's read from a registry as back-to-back piece flows on one stream; one timer
event a cell at its `Cell.next_deadline()`.
Never: chooses a piece, a peer, a home or a lease holder, nor decides what a cell does
next. That is `protocol.cell.Cell`, the driver the daemon runs too; this module only
carries its actions over the simulated network and reports back what became of them.

Modelling choices, each a simplification to know about:
- A peer's piece request and the busy/missing replies are HTTP in the daemon, modelled
  as one network latency each way (no bytes on the wire model, no loss: TCP).
- Pieces are not corrupted and no bytes are hashed: `ok=True` for every piece that
  arrives whole; a flow cut by a crash or a partition is a connection error. A complete
  blob is held (`Cell.hold`) as soon as its last piece arrives.
- A request to a crashed or unreachable cell fails after `connect_timeout` seconds.
- Placement datagrams (lookups, replies, announcements) are sealed and opened by
  wire.py like the membership ones: real bytes, real MAC, real size.
"""

from __future__ import annotations

import hashlib
from collections import deque
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from protocol import cell as pc
from protocol import placement as pl
from protocol import swarm as sw
from protocol.pieces import DEFAULT_POLICY, PiecePolicy, piece_count, piece_size_for
from simulations.model.flows import Flow
from simulations.model.scenario import ScenarioError, parse_size

if TYPE_CHECKING:
    from simulations.model.world import World

Key = tuple[int, int, str, int]  # (uploader node, downloader node, digest, piece index)

# the action and reply types, bound once (_act and the replies run once a message)
_Send = pl.Send
_RequestPiece = sw.RequestPiece
_CancelPiece = sw.CancelPiece
_QueryHave = sw.QueryHave
_SendHave = pc.SendHave
_StartUpload = pc.StartUpload
_FetchUpstream = sw.FetchUpstream
_DownloadComplete = sw.DownloadComplete
_OK = sw.PieceStatus.OK
_QUEUED = sw.PieceStatus.QUEUED
_BUSY = sw.PieceStatus.BUSY


def swarm_settings(
    params: tuple[tuple[str, Any], ...],
) -> tuple[pl.PlacementConfig, sw.SwarmConfig, dict[str, Any]]:
    """Split a scenario's [swarm] table among PlacementConfig, SwarmConfig and the
    simulator's own knobs: upload_slots and upload_queue (the Uploader's), the
    connect_timeout of a request to a dead cell, and piece_size (the smallest piece of
    the PiecePolicy; unset means pieces.py's default policy)."""
    own: dict[str, Any] = {
        "upload_slots": 4,
        "upload_queue": pc.UPLOAD_QUEUE,
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
        self.cells: list[pc.Cell | None] = [None] * world.n_cells
        self.views: list[frozenset[str] | None] = [None] * world.n_cells
        self.live_view = world.members.live_view
        # the hot paths' shortcuts: the world's engine and network, and its liveness
        # lists (mutated in place, never rebound: is_live(c) is alive[c] and member[c])
        self.engine = world.engine
        self.net = world.net
        self.names = world.names
        self.node_of_name = world.node_of_name
        self._alive = world.net.alive
        self._member = world.member
        self.due = [float("inf")] * world.n_cells
        self.requests: dict[Key, Any] = {}  # "sent" | "queued" | Flow
        self.registry_queue: dict[tuple[int, str], deque[int]] = {}
        self.registry_busy: set[tuple[int, str]] = set()
        self.lookups_of_gone = 0  # lookups started by cells that crashed or left
        self.stats = {
            "pieces_from_peers": 0,
            "pieces_from_registry": 0,
            "busy_replies": 0,
            "missing_replies": 0,
            "cancelled": 0,
            "connect_errors": 0,
            "leases": 0,
        }

    # -- the cells' drivers ------------------------------------------------------------

    def _cell(self, node: int) -> pc.Cell | None:
        """The live cell's driver, created on first use, its view of the members current."""
        c = self.cells[node]
        if c is None:
            w = self.w
            if not w.is_live(node):
                return None
            c = self.cells[node] = pc.Cell(
                self.names[node],
                w.zone_name(node),
                placement=self.placement,
                swarm=self.swarm,
                upload_slots=self.upload_slots,
                upload_queue=self.upload_queue,
                rng=w.rng(f"celld/cell/{node}"),
            )
        view = self.live_view(node)
        if view is not self.views[node]:
            self.views[node] = view
            self._act(node, c.set_members(view, self.engine.now))
        return c

    def _live_cell(self, node: int) -> pc.Cell | None:
        """The cell's driver if it exists and runs (replies to a dead cell are lost), its
        view of the members current. The hot path: one call per input of a cell."""
        c = self.cells[node]
        if c is None or not (self._alive[node] and self._member[node]):
            return None
        view = self.live_view(node)
        if view is not self.views[node]:
            self.views[node] = view
            self._act(node, c.set_members(view, self.engine.now))
        return c

    def _arm(self, node: int, c: pc.Cell) -> None:
        """Queue one event at the cell's next deadline, unless one is queued sooner."""
        when = c.next_deadline()
        if when is not None and when < self.due[node]:
            self.due[node] = when
            self.engine.call_at(when, self._timer, (node, when))

    def _timer(self, arg: tuple[int, float]) -> None:
        node, due = arg
        if self.due[node] != due:
            return
        self.due[node] = float("inf")
        c = self._live_cell(node)
        if c is None:
            return
        self._act(node, c.tick(self.engine.now))
        self._arm(node, c)

    def _act(self, node: int, actions: list[pc.Action]) -> None:
        """Carry out a cell's actions, in order."""
        for a in actions:
            kind = type(a)
            if kind is _RequestPiece:
                self._request_piece(node, a.peer, a.digest, a.index)
            elif kind is _Send:
                dst = self.node_of_name.get(a.to)
                if dst == node:  # as celld.peering: a cell's message to itself never leaves it
                    self.receive(node, a.to, a.message)
                elif dst is not None:
                    self.w.send_msg(node, dst, a.message)
            elif kind is _QueryHave:
                self._query_have(node, a.peer, a.digest, a.want)
            elif kind is _SendHave:
                self._have_reply(node, a.to, a.reply)
            elif kind is _CancelPiece:
                self._cancel_piece(node, a.peer, a.digest, a.index)
            elif kind is _StartUpload:
                self._start_queued(node, a.to, a.reply)
            elif kind is _FetchUpstream:
                self._fetch_registry(node, a.digest, a.ranges)
            elif kind is _DownloadComplete:
                self._complete(node, a.digest)
            # LeaseGranted, BadPiece, PeerBanned: nothing to carry out here

    # -- the world's calls -------------------------------------------------------------

    def start(self, node: int) -> None:
        c = self._cell(node)
        if c is None:
            return
        now = self.engine.now
        for digest in self.digests:
            self._act(node, c.download(digest, self.pcount[digest], now))
        self._arm(node, c)

    def on_crash(self, node: int) -> None:
        """The cell stops: its state is gone (a restart begins with an empty store)."""
        c = self.cells[node]
        if c is not None:
            self.lookups_of_gone += c.lookups_started
        self.cells[node] = None
        self.views[node] = None
        self.due[node] = float("inf")
        for key in [k for k in self.registry_queue if k[0] == node]:
            del self.registry_queue[key]
            self.registry_busy.discard(key)

    def member_changed(self, observer: int, member: int, state: str) -> None:
        """Membership told `observer` that `member` is dead: stop asking it for pieces."""
        if state != "dead" or self.cells[observer] is None:
            return
        c = self._cell(observer)
        if c is None:
            return
        self._act(observer, c.member_dead(self.names[member], self.engine.now))
        self._arm(observer, c)

    def receive(self, node: int, sender: str, msg: Any) -> None:
        """A placement datagram from `sender` (its authenticated name) arrived at `node`."""
        c = self._cell(node)
        if c is None:
            return
        actions = c.receive(sender, msg, self.engine.now)
        if type(msg) is pl.Lookup:
            reply = actions[0]
            if (
                isinstance(reply, pl.Send)
                and isinstance(reply.message, pl.LookupReply)
                and reply.message.lease == pl.LeaseStatus.GRANTED
                and reply.message.lease_holder == sender
            ):
                self.stats["leases"] += 1
        self._act(node, actions)
        self._arm(node, c)

    def summary(self) -> dict[str, int]:
        lookups = self.lookups_of_gone + sum(c.lookups_started for c in self.cells if c is not None)
        return dict(sorted({**self.stats, "lookups": lookups}.items()))

    def _complete(self, node: int, digest: str) -> None:
        """A download's last piece arrived: the cell holds the blob (nothing to hash in
        the simulator) and announces it complete."""
        c = self.cells[node]
        if c is not None:
            self._act(node, c.hold(digest, self.pcount[digest], self.engine.now))
        self.w.layer_complete(node, self.layer_of[digest])

    # -- pieces between cells ----------------------------------------------------------

    def _piece_bytes(self, digest: str, index: int) -> int:
        ps = self.psize[digest]
        return min(ps, self.size[digest] - index * ps)

    def _request_piece(self, d: int, peer: str, digest: str, index: int) -> None:
        p = self.node_of_name[peer]
        key = (p, d, digest, index)
        self.requests[key] = "sent"
        net = self.net
        engine = self.engine
        if net.reachable(d, p):
            engine.call_at(engine.now + net.latency(d, p), self._request_arrives, key)
        else:
            engine.call_at(engine.now + self.connect_timeout, self._connect_failed, key)

    def _connect_failed(self, key: Key) -> None:
        if self.requests.get(key) != "sent":
            return
        del self.requests[key]
        self.stats["connect_errors"] += 1
        p, d, digest, index = key
        c = self._live_cell(d)
        if c is not None:
            self._act(d, c.request_failed(self.names[p], digest, index, self.engine.now))
            self._arm(d, c)

    def _request_arrives(self, key: Key) -> None:
        if self.requests.get(key) != "sent":
            return  # cancelled on the way
        p, d, digest, index = key
        up = self._live_cell(p)
        net = self.net
        engine = self.engine
        if up is None or not net.reachable(p, d):
            engine.call_at(engine.now + self.connect_timeout, self._connect_failed, key)
            return
        now = engine.now
        reply = up.piece_request(self.names[d], digest, index, now)
        status = reply.status
        if status == _OK:
            self._upload(key, reply)
        elif status == _QUEUED:
            self.requests[key] = "queued"
        else:
            del self.requests[key]
            self.stats["busy_replies" if status == _BUSY else "missing_replies"] += 1
            engine.call_at(now + net.latency(p, d), self._refused, (key, reply))

    def _refused(self, arg: tuple[Key, sw.PieceReply]) -> None:
        key, reply = arg
        p, d, _, _ = key
        c = self._live_cell(d)
        if c is not None:
            self._act(d, c.piece_refused(self.names[p], reply, self.engine.now))
            self._arm(d, c)

    def _upload(self, key: Key, reply: sw.PieceReply) -> None:
        p, d, digest, index = key
        flow = self.net.transfer(
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
        up = self._live_cell(p)
        if up is not None:
            self._act(p, up.upload_done(self.names[d], digest, index, self.engine.now))
        c = self._live_cell(d)
        if c is None:
            return
        now = self.engine.now
        peer = self.names[p]
        if ok:
            self.stats["pieces_from_peers"] += 1
            if index == 0:
                w.layer_first_byte(d, self.layer_of[digest])
            actions = c.piece_arrived(
                peer, digest, index, True, now, have=reply.have, complete=reply.complete
            )
        else:
            actions = c.request_failed(peer, digest, index, now)
        self._act(d, actions)
        self._arm(d, c)

    def _start_queued(self, p: int, requester: str, reply: sw.PieceReply) -> None:
        key = (p, self.node_of_name[requester], reply.digest, reply.index)
        if self.requests.get(key) == "queued":
            self._upload(key, reply)
            return
        up = self.cells[p]
        if up is not None:  # cancelled meanwhile: give the slot back
            self._act(p, up.upload_done(requester, reply.digest, reply.index, self.engine.now))

    def _cancel_piece(self, d: int, peer: str, digest: str, index: int) -> None:
        w = self.w
        p = self.node_of_name[peer]
        key = (p, d, digest, index)
        state = self.requests.pop(key, None)
        if state is None:
            return
        self.stats["cancelled"] += 1
        if isinstance(state, Flow):
            self.net.flows.abort(state)
            w.account(state, False)
        if state != "sent":
            up = self._live_cell(p)
            if up is not None:
                self._act(p, up.upload_cancelled(self.names[d], digest, index, self.engine.now))

    # -- have queries ------------------------------------------------------------------

    def _query_have(self, d: int, peer: str, digest: str, want: int) -> None:
        p = self.node_of_name[peer]
        if self.net.reachable(d, p):
            self.engine.call_at(
                self.engine.now + self.net.latency(d, p),
                self._query_arrives,
                (p, self.names[d], digest, want),
            )

    def _query_arrives(self, arg: tuple[int, str, str, int]) -> None:
        p, requester, digest, want = arg
        up = self._live_cell(p)
        if up is None:
            return
        reply = up.have_query(requester, digest, want, self.engine.now)
        if reply is not None:
            self._have_reply(p, requester, reply)
        else:
            self._arm(p, up)

    def _have_reply(self, p: int, to: str, reply: sw.HaveReply) -> None:
        d = self.node_of_name[to]
        if self.net.reachable(p, d):
            self.engine.call_at(
                self.engine.now + self.net.latency(p, d),
                self._have_arrives,
                (d, self.names[p], reply),
            )

    def _have_arrives(self, arg: tuple[int, str, sw.HaveReply]) -> None:
        d, responder, reply = arg
        c = self._live_cell(d)
        if c is not None:
            self._act(d, c.have_arrived(responder, reply, self.engine.now))
            self._arm(d, c)

    # -- the lease holder reads from a registry ----------------------------------------

    def _origin(self) -> int:
        """The registry that has the image: the central one if staged, else upstream."""
        w = self.w
        return w.central if w.sc.central.has_image else w.upstream

    def _fetch_registry(self, node: int, digest: str, ranges: tuple[tuple[int, int], ...]) -> None:
        w = self.w
        key = (node, digest)
        queue = self.registry_queue.setdefault(key, deque())
        for start, stop in ranges:
            queue.extend(range(start, stop))
        if key not in self.registry_busy:
            self.registry_busy.add(key)
            origin = self._origin()
            delay = self.net.latency(node, origin) + self.net.latency(origin, node)
            if origin == w.upstream:  # the central registry said 404 first
                delay += self.net.latency(node, w.central) + self.net.latency(w.central, node)
            self.engine.call_at(self.engine.now + delay, self._registry_next, key)

    def _registry_next(self, key: tuple[int, str]) -> None:
        queue = self.registry_queue.get(key)
        if not queue or not self.w.is_live(key[0]):
            self.registry_busy.discard(key)
            return
        index = queue.popleft()
        origin = self._origin()
        self.net.transfer(
            origin, key[0], self._piece_bytes(key[1], index), self._registry_piece, tag=(key, index)
        )

    def _registry_piece(self, flow: Flow, ok: bool) -> None:
        w = self.w
        key, index = flow.tag
        node, digest = key
        w.account(flow, ok)
        c = self._live_cell(node)
        if c is None:
            return
        if ok:
            self.stats["pieces_from_registry"] += 1
            if index == 0:
                w.layer_first_byte(node, self.layer_of[digest])
            self._registry_next(key)  # the stream goes on while the cell takes the piece
        else:
            self.registry_busy.discard(key)
        self._act(node, c.registry_piece(digest, index, ok, self.engine.now))
        self._arm(node, c)
