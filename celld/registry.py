"""celld's HTTP client for OCI registries: pull, push, and the registry auth flows.

Owns: talking to one registry (a central registry or an upstream such as Docker
Hub) over httpx on trio: manifests and blobs by name and reference, monolithic
and chunked blob uploads, cross-repository mounts; answering a registry's 401
with the token flow (Bearer realm/service/scope) or HTTP Basic; and turning
every way a request can fail into one of four exceptions that tell the fetch
chain what to do next (`NotFound`: try the next source; `Unavailable`: skip
this source for a while; `Unauthorized`: the credentials, or their absence,
are the problem; `RegistryError`: anything else).

Never: logs, reprs, stores or puts into an exception message a password, a
token or an `Authorization` header; sends credentials to any origin but the
registry's own and the token realm it names (redirects to blob storage go out
bare, which httpx also enforces across origins); verifies digests (the fetch
chain hashes what it streams, and decides what a mismatch means).

Theory of operation (auth). A client starts anonymous. The first 401 teaches
it the registry's scheme: with a Bearer challenge it asks the realm for a
token for the scopes the request needs (`repository:<name>:pull`, or
`pull,push`, plus whatever scope the challenge names, such as the source
repository of a mount), sending Basic credentials to the realm if it has
any, and retries the request once with that token. Tokens are cached per
(realm, service, scopes) until shortly before `expires_in`, so later requests
send one at once, without a 401 round trip. With a Basic challenge it retries
with its credentials and sends them with every later request. A request is
sent at most twice: a second 401 (or a refused token request) is
`Unauthorized`, with a one-line message naming the user, never the secret.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import trio

from celld.http_client import Origin, Pool, Timeouts
from celld.http_client import Response as LeanResponse
from protocol.auth import Challenge, parse_www_authenticate, token_query
from protocol.reference import parse_digest, parse_name, parse_reference

log = logging.getLogger(__name__)

USER_AGENT = "celld/0.1"
_LEAN_HEADERS = [(b"user-agent", USER_AGENT.encode()), (b"accept", b"*/*")]
DEFAULT_TOKEN_TTL = 60.0  # the token spec's default when a realm omits expires_in
TOKEN_MARGIN = 10.0  # stop using a token this long before it expires (at most 1/4 of its life)
MAX_MANIFEST_BYTES = 4 * 1024 * 1024  # containerd's limit; a bigger "manifest" is an attack
MAX_SMALL_BODY = 64 * 1024  # token and error bodies
FILE_CHUNK = 1024 * 1024  # read size when uploading from a file

Body = bytes | Callable[[], AsyncIterator[bytes]]


@dataclass(frozen=True)
class Credentials:
    """A user's registry credentials, held in memory for one staging only.

    The password never appears in `repr`/`str`, and the object refuses to be
    pickled: nothing that holds one can write it anywhere by accident.
    """

    username: str
    password: str = field(repr=False)

    def __repr__(self) -> str:
        return f"Credentials(username={self.username!r}, password=<hidden>)"

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError("Credentials are never serialised")

    def _basic(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()


class RegistryError(Exception):
    """A registry refused or failed a request; `code` is the OCI error code if it sent one."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code


class NotFound(RegistryError):
    """The registry answered, and it does not have it (404)."""


class Unauthorized(RegistryError):
    """Credentials are missing, wrong, or lack access (a second 401, a 403, a refused token)."""


class Unavailable(RegistryError):
    """The registry did not answer usefully (connect error, timeout, 5xx, 429): skip it.

    `retry_after` is the registry's own `Retry-After`, in seconds, when it sent one.
    """

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: Any):
        super().__init__(message, **kw)
        self.retry_after = retry_after


@dataclass(frozen=True)
class ManifestResponse:
    media_type: str
    data: bytes
    digest: str | None  # Docker-Content-Digest, as the registry sent it (unverified)


class ManifestHead(NamedTuple):
    media_type: str
    digest: str | None
    size: int | None


class BlobResponse:
    """A blob body being received; read it with `aiter_bytes`, inside `open_blob`."""

    def __init__(
        self, chunks: AsyncIterator[bytes], length: str | None, where: str, offset: int = 0
    ) -> None:
        self._chunks = chunks
        self._where = where
        self.size: int | None = int(length) if length and length.isdigit() else None
        self.offset = offset  # where the body begins in the blob (a 206's range)

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        """The body as it arrives, as each network read gave it."""
        try:
            async for chunk in self._chunks:
                yield chunk
        except httpx.TransportError as exc:
            raise Unavailable(f"{self._where}: transfer failed: {_describe(exc)}") from exc


