"""protocol.cell: a few Cells joined by an in-memory transport, as the daemon drives them.

The transport here is the smallest one: every datagram and piece is delivered at once,
in order, and a piece "verifies" unless its sender is marked corrupt. No simulator and
no socket: what these tests show is what celld/peering.py can rely on.
"""

from __future__ import annotations

import dataclasses
import random
from collections import deque

import pytest

from protocol import placement as pl
from protocol import swarm as sw
from protocol.cell import Action, Cell, LeaseGranted, Located, SendHave, StartUpload

D = "sha256:" + "ab" * 32
N = 6  # pieces of D


class Link:
    """Cells by name; `run` carries out actions at once until nothing is left."""

    def __init__(self, names: list[str], swarm: sw.SwarmConfig | None = None) -> None:
        self.now = 0.0
        self.cells = {
            name: Cell(name, "z1", swarm=swarm or sw.SwarmConfig(), rng=random.Random(i))
            for i, name in enumerate(names)
        }
        self.log: list[tuple[str, Action]] = []  # (cell, action), every action carried out
        self.dead: set[str] = set()
        self.corrupt: set[str] = set()  # cells whose pieces fail verification
        self.serve = True  # False: piece requests wait in `pending`
        self.pending: list[tuple[str, sw.RequestPiece]] = []
        self.members(set(names))

    def members(self, live: set[str]) -> None:
        view = frozenset(live)
        for name, cell in self.cells.items():
            if name in live:
                self.run(name, cell.set_members(view, self.now))

    def of(self, name: str, kind: type) -> list:
        return [a for who, a in self.log if who == name and type(a) is kind]

    def run(self, name: str, actions: list[Action]) -> None:
        todo = deque((name, a) for a in actions)
        while todo:
            who, a = todo.popleft()
            self.log.append((who, a))
            out = self._carry(who, a)
            todo.extend(out)

    def _carry(self, who: str, a: Action) -> list[tuple[str, Action]]:
        cells, now = self.cells, self.now
        me = cells[who]
        if type(a) is pl.Send:
            if a.to in self.dead:
                return []
            return [(a.to, x) for x in cells[a.to].receive(who, a.message, now)]
        if type(a) is sw.RequestPiece:
            if not self.serve:
                self.pending.append((who, a))
                return []
            if a.peer in self.dead:
                return [(who, x) for x in me.request_failed(a.peer, a.digest, a.index, now)]
            reply = cells[a.peer].piece_request(who, a.digest, a.index, now)
            if reply.status == sw.PieceStatus.OK:
                return self._piece(a.peer, who, reply)
            if reply.status == sw.PieceStatus.QUEUED:
                return []
            return [(who, x) for x in me.piece_refused(a.peer, reply, now)]
        if type(a) is StartUpload:
            return self._piece(who, a.to, a.reply)
        if type(a) is sw.QueryHave:
            answer = cells[a.peer].have_query(who, a.digest, a.want, now)
            if answer is None:
                return []
            return [(who, x) for x in me.have_arrived(a.peer, answer, now)]
        if type(a) is SendHave:
            return [(a.to, x) for x in cells[a.to].have_arrived(who, a.reply, now)]
        if type(a) is sw.DownloadComplete:
            return [(who, x) for x in me.hold(a.digest, N, now)]
        return []  # FetchUpstream, Located, LeaseGranted, BadPiece, PeerBanned: logged

    def _piece(self, src: str, dst: str, reply: sw.PieceReply) -> list[tuple[str, Action]]:
        ok = src not in self.corrupt
        done = self.cells[src].upload_done(dst, reply.digest, reply.index, self.now)
        got = self.cells[dst].piece_arrived(
            src, reply.digest, reply.index, ok, self.now, have=reply.have, complete=reply.complete
        )
        return [(src, x) for x in done] + [(dst, x) for x in got]


def test_a_complete_holder_is_found_and_every_piece_comes_from_it() -> None:
    net = Link(["a", "b", "c"])
    net.run("a", net.cells["a"].hold(D, N, net.now))
    net.run("b", net.cells["b"].download(D, N, net.now))
    asked = net.of("b", sw.RequestPiece)
    assert {r.peer for r in asked} == {"a"}
    assert sorted(r.index for r in asked) == list(range(N))
    assert net.of("b", sw.DownloadComplete) == [sw.DownloadComplete(D)]
    assert not net.of("b", sw.FetchUpstream)
    assert not net.of("b", Located)  # the download's own lookup is not reported
    home = net.cells[net.cells["b"].announcer.homes(D)[0]]
    providers = home.directory.providers(D, net.now)
    assert providers["a"].complete and providers["b"].complete
    assert D not in net.cells["b"].downloads  # over once held
    assert net.cells["a"].download(D, N, net.now) == []  # held: nothing to fetch


