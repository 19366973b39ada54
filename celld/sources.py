"""The fetch chain: where content the store lacks comes from.

Owns the order of sources (central registries in order, then the upstream
named by `ns`), their health (a dead central registry is skipped for a while
instead of costing every request a connect timeout), and the singleflight:
exactly one fetch per digest however many clients wait, with every waiter
streamed the bytes as they land in the temp file.

The invariant it keeps: nothing becomes visible in the store, and no waiter
receives a blob's last byte, before the whole blob matched its digest. A
mismatch aborts the fetch, every waiter's transfer fails, the source is
counted bad, and the next request starts over.

Never parses names or digests itself (protocol.reference does) and never
speaks HTTP itself (celld.registry does).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import blake3
import httpx
import trio

from celld.config import Config, RegistryConfig
from celld.http_client import Pool
from celld.metrics import Metrics
from celld.peer import PeerError, TableReply
from celld.peering import Peering, TableMiss, Transfer
from celld.registry import (
    BlobResponse,
    Credentials,
    ManifestResponse,
    NotFound,
    RegistryClient,
    RegistryError,
    Unauthorized,
    Unavailable,
)
from celld.store import BlobEntry, BlobWriter, DigestMismatch, Store
from protocol.errors import OCIError, oci_error
from protocol.manifest import MAX_MANIFEST_BYTES, UPSTREAM_ACCEPT, parse_manifest
from protocol.pieces import (
    PieceHasher,
    PieceTable,
    bitmap_full,
    bitmap_ranges,
    piece_hash,
    piece_span,
)
from protocol.placement import LeaseStatus, LookupResult
from protocol.reference import Digest

log = logging.getLogger(__name__)

INLINE_WRITE = 64 << 10  # writes up to this size stay on the event loop
MAX_QUEUED = 8 << 20  # received bytes waiting for the writer thread, at most


def central_repo(ns: str, name: str) -> str:
    """The repository a central registry keeps `ns`'s image `name` under.

    Central registries hold images of many upstreams, so the upstream host is
    the first path component; a port's colon is not allowed in a name.
    """
    return f"{ns.replace(':', '-')}/{name}"


_OUTCOMES: tuple[tuple[type[Exception], str], ...] = (
    (NotFound, "not_found"),
    (Unauthorized, "unauthorized"),
    (Unavailable, "unavailable"),
    (DigestMismatch, "digest_mismatch"),
)


def private_repo(scope: str, ns: str, name: str) -> str:
    """Where central registries keep an app's private image: under a path of its
    own, so a request without the app's pull token never looks there."""
    tag = blake3.blake3(scope.encode()).hexdigest()[:16]
    return f"private/{tag}/{central_repo(ns, name)}"


def service_credentials(reg: RegistryConfig) -> Credentials | None:
    """The platform's own account on a central registry, read once at startup."""
    if reg.username is None or reg.password_file is None:
        return None
    return Credentials(reg.username, reg.password_file.read_text().strip())


def unavailable(detail: str) -> OCIError:
    return OCIError("UNAVAILABLE", "no source could provide the content", 503, detail)


@dataclass(frozen=True)
class Source:
    """One place to fetch from, and the repository name it uses."""

    kind: str  # "registry" or "upstream"
    label: str  # for logs and the index: "registry:<url>", "upstream:<ns>"
    client: RegistryClient
    repo: str
    scope: str | None = None  # content from here is private to this app scope


@dataclass
class Health:
    """A central registry's circuit breaker."""

    down_until: float = 0.0
    failures: int = 0


@dataclass
class Misses:
    """Why the sources of a chain did not answer, and so what the client hears.

    All "not found": the content does not exist (404). Only "not found" and
    "unauthorized": the client may not see it (401). Anything else: a source
    was down or broken (503), worth retrying.
    """

    notes: list[tuple[str, str]] = field(default_factory=list)

    @property
    def last(self) -> str | None:
        return self.notes[-1][0] if self.notes else None

    def error(self, unknown: OCIError) -> OCIError:
        outcomes = {outcome for outcome, _ in self.notes}
        detail = "; ".join(text for _, text in self.notes) or "no source configured"
        if outcomes == {"not_found"}:
            return unknown
        if "unauthorized" in outcomes and outcomes <= {"not_found", "unauthorized"}:
            return oci_error("UNAUTHORIZED", detail=detail)
        return unavailable(detail)


@dataclass(frozen=True)
class ManifestResult:
    media_type: str
    data: bytes
    digest: str
    source: str  # "store", "registry", "upstream"


class FetchFailed(Exception):
    """The fetch a waiter was following did not complete; its bytes are void."""


