"""celld.peering driven without sockets, on trio's virtual clock: its waits for
membership, with a stand-in for celld.gossip whose live set the test moves, and its have
queries, carried between cells as datagrams sealed and opened by protocol.wire."""

from __future__ import annotations

import hashlib
import math
import random
from pathlib import Path

import pytest
import trio

from celld import store as store_mod
from celld.metrics import Metrics
from celld.peering import Peering, TableMiss, Transfer
from celld.store import Store
from protocol import swarm as sw
from protocol import wire
from protocol.pieces import MiB, bitmap_full, piece_count, piece_size_for
from protocol.placement import LeaseStatus, LookupResult, ProviderInfo

KEY = bytes(range(32))
DIGEST = "sha256:" + "ab" * 32


class Members:
    """What Peering reads of celld.gossip here: the live set."""

    def __init__(self, live: set[str]) -> None:
        self.live = live
        self.listener = None

    def live_ids(self) -> frozenset[str]:
        return frozenset(self.live)

    def send(self, to: str, msg: object) -> None:
        pass


def held_by(holder: str) -> LookupResult:
    provider = ProviderInfo(holder, "z", False, 1, 0)
    return LookupResult(DIGEST, (provider,), LeaseStatus.HELD, holder, 4, ("home",))


async def test_a_lease_holder_not_yet_known_is_taken_once_membership_knows_it(
    store: Store, autojump_clock: trio.abc.Clock
) -> None:
    """The testbed's storm: a cell blind to three members (its membership still
    converging) was told the lease holder was one of them, could not reach it, and
    read the layer from the Hub after stall_timeout, the homes naming the holder
    all along. Once membership knows the holder, the lookup is the one to follow."""
    members = Members({"me", "home"})
    peering = Peering("me", "z", KEY, store, Metrics(), members, stall_timeout=30.0)  # type: ignore[arg-type]
    asked: list[float] = []

    async def locate(digest: str) -> LookupResult:
        asked.append(trio.current_time())
        if len(asked) == 3:
            members.live.add("stranger")  # a push-pull brought its row meanwhile
        return held_by("stranger")

    peering.locate = locate  # type: ignore[method-assign]
    start = trio.current_time()
    miss = TableMiss(frozenset({"stranger"}), unknown=frozenset({"stranger"}))
    result = await peering.relocate(miss, DIGEST)
    assert result is not None and result.lease_holder == "stranger"
    assert [p.member for p in result.providers] == ["stranger"]
    assert trio.current_time() - start < 1.0 and len(asked) == 3


async def test_a_known_holder_that_stops_answering_is_waited_for_until_declared_dead(
    store: Store, autojump_clock: trio.abc.Clock
) -> None:
    members = Members({"me", "home", "holder"})
    peering = Peering("me", "z", KEY, store, Metrics(), members, stall_timeout=30.0)  # type: ignore[arg-type]
    asked: list[float] = []

    async def locate(digest: str) -> LookupResult:
        asked.append(trio.current_time())
        return held_by("successor")

    peering.locate = locate  # type: ignore[method-assign]
    start = trio.current_time()

    async def declare_dead() -> None:
        await trio.sleep(4.0)
        members.live.discard("holder")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(declare_dead)
        result = await peering.relocate(TableMiss(frozenset({"holder"})), DIGEST)
    assert result is not None and result.lease_holder == "successor"
    assert asked and asked[0] - start >= 4.0  # no lookup while it was still alive


async def test_after_every_named_cell_answered_without_a_table_the_homes_are_asked_once_more(
    store: Store, autojump_clock: trio.abc.Clock
) -> None:
    """A 50 Mbit/s storm: the homes named as lease holder a cell that never read the
    layer (its grant's reply was lost), five cells got no table from it and read the
    layer from the Hub, 2.25 copies in all, while another cell was reading it under the
    lease. Asked again, the homes name that cell; the same names again mean the
    registries, as before."""
    members = Members({"me", "home", "phantom", "reader"})
    peering = Peering("me", "z", KEY, store, Metrics(), members, stall_timeout=30.0)  # type: ignore[arg-type]
    answers = [held_by("reader")]

    async def locate(digest: str) -> LookupResult:
        return answers.pop(0)

    peering.locate = locate  # type: ignore[method-assign]
    miss = TableMiss(frozenset(), asked=frozenset({"phantom"}))
    result = await peering.look_again(miss, DIGEST)
    assert result is not None and result.lease_holder == "reader"

    answers.append(held_by("phantom"))  # nothing new: to the registries
    assert await peering.look_again(miss, DIGEST) is None

    granted = LookupResult(DIGEST, (), LeaseStatus.GRANTED, "me", 4, ("home",))
    answers.append(granted)  # the stale lease ended: this cell reads it, under the lease
    assert await peering.look_again(miss, DIGEST) == granted


class Net:
    """Datagrams between the Peerings of one test, each sealed by its sender's
    protocol.wire.Codec and opened by its receiver's, as celld.gossip does, and delivered
    by a task (never inside the sender's call)."""

    def __init__(self) -> None:
        self.links: dict[str, Link] = {}
        self.sent: list[tuple[float, str, str, object]] = []  # (when, from, to, message)
        self._in, self._out = trio.open_memory_channel[tuple[str, bytes]](math.inf)

    async def deliver(self) -> None:
        async for to, data in self._out:
            link = self.links[to]
            opened = link.codec.open(data, trio.current_time())
            assert isinstance(opened, wire.Decoded), opened
            assert link.listener is not None
            link.listener.datagram(opened.sender, opened.msg, trio.current_time())


