"""Request routing for the mirror: method plus raw request target -> one read route.

Owns: turning what h11 hands over (`method`, `target` bytes: path and query, still
percent-encoded) into `ApiBase`, `TokenRoute`, `ManifestRoute` or `BlobRoute`, with the name, the
reference and the `ns` host already checked against the grammar. Anything else raises
`OCIError`, so the mirror answers it without touching the disk or the network.

Never: decodes percent escapes in the path, follows `..`, or guesses. A path the rules
below do not name is refused.

The rules, in the order they apply:

1. The target is at most 2,048 bytes of visible ASCII (no control bytes, NUL, space,
   DEL or non-ASCII), has no fragment, and is in origin form (starts with "/").
   Otherwise 400.
2. `/v2` and `/v2/` are the API base (GET/HEAD); `/v2/token` is the token endpoint
   the base's Bearer challenge names (GET/HEAD; no name is one segment long).
3. Under `/v2/`, the endpoint is found from the end of the path, the way distribution's
   router does it, because a name may itself contain slashes and even a component
   called "manifests" or "blobs": `<name>/manifests/<reference>`,
   `<name>/blobs/<digest>`, `<name>/blobs/uploads[/<id>]`, `<name>/tags/list`,
   `<name>/referrers/<digest>`, `_catalog`.
4. The name is checked first (NAME_INVALID, 400): a percent escape, `.`/`..`, an empty
   component (`//`) all fail the grammar there. Then the method: manifests and blobs
   take GET and HEAD, anything else is 405 UNSUPPORTED with `Allow: GET, HEAD`; uploads,
   `_catalog` and `tags/list` are 405 UNSUPPORTED for every method (a pull-through
   mirror has no push and no listing). The referrers API answers 404, as the spec
   requires of a registry without it. Then the reference (TAG_INVALID / DIGEST_INVALID).
5. Any other path is 404, or 400 when it carries a percent escape, `.`/`..` segment or
   an empty segment: a request that tries traversal is malformed, not merely unknown.
6. The query: only `ns` matters. It is percent-decoded and checked by `parse_ns`; a
   repeated or invalid `ns` is 400. Other parameters are ignored. Absolute-form targets
   (`http://host/...`) are refused: runtimes talk to a mirror in origin form.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from protocol.errors import OCIError, bad_request, method_not_allowed, not_found, oci_error
from protocol.reference import Digest, parse_digest, parse_name, parse_ns, parse_reference

MAX_TARGET = 2048
READ_METHODS = (b"GET", b"HEAD")

_FORBIDDEN_BYTES = re.compile(rb"[^\x21-\x7e]|#")


@dataclass(frozen=True)
class ApiBase:
    """`/v2/`: the version check every client makes first."""


@dataclass(frozen=True)
class TokenRoute:
    """`/v2/token`: where clients that ping the base first fetch their Bearer token."""


@dataclass(frozen=True)
class ManifestRoute:
    """`/v2/<name>/manifests/<reference>`, by tag (str) or by digest."""

    name: str
    reference: str | Digest
    ns: str | None = None

    @property
    def by_digest(self) -> bool:
        return isinstance(self.reference, Digest)


@dataclass(frozen=True)
class BlobRoute:
    """`/v2/<name>/blobs/<digest>`."""

    name: str
    digest: Digest
    ns: str | None = None


Route = ApiBase | TokenRoute | ManifestRoute | BlobRoute


def _method_text(method: bytes) -> str:
    return method.decode("ascii", "replace")[:32]


def _read_only(method: bytes) -> None:
    if method not in READ_METHODS:
        raise method_not_allowed(_method_text(method))


def _unsupported(method: bytes, what: str) -> OCIError:
    """405 for an endpoint the mirror has but does not serve, whatever the method."""
    return oci_error(
        "UNSUPPORTED", {"method": _method_text(method), "endpoint": what}, headers=(("Allow", ""),)
    )


def _ns_from_query(query: bytes) -> str | None:
    value: bytes | None = None
    for part in query.split(b"&"):
        key, _, raw = part.partition(b"=")
        if unquote_to_bytes(key) != b"ns":
            continue
        if value is not None:
            raise bad_request({"query": "ns"}, "repeated ns query parameter")
        value = raw
    if value is None:
        return None
    try:
        text = unquote_to_bytes(value).decode("ascii")
    except UnicodeDecodeError:
        raise oci_error("NAME_INVALID", {"ns": "not ASCII"}, "invalid ns registry host") from None
    return parse_ns(text)


def _looks_like_traversal(segments: list[str]) -> bool:
    inner = segments[1:-1]  # segments[0] is "" before the leading "/"; the last may be ""
    return any(seg in ("", ".", "..") for seg in inner) or any(
        seg in (".", "..") or "%" in seg for seg in segments
    )


def route(method: bytes, target: bytes) -> Route:
    """The read route a request asks for, or the `OCIError` to answer it with."""
    if len(target) > MAX_TARGET:
        raise bad_request({"target_length": len(target)}, "request target too long")
    if _FORBIDDEN_BYTES.search(target):
        raise bad_request(None, "request target has control, non-ASCII or fragment bytes")
    raw_path, _, query = target.partition(b"?")
    path = raw_path.decode("ascii")
    if not path.startswith("/"):
        raise bad_request(None, "request target must be a path")
    ns = _ns_from_query(query) if query else None

    if path in ("/v2", "/v2/"):
        _read_only(method)
        return ApiBase()
    segments = path.split("/")
    if len(segments) < 3 or segments[1] != "v2":
        raise _unknown(segments, path)
    rest = segments[2:]

    if rest == ["token"]:
        _read_only(method)
        return TokenRoute()

    if rest == ["_catalog"]:
        raise _unsupported(method, "catalog")
    if len(rest) >= 2 and rest[-2] == "manifests":
        name = parse_name("/".join(rest[:-2]))
        _read_only(method)
        return ManifestRoute(name, parse_reference(rest[-1]), ns)
    if len(rest) >= 2 and rest[-2] == "blobs" and rest[-1] != "uploads":
        name = parse_name("/".join(rest[:-2]))
        _read_only(method)
        return BlobRoute(name, parse_digest(rest[-1]), ns)
    if len(rest) >= 2 and rest[-1] == "uploads" and rest[-2] == "blobs":
        parse_name("/".join(rest[:-2]))
        raise _unsupported(method, "blob upload")
    if len(rest) >= 3 and rest[-3:-1] == ["blobs", "uploads"]:
        parse_name("/".join(rest[:-3]))
        raise _unsupported(method, "blob upload")
    if len(rest) >= 2 and rest[-2:] == ["tags", "list"]:
        parse_name("/".join(rest[:-2]))
        raise _unsupported(method, "tags list")
    if len(rest) >= 2 and rest[-2] == "referrers":
        parse_name("/".join(rest[:-2]))
        raise not_found({"endpoint": "referrers"}, "the referrers API is not supported")
    raise _unknown(segments, path)


def _unknown(segments: list[str], path: str) -> OCIError:
    shown = path if len(path) <= 80 else path[:80] + "..."
    if _looks_like_traversal(segments):
        return bad_request({"path": shown}, "path has escapes, dot or empty segments")
    return not_found({"path": shown})