@dataclass(eq=False)
class Fetch:
    """One blob download in flight, followed by every client that wants it.

    Waiters read the temp file as it grows (`written` bytes are on disk) and
    wait on `changed` for more. `entry` is set once the blob is verified and
    in the store; `error` once it failed.
    """

    digest: str
    size: int | None = None
    path: Any = None
    written: int = 0
    source: str | None = None
    entry: BlobEntry | None = None
    error: OCIError | None = None
    verified: bool = False  # every byte is on disk and matched the digest
    scope: str | None = None  # fetched with this app's token or credentials: private
    changed: trio.Event = field(default_factory=trio.Event)
    # blake3 of each piece, as the bytes stream in (None until the size is known);
    # the first `pieces_done` pieces are hashed and on disk (within `written`).
    pieces: PieceHasher | None = None
    pieces_done: int = 0
    transfer: Transfer | None = None  # the lease holder's pieces, served to peers as read

    @property
    def started(self) -> bool:
        return self.path is not None

    @property
    def finished(self) -> bool:
        return self.entry is not None or self.error is not None

    def notify(self) -> None:
        event, self.changed = self.changed, trio.Event()
        event.set()

    async def wait_started(self) -> None:
        while not (self.started or self.finished):
            await self.changed.wait()
        if self.error is not None and not self.started:
            raise self.error

    def piece_table(self) -> PieceTable | None:
        """The hashes of the pieces a peer may take now (the others None), or
        None before the size is known."""
        if self.pieces is None:
            return None
        table = self.pieces.partial()
        hashes = table.hashes[: self.pieces_done] + (None,) * (table.count - self.pieces_done)
        return PieceTable(table.blob_size, table.piece_size, hashes)

    def sendable(self, end: int) -> int:
        """How far a waiter may send: never the last byte before verification."""
        if self.entry is not None or self.verified:
            return end
        if self.size is None:
            return 0
        return min(end, self.written, self.size - 1)


@dataclass
class _Handoff:
    """How `Sources.blob_first`'s caller tells the fetch task it spawned what the
    first source answered: `opened`, or `failed` (a miss: the next source's turn;
    anything else fails the fetch), or neither (the caller was cancelled: the
    task asks the source again)."""

    done: trio.Event = field(default_factory=trio.Event)
    opened: _Opened | None = None
    failed: Exception | None = None
    spawned: bool = False


@dataclass(frozen=True)
class _Opened:
    """A source's answer with its head read, and the temp file its body goes to:
    what the caller's task hands the fetch task (`Sources.blob_first`). Closing
    `stack` closes the response and drops the temp file unless committed."""

    stack: AsyncExitStack
    writer: BlobWriter
    response: BlobResponse


