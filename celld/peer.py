"""The peer API: how cells hand each other whole blobs and pieces over HTTP/1.1.

Owns both ends of the cluster's TCP traffic: `Peer`, the handler celld.http serves on
the cluster address, and `PeerClient`, which a cell uses to ask another. Every request
is signed by its sender and checked first (protocol.peerauth); a request that fails the
check gets 401 and is counted by reason, and nothing about a blob is said to it.

Endpoints (digests are "sha256:<hex>"; bitmaps travel as hex of pieces.bitmap_to_bytes)::

    GET /v2/blobs/<digest>                 a complete blob, sendfile, Range supported
    GET /v2/blobs/<digest>/pieces          the piece table (PieceTable.encode); ?wait=S:
                                           held up to min(S, TABLE_PARK) for a first piece
    GET /v2/blobs/<digest>/pieces/<index>  one verified piece, its blake3 hash in
                                           `Celld-Piece-Hash`; 404 when not held, 503 busy

The version moves with protocol.wire's VERSION: v2 counts pieces of the 1 MiB policy
(protocol.pieces), v1 those of 2 MiB. A v1 cell that still believes a restarted v2 cell
alive (a rolling upgrade, until its probes fail) gets 404, "not held", rather than the
bytes of another span, which it would take for a bad piece and ban the sender for.

Every answer about a known blob carries `Celld-Size`, `Celld-Piece-Size`, `Celld-Pieces`,
`Celld-Have` and `Celld-Complete`, so an asker learns what this cell holds from any reply
(the swarm's PieceReply, over HTTP). Have queries are not requests here: a HaveQuery is
one datagram and its answer another (celld.peering, through celld.gossip), as in the
simulator. A long poll over HTTP cost both cells about a millisecond of CPU each and
held a connection for up to have_wait; a storm asks thousands of them.

A piece's hash travels with it. An asker whose table lacks that hash (the table it got
was partial: its sender was still downloading) checks the piece against the hash its
sender gives beside it. That is the trust of a fresh table from the same sender, which
the asker used to fetch first, a request before most pieces of a storm (940 for 1,500
pieces, 12 cells): the sender vouches for the bytes and their hash alike, and the blob's
sha256 decides in the end either way.

Where blobs come from is not this module's business: a `BlobSource` finds a digest as
`Complete` (a stored file) or `Partial` (the temp file of a download, with the pieces
verified so far), and nothing else is ever read. Who may upload is protocol.swarm's
`Uploader`, the same object the cell's downloads and announcements use: a piece (or a
whole blob) takes an upload slot while it is sent, BUSY is a 503 so the asker goes
elsewhere, and a slot that frees starts a queued upload and answers parked have queries
(`send_have`, the transport's).
`upload_rate` paces all uploads together with one token bucket.
Private blobs are served like any other: only cells of the cluster pass the MAC, and a
cell serves what it got to its own runtime only with the app's pull token (celld.mirror).
Never: fetches anything, writes to the store, or trusts a byte from a peer unchecked (the
client verifies every piece against its table; the blob's sha256 is the caller's).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import hashlib
import logging
import os
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qs, quote, unquote

import httpx
import trio

from celld.http import Output, Request, Response
from celld.http_client import Origin, Pool, Timeouts
from celld.http_client import Response as ClientResponse
from celld.metrics import Metrics
from protocol import peerauth
from protocol.errors import OCIError, oci_error
from protocol.peerauth import Authenticated, Verifier
from protocol.pieces import (
    PieceHasher,
    PieceTable,
    bitmap_from_bytes,
    bitmap_full,
    bitmap_to_bytes,
    piece_count,
    piece_size_for,
    piece_span,
)
from protocol.ranges import ByteRange, Unsatisfiable, parse_range
from protocol.swarm import HaveReply, PieceCancel, PieceRequest, PieceStatus, Uploader

__all__ = [
    "BlobSource",
    "Complete",
    "Partial",
    "Peer",
    "PeerClient",
    "PeerError",
    "PieceAnswer",
    "PieceResult",
    "StoreBlobs",
    "TableReply",
    "TokenBucket",
]

log = logging.getLogger(__name__)

PACE_CHUNK = 256 * 1024  # bytes sent between token-bucket takes when upload_rate is set
QUEUE_WAIT = (
    4.0  # a queued upload that does not start in this time is refused (swarm's request_timeout)
)
# The longest a table request waits for this cell's first verified piece of a blob it
# does not hold yet (a lease holder whose registry read has just begun): the asker's
# one parked request rather than a 404 every TABLE_RETRY (celld.peering).
TABLE_PARK = 1.0
MAX_SPARE = 8  # piece buffers a PeerClient keeps for reuse (1-2 MiB each, usually)
MAX_TABLES = 64  # complete tables kept in memory (16 KiB each at 512 pieces)

API = "/v2"  # see the module docstring: the pieces' layout is part of the version
_ROUTE = re.compile(API.encode() + rb"/blobs/(sha256:[0-9a-f]{64})(?:/(pieces)(?:/([0-9]{1,9}))?)?")


# ---------------------------------------------------------------------------------------
# Where blobs come from


@dataclass(frozen=True)
class Complete:
    """A verified blob in a file. `table` when the source already knows it (else it is
    hashed from the file on first ask, and kept)."""

    path: Path
    size: int
    table: PieceTable | None = None
    private: frozenset[str] = frozenset()  # app scopes the blob is private to


@dataclass(frozen=True)
class Partial:
    """A blob still downloading: its temp file, and the pieces verified and written so
    far (`held`, a bitmap). `table` is what this cell serves as the piece table: the
    hashes it knows (for the lease holder, those of the pieces it verified)."""

    path: Path
    size: int
    piece_size: int
    table: PieceTable
    held: int
    private: frozenset[str] = frozenset()


class BlobSource(Protocol):
    def find(self, digest: str) -> Complete | Partial | None: ...

    def receiving(self, digest: str) -> int | None:
        """Bytes a download of `digest` here has taken in while none of its pieces is
        verified yet (the lease holder before its first piece); None: no such download."""

    def corrupt(self, digest: str) -> None:
        """A stored blob failed its digest when read: drop it (and withdraw it)."""


class StoreBlobs:
    """The complete blobs of a celld.store.Store, private ones included (peers are
    cells of the cluster, authenticated before they ask)."""

    def __init__(self, store) -> None:  # celld.store.Store; untyped to keep imports light
        self.store = store

    def find(self, digest: str) -> Complete | Partial | None:
        entry = self.store.lookup(digest)
        if entry is None:
            return None
        return Complete(entry.path, entry.size, private=self.store.private_scopes(digest))

    def receiving(self, digest: str) -> int | None:
        return None  # a store alone downloads nothing

    def corrupt(self, digest: str) -> None:
        self.store.delete(digest)


@dataclass(frozen=True)
class _Layout:
    """What every answer about a found blob says of it."""

    size: int
    piece_size: int
    count: int
    have: int
    complete: bool

    @classmethod
    def of(cls, found: Complete | Partial) -> _Layout:
        if isinstance(found, Complete):
            psize = found.table.piece_size if found.table else piece_size_for(found.size)
            count = piece_count(found.size, psize)
            return cls(found.size, psize, count, bitmap_full(count), True)
        count = piece_count(found.size, found.piece_size)
        have = found.held & bitmap_full(count)
        return cls(found.size, found.piece_size, count, have, have == bitmap_full(count))

    def headers(self) -> list[tuple[str, str]]:
        return [
            ("Celld-Size", str(self.size)),
            ("Celld-Piece-Size", str(self.piece_size)),
            ("Celld-Pieces", str(self.count)),
            ("Celld-Have", bitmap_to_bytes(self.have, self.count).hex()),
            ("Celld-Complete", "1" if self.complete else "0"),
        ]


# ---------------------------------------------------------------------------------------
# Pacing


class TokenBucket:
    """One rate for every upload of a cell (bytes/s). A taker may run the bucket into
    debt and then sleeps it off, holding a fair lock, so takers go in turn and the rate
    over any second stays near `rate` whatever the number of uploads."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        if rate <= 0:
            raise ValueError("rate must be > 0")
        self.rate = rate
        self.burst = burst if burst is not None else max(PACE_CHUNK, rate / 10)
        self._tokens = self.burst
        self._stamp = trio.current_time()
        self._lock = trio.Lock()

    async def take(self, n: int) -> None:
        async with self._lock:
            now = trio.current_time()
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            self._tokens -= n
            if self._tokens < 0:
                await trio.sleep(-self._tokens / self.rate)


