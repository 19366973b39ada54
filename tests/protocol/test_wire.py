"""The wire: every message type round-trips, and nothing a peer sends makes decode raise."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import placement, swarm, wire
from protocol.placement import Announce, LeaseStatus, Lookup, LookupReply, ProviderInfo, Withdraw
from protocol.swarm import HaveQuery, HaveReply, PieceCancel, PieceReply, PieceRequest, PieceStatus
from protocol.wire import (
    Ack,
    Alive,
    Codec,
    Dead,
    Decoded,
    DecodeError,
    EncodeError,
    Gossip,
    MemberState,
    Nack,
    Ping,
    PingReq,
    PushPull,
    Reason,
    ReplayWindow,
    Status,
    Suspect,
    decode,
    encode,
)
from simulations.fuzz_wire import fuzz

KEY = bytes(range(32))
NOW = 1_700_000_000.0

names = st.text(min_size=1, max_size=12)
u32 = st.integers(0, 2**32 - 1)
digests = st.one_of(
    st.binary(min_size=32, max_size=32).map(lambda b: "sha256:" + b.hex()),
    st.text(max_size=60),
)
seconds = st.floats(min_value=0, max_value=1e9, allow_nan=False, allow_infinity=False)
updates = st.lists(
    st.one_of(
        st.builds(Alive, names, u32, names, names),
        st.builds(Suspect, names, u32, names),
        st.builds(Dead, names, u32, names),
    ),
    max_size=6,
).map(tuple)
states = st.lists(
    st.builds(MemberState, names, u32, names, names, st.sampled_from(Status)), max_size=6
).map(tuple)
bitmaps = st.integers(0, 2**768 - 1)  # a 3 GB layer in 4 MiB pieces
providers = st.lists(
    st.builds(ProviderInfo, names, names, st.booleans(), st.integers(0, 2**64), u32),
    max_size=4,
).map(tuple)

MESSAGES = {
    Ping: st.builds(Ping, u32, names, updates),
    Ack: st.builds(Ack, u32, updates),
    Nack: st.builds(Nack, u32, updates),
    PingReq: st.builds(PingReq, u32, names, names, st.booleans(), updates),
    Gossip: st.builds(Gossip, updates),
    PushPull: st.builds(
        PushPull,
        u32,
        st.booleans(),
        st.booleans(),
        st.integers(0, 65535),
        st.integers(0, 65535),
        states,
    ),
    Announce: st.builds(
        Announce, digests, names, st.booleans(), bitmaps, u32, u32, seconds, st.booleans()
    ),
    Withdraw: st.builds(Withdraw, digests),
    Lookup: st.builds(Lookup, digests, names, u32, st.booleans()),
    LookupReply: st.builds(
        LookupReply,
        digests,
        u32,
        providers,
        st.sampled_from(LeaseStatus),
        st.text(max_size=12),
        u32,
        st.booleans(),
    ),
    PieceRequest: st.builds(PieceRequest, digests, u32),
    PieceReply: st.builds(
        PieceReply, digests, u32, st.sampled_from(PieceStatus), bitmaps, st.booleans()
    ),
    PieceCancel: st.builds(PieceCancel, digests, u32),
    HaveQuery: st.builds(HaveQuery, digests, bitmaps),
    HaveReply: st.builds(HaveReply, digests, bitmaps, st.booleans()),
}
any_message = st.one_of(*MESSAGES.values())


def test_every_registered_message_type_has_a_strategy_here() -> None:
    assert set(wire.message_types().values()) == set(MESSAGES)


@settings(max_examples=300)
@given(msg=any_message, sender=names, seq=st.integers(0, 2**64 - 1))
def test_every_message_type_round_trips(msg: wire.Message, sender: str, seq: int) -> None:
    data = encode(msg, key=KEY, sender=sender, seq=seq, now=NOW)
    assert len(data) <= wire.MAX_DATAGRAM
    assert wire.overhead(sender) + wire.body_size(msg) == len(data)
    out = decode(data, key=KEY, now=NOW, replay=ReplayWindow())
    assert out == Decoded(msg, sender, seq, NOW)


@settings(max_examples=500)
@given(data=st.binary(max_size=1600))
def test_arbitrary_bytes_decode_to_an_error_value(data: bytes) -> None:
    out = decode(data, key=KEY, now=NOW, replay=ReplayWindow())
    assert isinstance(out, DecodeError)


@settings(max_examples=300)
@given(msg=any_message, data=st.data())
def test_truncations_and_bit_flips_are_caught_by_the_mac(msg: wire.Message, data) -> None:
    good = encode(msg, key=KEY, sender="cell-a", seq=1, now=NOW)
    cut = data.draw(st.integers(0, len(good) - 1))
    assert isinstance(decode(good[:cut], key=KEY, now=NOW, replay=None), DecodeError)
    bit = data.draw(st.integers(0, 8 * len(good) - 1))
    flipped = bytearray(good)
    flipped[bit // 8] ^= 1 << (bit % 8)
    out = decode(bytes(flipped), key=KEY, now=NOW, replay=None)
    assert isinstance(out, DecodeError)
    assert out.reason in (Reason.BAD_MAC, Reason.BAD_VERSION)


@settings(max_examples=300)
@given(body=st.binary(max_size=300), type_byte=st.integers(0, 255))
def test_validly_signed_garbage_is_malformed_or_unknown_never_an_exception(
    body: bytes, type_byte: int
) -> None:
    # What a buggy (or newer) cell holding the key could send: a good MAC over nonsense.
    head = wire._HEADER.pack(wire.VERSION, type_byte, 5, NOW) + b"\x06cell-x"
    unsigned = head + body
    data = unsigned + wire.blake3.blake3(unsigned, key=wire._mac_key(KEY)).digest(16)
    out = decode(data, key=KEY, now=NOW, replay=None)
    if isinstance(out, Decoded):  # the random body happened to be a valid message
        assert encode(out.msg, key=KEY, sender="cell-x", seq=5, now=NOW) == data
    else:
        assert out.reason in (Reason.MALFORMED, Reason.UNKNOWN_TYPE, Reason.OVERSIZED)


def test_each_reason_is_reported() -> None:
    good = encode(Ping(1, "b"), key=KEY, sender="a", seq=1, now=NOW)

    def reason(data: bytes, **kw: object) -> Reason:
        args = {"key": KEY, "now": NOW, "replay": None} | kw
        out = decode(data, **args)  # type: ignore[arg-type]
        assert isinstance(out, DecodeError)
        return out.reason

    assert reason(good[:10]) is Reason.TRUNCATED
    assert reason(good + bytes(1400)) is Reason.OVERSIZED
    assert reason(bytes([wire.VERSION + 1]) + good[1:]) is Reason.BAD_VERSION
    # version 1 counted pieces of 2 MiB: its have bitmaps mean other bytes
    assert reason(b"\x01" + good[1:]) is Reason.BAD_VERSION
    assert reason(good, key=bytes(32)) is Reason.BAD_MAC
    assert reason(good[:-1] + bytes([good[-1] ^ 1])) is Reason.BAD_MAC
    assert reason(good, now=NOW + 31, replay=ReplayWindow()) is Reason.STALE
    assert reason(good, now=NOW - 31, replay=ReplayWindow()) is Reason.STALE
    window = ReplayWindow()
    assert isinstance(decode(good, key=KEY, now=NOW, replay=window), Decoded)
    assert reason(good, replay=window) is Reason.REPLAYED
    unknown = wire._HEADER.pack(wire.VERSION, 0xEE, 1, NOW) + b"\x01a"
    signed = unknown + wire.blake3.blake3(unknown, key=wire._mac_key(KEY)).digest(16)
    assert reason(signed) is Reason.UNKNOWN_TYPE
    trailing = good[:-16] + b"\x00"
    signed = trailing + wire.blake3.blake3(trailing, key=wire._mac_key(KEY)).digest(16)
    assert reason(signed) is Reason.MALFORMED


def test_replay_window_accepts_reordering_and_rejects_repeats_and_the_too_old() -> None:
    w = ReplayWindow(window=64, max_skew=30)
    for seq in (10, 12, 11, 9, 100):
        assert w.accept("a", seq, NOW, NOW) is None
    assert w.accept("a", 11, NOW, NOW) is Reason.REPLAYED
    assert w.accept("a", 100, NOW, NOW) is Reason.REPLAYED
    assert w.accept("a", 36, NOW, NOW) is Reason.REPLAYED  # 64 below the highest: too old
    assert w.accept("a", 37, NOW, NOW) is None
    assert w.accept("b", 11, NOW, NOW) is None  # counters are per sender
    assert w.accept("a", 101, math.nan, NOW) is Reason.STALE


def test_replay_window_forgets_silent_senders_without_letting_replays_through() -> None:
    w = ReplayWindow(max_skew=30)
    for i in range(1000):
        assert w.accept(f"cell-{i}", 1, NOW, NOW) is None
    assert len(w) == 1000
    assert w.accept("cell-0", 1, NOW, NOW + 61) is Reason.STALE  # old news is stale...
    assert w.accept("late", 1, NOW + 61, NOW + 61) is None
    assert len(w) == 1  # ...so the others were safe to forget


def test_codec_counts_what_it_drops_and_a_restarted_sender_is_accepted() -> None:
    a = Codec(KEY, "a", now=NOW)
    b = Codec(KEY, "b", now=NOW)
    first = a.seal(Ping(1, "b"), NOW)
    assert isinstance(b.open(first, NOW), Decoded)
    assert b.open(first, NOW + 1) == DecodeError(Reason.REPLAYED, b.open(first, NOW).detail)
    assert isinstance(b.open(Codec(bytes(32), "a", now=NOW).seal(Ack(1), NOW), NOW), DecodeError)
    assert b.errors == {Reason.REPLAYED: 2, Reason.BAD_MAC: 1}
    reborn = Codec(KEY, "a", now=NOW + 5)  # counter restarts from the clock, above the old
    assert isinstance(b.open(reborn.seal(Ping(2, "b"), NOW + 5), NOW + 5), Decoded)


def test_encoding_refuses_what_does_not_fit_or_is_out_of_range() -> None:
    big = Gossip(tuple(Alive(f"node-{i}", i, "10.0.0.1:7946", "z") for i in range(60)))
    with pytest.raises(EncodeError):
        encode(big, key=KEY, sender="a", seq=1, now=NOW)
    assert wire.room(Gossip(()), "a") < sum(wire.record_size(u) for u in big.updates)
    for bad in (
        Ping(-1, "b"),
        Ping(2**32, "b"),
        Alive("x" * 256, 0, "", ""),
        Lookup("d", "z", 1.5),  # type: ignore[arg-type]
        HaveQuery("d", -1),
    ):
        msg = Gossip((bad,)) if isinstance(bad, Alive) else bad
        with pytest.raises(EncodeError):
            encode(msg, key=KEY, sender="a", seq=1, now=NOW)
    with pytest.raises(EncodeError):
        encode(Announce("d", "z", True, 1, 1, 0, math.inf), key=KEY, sender="a", seq=1, now=NOW)


def test_the_placement_and_swarm_messages_are_the_ones_their_modules_use() -> None:
    for cls in (*wire.PLACEMENT_MESSAGES, *wire.SWARM_MESSAGES):
        assert cls in wire.message_types().values()
    assert (
        placement.Announce,
        placement.Withdraw,
        placement.Lookup,
        placement.LookupReply,
    ) == wire.PLACEMENT_MESSAGES
    assert swarm.PieceReply in wire.SWARM_MESSAGES
    # a full bitmap of a 3 GB layer in 4 MiB pieces costs 2 + 96 bytes
    assert wire.body_size(HaveQuery("sha256:" + "00" * 32, 2**768 - 1)) == 33 + 98


def test_sha256_digests_travel_as_32_raw_bytes() -> None:
    d = "sha256:" + "ab" * 32
    assert wire.body_size(Withdraw(d)) == 33
    assert wire.body_size(Withdraw("sha512:" + "ab" * 64)) == 2 + len("sha512:") + 128
    assert wire.body_size(Withdraw(d.upper())) > 33  # not canonical: sent as text, unchanged


def test_a_message_type_is_added_with_a_dataclass_and_a_decorator() -> None:
    @wire.message(0x7F, digest=wire.DIGEST, count=wire.U16)
    @dataclasses.dataclass(frozen=True)
    class Probe:
        digest: str
        count: int

    try:
        msg = Probe("sha256:" + "00" * 32, 7)
        data = encode(msg, key=KEY, sender="a", seq=1, now=NOW)  # type: ignore[arg-type]
        assert decode(data, key=KEY, now=NOW, replay=None).msg == msg  # type: ignore[union-attr]
    finally:
        del wire._MESSAGES[0x7F], wire._TYPE_OF[Probe]


def test_a_short_fuzz_run_of_the_decoder_finds_nothing() -> None:
    report = fuzz(iterations=3000, seed=11)
    assert report.exceptions == 0
    assert report.decoded_mutants == 0  # no mutant of a signed datagram got through
    assert report.reasons[Reason.BAD_MAC] > 0
