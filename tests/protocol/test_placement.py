"""Home cells, provider records, fetch leases, re-announcements and hedged lookups."""

from __future__ import annotations

import hashlib
import random
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.placement import (
    Announce,
    Homes,
    LeaseStatus,
    Lookup,
    LookupReply,
    PlacementConfig,
    ProviderAnnouncer,
    ProviderDirectory,
    ProviderLookup,
    Withdraw,
    home_cells,
)

MEMBERS = [f"cell-{i:03d}" for i in range(50)]


def digest(i: int) -> str:
    return "sha256:" + hashlib.sha256(str(i).encode()).hexdigest()


D = digest(0)


# -- home cells ----------------------------------------------------------------------------


def test_homes_are_r_distinct_members_and_every_cell_computes_the_same() -> None:
    homes = home_cells(D, MEMBERS)
    assert len(homes) == 3 == len(set(homes))
    assert set(homes) <= set(MEMBERS)
    shuffled = MEMBERS[:]
    random.Random(1).shuffle(shuffled)
    assert home_cells(D, shuffled) == homes
    assert home_cells(D, frozenset(MEMBERS)) == homes
    assert home_cells(D, MEMBERS, r=5)[:3] == homes
    assert (
        home_cells(D, MEMBERS[:2]) == [m for m in homes if m in MEMBERS[:2]]
        or len(home_cells(D, MEMBERS[:2])) == 2
    )
    assert home_cells(D, []) == []


def test_every_member_is_home_of_about_r_over_n_of_the_digests() -> None:
    counts = Counter(m for i in range(3000) for m in home_cells(digest(i), MEMBERS))
    expected = 3000 * 3 / len(MEMBERS)  # 180, standard deviation about 13
    assert set(counts) == set(MEMBERS)
    assert all(0.7 * expected < c < 1.3 * expected for c in counts.values()), counts
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < 90  # 49 degrees of freedom: p < 0.001 above ~86


def test_a_joining_member_moves_only_the_homes_it_enters() -> None:
    before = {i: home_cells(digest(i), MEMBERS) for i in range(3000)}
    after = {i: home_cells(digest(i), [*MEMBERS, "newcomer"]) for i in range(3000)}
    moved = [i for i in before if before[i] != after[i]]
    for i in moved:
        assert "newcomer" in after[i]
        assert set(after[i]) - {"newcomer"} <= set(before[i])
    share = len(moved) / 3000
    assert 0.5 * 3 / 51 < share < 1.5 * 3 / 51


def test_a_leaving_member_moves_only_the_homes_it_left() -> None:
    gone = MEMBERS[7]
    rest = [m for m in MEMBERS if m != gone]
    for i in range(1000):
        before, after = home_cells(digest(i), MEMBERS), home_cells(digest(i), rest)
        if gone in before:
            assert set(before) - {gone} <= set(after)
        else:
            assert before == after


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 79)), max_size=30))
def test_incremental_homes_match_a_full_recomputation(changes: list[tuple[bool, int]]) -> None:
    homes = Homes(3)
    live = set(MEMBERS[:10])
    homes.set_members(live)
    tracked = [digest(i) for i in range(20)]
    for d in tracked:
        homes.track(d)
    for join, n in changes:
        member = f"cell-{n:03d}"
        before = {d: homes.of(d) for d in tracked}
        (live.add if join else live.discard)(member)
        changed = homes.set_members(live)
        for d in tracked:
            assert homes.of(d) == home_cells(d, live)
            if homes.of(d) != before[d]:
                assert changed[d] == (before[d], homes.of(d))
            else:
                assert d not in changed


# -- the directory at a home -----------------------------------------------------------------


def announce(complete: bool = True, *, zone: str = "z1", load: int = 0, **kw: object) -> Announce:
    fields: dict[str, object] = dict(
        digest=D,
        zone=zone,
        complete=complete,
        pieces=0b1111 if complete else 0b0011,
        piece_count=4,
        load=load,
        ttl=30.0,
        lease=False,
    )
    fields.update(kw)
    return Announce(**fields)  # type: ignore[arg-type]