def test_the_first_asker_of_an_unheld_digest_gets_the_lease() -> None:
    net = Link(["a", "b", "c"])
    a = net.cells["a"]
    net.run("a", a.lookup(D, net.now))
    (located,) = net.of("a", Located)
    assert located.result.lease == pl.LeaseStatus.GRANTED
    assert located.result.lease_holder == "a"
    lookups_before = len([s for s in net.of("a", pl.Send) if type(s.message) is pl.Lookup])
    # the daemon learns the size from the registry, then starts with the result it has
    net.run("a", a.download(D, N, net.now, located=located.result))
    assert net.of("a", LeaseGranted) == [LeaseGranted(D)]
    assert net.of("a", sw.FetchUpstream) == [sw.FetchUpstream(D, ((0, N),))]
    lookups_after = len([s for s in net.of("a", pl.Send) if type(s.message) is pl.Lookup])
    assert lookups_after == lookups_before  # not asked twice
    announced = [s.message for s in net.of("a", pl.Send) if type(s.message) is pl.Announce]
    # the lease is announced, so the homes renew it; and from the first announcement on,
    # since a holder announcing without it gives it up
    assert announced and all(m.lease for m in announced)


E = "sha256:" + "cd" * 32  # a second layer of the same image


def test_a_cell_reading_one_layer_gives_the_next_lease_back_to_a_cell_that_asks() -> None:
    """The first runtime of a storm asks for every layer at once: the lease of the second
    goes back, and the next cell to ask reads it instead, so the image enters the swarm
    through two cells."""
    net = Link(["a", "b", "c"])
    a, b = net.cells["a"], net.cells["b"]
    net.run("a", a.lookup(D, net.now))
    net.run("a", a.lookup(E, net.now))
    granted = [x.result.digest for x in net.of("a", Located)]
    assert granted == [D]  # E's lease went back at once
    withdrawn = {
        (s.to, s.message.digest) for s in net.of("a", pl.Send) if type(s.message) is pl.Withdraw
    }
    assert withdrawn == {(home, E) for home in a.announcer.homes(E)}
    net.now += 0.05
    net.run("b", b.lookup(E, net.now))  # b asks meanwhile: the lease is its
    (located,) = net.of("b", Located)
    assert located.result.lease == pl.LeaseStatus.GRANTED
    deadline = a.next_deadline()
    assert deadline is not None and deadline <= a.placement.lease_defer
    net.now = a.placement.lease_defer
    net.run("a", a.tick(net.now))  # a asks again and is pointed at b
    results = {x.result.digest: x.result for x in net.of("a", Located)}
    assert results[E].lease == pl.LeaseStatus.HELD and results[E].lease_holder == "b"


def test_a_lone_cell_keeps_the_second_lease_when_it_asks_again() -> None:
    net = Link(["a", "b"])
    a = net.cells["a"]
    net.run("a", a.lookup(D, net.now))
    net.run("a", a.lookup(E, net.now))
    assert [x.result.digest for x in net.of("a", Located)] == [D]
    net.now = a.placement.lease_defer
    net.run("a", a.tick(net.now))  # nobody else asked: granted again, and kept
    results = {x.result.digest: x.result for x in net.of("a", Located)}
    assert results[E].lease == pl.LeaseStatus.GRANTED and results[E].lease_holder == "a"
    # asked once more while it reads both (a renewed ask): the lease it holds stays
    sent = len(net.of("a", pl.Send))
    net.run("a", a.lookup(E, net.now))
    assert [x.result.lease for x in net.of("a", Located)][-1] == pl.LeaseStatus.GRANTED
    withdrawn = [s for s in net.of("a", pl.Send)[sent:] if type(s.message) is pl.Withdraw]
    assert withdrawn == []


def test_a_second_asker_is_pointed_at_the_lease_holder_and_woken_by_its_pieces() -> None:
    net = Link(["a", "b", "c"])
    a, b = net.cells["a"], net.cells["b"]
    net.run("a", a.download(D, N, net.now))
    assert net.of("a", sw.FetchUpstream)
    net.run("b", b.lookup(D, net.now))
    (located,) = net.of("b", Located)
    assert located.result.lease == pl.LeaseStatus.HELD
    assert located.result.lease_holder == "a"
    net.run("b", b.download(D, N, net.now, located=located.result))
    assert not net.of("b", sw.FetchUpstream)
    assert [q.peer for q in net.of("b", sw.QueryHave)] == ["a"]  # parked at a
    assert not net.of("b", sw.RequestPiece)
    net.now += 0.1
    net.run("a", a.registry_piece(D, 0, True, net.now))  # a stores piece 0
    assert [(s.to, s.reply.have) for s in net.of("a", SendHave)] == [("b", 1)]
    assert [(r.peer, r.index) for r in net.of("b", sw.RequestPiece)] == [("a", 0)]
    assert b.downloads[D].held == 1


