"""HTTP `Range` requests on blobs (RFC 9110 section 14): which bytes to send, or 416.

Owns: reading a `Range` header against a blob's size and deciding between the whole
body (200), one part (206 with `Content-Range`) and unsatisfiable (416 with
`Content-Range: bytes */size`).

Never: sends multipart/byteranges. A request for several satisfiable ranges gets the
whole body, which RFC 9110 allows ("a server MAY ignore the Range header field"); no
registry client asks for more than one range.

Where the RFC leaves room we do what nginx and Go's net/http (serveContent) both do,
except where they disagree with "always give the client correct bytes":

- `bytes=N-M` with M past the end is clamped to size-1; `bytes=-N` with N larger than
  the size is the whole body, as a 206 of 0..size-1 (as nginx and Go).
- Ranges that start at or past the end, and a suffix of length 0, are unsatisfiable:
  416 with `Content-Range: bytes */size` (as nginx and Go). Against an empty blob every
  range is unsatisfiable (as Go; nginx skips range handling for empty files).
- When several ranges are given, the unsatisfiable ones are dropped: one left is
  served as a 206, none left is 416 (as nginx and Go). Two or more left: the whole
  body, 200 (nginx and Go send multipart/byteranges).
- A header whose unit is not `bytes` (case-insensitive) is ignored: 200 (as nginx and
  Go, and RFC 9110's "MUST ignore" for unknown units).
- A `bytes=` range-set that is syntactically invalid (no dash, non-digits, last <
  first, empty) is ignored too: 200 with the whole body. Here nginx and Go answer 416;
  RFC 9110 section 14.2 allows either ("MAY ignore or reject"), and ignoring never
  fails a client that could have used the whole body.
- A last-pos too large for 64 bits is clamped like any other (nginx and Go overflow
  and answer 416); a first-pos that large is past the end, so 416.
- Optional whitespace around each range and its numbers is tolerated, and empty list
  elements ("bytes=0-1,,") are skipped, as RFC 9110's list rule says.

tests/protocol/test_ranges.py runs these against a real nginx.
"""

from __future__ import annotations

from dataclasses import dataclass

from protocol.errors import OCIError

# A position with more significant digits than this is past the end of any blob.
_HUGE_DIGITS = 19
_HUGE = 1 << 64
_OWS = " \t"


@dataclass(frozen=True)
class ByteRange:
    """Bytes `start` through `end` of a blob, both inclusive (as in `Content-Range`)."""

    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    def content_range(self, size: int) -> str:
        return f"bytes {self.start}-{self.end}/{size}"


class Unsatisfiable(OCIError):
    """416: no requested range overlaps the blob. An `OCIError`, so the mirror's one
    error path answers it; its `headers` carry the `Content-Range` RFC 9110 asks for."""

    def __init__(self, size: int) -> None:
        super().__init__(
            "RANGE_INVALID",
            "requested range not satisfiable",
            416,
            {"size": size},
            (("Content-Range", f"bytes */{size}"),),
        )

    @property
    def size(self) -> int:
        assert isinstance(self.detail, dict)
        return int(self.detail["size"])

    def content_range(self) -> str:
        return f"bytes */{self.size}"

    def __reduce__(self) -> tuple[object, ...]:
        return (Unsatisfiable, (self.size,))


def _position(text: str) -> int | None:
    """A non-negative decimal position, or None when it is not one."""
    if not text or not text.isascii() or not text.isdigit():
        return None
    significant = text.lstrip("0")
    if len(significant) > _HUGE_DIGITS:
        return _HUGE
    return int(significant) if significant else 0  # int() refuses > 4,300 digits


def _one(spec: str, size: int) -> ByteRange | bool | None:
    """One range-spec: a ByteRange, None when unsatisfiable, False when invalid."""
    first_text, dash, last_text = spec.partition("-")
    if not dash:
        return False
    first_text, last_text = first_text.strip(_OWS), last_text.strip(_OWS)
    if not first_text:
        suffix = _position(last_text)
        if suffix is None:
            return False
        if suffix == 0 or size == 0:
            return None
        return ByteRange(max(0, size - suffix), size - 1)
    first = _position(first_text)
    if first is None:
        return False
    last = _position(last_text) if last_text else None
    if last_text and (last is None or last < first):
        return False
    if first >= size:
        return None
    return ByteRange(first, size - 1 if last is None else min(last, size - 1))


def parse_range(header: str | bytes | None, size: int) -> ByteRange | None:
    """The part of a blob of `size` bytes to send, or None for the whole body.

    `header` may be the raw bytes h11 gives. Raises `Unsatisfiable` (a 416 `OCIError`)
    when no range overlaps the blob. See the module docstring for every case.
    """
    if size < 0:
        raise ValueError("size must be >= 0")
    if header is None:
        return None
    if isinstance(header, bytes | bytearray):
        header = bytes(header).decode("latin-1")
    unit, equals, range_set = header.strip(_OWS).partition("=")
    if not equals or unit.lower() != "bytes":
        return None
    satisfiable: list[ByteRange] = []
    seen_any = False
    for element in range_set.split(","):
        spec = element.strip(_OWS)
        if not spec:
            continue
        seen_any = True
        result = _one(spec, size)
        if result is False:
            return None
        if isinstance(result, ByteRange):
            satisfiable.append(result)
    if not seen_any:
        return None
    if not satisfiable:
        raise Unsatisfiable(size)
    if len(satisfiable) > 1:
        return None
    return satisfiable[0]