class Sources:
    def __init__(
        self,
        config: Config,
        store: Store,
        metrics: Metrics,
        nursery: trio.Nursery,
        http: httpx.AsyncClient,
        clock: Callable[[], float] = trio.current_time,
        pool: Pool | None = None,
    ) -> None:
        """`pool`: the lean client blob GETs take (celld.http_client); None: httpx."""
        self.config = config
        self.store = store
        self.metrics = metrics
        self.nursery = nursery
        self.clock = clock
        self._fetches: dict[str, Fetch] = {}
        self.peering: Peering | None = None  # set by the daemon when the cell has peers
        self._manifest_flights: dict[tuple, trio.Event] = {}
        self._health: dict[str, Health] = {}
        self._central = [
            (
                reg.url,
                RegistryClient(
                    reg.url,
                    credentials=service_credentials(reg),
                    http=http,
                    pool=pool,
                    connect_timeout=config.connect_timeout,
                ),
            )
            for reg in config.registries
        ]
        self._upstreams = {
            host: RegistryClient(
                up.url, http=http, pool=pool, connect_timeout=config.connect_timeout
            )
            for host, up in config.upstreams.items()
        }

    # -- the chain ---------------------------------------------------------

    def _chain(self, name: str, ns: str | None, scope: str | None = None) -> list[Source]:
        """Central registries in order (an app's private copies first, when the
        request carries its pull token), then the upstream named by `ns`."""
        ns = ns or "docker.io"
        now = self.clock()
        live = [
            (url, client)
            for url, client in self._central
            if self._health.get(url, Health()).down_until <= now
        ]
        chain = []
        if scope is not None:
            chain += [
                Source("registry", f"registry:{url}", client, private_repo(scope, ns, name), scope)
                for url, client in live
            ]
        chain += [
            Source("registry", f"registry:{url}", client, central_repo(ns, name))
            for url, client in live
        ]
        upstream = self._upstreams.get(ns)
        if upstream is not None:
            chain.append(Source("upstream", f"upstream:{ns}", upstream, name))
        return chain

    async def publicly_available(self, name: str, digest: str, ns: str | None) -> bool:
        """Would an anonymous client get this blob from the public chain? (A layer
        staged with credentials may also belong to a public image.)"""
        if (ns or "docker.io") not in self._upstreams:
            return False
        for source in self._chain(name, ns):
            try:
                if await source.client.has_blob(source.repo, digest):
                    return True
            except RegistryError:
                continue
        return False

    def central(self) -> list[tuple[str, RegistryClient]]:
        """The central registries in order, with the platform's credentials."""
        return list(self._central)

    def upstream_url(self, ns: str) -> str | None:
        up = self.config.upstreams.get(ns)
        return up.url if up else None

    def _check_ns(self, ns: str | None) -> None:
        if (ns or "docker.io") not in self._upstreams:
            raise oci_error("NAME_UNKNOWN", detail=f"no upstream is configured for registry {ns!r}")

    def _miss(self, misses: Misses, source: Source, exc: Exception | str) -> None:
        """Records why `source` did not answer; a dead central registry is benched."""
        outcome = next((name for kind, name in _OUTCOMES if isinstance(exc, kind)), "refused")
        misses.notes.append(
            (outcome, f"{source.label}: {exc if outcome != 'not_found' else 'not found'}")
        )
        self.metrics.fetches.labels(source.kind, outcome).inc()
        if outcome == "digest_mismatch":
            self.metrics.digest_mismatches.labels(source.kind).inc()
            log.error("%s sent bytes that do not match their digest: %s", source.label, exc)
        if outcome == "unavailable":
            log.warning("%s unavailable: %s", source.label, exc)
            self._source_failed(source)

    def _source_failed(self, source: Source) -> None:
        if source.kind != "registry":
            return
        url = source.label.removeprefix("registry:")
        health = self._health.setdefault(url, Health())
        health.failures += 1
        backoff = self.config.source_retry_after * min(8, 2 ** (health.failures - 1))
        health.down_until = self.clock() + backoff

    def _source_ok(self, source: Source) -> None:
        if source.kind == "registry":
            self._health.pop(source.label.removeprefix("registry:"), None)

    # -- blobs -------------------------------------------------------------

    def blob(
        self,
        name: str,
        digest: Digest | str,
        ns: str | None,
        *,
        scope: str | None = None,
        via: Source | None = None,
    ) -> BlobEntry | Fetch:
        """The stored blob, or the fetch (new or joined) that will bring it.

        `scope`: the request carries that app's pull token, so its private copies
        in the central registries are tried first. `via`: fetch from this source
        only (staging, with the user's credentials).
        """
        key = str(digest)
        found = self._known(key)
        if found is not None:
            return found
        if via is None:
            self._check_ns(ns)
        chain = [via] if via is not None else self._chain(name, ns, scope)
        fetch = self._fetches[key] = Fetch(key, scope=via.scope if via is not None else scope)
        self.nursery.start_soon(self._run_fetch, fetch, chain, via is None)
        return fetch

    async def blob_first(
        self, name: str, digest: Digest | str, ns: str | None, *, scope: str | None = None
    ) -> BlobEntry | Fetch:
        """`blob` for a client that waits on the first byte (the mirror).

        A new fetch on a cell without peers sends its first source the request
        and reads the answer's head in the caller's task; the fetch task is
        spawned while the source thinks and takes the answer over from there.
        Otherwise spawning it, its first scheduler round and the waiter's
        wake-up once the head is in all lie on the time to first byte (python -m
        simulations.bench.serve). Whatever happens here (a miss, a cancelled
        caller), the fetch task carries on, so joined waiters are served as by
        `blob`.
        """
        key = str(digest)
        found = self._known(key)
        if found is not None:
            return found
        self._check_ns(ns)
        chain = self._chain(name, ns, scope)
        fetch = self._fetches[key] = Fetch(key, scope=scope)
        if self.peering is not None or not chain:
            self.nursery.start_soon(self._run_fetch, fetch, chain, True)
            return fetch
        handoff = _Handoff()

        def spawn() -> None:
            if not handoff.spawned:
                handoff.spawned = True
                self.nursery.start_soon(self._run_fetch, fetch, chain, False, handoff)

        try:
            handoff.opened = await self._open(fetch, chain[0], spawn)
        except Exception as exc:  # the fetch task's to handle, as if it had met it
            handoff.failed = exc
        finally:  # a cancelled caller included: the fetch task retries the source
            spawn()
            handoff.done.set()
        return fetch

    def _known(self, key: str) -> BlobEntry | Fetch | None:
        """The stored blob, or the fetch in flight to join."""
        entry = self.store.lookup(key)
        if entry is not None:
            return entry
        fetch = self._fetches.get(key)
        if fetch is not None:
            self.metrics.singleflight_joins.inc()
        return fetch

    async def _run_fetch(
        self,
        fetch: Fetch,
        chain: list[Source],
        peers: bool = False,
        handoff: _Handoff | None = None,
    ) -> None:
        """Tries peers (when asked), then `chain` in order; `handoff`: the first
        source's answer, opened by another task (`blob_first`)."""
        misses = Misses()
        opened: _Opened | None = None
        try:
            if handoff is not None:
                await handoff.done.wait()
                opened, failed = handoff.opened, handoff.failed
                if isinstance(failed, (RegistryError, DigestMismatch)):
                    self._miss(misses, chain[0], failed)
                    chain = chain[1:]
                elif failed is not None:
                    raise failed
            if peers and self.peering is not None and await self._from_peers(fetch, misses, chain):
                return
            for source in chain:
                given, opened = opened, None
                try:
                    await self._fetch_from(fetch, source, given)
                    self._source_ok(source)
                    return
                except (RegistryError, DigestMismatch) as exc:
                    self._miss(misses, source, exc)
                    # Bytes already went to waiters: another source cannot
                    # continue them, so this fetch is over.
                    if fetch.started:
                        raise FetchFailed(misses.notes[-1][1]) from exc
            fetch.error = misses.error(oci_error("BLOB_UNKNOWN", detail=fetch.digest))
        except FetchFailed as exc:
            fetch.error = unavailable(str(exc))
        except Exception as exc:  # never let one fetch take the daemon down
            log.exception("fetch of %s failed", fetch.digest)
            fetch.error = unavailable(f"internal error: {type(exc).__name__}")
        finally:
            if fetch.entry is None and fetch.error is None:
                fetch.error = unavailable("fetch cancelled")
            self._fetches.pop(fetch.digest, None)
            fetch.notify()

    async def _peer_table(self, digest: str) -> tuple[LookupResult, tuple[TableReply, str]] | None:
        """The lookup of `digest` and the piece table one of its providers gave; None:
        this cell goes to the registries (granted the lease, or for the counted reason,
        `celld_registry_reads_total{why}`)."""
        peering = self.peering
        assert peering is not None
        result = await peering.locate(digest)
        looked_again = False
        while result is not None:
            if result.lease == LeaseStatus.GRANTED or not (result.providers or result.lease_holder):
                granted = result.lease == LeaseStatus.GRANTED
                self.metrics.registry_reads.labels("lease" if granted else "no_lease").inc()
                if not granted:
                    # Each such cell costs the registries a copy: say why it went there.
                    log.warning(
                        "lookup of %s: no lease and no provider (%s): from the registries",
                        digest,
                        f"answered by {', '.join(result.answered_by)}"
                        if result.answered_by
                        else "no home answered",
                    )
                peering.lease(digest, result)
                return None
            got = await peering.table(result)
            if not isinstance(got, TableMiss):
                return result, got
            # A provider that died meanwhile: once membership knows, the lease moves.
            relocated = await peering.relocate(got, digest)
            if relocated is None and not looked_again:
                looked_again = True  # once: a crowd's providers are a new sample each time
                relocated = await peering.look_again(got, digest)
            if relocated is None:
                log.warning(
                    "no piece table of %s from its providers (%s; lease %s%s; answered by"
                    " %s): from the registries",
                    digest,
                    ", ".join(p.member for p in result.providers) or "none listed",
                    result.lease.name,
                    f" by {result.lease_holder}" if result.lease_holder else "",
                    ", ".join(result.answered_by) or "nobody",
                )
                self.metrics.registry_reads.labels("no_table").inc()
                return None
            result = relocated
        log.warning("lookup of %s never ended: from the registries", digest)
        self.metrics.registry_reads.labels("unfinished").inc()
        return None

    async def _from_peers(self, fetch: Fetch, misses: Misses, chain: list[Source]) -> bool:
        """Takes the blob from other cells when they have it (or are fetching it under
        the lease); False: go to the registries (this cell holds the lease, or nobody
        answered). Waiters follow the verified prefix as pieces land, as they follow a
        registry's stream."""
        peering = self.peering
        assert peering is not None
        found = await self._peer_table(fetch.digest)
        if found is None:
            return False
        result, (reply, member) = found
        table = reply.table
        scopes = sorted(reply.private)
        writer = self.store.new_writer(
            fetch.digest, source=f"peer:{member}", private_scope=scopes[0] if scopes else None
        )
        t = Transfer(
            fetch.digest, writer, table.blob_size, table.piece_size, table,
            private=reply.private, table_from=member,
        )  # fmt: skip
        entry = None
        try:
            fetch.size, fetch.source, fetch.path = t.size, "peer", writer.path
            fetch.notify()
            await _let_waiters_run()
            if t.size and self.store.over_limit(t.size):
                self._evicted(await trio.to_thread.run_sync(self.store.make_room, t.size))
            peering.start(t, result)
            stalled: PeerError | None = None
            rescued = False
            async with trio.open_nursery() as reads:
                try:
                    while True:
                        try:
                            await peering.follow(t, fetch)
                        except PeerError as exc:
                            if rescued or not chain:
                                raise
                            # Nothing came for stall_timeout and the lease did not move:
                            # the pieces still missing come from the registries, once,
                            # rather than the runtime's stream breaking off.
                            rescued = True
                            ranges = bitmap_ranges(bitmap_full(t.count) & ~t.held)
                            log.warning(
                                "%s; its %d missing pieces from the registries",
                                exc, sum(b - a for a, b in ranges),
                            )  # fmt: skip
                            self.metrics.registry_reads.labels("stalled").inc()
                            t.last_progress = time.monotonic()
                            reads.start_soon(self._read_ranges, t, ranges, chain, misses)
                            continue
                        if t.complete:
                            break
                        # The lease came to this cell (its holder died, or was banned): the
                        # pieces nobody else has are read from the registries, by range.
                        ranges, t.upstream = t.upstream, []
                        reads.start_soon(self._read_ranges, t, ranges, chain, misses)
                except PeerError as exc:
                    stalled = exc
                    reads.cancel_scope.cancel()
            if stalled is not None:
                raise stalled
            if not writer.matches():
                peering.bad_table(t)
                raise DigestMismatch(fetch.digest, "the bytes the peers sent")
            fetch.verified = True
            fetch.notify()
            writer.table = t.table  # every piece checked against it, and the digest matches
            entry = await trio.to_thread.run_sync(writer.commit)
            for scope in scopes[1:]:
                await trio.to_thread.run_sync(self.store.mark_private, fetch.digest, scope)
            self.metrics.fetches.labels("peer", "ok").inc()
            self.metrics.fetched_bytes.labels("peer").inc(entry.size)
            self.metrics.store_bytes.inc(entry.size)
            self.metrics.store_blobs.inc()
            fetch.entry = entry
            return True
        except (PeerError, DigestMismatch) as exc:
            outcome = "digest_mismatch" if isinstance(exc, DigestMismatch) else "unavailable"
            self.metrics.fetches.labels("peer", outcome).inc()
            misses.notes.append((outcome, f"peers: {exc}"))
            log.warning("from peers, %s: %s", fetch.digest, exc)
            if fetch.written:
                raise FetchFailed(f"peers: {exc}") from exc
            return False
        finally:
            peering.finished(t, entry)
            writer.abort()

    async def _read_ranges(
        self, t: Transfer, ranges: list[tuple[int, int]], chain: list[Source], misses: Misses
    ) -> None:
        """Pieces `ranges` (half-open, in piece indices) of a peer transfer, from the
        first registry of the chain that answers: each piece is checked against the
        table where it knows the hash, written where it belongs, and fed to the swarm."""
        assert self.peering is not None
        for first, stop in ranges:
            index = first
            for source in chain:
                try:
                    index = await self._read_range(t, source, index, stop)
                    self._source_ok(source)
                    break
                except (RegistryError, DigestMismatch) as exc:
                    self._miss(misses, source, exc)
            for i in range(index, stop):  # no registry had them: the swarm plans again
                await self.peering.registry_piece(t, i, False)

    async def _read_range(self, t: Transfer, source: Source, index: int, stop: int) -> int:
        """Reads pieces index..stop-1 from one source; returns the first piece not read."""
        assert self.peering is not None
        start = index * t.piece_size
        async with source.client.open_blob(source.repo, t.digest, start=start) as response:
            skip = start - response.offset  # a registry that ignored the range
            if skip < 0:
                raise Unavailable(f"{source.label} answered from byte {response.offset}")
            buf = bytearray()
            async for chunk in response.aiter_bytes():
                if skip:
                    cut = min(skip, len(chunk))
                    chunk, skip = chunk[cut:], skip - cut
                buf += chunk
                while index < stop:
                    _, n = piece_span(index, t.size, t.piece_size)
                    if len(buf) < n:
                        break
                    data, buf = bytes(buf[:n]), buf[n:]
                    if t.table is not None and t.table.hashes[index] is None:
                        # a piece the dead lease holder never read: its hash is this
                        # read's, as the lease holder's were (the blob's sha256 checks
                        # them all), and it goes in the table this cell serves, or no
                        # other cell could verify the piece it is sent
                        hashes = list(t.table.hashes)
                        hashes[index] = piece_hash(data)
                        t.table = dataclasses.replace(t.table, hashes=tuple(hashes))
                    elif t.table is not None and not t.table.verify(index, data):
                        raise DigestMismatch(f"{t.digest} piece {index}", "other bytes")
                    await t.write(index, data)
                    self.metrics.fetched_bytes.labels(source.kind).inc(len(data))
                    await self.peering.registry_piece(t, index, True)
                    index += 1
                if index >= stop:
                    break
        return index

    async def _fetch_from(
        self, fetch: Fetch, source: Source, opened: _Opened | None = None
    ) -> None:
        """Fetches the blob from `source` (`opened`: its answer's head already read)."""
        try:
            if opened is None:
                opened = await self._open(fetch, source)
            async with opened.stack:
                await self._follow(fetch, source, opened.writer, opened.response)
        finally:
            if fetch.transfer is not None and fetch.entry is None:
                assert self.peering is not None
                self.peering.finished(fetch.transfer, None)  # the lease goes back
                fetch.transfer = None

    async def _open(
        self, fetch: Fetch, source: Source, while_waiting: Callable[[], None] | None = None
    ) -> _Opened:
        """Sends `source` the request and reads its answer's head; then the fetch
        has started (size and temp file known, waiters told). The temp file is
        created while the source thinks, off the time to first byte, and
        `while_waiting` runs then too."""
        writers: list[BlobWriter] = []

        def prepare() -> None:
            writers.append(
                self.store.new_writer(fetch.digest, source=source.label, private_scope=source.scope)
            )
            if while_waiting is not None:
                while_waiting()

        stack = AsyncExitStack()
        try:
            response = await stack.enter_async_context(
                source.client.open_blob(source.repo, fetch.digest, while_waiting=prepare)
            )
            writer = writers[0]
            stack.callback(writer.abort)
        except BaseException:
            for writer in writers:
                writer.abort()
            await stack.aclose()
            raise
        fetch.size = response.size
        fetch.source = source.kind
        fetch.path = writer.path
        fetch.notify()
        return _Opened(stack, writer, response)

    async def _follow(
        self, fetch: Fetch, source: Source, writer: BlobWriter, response: BlobResponse
    ) -> None:
        """Streams one source's response into `writer`, waiters following, then commits.

        The piece hashes are set up here, after the waiters were told the fetch
        started: no byte is written before, and they are not on the first byte."""
        if response.size is not None:
            fetch.pieces = writer.expect(response.size)
        if self.peering is not None and response.size:
            # this cell looked the digest up and holds the lease: peers may take the
            # pieces it verifies while it reads on
            fetch.transfer = self.peering.reading(fetch.digest, writer, response.size)
        await _let_waiters_run()
        if response.size and self.store.over_limit(response.size):
            evicted = await trio.to_thread.run_sync(self.store.make_room, response.size)
            self._evicted(evicted)
        await self._copy(fetch, writer, response.aiter_bytes())
        if fetch.size is not None and writer.written != fetch.size:
            raise Unavailable(f"{source.label} sent {writer.written} of {fetch.size} bytes")
        if fetch.size is not None and writer.matches():
            # Verified: waiters may finish now; durability (fsync, rename)
            # is the store's business, not the client's.
            fetch.verified = True
            fetch.notify()
        entry = await trio.to_thread.run_sync(writer.commit)
        self.metrics.fetches.labels(source.kind, "ok").inc()
        self.metrics.fetched_bytes.labels(source.kind).inc(entry.size)
        self.metrics.store_bytes.inc(entry.size)
        self.metrics.store_blobs.inc()
        fetch.entry = entry
        if self.peering is not None:
            self.peering.holding(entry)

    def _evicted(self, entries: list[BlobEntry]) -> None:
        for entry in entries:
            log.info("evicted %s (%d bytes, least recently used)", entry.digest, entry.size)
            self.metrics.evictions.inc()
        self.removed(entries)

    def removed(self, entries: list[BlobEntry]) -> None:
        """Blobs eviction or gc took out of the store: counted, and withdrawn from peers."""
        for entry in entries:
            self.metrics.store_bytes.dec(entry.size)
            self.metrics.store_blobs.dec()
        if self.peering is not None and entries:
            self.peering.removed([e.digest for e in entries])

    async def _copy(self, fetch: Fetch, writer: BlobWriter, chunks: AsyncIterator[bytes]) -> None:
        """Moves bytes to disk as they arrive, hashing as it goes.

        This task receives; `_drain` writes (blake3 per piece on the way) and
        `_digest` runs the sha256, each in a worker thread once batches are
        large, so receiving, writing and hashing overlap instead of taking turns,
        and never stall the loop. The two go at their own pace over the same
        chunks, with no step in common: the sha256, the slowest stage, runs on
        one core without a pause while the other takes the rest, and only the
        commit waits for it. What arrives while a stage is busy queues up for it
        (at most MAX_QUEUED bytes each, then receiving waits) and goes to it in
        one call: the busier the stage, the fewer thread round trips per MiB.
        The first chunk is written alone, at once, so waiters get the first
        bytes without delay.
        """
        writes, digests = _Queue(), _Queue()
        failed: Exception | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._drain, fetch, writer, writes)
            nursery.start_soon(self._digest, writer, digests)
            try:
                async for chunk in chunks:
                    await writes.put(chunk)
                    await digests.put(chunk)
            except Exception as exc:
                # The source broke off: what it sent before is still the blob's
                # beginning, so it is written (waiters get it) before the fetch fails.
                failed = exc
            finally:
                writes.close()
                digests.close()
        if failed is not None:
            raise failed

    async def _drain(self, fetch: Fetch, writer: BlobWriter, queue: _Queue) -> None:
        while batch := await queue.take():
            await self._write(fetch, writer, batch)

    @staticmethod
    async def _digest(writer: BlobWriter, queue: _Queue) -> None:
        while batch := await queue.take():
            if sum(map(len, batch)) <= INLINE_WRITE:
                writer.hash_chunks(batch)
            else:
                await trio.to_thread.run_sync(writer.hash_chunks, batch)

    async def _write(self, fetch: Fetch, writer: BlobWriter, batch: list[bytes]) -> None:
        """Writes one batch (blake3 per piece on the way; the sha256 is `_digest`'s):
        small ones on the loop, large ones in a worker thread."""
        if sum(map(len, batch)) <= INLINE_WRITE:
            writer.write_chunks(batch, sha256=False)
        else:
            await trio.to_thread.run_sync(
                functools.partial(writer.write_chunks, batch, sha256=False)
            )
        fetch.written = writer.written
        if writer.pieces is not None:
            done = fetch.pieces_done = writer.pieces.pieces_done
            t = fetch.transfer
            if t is not None and done != t.held.bit_length():
                assert self.peering is not None
                table = fetch.piece_table()
                assert table is not None
                self.peering.registry_pieces(t, table, (1 << done) - 1)
        fetch.notify()

    # -- manifests ---------------------------------------------------------

    async def manifest(
        self, name: str, reference: str | Digest, ns: str | None, *, scope: str | None = None
    ) -> ManifestResult:
        """A manifest by digest (from the store when cached) or by tag (resolved
        upstream, or the last known digest when no source answers)."""
        if isinstance(reference, Digest):
            key = str(reference)
            entry = self.store.lookup(key)
            if entry is not None:
                return await self._stored_manifest(entry)
            self._check_ns(ns)
            async with self._flight(("digest", key)):
                entry = self.store.lookup(key)
                if entry is not None:
                    return await self._stored_manifest(entry)
                return await self._fetch_manifest_by_digest(name, key, ns, scope)
        self._check_ns(ns)
        async with self._flight(("tag", ns, name, reference)):
            return await self._resolve_tag(name, reference, ns)

    @asynccontextmanager
    async def _flight(self, key: tuple) -> AsyncIterator[None]:
        """Lets one task per key talk to sources; the others wait, then re-check."""
        while (event := self._manifest_flights.get(key)) is not None:
            self.metrics.singleflight_joins.inc()
            await event.wait()
        event = trio.Event()
        self._manifest_flights[key] = event
        try:
            yield
        finally:
            del self._manifest_flights[key]
            event.set()

    async def _stored_manifest(self, entry: BlobEntry, source: str = "store") -> ManifestResult:
        if entry.size > MAX_MANIFEST_BYTES:
            raise oci_error("MANIFEST_UNKNOWN", detail=entry.digest)
        data = await trio.to_thread.run_sync(entry.path.read_bytes)
        media_type = entry.media_type
        if not media_type:
            # A layer, a config, or a manifest re-indexed after a crash (which
            # loses its media type): only a parseable manifest is one.
            try:
                media_type = parse_manifest(data, None).media_type
            except OCIError:
                raise oci_error("MANIFEST_UNKNOWN", detail=entry.digest) from None
        return ManifestResult(media_type, data, entry.digest, source)

    async def _get_manifest(
        self, source: Source, ref: str, misses: Misses
    ) -> ManifestResponse | None:
        try:
            got = await source.client.get_manifest(source.repo, ref, UPSTREAM_ACCEPT)
        except RegistryError as exc:
            self._miss(misses, source, exc)
            return None
        self._source_ok(source)
        return got

    async def _fetch_manifest_by_digest(
        self, name: str, digest: str, ns: str | None, scope: str | None
    ) -> ManifestResult:
        misses = Misses()
        if self.peering is not None:
            from_peer = await self._manifest_from_peers(digest)
            if from_peer is not None:
                return from_peer
        for source in self._chain(name, ns, scope):
            got = await self._get_manifest(source, digest, misses)
            if got is None:
                continue
            if _sha256(got.data) != digest:
                self._miss(misses, source, DigestMismatch(digest, _sha256(got.data)))
                continue
            return await self._keep_manifest(got.data, got.media_type, digest, source)
        raise misses.error(oci_error("MANIFEST_UNKNOWN", detail=digest))

    async def _keep_manifest(
        self, data: bytes, media_type: str, digest: str, source: Source
    ) -> ManifestResult:
        scopes = (source.scope,) if source.scope else ()
        await self._keep_bytes(data, media_type, digest, source.kind, source.label, scopes)
        return ManifestResult(media_type, data, digest, source.kind)

    async def _keep_bytes(
        self,
        data: bytes,
        media_type: str | None,
        digest: str,
        kind: str,
        label: str,
        scopes: tuple[str, ...] = (),
    ) -> None:
        """Stores a small verified blob (a manifest), private to `scopes` when given."""
        if self.store.lookup(digest) is not None:
            return
        put = functools.partial(
            self.store.put_bytes,
            digest,
            data,
            media_type=media_type,
            source=label,
            private_scope=scopes[0] if scopes else None,
        )
        entry = await trio.to_thread.run_sync(put)
        for scope in scopes[1:]:
            await trio.to_thread.run_sync(self.store.mark_private, digest, scope)
        self.metrics.store_bytes.inc(entry.size)
        self.metrics.store_blobs.inc()
        self.metrics.fetches.labels(kind, "ok").inc()
        self.metrics.fetched_bytes.labels(kind).inc(entry.size)
        if self.peering is not None:
            self.peering.holding(entry)

    async def _manifest_from_peers(self, digest: str) -> ManifestResult | None:
        """A manifest by digest from a cell that holds it (pinned apps scaling out)."""
        assert self.peering is not None
        got = await self.peering.small_blob(digest, MAX_MANIFEST_BYTES)
        if got is None:
            return None
        data, private, member = got
        if _sha256(data) != digest:
            self.metrics.fetches.labels("peer", "digest_mismatch").inc()
            self.metrics.digest_mismatches.labels("peer").inc()
            log.error("peer %s sent a manifest that does not match %s", member, digest)
            return None
        try:
            media_type = parse_manifest(data, None).media_type
        except OCIError:
            return None  # not a manifest: the registries decide what it is
        await self._keep_bytes(data, media_type, digest, "peer", f"peer:{member}", private)
        return ManifestResult(media_type, data, digest, "peer")

    async def _resolve_tag(self, name: str, tag: str, ns: str | None) -> ManifestResult:
        ns_key = ns or "docker.io"
        unknown = oci_error("MANIFEST_UNKNOWN", detail=f"{name}:{tag}")
        misses = Misses()
        # The upstream is the authority for tags: its "not found" or "not
        # allowed" is final. Central registries stand in only when it is down.
        chain = self._chain(name, ns)
        for source in [*chain[-1:], *chain[:-1]]:
            got = await self._get_manifest(source, tag, misses)
            if got is None:
                if source.kind == "upstream" and misses.last in ("not_found", "unauthorized"):
                    raise Misses(misses.notes[-1:]).error(unknown)
                continue
            digest = _sha256(got.data)
            if got.digest and got.digest != digest:
                self._miss(misses, source, DigestMismatch(got.digest, digest))
                continue
            result = await self._keep_manifest(got.data, got.media_type, digest, source)
            await trio.to_thread.run_sync(
                self.store.set_tag, ns_key, name, tag, digest, time.time()
            )
            return result
        stale = await trio.to_thread.run_sync(self.store.get_tag, ns_key, name, tag)
        entry = self.store.lookup(stale) if stale else None
        if entry is not None:
            self.metrics.stale_tags.inc()
            log.warning("serving last known %s:%s -> %s (no source answered)", name, tag, stale)
            return await self._stored_manifest(entry)
        raise misses.error(unknown)


class _Queue:
    """Chunks from the receiving task to the writing one: `take` returns all that
    waits (an empty list once closed and drained); `put` waits while MAX_QUEUED
    bytes already do."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._size = 0
        self._closed = False
        self._changed = trio.Event()

    def _notify(self) -> None:
        event, self._changed = self._changed, trio.Event()
        event.set()

    async def put(self, chunk: bytes) -> None:
        while self._size >= MAX_QUEUED:
            await self._changed.wait()
        self._chunks.append(chunk)
        self._size += len(chunk)
        self._notify()

    def close(self) -> None:
        self._closed = True
        self._notify()

    async def take(self) -> list[bytes]:
        while not self._chunks and not self._closed:
            await self._changed.wait()
        chunks, self._chunks, self._size = self._chunks, [], 0
        self._notify()
        return chunks


async def _let_waiters_run() -> None:
    """Lets the waiters `Fetch.notify` just woke send their response heads before
    this task copies on: trio runs each batch of runnable tasks in random order,
    so one checkpoint may still run the copy first; after two, every task woken
    before them has had its turn."""
    await trio.lowlevel.checkpoint()
    await trio.lowlevel.checkpoint()


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()
