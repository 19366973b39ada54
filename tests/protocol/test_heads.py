"""Heads celld parses without h11 (protocol.heads): only plain ones, each
exactly as h11 reads it; everything else is left to h11."""

from __future__ import annotations

import h11
from hypothesis import example, given, settings
from hypothesis import strategies as st

from protocol.heads import (
    FIELD_VALUE,
    TOKEN,
    PlainHead,
    PlainRequest,
    parse_plain_head,
    parse_plain_request,
    plain_fields,
)

BLOB_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"Accept-Ranges: bytes\r\n"
    b"Content-Length: 268435456\r\n"
    b"Content-Type: application/octet-stream\r\n"
    b"Docker-Content-Digest: sha256:" + b"a" * 64 + b"\r\n"
    b"Date: Sun, 29 Nov 2026 06:21:58 GMT"
)


def _h11_reads(head: bytes) -> h11.Response | None:
    """What h11, as the client of a GET, makes of `head` and its blank line."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(head + b"\r\n\r\n")
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError:
        return None
    return event if isinstance(event, h11.Response) else None


def test_a_registrys_blob_head_is_plain() -> None:
    head = parse_plain_head(BLOB_HEAD)
    assert head is not None
    assert (head.status, head.http_version, head.length) == (200, b"1.1", 268435456)
    assert (b"docker-content-digest", b"sha256:" + b"a" * 64) in head.headers
    assert (b"date", b"Sun, 29 Nov 2026 06:21:58 GMT") in head.headers


def test_what_is_not_plain_is_left_to_h11() -> None:
    length = b"\r\nContent-Length: 3"
    for head in (
        b"HTTP/1.1 100 Continue",
        b"HTTP/1.1 204 No Content" + length,
        b"HTTP/1.1 200 OK",  # no length: read to the close
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked",
        b"HTTP/1.1 200 OK" + length + length,
        b"HTTP/1.1 200 OK\r\nContent-Length: 3, 3",
        b"HTTP/1.1 200 OK\r\nContent-Length: -3",
        b"HTTP/1.1 200 OK" + length + b"\r\nX-Folded: a\r\n b",
        b"HTTP/1.1 200 OK" + length + b"\r\nX-Text: caf\xc3\xa9",
        b"HTTP/1.1 200 OK" + length + b"\r\nX-Nul: a\x00b",
        b"HTTP/1.1 200 OK" + length + b"\r\nX-Cr: a\rb",
        b"HTTP/1.1 200 OK" + length + b"\r\nBad Name: x",
        b"HTTP/2 200" + length,
        b"HTTP/1.1 200 OK\nContent-Length: 3",
    ):
        assert parse_plain_head(head) is None, head


def _header_lines(*likely: bytes) -> st.SearchStrategy[bytes]:
    """Header lines: some likely ones, any bytes, and any well-formed field."""
    return st.one_of(
        st.sampled_from(likely),
        st.binary(max_size=30),
        st.from_regex(rb"\A[A-Za-z-]{1,10}:[ \t]{0,2}[\x20-\x7e]{0,20}\Z"),
    )


_lines = _header_lines(
    b"Content-Length: 5",
    b"content-length:7",
    b"Content-Length: 5 ",
    b"Transfer-Encoding: chunked",
    b"Connection: close",
    b"X-Empty:",
    b"X-Blank:   ",
    b'Etag: "sha256:abc"',
    b" folded",
)
_status_lines = st.one_of(
    st.sampled_from(
        [b"HTTP/1.1 200 OK", b"HTTP/1.0 404 Not Found", b"HTTP/1.1 301 ", b"HTTP/1.1 500"]
    ),
    st.binary(max_size=20),
)


@settings(max_examples=400)
@given(
    status=_status_lines,
    lines=st.lists(_lines, max_size=6),
    length=st.one_of(st.none(), st.integers(min_value=0, max_value=2**63)),
)
@example(status=b"HTTP/1.1 200 OK", lines=[b"Content-Length: 5", b"X-Blank:   "], length=None)
def test_a_plain_head_is_what_h11_reads(
    status: bytes, lines: list[bytes], length: int | None
) -> None:
    if length is not None:
        lines = [*lines, b"Content-Length: %d" % length]
    head = b"\r\n".join([status, *lines])
    ours = parse_plain_head(head)
    if ours is None:
        return
    theirs = _h11_reads(head)
    assert theirs is not None, "parsed a head h11 refuses"
    assert ours == PlainHead(
        theirs.http_version,
        theirs.status_code,
        tuple(theirs.headers),
        int(dict(theirs.headers)[b"content-length"]),
    )


PULL = (
    b"GET /v2/library/alpine/blobs/sha256:" + b"a" * 64 + b"?ns=docker.io HTTP/1.1\r\n"
    b"Host: 127.0.0.1:5050\r\n"
    b"User-Agent: containerd/v1.7.24\r\n"
    b"Accept: application/vnd.oci.image.layer.v1.tar+gzip, */*\r\n"
    b"Accept-Encoding: gzip\r\n\r\n"
)


def _h11_reads_request(data: bytes) -> h11.Request | None:
    """What an h11 server makes of `data`, if it is one whole bodiless request."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    try:
        event = conn.next_event()
        end = conn.next_event()
    except h11.RemoteProtocolError:
        return None
    if not isinstance(event, h11.Request) or not isinstance(end, h11.EndOfMessage):
        return None
    return event