def lookup(zone: str = "z1", rid: int = 1, escalate: bool = False) -> Lookup:
    return Lookup(D, zone, rid, escalate)


def directory(seed: int = 0, **cfg: object) -> ProviderDirectory:
    return ProviderDirectory("home", rng=random.Random(seed), config=PlacementConfig(**cfg))  # type: ignore[arg-type]


def test_an_announced_provider_is_returned_until_its_ttl_runs_out() -> None:
    d = directory()
    d.receive_announce("a", announce(), now=0.0)
    reply = d.receive_lookup("x", lookup(), 10.0, authority=True)
    assert [p.member for p in reply.providers] == ["a"]
    assert reply.providers[0].complete and reply.lease == LeaseStatus.COMPLETE
    assert reply.piece_count == 4 and reply.request_id == 1
    d.expire(30.0)
    assert d.providers(D, 30.0) == {}
    assert d.digests() == []


def test_a_refreshed_announcement_keeps_the_record() -> None:
    d = directory()
    d.receive_announce("a", announce(), 0.0)
    d.receive_announce("a", announce(), 20.0)
    d.expire(35.0)
    assert set(d.providers(D, 35.0)) == {"a"}


def test_each_record_expires_at_its_own_ttl_and_a_lease_at_its_own() -> None:
    d = directory(lease_ttl=10.0)
    assert d.receive_lookup("holder", lookup(), 0.0, authority=True).lease == LeaseStatus.GRANTED
    d.receive_announce("old", announce(False), 0.0)
    d.receive_announce("new", announce(False), 15.0)
    d.expire(12.0)
    assert d.lease_holder(D, 12.0) is None
    d.expire(31.0)
    assert set(d.providers(D, 31.0)) == {"new"}
    d.expire(45.0)
    assert d.digests() == []


def test_withdrawal_and_death_forget_the_provider_at_once() -> None:
    d = directory()
    d.set_members(["home", "a", "b"], 0.0)
    d.receive_announce("a", announce(), 0.0)
    d.receive_announce("b", announce(), 0.0)
    d.receive_withdraw("a", Withdraw(D), 1.0)
    assert set(d.providers(D, 1.0)) == {"b"}
    d.set_members(["home", "a"], 2.0)  # b died
    assert d.providers(D, 2.0) == {}


def test_lookups_rank_same_zone_first_then_fewest_uploads_and_skip_the_asker() -> None:
    d = directory()
    d.receive_announce("far-idle", announce(zone="z2", load=0), 0.0)
    d.receive_announce("near-busy", announce(zone="z1", load=5), 0.0)
    d.receive_announce("near-idle", announce(zone="z1", load=1), 0.0)
    d.receive_announce("x", announce(zone="z1", load=0), 0.0)
    reply = d.receive_lookup("x", lookup(zone="z1"), 1.0, authority=True)
    assert [p.member for p in reply.providers] == ["near-idle", "near-busy", "far-idle"]


def test_handing_a_provider_out_counts_as_load_so_a_storm_is_spread() -> None:
    d = directory(max_providers=1)
    for m in "abcd":
        d.receive_announce(m, announce(load=0), 0.0)
    firsts = [d.receive_lookup(f"x{i}", lookup(rid=i), 1.0).providers[0].member for i in range(8)]
    assert Counter(firsts) == {"a": 2, "b": 2, "c": 2, "d": 2}


def test_a_reply_is_capped_and_samples_thousands_of_downloaders() -> None:
    d = directory(max_providers=6)
    for i in range(2000):
        d.receive_announce(f"dl{i}", announce(False), 0.0)
    d.receive_announce("seed", announce(True, load=50), 0.0)
    replies = [d.receive_lookup(f"x{i}", lookup(rid=i), 1.0) for i in range(50)]
    assert all(len(r.providers) == 6 for r in replies)
    # the one complete provider is always offered, whatever the sample
    assert all(any(p.member == "seed" for p in r.providers) for r in replies)
    assert len({p.member for r in replies for p in r.providers}) > 200


