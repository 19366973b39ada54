"""Routing a request target to a read route, and the errors it answers (protocol.routes)."""

from __future__ import annotations

import json
import pickle
from contextlib import ExitStack
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.errors import ERROR_CODES, OCIError, oci_error
from protocol.reference import parse_digest
from protocol.routes import MAX_TARGET, ApiBase, BlobRoute, ManifestRoute, TokenRoute, route
from tests.protocol.test_reference import HOSTS, PORTS, digests, names, tags

DIGEST = "sha256:" + "ab" * 32


def error_of(method: bytes, target: bytes) -> OCIError:
    with pytest.raises(OCIError) as err:
        route(method, target)
    return err.value


@pytest.mark.parametrize("target", [b"/v2/", b"/v2"])
@pytest.mark.parametrize("method", [b"GET", b"HEAD"])
def test_api_base(method: bytes, target: bytes) -> None:
    assert route(method, target) == ApiBase()


def test_token_endpoint_reads_only() -> None:
    assert route(b"GET", b"/v2/token?service=celld&scope=repository:a/b:pull") == TokenRoute()
    assert error_of(b"POST", b"/v2/token").status == 405  # containerd then falls back to GET
    assert error_of(b"GET", b"/v2/token/x").status == 404


def test_manifest_by_tag_and_digest_with_ns() -> None:
    assert route(b"GET", b"/v2/library/alpine/manifests/3.19?ns=docker.io") == ManifestRoute(
        "library/alpine", "3.19", "docker.io"
    )
    r = route(b"HEAD", f"/v2/a/b/c/manifests/{DIGEST}".encode())
    assert r == ManifestRoute("a/b/c", parse_digest(DIGEST), None)
    assert isinstance(r, ManifestRoute) and r.by_digest


def test_blob_route() -> None:
    assert route(b"GET", f"/v2/x/blobs/{DIGEST}?ns=ghcr.io&foo=bar".encode()) == BlobRoute(
        "x", parse_digest(DIGEST), "ghcr.io"
    )


def test_name_may_contain_endpoint_words() -> None:
    """The endpoint is read from the end, so these components stay in the name."""
    assert route(b"GET", b"/v2/manifests/blobs/manifests/latest") == ManifestRoute(
        "manifests/blobs", "latest"
    )
    assert route(b"GET", f"/v2/a/blobs/uploads/blobs/{DIGEST}".encode()) == BlobRoute(
        "a/blobs/uploads", parse_digest(DIGEST)
    )
    assert route(b"GET", b"/v2/a/manifests/uploads") == ManifestRoute("a", "uploads")
    assert route(b"GET", b"/v2/tags/list/manifests/v1") == ManifestRoute("tags/list", "v1")


def test_ns_is_percent_decoded_and_canonical() -> None:
    r = route(b"GET", b"/v2/a/manifests/x?ns=%5B::1%5D%3A5000")
    assert isinstance(r, ManifestRoute) and r.ns == "[::1]:5000"
    r = route(b"GET", b"/v2/a/manifests/x?n%73=Docker.IO")
    assert isinstance(r, ManifestRoute) and r.ns == "docker.io"


@pytest.mark.parametrize(
    "query",
    [b"ns=", b"ns=a..b", b"ns=%ff", b"ns=docker.io%00", b"ns=docker.io:99999", b"ns=a%2Fb"],
)
def test_invalid_ns_is_400(query: bytes) -> None:
    err = error_of(b"GET", b"/v2/a/manifests/x?" + query)
    assert err.status == 400


def test_repeated_ns_is_400() -> None:
    assert error_of(b"GET", b"/v2/a/manifests/x?ns=docker.io&ns=docker.io").status == 400


@pytest.mark.parametrize(
    ("method", "target"),
    [
        (b"PUT", b"/v2/a/manifests/latest"),
        (b"DELETE", b"/v2/a/manifests/latest"),
        (b"POST", b"/v2/a/manifests/latest"),
        (b"PATCH", f"/v2/a/blobs/{DIGEST}".encode()),
        (b"DELETE", f"/v2/a/blobs/{DIGEST}".encode()),
        (b"OPTIONS", b"/v2/"),
        (b"get", b"/v2/a/manifests/latest"),
    ],
)
def test_writes_to_read_endpoints_are_405_with_allow(method: bytes, target: bytes) -> None:
    err = error_of(method, target)
    assert (err.code, err.status) == ("UNSUPPORTED", 405)
    assert ("Allow", "GET, HEAD") in err.headers


