"""The OCI pull API the cell's container runtime talks to on localhost.

Owns the mapping from a parsed request (protocol.routes) to a response: the
headers registries send (Docker-Content-Digest, Content-Type, Content-Length,
Docker-Distribution-API-Version), Range, Accept negotiation, and the choice of
body: a file range sent with sendfile on a hit, or a `FetchBody` that follows
a download in flight. Every request is checked by protocol/ before it touches
the store or a source. Never fetches anything itself (celld.sources does).
"""

from __future__ import annotations

import os
import time

import trio

from celld.http import FileRange, Output, Request, Response
from celld.metrics import Metrics
from celld.sources import Fetch, FetchFailed, Sources
from celld.store import BlobEntry, Store
from protocol.auth import (
    ANONYMOUS_TOKEN,
    BASIC_CHALLENGE,
    PullGrant,
    bearer_challenge,
    token_answer,
    token_from_authorization,
    verify_pull_token,
)
from protocol.errors import OCIError, oci_error
from protocol.manifest import negotiate, parse_manifest
from protocol.ranges import ByteRange, Unsatisfiable, parse_range
from protocol.reference import Digest
from protocol.routes import ApiBase, BlobRoute, ManifestRoute, TokenRoute, route

API_VERSION = ("Docker-Distribution-API-Version", "registry/2.0")


class FetchBody:
    """A blob body read from a download in flight, as fast as it lands.

    Sends from the temp file with sendfile, never past what `Fetch.sendable`
    allows, so the last byte waits for the digest check; a failed fetch
    raises, which closes the client's connection short of Content-Length.
    """

    def __init__(self, fetch: Fetch, start: int, length: int) -> None:
        self.fetch = fetch
        self.start = start
        self.length = length

    async def write(self, out: Output) -> None:
        fetch = self.fetch
        fd = await _open_fetched(fetch)
        try:
            pos, end = self.start, self.start + self.length
            while pos < end:
                changed = fetch.changed
                if fetch.error is not None:
                    raise FetchFailed(fetch.error.detail)
                limit = fetch.sendable(end)
                if limit > pos:
                    await out.sendfile(fd, pos, limit - pos)
                    pos = limit
                else:
                    await changed.wait()
        finally:
            os.close(fd)