# -- fetch leases ----------------------------------------------------------------------------


def test_the_first_asker_of_an_unprovided_digest_gets_the_lease_later_askers_the_holder() -> None:
    d = directory()
    first = d.receive_lookup("a", lookup(), 0.0, authority=True)
    assert first.lease == LeaseStatus.GRANTED and first.lease_holder == "a"
    again = d.receive_lookup("a", lookup(rid=2), 0.01, authority=True)  # hedged duplicate
    assert again.lease == LeaseStatus.GRANTED
    later = d.receive_lookup("b", lookup(), 0.02, authority=True)
    assert later.lease == LeaseStatus.HELD and later.lease_holder == "a"
    assert [p.member for p in later.providers] == ["a"]
    assert not later.providers[0].complete
    assert d.leases_granted == 1


def test_only_the_authority_grants_unless_the_asker_escalates() -> None:
    d = directory()
    reply = d.receive_lookup("a", lookup(), 0.0, authority=False)
    assert reply.lease == LeaseStatus.NONE and not reply.authority
    reply = d.receive_lookup("a", lookup(escalate=True), 0.5, authority=False)
    assert reply.lease == LeaseStatus.GRANTED


def test_authority_follows_membership_the_first_live_home() -> None:
    homes = home_cells(D, MEMBERS)
    first = ProviderDirectory(homes[0], rng=random.Random(0))
    second = ProviderDirectory(homes[1], rng=random.Random(0))
    for d in (first, second):
        d.set_members(MEMBERS, 0.0)
    assert first.receive_lookup("x", lookup(), 0.0).authority
    assert not second.receive_lookup("x", lookup(), 0.0).authority
    second.set_members([m for m in MEMBERS if m != homes[0]], 1.0)
    assert second.receive_lookup("x", lookup(), 1.0).lease == LeaseStatus.GRANTED


def test_the_lease_expires_without_renewal_and_renews_with_lease_announcements() -> None:
    d = directory(lease_ttl=10.0)
    d.receive_lookup("a", lookup(), 0.0, authority=True)
    d.receive_announce("a", announce(False, lease=True), 8.0)
    assert d.receive_lookup("b", lookup(), 15.0, authority=True).lease == LeaseStatus.HELD
    d.expire(18.5)
    assert d.lease_holder(D, 18.5) is None
    reply = d.receive_lookup("b", lookup(), 18.5, authority=True)
    assert reply.lease == LeaseStatus.GRANTED and reply.lease_holder == "b"
    # a still has pieces: b is told about it, to take them rather than re-fetch them
    assert [p.member for p in reply.providers] == ["a"]


def test_the_lease_passes_on_when_its_holder_dies() -> None:
    d = directory()
    d.set_members(["home", "a", "b", "c"], 0.0)
    d.receive_lookup("a", lookup(), 0.0, authority=True)
    d.receive_announce("a", announce(False, lease=True), 0.1)
    d.receive_announce("b", announce(False), 0.2)
    assert d.receive_lookup("c", lookup(), 0.3, authority=True).lease_holder == "a"
    d.set_members(["home", "b", "c"], 1.0)
    reply = d.receive_lookup("c", lookup(), 1.1, authority=True)
    assert reply.lease == LeaseStatus.GRANTED and reply.lease_holder == "c"
    assert [p.member for p in reply.providers] == ["b"]


def test_a_complete_announcement_ends_the_lease() -> None:
    d = directory()
    d.receive_lookup("a", lookup(), 0.0, authority=True)
    d.receive_announce("a", announce(True), 5.0)
    reply = d.receive_lookup("b", lookup(), 5.1, authority=True)
    assert reply.lease == LeaseStatus.COMPLETE and reply.lease_holder == ""
    assert d.lease_holder(D, 5.1) is None