@pytest.mark.parametrize(
    ("method", "target"),
    [
        (b"POST", b"/v2/a/blobs/uploads/"),
        (b"POST", b"/v2/a/blobs/uploads"),
        (b"PATCH", b"/v2/a/b/blobs/uploads/5a0c-uuid"),
        (b"PUT", b"/v2/a/blobs/uploads/5a0c-uuid?digest=" + DIGEST.encode()),
        (b"GET", b"/v2/a/blobs/uploads/5a0c-uuid"),
        (b"GET", b"/v2/a/tags/list"),
        (b"GET", b"/v2/a/tags/list?n=10&last=x"),
        (b"GET", b"/v2/_catalog"),
    ],
)
def test_push_and_listing_endpoints_are_405(method: bytes, target: bytes) -> None:
    err = error_of(method, target)
    assert (err.code, err.status) == ("UNSUPPORTED", 405)


def test_referrers_are_404_so_clients_fall_back() -> None:
    err = error_of(b"GET", f"/v2/a/referrers/{DIGEST}".encode())
    assert err.status == 404


@pytest.mark.parametrize(
    "target",
    [b"/", b"/v1/", b"/v2/a", b"/v2/a/manifests", b"/v3/a/manifests/x", b"/v2/a/manifests/x/"],
)
def test_unknown_paths_are_404(target: bytes) -> None:
    assert error_of(b"GET", target).status == 404


@pytest.mark.parametrize(
    ("target", "code"),
    [
        (b"/v2/a%2fb/manifests/x", "NAME_INVALID"),
        (b"/v2/a%2Fb/blobs/" + DIGEST.encode(), "NAME_INVALID"),
        (b"/v2/%2e%2e/manifests/x", "NAME_INVALID"),
        (b"/v2/a/../b/manifests/x", "NAME_INVALID"),
        (b"/v2/../a/manifests/x", "NAME_INVALID"),
        (b"/v2/a//b/manifests/x", "NAME_INVALID"),
        (b"/v2//manifests/x", "NAME_INVALID"),
        (b"/v2/./a/manifests/x", "NAME_INVALID"),
        (b"/v2/A/manifests/x", "NAME_INVALID"),
        (b"/v2/a/manifests/%2e%2e", "TAG_INVALID"),
        (b"/v2/a/manifests/..", "TAG_INVALID"),
        (b"/v2/a/manifests/", "TAG_INVALID"),
        (b"/v2/a/manifests/sha256:abc", "DIGEST_INVALID"),
        (b"/v2/a/blobs/latest", "DIGEST_INVALID"),
        (b"/v2/a/blobs/md5:" + b"a" * 32, "DIGEST_INVALID"),
        (b"/v2/a/blobs/sha256%3A" + b"a" * 64, "DIGEST_INVALID"),
    ],
)
def test_bad_names_and_references_are_400_with_their_code(target: bytes, code: str) -> None:
    err = error_of(b"GET", target)
    assert (err.code, err.status) == (code, 400)


@pytest.mark.parametrize(
    "target",
    [
        b"/v2/../../etc/passwd",
        b"/../v2/",
        b"/v2/%2e%2e/%2e%2e/etc/passwd",
        b"/v2%2f",
        b"/v2/a/manifest%73/x",
        b"//v2/",
        b"/v2/a/b\x00/manifests/x",
        b"/v2/a/manifests/x\x7f",
        b"/v2/a/manifests/x y",
        b"/v2/a/manifests/x\r\nHost: evil",
        "/v2/é/manifests/x".encode(),
        b"/v2/a/manifests/x#frag",
        b"http://evil.example/v2/",
        b"*",
        b"",
        b"/v2/" + b"a" * MAX_TARGET,
    ],
)
def test_malformed_targets_are_400(target: bytes) -> None:
    err = error_of(b"GET", target)
    assert err.status == 400
    json.loads(err.body())  # the client still gets the spec's JSON


