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

from celld.http import FileRange, Output, Request, Response
from celld.metrics import Metrics
from celld.sources import Fetch, FetchFailed, Sources
from celld.store import BlobEntry, Store
from protocol.errors import OCIError, oci_error
from protocol.manifest import negotiate
from protocol.ranges import ByteRange, Unsatisfiable, parse_range
from protocol.routes import ApiBase, BlobRoute, ManifestRoute, route

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


class Mirror:
    def __init__(self, sources: Sources, store: Store, metrics: Metrics) -> None:
        self.sources = sources
        self.store = store
        self.metrics = metrics

    async def handle(self, request: Request) -> Response:
        kind = "other"
        try:
            target = route(request.method, request.target)
            if isinstance(target, ApiBase):
                kind = "base"
                response = Response(200, [("Content-Type", "application/json")], b"{}")
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
        self.metrics.requests.labels(kind, "ok").inc()
        response.headers.append(API_VERSION)
        return response

    async def _manifest(self, request: Request, target: ManifestRoute) -> Response:
        result = await self.sources.manifest(target.name, target.reference, target.ns)
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
        found = self.sources.blob(target.name, target.digest, target.ns)
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
            return self._stored_blob(request, found)
        size = found.size
        assert size is not None
        return self._ranged(request, found.digest, size, found.source or "upstream", None, found)

    def _stored_blob(self, request: Request, entry: BlobEntry) -> Response:
        self.store.touch(entry.digest, time.time())
        return self._ranged(request, entry.digest, entry.size, "store", entry, None)

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