def test_other_homes_learn_the_lease_from_the_holders_announcement() -> None:
    secondary = directory()
    secondary.receive_announce("a", announce(False, lease=True), 0.1)
    reply = secondary.receive_lookup("b", lookup(), 0.2, authority=False)
    assert reply.lease == LeaseStatus.HELD and reply.lease_holder == "a"
    # a second grant that raced does not steal a live lease
    secondary.receive_announce("z", announce(False, lease=True), 0.3)
    assert secondary.lease_holder(D, 0.3) == "a"


def test_a_withdrawal_releases_the_lease() -> None:
    d = directory()
    d.receive_lookup("a", lookup(), 0.0, authority=True)
    d.receive_withdraw("a", Withdraw(D), 1.0)
    assert d.receive_lookup("b", lookup(), 1.1, authority=True).lease == LeaseStatus.GRANTED


# -- the provider's announcements ---------------------------------------------------------------


def test_announcements_go_to_the_homes_progress_is_rate_limited_state_is_not() -> None:
    cfg = PlacementConfig(progress_interval=2.0, ttl=30.0)
    ann = ProviderAnnouncer("me", "z1", config=cfg)
    assert ann.set_members(MEMBERS, 0.0) == []
    sends = ann.update(D, complete=False, pieces=0b1, piece_count=4, now=0.0)
    assert sorted(s.to for s in sends) == sorted(home_cells(D, MEMBERS))
    assert ann.update(D, complete=False, pieces=0b11, piece_count=4, now=1.0) == []
    sends = ann.update(D, complete=False, pieces=0b111, piece_count=4, now=2.5)
    assert len(sends) == 3 and sends[0].message.pieces == 0b111
    sends = ann.update(D, complete=True, pieces=0b1111, piece_count=4, now=2.6)
    assert len(sends) == 3 and sends[0].message.complete
    msg = sends[0].message
    assert isinstance(msg, Announce) and msg.zone == "z1" and msg.ttl == 30.0


def test_tick_refreshes_before_the_ttl_and_reports_load() -> None:
    ann = ProviderAnnouncer("me", "z1", config=PlacementConfig(ttl=30.0))
    ann.set_members(MEMBERS, 0.0)
    ann.update(D, complete=True, pieces=0b1, piece_count=1, now=0.0)
    assert ann.tick(5.0, load=2) == []
    assert ann.next_deadline() == 10.0
    sends = ann.tick(10.0, load=2)
    assert len(sends) == 3 and all(s.message.load == 2 for s in sends)


def test_a_lease_holder_renews_at_a_third_of_the_lease_ttl() -> None:
    ann = ProviderAnnouncer(
        "me", "z1", config=PlacementConfig(lease_ttl=9.0, progress_interval=5.0)
    )
    ann.set_members(MEMBERS, 0.0)
    ann.update(D, complete=False, pieces=0, piece_count=4, now=0.0, lease=True)
    assert ann.next_deadline() == 3.0
    assert all(s.message.lease for s in ann.tick(3.0))


def test_when_a_home_dies_its_replacement_gets_an_announcement_at_once() -> None:
    ann = ProviderAnnouncer("me", "z1")
    ann.set_members(MEMBERS, 0.0)
    held = [digest(i) for i in range(40)]
    for d in held:
        ann.update(d, complete=True, pieces=1, piece_count=1, now=0.0)
    gone = MEMBERS[3]
    rest = [m for m in MEMBERS if m != gone]
    sends = ann.set_members(rest, 1.0)
    moved = [d for d in held if gone in home_cells(d, MEMBERS)]
    assert moved, "the test needs a digest homed on the dead member"
    assert sorted((s.to, s.message.digest) for s in sends) == sorted(
        (m, d) for d in moved for m in home_cells(d, rest) if m not in home_cells(d, MEMBERS)
    )


