"""The HTTP/1.1 heads celld writes and parses without h11 going first.

On a miss's path to its first byte, the mirror's response head and the blob
client's request are written here, and the runtime's request and the
registry's response head are parsed here, when they are plain; h11 records
each exchange afterwards and handles everything that is not plain. The
patterns are stricter than RFC 9110's grammar: whatever passes here, h11
accepts the same, and a CR, LF or NUL from a server's text (a redirect, a
token, a media type) can never split a head.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+")
"""A header name."""

FIELD_VALUE = re.compile(rb"[\x21-\x7e]+(?:[ \t]+[\x21-\x7e]+)*")
"""A header value: visible ASCII, blanks only inside."""

TARGET = re.compile(rb"[\x21-\x7e]+")
"""A request target: visible ASCII, no blanks."""


@dataclass(frozen=True)
class PlainHead:
    """A final response framed by one Content-Length: what a blob GET gets."""

    http_version: bytes
    status: int
    headers: tuple[tuple[bytes, bytes], ...]  # names lower-cased, as h11 gives them
    length: int


_STATUS_LINE = re.compile(rb"HTTP/(1\.[01]) ([2-5][0-9][0-9])(?: [\t\x20-\x7e]*)?")
_REQUEST_LINE = re.compile(rb"(GET|HEAD) (" + TARGET.pattern + rb") HTTP/1\.1")
_HEADER_LINE = TOKEN.pattern + rb":[ \t]*(?:" + FIELD_VALUE.pattern + rb")?[ \t]*"
# Every header line of a head at once: one pass of the regex engine over the
# block, rather than two per line (a third of the parse, on a miss's first byte).
_HEADER_BLOCK = re.compile(_HEADER_LINE + rb"(?:\r\n" + _HEADER_LINE + rb")*")
_NO_BODY = frozenset({204, 304})
# Request headers that make h11 do more than record a request: a body to
# read, an upgrade or 100-continue to track.
_NOT_PLAIN_REQUEST = frozenset({b"content-length", b"transfer-encoding", b"upgrade", b"expect"})


# Every name, and every value, checked in one pass of the regex engine: joined
# by LF, which neither pattern takes, so a field of its own LF fails the count.
_NAMES = re.compile(TOKEN.pattern + rb"(?:\n" + TOKEN.pattern + rb")*")
_VALUES = re.compile(FIELD_VALUE.pattern + rb"(?:\n" + FIELD_VALUE.pattern + rb")*")


def plain_fields(headers: list[tuple[bytes, bytes]]) -> bool:
    """Is every name a token and every value visible ASCII (blanks only inside)?"""
    if not headers:
        return True
    names = b"\n".join([name for name, _ in headers])
    values = b"\n".join([value for _, value in headers])
    lfs = len(headers) - 1
    return (
        names.count(b"\n") == lfs
        and values.count(b"\n") == lfs
        and _NAMES.fullmatch(names) is not None
        and _VALUES.fullmatch(values) is not None
    )


def write_head(start_line: bytes, fields: list[tuple[bytes, bytes]]) -> bytes:
    """A head as h11 writes it: the start line, each field as given, a blank line.
    The caller has checked every name and value against the patterns above."""
    lines = [start_line, b"\r\n"]
    for name, value in fields:
        lines += [name, b": ", value, b"\r\n"]
    lines.append(b"\r\n")
    return b"".join(lines)


def _fields(block: bytes | None) -> list[tuple[bytes, bytes]] | None:
    """The header lines after a start line (None: there were none) as (lower-case
    name, value), or None if any is not plain."""
    if block is None:
        return []
    if _HEADER_BLOCK.fullmatch(block) is None:
        return None
    fields = []
    for line in block.split(b"\r\n"):
        name, _, value = line.partition(b":")
        fields.append((name.lower(), value.strip(b" \t")))
    return fields


def _split(head: bytes) -> tuple[bytes, bytes | None]:
    """The start line, and the header lines after it (None: there are none)."""
    start, crlf, block = head.partition(b"\r\n")
    return start, block if crlf else None


def parse_plain_head(head: bytes) -> PlainHead | None:
    """The head before its blank line (CRLF line ends), if it is plain; None for
    anything else: an interim 1xx, a chunked or unframed body, several lengths,
    folded lines, bytes outside visible ASCII, anything malformed.

    A None sends the bytes to h11, which parses what HTTP allows beyond this
    and refuses what it does not; so this parser only has to be strict, never
    complete, and a blob's head is parsed without h11's machinery (~0.15 ms of
    a cold CPU, on a miss's time to first byte).
    """
    start, block = _split(head)
    status = _STATUS_LINE.fullmatch(start)
    if status is None or int(status[2]) in _NO_BODY:
        return None
    headers = _fields(block)
    if headers is None:
        return None
    lengths = [value for name, value in headers if name == b"content-length"]
    if len(lengths) != 1 or not lengths[0].isdigit():
        return None
    if any(name == b"transfer-encoding" for name, _ in headers):
        return None
    return PlainHead(status[1], int(status[2]), tuple(headers), int(lengths[0]))


@dataclass(frozen=True)
class PlainRequest:
    """An HTTP/1.1 GET or HEAD without a body: what a runtime pulling sends."""

    method: bytes
    target: bytes
    headers: tuple[tuple[bytes, bytes], ...]  # names lower-cased, as h11 gives them


def parse_plain_request(data: bytes) -> PlainRequest | None:
    """`data` if it is exactly one plain request (head, blank line, nothing
    after); None for anything else (another method or version, a body, no or
    several Host headers, an upgrade, a pipelined request behind it, anything
    malformed), for h11 to parse or refuse, as for `parse_plain_head`."""
    end = data.find(b"\r\n\r\n")
    if end < 0 or end + 4 != len(data):
        return None
    start, block = _split(data[:end])
    line = _REQUEST_LINE.fullmatch(start)
    if line is None:
        return None
    headers = _fields(block)
    if headers is None:
        return None
    names = [name for name, _ in headers]
    if names.count(b"host") != 1 or not _NOT_PLAIN_REQUEST.isdisjoint(names):
        return None
    return PlainRequest(line[1], line[2], tuple(headers))