def test_target_length_limit() -> None:
    name = b"a/" * 120 + b"a"  # 241 characters, a valid name
    ok = b"/v2/" + name + b"/manifests/x?pad=" + b"p" * 1000
    assert isinstance(route(b"GET", ok), ManifestRoute)
    too_long = ok + b"p" * (MAX_TARGET - len(ok) + 1)
    assert error_of(b"GET", too_long).status == 400


@given(method=st.binary(max_size=12), target=st.binary(max_size=4096))
def test_arbitrary_bytes_raise_only_oci_errors(method: bytes, target: bytes) -> None:
    try:
        result = route(method, target)
    except OCIError as err:
        assert 400 <= err.status < 500
        json.loads(err.body())
        return
    assert isinstance(result, ApiBase | ManifestRoute | BlobRoute)


PATH_BYTES = st.sampled_from(
    [
        *(b"/", b"v2", b"a", b"manifests", b"blobs", b"uploads", b"..", b".", b"%2f", b"?"),
        *(b"&", b"ns=", DIGEST.encode(), b"%", b"tags", b"list", b"_catalog", b"referrers"),
        b"docker.io",
    ]
)


@given(method=st.sampled_from([b"GET", b"HEAD", b"PUT"]), parts=st.lists(PATH_BYTES, max_size=12))
def test_structured_garbage_raises_only_oci_errors(method: bytes, parts: list[bytes]) -> None:
    target = b"/" + b"".join(parts)
    try:
        result = route(method, target)
    except OCIError:
        return
    # Whatever routed must be made only of grammar-checked parts.
    assert b".." not in target.partition(b"?")[0]
    assert b"%" not in target.partition(b"?")[0]
    if isinstance(result, ManifestRoute | BlobRoute):
        assert method in (b"GET", b"HEAD")


@given(name=names, reference=st.one_of(tags, digests), ns=st.sampled_from([None, "docker.io"]))
def test_every_valid_manifest_request_routes(name: str, reference: str, ns: str | None) -> None:
    target = f"/v2/{name}/manifests/{reference}" + (f"?ns={ns}" if ns else "")
    r = route(b"GET", target.encode())
    assert isinstance(r, ManifestRoute)
    assert (r.name, str(r.reference), r.ns) == (name, reference, ns)


@given(host=HOSTS, port=PORTS)
def test_any_percent_encoded_ns_routes(host: str, port: int | None) -> None:
    ns = host if port is None else f"{host}:{port}"
    r = route(b"GET", f"/v2/a/manifests/v1?x=1&ns={quote(ns, safe='')}&y".encode())
    assert isinstance(r, ManifestRoute) and r.ns == ns


@given(name=names, digest=digests)
def test_every_valid_blob_request_routes(name: str, digest: str) -> None:
    r = route(b"HEAD", f"/v2/{name}/blobs/{digest}".encode())
    assert r == BlobRoute(name, parse_digest(digest))


# --- the error values themselves ------------------------------------------------------


def test_error_body_is_the_specs_json() -> None:
    err = oci_error("BLOB_UNKNOWN", {"digest": DIGEST})
    assert err.status == 404
    assert json.loads(err.body()) == {
        "errors": [
            {
                "code": "BLOB_UNKNOWN",
                "message": "blob unknown to registry",
                "detail": {"digest": DIGEST},
            }
        ]
    }


def test_every_code_has_a_client_error_status() -> None:
    for code in ERROR_CODES:
        err = oci_error(code)
        assert 400 <= err.status < 500
        assert err.code.replace("_", "").isalpha() and err.code.isupper()
    assert oci_error("UNSUPPORTED").status == 405
    assert oci_error("TOOMANYREQUESTS").status == 429
    assert oci_error("UNAUTHORIZED").status == 401


def test_errors_survive_exception_machinery() -> None:
    """contextlib, exception chaining, notes and pickling assign attributes a frozen
    dataclass would refuse."""
    with pytest.raises(OCIError) as caught, ExitStack() as stack:
        stack.callback(lambda: None)
        try:
            raise ValueError("inner")
        except ValueError as inner:
            raise oci_error("NAME_INVALID") from inner
    caught.value.add_note("seen by a test")
    copy = pickle.loads(pickle.dumps(caught.value))
    assert (copy.code, copy.status) == ("NAME_INVALID", 400)
    with pytest.raises(AttributeError):
        caught.value.code = "X"  # type: ignore[misc]
