"""The admin API: what `celld stage`, `pins`, `ls`, `stats` and `gc` talk to.

Owns the unix socket in data_dir (mode 0600: only the daemon's user may stage
or read what is cached) and the JSON of each endpoint (the contract is in the
README). Staging streams its progress as NDJSON lines.

Never logs a request body: staging's carries the user's registry password,
which lives here only as long as the request, in memory.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict

import trio

from celld import __version__
from celld.config import Config
from celld.http import Request, Response, Streamed
from celld.metrics import Metrics
from celld.peering import Peering
from celld.registry import Credentials
from celld.stage import StageError, Stager, StageRequest
from celld.store import BlobEntry, Store
from protocol.errors import OCIError
from protocol.manifest import Platform, parse_manifest
from protocol.reference import parse_image

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024
DEFAULT_GC_KEEP = 3600.0  # seconds: blobs pulled within this stay


def _json(status: int, doc: object) -> Response:
    body = json.dumps(doc, separators=(",", ":")).encode() + b"\n"
    return Response(status, [("Content-Type", "application/json")], body)


def _error(status: int, message: str) -> Response:
    return _json(status, {"error": message})


def parse_platform(text: str) -> Platform:
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"platform must be os/arch[/variant], got {text!r}")
    return Platform(parts[0], parts[1], parts[2] if len(parts) == 3 else None)


class Admin:
    def __init__(
        self,
        config: Config,
        store: Store,
        stager: Stager,
        metrics: Metrics,
        platform: Platform,
        *,
        peering: Peering | None = None,
        removed: Callable[[list[BlobEntry]], None] | None = None,
    ) -> None:
        self.config = config
        self.peering = peering
        self.removed = removed
        self.store = store
        self.stager = stager
        self.metrics = metrics
        self.platform = platform

    async def handle(self, request: Request) -> Response:
        path = request.target.split(b"?", 1)[0].decode("latin-1")
        method = request.method
        try:
            if path == "/v1/status" and method == b"GET":
                return self._status()
            if path == "/v1/stage" and method == b"POST":
                return self._stage(request)
            if path == "/v1/pins" and method == b"GET":
                return self._pins()
            if path.startswith("/v1/pins/") and method == b"DELETE":
                return await self._unpin(path.removeprefix("/v1/pins/"))
            if path == "/v1/ls" and method == b"GET":
                return await self._ls()
            if path == "/v1/stats" and method == b"GET":
                return self._stats()
            if path == "/v1/peers" and method == b"GET":
                return self._peers()
            if path == "/v1/gc" and method == b"POST":
                return await self._gc(request)
        except OCIError as exc:
            return _error(exc.status, f"{exc.message}: {exc.detail}")
        return _error(404, f"no such admin endpoint: {method.decode()} {path}")

    def _status(self) -> Response:
        return _json(
            200,
            {
                "cell": self.config.name,
                "mirror": str(self.config.mirror_listen),
                "data_dir": str(self.config.data_dir),
                "version": __version__,
            },
        )

    # -- staging -----------------------------------------------------------

    def _stage(self, request: Request) -> Response:
        try:
            doc = json.loads(request.body)
            if not isinstance(doc, dict):
                raise ValueError("expected a JSON object")
            image = parse_image(str(doc.get("image", "")))
            app = doc.get("app")
            if not isinstance(app, str) or not app:
                raise ValueError("app is required")
            username, password = doc.get("username"), doc.get("password")
            if (username is None) != (password is None):
                raise ValueError("username and password go together")
            credentials = Credentials(str(username), str(password)) if username else None
            platform = parse_platform(doc["platform"]) if doc.get("platform") else self.platform
        except (ValueError, KeyError) as exc:
            return _error(400, str(exc))
        except OCIError as exc:
            return _error(400, f"invalid image reference: {exc.detail}")
        finally:
            doc = None  # the password goes with the request
        staged = StageRequest(image, app, credentials, platform)
        return Response(
            200, [("Content-Type", "application/x-ndjson")], Streamed(self._stage_events(staged))
        )

    def _stage_events(self, request: StageRequest):
        async def produce(send: Callable[[bytes], Awaitable[None]]) -> None:
            async def emit(event: dict) -> None:
                await send(json.dumps(event, separators=(",", ":")).encode() + b"\n")

            try:
                await self.stager.stage(request, emit)
            except StageError as exc:
                await emit({"event": "error", "status": exc.status, "message": exc.message})
            except Exception:
                log.exception("staging %s failed", request.image)
                await emit(
                    {"event": "error", "status": 500, "message": "internal error (see the log)"}
                )

        return produce

    # -- pins, listing, stats, gc ------------------------------------------

    def _pins(self) -> Response:
        return _json(200, {"pins": [asdict(p) for p in self.store.pins()]})

    async def _unpin(self, app: str) -> Response:
        pin = await trio.to_thread.run_sync(self.store.unpin, app)
        if pin is None:
            return _error(404, f"no app {app!r} is pinned")
        return _json(200, {"app": pin.app, "digest": pin.digest})

    async def _ls(self) -> Response:
        access = await trio.to_thread.run_sync(self.store.access_times)
        tags = await trio.to_thread.run_sync(self.store.tags)
        blobs = [
            {
                "digest": e.digest,
                "size": e.size,
                "media_type": e.media_type,
                "last_used": access.get(e.digest),
                "source": e.source,
                "pinned_by": list(self.store.pinned_by(e.digest)),
                "private": bool(self.store.private_scopes(e.digest)),
            }
            for e in self.store.entries()
        ]
        images = []
        named = set()
        for pin in self.store.pins():
            named.add(pin.digest)
            images.append(self._image(f"{pin.ns}/{pin.name}@{pin.digest}", pin.digest, access))
        for tag in tags:
            if self.store.lookup(tag["digest"]) is not None and not self.store.private_scopes(
                tag["digest"]
            ):
                named.add(tag["digest"])
                images.append(
                    self._image(f"{tag['ns']}/{tag['name']}:{tag['tag']}", tag["digest"], access)
                )
        return _json(200, {"images": images, "blobs": blobs})

    def _image(self, ref: str, digest: str, access: dict[str, float]) -> dict:
        return {
            "image": ref,
            "digest": digest,
            "size": self._image_size(digest),
            "last_used": access.get(digest),
            "pinned_by": list(self.store.pinned_by(digest)),
        }

    def _image_size(self, digest: str) -> int:
        """Manifest plus the blobs it names (for an index: its own bytes and the
        platform manifests' sizes as the index lists them)."""
        entry = self.store.lookup(digest)
        if entry is None:
            return 0
        try:
            manifest = parse_manifest(entry.path.read_bytes(), entry.media_type)
        except (OSError, OCIError):
            return entry.size
        return entry.size + sum(d.size for d in (*manifest.blobs, *manifest.manifests))

    def _stats(self) -> Response:
        m = self.metrics

        def total(counter, **labels: str) -> int:
            return int(
                sum(
                    s.value
                    for metric in counter.collect()
                    for s in metric.samples
                    if s.name.endswith("_total")
                    and all(s.labels.get(k) == v for k, v in labels.items())
                )
            )

        hits = total(m.served, source="store")
        requests = total(m.requests)
        return _json(
            200,
            {
                "store": {
                    "bytes": self.store.total_bytes(),
                    "max_bytes": self.config.max_bytes,
                    "blobs": len(self.store),
                    "pinned_bytes": self.store.pinned_bytes(),
                },
                "mirror": {
                    "requests": requests,
                    "hits": hits,
                    "misses": total(m.served) - hits,
                    "bytes_served": {
                        src: total(m.served_bytes, source=src)
                        for src in ("store", "registry", "upstream", "peer")
                    },
                },
                "singleflight_joins": total(m.singleflight_joins),
                "digest_mismatches": total(m.digest_mismatches),
                "stale_tags_served": total(m.stale_tags),
                "evictions": total(m.evictions),
                **self._cluster_stats(total),
            },
        )

    def _cluster_stats(self, total) -> dict:
        """Peer and gossip figures, on a cell that has peers."""
        if self.peering is None:
            return {}
        m, g = self.metrics, self.peering.gossip.metrics
        members: dict[str, int] = {}
        for metric in g.members.collect():
            for sample in metric.samples:
                members[sample.labels["state"]] = int(sample.value)
        return {
            "peers": {
                "received_bytes": total(m.peer_received_bytes),
                "sent_bytes": total(m.peer_sent_bytes),
                "bad_pieces": total(m.peer_bad_pieces),
                "auth_failures": total(m.peer_auth_failures),
            },
            "gossip": {
                "members": members,
                "datagrams_sent": total(g.sent),
                "datagrams_received": total(g.received),
                "datagrams_dropped": {
                    s.labels["reason"]: int(s.value)
                    for metric in g.dropped.collect()
                    for s in metric.samples
                    if s.name.endswith("_total") and s.value
                },
                "probe_failures": total(g.probe_failures),
            },
        }

    def _peers(self) -> Response:
        if self.peering is None:
            return _json(200, {"cluster": False, "cell": self.config.name, "members": []})
        return _json(
            200,
            {
                "cluster": True,
                "cell": self.config.name,
                "now": time.time(),
                "members": [asdict(p) for p in self.peering.peers()],
            },
        )

    async def _gc(self, request: Request) -> Response:
        keep = DEFAULT_GC_KEEP
        if request.body.strip():
            try:
                doc = json.loads(request.body)
                keep = float(doc.get("keep_seconds", DEFAULT_GC_KEEP))
            except (ValueError, AttributeError, TypeError):
                return _error(400, 'expected {"keep_seconds": <number>}')
        removed = await trio.to_thread.run_sync(self.store.gc, time.time() - keep)
        if self.removed is not None:
            self.removed(removed)
        return _json(
            200,
            {
                "freed_bytes": sum(e.size for e in removed),
                "removed": [{"digest": e.digest, "size": e.size} for e in removed],
            },
        )