class Link:
    """What Peering uses of celld.gossip, on a Net."""

    def __init__(self, net: Net, name: str) -> None:
        self.net, self.name = net, name
        self.codec = wire.Codec(KEY, name, now=0.0)
        self.listener: Peering | None = None
        net.links[name] = self

    def live_ids(self) -> frozenset[str]:
        return frozenset(self.net.links)

    def send(self, to: str, msg: object) -> None:
        now = trio.current_time()
        self.net.sent.append((now, self.name, to, msg))
        if to in self.net.links:
            self.net._in.send_nowait((to, self.codec.seal(msg, now)))


def cell_on(net: Net, name: str, root: Path) -> Peering:
    store = Store.open(root / name)
    return Peering(name, "z", KEY, store, Metrics(), Link(net, name), clock=trio.current_time)  # type: ignore[arg-type]


def have_replies(net: Net, to: str) -> list[tuple[float, sw.HaveReply]]:
    return [(t, m) for t, _, dst, m in net.sent if dst == to and isinstance(m, sw.HaveReply)]


async def test_a_have_query_is_a_datagram_and_its_answer_brings_piece_requests(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """B downloads a blob whose only known provider, A, was announced holding nothing
    yet: B asks A what it has in one datagram, A (whose store holds the blob) answers in
    another, and B asks A for pieces."""
    data = random.Random(1).randbytes(5 * MiB)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    count = piece_count(len(data), piece_size_for(len(data)))
    assert count >= 2
    net = Net()
    a, b = cell_on(net, "a", tmp_path), cell_on(net, "b", tmp_path)
    a.store.put_bytes(digest, data)
    asked: list[tuple[str, int]] = []
    b._request = lambda peer, d, index: asked.append((peer, index))  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(net.deliver)
        await nursery.start(a.run)
        await nursery.start(b.run)
        located = LookupResult(
            digest, (ProviderInfo("a", "z", False, 0, 0),), LeaseStatus.HELD, "a", count, ("a",)
        )
        b._do(b.cell.download(digest, count, trio.current_time(), located=located))
        await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    queries = [m for _, src, dst, m in net.sent if isinstance(m, sw.HaveQuery)]
    assert queries and all(q.digest == digest for q in queries)
    (_, reply), *_ = have_replies(net, "b")
    assert reply == sw.HaveReply(digest, bitmap_full(count), True)
    assert asked and {peer for peer, _ in asked} == {"a"}


async def test_a_parked_have_query_is_answered_when_the_piece_lands_or_after_have_wait(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """A holds pieces 0 and 2 of 4; B's query for piece 1 waits at A and is answered the
    moment A gets it; C's, for piece 3, after have_wait with what A holds by then."""
    digest = "sha256:" + "cd" * 32
    net = Net()
    a = cell_on(net, "a", tmp_path)
    for name in ("b", "c"):
        Link(net, name).listener = a  # never delivered to: the test reads net.sent
    wait = a.cell.swarm.have_wait
    async with trio.open_nursery() as nursery:
        nursery.start_soon(net.deliver)
        await nursery.start(a.run)
        a.cell.uploader.add_seed(digest, 4, 0b0101)
        start = trio.current_time()
        a.datagram("b", sw.HaveQuery(digest, 0b0010), start)
        a.datagram("c", sw.HaveQuery(digest, 0b1000), start)
        await trio.sleep(wait / 4)
        assert have_replies(net, "b") == have_replies(net, "c") == []  # parked
        a.peer.wake(a.cell.uploader.piece_added(digest, 1))
        await trio.sleep(2 * wait)
        nursery.cancel_scope.cancel()
    assert have_replies(net, "b") == [(start + wait / 4, sw.HaveReply(digest, 0b0111, False))]
    assert have_replies(net, "c") == [(start + wait, sw.HaveReply(digest, 0b0111, False))]
    # a blob the cell does not hold is answered at once: nothing held
    other = "sha256:" + "ef" * 32
    a.datagram("b", sw.HaveQuery(other, 1), trio.current_time())
    assert have_replies(net, "b")[-1][1] == sw.HaveReply(other, 0, False)


async def test_pieces_that_extend_the_prefix_are_hashed_as_written_the_others_once_reached(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A transfer's pieces land in any order. The prefix's next one is counted written
    (readers may follow it) at once, hashed from memory, never read back from the temp
    file; one put further on waits, unhashed, and is read back once the prefix reaches
    it. The blob commits with its digest either way."""
    piece = 1 * MiB
    data = random.Random(3).randbytes(5 * piece + 11)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    writer = store.new_writer(digest)
    t = Transfer(digest, writer, len(data), piece, None)
    read_back: list[int] = []
    real_preadv = store_mod.os.preadv

    def preadv(fd: int, bufs, offset: int) -> int:
        read_back.append(offset)
        return real_preadv(fd, bufs, offset)

    monkeypatch.setattr(store_mod.os, "preadv", preadv)
    members = Members({"me"})
    peering = Peering("me", "z", KEY, store, Metrics(), members)  # type: ignore[arg-type]

    def span(i: int) -> bytes:
        return data[i * piece : (i + 1) * piece]

    await t.write(0, span(0))
    await t.write(1, span(1))
    assert writer.written == 2 * piece and read_back == []
    await t.write(3, span(3))  # early: put in place, not counted
    assert writer.written == 2 * piece
    await t.write(2, span(2))
    assert writer.written == 3 * piece and read_back == []
    await peering._advance(t)  # as _piece does after each: piece 3, from the file
    assert writer.written == 4 * piece and read_back == [3 * piece]
    await t.write(4, span(4))
    await t.write(5, span(5))
    await peering._advance(t)
    assert t.prefix == 6 and writer.written == len(data)
    assert writer.matches()
    entry = writer.commit()
    assert entry.path.read_bytes() == data