def test_a_lookup_that_names_a_dead_lease_holder_is_looked_past() -> None:
    """b has seen a die; a home that has not still names a as the lease holder and a
    provider. b asks a for nothing and keeps asking the homes (Cell._feed)."""
    net = Link(["a", "b", "c"])
    a, b = net.cells["a"], net.cells["b"]
    net.run("a", a.download(D, N, net.now))
    net.run("a", a.registry_piece(D, 0, True, net.now))  # announced with lease=True
    net.run("b", b.set_members(frozenset({"b", "c"}), net.now))  # only b saw a die
    net.run("b", b.download(D, N, net.now))
    to_a = [x for x in net.of("b", sw.RequestPiece) + net.of("b", sw.QueryHave) if x.peer == "a"]
    assert to_a == []
    lookups = len([s for s in net.of("b", pl.Send) if type(s.message) is pl.Lookup])
    net.now += 1.1
    net.run("b", b.tick(net.now))
    again = len([s for s in net.of("b", pl.Send) if type(s.message) is pl.Lookup])
    assert again > lookups


def test_hold_announces_and_drop_withdraws_at_every_home() -> None:
    net = Link(["a", "b", "c", "d", "e"])
    a = net.cells["a"]
    net.run("a", a.hold(D, N, net.now))
    homes = a.announcer.homes(D)
    assert len(homes) == 3
    for h in homes:
        assert net.cells[h].directory.providers(D, net.now)["a"].complete
    assert a.piece_request("b", D, 2, net.now).status == sw.PieceStatus.OK
    net.run("a", a.drop(D, net.now))
    for h in homes:
        assert "a" not in net.cells[h].directory.providers(D, net.now)
    assert a.piece_request("c", D, 2, net.now).status == sw.PieceStatus.MISSING


def test_member_dead_moves_the_requests_elsewhere() -> None:
    net = Link(["a", "b", "c"], sw.SwarmConfig(max_inflight=2, max_inflight_per_peer=2))
    for holder in ("a", "c"):
        net.run(holder, net.cells[holder].hold(D, N, net.now))
    net.serve = False
    b = net.cells["b"]
    net.run("b", b.download(D, N, net.now))
    first = {r.peer: r.index for _, r in net.pending}
    assert set(first) == {"a", "c"}  # one each: the fewest requests in flight first
    net.dead.add("a")  # a crashed: its request is lost with it
    net.pending = [(w, r) for w, r in net.pending if r.peer == "c"]
    net.members({"b", "c"})
    net.run("b", b.member_dead("a", net.now))
    again = [r for _, r in net.pending[1:]]
    assert [(r.peer, r.index) for r in again] == [("c", first["a"])]
    net.serve = True
    waiting, net.pending = net.pending, []
    for who, r in waiting:
        net.run(who, [r])
    assert D not in b.downloads
    assert all(r.peer == "c" for r in net.of("b", sw.RequestPiece)[2:])


def test_a_peer_sending_bad_pieces_is_banned_and_the_blob_completes_elsewhere() -> None:
    net = Link(["a", "b", "c"])
    for holder in ("a", "c"):
        net.run(holder, net.cells[holder].hold(D, N, net.now))
    net.corrupt.add("a")
    net.run("b", net.cells["b"].download(D, N, net.now))
    bad = net.of("b", sw.BadPiece)
    assert bad and {x.peer for x in bad} == {"a"}
    assert net.of("b", sw.PeerBanned) == [sw.PeerBanned(D, "a", sw.SwarmConfig().max_bad_pieces)]
    assert net.of("b", sw.DownloadComplete) == [sw.DownloadComplete(D)]
    asked = net.of("b", sw.RequestPiece)
    banned_at = next(i for i, (who, x) in enumerate(net.log) if type(x) is sw.PeerBanned)
    later = [x for who, x in net.log[banned_at:] if who == "b" and type(x) is sw.RequestPiece]
    assert later and all(x.peer == "c" for x in later)
    assert len(asked) >= N