class _Upload:
    """A file range sent with sendfile: at once, or in PACE_CHUNK steps through the
    bucket. The fd is the response's on_done to close (called even if never sent)."""

    def __init__(self, fd: int, offset: int, length: int, bucket: TokenBucket | None) -> None:
        self.fd = fd
        self.offset = offset
        self.length = length
        self.bucket = bucket

    async def write(self, out: Output) -> None:
        if self.bucket is None:
            await out.sendfile(self.fd, self.offset, self.length)
            return
        pos, end = self.offset, self.offset + self.length
        while pos < end:
            n = min(PACE_CHUNK, end - pos)
            await self.bucket.take(n)
            await out.sendfile(self.fd, pos, n)
            pos += n


class CorruptBlob(Exception):
    """A stored blob no longer matches its digest (the disk changed it after it was
    verified): it must not be served, and the store should drop it."""


def _hash_fd(fd: int, size: int, piece_size: int, digest: str) -> PieceTable:
    """The piece table of a file's first `size` bytes (runs in a worker thread). The
    file's sha256 is checked in the same pass: a table is the root of every piece a
    peer will check, so it is never made from bytes that are not the blob."""
    hasher = PieceHasher(size, piece_size)
    whole = hashlib.sha256()
    buf = memoryview(bytearray(min(max(size, 1), 4 << 20)))
    pos = 0
    while pos < size:
        n = os.preadv(fd, [buf[: min(len(buf), size - pos)]], pos)
        if n <= 0:
            raise OSError(f"file ends at {pos} of {size} bytes")
        hasher.feed(buf[:n])
        whole.update(buf[:n])
        pos += n
    if "sha256:" + whole.hexdigest() != digest:
        raise CorruptBlob(digest)
    return hasher.finish()


