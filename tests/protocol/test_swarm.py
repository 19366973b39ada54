"""The swarm: which piece to ask whom for, upload slots, bad pieces, and a small cluster.

The unit tests drive one Download (or Uploader) by hand. The cluster tests run the real
placement and swarm objects of 30 cells joined by an in-memory message heap: messages
arrive after a fixed latency, a piece takes a fixed time to send (bandwidth ignored), the
upstream registry hands out pieces in order. Real bytes move, each piece is verified
against the blob's blake3 table and the whole blob's sha256 is checked at the end, as a
cell would. Membership is a shared live set every cell sees change at the same instant.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import math
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.pieces import MiB, PieceTable, piece_count, piece_size_for
from protocol.placement import (
    Announce,
    LeaseStatus,
    Lookup,
    LookupReply,
    LookupResult,
    PlacementConfig,
    ProviderAnnouncer,
    ProviderDirectory,
    ProviderInfo,
    ProviderLookup,
    Send,
    Withdraw,
)
from protocol.swarm import (
    UPSTREAM,
    BadPiece,
    CancelPiece,
    Download,
    DownloadComplete,
    FetchUpstream,
    HaveQuery,
    HaveReply,
    NeedProviders,
    PeerBanned,
    PieceCancel,
    PieceReply,
    PieceRequest,
    PieceStatus,
    QueryHave,
    RequestPiece,
    SwarmConfig,
    Uploader,
    registry_first,
)

D = "sha256:" + "ab" * 32
SWARM = SwarmConfig()
PLACEMENT = PlacementConfig()

# -- one download, driven by hand -----------------------------------------------------------


def info(member: str, pieces: int = 0, *, complete: bool = False, zone: str = "z1") -> ProviderInfo:
    return ProviderInfo(member, zone, complete, pieces, 0)


def download(n: int = 8, seed: int = 0, **cfg: Any) -> Download:
    """A download that is content with one peer (min_peers=1) unless told otherwise."""
    cfg.setdefault("min_peers", 1)
    return Download(
        D, n, self_id="me", zone="z1", rng=random.Random(seed), config=SwarmConfig(**cfg)
    )


def asked(events: list[Any]) -> list[tuple[str, int]]:
    return [(e.peer, e.index) for e in events if isinstance(e, RequestPiece)]


def of_type(events: list[Any], kind: type) -> list[Any]:
    return [e for e in events if isinstance(e, kind)]


def test_a_download_starts_by_asking_the_homes() -> None:
    assert download().start(0.0) == [NeedProviders(D)]


def test_the_rarest_piece_is_asked_for_first() -> None:
    dl = download(4, max_inflight_per_peer=1, max_inflight=8, stream_ahead=0)
    events = dl.add_providers([info("a", 0b1111), info("b", 0b1110), info("c", 0b1100)], 0.0)
    requests = asked(events)
    assert requests[:2] == [("a", 0), ("b", 1)]  # held by one peer, then by two
    assert requests[2][0] == "c" and requests[2][1] in (2, 3)
    assert [dl.availability(i) for i in range(4)] == [1, 2, 3, 3]


def test_ties_are_broken_at_random_by_the_rng_passed_in() -> None:
    firsts = {
        asked(
            download(64, seed, max_inflight=1, stream_ahead=0).add_providers(
                [info("a", complete=True)], 0
            )
        )[0][1]
        for seed in range(20)
    }
    assert len(firsts) > 8
    same = [
        asked(
            download(64, 7, max_inflight=1, stream_ahead=0).add_providers(
                [info("a", complete=True)], 0
            )
        )
        for _ in range(2)
    ]
    assert same[0] == same[1]


def test_the_runtimes_next_piece_goes_first_and_the_rest_of_the_budget_to_the_rarest() -> None:
    # pieces 0-7 are held by a and b, 8-15 by c too: 8-15 are the more common
    dl = download(16, max_inflight_per_peer=1, max_inflight=2)
    half = sum(1 << i for i in range(8, 16))
    providers = [info("a", complete=True), info("b", complete=True), info("c", half)]
    requests = asked(dl.add_providers(providers, 0.0))
    assert requests[0][1] == 0  # what the runtime waits for, though no rarer than 1-7
    assert 1 <= requests[1][1] < 8  # the other request: one of the rarest
    peer, index = requests[1]
    assert asked(dl.on_piece(peer, index, True, 0.1))[0][1] != 1  # 0 is still in flight
    assert asked(dl.on_piece(requests[0][0], 0, True, 0.2)) == [(requests[0][0], 1)]


def prefix_lags(stream_ahead: int, seed: int) -> int:
    """Download 32 pieces from one complete peer, answering requests in order; count the
    arrivals after which the runtime could have been streamed (the held prefix) less than
    half the pieces received."""
    dl = download(32, seed, max_inflight_per_peer=2, max_inflight=2, stream_ahead=stream_ahead)
    pending = asked(dl.add_providers([info("a", complete=True)], 0.0))
    arrived = lags = 0
    while pending:
        peer, index = pending.pop(0)
        arrived += 1
        pending += asked(dl.on_piece(peer, index, True, arrived * 0.01))
        prefix = ((dl.held + 1) & ~dl.held).bit_length() - 1
        lags += prefix < arrived // 2
    assert dl.complete
    return lags


@pytest.mark.parametrize("stream_ahead", [1, 2])
def test_the_runtime_is_streamed_as_the_pieces_arrive_not_at_the_end(stream_ahead: int) -> None:
    """From one complete peer every piece is as rare as the next: with rarest first alone
    piece 0 comes at a random point, and with it the runtime's first byte."""
    assert all(prefix_lags(stream_ahead, seed) == 0 for seed in range(10))
    assert any(prefix_lags(0, seed) for seed in range(10))  # what stream_ahead buys


def test_requests_in_flight_are_bounded_per_peer_and_per_download() -> None:
    dl = download(64, max_inflight_per_peer=3, max_inflight=8)
    requests = asked(dl.add_providers([info("a", complete=True), info("b", 0b1)], 0.0))
    assert Counter(peer for peer, _ in requests) == {"a": 3, "b": 1}
    dl = download(64, max_inflight_per_peer=3, max_inflight=8)
    peers = [info(f"p{i}", complete=True) for i in range(10)]
    requests = asked(dl.add_providers(peers, 0.0))
    assert len(requests) == 8 == dl.inflight
    per_peer = Counter(peer for peer, _ in requests)
    assert max(per_peer.values()) <= 1
    peer, index = requests[0]
    more = asked(dl.on_piece(peer, index, True, 0.1))
    assert len(more) == 1 and dl.inflight == 8


