"""Staging: pin an app to one image digest, with every byte in the store and
in every central registry.

Owns the order of a staging run and its all-or-nothing outcome: resolve the
tag (the cell's platform out of an index), check the store can hold the pins,
fetch and verify every blob, push blobs then manifest to each central
registry, and only then pin. Any failure before the pin leaves no pin and no
manifest pushed (blobs already pushed are content-addressed and harmless).

Credentials: the user's, for the upstream only, live in the `Credentials`
passed in and in the one `RegistryClient` built for this run; both are
dropped when the run ends. Nothing here logs, stores or returns them. What
they fetched is marked private to the app's scope, pushed under the app's
private path in the central registries, and opened later by the pull token
this run returns.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx
import trio

from celld.config import Config
from celld.registry import (
    Credentials,
    NotFound,
    RegistryClient,
    RegistryError,
    Unauthorized,
    Unavailable,
)
from celld.sources import Fetch, Source, Sources, central_repo, private_repo
from celld.store import BlobEntry, Pin, Store
from protocol.auth import SCOPE_RE, mint_pull_token
from protocol.errors import OCIError
from protocol.manifest import UPSTREAM_ACCEPT, Manifest, Platform, parse_manifest, select_platform
from protocol.reference import Digest, ImageRef

Emit = Callable[[dict], Awaitable[None]]

PROGRESS_INTERVAL = 0.1  # seconds between progress events of one phase
CHUNKED_PUSH_OVER = 64 << 20  # larger blobs are pushed in chunks of this size


class StageError(Exception):
    """A staging run that cannot finish, as one line for the user."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class StageRequest:
    image: ImageRef
    app: str
    credentials: Credentials | None
    platform: Platform


@dataclass(frozen=True)
class Resolved:
    """The image a tag names on this cell's platform."""

    digest: str
    manifest: Manifest
    manifest_data: bytes
    media_type: str
    index: tuple[str, bytes, str] | None  # (digest, data, media type) of the index, if any


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


