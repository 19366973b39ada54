"""The OCI distribution grammar: repository names, tags, digests, and `ns` registry hosts.

Owns: deciding whether a string from a request is a valid name, tag, digest or host,
before anything touches the disk or the network. Every parser returns a canonical value
or raises `OCIError` (NAME_INVALID, TAG_INVALID, DIGEST_INVALID), never anything else.

Never: does I/O, or accepts a string it cannot name a rule for. Every check is linear
in the input: lengths are bounded before any regular expression runs, and the
expressions use possessive quantifiers (Python 3.11), so hostile input cannot make them
backtrack.

The grammar (OCI distribution-spec, "Pulling manifests"; distribution's reference
package):

    name      = component *( "/" component )          ; at most 255 characters
    component = [a-z0-9]+ ( ( "." / "_" / "__" / "-"+ ) [a-z0-9]+ )*
    tag       = [a-zA-Z0-9_] [a-zA-Z0-9._-]{0,127}
    digest    = algorithm ":" encoded
    algorithm = [a-z0-9]+ ( [+._-] [a-z0-9]+ )*
    encoded   = [a-zA-Z0-9=_-]+

Only the registered algorithms are accepted: sha256 (64 lowercase hex) and sha512 (128).
A well-formed digest of another algorithm is DIGEST_INVALID (400), as distribution
answers it: UNSUPPORTED would be a 405, which clients read as "wrong method".
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass

from protocol.errors import OCIError, oci_error

NAME_MAX = 255
TAG_MAX = 128
NS_MAX = 255
DIGEST_ALGORITHMS: dict[str, int] = {"sha256": 64, "sha512": 128}
_DIGEST_MAX = 7 + 1 + 128  # "sha512:" + hex; longer strings are rejected unread

_COMPONENT = r"[a-z0-9]++(?:(?:[._]|__|-++)[a-z0-9]++)*+"
_NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*+")
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_ALGORITHM_RE = re.compile(r"[a-z0-9]++(?:[+._-][a-z0-9]++)*+")
_ENCODED_RE = re.compile(r"[A-Za-z0-9=_-]++")
_LOWER_HEX_RE = re.compile(r"[0-9a-f]++")
_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_PORT_RE = re.compile(r"[1-9][0-9]{0,4}")


def _shown(s: str, limit: int = 80) -> str:
    """The part of a bad input worth echoing in an error detail."""
    return s if len(s) <= limit else s[:limit] + "..."


def _digest_invalid(s: str, why: str) -> OCIError:
    return oci_error("DIGEST_INVALID", {"digest": _shown(s), "reason": why}, "invalid digest")


@dataclass(frozen=True)
class Digest:
    """A content digest the mirror can verify: sha256 or sha512, lowercase hex.

    Constructing one checks it, so a `Digest` in hand is always safe to use as a file
    name or a database key.
    """

    algorithm: str
    hex: str

    def __post_init__(self) -> None:
        length = DIGEST_ALGORITHMS.get(self.algorithm)
        if length is None:
            raise _digest_invalid(f"{self.algorithm}:{self.hex}", "unsupported algorithm")
        if len(self.hex) != length or not _LOWER_HEX_RE.fullmatch(self.hex):
            raise _digest_invalid(
                f"{self.algorithm}:{self.hex}", f"{self.algorithm} needs {length} lowercase hex"
            )

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        """The digest of bytes held in memory (manifests; large blobs hash in a thread)."""
        if algorithm not in DIGEST_ALGORITHMS:
            raise _digest_invalid(algorithm, "unsupported algorithm")
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())


def parse_digest(s: str) -> Digest:
    """A digest string ("sha256:<hex>") as a `Digest`, or DIGEST_INVALID."""
    if not isinstance(s, str):
        raise _digest_invalid(repr(s), "not a string")
    if len(s) > _DIGEST_MAX:
        raise _digest_invalid(s, "too long")
    algorithm, colon, encoded = s.partition(":")
    if not colon or not _ALGORITHM_RE.fullmatch(algorithm) or not _ENCODED_RE.fullmatch(encoded):
        raise _digest_invalid(s, "not algorithm:encoded")
    return Digest(algorithm, encoded)


def parse_name(s: str) -> str:
    """A repository name, checked against the spec's grammar, or NAME_INVALID."""
    if not isinstance(s, str):
        raise oci_error("NAME_INVALID", {"name": repr(s), "reason": "not a string"})
    if not s or len(s) > NAME_MAX:
        raise oci_error("NAME_INVALID", {"name": _shown(s), "reason": "length not 1..255"})
    if not _NAME_RE.fullmatch(s):
        raise oci_error("NAME_INVALID", {"name": _shown(s), "reason": "does not match grammar"})
    return s


