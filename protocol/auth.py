"""Registry authentication: `WWW-Authenticate` challenges, and celld's pull tokens.

Owns: turning the challenges an upstream registry sends with a 401 into values, the
query of the token request a Bearer challenge asks for (the docker token flow:
GET realm?service=...&scope=...), and the pull tokens staging hands out for private
images (`mint_pull_token`, `verify_pull_token`, `token_from_authorization`), and the
challenges and token answers through which a runtime comes to present one.

Never: raises on what a remote registry sent (garbage yields fewer challenges, possibly
none), does I/O, or sees a credential: the caller adds those to the token request.

Parsing follows RFC 9110 section 11:

    WWW-Authenticate = #challenge
    challenge  = auth-scheme [ 1*SP ( token68 / #auth-param ) ]
    auth-param = token BWS "=" BWS ( token / quoted-string )

Several challenges may share one header, separated by commas like their parameters:
a token followed by "=" is a parameter of the current challenge; a token followed by
anything else starts the next challenge. Scheme and parameter names are
case-insensitive and stored lowercase; a repeated parameter keeps its first value.
Quoted strings may hold commas and backslash escapes; an unterminated quote ends the
parse (what follows it cannot be read reliably). Each character is looked at a bounded
number of times, so hostile headers cost linear time.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import blake3

from protocol.errors import OCIError, bad_request
from protocol.reference import parse_ns

_TCHAR = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_TOKEN68 = frozenset("-._~+/0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_OWS = " \t"


@dataclass(frozen=True)
class Challenge:
    """One challenge: its scheme ("bearer", "basic", ...) and its parameters."""

    scheme: str
    params: Mapping[str, str] = field(default_factory=dict)
    token68: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))

    def __hash__(self) -> int:
        return hash((self.scheme, tuple(sorted(self.params.items())), self.token68))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Challenge):
            return NotImplemented
        return (self.scheme, dict(self.params), self.token68) == (
            other.scheme,
            dict(other.params),
            other.token68,
        )


class _Scanner:
    """A cursor over the header; every method advances or leaves `pos` unchanged."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def at_end(self) -> bool:
        return self.pos >= len(self.text)

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def skip(self, chars: str) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in chars:
            self.pos += 1

    def token(self, alphabet: frozenset[str] = _TCHAR) -> str:
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] in alphabet:
            self.pos += 1
        return self.text[start : self.pos]

    def quoted(self) -> str | None:
        """A quoted-string's content, or None when it is unterminated.

        An unterminated quote swallows the rest of the header (pos goes to the end):
        retrying from each later quote would make hostile input cost quadratic time.
        """
        self.pos += 1  # the opening quote
        out: list[str] = []
        while self.pos < len(self.text):
            ch = self.text[self.pos]
            if ch == '"':
                self.pos += 1
                return "".join(out)
            if ch == "\\" and self.pos + 1 < len(self.text):
                self.pos += 1
                ch = self.text[self.pos]
            out.append(ch)
            self.pos += 1
        return None


def _param(scan: _Scanner) -> tuple[str, str] | None:
    """`name = value` at the cursor, or None with the cursor where it was (or at the
    end, after an unterminated quote)."""
    start = scan.pos
    name = scan.token()
    if name:
        scan.skip(_OWS)
        if scan.peek() == "=":
            scan.pos += 1
            scan.skip(_OWS)
            if scan.peek() == '"':
                value = scan.quoted()
                if value is None:
                    return None  # unterminated: the cursor stays at the end
                return name.lower(), value
            value = scan.token()
            if value:
                return name.lower(), value
    scan.pos = start
    return None


def _token68(scan: _Scanner) -> str | None:
    """A token68 that is the whole credentials part of its challenge, else None."""
    start = scan.pos
    value = scan.token(_TOKEN68)
    if value:
        while scan.peek() == "=":
            scan.pos += 1
            value += "="
        end = scan.pos
        scan.skip(_OWS)
        if scan.at_end() or scan.peek() == ",":
            return value
        scan.pos = end
    scan.pos = start
    return None