def test_withdraw_tells_every_home() -> None:
    ann = ProviderAnnouncer("me", "z1")
    ann.set_members(MEMBERS, 0.0)
    ann.update(D, complete=True, pieces=1, piece_count=1, now=0.0)
    sends = ann.withdraw(D, 1.0)
    assert sorted(s.to for s in sends) == sorted(home_cells(D, MEMBERS))
    assert all(s.message == Withdraw(D) for s in sends)
    assert ann.held() == [] and ann.withdraw(D, 2.0) == []


# -- hedged lookups ----------------------------------------------------------------------------


def reply(
    status: LeaseStatus = LeaseStatus.NONE,
    *,
    authority: bool = False,
    providers: tuple = (),
    holder: str = "",
    rid: int = 1,
) -> LookupReply:
    return LookupReply(D, rid, providers, status, holder, 4, authority)


def test_a_lookup_asks_two_homes_then_the_third_after_the_hedge_delay() -> None:
    look = ProviderLookup(D, "z1", ["h1", "h2", "h3"], request_id=1)
    assert [s.to for s in look.start(0.0)] == ["h1", "h2"]
    assert look.poll(0.01) == []
    assert look.next_deadline() == 0.05
    assert [s.to for s in look.poll(0.05)] == ["h3"]
    assert look.next_deadline() == PlacementConfig().lookup_timeout


def test_the_first_reply_with_a_lease_decision_wins() -> None:
    look = ProviderLookup(D, "z1", ["h1", "h2", "h3"], request_id=1)
    look.start(0.0)
    assert look.receive("h9", reply(LeaseStatus.COMPLETE), 0.001) is None  # not asked
    assert look.receive("h1", reply(LeaseStatus.COMPLETE, rid=2), 0.001) is None
    result = look.receive("h2", reply(LeaseStatus.COMPLETE), 0.002)
    assert result is not None and result.lease == LeaseStatus.COMPLETE
    assert look.done and look.poll(1.0) == []


def test_a_bare_list_from_a_non_authority_waits_for_the_authority() -> None:
    from protocol.placement import ProviderInfo

    p = ProviderInfo("peer", "z1", False, 0b1, 0)
    look = ProviderLookup(D, "z1", ["h1", "h2", "h3"], request_id=1)
    look.start(0.0)
    assert look.receive("h2", reply(providers=(p,)), 0.001) is None
    result = look.receive("h1", reply(LeaseStatus.GRANTED, authority=True, holder="me"), 0.002)
    assert result is not None and result.lease == LeaseStatus.GRANTED
    assert [q.member for q in result.providers] == ["peer"]  # merged from h2
    assert result.answered_by == ("h2", "h1")


def test_a_silent_authority_makes_the_lookup_escalate_then_give_up() -> None:
    cfg = PlacementConfig()
    look = ProviderLookup(D, "z1", ["h1", "h2", "h3"], request_id=1, config=cfg)
    look.start(0.0)
    look.poll(cfg.hedge_delay)
    look.receive("h2", reply(), 0.01)
    look.receive("h3", reply(), 0.01)
    sends = look.poll(cfg.lookup_timeout)
    assert sorted(s.to for s in sends) == ["h1", "h2", "h3"]
    assert all(isinstance(s.message, Lookup) and s.message.escalate for s in sends)
    # an escalated grant waits for the other homes (escalate_wait), then stands
    assert look.receive("h3", reply(LeaseStatus.GRANTED, holder="me"), 0.6) is None
    assert look.next_deadline() == cfg.lookup_timeout + cfg.escalate_wait
    look.poll(cfg.lookup_timeout + cfg.escalate_wait)
    assert look.result is not None and look.result.lease == LeaseStatus.GRANTED
    assert look.result.stray_grants == ()

    silent = ProviderLookup(D, "z1", ["h1"], request_id=2, config=cfg)
    silent.start(0.0)
    silent.poll(cfg.lookup_timeout)
    silent.poll(cfg.lookup_give_up)
    assert silent.result is not None and silent.result.lease == LeaseStatus.NONE
    assert silent.result.answered_by == ()