def test_a_lone_complete_peer_takes_the_whole_budget_in_order() -> None:
    # one request at a time to the only provider leaves its link idle between pieces
    dl = download(16, max_inflight_per_peer=1, max_inflight=3)
    first = asked(dl.add_providers([info("a", complete=True)], 0.0))
    assert first == [("a", 0), ("a", 1), ("a", 2)]
    assert asked(dl.on_piece("a", 1, True, 0.1)) == [("a", 3)]
    # a second provider: the per-peer cap again, and the rarest for the rest of the budget
    events = dl.add_providers([info("b", 0b110000)], 0.2)
    more = asked(events) + asked(dl.on_piece("a", 0, True, 0.3))
    assert len(more) == 1 and more[0][0] == "b" and more[0][1] in (4, 5)
    assert dl.inflight == 3  # a: pieces 2 and 3 (asked before b came), and b's
    # a partial lone peer is no seeder: nothing in order is free there
    dl = download(16, max_inflight_per_peer=1, max_inflight=3)
    assert len(asked(dl.add_providers([info("a", 0xFFFF)], 0.0))) == 1


def test_a_peer_in_the_same_zone_is_preferred() -> None:
    for seed in range(10):
        dl = download(8, seed, max_inflight=1)
        providers = [info("far", complete=True, zone="z2"), info("near", complete=True)]
        assert asked(dl.add_providers(providers, 0.0))[0][0] == "near"


def test_endgame_asks_a_second_peer_and_cancels_the_slower_copy() -> None:
    dl = download(2, max_inflight_per_peer=2, max_inflight=4)
    requests = asked(dl.add_providers([info("a", complete=True), info("b", complete=True)], 0))
    assert len(requests) == 4
    assert sorted(requests) == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    events = dl.on_piece("a", 0, True, 0.1)
    assert of_type(events, CancelPiece) == [CancelPiece("b", D, 0)]
    events = dl.on_piece("b", 1, True, 0.2)
    assert of_type(events, CancelPiece) == [CancelPiece("a", D, 1)]
    assert of_type(events, DownloadComplete) == [DownloadComplete(D)]
    assert dl.complete and dl.inflight == 0


def test_a_timed_out_request_is_cancelled_and_asked_of_another_peer() -> None:
    dl = download(1, max_inflight=1, request_timeout=2.0)
    ((first, _),) = asked(dl.add_providers([info("a", complete=True), info("b", complete=True)], 0))
    other = "b" if first == "a" else "a"
    assert dl.next_deadline() == 2.0
    assert dl.poll(1.9) == []
    events = dl.poll(2.0)
    assert CancelPiece(first, D, 0) in events
    assert asked(events) == [(other, 0)]
    # the late copy from the first peer is still welcome if it wins
    assert of_type(dl.on_piece(first, 0, True, 2.1), DownloadComplete)
    assert CancelPiece(other, D, 0) in dl.on_piece(other, 0, True, 2.2) or dl.complete


def test_pieces_slower_than_the_first_deadline_still_arrive() -> None:
    """Every piece takes 5 s from its request, over a link slower than the 2 s the
    deadline first assumes. The deadline doubles after a round of timeouts (once for
    the round, not once per request) and then follows the measured piece time, so
    the download completes after two wasted rounds. A fixed deadline cancelled every
    request and asked again forever: a late cell pulling a many-layer image from idle
    peers on a slow link never finished."""
    dl = download(8, max_inflight=3, request_timeout=2.0)
    pending: dict[tuple[str, int], float] = {}  # (peer, piece) -> when it arrives
    timed_out = 0

    def act(events: list, now: float, *, timers: bool = False) -> None:
        nonlocal timed_out
        for e in events:
            if isinstance(e, RequestPiece):
                pending[(e.peer, e.index)] = now + 5.0
            elif isinstance(e, CancelPiece):  # a deadline passed, or endgame's spare copy
                timed_out += timers
                pending.pop((e.peer, e.index), None)

    peers = [info(p, complete=True) for p in ("a", "b", "c")]
    act(dl.add_providers(peers, 0.0), 0.0)
    now = 0.0
    while not dl.complete and now < 300.0:
        now = min([*pending.values(), dl.next_deadline() or math.inf])
        for key, at in sorted(pending.items(), key=lambda kv: kv[1]):
            if at <= now and key in pending:
                del pending[key]
                act(dl.on_piece(key[0], key[1], True, now), now)
        act(dl.poll(now), now, timers=True)
    assert dl.complete, f"{dl.held.bit_count()} of 8 pieces after {now:.0f} s"
    assert timed_out <= 6  # two rounds of the three requests in flight
    assert sorted(dl.peers) == ["a", "b", "c"]  # nobody dropped for a slow link


def test_a_peer_that_keeps_failing_is_dropped() -> None:
    dl = download(8, max_inflight=1, max_failures=3)
    events = dl.add_providers([info("a", complete=True)], 0.0)
    now = 0.0
    for _ in range(3):
        assert "a" in dl.peers
        ((_, index),) = asked(events)
        now += 1.0
        assert asked(dl.on_error("a", index, now)) == []  # backs off first
        now += 10.0
        events = dl.poll(now)
    assert "a" not in dl.peers and asked(events) == []


def test_the_pieces_of_a_dead_peer_are_asked_of_the_others() -> None:
    dl = download(4, max_inflight_per_peer=4, max_inflight=4)
    requests = asked(dl.add_providers([info("a", complete=True), info("b", complete=True)], 0))
    from_a = sorted(i for p, i in requests if p == "a")
    assert len(from_a) == 2
    events = dl.remove_provider("a", 0.5)
    assert sorted(asked(events)) == [("b", i) for i in from_a]
    assert not of_type(events, CancelPiece)  # nobody left to tell


def test_busy_makes_the_download_ask_elsewhere_then_retry_after_a_back_off() -> None:
    dl = download(1, max_inflight=1, busy_backoff=0.1, max_backoff=1.0)
    ((first, _),) = asked(dl.add_providers([info("a", complete=True), info("b", complete=True)], 0))
    other = "b" if first == "a" else "a"
    assert asked(dl.on_busy(first, 0, 0.01)) == [(other, 0)]
    assert asked(dl.on_busy(other, 0, 0.02)) == []
    wake = dl.next_deadline()
    assert wake is not None and 0.02 < wake <= 0.02 + 0.15
    assert asked(dl.poll(wake + 0.1)) != []