async def _open_fetched(fetch: Fetch) -> int:
    """Opens the file a fetch writes. The commit renames it from a worker thread,
    so the temp path can vanish before `fetch.entry` is set: then wait for the
    fetch to finish and open the stored blob (or learn that it failed)."""
    try:
        return os.open(fetch.path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        while not fetch.finished:
            await fetch.changed.wait()
        if fetch.entry is None:
            raise FetchFailed(fetch.error.detail if fetch.error else "fetch failed") from None
        return os.open(fetch.entry.path, os.O_RDONLY | os.O_CLOEXEC)


# What the sources answer when they cannot serve a request: the answers a private
# image would also get from the public paths (absent, refused, or a source down).
_MISSES = frozenset({"MANIFEST_UNKNOWN", "BLOB_UNKNOWN", "UNAUTHORIZED", "UNAVAILABLE"})


def _unauthorized() -> OCIError:
    """401 with the Basic challenge runtimes answer with their pull token.

    One text for content that is private, absent, or that no source could reach: a
    request without the right token must not learn which it was.
    """
    return oci_error(
        "UNAUTHORIZED",
        message="not available without a pull token: private images need the app's token",
        headers=(("WWW-Authenticate", BASIC_CHALLENGE),),
    )


class Mirror:
    def __init__(
        self, sources: Sources, store: Store, metrics: Metrics, cluster_key: bytes | None = None
    ) -> None:
        self.sources = sources
        self.store = store
        self.metrics = metrics
        self.cluster_key = cluster_key
        self._children: dict[str, frozenset[str]] = {}
        # The counters of answered requests, looked up once: a label lookup costs a
        # cold CPU tens of microseconds, on a miss's time to first byte.
        self._answered = {
            kind: metrics.requests.labels(kind, "ok")
            for kind in ("base", "token", "manifest", "blob")
        }

    # -- private content ---------------------------------------------------

    def _grant(self, request: Request) -> PullGrant | None:
        token = token_from_authorization(request.header(b"authorization"))
        if token is None or self.cluster_key is None:
            return None
        return verify_pull_token(self.cluster_key, token)

    async def _needs(self, manifest_digest: str) -> frozenset[str]:
        """Every digest an image's manifest names (memoised: manifests never change)."""
        known = self._children.get(manifest_digest)
        if known is not None:
            return known
        entry = self.store.lookup(manifest_digest)
        if entry is None or not entry.media_type:
            return frozenset()
        data = await trio.to_thread.run_sync(entry.path.read_bytes)
        manifest = parse_manifest(data, entry.media_type)
        children = frozenset(str(d.digest) for d in (*manifest.blobs, *manifest.manifests))
        self._children[manifest_digest] = children
        return children

    async def _grants(self, grant: PullGrant | None, digest: str) -> bool:
        """Does the token open `digest`: the pinned manifest, or a blob it names?"""
        if grant is None:
            return False
        return digest == grant.manifest or digest in await self._needs(grant.manifest)

    async def _check_private(self, grant: PullGrant | None, digest: str) -> None:
        scopes = self.store.private_scopes(digest)
        if not scopes:
            return
        if grant is not None and grant.scope in scopes and await self._grants(grant, digest):
            return
        self.metrics.unauthorized.inc()
        raise _unauthorized()

    def _may_be_private(self) -> bool:
        """Could a request this cell cannot serve publicly be for a private image it
        could serve with a token? Tokens verify only under a cluster key, and a
        cell's private copies live in the central registries (its own store is
        checked before any source)."""
        return self.cluster_key is not None and bool(self.sources.central())

    def _miss(self, err: OCIError, opened: bool) -> OCIError:
        """What a request the sources could not serve hears.

        A request whose token does not open the content is challenged when the
        content may be private: this cell cannot know (a private copy sits under the
        app's own path, which only its token names), and runtimes send their token
        only after a 401. The answer depends only on the public paths, never on a
        private copy existing, so it tells a tokenless client nothing; absent and
        unreachable public content costs an anonymous client its 404 and 503. A
        request whose token opens the content hears what the sources said. Every
        401 carries the challenge: one without it is a dead end to a runtime.
        """
        if err.code not in _MISSES:
            return err
        if err.code == "UNAUTHORIZED" or (not opened and self._may_be_private()):
            self.metrics.unauthorized.inc()
            return _unauthorized()
        return err

    async def handle(self, request: Request) -> Response:
        kind = "other"
        try:
            target = route(request.method, request.target)
            if isinstance(target, ApiBase):
                kind = "base"
                response = self._base(request)
            elif isinstance(target, TokenRoute):
                kind = "token"
                response = self._token(request)
            elif isinstance(target, ManifestRoute):
                kind = "manifest"
                response = await self._manifest(request, target)
            elif isinstance(target, BlobRoute):
                kind = "blob"
                response = await self._blob(request, target)
            else:  # pragma: no cover - route() returns only the above
                raise oci_error("UNSUPPORTED")
        except OCIError as err:
            self.metrics.requests.labels(kind, f"error_{err.status}").inc()
            raise
        self._answered[kind].inc()
        response.headers.append(API_VERSION)
        return response

    def _base(self, request: Request) -> Response:
        """The version check. Where private content may be served, clients that ping
        first (containers/image, docker) are challenged here, the one answer they
        take challenges from, unless they already carry a token (protocol.auth)."""
        token = token_from_authorization(request.header(b"authorization"))
        known = token == ANONYMOUS_TOKEN or (token is not None and self._grant(request))
        if self._may_be_private() and not known:
            raise oci_error(
                "UNAUTHORIZED",
                message="fetch a token (anonymous for public images)",
                headers=(("WWW-Authenticate", bearer_challenge(request.header(b"host"))),),
            )
        return Response(200, [("Content-Type", "application/json")], b"{}")

    def _token(self, request: Request) -> Response:
        """The token endpoint of the base's challenge: the pull token presented as
        Basic credentials, checked, or the anonymous token when none is."""
        token = token_from_authorization(request.header(b"authorization"))
        if token is not None and self._grant(request) is None:
            self.metrics.unauthorized.inc()
            raise oci_error(
                "UNAUTHORIZED",
                message="the password is not a pull token of this cluster",
                headers=(("WWW-Authenticate", BASIC_CHALLENGE),),
            )
        body = token_answer(token or ANONYMOUS_TOKEN)
        return Response(200, [("Content-Type", "application/json")], body)

    async def _manifest(self, request: Request, target: ManifestRoute) -> Response:
        grant = self._grant(request)
        scope = None
        # A token opens one manifest, by digest; never a tag (a tag of a private
        # repository resolves nowhere a cell may look).
        opened = grant is not None and str(target.reference) == grant.manifest
        if isinstance(target.reference, Digest):
            digest = str(target.reference)
            if self.store.lookup(digest) is not None:
                await self._check_private(grant, digest)
            elif opened:
                scope = grant.scope
        try:
            result = await self.sources.manifest(
                target.name, target.reference, target.ns, scope=scope
            )
        except OCIError as err:
            raise self._miss(err, opened) from None
        await self._check_private(grant, result.digest)
        if not negotiate(request.header_values(b"accept") or None, result.media_type):
            raise oci_error(
                "MANIFEST_UNKNOWN",
                detail=f"the manifest is {result.media_type}, which the request does not accept",
            )
        self._count(result.source, "manifest", len(result.data))
        headers = [
            ("Content-Type", result.media_type),
            ("Docker-Content-Digest", result.digest),
            ("Etag", f'"{result.digest}"'),
        ]
        return Response(200, headers, result.data)

    async def _blob(self, request: Request, target: BlobRoute) -> Response:
        grant = self._grant(request)
        opened = await self._grants(grant, str(target.digest))
        try:
            return await self._find_blob(request, target, grant, opened)
        except OCIError as err:
            raise self._miss(err, opened) from None

    async def _find_blob(
        self, request: Request, target: BlobRoute, grant: PullGrant | None, opened: bool
    ) -> Response:
        digest = str(target.digest)
        scope = None
        if self.store.lookup(digest) is not None:
            try:
                await self._check_private(grant, digest)
            except OCIError:
                # Private to an app, but maybe a public image's layer as well: the
                # public chain decides, and its answer is remembered.
                if not await self.sources.publicly_available(target.name, digest, target.ns):
                    raise
                await trio.to_thread.run_sync(self.store.clear_private, digest)
        elif opened:
            assert grant is not None
            scope = grant.scope
        found = await self.sources.blob_first(target.name, target.digest, target.ns, scope=scope)
        if isinstance(found, Fetch) and found.scope is not None and found.scope != scope:
            # Someone's private fetch of this digest is in flight: its bytes are
            # not ours to follow. Once stored, the usual private check decides; if
            # it failed, this request makes its own (its outcome is not ours either).
            while not found.finished:
                await found.changed.wait()
            return await self._find_blob(request, target, grant, opened)
        if isinstance(found, Fetch):
            await found.wait_started()
            if found.size is None or found.entry is not None:
                while not found.finished:
                    await found.changed.wait()
                if found.error is not None:
                    raise found.error
            if found.entry is not None:
                found = found.entry
        if isinstance(found, BlobEntry):
            await self._check_private(grant, found.digest)
            return self._stored_blob(request, found)
        size = found.size
        assert size is not None
        return self._ranged(request, found.digest, size, found.source or "upstream", None, found)

    def _stored_blob(self, request: Request, entry: BlobEntry) -> Response:
        self.store.touch(entry.digest, time.time())
        response = self._ranged(request, entry.digest, entry.size, "store", entry, None)
        self.store.acquire(entry.digest)
        counted = response.on_done

        def done(sent: int) -> None:
            self.store.release(entry.digest)
            if counted is not None:
                counted(sent)

        response.on_done = done
        return response

    def _ranged(
        self,
        request: Request,
        digest: str,
        size: int,
        source: str,
        entry: BlobEntry | None,
        fetch: Fetch | None,
    ) -> Response:
        headers = [
            ("Content-Type", "application/octet-stream"),
            ("Docker-Content-Digest", digest),
            ("Etag", f'"{digest}"'),
            ("Accept-Ranges", "bytes"),
        ]
        range_header = request.header(b"range")
        try:
            wanted = parse_range(range_header.decode("latin-1") if range_header else None, size)
        except Unsatisfiable as exc:
            raise oci_error(
                "RANGE_INVALID",
                detail=f"blob is {size} bytes",
                headers=(("Content-Range", exc.content_range()),),
            ) from None
        status, span = 200, ByteRange(0, size - 1) if size else None
        if wanted is not None:
            status, span = 206, wanted
            headers.append(("Content-Range", wanted.content_range(size)))
        start, length = (span.start, span.length) if span else (0, 0)
        if request.method == b"HEAD" or length == 0:
            body: bytes | FileRange | FetchBody = _Empty(length)
        elif entry is not None:
            fd = os.open(entry.path, os.O_RDONLY | os.O_CLOEXEC)
            body = FileRange(fd, start, length)
        else:
            assert fetch is not None
            body = FetchBody(fetch, start, length)
        return Response(status, headers, body, on_done=self._counter(source))

    def _counter(self, source: str):
        def done(sent: int) -> None:
            self._count(source, "blob", sent)

        return done

    def _count(self, source: str, kind: str, sent: int) -> None:
        self.metrics.served.labels(kind, source).inc()
        self.metrics.served_bytes.labels(kind, source).inc(sent)


class _Empty:
    """A HEAD (or empty) body: announces a length, sends nothing."""

    def __init__(self, length: int) -> None:
        self.length = length

    async def write(self, out: Output) -> None:
        return None
