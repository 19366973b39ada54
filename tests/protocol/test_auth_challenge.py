"""WWW-Authenticate challenges and the token request they ask for (protocol.auth)."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.auth import Challenge, parse_www_authenticate, token_query
from protocol.manifest import UPSTREAM_ACCEPT
from tests.support.auth import AuthHub, htpasswd_registry, token_registry
from tests.support.images import make_image

HUB = 'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull"'


def test_docker_hub_challenge() -> None:
    assert parse_www_authenticate(HUB) == [
        Challenge(
            "bearer",
            {
                "realm": "https://auth.docker.io/token",
                "service": "registry.docker.io",
                "scope": "repository:library/alpine:pull",
            },
        )
    ]


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ('Basic realm="registry"', [Challenge("basic", {"realm": "registry"})]),
        ("BASIC Realm=registry", [Challenge("basic", {"realm": "registry"})]),
        ("Basic", [Challenge("basic")]),
        ('Bearer realm = "a" , service= b', [Challenge("bearer", {"realm": "a", "service": "b"})]),
        (
            'Bearer realm="a,b", scope="repository:x:pull,push"',
            [Challenge("bearer", {"realm": "a,b", "scope": "repository:x:pull,push"})],
        ),
        (r'Basic realm="say \"hi\" \\ bye"', [Challenge("basic", {"realm": r'say "hi" \ bye'})]),
        ('Basic realm=""', [Challenge("basic", {"realm": ""})]),
        (
            'Bearer realm="https://t/token",service="s", Basic realm="b"',
            [
                Challenge("bearer", {"realm": "https://t/token", "service": "s"}),
                Challenge("basic", {"realm": "b"}),
            ],
        ),
        (
            'Newauth realm="apps", type=1, title="Login to \\"apps\\"", Basic realm="simple"',
            [
                Challenge("newauth", {"realm": "apps", "type": "1", "title": 'Login to "apps"'}),
                Challenge("basic", {"realm": "simple"}),
            ],
        ),
        (
            "Negotiate dG9rZW4=, Basic realm=x",
            [Challenge("negotiate", token68="dG9rZW4="), Challenge("basic", {"realm": "x"})],
        ),
        ("Basic realm=a, realm=b", [Challenge("basic", {"realm": "a"})]),  # first one kept
        (", , Basic realm=a,, ", [Challenge("basic", {"realm": "a"})]),
        ('Basic realm="unterminated', [Challenge("basic")]),
        ('Bearer realm="a", service="b', [Challenge("bearer", {"realm": "a"})]),
        ("Basic realm=", [Challenge("basic", token68="realm=")]),  # a token68, per the ABNF
        ("Bearer realm=a junk, Basic", [Challenge("bearer", {"realm": "a"}), Challenge("basic")]),
        ("", []),
        ("   ", []),
        ('=,=,""', []),
        ("\x00\x01", []),
    ],
)
def test_parse_www_authenticate(header: str, expected: list[Challenge]) -> None:
    assert parse_www_authenticate(header) == expected


def test_bytes_are_accepted_as_latin1() -> None:
    assert parse_www_authenticate(b'Basic realm="r\xe9"') == [Challenge("basic", {"realm": "ré"})]


def test_params_are_read_only() -> None:
    (challenge,) = parse_www_authenticate("Basic realm=a")
    with pytest.raises(TypeError):
        challenge.params["realm"] = "b"  # type: ignore[index]
    assert hash(challenge) == hash(Challenge("basic", {"realm": "a"}))


def test_token_query() -> None:
    (challenge,) = parse_www_authenticate(HUB)
    assert token_query(challenge, "repository:library/alpine:pull") == (
        "https://auth.docker.io/token",
        [("service", "registry.docker.io"), ("scope", "repository:library/alpine:pull")],
    )
    assert token_query(challenge, "repository:library/busybox:pull")[1] == [
        ("service", "registry.docker.io"),
        ("scope", "repository:library/busybox:pull"),
        ("scope", "repository:library/alpine:pull"),
    ]
    assert token_query(challenge, None)[1][1] == ("scope", "repository:library/alpine:pull")
    bare = Challenge("bearer", {"realm": "http://127.0.0.1:1/token"})
    assert token_query(bare, None) == ("http://127.0.0.1:1/token", [])


@pytest.mark.parametrize("realm", [None, "", "file:///etc/passwd", "/token", "ftp://x/token"])
def test_token_query_needs_an_http_realm(realm: str | None) -> None:
    params = {} if realm is None else {"realm": realm}
    with pytest.raises(ValueError):
        token_query(Challenge("bearer", params), None)


@pytest.mark.parametrize(
    "header",
    [
        'Basic realm=a x"' + '\\"' * 5000,
        'a="' + '\\"' * 5000,
        "x, a=" + '"\\' * 5000,
        "Bearer " + "a=b," * 5000,
        "a " * 5000,
        '"' * 10_000,
        "Negotiate " + "a" * 10_000 + "==" + "=" * 5000 + "x",
    ],
    ids=range(7),
)
def test_hostile_headers_take_linear_time(header: str) -> None:
    start = time.perf_counter()
    parse_www_authenticate(header)
    assert time.perf_counter() - start < 0.1


# --- properties -----------------------------------------------------------------------


@given(st.text(max_size=300))
def test_never_raises_on_text(header: str) -> None:
    for challenge in parse_www_authenticate(header):
        assert challenge.scheme == challenge.scheme.lower() and challenge.scheme


@given(st.text(alphabet='Bb ea=r,"\\\trealm', max_size=80))
def test_never_raises_on_near_misses(header: str) -> None:
    parse_www_authenticate(header)


TOKEN = st.text("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789-._~!#$%&'*+^`|", min_size=1, max_size=8)
VALUE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=20)


def quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@given(
    st.lists(
        st.tuples(TOKEN, st.dictionaries(TOKEN.map(str.lower), VALUE, max_size=4)),
        max_size=3,
    )
)
def test_serialized_challenges_round_trip(challenges: list[tuple[str, dict[str, str]]]) -> None:
    header = ", ".join(
        scheme
        + ("" if not params else " " + ", ".join(f"{k}={quote(v)}" for k, v in params.items()))
        for scheme, params in challenges
    )
    assert parse_www_authenticate(header) == [Challenge(s.lower(), p) for s, p in challenges]


# --- against the real docker-registry ------------------------------------------------


@pytest.fixture
def token_hub(tmp_path: Path) -> Iterator[AuthHub]:
    hub = token_registry(tmp_path / "token-hub", {"alice": "alice-" + secrets.token_hex(8)})
    yield hub
    hub.stop()


def test_token_flow_against_docker_registry(token_hub: AuthHub) -> None:
    """Anonymous pull of a public image: 401, challenge, token, retry, 200."""
    image = make_image((64,))
    token_hub.push("public/app", "v1", image)
    path = "/v2/public/app/manifests/v1"
    with httpx.Client(base_url=token_hub.url, timeout=10) as client:
        r = client.get(path)
        assert r.status_code == 401
        (challenge,) = parse_www_authenticate(r.headers["www-authenticate"])
        assert challenge.scheme == "bearer"
        assert challenge.params["scope"] == "repository:public/app:pull"
        realm, query = token_query(challenge, "repository:public/app:pull")
        token = client.get(realm, params=query).json()["token"]
        headers = {"Authorization": f"Bearer {token}", "Accept": UPSTREAM_ACCEPT}
        r = client.get(path, headers=headers)
        assert r.status_code == 200
        assert r.headers["docker-content-digest"] == image.digest


def test_basic_challenge_from_docker_registry(tmp_path: Path) -> None:
    hub = htpasswd_registry(tmp_path / "basic-hub", {"bob": "bob-" + secrets.token_hex(8)})
    try:
        r = httpx.get(hub.url + "/v2/", timeout=10)
        assert r.status_code == 401
        assert parse_www_authenticate(r.headers["www-authenticate"]) == [
            Challenge("basic", {"realm": "celld-test-basic"})
        ]
    finally:
        hub.stop()