def parse_www_authenticate(header: str) -> list[Challenge]:
    """Every challenge in one `WWW-Authenticate` value that could be read, in order."""
    if isinstance(header, bytes):
        header = header.decode("latin-1")
    if not isinstance(header, str):
        return []
    scan = _Scanner(header)
    challenges: list[Challenge] = []
    while not scan.at_end():
        scan.skip(_OWS + ",")
        scheme = scan.token()
        if not scheme:
            if not scan.at_end():
                scan.pos += 1  # garbage between challenges: skip it
            continue
        params: dict[str, str] = {}
        token68 = None
        if scan.peek() in _OWS and scan.peek():
            scan.skip(_OWS)
            token68 = _token68(scan)
            while token68 is None:
                scan.skip(_OWS)
                param = _param(scan)
                if param is None:
                    break
                params.setdefault(*param)
                scan.skip(_OWS)
                if scan.peek() != ",":
                    break
                # A comma: either another parameter or the next challenge follows.
                after_comma = scan.pos
                scan.skip(_OWS + ",")
                if not _param_follows(scan):
                    scan.pos = after_comma
                    break
        challenges.append(Challenge(scheme.lower(), params, token68))
        scan.skip(_OWS)
        if not scan.at_end() and scan.peek() != ",":
            # Junk after a challenge: drop it up to the next comma outside quotes.
            _skip_to_comma(scan)
    return challenges


def _param_follows(scan: _Scanner) -> bool:
    """Whether `token BWS "="` is at the cursor: a parameter, not the next challenge
    (which is a scheme followed by a space, a comma or the end)."""
    start = scan.pos
    found = bool(scan.token())
    scan.skip(_OWS)
    found = found and scan.peek() == "="
    scan.pos = start
    return found


def _skip_to_comma(scan: _Scanner) -> None:
    while not scan.at_end() and scan.peek() != ",":
        if scan.peek() == '"':
            scan.quoted()
        else:
            scan.pos += 1


def token_query(challenge: Challenge, scope: str | None) -> tuple[str, list[tuple[str, str]]]:
    """The token endpoint and query parameters a Bearer challenge asks for.

    `scope` is what we want (e.g. "repository:library/alpine:pull"); the challenge's own
    scope is added when it differs, as docker's client does. Raises ValueError when the
    challenge has no usable realm: only an absolute http(s) URL is one, so a hostile
    registry cannot point the token request at a file or another scheme. The caller
    should still send credentials only to a realm it trusts (same host, or https).
    """
    realm = challenge.params.get("realm", "")
    if not realm.lower().startswith(("https://", "http://")):
        raise ValueError(f"challenge has no http(s) realm: {realm[:100]!r}")
    query: list[tuple[str, str]] = []
    service = challenge.params.get("service")
    if service:
        query.append(("service", service))
    scopes = [s for s in (scope, challenge.params.get("scope")) if s]
    for s in dict.fromkeys(scopes):
        query.append(("scope", s))
    return realm, query


# -- pull tokens -----------------------------------------------------------------
#
# A pull token lets a runtime pull one staged private image from any cell: it is a
# blake3 keyed MAC, under the cluster key every cell shares, over the app scope and
# the image's manifest digest. Any cell checks it with no state (a fresh cell with
# an empty store included), and a token for one app opens nothing of another: the
# scope and digest are inside the MAC. It is not a secret of the user's registry
# account: it grants only what staging already fetched, and only through celld.
#
# Form: "celld1." + base64url(scope) + "." + <64 hex manifest digest> + "." +
# base64url(32-byte MAC). The runtime presents it as the password of HTTP Basic
# (any user name) or as a Bearer token.

