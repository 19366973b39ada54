"""The OCI grammar for names, tags, digests and `ns` hosts (protocol.reference)."""

from __future__ import annotations

import contextlib
import hashlib
import time

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.errors import OCIError
from protocol.reference import (
    Digest,
    parse_digest,
    parse_image,
    parse_name,
    parse_ns,
    parse_reference,
    parse_tag,
)
from tests.support.registry import Registry

SHA256 = "sha256:" + hashlib.sha256(b"x").hexdigest()
SHA512 = "sha512:" + hashlib.sha512(b"x").hexdigest()

VALID_NAMES = [
    "a",
    "library/alpine",
    "a.b_c__d-e---f/g0/h1",
    "0/1/2",
    "manifests/blobs/uploads",
    "/".join(["abc"] * 63) + "/abc",  # 255 characters
]
INVALID_NAMES = [
    "",
    "A",
    "Library/alpine",
    "-a",
    "a-",
    "a..b",
    "a.-b",
    "a___b",
    "a//b",
    "/a",
    "a/",
    "a/./b",
    "a/../b",
    "..",
    "a%2fb",
    "a b",
    "a\nb",
    "a\x00",
    "ä",
    "a:b",
    "a@b",
    "a" * 256,
]


@pytest.mark.parametrize("name", VALID_NAMES)
def test_valid_names_parse_unchanged(name: str) -> None:
    assert parse_name(name) == name


@pytest.mark.parametrize("name", INVALID_NAMES)
def test_invalid_names_are_name_invalid(name: str) -> None:
    with pytest.raises(OCIError) as err:
        parse_name(name)
    assert (err.value.code, err.value.status) == ("NAME_INVALID", 400)


def test_name_length_limit_is_255() -> None:
    parse_name("a" * 255)
    with pytest.raises(OCIError):
        parse_name("a" * 256)


@pytest.mark.parametrize("tag", ["latest", "v1.2.3", "_x", "A-b_c.D", "9", "a" * 128])
def test_valid_tags(tag: str) -> None:
    assert parse_tag(tag) == tag


@pytest.mark.parametrize("tag", ["", ".a", "-a", "a:b", "a/b", "a%20", "a" * 129, "ä", "a\n"])
def test_invalid_tags_are_tag_invalid(tag: str) -> None:
    with pytest.raises(OCIError) as err:
        parse_tag(tag)
    assert (err.value.code, err.value.status) == ("TAG_INVALID", 400)


def test_digests_of_both_algorithms_round_trip() -> None:
    for text in (SHA256, SHA512):
        digest = parse_digest(text)
        assert str(digest) == text
        assert digest == Digest(*text.split(":"))


def test_digest_of_bytes_matches_hashlib() -> None:
    assert str(Digest.of(b"x")) == SHA256
    assert str(Digest.of(b"x", "sha512")) == SHA512


@pytest.mark.parametrize(
    "text",
    [
        "",
        "sha256",
        "sha256:",
        ":" + "a" * 64,
        SHA256.upper(),
        "sha256:" + "A" * 64,  # the spec wants lowercase hex
        "sha256:" + "a" * 63,
        "sha256:" + "a" * 65,
        "sha256:" + "g" * 64,
        "sha512:" + "a" * 64,
        "md5:" + "a" * 32,
        "sha1:" + "a" * 40,
        "sha384:" + "a" * 96,
        "sha256:" + "a" * 64 + "\n",
        "sha256 :" + "a" * 64,
        "sha256::" + "a" * 63,
    ],
)
def test_invalid_digests_are_digest_invalid(text: str) -> None:
    with pytest.raises(OCIError) as err:
        parse_digest(text)
    assert (err.value.code, err.value.status) == ("DIGEST_INVALID", 400)


def test_unknown_algorithm_says_so() -> None:
    with pytest.raises(OCIError) as err:
        parse_digest("blake3:" + "a" * 64)
    assert err.value.detail == {"digest": "blake3:" + "a" * 64, "reason": "unsupported algorithm"}


def test_digest_cannot_be_built_invalid() -> None:
    with pytest.raises(OCIError):
        Digest("sha256", "../../etc/passwd")


def test_reference_is_a_digest_when_it_has_a_colon() -> None:
    assert parse_reference("latest") == "latest"
    assert parse_reference(SHA256) == parse_digest(SHA256)
    with pytest.raises(OCIError) as err:
        parse_reference("latest:x")
    assert err.value.code == "DIGEST_INVALID"
    with pytest.raises(OCIError) as err:
        parse_reference(".latest")
    assert err.value.code == "TAG_INVALID"