def test_after_busy_a_slow_swarm_backs_off_a_share_of_a_piece_time() -> None:
    """Pieces that take 0.8 s each: a busy uploader frees a slot about every 0.2 s,
    so the first retry waits busy_backoff_share of the measured 0.8 s, not 20 ms."""
    dl = download(4, max_inflight=1, busy_backoff=0.02, busy_backoff_share=0.25, max_backoff=1.0)
    ((peer, index),) = asked(dl.add_providers([info("a", complete=True)], 0.0))
    ((peer, index),) = asked(dl.on_piece(peer, index, True, 0.8))  # took 0.8 s
    assert asked(dl.on_busy(peer, index, 0.9)) == []
    wake = dl.next_deadline()
    assert wake is not None and 0.9 + 0.5 * 0.2 <= wake <= 0.9 + 1.5 * 0.2  # jittered


def test_a_bad_piece_is_charged_to_its_sender_who_is_banned_after_n() -> None:
    dl = download(4, max_inflight=1, max_bad_pieces=2)
    ((_, i1),) = asked(dl.add_providers([info("liar", complete=True)], 0.0))
    events = dl.on_piece("liar", i1, False, 0.1)
    assert of_type(events, BadPiece) == [BadPiece(D, i1, "liar")]
    ((_, i2),) = asked(events)
    events = dl.on_piece("liar", i2, False, 0.2)
    assert of_type(events, PeerBanned) == [PeerBanned(D, "liar", 2)]
    assert dl.banned == {"liar"} and "liar" not in dl.peers
    assert asked(dl.add_providers([info("liar", complete=True)], 0.3)) == []
    events = dl.add_providers([info("honest", complete=True)], 0.4)
    now = 0.4
    while not dl.complete:
        ((_, index),) = asked(events)
        now += 0.1
        events = dl.on_piece("honest", index, True, now)
    assert dl.pieces_from == {"honest": 4}
    assert dl.bad_pieces == 2


def test_the_lease_holder_fetches_upstream_only_what_no_peer_has() -> None:
    dl = download(8, max_inflight_per_peer=2)
    dl.add_providers([info("a", 0b00001111)], 0.0)
    events = dl.grant_lease(0.0)
    assert of_type(events, FetchUpstream) == [FetchUpstream(D, ((4, 8),))]
    requested = sorted(i for _, i in asked(events))
    assert requested == [] or set(requested) <= {0, 1, 2, 3}


def test_when_the_peer_dies_its_missing_pieces_join_the_upstream_fetch() -> None:
    dl = download(8, max_inflight_per_peer=2)
    requests = asked(dl.add_providers([info("a", 0b00001111)], 0.0))
    dl.grant_lease(0.0)
    got = requests[0][1]
    dl.on_piece("a", got, True, 0.1)
    events = dl.remove_provider("a", 0.2)
    (fetch,) = of_type(events, FetchUpstream)
    rest = {i for start, stop in fetch.ranges for i in range(start, stop)}
    assert rest == {0, 1, 2, 3} - {got}
    now = 0.2
    for i in [*sorted(rest), *range(4, 8)]:
        now += 0.01
        events = dl.on_piece(UPSTREAM, i, True, now)
    assert of_type(events, DownloadComplete) and dl.pieces_from[UPSTREAM] == 7


def test_when_the_lease_holder_dies_the_homes_are_asked_again_at_once() -> None:
    """Other downloaders are known and queried, so the download is not starving; yet
    the pieces the holder had not read yet come from nobody: ask who holds the lease."""
    dl = download(8, min_peers=1, lookup_interval=1.0)
    dl.start(0.0)
    events = dl.add_providers(
        [info("holder", 0b11), info("other", 0b01)], 0.0, lease_holder="holder"
    )
    assert asked(events)
    dl.on_piece("holder", 0, True, 0.1, have=0b11)
    events = dl.on_piece("holder", 1, True, 0.2, have=0b11)
    assert of_type(events, QueryHave)  # nothing left to ask for: the others are queried
    assert of_type(dl.remove_provider("holder", 0.3), NeedProviders) == [NeedProviders(D)]
    assert not of_type(dl.remove_provider("other", 0.4), NeedProviders)  # not the holder


def test_a_dead_lease_holder_is_looked_past_until_a_live_one_is_known() -> None:
    """The first lookup after the holder died reaches a home that has not heard of the
    death yet and names the dead holder again; the cell leaves it out (Cell._feed), so
    no holder is known, and the download keeps asking the homes every lookup_interval
    while it queries the other downloaders, until the lease comes to it (before, it
    asked once and then waited 30 s on downloaders that had nothing to give)."""
    dl = download(8, min_peers=1, lookup_interval=1.0)
    dl.start(0.0)
    dl.add_providers([info("holder", 0b11), info("other", 0b01)], 0.0, lease_holder="holder")
    dl.on_piece("holder", 0, True, 0.1, have=0b11)
    dl.on_piece("holder", 1, True, 0.2, have=0b11)
    assert of_type(dl.remove_provider("holder", 0.3), NeedProviders)
    # the stale answer, the dead holder filtered out: only the other downloader
    assert not of_type(dl.add_providers([info("other", 0b01)], 0.35), NeedProviders)
    lookups = [t for t in (1.3, 2.3, 3.3) if of_type(dl.poll(t), NeedProviders)]
    assert lookups == [1.3, 2.3, 3.3]  # every lookup_interval, queries or not
    dl.add_providers([info("other", 0b01)], 3.4)
    dl.grant_lease(3.4)
    assert not of_type(dl.poll(4.4) + dl.poll(5.4), NeedProviders)  # it reads for itself


def test_a_lease_holder_that_fails_every_request_is_given_up_like_a_dead_one() -> None:
    """The stale home also lists the dead holder as a provider: requests to it fail
    (connection refused) until it is dropped, and then the homes are asked again."""
    dl = download(8, min_peers=1, lookup_interval=1.0, max_failures=2)
    dl.start(0.0)
    ((_, index),) = asked(dl.add_providers([info("holder", 0b1)], 0.0, lease_holder="holder"))
    assert not of_type(dl.on_error("holder", index, 0.1), NeedProviders)
    now = 0.2
    while not (events := dl.poll(now)) or not asked(events):
        now += 0.05
    ((_, index),) = asked(events)
    assert of_type(dl.on_error("holder", index, now), NeedProviders) == [NeedProviders(D)]