# ---------------------------------------------------------------------------------------
# The server side


def _error(status: int, detail: str, layout: _Layout | None = None) -> Response:
    codes = {401: "UNAUTHORIZED", 404: "BLOB_UNKNOWN", 416: "RANGE_INVALID", 503: "TOOMANYREQUESTS"}
    code = codes.get(status, "UNSUPPORTED")
    body = oci_error(code, detail=detail, status=status).body()
    headers = [("Content-Type", "application/json")]
    if layout is not None:
        headers.extend(layout.headers())
    return Response(status, headers, body)


def _open(path: Path) -> int | None:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None


class Peer:
    """Serves the peer API (celld.http.serve(host, port, peer.handle)).

    `uploader` is the cell's protocol.swarm.Uploader (shared with its downloads); `blobs`
    finds what may be served; `now` is the cluster's clock (Unix time: MACs use it);
    `send_have` carries the answer to a parked have query to its asker (a datagram);
    `upload_rate` in bytes/s, 0 for no cap."""

    def __init__(
        self,
        cluster_key: bytes,
        uploader: Uploader,
        blobs: BlobSource,
        metrics: Metrics,
        *,
        now: Callable[[], float] = time.time,
        send_have: Callable[[str, HaveReply], None] = lambda to, reply: None,
        upload_rate: float = 0,
        queue_wait: float = QUEUE_WAIT,
        max_tables: int = MAX_TABLES,
    ) -> None:
        self.verifier = Verifier(cluster_key)
        self.uploader = uploader
        self.blobs = blobs
        self.metrics = metrics
        self.now = now
        self.send_have = send_have
        self.upload_rate = upload_rate
        self.queue_wait = queue_wait
        self.max_tables = max_tables
        self._bucket: TokenBucket | None = None
        self._tables: OrderedDict[str, PieceTable] = OrderedDict()
        self._hashing: dict[str, trio.Event] = {}
        self._queued: dict[tuple[str, str, int], trio.Event] = {}
        self._growing: dict[str, trio.Event] = {}  # digest -> parked table requests

    # -- what the cell's downloads call ---------------------------------------

    def wake(self, replies: Iterable[tuple[str, HaveReply]]) -> None:
        """Answers parked have queries: pass what Uploader.add_seed and wake_parked
        return (the cell's own Cell.tick and piece_added answer the others)."""
        for requester, reply in replies:
            self.send_have(requester, reply)

    def refresh(self, digest: str) -> None:
        """Brings the uploader's view of `digest` up to what this cell holds, before a
        have query is answered from it: a source may have gained pieces (or the whole
        blob) that the cell's downloads did not report."""
        self._find(digest)

    def grew(self, digest: str) -> None:
        """This cell verified more pieces of `digest`: parked table requests look again."""
        event = self._growing.pop(digest, None)
        if event is not None:
            event.set()

    # -- requests -------------------------------------------------------------

    async def handle(self, request: Request) -> Response:
        endpoint = "other"
        try:
            checked = self.verifier.verify(
                request.method, request.target, request.headers, self.now()
            )
            if not isinstance(checked, Authenticated):
                self.metrics.peer_auth_failures.labels(checked.reason.value).inc()
                response = _error(401, f"request not authenticated: {checked.reason.value}")
            else:
                endpoint, response = await self._route(checked.cell, request)
        except OCIError as err:
            self.metrics.peer_requests.labels(endpoint, f"error_{err.status}").inc()
            raise
        outcome = "ok" if response.status < 300 else f"error_{response.status}"
        self.metrics.peer_requests.labels(endpoint, outcome).inc()
        return response

    async def _route(self, cell: str, request: Request) -> tuple[str, Response]:
        path, _, query = request.target.partition(b"?")
        match = _ROUTE.fullmatch(path)
        if match is None:
            return "other", _error(404, "no such endpoint")
        if request.method != b"GET":
            response = _error(405, "the peer API is GET only")
            response.headers.append(("Allow", "GET"))
            return "other", response
        digest = match[1].decode("ascii")
        if match[3] is not None:
            return "piece", await self._piece(cell, digest, int(match[3]))
        if match[2]:
            return "table", await self._table(digest, query)
        return "blob", await self._blob(cell, digest, request)

    def _find(self, digest: str) -> tuple[Complete | Partial, _Layout] | None:
        found = self.blobs.find(digest)
        if found is None:
            return None
        layout = _Layout.of(found)
        # The uploader must know what this cell holds (a source may have gained pieces
        # the cell's downloads did not report yet); parked askers that want them wake.
        self.wake(self.uploader.add_seed(digest, layout.count, layout.have))
        return found, self._shown(digest, layout)

    def _shown(self, digest: str, layout: _Layout) -> _Layout:
        """What askers are told this cell holds: a lease holder hides the pieces it has
        sent once, so they go on from the cells that got them (Uploader.shown)."""
        shown = self.uploader.shown(digest, layout.have)
        return layout if shown == layout.have else dataclasses.replace(layout, have=shown)

    def _open_found(self, digest: str) -> tuple[int, Complete | Partial, _Layout] | None:
        """Finds and opens a blob; a download's temp file may be renamed into the store
        between the two, so a vanished file is looked up once more."""
        for _ in range(2):
            hit = self._find(digest)
            if hit is None:
                return None
            fd = _open(hit[0].path)
            if fd is not None:
                return fd, *hit
        return None

    async def _slot(self, requester: str, digest: str, index: int) -> PieceStatus:
        """Takes an upload slot: OK once it is ours, BUSY or MISSING otherwise."""
        reply = self.uploader.on_request(requester, PieceRequest(digest, index), self.now())
        if reply.status is not PieceStatus.QUEUED:
            return reply.status
        key = (requester, digest, index)
        event = self._queued[key] = trio.Event()
        with trio.move_on_after(self.queue_wait):
            await event.wait()
        if event.is_set():
            return PieceStatus.OK
        self._queued.pop(key, None)
        self._started(self.uploader.on_cancel(requester, PieceCancel(digest, index)))
        return PieceStatus.BUSY

    def _started(self, started: list[tuple[str, PieceRequest]]) -> None:
        for requester, req in started:
            event = self._queued.pop((requester, req.digest, req.index), None)
            if event is not None:
                event.set()
            else:  # its asker gave up already
                self._release(requester, req.digest, req.index)

    def _release(self, requester: str, digest: str, index: int) -> None:
        self._started(self.uploader.on_done(requester, digest, index))
        self.wake(self.uploader.wake_parked())

    def _send(
        self,
        status: int,
        headers: list[tuple[str, str]],
        fd: int,
        span: ByteRange | None,
        endpoint: str,
        slot: tuple[str, str, int] | None,
    ) -> Response:
        """A response that sends `span` of `fd`; closing the fd, freeing the slot and
        counting the bytes happen when the body is done, sent or not."""
        if self.upload_rate and self._bucket is None:
            self._bucket = TokenBucket(self.upload_rate)
        start, length = (span.start, span.length) if span else (0, 0)
        body = _Upload(fd, start, length, self._bucket)

        def done(sent: int) -> None:
            with contextlib.suppress(OSError):
                os.close(fd)
            if slot is not None:
                self._release(*slot)
            self.metrics.peer_sent_bytes.labels(endpoint).inc(sent)

        return Response(status, headers, body, on_done=done)

    async def _blob(self, cell: str, digest: str, request: Request) -> Response:
        hit = self._open_found(digest)
        if hit is not None and not isinstance(hit[1], Complete):
            os.close(hit[0])
            return _error(404, "this cell is still downloading that blob", hit[2])
        if hit is None:
            return _error(404, "this cell does not hold that blob")
        fd, _, layout = hit
        try:
            wanted = parse_range(request.header(b"range"), layout.size)
        except Unsatisfiable as exc:
            os.close(fd)
            response = _error(416, f"blob is {layout.size} bytes", layout)
            response.headers.append(("Content-Range", exc.content_range()))
            return response
        headers = [("Content-Type", "application/octet-stream"), ("Accept-Ranges", "bytes")]
        headers.extend(layout.headers())
        status, span = 200, ByteRange(0, layout.size - 1) if layout.size else None
        if wanted is not None:
            status, span = 206, wanted
            headers.append(("Content-Range", wanted.content_range(layout.size)))
        slot = None
        if layout.count:
            # A whole-blob upload holds a slot as a piece upload does, under its own
            # requester key so it never collides with the same cell's piece 0.
            slot = (cell + "\x00blob", digest, 0)
            taken = await self._slot(*slot)
            if taken is not PieceStatus.OK:
                os.close(fd)
                return _error(503, "every upload slot is taken", layout)
        try:
            return self._send(status, headers, fd, span, "blob", slot)
        except BaseException:
            os.close(fd)
            if slot is not None:
                self._release(*slot)
            raise

    async def _table(self, digest: str, query: bytes) -> Response:
        hit = self._open_found(digest)
        if hit is None:
            # ?wait=S: the asker would rather wait (up to TABLE_PARK) than ask again
            try:
                wait = float(parse_qs(query.decode("latin-1")).get("wait", ["0"])[-1])
            except ValueError:
                wait = 0.0
            if wait > 0:
                with trio.move_on_after(min(TABLE_PARK, wait)):
                    while hit is None:
                        await self._growing.setdefault(digest, trio.Event()).wait()
                        hit = self._open_found(digest)
                event = self._growing.get(digest)
                if event is not None and not event.statistics().tasks_waiting:
                    del self._growing[digest]  # nobody waits: no event kept for a blob never coming
        if hit is None:
            received = self.blobs.receiving(digest)
            if received is None:
                return _error(404, "this cell does not hold that blob")
            # Downloading, no piece verified yet: how far it is, so the asker waits for
            # a download that moves and gives up on one that does not (Peering.table).
            response = _error(404, "no piece of that blob is verified here yet")
            response.headers.append(("Celld-Received", str(received)))
            return response
        fd, found, layout = hit
        try:
            # a partial blob's table always; a stored one's, hashed once if not known
            table = found.table or await self._complete_table(digest, fd, layout)
        except CorruptBlob:
            return self._damaged(digest)
        finally:
            os.close(fd)
        headers = [("Content-Type", "application/octet-stream"), *layout.headers()]
        if found.private:
            # the asker keeps the blob private to the same apps (celld.mirror's check)
            headers.append(
                ("Celld-Private", ",".join(quote(s, safe="") for s in sorted(found.private)))
            )
        return Response(200, headers, table.encode())

    def _damaged(self, digest: str) -> Response:
        """A stored blob failed its digest while being hashed: out of the store, and the
        asker told so (it goes to another peer)."""
        log.error("the stored %s no longer matches its digest: not serving it", digest)
        self.blobs.corrupt(digest)
        return _error(404, "this cell's copy of that blob is damaged")

    async def _complete_table(self, digest: str, fd: int, layout: _Layout) -> PieceTable:
        """The table of a stored blob, hashed once in a worker thread and kept (one
        hashing per digest however many peers ask at once)."""
        while True:
            table = self._tables.get(digest)
            if table is not None:
                self._tables.move_to_end(digest)
                return table
            busy = self._hashing.get(digest)
            if busy is None:
                break
            await busy.wait()
        self._hashing[digest] = done = trio.Event()
        self.metrics.peer_tables_hashed.inc()
        try:
            table = await trio.to_thread.run_sync(
                _hash_fd, fd, layout.size, layout.piece_size, digest, abandon_on_cancel=False
            )
            self._tables[digest] = table
            while len(self._tables) > self.max_tables:
                self._tables.popitem(last=False)
            return table
        finally:
            del self._hashing[digest]
            done.set()

    async def _piece(self, cell: str, digest: str, index: int) -> Response:
        hit = self._open_found(digest)
        if hit is None:
            return _error(404, "this cell does not hold that blob")
        fd, found, layout = hit
        sending = False  # from _send on, the response owns the fd
        try:
            if index >= layout.count or not (layout.have >> index) & 1:
                return _error(404, f"this cell does not hold piece {index}", layout)
            try:
                # the piece's hash goes with it (the same table as a table request's)
                table = found.table or await self._complete_table(digest, fd, layout)
            except CorruptBlob:
                return self._damaged(digest)
            expected = table.hashes[index]
            if expected is None:  # a held piece always has one; never send a piece without
                return _error(404, f"this cell does not hold piece {index}", layout)
            taken = await self._slot(cell, digest, index)
            if taken is PieceStatus.BUSY:
                return _error(503, "every upload slot is taken", layout)
            if taken is not PieceStatus.OK:
                return _error(404, f"this cell does not hold piece {index}", layout)
            slot = (cell, digest, index)
            try:
                # the bitmap may have grown while the upload waited for its slot
                layout = self._shown(digest, _Layout.of(self.blobs.find(digest) or found))
                offset, length = piece_span(index, layout.size, layout.piece_size)
                headers = [("Content-Type", "application/octet-stream"), *layout.headers()]
                headers.append(("Celld-Piece", str(index)))
                headers.append(("Celld-Piece-Hash", expected.hex()))
                response = self._send(200, headers, fd, ByteRange(offset, offset + length - 1),
                                      "piece", slot)  # fmt: skip
            except BaseException:
                self._release(*slot)
                raise
            sending = True
            return response
        finally:
            if not sending:
                os.close(fd)