@pytest.mark.parametrize(
    ("ns", "canonical"),
    [
        ("docker.io", "docker.io"),
        ("Docker.IO", "docker.io"),
        ("registry-1.docker.io:443", "registry-1.docker.io:443"),
        ("localhost", "localhost"),
        ("localhost:5000", "localhost:5000"),
        ("127.0.0.1:5000", "127.0.0.1:5000"),
        ("[::1]", "[::1]"),
        ("[::1]:5000", "[::1]:5000"),
        ("[2001:DB8:0:0:0:0:0:1]:65535", "[2001:db8::1]:65535"),
        ("a" * 63 + ".io", "a" * 63 + ".io"),
        ("ghcr.io:1", "ghcr.io:1"),
    ],
)
def test_ns_hosts_are_canonical(ns: str, canonical: str) -> None:
    assert parse_ns(ns) == canonical


@pytest.mark.parametrize(
    "ns",
    [
        "",
        "docker.io.",
        ".docker.io",
        "docker..io",
        "-a.io",
        "a-.io",
        "a_b.io",
        "a" * 64 + ".io",
        "docker.io:0",
        "docker.io:65536",
        "docker.io:080",
        "docker.io:",
        "docker.io:80:80",
        "docker.io:http",
        "999.1.1.1",
        "1.2.3",
        "01.2.3.4",
        "[::1",
        "[::1]x",
        "[fe80::1%eth0]",
        "[not-ipv6]",
        "::1",
        "docker.io/library",
        "user@docker.io",
        "docker io",
        "dockér.io",
        "a." * 130,
    ],
)
def test_invalid_ns_is_a_400(ns: str) -> None:
    with pytest.raises(OCIError) as err:
        parse_ns(ns)
    assert (err.value.code, err.value.status) == ("NAME_INVALID", 400)


# --- properties -----------------------------------------------------------------------

ALNUM = st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=8)
SEPARATOR = st.sampled_from([".", "_", "__", "-", "--", "---"])


@st.composite
def components(draw: st.DrawFn) -> str:
    parts = [draw(ALNUM)]
    for _ in range(draw(st.integers(0, 3))):
        parts += [draw(SEPARATOR), draw(ALNUM)]
    return "".join(parts)


names = st.lists(components(), min_size=1, max_size=5).map("/".join).filter(lambda n: len(n) <= 255)
tags = st.from_regex(r"\A[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}\Z")
digests = st.one_of(
    st.binary(max_size=64).map(lambda b: "sha256:" + hashlib.sha256(b).hexdigest()),
    st.binary(max_size=64).map(lambda b: "sha512:" + hashlib.sha512(b).hexdigest()),
)


@given(names)
def test_every_grammar_name_parses(name: str) -> None:
    assert parse_name(name) == name


@given(tags)
def test_every_grammar_tag_parses(tag: str) -> None:
    assert parse_tag(tag) == tag
    assert parse_reference(tag) == tag


@given(digests)
def test_every_digest_round_trips(text: str) -> None:
    assert str(parse_digest(text)) == text
    assert parse_reference(text) == parse_digest(text)


LABEL = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?\Z").filter(lambda x: not x.isdigit())
HOSTS = st.one_of(
    st.lists(LABEL, min_size=1, max_size=4).map(".".join),
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda ip: f"[{ip.compressed}]"),
)
PORTS = st.one_of(st.none(), st.integers(1, 65535))


@given(HOSTS, PORTS)
def test_every_canonical_host_round_trips(host: str, port: int | None) -> None:
    ns = host if port is None else f"{host}:{port}"
    assert parse_ns(ns) == ns
    assert parse_ns(ns.upper()) == ns


def _model_component(component: str) -> bool:
    """The component rule written as a scan over runs, independent of the regex."""
    runs: list[tuple[bool, str]] = []
    for ch in component:
        alnum = ch in "abcdefghijklmnopqrstuvwxyz0123456789"
        if runs and runs[-1][0] == alnum:
            runs[-1] = (alnum, runs[-1][1] + ch)
        else:
            runs.append((alnum, ch))
    if not runs or not runs[0][0] or not runs[-1][0]:
        return False
    return all(alnum or sep in (".", "_", "__") or set(sep) == {"-"} for alnum, sep in runs)


def _model_name(name: str) -> bool:
    return 0 < len(name) <= 255 and all(_model_component(c) for c in name.split("/"))


@given(st.text("ab0.-_/A%", max_size=40))
def test_name_parser_agrees_with_an_independent_model(text: str) -> None:
    try:
        parse_name(text)
        accepted = True
    except OCIError:
        accepted = False
    assert accepted == _model_name(text)