def test_banning_the_lease_holder_makes_the_cell_fetch_for_itself() -> None:
    dl = download(4, max_inflight=1, max_bad_pieces=1)
    ((_, index),) = asked(dl.add_providers([info("holder", 0b0011)], 0.0, lease_holder="holder"))
    events = dl.on_piece("holder", index, False, 0.1)
    assert PeerBanned(D, "holder", 1) in events
    assert of_type(events, FetchUpstream) == [FetchUpstream(D, ((0, 4),))]


@pytest.mark.parametrize("budget", [0, 1])
def test_while_a_cell_reads_from_the_registry_its_other_downloads_are_held_back(
    budget: int,
) -> None:
    cfg = SwarmConfig(inflight_while_fetching=budget)
    layer = download(4, inflight_while_fetching=budget)
    other = Download(
        "sha256:" + "cd" * 32, 8, self_id="me", zone="z1", rng=random.Random(1), config=cfg
    )
    peers = [info("p", complete=True), info("q", complete=True)]
    requests = asked(other.add_providers(peers, 0.0))
    assert len(requests) == 2
    layer.grant_lease(0.0)
    assert layer.fetching_upstream
    assert registry_first([layer, other], 0.0) == []  # nothing to send now
    assert other.max_inflight == budget and layer.max_inflight == 2
    if budget:
        return
    # a budget of 0: the other download waits until the registry read is over
    peer, index = requests[0]
    assert asked(other.on_piece(peer, index, True, 0.1)) == []  # waits
    for i in range(4):
        layer.on_piece(UPSTREAM, i, True, 0.2 + i / 100)
    assert layer.complete and not layer.fetching_upstream
    resumed = registry_first([layer, other], 0.3)
    assert other.max_inflight == 2
    assert [(d, type(ev)) for d, ev in resumed] == [(other, RequestPiece)]


def test_by_default_a_lease_holders_other_downloads_keep_one_request_in_flight() -> None:
    """Half the link for the registry read when it would fill the link alone (Kraken's
    storm), and still one request a layer when the registry is slower (the testbed's):
    see registry_first."""
    layer = download(4)
    other = Download(
        "sha256:" + "cd" * 32,
        8,
        self_id="me",
        zone="z1",
        rng=random.Random(1),
        config=SwarmConfig(min_peers=1),
    )
    peers = [info("p", complete=True), info("q", complete=True)]
    requests = asked(other.add_providers(peers, 0.0))
    assert len(requests) == 2  # the usual budget before the lease
    layer.grant_lease(0.0)
    assert registry_first([layer, other], 0.0) == []
    (peer, index), (peer2, index2) = requests
    assert asked(other.on_piece(peer, index, True, 0.1)) == []  # one still out: enough
    assert len(asked(other.on_piece(peer2, index2, True, 0.2))) == 1  # one again


def test_a_fresh_lease_holder_fetches_everything_and_stops_asking_the_homes() -> None:
    dl = download(8)
    dl.start(0.0)
    events = dl.grant_lease(0.01)
    assert of_type(events, FetchUpstream) == [FetchUpstream(D, ((0, 8),))]
    assert not of_type(dl.poll(5.0), NeedProviders)


def test_an_idle_peer_with_nothing_wanted_is_queried_and_its_answer_used() -> None:
    dl = download(4)
    events = dl.add_providers([info("a", 0)], 0.0)
    assert of_type(events, QueryHave) == [QueryHave("a", D, 0b1111)]
    assert not of_type(dl.poll(0.5), QueryHave)  # one query at a time
    assert asked(dl.on_have("a", 0b0100, False, 0.6)) == [("a", 2)]


def test_a_peer_that_cannot_park_a_query_is_not_polled() -> None:
    dl = download(4, have_wait=1.0, have_min_interval=0.05)
    assert of_type(dl.add_providers([info("a", 0)], 0.0), QueryHave)
    # answered at once with nothing we want: the uploader had no room to park it
    assert not of_type(dl.on_have("a", 0, False, 0.002), QueryHave)
    assert not any(of_type(dl.poll(t), QueryHave) for t in (0.06, 0.1, 0.2))
    assert of_type(dl.poll(0.26), QueryHave) == [QueryHave("a", D, 0b1111)]
    # a query that was parked for its whole wait is renewed at once
    assert of_type(dl.on_have("a", 0, False, 1.3), QueryHave) == [QueryHave("a", D, 0b1111)]


def test_the_download_is_not_woken_for_a_back_off_while_its_budget_is_spent() -> None:
    dl = download(8, max_inflight=1, busy_backoff=0.1)
    ((peer, index),) = asked(dl.add_providers([info("a", 0xFF), info("b", 0xFF)], 0.0))
    other = "b" if peer == "a" else "a"
    # busy: the other peer is asked at once, the budget is spent again, no wake-up queued
    ((peer2, index2),) = asked(dl.on_busy(peer, index, 0.0))
    assert peer2 == other
    assert dl.next_deadline() == pytest.approx(4.0)  # the request's timeout only
    # busy too: nothing can be asked now, so a wake-up when the first back-off ends
    assert asked(dl.on_busy(peer2, index2, 0.01)) == []
    wake = dl.next_deadline()
    assert wake is not None and 0.04 < wake < 0.16
    # the peer whose (jittered) back-off ended first is asked again
    assert len(asked(dl.poll(wake))) == 1


def test_a_starving_download_asks_the_homes_again_at_most_every_lookup_interval() -> None:
    dl = download(4, lookup_interval=1.0)
    assert dl.start(0.0) == [NeedProviders(D)]
    assert dl.add_providers([], 0.1) == []
    deadline = dl.next_deadline()
    assert deadline is not None and deadline <= 1.0
    assert of_type(dl.poll(1.0), NeedProviders) == [NeedProviders(D)]


def test_bitmaps_learned_only_grow_a_stale_announcement_does_not_shrink_them() -> None:
    dl = download(4)
    dl.add_providers([info("a", 0b0011)], 0.0)
    dl.add_providers([info("a", 0b0001)], 0.1)
    assert [dl.availability(i) for i in range(4)] == [1, 1, 0, 0]


def test_missing_replaces_the_bitmap_of_a_peer_that_evicted() -> None:
    dl = download(4, max_inflight=1)
    ((_, index),) = asked(dl.add_providers([info("a", 0b0011)], 0.0))
    dl.on_missing("a", index, 0.1, have=0)
    assert [dl.availability(i) for i in range(4)] == [0, 0, 0, 0]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, (1 << 40) - 1), st.booleans())))