def test_a_grant_the_cell_does_not_use_is_withdrawn_from_the_home_that_made_it() -> None:
    """A grant that came after the lookup ended, or lost to a home naming another
    holder, would leave the home sure that this cell reads the blob: every asker would
    be sent to it. The cell withdraws it; one it uses it keeps."""
    net = Link(["a", "b", "c"])
    a = net.cells["a"]
    late = pl.LookupReply(D, 999, (), pl.LeaseStatus.GRANTED, "a", N, False)
    assert a.receive("b", late, net.now) == [pl.Send("b", pl.Withdraw(D))]
    # while a lookup of D is out, its answer decides: the home may be granting again
    a.lookups[998] = pl.ProviderLookup(D, "z1", ["b"], request_id=998)
    assert a.receive("b", late, net.now) == []
    del a.lookups[998]

    homes = a.announcer.homes(D)
    net.dead = {homes[0]}  # the authority's answers are lost
    net.run("a", a.lookup(D, net.now))
    other = next(h for h in homes[1:] if h != "a")
    net.cells[other].directory.receive_announce(
        "c", pl.Announce(D, "z1", False, 0b1, N, 0, 30.0, lease=True), net.now
    )
    while not net.of("a", Located):
        net.now = a.next_deadline()
        net.run("a", a.tick(net.now))
    (located,) = net.of("a", Located)
    assert (located.result.lease, located.result.lease_holder) == (pl.LeaseStatus.HELD, "c")
    withdrawn = [s.to for s in net.of("a", pl.Send) if type(s.message) is pl.Withdraw]
    assert withdrawn  # an escalated home granted a: released, in the result or after
    for home in homes[1:]:  # no home that answers is left holding a lease for a
        assert net.cells[home].directory.lease_holder(D, net.now) != "a"

    # a lease in use is kept whatever a late reply says
    net.run(
        "a",
        a.download(
            D,
            N,
            net.now,
            located=dataclasses.replace(
                located.result, lease=pl.LeaseStatus.GRANTED, lease_holder="a"
            ),
        ),
    )
    assert a.receive("b", late, net.now) == []


def test_timers_hedge_and_escalate_past_silent_homes_and_never_spin() -> None:
    names = ["a", "b", "c", "d", "e"]
    homes = pl.home_cells(D, frozenset(names))
    asker = next(n for n in names if n not in homes)
    net = Link(names)
    net.dead = set(homes)  # crashed, not yet declared dead: they never answer
    cell = net.cells[asker]
    cfg = pl.PlacementConfig()
    # 0.2 + hedge_delay - 0.2 < hedge_delay in floats: the hedge is not due at its own
    # deadline, and the driver must not report that deadline again
    net.now = 0.2
    net.run(asker, cell.lookup(D, net.now))
    ticks = []
    while not net.of(asker, Located):
        when = cell.next_deadline()
        assert when is not None and when > net.now
        net.now = when
        ticks.append(when)
        net.run(asker, cell.tick(net.now))
        assert len(ticks) < 10
    asked = [s.to for s in net.of(asker, pl.Send) if type(s.message) is pl.Lookup]
    escalated = [
        s.to for s in net.of(asker, pl.Send) if type(s.message) is pl.Lookup and s.message.escalate
    ]
    assert asked[: cfg.hedge_first] == homes[: cfg.hedge_first]
    assert sorted(escalated) == sorted(homes)
    assert ticks == [
        pytest.approx(0.2 + cfg.hedge_delay),
        pytest.approx(0.2 + cfg.hedge_delay + 1e-3),  # the spin guard
        pytest.approx(0.2 + cfg.lookup_timeout),
        pytest.approx(0.2 + cfg.lookup_timeout + 1e-3),  # again
        pytest.approx(0.2 + cfg.lookup_give_up),
    ]
    (located,) = net.of(asker, Located)
    assert located.result.lease == pl.LeaseStatus.NONE and not located.result.answered_by
    assert cell.next_deadline() is None or cell.next_deadline() > net.now


def test_a_cell_with_every_slot_taken_queues_one_request_and_starts_it_when_one_frees() -> None:
    """The daemon's and the simulator's cells queue one request behind full upload
    slots (UPLOAD_QUEUE): its asker is not sent a BUSY round trip and a back-off,
    and the slot that frees starts it at once. The next asker is still refused."""
    cell = Cell("seed", "z1", upload_slots=2, rng=random.Random(1))
    cell.hold(D, N, 0.0)
    statuses = [cell.piece_request(f"asker-{i}", D, i, 0.0).status for i in range(4)]
    assert statuses == [
        sw.PieceStatus.OK,
        sw.PieceStatus.OK,
        sw.PieceStatus.QUEUED,
        sw.PieceStatus.BUSY,
    ]
    started = cell.upload_done("asker-0", D, 0, 0.1)
    assert [(a.to, a.reply.index) for a in started if type(a) is StartUpload] == [("asker-2", 2)]
    assert cell.piece_request("asker-3", D, 3, 0.1).status is sw.PieceStatus.QUEUED