@pytest.mark.parametrize("parser", [parse_name, parse_tag, parse_digest, parse_reference, parse_ns])
@given(text=st.text(max_size=300))
def test_random_text_raises_only_oci_errors(parser, text: str) -> None:  # type: ignore[no-untyped-def]
    with contextlib.suppress(OCIError):
        parser(text)


HOSTILE = [
    "a" * 10_000 + "!",
    "a-" * 5_000 + "!",
    "a_" * 5_000,
    "a." * 5_000 + "-",
    "a" + "-" * 10_000 + "!",
    ("a" * 50 + "/") * 200 + "A",
    "sha256:" + "a" * 10_000,
    "a" * 10_000 + ":" + "0" * 10,
    "[" + ":" * 10_000 + "]",
]


@pytest.mark.parametrize("text", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_10kb_inputs_take_linear_time(text: str) -> None:
    for parser in (parse_name, parse_tag, parse_digest, parse_reference, parse_ns):
        start = time.perf_counter()
        with pytest.raises(OCIError):
            parser(text)
        assert time.perf_counter() - start < 0.05, parser.__name__
    # At the length limit the expressions run in full; still no backtracking blow-up.
    for body in ("a-" * 127, "a_" * 127, "a." * 127, "a" + "-" * 253):
        start = time.perf_counter()
        with pytest.raises(OCIError):
            parse_name(body + "!")
        assert time.perf_counter() - start < 0.05


# --- against the real docker-registry ------------------------------------------------

CORPUS_NAMES = ["library/alpine", "a.b_c__d-e", "a__b", "a...b", "a___b", "A", "a--b", "-a"]
CORPUS_TAGS = ["latest", "_x", "a.b-c_D", ".a", "-a", "a" * 128, "a" * 129]


@pytest.fixture(scope="module")
def empty_registry(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    reg = Registry(tmp_path_factory.mktemp("grammar-registry")).start()
    yield reg
    reg.stop()


def _registry_accepts(reg: Registry, path: str) -> bool:
    """docker-registry routes a path only when name and reference match its grammar;
    an unrouted path is a plain-text 404, a routed one a JSON error."""
    r = httpx.get(reg.url + path, timeout=10)
    return (
        r.headers.get("content-type", "").startswith("application/json")
        and r.status_code
        in (
            400,
            404,
        )
        and "NAME_INVALID" not in r.text
        and "DIGEST_INVALID" not in r.text
    )


def test_grammar_agrees_with_docker_registry(empty_registry: Registry) -> None:
    for name in CORPUS_NAMES:
        ours = _accepts(parse_name, name)
        assert ours == _registry_accepts(empty_registry, f"/v2/{name}/manifests/latest"), name
    for tag in CORPUS_TAGS:
        ours = _accepts(parse_tag, tag)
        assert ours == _registry_accepts(empty_registry, f"/v2/a/manifests/{tag}"), tag
    for digest in (SHA256, SHA512, "sha256:" + "a" * 63, "md5:" + "a" * 32):
        ours = _accepts(parse_digest, digest)
        assert ours == _registry_accepts(empty_registry, f"/v2/a/blobs/{digest}"), digest


def _accepts(parser, text: str) -> bool:  # type: ignore[no-untyped-def]
    try:
        parser(text)
    except OCIError:
        return False
    return True


@pytest.mark.parametrize(
    "text,ns,name,ref",
    [
        ("alpine", "docker.io", "library/alpine", "latest"),
        ("acme/shop:2.1", "docker.io", "acme/shop", "2.1"),
        ("docker.io/acme/shop:2.1", "docker.io", "acme/shop", "2.1"),
        ("index.docker.io/library/redis", "docker.io", "library/redis", "latest"),
        ("ghcr.io/org/app:v1", "ghcr.io", "org/app", "v1"),
        ("127.0.0.1:5000/a/b:c", "127.0.0.1:5000", "a/b", "c"),
        ("localhost/x", "localhost", "x", "latest"),
    ],
)
def test_parse_image_normalises_like_docker(text, ns, name, ref):
    image = parse_image(text)
    assert (image.ns, image.name, image.reference) == (ns, name, ref)


def test_parse_image_with_digest_keeps_the_digest():
    digest = "sha256:" + "a" * 64
    image = parse_image(f"acme/shop:2.1@{digest}")
    assert str(image.reference) == digest
    assert str(image) == f"docker.io/acme/shop@{digest}"


@pytest.mark.parametrize("bad", ["", "UPPER/case", "a/../b", "acme/shop:bad tag", "x@sha256:zz"])
def test_parse_image_rejects(bad):
    with pytest.raises(OCIError):
        parse_image(bad)