def test_the_bit_sliced_availability_counts_like_a_plain_counter(
    ops: list[tuple[int, int, bool]],
) -> None:
    dl = download(40, max_peers=100)
    plain: dict[str, int] = {}
    for n, bits, remove in ops:
        peer = f"p{n}"
        if remove:
            dl.remove_provider(peer, 0.0)
            plain.pop(peer, None)
        else:
            dl.add_providers([info(peer, bits)], 0.0)
            plain[peer] = plain.get(peer, 0) | bits
    for i in range(40):
        assert dl.availability(i) == sum(b >> i & 1 for b in plain.values())


def test_completion_is_reported_once() -> None:
    dl = download(1, max_inflight_per_peer=1)
    dl.add_providers([info("a", complete=True), info("b", complete=True)], 0.0)
    assert of_type(dl.on_piece("a", 0, True, 0.1), DownloadComplete)
    assert not of_type(dl.on_piece("b", 0, True, 0.2), DownloadComplete)
    assert dl.duplicates == 1


# -- the uploader ----------------------------------------------------------------------------


def test_an_origin_shows_each_piece_until_it_has_sent_it_once() -> None:
    """The lease holder's upload link carries every new piece at least once: a piece
    it sent goes on from the cell that got it (super-seeding, BEP 16)."""
    up = Uploader("origin", slots=8)
    up.add_seed(D, 4, have=0b0011)
    up.set_origin(D, True)
    first = up.on_request("a", PieceRequest(D, 0), 0.0)
    assert first.status == PieceStatus.OK and first.have == 0b0010
    again = up.on_request("b", PieceRequest(D, 0), 0.0)  # b is told to take 0 from a
    assert again.status == PieceStatus.MISSING and again.have == 0b0010
    assert up.on_request("b", PieceRequest(D, 1), 0.0).status == PieceStatus.OK
    # every held piece went out once: nothing is hidden any more
    assert up.on_request("c", PieceRequest(D, 0), 0.0).status == PieceStatus.OK
    up.piece_added(D, 2)  # a new piece from the registry is shown first
    assert up.on_have_query("d", HaveQuery(D, 0b1111), 0.0) == HaveReply(D, 0b0100, False)
    assert up.piece_reply(D, 2).have == 0b0100
    up.set_origin(D, False)  # the read is over: everything to anyone
    assert up.on_request("d", PieceRequest(D, 0), 0.0).have == 0b0111


def test_a_cell_is_an_origin_while_it_holds_the_lease_and_not_once_the_blob_is_held() -> None:
    from protocol.cell import Cell

    cell = Cell("me", "z1", rng=random.Random(0))
    cell.set_members(frozenset({"me"}), 0.0)
    granted = LookupResult(D, (), LeaseStatus.GRANTED, "me", 4, ("me",))
    cell.download(D, 4, 0.0, located=granted)
    cell.registry_piece(D, 0, True, 0.1)
    cell.registry_piece(D, 1, True, 0.2)
    assert cell.piece_request("a", D, 0, 0.3).status == PieceStatus.OK
    assert cell.piece_request("b", D, 0, 0.3).status == PieceStatus.MISSING
    cell.hold(D, 4, 1.0)
    assert cell.piece_request("b", D, 0, 1.1).status == PieceStatus.OK


def test_upload_slots_are_fixed_and_the_next_asker_is_told_busy() -> None:
    up = Uploader("u", slots=2)
    up.add_seed(D, 4, have=0b1111)
    statuses = [up.on_request(f"p{i}", PieceRequest(D, i), 0.0).status for i in range(3)]
    assert statuses == [PieceStatus.OK, PieceStatus.OK, PieceStatus.BUSY]
    assert up.load == 2
    assert up.on_done("p0", D, 0) == []
    assert up.on_request("p2", PieceRequest(D, 2), 0.1).status == PieceStatus.OK
    busy = up.on_request("p3", PieceRequest(D, 3), 0.1)
    assert busy.have == 0b1111 and busy.complete  # the asker learns what we hold


def test_a_queue_holds_a_few_and_starts_them_as_slots_free() -> None:
    up = Uploader("u", slots=1, queue=1)
    up.add_seed(D, 4, have=0b1111)
    assert up.on_request("a", PieceRequest(D, 0), 0).status == PieceStatus.OK
    assert up.on_request("b", PieceRequest(D, 1), 0).status == PieceStatus.QUEUED
    assert up.on_request("c", PieceRequest(D, 2), 0).status == PieceStatus.BUSY
    assert up.on_done("a", D, 0) == [("b", PieceRequest(D, 1))]
    assert up.on_request("c", PieceRequest(D, 2), 0).status == PieceStatus.QUEUED
    assert up.on_cancel("c", PieceCancel(D, 2)) == []  # dropped from the queue
    assert up.on_cancel("b", PieceCancel(D, 1)) == []  # frees the slot
    assert up.load == 0


def test_a_piece_not_held_is_missing_with_the_bitmap() -> None:
    up = Uploader("u")
    up.add_seed(D, 4, have=0b0101)
    reply = up.on_request("a", PieceRequest(D, 1), 0)
    assert (reply.status, reply.have, reply.complete) == (PieceStatus.MISSING, 0b0101, False)
    assert up.on_request("a", PieceRequest(D, -1), 0).status == PieceStatus.MISSING
    other = up.on_request("a", PieceRequest("sha256:" + "00" * 32, 0), 0)
    assert (other.status, other.have) == (PieceStatus.MISSING, 0)
    up.remove_seed(D)
    assert up.on_request("a", PieceRequest(D, 0), 0).status == PieceStatus.MISSING


def test_a_have_query_is_parked_until_a_wanted_piece_arrives() -> None:
    up = Uploader("u", have_wait=1.0)
    up.add_seed(D, 4, have=0b0001)
    assert up.on_have_query("a", HaveQuery(D, 0b0110), 0.0) is None
    assert up.piece_added(D, 3) == []  # not wanted by a
    assert up.piece_added(D, 1) == [("a", HaveReply(D, 0b1011, False))]
    assert up.on_have_query("b", HaveQuery(D, 0b0010), 0.1) == HaveReply(D, 0b1011, False)