PULL_TOKEN_PREFIX = "celld1"
_MAC_CONTEXT = b"celld pull token v1\x00"
SCOPE_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class PullGrant:
    """What a verified pull token allows: the images of `scope` under `manifest`."""

    scope: str
    manifest: str  # "sha256:<hex>"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    """The bytes of `text`, which must be their one canonical encoding (_b64): the last
    character of an unpadded encoding has spare bits that decoding ignores, so without
    the check a token with a byte altered there still verified (hypothesis found it)."""
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if _b64(data) != text:
        raise ValueError("not the canonical base64 of its bytes")
    return data


def _pull_mac(key: bytes, scope: str, manifest_hex: str) -> bytes:
    data = _MAC_CONTEXT + scope.encode() + b"\x00" + manifest_hex.encode()
    return blake3.blake3(data, key=key).digest()


def mint_pull_token(key: bytes, scope: str, manifest_digest: str) -> str:
    """The token staging prints for `scope`'s image `manifest_digest`."""
    if len(key) != 32:
        raise ValueError("the cluster key must be 32 bytes")
    if not SCOPE_RE.fullmatch(scope):
        raise ValueError(f"not a valid app scope: {scope!r}")
    algorithm, _, hex_ = manifest_digest.partition(":")
    if algorithm != "sha256" or not _HEX64.fullmatch(hex_):
        raise ValueError(f"not a sha256 digest: {manifest_digest!r}")
    mac = _pull_mac(key, scope, hex_)
    return f"{PULL_TOKEN_PREFIX}.{_b64(scope.encode())}.{hex_}.{_b64(mac)}"


def verify_pull_token(key: bytes, token: str) -> PullGrant | None:
    """The grant a token carries, or None for anything forged, altered or garbled."""
    if len(token) > 512:
        return None
    parts = token.split(".")
    if len(parts) != 4 or parts[0] != PULL_TOKEN_PREFIX:
        return None
    _, scope_b64, hex_, mac_b64 = parts
    try:
        scope = _unb64(scope_b64).decode()
        mac = _unb64(mac_b64)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    if not SCOPE_RE.fullmatch(scope) or not _HEX64.fullmatch(hex_) or len(mac) != 32:
        return None
    if not hmac.compare_digest(mac, _pull_mac(key, scope, hex_)):
        return None
    return PullGrant(scope, f"sha256:{hex_}")


def token_from_authorization(header: bytes | str | None) -> str | None:
    """The pull token in an Authorization header: Bearer, or Basic's password."""
    if not header:
        return None
    text = header.decode("latin-1") if isinstance(header, bytes) else header
    scheme, _, value = text.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer":
        return value or None
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return None
        _, sep, password = decoded.partition(":")
        return password if sep and password else None
    return None


# -- how a runtime comes to present its token ---------------------------------------
#
# Runtimes send credentials only when challenged, and in two ways:
# - containerd asks for content first and answers a 401's challenge, then keeps
#   sending the credentials to that host. Content answers 401 with BASIC_CHALLENGE.
# - containers/image (skopeo, podman) and docker ping `/v2/` first and take their
#   challenges from that answer only; a 401 on content is never retried. So the base
#   answers 401 with `bearer_challenge`, the docker token flow: the client GETs the
#   realm, with Basic credentials if it has any, and sends the token it gets back as
#   Bearer. A Basic challenge on the base would do for containers/image, but docker
#   refuses to send a request at all after a Basic challenge it has no credentials
#   for, so anonymous docker pulls would break; Bearer has an anonymous answer.
# The token endpoint hands back the pull token it was given (after checking it), or
# ANONYMOUS_TOKEN when given none: the mirror itself stays stateless.

BASIC_CHALLENGE = 'Basic realm="celld"'
ANONYMOUS_TOKEN = "celld-anonymous"
TOKEN_PATH = "/v2/token"
TOKEN_SERVICE = "celld"
TOKEN_LIFETIME = 3600  # seconds; the pull token itself does not expire


def bearer_challenge(host: bytes | str | None) -> str:
    """The base's challenge, naming the token endpoint on the host the client used.

    Raises a 400 `OCIError` for a Host header that is not `host[:port]`: the realm
    must not carry whatever a client put there.
    """
    text = host.decode("latin-1") if isinstance(host, bytes) else host
    try:
        checked = parse_ns(text or "")
    except OCIError:
        raise bad_request({"header": "host"}, "invalid Host header") from None
    return f'Bearer realm="http://{checked}{TOKEN_PATH}",service="{TOKEN_SERVICE}"'


def token_answer(token: str) -> bytes:
    """The token endpoint's JSON body; both names, as docker's and OAuth2's clients read."""
    body = {"token": token, "access_token": token, "expires_in": TOKEN_LIFETIME}
    return json.dumps(body, separators=(",", ":")).encode()