# ---------------------------------------------------------------------------------------
# The client side


@dataclass(frozen=True)
class TableReply:
    table: PieceTable
    private: frozenset[str]  # the blob is private to these app scopes at the peer


class PeerError(Exception):
    """A peer gave no usable answer (connection, timeout, 401, an unknown status or a
    malformed reply): the swarm's on_error. `status` when it answered at all."""

    def __init__(self, detail: str, status: int | None = None, received: int | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.received = received  # a table's 404 from a peer still receiving the blob


class PieceAnswer(enum.Enum):
    OK = "ok"  # `data` is the piece, verified against the table
    BAD = "bad"  # the peer sent bytes that are not the piece: pin it on the peer
    BUSY = "busy"  # every upload slot of the peer is taken
    MISSING = "missing"  # the peer does not hold it (see `have`)


@dataclass(frozen=True)
class PieceResult:
    answer: PieceAnswer
    have: int  # the peer's bitmap, from the reply
    complete: bool
    data: bytes | bytearray = b""  # only for OK; PeerClient.recycle once written
    learned: bytes | None = None  # OK with a hash the table lacked: the sender's, checked


@dataclass
class BlobBody:
    """A blob's body in flight: `size` is the whole blob, `offset` where these bytes
    start; `chunks()` yields them (unverified: the caller checks the sha256)."""

    size: int
    offset: int
    length: int
    response: ClientResponse

    def chunks(self) -> AsyncIterator[bytes]:
        return self.response.chunks()


def _origin(addr: str) -> Origin:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"not host:port: {addr!r}")
    return Origin("http", host.strip("[]"), int(port))