def _offset(status: int, content_range: str | None) -> int:
    """Where a response body begins in the blob: a 206's `bytes START-END/SIZE`."""
    if status != 206 or not content_range:
        return 0
    unit, _, spec = content_range.partition(" ")
    first = spec.partition("-")[0]
    return int(first) if unit == "bytes" and first.isdigit() else 0


def _describe(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _scope(name: str, actions: str) -> str:
    return f"repository:{name}:{actions}"


def _actions(scopes: Iterable[str]) -> str:
    """The verb for messages ("pull" or "push"): what the caller was trying to do."""
    return "push" if any(s.endswith("push") for s in scopes) else "pull"


def _error_fields(body: bytes) -> tuple[str | None, str]:
    """(code, message) of an OCI error body, or (None, "") if it is not one."""
    try:
        first = json.loads(body)["errors"][0]
        code, message = first.get("code"), first.get("message")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None, ""
    # A remote's words go into our one-line messages: one line, bounded.
    message = " ".join(str(message or "").split())[:200]
    return (" ".join(str(code).split())[:64] or None) if code else None, message


async def _read_limited(response: httpx.Response, limit: int, where: str) -> bytes:
    length = response.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise RegistryError(f"{where}: body of {length} bytes is over the {limit}-byte limit")
    data = bytearray()
    try:
        async for chunk in response.aiter_bytes():
            data += chunk
            if len(data) > limit:
                raise RegistryError(f"{where}: body is over the {limit}-byte limit")
    except httpx.TransportError as exc:
        raise Unavailable(f"{where}: transfer failed: {_describe(exc)}") from exc
    return bytes(data)


@dataclass
class _CachedToken:
    value: str
    usable_until: float


class RegistryClient:
    """One registry, at `base_url` (scheme://host[:port]), as one set of credentials.

    `http` may be shared among clients (connection pooling); the client then
    leaves it open on `aclose`. Timeouts are this client's own, per request:
    a short `connect_timeout` so that a dead registry is skipped quickly.
    Names, references and digests are checked with protocol.reference before
    any request is made; a bad one raises that module's `OCIError`.
    """

    def __init__(
        self,
        base_url: str,
        *,
        credentials: Credentials | None = None,
        http: httpx.AsyncClient | None = None,
        pool: Pool | None = None,
        connect_timeout: float = 2.0,
        read_timeout: float = 30.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._origin = httpx.URL(self.base_url)
        self._where = self._origin.netloc.decode() or self.base_url
        self._credentials = credentials
        self._own_http = http is None
        self._http = http if http is not None else httpx.AsyncClient()
        self._timeout = httpx.Timeout(
            connect=connect_timeout, read=read_timeout, write=read_timeout, pool=read_timeout
        )
        self._pool = pool  # blob GETs go through it when given (see celld.http_client)
        if pool is not None:
            self._lean_origin = Origin.of(self._origin)
            self._lean_prefix = self._origin.raw_path.rstrip(b"/")
        self._pool_timeouts = Timeouts(connect=connect_timeout, read=read_timeout)
        self._scheme: str | None = None  # "bearer" or "basic", once a 401 told us
        self._bearer: Challenge | None = None
        self._tokens: dict[tuple, _CachedToken] = {}
        self._token_locks: dict[tuple, trio.Lock] = {}

    def __repr__(self) -> str:
        user = self._credentials.username if self._credentials else None
        return f"RegistryClient({self.base_url!r}, user={user!r})"

    async def aclose(self) -> None:
        if self._own_http:
            await self._http.aclose()

    # -- pull ----------------------------------------------------------------

    async def get_manifest(self, name: str, reference: str, accept: str) -> ManifestResponse:
        name, reference = parse_name(name), str(parse_reference(str(reference)))
        async with self._stream(
            "GET",
            self._url(f"/v2/{name}/manifests/{reference}"),
            scopes=(_scope(name, "pull"),),
            headers={"Accept": accept},
        ) as response:
            data = await _read_limited(response, MAX_MANIFEST_BYTES, self._where)
        return ManifestResponse(
            _media_type(response), data, response.headers.get("docker-content-digest")
        )

    async def head_manifest(self, name: str, reference: str, accept: str) -> ManifestHead:
        name, reference = parse_name(name), str(parse_reference(str(reference)))
        async with self._stream(
            "HEAD",
            self._url(f"/v2/{name}/manifests/{reference}"),
            scopes=(_scope(name, "pull"),),
            headers={"Accept": accept},
        ) as response:
            length = response.headers.get("content-length", "")
            return ManifestHead(
                _media_type(response),
                response.headers.get("docker-content-digest"),
                int(length) if length.isdigit() else None,
            )

    @asynccontextmanager
    async def open_blob(
        self,
        name: str,
        digest: str,
        *,
        while_waiting: Callable[[], None] | None = None,
        start: int = 0,
    ) -> AsyncIterator[BlobResponse]:
        """The blob's body as it arrives; follows the redirects registries send to storage.

        `while_waiting` runs once before the response arrives: with the lean
        client, while the registry thinks, so the caller's preparations (a
        temp file) are off the time to first byte. `start`: from that byte on
        (Range; `BlobResponse.offset` says where the body really begins, 0 when
        the registry ignored the range).
        """
        name, digest = parse_name(name), str(parse_digest(str(digest)))
        path = f"/v2/{name}/blobs/{digest}"
        scopes = (_scope(name, "pull"),)
        ranged = [(b"range", f"bytes={start}-".encode())] if start else []
        if self._pool is not None:
            lean = await self._lean_get(path, scopes, while_waiting, ranged)
            if lean is not None:
                try:
                    yield BlobResponse(
                        lean.chunks(),
                        lean.header(b"content-length"),
                        self._where,
                        _offset(lean.status, lean.header(b"content-range")),
                    )
                finally:
                    await lean.aclose()
                return
        elif while_waiting is not None:
            while_waiting()
        async with self._stream(
            "GET",
            self._url(path),
            scopes=scopes,
            headers={k.decode(): v.decode() for k, v in ranged},
            ok=(200, 206),
            follow_redirects=True,
        ) as response:
            yield BlobResponse(
                response.aiter_bytes(),
                response.headers.get("content-length"),
                self._where,
                _offset(response.status_code, response.headers.get("content-range")),
            )

    async def _lean_get(
        self,
        path: str,
        scopes: tuple[str, ...],
        while_waiting: Callable[[], None] | None,
        extra: list[tuple[bytes, bytes]] | None = None,
    ) -> LeanResponse | None:
        """A 200 through the lean client, or None on a 401: httpx's path answers
        challenges (it has the token flow), then later GETs carry the token here.

        `path` is made of names and digests protocol.reference checked, so it
        goes on the wire as it is: no URL object on the time to first byte."""
        sent = await self._authorization(scopes, stale=None)
        where = f"{self._where}: GET {path}"
        assert self._pool is not None
        try:
            response = await self._pool.get(
                self._lean_origin,
                self._lean_prefix + path.encode("ascii"),
                [*_LEAN_HEADERS, *extra] if extra else _LEAN_HEADERS,
                self._pool_timeouts,
                authorization=sent.encode("latin-1") if sent is not None else None,
                while_waiting=while_waiting,
            )
        except httpx.TooManyRedirects as exc:
            raise RegistryError(f"{where}: too many redirects") from exc
        except httpx.TransportError as exc:
            raise Unavailable(f"{where}: {_describe(exc)}") from exc
        if response.status == 200 or (extra and response.status == 206):
            return response
        try:
            body = await response.read(MAX_SMALL_BODY)
        except httpx.TransportError:
            body = b""
        finally:
            await response.aclose()
        if response.status == 401:
            return None
        self._raise_status(response.status, response.header(b"retry-after"), body, where)
        raise AssertionError("unreachable: _raise_status always raises")

    async def has_blob(self, name: str, digest: str) -> bool:
        """HEAD of a blob: lets staging skip what a registry already holds."""
        name, digest = parse_name(name), str(parse_digest(str(digest)))
        try:
            async with self._stream(
                "HEAD",
                self._url(f"/v2/{name}/blobs/{digest}"),
                scopes=(_scope(name, "pull"),),
                follow_redirects=True,
            ):
                return True
        except NotFound:
            return False

    # -- push ----------------------------------------------------------------

    async def push_blob(
        self,
        name: str,
        digest: str,
        data_or_path: bytes | Path,
        *,
        chunk_size: int | None = None,
        mount_from: str | None = None,
    ) -> None:
        """Uploads one blob: mounted from `mount_from` if the registry can, else sent.

        Monolithic (POST, then one PUT with the body) when `chunk_size` is None,
        else PATCHes of `chunk_size` bytes and a closing PUT. The registry checks
        the digest on the closing PUT; a mismatch is its DIGEST_INVALID.
        """
        name, digest = parse_name(name), str(parse_digest(str(digest)))
        if chunk_size is not None and chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        scopes = (_scope(name, "pull,push"),)
        start = self._url(f"/v2/{name}/blobs/uploads/")
        response: httpx.Response | None = None
        if mount_from is not None:
            mount_from = parse_name(mount_from)
            try:
                response = await self._request(
                    "POST",
                    start.copy_merge_params({"mount": digest, "from": mount_from}),
                    scopes=(*scopes, _scope(mount_from, "pull")),
                    ok=(201, 202),
                )
            except Unauthorized:
                # No pull access to the source repository: upload it instead.
                log.debug("%s: mount of %s from %s refused", self._where, digest, mount_from)
            if response is not None and response.status_code == 201:
                return
        if response is None:
            response = await self._request("POST", start, scopes=scopes, ok=(202,))
        location = self._location(response)
        size = len(data_or_path) if isinstance(data_or_path, bytes) else _file_size(data_or_path)
        if chunk_size is None:
            await self._request(
                "PUT",
                location.copy_merge_params({"digest": digest}),
                scopes=scopes,
                headers={
                    "Content-Type": "application/octet-stream",
                    "Content-Length": str(size),
                },
                content=_body(data_or_path),
                ok=(201,),
            )
            return
        offset = 0
        async for chunk in _chunks(data_or_path, chunk_size):
            end = offset + len(chunk) - 1
            response = await self._request(
                "PATCH",
                location,
                scopes=scopes,
                headers={
                    "Content-Type": "application/octet-stream",
                    "Content-Length": str(len(chunk)),
                    "Content-Range": f"{offset}-{end}",
                },
                content=chunk,
                ok=(202,),
            )
            got = response.headers.get("range", "")
            if got and got.rpartition("-")[2] != str(end):
                raise RegistryError(
                    f"{self._where}: upload of {digest} at {got!r}, expected 0-{end}"
                )
            offset = end + 1
            location = self._location(response)
        if offset != size:
            raise RegistryError(f"{self._where}: {size}-byte file changed during upload")
        await self._request(
            "PUT",
            location.copy_merge_params({"digest": digest}),
            scopes=scopes,
            headers={"Content-Length": "0"},
            ok=(201,),
        )

    async def push_manifest(self, name: str, reference: str, media_type: str, data: bytes) -> str:
        """PUTs a manifest; returns its digest (checked against the registry's own)."""
        name, reference = parse_name(name), str(parse_reference(str(reference)))
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        response = await self._request(
            "PUT",
            self._url(f"/v2/{name}/manifests/{reference}"),
            scopes=(_scope(name, "pull,push"),),
            headers={"Content-Type": media_type},
            content=data,
            ok=(201,),
        )
        theirs = response.headers.get("docker-content-digest")
        if theirs and theirs != digest:
            raise RegistryError(f"{self._where}: stored the manifest as {theirs}, not {digest}")
        return digest

    # -- requests, errors and auth -------------------------------------------

    def _url(self, path: str) -> httpx.URL:
        return httpx.URL(self.base_url + path)

    def _location(self, response: httpx.Response) -> httpx.URL:
        location = response.headers.get("location")
        if not location:
            raise RegistryError(f"{self._where}: upload answer without a Location")
        return self._origin.join(location)

    async def _request(
        self,
        method: str,
        url: httpx.URL,
        *,
        scopes: tuple[str, ...],
        headers: Mapping[str, str] | None = None,
        content: Body | None = None,
        ok: tuple[int, ...] = (200,),
    ) -> httpx.Response:
        """A request whose body (if any) this client does not need to stream."""
        async with self._stream(
            method, url, scopes=scopes, headers=headers, content=content, ok=ok
        ) as response:
            await _read_limited(response, MAX_SMALL_BODY, self._where)
            return response

    @asynccontextmanager
    async def _stream(
        self,
        method: str,
        url: httpx.URL,
        *,
        scopes: tuple[str, ...],
        headers: Mapping[str, str] | None = None,
        content: Body | None = None,
        ok: tuple[int, ...] = (200,),
        follow_redirects: bool = False,
    ) -> AsyncIterator[httpx.Response]:
        """Sends with auth (at most twice, see the module docstring); yields a 2xx response."""
        response = await self._send_authorized(
            method, url, scopes, headers or {}, content, follow_redirects
        )
        try:
            if response.status_code not in ok:
                await self._raise_for(response, method, url)
            yield response
        finally:
            await response.aclose()

    async def _send_authorized(
        self,
        method: str,
        url: httpx.URL,
        scopes: tuple[str, ...],
        headers: Mapping[str, str],
        content: Body | None,
        follow_redirects: bool,
    ) -> httpx.Response:
        challenge_scopes: tuple[str, ...] = ()
        sent: str | None = None
        for attempt in (1, 2):
            sent = await self._authorization(scopes + challenge_scopes, stale=sent)
            request = self._http.build_request(
                method,
                url,
                headers={"User-Agent": USER_AGENT, **headers},
                content=content() if callable(content) else content,
                timeout=self._timeout,
            )
            if sent is not None and _same_origin(url, self._origin):
                request.headers["Authorization"] = sent
            response = await self._send(request, follow_redirects)
            if response.status_code != 401:
                return response
            challenges = [
                c
                for value in response.headers.get_list("www-authenticate")
                for c in parse_www_authenticate(value)
            ]
            await response.aclose()
            basic_refused = sent is not None and self._scheme == "basic"
            if attempt == 2 or basic_refused or not self._learn(challenges):
                raise self._refused(scopes, sent)
            challenge_scopes = tuple(
                s
                for c in challenges
                if c.scheme == "bearer"
                for s in str(c.params.get("scope", "")).split()
                if s not in scopes
            )
        raise AssertionError("unreachable")

    def _learn(self, challenges: list[Challenge]) -> bool:
        """Takes the scheme a 401 asked for; False if we cannot answer it."""
        for challenge in challenges:
            if challenge.scheme != "bearer":
                continue
            # Keep realm and service only: scopes are per request, never inherited.
            bare = Challenge("bearer", {k: v for k, v in challenge.params.items() if k != "scope"})
            try:
                token_query(bare, None)
            except ValueError:
                continue  # no http(s) realm
            self._scheme, self._bearer = "bearer", bare
            return True
        for challenge in challenges:
            if challenge.scheme == "basic" and self._credentials is not None:
                self._scheme = "basic"
                return True
        return False

    def _refused(self, scopes: tuple[str, ...], sent: str | None) -> Unauthorized:
        action, repos = _actions(scopes), sorted({s.split(":")[1] for s in scopes})
        what = f"{action} access to {', '.join(repos)}"
        realm = httpx.URL(self._bearer.params["realm"]) if self._bearer else None
        if self._credentials is None:
            text = f"{self._where} requires credentials for {what}"
        elif realm is not None and not self._may_send_credentials(realm):
            text = (
                f"{self._where} requires credentials for {what}; they were not sent to its"
                f" token realm {realm.netloc.decode()}, on another host over plain http"
            )
        elif sent is not None and self._scheme == "basic":
            text = f"{self._where} refused the credentials of user {self._credentials.username!r}"
        else:
            text = f"{self._where} denied user {self._credentials.username!r} {what}"
        return Unauthorized(text, status=401, code="UNAUTHORIZED")

    async def _authorization(self, scopes: tuple[str, ...], stale: str | None) -> str | None:
        if self._scheme == "basic":
            return self._credentials._basic() if self._credentials else None
        if self._scheme == "bearer" and self._bearer is not None:
            return "Bearer " + await self._token(self._bearer, scopes, stale)
        return None

    async def _token(self, challenge: Challenge, scopes: tuple[str, ...], stale: str | None) -> str:
        wanted = sorted(set(scopes))
        realm, params = token_query(challenge, wanted[0])
        params += [("scope", s) for s in wanted[1:]]
        key = (realm, tuple(params))
        lock = self._token_locks.setdefault(key, trio.Lock())
        async with lock:
            cached = self._tokens.get(key)
            if (
                cached is not None
                and cached.usable_until > trio.current_time()
                and f"Bearer {cached.value}" != stale
            ):
                return cached.value
            value, ttl = await self._fetch_token(realm, params, scopes)
            now = trio.current_time()
            # One entry per repository pulled: drop the stale ones as we go.
            for old in [k for k, t in self._tokens.items() if t.usable_until <= now]:
                del self._tokens[old]
            for old in [k for k, v in self._token_locks.items() if k != key and not v.locked()]:
                if old not in self._tokens:
                    del self._token_locks[old]
            self._tokens[key] = _CachedToken(value, now + ttl - min(TOKEN_MARGIN, ttl / 4))
            return value

    async def _fetch_token(
        self, realm: str, params: list[tuple[str, str]], scopes: tuple[str, ...]
    ) -> tuple[str, float]:
        realm_url = httpx.URL(realm)
        where = f"token service {realm_url.netloc.decode()}"
        headers = {"User-Agent": USER_AGENT}
        if self._credentials is not None:
            if self._may_send_credentials(realm_url):
                headers["Authorization"] = self._credentials._basic()
            else:
                log.warning(
                    "%s: not sending credentials to token realm %s (plain http, another host)",
                    self._where,
                    realm_url.netloc.decode(),
                )
        request = self._http.build_request(
            "GET", realm_url, params=params, headers=headers, timeout=self._timeout
        )
        log.debug("%s: token for %s from %s", self._where, " ".join(scopes), where)
        response = await self._send(request, follow_redirects=False)
        try:
            body = await _read_limited(response, MAX_SMALL_BODY, where)
        finally:
            await response.aclose()
        if response.status_code in (401, 403):
            if self._credentials is None:
                raise Unauthorized(f"{where} requires credentials", status=response.status_code)
            raise Unauthorized(
                f"{where} refused the credentials of user {self._credentials.username!r}",
                status=response.status_code,
            )
        if response.status_code != 200:
            self._raise_status(
                response.status_code, response.headers.get("retry-after"), body, where
            )
        try:
            answer = json.loads(body)
            token = answer.get("token") or answer.get("access_token")
            ttl = float(answer.get("expires_in") or DEFAULT_TOKEN_TTL)
        except (ValueError, AttributeError, TypeError):
            token, ttl = None, 0.0
        if not isinstance(token, str) or not token or ttl <= 0:
            raise RegistryError(f"{where}: answer has no usable token", status=200)
        return token, ttl

    def _may_send_credentials(self, realm: httpx.URL) -> bool:
        """Credentials go to a realm over https, or on the registry's own host."""
        return realm.scheme == "https" or realm.host == self._origin.host

    async def _send(self, request: httpx.Request, follow_redirects: bool) -> httpx.Response:
        where = f"{self._where}: {request.method} {request.url.path}"
        try:
            return await self._http.send(request, stream=True, follow_redirects=follow_redirects)
        except httpx.TooManyRedirects as exc:
            raise RegistryError(f"{where}: too many redirects") from exc
        except httpx.TransportError as exc:  # connect, timeouts, resets, protocol errors
            raise Unavailable(f"{where}: {_describe(exc)}") from exc

    async def _raise_for(self, response: httpx.Response, method: str, url: httpx.URL) -> None:
        try:
            body = await _read_limited(response, MAX_SMALL_BODY, self._where)
        except (RegistryError, httpx.TransportError):
            body = b""
        where = f"{self._where}: {method} {url.path}"
        self._raise_status(response.status_code, response.headers.get("retry-after"), body, where)

    def _raise_status(self, status: int, retry_after: str | None, body: bytes, where: str) -> None:
        code, message = _error_fields(body)
        text = (
            f"{where}: {status}"
            + (f" {code}" if code else "")
            + (f": {message}" if message else "")
        )
        if status == 404:
            raise NotFound(text, status=status, code=code)
        if status in (401, 403):
            raise Unauthorized(text, status=status, code=code)
        if status == 429 or status >= 500:
            retry = retry_after or ""
            raise Unavailable(
                text,
                status=status,
                code=code,
                retry_after=float(retry) if retry.isdigit() else None,
            )
        raise RegistryError(text, status=status, code=code)


def _media_type(response: httpx.Response) -> str:
    return response.headers.get("content-type", "").split(";")[0].strip()


def _same_origin(url: httpx.URL, origin: httpx.URL) -> bool:
    return (url.scheme, url.host, url.port) == (origin.scheme, origin.host, origin.port)


def _file_size(path: Path) -> int:
    return os.stat(path).st_size


def _body(data_or_path: bytes | Path) -> Body:
    if isinstance(data_or_path, bytes):
        return data_or_path

    async def read() -> AsyncIterator[bytes]:
        async with await trio.open_file(data_or_path, "rb") as f:
            while chunk := await f.read(FILE_CHUNK):
                yield chunk

    return read


async def _chunks(data_or_path: bytes | Path, size: int) -> AsyncIterator[bytes]:
    if isinstance(data_or_path, bytes):
        for start in range(0, len(data_or_path), size):
            yield data_or_path[start : start + size]
        return
    async with await trio.open_file(data_or_path, "rb") as f:
        while chunk := await f.read(size):
            yield chunk