class Stager:
    def __init__(
        self,
        config: Config,
        store: Store,
        sources: Sources,
        http: httpx.AsyncClient,
        cluster_key: bytes | None,
    ) -> None:
        self.config = config
        self.store = store
        self.sources = sources
        self.http = http
        self.cluster_key = cluster_key
        self._locks: dict[str, trio.Lock] = {}

    async def stage(self, request: StageRequest, emit: Emit) -> dict:
        """Runs one staging; returns the final event (also emitted)."""
        if not SCOPE_RE.fullmatch(request.app):
            raise StageError(400, f"app id {request.app!r} must match [a-z0-9][a-z0-9._-]{{0,63}}")
        image = request.image
        upstream_url = self.sources.upstream_url(image.ns)
        if upstream_url is None:
            raise StageError(404, f"no upstream is configured for registry {image.ns}")
        private = request.credentials is not None
        if private and self.cluster_key is None:
            raise StageError(400, "staging a private image needs [cluster] key_file in the config")
        if not self.sources.central():
            raise StageError(400, "no central registry is configured ([[registry]] url)")
        lock = self._locks.setdefault(request.app, trio.Lock())
        async with lock:
            client = RegistryClient(upstream_url, credentials=request.credentials, http=self.http)
            try:
                return await self._run(request, client, private, emit)
            finally:
                await client.aclose()
                del client

    async def _run(
        self, request: StageRequest, client: RegistryClient, private: bool, emit: Emit
    ) -> dict:
        image, app = request.image, request.app
        resolved = await self._resolve(client, image, request.platform)
        blobs = resolved.manifest.blobs
        total = sum(d.size for d in blobs) + len(resolved.manifest_data)
        self._check_room(app, resolved.digest, total)
        await emit(
            {
                "event": "resolved",
                "image": str(image),
                "digest": resolved.digest,
                "blobs": len(blobs),
                "bytes": total,
            }
        )

        source = Source(
            "upstream", f"upstream:{image.ns}", client, image.name, app if private else None
        )
        entries = await self._fetch_all(image, [str(d.digest) for d in blobs], source, emit, total)
        manifests = await self._keep_manifests(resolved, source, app if private else None)

        repo = (
            private_repo(app, image.ns, image.name)
            if private
            else central_repo(image.ns, image.name)
        )
        tag = None if private or isinstance(image.reference, Digest) else str(image.reference)
        for url, central in self.sources.central():
            await self._push(url, central, repo, entries, resolved, tag, private, emit)

        size = sum(e.size for e in entries) + len(resolved.manifest_data)
        pin = Pin(
            app=app,
            image=str(image),
            ns=image.ns,
            name=image.name,
            digest=resolved.digest,
            size=size,
            staged_at=time.time(),
            private=private,
        )
        protected = [resolved.digest, *manifests, *(e.digest for e in entries)]
        previous = await trio.to_thread.run_sync(self.store.pin, pin, protected)
        name = image.name if image.ns == "docker.io" else f"{image.ns}/{image.name}"
        done = {
            "event": "done",
            "app": app,
            "digest": resolved.digest,
            "reference": f"{self.config.mirror_listen}/{name}@{resolved.digest}",
            "size": size,
            "private": private,
            "token": (
                mint_pull_token(self.cluster_key, app, resolved.digest)
                if private and self.cluster_key
                else None
            ),
            "moved_from": previous.digest
            if previous and previous.digest != resolved.digest
            else None,
        }
        await emit(done)
        return done

    # -- resolve -----------------------------------------------------------

    async def _manifest(
        self, client: RegistryClient, image: ImageRef, ref: str
    ) -> tuple[bytes, str]:
        try:
            got = await client.get_manifest(image.name, ref, UPSTREAM_ACCEPT)
        except Unauthorized as exc:
            raise StageError(401, f"{image.ns} refused access to {image.name}: {exc}") from None
        except NotFound:
            raise StageError(404, f"{image.ns} has no image {image.name}:{ref}") from None
        except Unavailable as exc:
            raise StageError(502, f"{image.ns} is unavailable: {exc}") from None
        except RegistryError as exc:
            raise StageError(502, f"{image.ns}: {exc}") from None
        digest = _sha256(got.data)
        if got.digest and got.digest != digest:
            raise StageError(502, f"{image.ns} sent a manifest that does not match its digest")
        if ref.startswith("sha256:") and ref != digest:
            raise StageError(502, f"{image.ns} sent a manifest that does not match {ref}")
        return got.data, got.media_type

    async def _resolve(self, client: RegistryClient, image: ImageRef, want: Platform) -> Resolved:
        data, media_type = await self._manifest(client, image, str(image.reference))
        try:
            manifest = parse_manifest(data, media_type)
        except OCIError as exc:
            raise StageError(502, f"{image} has an invalid manifest: {exc.detail}") from None
        index = None
        if manifest.is_index:
            chosen = select_platform(manifest, want)
            if chosen is None:
                arch = f"{want.os}/{want.architecture}" + (
                    f"/{want.variant}" if want.variant else ""
                )
                raise StageError(404, f"{image} has no image for platform {arch}")
            index = (_sha256(data), data, manifest.media_type)
            data, media_type = await self._manifest(client, image, str(chosen.digest))
            try:
                manifest = parse_manifest(data, media_type)
            except OCIError as exc:
                raise StageError(502, f"{image} has an invalid manifest: {exc.detail}") from None
            if manifest.is_index:
                raise StageError(502, f"{image}: an index inside an index is not supported")
        return Resolved(_sha256(data), manifest, data, manifest.media_type, index)

    def _check_room(self, app: str, digest: str, total: int) -> None:
        """Pins must fit the store: say by how much they do not."""
        others = self.store.pinned_bytes(excluding=app)
        limit = self.config.max_bytes
        if others + total > limit:
            raise StageError(
                507,
                f"pins would need {_size(others + total)} but the store holds at most "
                f"{_size(limit)} ([store] max_bytes): short by {_size(others + total - limit)}",
            )

    # -- fetch -------------------------------------------------------------

    async def _fetch_all(
        self, image: ImageRef, digests: list[str], source: Source, emit: Emit, total: int
    ) -> list[BlobEntry]:
        """Fetches every blob through the singleflight (a mirror pull of the same
        digest joins it), reporting progress at most every PROGRESS_INTERVAL."""
        done_before = 0
        entries = []
        last = 0.0

        async def progress(index: int, digest: str, done: int, size: int) -> None:
            await emit(
                {
                    "event": "progress",
                    "phase": "fetch",
                    "registry": None,
                    "blob": digest,
                    "index": index,
                    "blobs": len(digests),
                    "done": done,
                    "total": size,
                    "bytes_done": done_before + done,
                    "bytes_total": total,
                }
            )

        for index, digest in enumerate(digests):
            found = self.sources.blob(image.name, digest, image.ns, via=source)
            while isinstance(found, Fetch) and not found.finished:
                now = trio.current_time()
                if now - last >= PROGRESS_INTERVAL and found.size:
                    last = now
                    await progress(index, digest, found.written, found.size)
                await found.changed.wait()
            if isinstance(found, Fetch):
                if found.entry is None:
                    error = found.error
                    if error is not None and error.status == 401:
                        raise StageError(401, f"{image.ns} refused access to {digest}")
                    detail = error.detail if error is not None else "fetch failed"
                    raise StageError(502, f"could not fetch {digest}: {detail}")
                found = found.entry
            await progress(index, digest, found.size, found.size)
            entries.append(found)
            done_before += found.size
        if source.scope is not None:
            for entry in entries:
                await trio.to_thread.run_sync(self.store.mark_private, entry.digest, source.scope)
        return entries

    async def _keep_manifests(
        self, resolved: Resolved, source: Source, scope: str | None
    ) -> list[str]:
        kept = []
        for digest, data, media_type in [
            *([resolved.index] if resolved.index else []),
            (resolved.digest, resolved.manifest_data, resolved.media_type),
        ]:
            if self.store.lookup(digest) is None:
                await trio.to_thread.run_sync(
                    lambda d=digest, b=data, m=media_type: self.store.put_bytes(
                        d, b, media_type=m, source=source.label, private_scope=scope
                    )
                )
            elif scope is not None:
                await trio.to_thread.run_sync(self.store.mark_private, digest, scope)
            kept.append(digest)
        return kept

    # -- push --------------------------------------------------------------

    async def _push(
        self,
        url: str,
        central: RegistryClient,
        repo: str,
        entries: list[BlobEntry],
        resolved: Resolved,
        tag: str | None,
        private: bool,
        emit: Emit,
    ) -> None:
        mount_from = None
        if private:
            ns_name = repo.split("/", 2)[2]  # private/<tag>/<ns>/<name> -> <ns>/<name>
            mount_from = ns_name
        try:
            done = 0
            total = sum(e.size for e in entries)
            for index, entry in enumerate(entries):
                if not await central.has_blob(repo, entry.digest):
                    await central.push_blob(
                        repo,
                        entry.digest,
                        entry.path,
                        chunk_size=CHUNKED_PUSH_OVER if entry.size > CHUNKED_PUSH_OVER else None,
                        mount_from=mount_from,
                    )
                done += entry.size
                await emit(
                    {
                        "event": "progress",
                        "phase": "push",
                        "registry": url,
                        "blob": entry.digest,
                        "index": index,
                        "blobs": len(entries),
                        "done": entry.size,
                        "total": entry.size,
                        "bytes_done": done,
                        "bytes_total": total,
                    }
                )
            await central.push_manifest(
                repo, resolved.digest, resolved.media_type, resolved.manifest_data
            )
            if tag is not None:
                await central.push_manifest(repo, tag, resolved.media_type, resolved.manifest_data)
        except RegistryError as exc:
            raise StageError(502, f"central registry {url}: {exc}") from None