def test_a_parked_query_is_answered_when_its_wait_is_over() -> None:
    up = Uploader("u", have_wait=1.0, max_parked=1)
    up.add_seed(D, 4, have=0b0001)
    assert up.on_have_query("a", HaveQuery(D, 0b0110), 0.0) is None
    assert up.on_have_query("b", HaveQuery(D, 0b0110), 0.0) == HaveReply(D, 0b0001, False)
    assert up.next_deadline() == 1.0
    assert up.poll(0.9) == []
    assert up.poll(1.0) == [("a", HaveReply(D, 0b0001, False))]


def test_a_new_piece_wakes_only_as_many_parked_askers_as_there_are_free_slots() -> None:
    up = Uploader("u", slots=2, have_wait=1.0)
    up.add_seed(D, 4, have=0b0001)
    assert up.on_request("busy", PieceRequest(D, 0), 0.0).status == PieceStatus.OK
    for asker in "abcd":
        assert up.on_have_query(asker, HaveQuery(D, 0b0010), 0.0) is None
    assert up.piece_added(D, 1) == [("a", HaveReply(D, 0b0011, False))]  # one slot free
    assert up.on_request("a", PieceRequest(D, 1), 0.01).status == PieceStatus.OK
    assert up.wake_parked() == []  # no slot free
    up.on_done("busy", D, 0)
    assert up.wake_parked() == [("b", HaveReply(D, 0b0011, False))]
    assert up.on_request("b", PieceRequest(D, 1), 0.02).status == PieceStatus.OK
    up.on_done("a", D, 1)
    assert up.wake_parked() == [("c", HaveReply(D, 0b0011, False))]
    # the last one is answered when its wait is over, and only once
    assert up.next_deadline() == 1.0
    assert up.poll(1.0) == [("d", HaveReply(D, 0b0011, False))]
    assert up.next_deadline() is None and up.wake_parked() == []


# -- the in-memory cluster ---------------------------------------------------------------------

LATENCY = 0.001
PIECE_TIME = 0.010
UPSTREAM_PIECE_TIME = 0.010
TICK = 0.005


@dataclass
class Cell:
    id: str
    zone: str
    announcer: ProviderAnnouncer
    directory: ProviderDirectory
    uploader: Uploader
    download: Download | None = None
    pieces: dict[int, bytes] = field(default_factory=dict)
    lookups: dict[int, ProviderLookup] = field(default_factory=dict)
    corrupt: bool = False
    alive: bool = True
    verified_digest: str = ""
    events: list[Any] = field(default_factory=list)