def _have_of(response: ClientResponse) -> tuple[int, bool, int]:
    """(bitmap, complete, count) from a reply's headers; (0, False, 0) when it has none
    (an unknown blob); PeerError when they are malformed."""
    count_text = response.header(b"celld-pieces")
    if count_text is None:
        return 0, False, 0
    try:
        count = int(count_text)
        have = bitmap_from_bytes(bytes.fromhex(response.header(b"celld-have") or ""), count)
    except ValueError:
        have = None
    if have is None:
        raise PeerError("malformed Celld-Have", response.status)
    return have, response.header(b"celld-complete") == "1", count


class PeerClient:
    """Signed GETs to other cells over a celld.http_client.Pool (kept-alive connections).

    `addr` is the peer's advertised "host:port". Every call runs under a cancel scope of
    `timeout` seconds (a have query: its wait on top) and raises PeerError for anything
    but an answer the swarm can act on."""

    def __init__(
        self,
        cluster_key: bytes,
        cell: str,
        *,
        pool: Pool | None = None,
        now: Callable[[], float] = time.time,
        timeout: float = 10.0,
        connect_timeout: float = 2.0,
    ) -> None:
        peerauth.peer_key(cluster_key)  # a bad key fails here, not on the first request
        self.cluster_key = cluster_key
        self._spare: list[bytearray] = []  # see recycle
        self.cell = cell
        self.pool = pool if pool is not None else Pool()
        self.now = now
        self.timeout = timeout
        self.timeouts = Timeouts(connect=connect_timeout, read=timeout)

    async def aclose(self) -> None:
        await self.pool.aclose()

    @contextlib.asynccontextmanager
    async def _get(
        self, addr: str, target: bytes, timeout: float, extra: Iterable[tuple[bytes, bytes]] = ()
    ) -> AsyncIterator[ClientResponse]:
        headers = peerauth.sign(self.cluster_key, self.cell, b"GET", target, self.now(),
                                os.urandom(peerauth.NONCE_LEN))  # fmt: skip
        headers.extend(extra)
        try:
            origin = _origin(addr)
            with trio.fail_after(timeout):
                response = await self.pool.get(origin, target, headers, self.timeouts)
        except trio.TooSlowError:
            raise PeerError(f"{addr}: no answer in {timeout} s") from None
        except (httpx.HTTPError, ValueError) as exc:
            raise PeerError(f"{addr}: {exc}") from exc
        try:
            yield response
        except httpx.HTTPError as exc:
            raise PeerError(f"{addr}: {exc}") from exc
        finally:
            await response.aclose()

    async def _read(
        self,
        response: ClientResponse,
        limit: int,
        timeout: float,
        *,
        into: bytearray | None = None,
    ) -> bytes | bytearray:
        """The body (at most `limit` bytes), or into the buffer `into` (as long as it)."""
        try:
            with trio.fail_after(timeout):
                if into is not None:
                    return await response.read_into(into)
                return await response.read(limit)
        except trio.TooSlowError:
            raise PeerError("body not received in time", response.status) from None

    def _refused(self, addr: str, response: ClientResponse) -> PeerError:
        return PeerError(f"{addr} answered {response.status}", response.status)

    async def table(self, addr: str, digest: str, *, wait: float = 0.0) -> TableReply:
        """The peer's piece table of `digest` (partial while it downloads), and the app
        scopes the blob is private to there. `wait`: a peer that holds no piece yet
        answers once it does, or 404 after up to that long (its TABLE_PARK at most)."""
        target = f"{API}/blobs/{digest}/pieces".encode()
        if wait > 0:
            target += f"?wait={wait:g}".encode()
        async with self._get(addr, target, self.timeout + wait) as response:
            if response.status != 200:
                refused = self._refused(addr, response)
                received = response.header(b"celld-received")
                if response.status == 404 and received is not None and received.isdigit():
                    refused.received = int(received)
                raise refused
            data = await self._read(response, 32 * ((1 << 20) + 64), self.timeout)
            private = response.header(b"celld-private") or ""
        table = PieceTable.decode(data)
        if not isinstance(table, PieceTable):
            raise PeerError(f"{addr}: bad piece table: {table.reason}", 200)
        return TableReply(table, frozenset(unquote(s) for s in private.split(",") if s))

    async def piece(self, addr: str, digest: str, index: int, table: PieceTable) -> PieceResult:
        """Piece `index`, checked against `table`, or when `table` lacks its hash against
        the one the peer sent beside it (then `learned`, for the caller's table): a piece
        that does not verify is BAD, never OK."""
        target = f"{API}/blobs/{digest}/pieces/{index}".encode()
        async with self._get(addr, target, self.timeout) as response:
            have, complete, _ = _have_of(response)
            if response.status in (404, 503):
                # read the short reason, so the connection stays open for the next ask
                await self._read(response, 1 << 16, self.timeout)
                answer = PieceAnswer.MISSING if response.status == 404 else PieceAnswer.BUSY
                return PieceResult(answer, have, complete)
            if response.status != 200:
                raise self._refused(addr, response)
            learned = None
            if table.hashes[index] is None:
                try:
                    learned = bytes.fromhex(response.header(b"celld-piece-hash") or "")
                except ValueError:
                    learned = b""
                checked = table.with_hash(index, learned)
                if not isinstance(checked, PieceTable):
                    raise PeerError(f"{addr}: piece {index} without a hash", response.status)
                table = checked
            _, expected = table.span(index)
            length = response.header(b"content-length")
            if length != str(expected):
                return PieceResult(PieceAnswer.BAD, have, complete)
            data = await self._read(response, expected, self.timeout, into=self._buffer(expected))
        if not table.verify(index, data):
            self.recycle(data)
            return PieceResult(PieceAnswer.BAD, have, complete)
        return PieceResult(PieceAnswer.OK, have, complete, data, learned)

    def recycle(self, data: bytes | bytearray) -> None:
        """The caller is done with an OK piece's `data`: its buffer takes a later piece.
        A fresh 4 MiB bytearray costs a zero fill and ~1,000 page faults with the GIL
        held: in the testbed's storm, a fifth of a cell's Python time.

        Only whole pieces (a power of two, the policy's sizes) are kept, the newest
        first: a blob's short last piece fits no other blob, and kept it would take a
        place for good, until a long-lived daemon's spares were all such and every
        piece paid for a fresh buffer."""
        size = len(data)
        if isinstance(data, bytearray) and size and size & (size - 1) == 0:
            self._spare.append(data)
            if len(self._spare) > MAX_SPARE:
                del self._spare[0]  # the oldest: the sizes in use are the latest ones

    def _buffer(self, size: int) -> bytearray:
        for i in range(len(self._spare) - 1, -1, -1):
            if len(self._spare[i]) == size:
                return self._spare.pop(i)
        return bytearray(size)

    @contextlib.asynccontextmanager
    async def blob(self, addr: str, digest: str, *, start: int = 0) -> AsyncIterator[BlobBody]:
        """A complete blob from `start`; the caller reads `chunks()` inside the block and
        checks the sha256. Each read has the client's timeout (a slow, steady stream is
        fine); a peer that does not hold it whole is PeerError(status=404)."""
        target = f"{API}/blobs/{digest}".encode()
        extra = [(b"range", f"bytes={start}-".encode())] if start else []
        async with self._get(addr, target, self.timeout, extra) as response:
            if response.status not in (200, 206) or (start and response.status != 206):
                raise self._refused(addr, response)
            try:
                size = int(response.header(b"celld-size") or "")
                length = int(response.header(b"content-length") or "")
            except ValueError:
                raise PeerError(f"{addr}: blob reply without sizes", response.status) from None
            yield BlobBody(size, start, length, response)
