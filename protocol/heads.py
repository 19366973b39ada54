"""What celld writes into an HTTP/1.1 head without h11's checks first.

The mirror's response heads and the blob client's requests are serialized by
celld itself, so their bytes go out before h11 records them (a miss's first
byte should not wait on bookkeeping). Everything written that way must match
these patterns, which are stricter than RFC 9110's grammar: whatever passes
here, h11 accepts afterwards, and a CR, LF or NUL from a server's text (a
redirect, a token, a media type) can never split a head.
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
_HEADER_LINE = re.compile(rb"([-!#$%&'*+.^_`|~0-9A-Za-z]+):[ \t]*(.*?)[ \t]*")
_NO_BODY = frozenset({204, 304})


def parse_plain_head(head: bytes) -> PlainHead | None:
    """The head before its blank line (CRLF line ends), if it is plain; None for
    anything else: an interim 1xx, a chunked or unframed body, several lengths,
    folded lines, bytes outside visible ASCII, anything malformed.

    A None sends the bytes to h11, which parses what HTTP allows beyond this
    and refuses what it does not; so this parser only has to be strict, never
    complete, and a blob's head is parsed without h11's machinery (~0.15 ms of
    a cold CPU, on a miss's time to first byte).
    """
    lines = head.split(b"\r\n")
    status = _STATUS_LINE.fullmatch(lines[0])
    if status is None or int(status[2]) in _NO_BODY:
        return None
    headers = []
    length = None
    for line in lines[1:]:
        field = _HEADER_LINE.fullmatch(line)
        if field is None:
            return None
        name, value = field[1].lower(), field[2]
        if value and not FIELD_VALUE.fullmatch(value):
            return None
        if name == b"transfer-encoding":
            return None
        if name == b"content-length":
            if length is not None or not value.isdigit():
                return None
            length = int(value)
        headers.append((name, value))
    if length is None:
        return None
    return PlainHead(status[1], int(status[2]), tuple(headers), length)