class Cluster:
    def __init__(
        self,
        n: int,
        blob: bytes,
        *,
        seed: int = 1,
        zones: int = 2,
        swarm: SwarmConfig = SWARM,
        placement: PlacementConfig = PLACEMENT,
        slots: int = 4,
    ) -> None:
        self.rng = random.Random(seed)
        self.blob = blob
        self._digests: dict[tuple[int, ...], str] = {}
        self.table = PieceTable.from_bytes(blob)
        self.digest = "sha256:" + hashlib.sha256(blob).hexdigest()
        self.swarm = swarm
        self.placement = placement
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._seq = 0
        self._rid = 0
        self.cells: dict[str, Cell] = {}
        for i in range(n):
            cid = f"cell-{i:02d}"
            self.cells[cid] = Cell(
                cid,
                f"z{i % zones}",
                ProviderAnnouncer(cid, f"z{i % zones}", config=placement),
                ProviderDirectory(cid, rng=random.Random(seed * 1000 + i), config=placement),
                Uploader(cid, slots=slots, have_wait=swarm.have_wait),
            )
        self.upstream_pieces: list[tuple[str, int]] = []  # (cell, index) read upstream
        self.on_piece_hook: Callable[[Cell, int], None] | None = None
        self._membership_changed()

    # -- plumbing ---------------------------------------------------------------------

    def at(self, when: float, fn: Callable[..., None], *args: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, fn, args))

    def live(self) -> frozenset[str]:
        return frozenset(c.id for c in self.cells.values() if c.alive)

    def _membership_changed(self) -> None:
        live = self.live()
        for cell in self.cells.values():
            if not cell.alive:
                continue
            cell.directory.set_members(live, self.now)
            self._send(cell, cell.announcer.set_members(live, self.now))

    def kill(self, cid: str) -> None:
        self.cells[cid].alive = False
        self._membership_changed()
        for cell in self.cells.values():
            if cell.alive and cell.download is not None:
                self._handle(cell, cell.download.remove_provider(cid, self.now))

    def _deliver(
        self, to: str, fn: Callable[..., None], *args: Any, delay: float = LATENCY
    ) -> None:
        def run(*a: Any) -> None:
            cell = self.cells[to]
            if cell.alive:
                fn(cell, *a)

        self.at(self.now + delay, run, *args)

    def _send(self, sender: Cell, sends: list[Send]) -> None:
        for s in sends:
            self._deliver(s.to, self._on_placement, sender.id, s.message)

    # -- placement messages -------------------------------------------------------------

    def _on_placement(self, cell: Cell, sender: str, msg: Any) -> None:
        if isinstance(msg, Announce):
            cell.directory.receive_announce(sender, msg, self.now)
        elif isinstance(msg, Withdraw):
            cell.directory.receive_withdraw(sender, msg, self.now)
        elif isinstance(msg, Lookup):
            reply = cell.directory.receive_lookup(sender, msg, self.now)
            self._deliver(sender, self._on_placement, cell.id, reply)
        elif isinstance(msg, LookupReply):
            look = cell.lookups.get(msg.request_id)
            if look is not None:
                result = look.receive(sender, msg, self.now)
                if result is not None:
                    self._lookup_done(cell, look.request_id, result)

    def _lookup_done(self, cell: Cell, rid: int, result: LookupResult) -> None:
        del cell.lookups[rid]
        dl = cell.download
        if dl is None or dl.complete:
            return
        events = dl.add_providers(result.providers, self.now, lease_holder=result.lease_holder)
        self._handle(cell, events)
        if result.lease == LeaseStatus.GRANTED and not dl.lease:
            self._handle(cell, dl.grant_lease(self.now))
            self._announce(cell)

    def _announce(self, cell: Cell) -> None:
        dl = cell.download
        assert dl is not None
        self._send(
            cell,
            cell.announcer.update(
                self.digest,
                complete=dl.complete,
                pieces=dl.held,
                piece_count=dl.piece_count,
                now=self.now,
                lease=dl.lease and not dl.complete,
            ),
        )

    # -- swarm events -------------------------------------------------------------------

    def _handle(self, cell: Cell, events: list[Any]) -> None:
        for ev in events:
            cell.events.append(ev)
            if isinstance(ev, NeedProviders):
                self._rid += 1
                look = ProviderLookup(
                    self.digest,
                    cell.zone,
                    cell.announcer.homes(self.digest),
                    request_id=self._rid,
                    config=self.placement,
                )
                cell.lookups[self._rid] = look
                self._send(cell, look.start(self.now))
            elif isinstance(ev, RequestPiece):
                req = PieceRequest(ev.digest, ev.index)
                self._deliver(ev.peer, self._on_request, cell.id, req)
            elif isinstance(ev, CancelPiece):
                msg = PieceCancel(ev.digest, ev.index)
                self._deliver(ev.peer, self._on_cancel, cell.id, msg)
            elif isinstance(ev, QueryHave):
                self._deliver(ev.peer, self._on_query, cell.id, HaveQuery(ev.digest, ev.want))
            elif isinstance(ev, FetchUpstream):
                t = self.now
                for start, stop in ev.ranges:
                    for index in range(start, stop):
                        t += UPSTREAM_PIECE_TIME
                        self._deliver(cell.id, self._on_upstream_piece, index, delay=t - self.now)
            elif isinstance(ev, DownloadComplete):
                pieces = [cell.pieces[i] for i in range(self.table.count)]
                if self._sha256(pieces) == self.digest:
                    cell.verified_digest = self.digest
                    self._announce(cell)

    def _sha256(self, pieces: list[bytes]) -> str:
        """The blob's digest, as the cell computes it before announcing it complete.
        Cells mostly hold the very same piece objects (passed along by reference), so
        each distinct sequence of objects is hashed once: 30 x 64 MiB of sha256 would
        dominate the test's time."""
        key = tuple(map(id, pieces))
        known = self._digests.get(key)
        if known is None:
            h = hashlib.sha256()
            for piece in pieces:
                h.update(piece)
            known = self._digests[key] = "sha256:" + h.hexdigest()
        return known

    def _on_upstream_piece(self, cell: Cell, index: int) -> None:
        dl = cell.download
        if dl is None:
            return
        self.upstream_pieces.append((cell.id, index))
        offset, length = self.table.span(index)
        self._got_piece(cell, UPSTREAM, index, self.blob[offset : offset + length], None)

    def _got_piece(
        self, cell: Cell, peer: str, index: int, data: bytes, reply: PieceReply | None
    ) -> None:
        dl = cell.download
        assert dl is not None
        ok = self.table.verify(index, data)
        fresh = ok and index not in cell.pieces
        if ok:
            cell.pieces[index] = data
        have = reply.have if reply is not None else None
        complete = reply.complete if reply is not None else False
        self._handle(cell, dl.on_piece(peer, index, ok, self.now, have=have, complete=complete))
        if fresh:
            for to, hr in cell.uploader.piece_added(self.digest, index):
                self._deliver(to, self._on_have_reply, cell.id, hr)
            self._announce(cell)
            if self.on_piece_hook is not None:
                self.on_piece_hook(cell, index)

    # -- the uploader's side ------------------------------------------------------------

    def _on_request(self, cell: Cell, sender: str, req: PieceRequest) -> None:
        reply = cell.uploader.on_request(sender, req, self.now)
        if reply.status == PieceStatus.OK:
            self._start_upload(cell, sender, req)
        elif reply.status != PieceStatus.QUEUED:
            self._deliver(sender, self._on_reply, cell.id, reply)

    def _start_upload(self, cell: Cell, to: str, req: PieceRequest) -> None:
        data = cell.pieces[req.index]
        if cell.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]

        def finish(_: Cell) -> None:
            for peer, started in cell.uploader.on_done(to, req.digest, req.index):
                self._start_upload(cell, peer, started)
            reply = cell.uploader.piece_reply(req.digest, req.index)
            self._deliver(to, self._on_piece_arrived, cell.id, reply, data)

        self._deliver(cell.id, finish, delay=PIECE_TIME)

    def _on_cancel(self, cell: Cell, sender: str, msg: PieceCancel) -> None:
        for peer, started in cell.uploader.on_cancel(sender, msg):
            self._start_upload(cell, peer, started)

    def _on_query(self, cell: Cell, sender: str, q: HaveQuery) -> None:
        reply = cell.uploader.on_have_query(sender, q, self.now)
        if reply is not None:
            self._deliver(sender, self._on_have_reply, cell.id, reply)

    # -- the downloader's side ------------------------------------------------------------

    def _on_reply(self, cell: Cell, sender: str, reply: PieceReply) -> None:
        dl = cell.download
        if dl is None:
            return
        if reply.status == PieceStatus.BUSY:
            self._handle(cell, dl.on_busy(sender, reply.index, self.now, have=reply.have))
        else:
            self._handle(cell, dl.on_missing(sender, reply.index, self.now, have=reply.have))

    def _on_piece_arrived(self, cell: Cell, sender: str, reply: PieceReply, data: bytes) -> None:
        if cell.download is not None:
            self._got_piece(cell, sender, reply.index, data, reply)

    def _on_have_reply(self, cell: Cell, sender: str, reply: HaveReply) -> None:
        if cell.download is not None:
            self._handle(cell, cell.download.on_have(sender, reply.have, reply.complete, self.now))

    # -- running ---------------------------------------------------------------------------

    def start_download(self, cid: str) -> None:
        cell = self.cells[cid]
        cell.download = Download(
            self.digest,
            self.table.count,
            self_id=cid,
            zone=cell.zone,
            rng=random.Random(self.rng.random()),
            config=self.swarm,
        )
        cell.uploader.add_seed(self.digest, self.table.count)
        self._handle(cell, cell.download.start(self.now))
        self._announce(cell)

    def _tick(self) -> None:
        for cell in self.cells.values():
            if not cell.alive:
                continue
            for rid, look in list(cell.lookups.items()):
                self._send(cell, look.poll(self.now))
                if look.result is not None:
                    self._lookup_done(cell, rid, look.result)
            if cell.download is not None:
                self._handle(cell, cell.download.poll(self.now))
            for to, hr in cell.uploader.poll(self.now):
                self._deliver(to, self._on_have_reply, cell.id, hr)
            cell.directory.expire(self.now)
            load = cell.uploader.load
            self._send(cell, cell.announcer.tick(self.now, load))

    def run(self, until: float, stop: Callable[[], bool] | None = None) -> None:
        next_tick = self.now
        while self.now < until:
            if self._heap and self._heap[0][0] <= next_tick:
                when, _, fn, args = heapq.heappop(self._heap)
                self.now = when
                fn(*args)
            else:
                self.now = next_tick
                self._tick()
                next_tick += TICK
                if stop is not None and stop():
                    return

    def all_done(self) -> bool:
        return all(c.verified_digest for c in self.cells.values() if c.alive)

    def has_the_blob(self, cell: Cell) -> bool:
        """The cell verified the whole blob's sha256, and holds exactly its bytes."""
        if cell.verified_digest != self.digest:
            return False
        return all(
            cell.pieces[i] == self.blob[slice(*self._bounds(i))] for i in range(self.table.count)
        )

    def _bounds(self, index: int) -> tuple[int, int]:
        offset, length = self.table.span(index)
        return offset, offset + length


