"""Pull tokens: any cell verifies them with the cluster key alone; nothing else passes."""

from __future__ import annotations

import base64
import json
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.auth import (
    ANONYMOUS_TOKEN,
    BASIC_CHALLENGE,
    TOKEN_PATH,
    Challenge,
    PullGrant,
    bearer_challenge,
    mint_pull_token,
    parse_www_authenticate,
    token_answer,
    token_from_authorization,
    token_query,
    verify_pull_token,
)
from protocol.errors import OCIError

KEY = bytes(range(32))
DIGEST = "sha256:" + "ab" * 32


def test_round_trip():
    token = mint_pull_token(KEY, "shop-prod", DIGEST)
    assert verify_pull_token(KEY, token) == PullGrant("shop-prod", DIGEST)


def test_other_key_other_scope_other_digest_fail():
    token = mint_pull_token(KEY, "shop-prod", DIGEST)
    assert verify_pull_token(os.urandom(32), token) is None
    other_scope = mint_pull_token(KEY, "billing", DIGEST)
    # Splicing one app's MAC onto another app's scope opens nothing.
    prefix, scope, hex_, _ = token.split(".")
    spliced = ".".join([prefix, other_scope.split(".")[1], hex_, token.split(".")[3]])
    assert verify_pull_token(KEY, spliced) is None
    forged_digest = ".".join([prefix, scope, "cd" * 32, token.split(".")[3]])
    assert verify_pull_token(KEY, forged_digest) is None


@given(st.integers(min_value=0, max_value=200), st.integers(min_value=1, max_value=255))
def test_any_altered_byte_fails(position, flip):
    token = mint_pull_token(KEY, "shop-prod", DIGEST)
    i = position % len(token)
    altered = token[:i] + chr(ord(token[i]) ^ flip) + token[i + 1 :]
    if altered != token:
        assert verify_pull_token(KEY, altered) is None


@given(st.text(max_size=600))
def test_garbage_never_raises(text):
    assert verify_pull_token(KEY, text) is None


@given(st.binary(max_size=300))
def test_authorization_garbage_never_raises(data):
    token_from_authorization(data)


def test_authorization_forms():
    token = mint_pull_token(KEY, "shop-prod", DIGEST)
    basic = base64.b64encode(f"anyone:{token}".encode())
    assert token_from_authorization(b"Basic " + basic) == token
    assert token_from_authorization(f"Bearer {token}") == token
    assert token_from_authorization(b"Basic !!!") is None
    assert token_from_authorization(b"Digest x") is None
    assert token_from_authorization(None) is None


# -- the challenges and the token endpoint's answer ------------------------------------


def test_the_base_challenge_names_the_token_endpoint_on_the_clients_host():
    (challenge,) = parse_www_authenticate(bearer_challenge(b"127.0.0.1:5050"))
    assert challenge.scheme == "bearer"
    realm, query = token_query(challenge, "repository:acme/app:pull")
    assert realm == "http://127.0.0.1:5050" + TOKEN_PATH
    assert query == [("service", "celld"), ("scope", "repository:acme/app:pull")]
    assert "[::1]:5050" in bearer_challenge("[0:0::1]:5050")


@pytest.mark.parametrize("host", [None, b"", b'evil"host', b"a b", b"h/x", b"host:0"])
def test_a_bad_host_header_is_a_bad_request_not_a_realm(host):
    with pytest.raises(OCIError) as err:
        bearer_challenge(host)
    assert err.value.status == 400


def test_token_answer_carries_both_names_and_a_lifetime():
    body = json.loads(token_answer(ANONYMOUS_TOKEN))
    assert body["token"] == body["access_token"] == ANONYMOUS_TOKEN
    assert body["expires_in"] >= 60  # clients treat less as 60 anyway
    assert verify_pull_token(KEY, ANONYMOUS_TOKEN) is None
    (challenge,) = parse_www_authenticate(BASIC_CHALLENGE)
    assert challenge == Challenge("basic", {"realm": "celld"})
