"""Peer-API request MACs: a signed request passes once, and any change, delay or replay fails."""

from __future__ import annotations

import blake3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import auth, peerauth, wire
from protocol.peerauth import Authenticated, Reason, Rejected, Verifier, peer_key, sign

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
NOW = 1_700_000_000.0
TARGET = b"/v2/blobs/sha256:" + b"a" * 64 + b"/pieces/3"

names = st.text(min_size=1, max_size=40).filter(lambda s: len(peerauth.quote(s, safe="")) <= 255)
methods = st.sampled_from([b"GET", b"HEAD", b"POST", b"DELETE"])
targets = st.binary(min_size=1, max_size=200).map(lambda b: b"/" + b.hex().encode())
nonces = st.binary(min_size=16, max_size=16)


def signed(cell: str = "cell-a", method: bytes = b"GET", target: bytes = TARGET,
           now: float = NOW, nonce: bytes = b"\x01" * 16, key: bytes = KEY):  # fmt: skip
    return sign(key, cell, method, target, now, nonce)


def lower(headers):
    return [(k.lower(), v) for k, v in headers]


@settings(max_examples=200)
@given(cell=names, method=methods, target=targets, nonce=nonces,
       skew=st.floats(-29.9, 29.9))  # fmt: skip
def test_a_signed_request_passes_once(cell, method, target, nonce, skew):
    v = Verifier(KEY)
    headers = lower(sign(KEY, cell, method, target, NOW + skew, nonce))
    assert v.verify(method, target, headers, NOW) == Authenticated(cell)
    assert v.verify(method, target, headers, NOW) == Rejected(Reason.REPLAYED)


@settings(max_examples=200)
@given(cell=names, method=methods, target=targets, nonce=nonces, data=st.data())
def test_any_changed_field_fails_the_mac(cell, method, target, nonce, data):
    headers = lower(sign(KEY, cell, method, target, NOW, nonce))
    which = data.draw(st.sampled_from(["method", "target", "cell", "time", "nonce", "mac"]))
    if which == "method":
        method = method + b"X"
    elif which == "target":
        target = target + data.draw(st.sampled_from([b"/", b"?a=1", b"0"]))
    else:
        name = {"cell": peerauth.CELL, "time": peerauth.TIME, "nonce": peerauth.NONCE,
                "mac": peerauth.MAC}[which]  # fmt: skip
        value = dict(headers)[name]
        flipped = value[:-1] + (b"1" if value[-1:] != b"1" else b"2")
        headers = [(k, flipped if k == name else v) for k, v in headers]
    assert Verifier(KEY).verify(method, target, headers, NOW) == Rejected(Reason.BAD_MAC)


@settings(max_examples=300)
@given(headers=st.lists(st.tuples(st.sampled_from([peerauth.CELL, peerauth.TIME, peerauth.NONCE,
       peerauth.MAC, b"other"]), st.binary(max_size=80)), max_size=6),
       method=st.binary(max_size=10), target=st.binary(max_size=100))  # fmt: skip
def test_garbage_never_raises_nor_passes(headers, method, target):
    out = Verifier(KEY).verify(method, target, headers, NOW)
    assert isinstance(out, Rejected)


def test_the_wrong_key_fails():
    assert Verifier(OTHER_KEY).verify(b"GET", TARGET, lower(signed()), NOW) == Rejected(
        Reason.BAD_MAC
    )


def test_old_and_future_times_are_stale():
    v = Verifier(KEY, max_skew=30)
    assert v.verify(b"GET", TARGET, lower(signed(now=NOW - 31)), NOW) == Rejected(Reason.STALE)
    assert v.verify(b"GET", TARGET, lower(signed(now=NOW + 31)), NOW) == Rejected(Reason.STALE)
    assert v.verify(b"GET", TARGET, lower(signed(now=NOW - 29)), NOW) == Authenticated("cell-a")