# -- a cluster of 30 cells ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def blob() -> bytes:
    return random.Random(4).randbytes(64 * MiB)


def pieces_of(blob: bytes) -> int:
    return piece_count(len(blob), piece_size_for(len(blob)))


def start_all(cluster: Cluster, spread: float = 0.005, skip: tuple[str, ...] = ()) -> None:
    for cid in cluster.cells:
        if cid not in skip:
            cluster.at(cluster.rng.random() * spread, cluster.start_download, cid)


def upstream_cells(cluster: Cluster) -> list[str]:
    """Cells that read from the registry, in the order they started to."""
    return list(dict.fromkeys(cid for cid, _ in cluster.upstream_pieces))


def test_thirty_cells_get_the_blob_and_only_the_lease_holder_goes_upstream(blob: bytes) -> None:
    cluster = Cluster(30, blob, seed=3)
    start_all(cluster)
    cluster.run(30.0, stop=cluster.all_done)
    assert all(cluster.has_the_blob(cell) for cell in cluster.cells.values())
    (holder,) = upstream_cells(cluster)
    n = pieces_of(blob)
    assert sorted(i for _, i in cluster.upstream_pieces) == list(range(n))  # one copy
    assert {cid for cid, _ in cluster.upstream_pieces} == {holder}
    from_peers = sum(
        n
        for c in cluster.cells.values()
        for p, n in c.download.pieces_from.items()
        if p != UPSTREAM
    )
    assert from_peers == 29 * n
    # the holder was not the only source: the others relayed most pieces
    assert sum(c.uploader.uploads_done for c in cluster.cells.values() if c.id != holder) > 29 * 8


def test_a_corrupt_peer_is_banned_and_its_bad_pieces_fetched_elsewhere(blob: bytes) -> None:
    cluster = Cluster(30, blob, seed=5)
    liar = "cell-07"
    cluster.cells[liar].corrupt = True
    # an honest cell asks first and gets the lease; the liar is among the first others
    cluster.at(0.0, cluster.start_download, "cell-00")
    cluster.at(0.003, cluster.start_download, liar)
    for cid in list(cluster.cells)[1:]:
        if cid != liar:
            cluster.at(0.006 + cluster.rng.random() * 0.005, cluster.start_download, cid)
    cluster.run(30.0, stop=cluster.all_done)
    bad = [e for c in cluster.cells.values() for e in of_type(c.events, BadPiece)]
    bans = [e for c in cluster.cells.values() for e in of_type(c.events, PeerBanned)]
    assert bad and {e.peer for e in bad} == {liar}
    assert bans and {e.peer for e in bans} == {liar}
    for cell in cluster.cells.values():
        assert cluster.has_the_blob(cell), cell.id
        assert liar not in cell.download.pieces_from
    assert len(upstream_cells(cluster)) == 1


def test_the_lease_passes_on_when_its_holder_dies(blob: bytes) -> None:
    cluster = Cluster(30, blob, seed=7)
    killed: list[str] = []

    def kill_holder_after_five_pieces(cell: Cell, index: int) -> None:
        holder = cluster.upstream_pieces[0][0] if cluster.upstream_pieces else None
        if not killed and cell.id == holder and len(cluster.upstream_pieces) == 5:
            killed.append(cell.id)
            cluster.kill(cell.id)

    cluster.on_piece_hook = kill_holder_after_five_pieces
    start_all(cluster)
    cluster.run(30.0, stop=cluster.all_done)
    first, *successors = upstream_cells(cluster)
    assert killed == [first]
    assert len(successors) == 1
    successor = successors[0]
    # the successor read only what no live cell had: not the pieces relayed before the
    # holder died, so the registry sent less than two copies in all
    later = [i for cid, i in cluster.upstream_pieces if cid == successor]
    n = pieces_of(blob)
    assert 0 < len(later) < n and len(set(later)) == len(later)
    assert len(cluster.upstream_pieces) <= n + 5
    live = [c for c in cluster.cells.values() if c.alive]
    assert len(live) == 29 and all(cluster.has_the_blob(c) for c in live)


def test_a_download_that_gets_nothing_for_a_while_asks_the_homes_again() -> None:
    """Peers that park every have query and answer it with nothing are no progress. A
    lease holder that never reads (the grant's reply was lost and it follows another
    cell) once held every cell of a simulated storm for good: their parked queries kept
    them from starving, so none asked the homes again, where the lease had expired."""
    dl = download(4, min_peers=SWARM.min_peers)
    dl.start(0.0)
    t = 0.0
    crowd = [info("holder")] + [info(f"follower-{i}") for i in range(6)]
    events = dl.add_providers(crowd, t, lease_holder="holder")
    parked: list[tuple[float, str]] = []  # (when the uploader answers, asker's peer)
    lookups = []
    while t < 6.0:
        parked += [(t + SWARM.have_wait, q.peer) for q in of_type(events, QueryHave)]
        lookups += [t for _ in of_type(events, NeedProviders)]
        t = round(t + 0.05, 2)
        events = dl.poll(t)
        for due, peer in [p for p in parked if p[0] <= t]:
            parked.remove((due, peer))
            events += dl.on_have(peer, 0, False, t)  # parked for have_wait: still nothing
    late = [x for x in lookups if x >= SWARM.stall_lookup]
    assert len(late) >= 3, f"asked the homes at {lookups} only"  # every lookup_interval
    gaps = [b - a for a, b in itertools.pairwise(lookups)]
    assert all(g >= SWARM.lookup_interval - 1e-9 for g in gaps)  # paced, not a flood