def test_an_escalated_grant_gives_way_to_a_home_that_knows_the_holder() -> None:
    """The authority's reply was lost, not the authority: the asker's escalation is
    granted by a home that never heard of the lease, while another home knows who holds
    it. The holder wins, and the grant is named so that the asker releases it (the
    testbed's storms read a layer from the Hub twice, or stalled, on such grants)."""
    cfg = PlacementConfig()
    look = ProviderLookup(D, "z1", ["h1", "h2", "h3"], request_id=1, config=cfg)
    look.start(0.0)
    look.poll(cfg.lookup_timeout)  # h1's answer is lost: ask everyone, escalated
    assert look.receive("h3", reply(LeaseStatus.GRANTED, holder="me"), 0.501) is None
    result = look.receive("h2", reply(LeaseStatus.HELD, holder="other"), 0.502)
    assert result is not None
    assert (result.lease, result.lease_holder) == (LeaseStatus.HELD, "other")
    assert result.stray_grants == ("h3",)

    # every home answered: the grant stands at once, without waiting
    every = ProviderLookup(D, "z1", ["h1", "h2"], request_id=1, config=cfg)
    every.start(0.0)
    every.poll(cfg.lookup_timeout)
    assert every.receive("h2", reply(), 0.501) is None
    done = every.receive("h1", reply(LeaseStatus.GRANTED, holder="me"), 0.502)
    assert done is not None and done.lease == LeaseStatus.GRANTED


def test_a_lease_only_granted_gives_way_and_a_holder_without_it_loses_it() -> None:
    """A grant whose reply was lost leaves a lease with a cell that never reads: the
    cell that does read (it announces lease=True) takes it over, and the granted cell's
    announcement without the lease (it downloads from peers) ends it."""
    cfg = PlacementConfig()
    home = ProviderDirectory("h1", rng=random.Random(0), config=cfg)
    ask = Lookup(D, "z1", 1)
    assert home.receive_lookup("a", ask, 0.0, authority=True).lease == LeaseStatus.GRANTED
    home.receive_announce("b", announce(False, lease=True), 0.1)
    assert home.lease_holder(D, 0.1) == "b"
    # b confirmed: a later grant elsewhere (a's announcement with the lease) does not move it
    home.receive_announce("a", announce(False, lease=True), 0.2)
    assert home.lease_holder(D, 0.2) == "b"

    other = ProviderDirectory("h1", rng=random.Random(0), config=cfg)
    assert other.receive_lookup("a", ask, 0.0, authority=True).lease == LeaseStatus.GRANTED
    # an announcement a sent before its lookup may arrive after the grant: kept
    other.receive_announce("a", announce(False), 0.01)
    assert other.lease_holder(D, 0.01) == "a"
    # later, a announces that it downloads without the lease: the lease is free again
    other.receive_announce("a", announce(False), 1.0)
    assert other.lease_holder(D, 1.0) is None
    assert other.receive_lookup("c", ask, 1.1, authority=True).lease == LeaseStatus.GRANTED


def test_racing_askers_hedging_to_all_homes_get_one_lease() -> None:
    homes = home_cells(D, MEMBERS)
    dirs = {h: ProviderDirectory(h, rng=random.Random(0)) for h in homes}
    for d in dirs.values():
        d.set_members(MEMBERS, 0.0)
    statuses = []
    for i, asker in enumerate(["cell-010", "cell-011", "cell-012"]):
        for h in homes[::-1] if i % 2 else homes:
            statuses.append(dirs[h].receive_lookup(asker, lookup(rid=i), 0.0).lease)
    assert statuses.count(LeaseStatus.GRANTED) == 1