def test_a_replay_later_in_the_window_and_after_it_fails():
    v = Verifier(KEY)
    headers = lower(signed())
    assert isinstance(v.verify(b"GET", TARGET, headers, NOW), Authenticated)
    assert v.verify(b"GET", TARGET, headers, NOW + 20) == Rejected(Reason.REPLAYED)
    assert v.verify(b"GET", TARGET, headers, NOW + 40) == Rejected(Reason.STALE)
    # the nonce is forgotten by now; a clock that steps back does not reopen the window
    assert v.verify(b"GET", TARGET, headers, NOW + 5) == Rejected(Reason.REPLAYED)
    assert len(v) == 0


def test_missing_and_repeated_headers():
    headers = lower(signed())
    for drop in (peerauth.CELL, peerauth.TIME, peerauth.NONCE, peerauth.MAC):
        partial = [(k, v) for k, v in headers if k != drop]
        assert Verifier(KEY).verify(b"GET", TARGET, partial, NOW) == Rejected(Reason.MISSING)
    twice = [*headers, (peerauth.MAC, dict(headers)[peerauth.MAC])]
    assert Verifier(KEY).verify(b"GET", TARGET, twice, NOW) == Rejected(Reason.MISSING)
    assert Verifier(KEY).verify(b"GET", TARGET, [], NOW) == Rejected(Reason.MISSING)


def test_header_names_are_case_blind_and_names_round_trip():
    v = Verifier(KEY)
    headers = signed(cell="rack 1/cell ä")  # as sent: Celld-Cell ...
    assert v.verify(b"GET", TARGET, headers, NOW) == Authenticated("rack 1/cell ä")


def test_malformed_values():
    headers = dict(lower(signed()))
    for name, bad in ((peerauth.TIME, b"1e9"), (peerauth.TIME, b"-5"), (peerauth.NONCE, b"zz"),
                      (peerauth.MAC, b"ab"), (peerauth.CELL, b"")):  # fmt: skip
        changed = [(k, bad if k == name else v) for k, v in headers.items()]
        assert Verifier(KEY).verify(b"GET", TARGET, changed, NOW) == Rejected(Reason.MALFORMED)


def test_a_full_cache_forgets_the_oldest_and_refuses_what_it_cannot_judge():
    v = Verifier(KEY, max_nonces=3)
    sent = [lower(signed(now=NOW + i, nonce=bytes([i]) * 16)) for i in range(4)]
    for i, headers in enumerate(sent):
        assert isinstance(v.verify(b"GET", TARGET, headers, NOW + i), Authenticated)
    assert len(v) == 3 and v.floor == NOW
    # the forgotten nonce cannot be replayed: its time is at the floor
    assert v.verify(b"GET", TARGET, sent[0], NOW + 4) == Rejected(Reason.REPLAYED)
    assert v.verify(b"GET", TARGET, sent[3], NOW + 4) == Rejected(Reason.REPLAYED)
    fresh = lower(signed(now=NOW + 4, nonce=b"\x09" * 16))
    assert isinstance(v.verify(b"GET", TARGET, fresh, NOW + 4), Authenticated)


def test_the_key_is_its_own():
    """Distinct from the datagram MAC key and the pull-token key of the same cluster key."""
    key = peer_key(KEY)
    assert key == blake3.blake3(KEY, derive_key_context="celld peer v1 mac").digest()
    assert key != wire._mac_key(KEY)
    assert key != KEY  # pull tokens are keyed by the cluster key itself
    token = auth.mint_pull_token(KEY, "app", "sha256:" + "b" * 64)
    assert token.rsplit(".", 1)[1] not in str(signed())


def test_sign_refuses_bad_input():
    with pytest.raises(ValueError):
        sign(KEY, "a", b"GET", b"/", NOW, b"short")
    with pytest.raises(ValueError):
        sign(KEY, "", b"GET", b"/", NOW, b"\x00" * 16)
    with pytest.raises(ValueError):
        sign(KEY, "a", b"GET", b"/", float("nan"), b"\x00" * 16)
    with pytest.raises(ValueError):
        sign(b"short", "a", b"GET", b"/", NOW, b"\x00" * 16)
