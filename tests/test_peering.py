"""celld.peering's waits for membership, driven without sockets: a stand-in for
celld.gossip whose live set the test moves, on trio's virtual clock."""

from __future__ import annotations

import trio

from celld.metrics import Metrics
from celld.peering import Peering, TableMiss
from celld.store import Store
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
