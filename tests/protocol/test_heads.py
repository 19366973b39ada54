"""Response heads celld parses without h11 (protocol.heads): only plain ones,
and each exactly as h11 reads it; everything else is left to h11."""

from __future__ import annotations

import h11
from hypothesis import example, given, settings
from hypothesis import strategies as st

from protocol.heads import PlainHead, parse_plain_head

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


_lines = st.one_of(
    st.sampled_from(
        [
            b"Content-Length: 5",
            b"content-length:7",
            b"Content-Length: 5 ",
            b"Transfer-Encoding: chunked",
            b"Connection: close",
            b"X-Empty:",
            b"X-Blank:   ",
            b'Etag: "sha256:abc"',
            b" folded",
        ]
    ),
    st.binary(max_size=30),
    st.from_regex(rb"\A[A-Za-z-]{1,10}:[ \t]{0,2}[\x20-\x7e]{0,20}\Z"),
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