def parse_tag(s: str) -> str:
    """A tag, checked against the spec's grammar, or TAG_INVALID."""
    if not isinstance(s, str) or len(s) > TAG_MAX or not _TAG_RE.fullmatch(s):
        raise oci_error("TAG_INVALID", {"tag": _shown(str(s))})
    return s


def parse_reference(s: str) -> str | Digest:
    """The `<reference>` of a manifest URL: a digest if it has a colon, else a tag.

    Tags cannot contain ':', so the colon decides which grammar applies and which
    error a bad reference gets.
    """
    if isinstance(s, str) and ":" in s:
        return parse_digest(s)
    return parse_tag(s)


def _ns_invalid(s: str, why: str) -> OCIError:
    return oci_error("NAME_INVALID", {"ns": _shown(s), "reason": why}, "invalid ns registry host")


def parse_ns(s: str) -> str:
    """The registry host containerd sends as `?ns=`, canonical, or NAME_INVALID.

    Accepts `host[:port]` where host is a DNS name (labels of letters, digits and
    inner hyphens, at most 63 each), a dotted-quad IPv4 address, or a bracketed IPv6
    address without a zone; port is 1..65535 without leading zeros. The result is
    lowercased (DNS is case-insensitive) and IPv6 is compressed, so it can be looked up
    directly among the configured `[upstreams."<host>"]`. NAME_INVALID because the host
    is the domain part of the image's full name.
    """
    if not isinstance(s, str):
        raise _ns_invalid(repr(s), "not a string")
    if not s or len(s) > NS_MAX or not s.isascii():
        raise _ns_invalid(s, "empty, too long or not ASCII")
    if s.startswith("["):
        close = s.find("]")
        if close < 0:
            raise _ns_invalid(s, "unclosed [")
        inner, rest = s[1:close], s[close + 1 :]
        if "%" in inner:
            raise _ns_invalid(s, "IPv6 zone identifiers are not allowed")
        try:
            host = f"[{ipaddress.IPv6Address(inner).compressed}]"
        except ValueError:
            raise _ns_invalid(s, "bad IPv6 address") from None
        if rest and not rest.startswith(":"):
            raise _ns_invalid(s, "junk after ]")
        port = rest[1:] if rest else None
    else:
        host, colon, port_text = s.partition(":")
        port = port_text if colon else None
        host = host.lower()
        labels = host.split(".")
        if not all(_LABEL_RE.fullmatch(label) for label in labels):
            raise _ns_invalid(s, "bad host name")
        if all(label.isdigit() for label in labels):
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise _ns_invalid(s, "bad IPv4 address") from None
    if port is not None:
        if not _PORT_RE.fullmatch(port) or int(port) > 65535:
            raise _ns_invalid(s, "port not 1..65535")
        return f"{host}:{port}"
    return host


@dataclass(frozen=True)
class ImageRef:
    """A full image reference as users type it: `docker.io/acme/shop:2.1`."""

    ns: str  # the registry host, canonical ("docker.io")
    name: str  # the repository ("acme/shop", "library/alpine")
    reference: str | Digest  # a tag or a digest

    def __str__(self) -> str:
        sep = "@" if isinstance(self.reference, Digest) else ":"
        return f"{self.ns}/{self.name}{sep}{self.reference}"


DOCKER_HUB = "docker.io"
_HUB_ALIASES = {"index.docker.io", "registry-1.docker.io"}


def parse_image(s: str) -> ImageRef:
    """An image reference, normalised as docker and containerd do.

    The first component is a registry host when it has a '.' or a ':' or is
    `localhost`; otherwise the image is on Docker Hub, where single names live
    under `library/`. No reference means the tag `latest`. A tag and a digest
    together (`name:tag@digest`) keep the digest: it is what gets pulled.
    """
    if not isinstance(s, str) or not s or len(s) > NS_MAX + NAME_MAX + _DIGEST_MAX + 2:
        raise oci_error("NAME_INVALID", {"image": _shown(str(s)), "reason": "empty or too long"})
    rest, at, digest_text = s.partition("@")
    reference: str | Digest | None = parse_digest(digest_text) if at else None
    first, slash, remainder = rest.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        ns = parse_ns(first)
        path = remainder
    else:
        ns, path = DOCKER_HUB, rest
    if ns in _HUB_ALIASES:
        ns = DOCKER_HUB
    last_slash = path.rfind("/")
    colon = path.rfind(":")
    if colon > last_slash:
        path, tag = path[:colon], parse_tag(path[colon + 1 :])
        reference = reference or tag
    if ns == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    return ImageRef(ns, parse_name(path), reference or "latest")