def test_a_runtimes_blob_request_is_plain() -> None:
    request = parse_plain_request(PULL)
    assert request is not None
    assert request.method == b"GET"
    assert request.target == b"/v2/library/alpine/blobs/sha256:" + b"a" * 64 + b"?ns=docker.io"
    assert (b"accept-encoding", b"gzip") in request.headers


def test_requests_that_are_not_plain_are_left_to_h11() -> None:
    host = b"\r\nHost: x"
    for data in (
        b"GET / HTTP/1.1" + host,  # no blank line yet
        b"GET / HTTP/1.1" + host + b"\r\n\r\nGET /b HTTP/1.1" + host + b"\r\n\r\n",  # pipelined
        b"GET / HTTP/1.1\r\n\r\n",  # no Host
        b"GET / HTTP/1.1" + host + host + b"\r\n\r\n",
        b"GET / HTTP/1.0\r\n\r\n",
        b"POST / HTTP/1.1" + host + b"\r\nContent-Length: 0\r\n\r\n",
        b"GET / HTTP/1.1" + host + b"\r\nContent-Length: 0\r\n\r\n",
        b"GET / HTTP/1.1" + host + b"\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET / HTTP/1.1" + host + b"\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n",
        b"GET / HTTP/1.1" + host + b"\r\nExpect: 100-continue\r\n\r\n",
        b"GET /a b HTTP/1.1" + host + b"\r\n\r\n",
        b"GET /\x00 HTTP/1.1" + host + b"\r\n\r\n",
        b"GET / HTTP/1.1" + host + b"\r\nX: a\r\n folded\r\n\r\n",
        b"GET / HTTP/1.1\nHost: x\n\n",
    ):
        assert parse_plain_request(data) is None, data


_request_lines = st.one_of(
    st.sampled_from(
        [b"GET / HTTP/1.1", b"HEAD /v2/a/blobs/x?ns=b HTTP/1.1", b"GET /%2e%2e HTTP/1.1"]
    ),
    st.binary(max_size=24),
)
_request_fields = _header_lines(
    b"Host: x",
    b"host:127.0.0.1:5050",
    b"Connection: close",
    b"Content-Length: 0",
    b"Upgrade: websocket",
    b"Authorization: Bearer a.b.c",
    b"X-Blank:  ",
    b" folded",
)


@settings(max_examples=400)
@given(
    line=_request_lines,
    fields=st.lists(_request_fields, max_size=5),
    host=st.booleans(),
    tail=st.sampled_from([b"", b"", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"x"]),
)
@example(line=b"GET / HTTP/1.1", fields=[b"X-Blank:  "], host=True, tail=b"")
def test_a_plain_request_is_what_h11_reads(
    line: bytes, fields: list[bytes], host: bool, tail: bytes
) -> None:
    if host:
        fields = [*fields, b"Host: 127.0.0.1"]
    data = b"\r\n".join([line, *fields]) + b"\r\n\r\n" + tail
    ours = parse_plain_request(data)
    if ours is None:
        return
    theirs = _h11_reads_request(data)
    assert theirs is not None, "parsed a request h11 refuses"
    assert theirs.http_version == b"1.1"
    assert ours == PlainRequest(theirs.method, theirs.target, tuple(theirs.headers))


_field_bytes = st.binary(max_size=12) | st.sampled_from(
    [b"Etag", b"a b", b"a\nb", b"a\r\nX: 1", b" a", b"a\t", b"", b"\n", b"x-y"]
)


@settings(max_examples=400)
@given(fields=st.lists(st.tuples(_field_bytes, _field_bytes), max_size=5))
@example(fields=[(b"X", b"a\nb")])
@example(fields=[(b"X", b"a"), (b"Y\nZ", b"b")])
def test_plain_fields_checks_each_name_and_value(fields: list[tuple[bytes, bytes]]) -> None:
    """The one-pass check says what a check of each field says, LF in a field included."""
    each = all(TOKEN.fullmatch(n) and FIELD_VALUE.fullmatch(v) for n, v in fields)
    assert plain_fields(fields) == each
