"""A lean HTTP/1.1 client for blob downloads: h11 on trio sockets, kept alive.

Owns the connections a cell's misses GET blobs over: one idle stack per origin,
TLS through `trio.SSLStream`, redirects to blob storage (the Authorization
header goes only to the origin it was made for), and the mapping of socket and
protocol failures onto httpx's exception classes, so celld.registry handles
one error vocabulary whichever client ran.

Why not httpx here: a miss's time to first byte is what a container runtime
waits on, and on the miss path httpx's request and response machinery costs
about 0.7 ms of a cold CPU per request, a quarter of a local registry's own
answer time (python -m simulations.bench.serve measures the path end to end).
Everything that needs more of HTTP (token requests, manifests, pushes, 401
challenges, proxies) stays on httpx; celld.registry decides which runs.

Never: request bodies, proxies, HTTP/2, cookies.
"""

from __future__ import annotations

import contextlib
import functools
import os
import select
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import h11
import httpx
import trio

from celld.receive import receive_head, send_all_now
from protocol.heads import (
    FIELD_VALUE,
    TARGET,
    PlainHead,
    parse_plain_head,
    plain_fields,
    write_head,
)

MAX_HEADER_BYTES = 64 * 1024  # a registry's response head; more is not a registry
MAX_IDLE_PER_ORIGIN = 8
MAX_REDIRECTS = 5
RECEIVE_SIZE = 256 * 1024
# A blob body is read as one chunk of whatever the socket holds, up to this:
# when the reader falls behind, the kernel's buffer fills and the next chunk
# is large, so per-chunk costs (a worker thread's round trip) shrink exactly
# when they would slow the transfer.
BODY_RECEIVE_MAX = 4 << 20
# A body read whole (`Response.read`) wakes the reader only once the socket holds
# this much of it (SO_RCVLOWAT), or all that is left: on a shaped link the kernel
# has ~64 KiB each time the reader wakes, and each wake-up costs more of the CPU
# in trio than the copy it does (the testbed's storm: ~140 per 4 MiB piece).
BODY_LOWAT = 1 << 20
# A streamed body (`Response.chunks`: a blob the runtime is sent as it arrives) wakes
# its reader once the socket holds BODY_LOWAT too, or after STREAM_LOWAT_WAIT with
# whatever it holds. From a 50 Mbit/s registry the kernel had ~22 KiB at each
# wake-up, and a lease holder spent 3-4 CPU-s on wake-ups per 128 MiB it took in
# (0.4 on loopback), 0.5 with this. The wait bounds how long the runtime's next
# bytes are held back, and keeps a source that trickles from looking silent to the
# read timeout.
STREAM_LOWAT_WAIT = 0.2
# A response head is read in small pieces: a large read would copy a quarter MiB
# of body (twice more into h11's buffer) before the head is even parsed.
HEAD_RECEIVE_SIZE = 16 * 1024
REDIRECTS = frozenset({301, 302, 303, 307, 308})


@dataclass(frozen=True)
class Timeouts:
    connect: float
    read: float


@dataclass(frozen=True)
class Origin:
    """Where a request goes: what a connection is kept alive for."""

    scheme: str
    host: str
    port: int

    @classmethod
    def of(cls, url: httpx.URL) -> Origin:
        if url.scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol(f"unsupported URL scheme {url.scheme!r}")
        port = url.port or (443 if url.scheme == "https" else 80)
        return cls(url.scheme, url.host, port)

    @functools.cached_property
    def host_header(self) -> bytes:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return (host if self.port == default else f"{host}:{self.port}").encode("ascii")


class _Connection:
    """One socket and its h11 state; reusable once a response was read to its end."""

    def __init__(self, stream: trio.abc.Stream, sock: trio.socket.SocketType) -> None:
        self.stream = stream
        self.sock = sock
        self.h11 = _new_h11()
        self._lowat = 1  # the socket's SO_RCVLOWAT (see lowat)

    def idle_and_open(self) -> bool:
        """An idle connection the server closed (or wrote to) polls readable."""
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN)
        return not poller.poll(0)

    async def next_event(self, timeout: float, max_bytes: int = RECEIVE_SIZE) -> h11.Event:
        """The next h11 event, reading from the socket as needed (`max_bytes` at a
        time), within `timeout`."""
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise httpx.RemoteProtocolError(str(exc)) from exc
            if event is not h11.NEED_DATA:
                return event
            self.h11.receive_data(await self.receive(max_bytes, timeout))

    async def receive(self, max_bytes: int, timeout: float, *, head: bool = False) -> bytes:
        """Up to `max_bytes` from the socket (b"" at its end), within `timeout`;
        a `head` at once if the socket holds it (celld.receive)."""
        try:
            if head:
                return await receive_head(self.stream, max_bytes, timeout)
            with trio.fail_after(timeout):
                return await self.stream.receive_some(max_bytes)
        except trio.TooSlowError as exc:
            raise httpx.ReadTimeout("no data from the server in time") from exc
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise httpx.ReadError(f"reading the response: {_reason(exc)}") from exc

    async def receive_body(
        self, remaining: int, buffers: _Buffers, timeout: float, *, gather: bool = True
    ) -> bytes:
        """Up to `remaining` body bytes: on a plain socket, all it holds, read into
        `buffers` after one checkpoint (so other tasks run between chunks however
        fast the sender is); b"" at its end. A wait ends once the socket holds
        BODY_LOWAT (or all the buffer takes), or after STREAM_LOWAT_WAIT with what
        it has; without `gather` (a body's first bytes), as soon as any are in.
        `Response.chunks` sets the socket back to waking at once."""
        if type(self.stream) is not trio.SocketStream:
            return await self.receive(min(RECEIVE_SIZE, remaining), timeout)
        fd = self.sock.fileno()
        try:
            with trio.fail_after(timeout):
                await trio.lowlevel.checkpoint()
                space = buffers.space(remaining)
                while True:
                    try:
                        return buffers.filled(os.readv(fd, [space]))
                    except BlockingIOError:
                        self.lowat(min(len(space), BODY_LOWAT) if gather else 1)
                        with trio.move_on_after(STREAM_LOWAT_WAIT):
                            await trio.lowlevel.wait_readable(fd)
        except trio.TooSlowError as exc:
            raise httpx.ReadTimeout("no data from the server in time") from exc
        except OSError as exc:
            raise httpx.ReadError(f"reading the response: {_reason(exc)}") from exc

    async def receive_into(self, view: memoryview, timeout: float) -> int:
        """Bytes read into `view` (0 at the socket's end), within `timeout`; the wait
        ends only once the socket holds min(len(view), BODY_LOWAT) bytes (see
        `lowat`). Only on a plain socket."""
        fd = self.sock.fileno()
        try:
            with trio.fail_after(timeout):
                await trio.lowlevel.checkpoint()
                while True:
                    try:
                        return os.readv(fd, [view])
                    except BlockingIOError:
                        self.lowat(min(len(view), BODY_LOWAT))
                        await trio.lowlevel.wait_readable(fd)
        except trio.TooSlowError as exc:
            raise httpx.ReadTimeout("no data from the server in time") from exc
        except OSError as exc:
            raise httpx.ReadError(f"reading the response: {_reason(exc)}") from exc

    def lowat(self, n: int) -> None:
        """Poll readable only once `n` bytes are in (1: as soon as any are). The
        kernel also wakes the reader at the socket's end or an error, so a short
        body cannot hang it past its timeout."""
        if n != self._lowat:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, n)
            self._lowat = n

    async def close(self) -> None:
        await trio.aclose_forcefully(self.stream)


class _Buffers:
    """The memory one body is received into, reused rather than allocated per
    read: a fresh multi-MiB buffer costs a page fault every 4 KiB, more than
    the copy into it.

    Chunks are memoryviews of a buffer, handed out in order; the reader may
    keep them as long as it likes. A buffer is filled again only once no view
    of it is left, which Python itself tells: a bytearray with views cannot be
    resized (BufferError). Memory: what the reader holds, plus one buffer.
    """

    MIN_SPACE = 64 << 10  # less room than this left: the next buffer
    # The first buffer is small: a new bytearray is zeroed, and 4 MiB of page
    # faults on the event loop would delay the waiters' first bytes.
    FIRST_SIZE = 64 << 10  # and its chunks small enough to be written on the loop at once

    def __init__(self, size: int) -> None:
        self._size = size
        self._all: list[bytearray] = []
        self._current = bytearray(0)
        self._used = 0

    def space(self, remaining: int) -> memoryview:
        """Where the next read goes (at most `remaining` bytes)."""
        if len(self._current) - 1 - self._used < min(self.MIN_SPACE, remaining):
            self._current, self._used = self._free(), 0
        end = min(len(self._current) - 1, self._used + remaining)
        return memoryview(self._current)[self._used : end]

    def filled(self, n: int) -> memoryview:
        """The `n` bytes the last read put into `space`, as a chunk."""
        chunk = memoryview(self._current)[self._used : self._used + n]
        self._used += n
        return chunk

    def _free(self) -> bytearray:
        for buf in self._all[1:]:  # the small first one is not worth reusing
            try:
                buf.pop()  # the spare byte: raises while views of `buf` exist
            except BufferError:
                continue
            buf.append(0)
            return buf
        size = self._size if self._all else min(self.FIRST_SIZE, self._size)
        buf = bytearray(size + 1)  # one spare byte, for the test above
        self._all.append(buf)
        return buf


class Response:
    """A response head, and its body to read with `chunks` (or `read`); `aclose` always.

    A body with a Content-Length (every blob) is read straight from the socket
    rather than through h11, whose buffer would copy each byte twice more on
    the bulk path; h11 parses heads and chunked bodies. The connection then
    gets a fresh h11 state for its next request.
    """

    def __init__(
        self, pool: Pool, origin: Origin, conn: _Connection, head: _Head, read: float
    ) -> None:
        self.status = head.status
        self.headers = head.headers  # lower-case names
        self._pool = pool
        self._origin = origin
        self._conn = conn
        self._read = read
        self._closed = False
        self._length = head.length
        self._pending = head.pending
        self._keep_alive = head.http_version == b"1.1" and not any(
            key == b"connection" and b"close" in value.lower() for key, value in head.headers
        )
        self._raw_done = False

    def header(self, name: bytes) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value.decode("latin-1")
        return None

    async def chunks(self) -> AsyncIterator[bytes]:
        if self._length is None:
            while True:
                event = await self._conn.next_event(self._read)
                if isinstance(event, h11.Data):
                    yield bytes(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    return
        remaining = self._length
        pending, self._pending = self._pending, b""
        if len(pending) > remaining:
            raise httpx.RemoteProtocolError("more bytes than the Content-Length")
        if pending:
            remaining -= len(pending)
            yield pending
        buffers = _Buffers(min(BODY_RECEIVE_MAX, remaining))
        try:
            while remaining:
                first = remaining == self._length  # the runtime's first byte waits for none
                data = await self._conn.receive_body(
                    remaining, buffers, self._read, gather=not first
                )
                if not data:
                    raise httpx.RemoteProtocolError(
                        f"connection closed {remaining} bytes short of the Content-Length"
                    )
                remaining -= len(data)
                yield data
        finally:
            with contextlib.suppress(OSError):  # a closed socket has no next head
                self._conn.lowat(1)  # the next response's head is read as it comes
        self._raw_done = True

    async def read(self, limit: int) -> bytes | bytearray:
        """The whole body, or httpx.DecodingError past `limit` bytes (error bodies only).
        A body of known length on a plain socket goes straight from the socket into
        the one buffer returned: a 4 MiB piece is copied once, not three times."""
        length = self._length
        if length is not None and type(self._conn.stream) is trio.SocketStream:
            if length > limit:
                raise httpx.DecodingError(f"body over the {limit}-byte limit")
            return await self.read_into(bytearray(length))
        data = bytearray()
        async for chunk in self.chunks():
            data += chunk
            if len(data) > limit:
                raise httpx.DecodingError(f"body over the {limit}-byte limit")
        return bytes(data)

    async def read_into(self, buf: bytearray) -> bytearray:
        """The whole body into `buf`, which is as long as the Content-Length (a reused
        buffer: see celld.peer.PeerClient.recycle). On a plain socket only."""
        if self._length != len(buf) or type(self._conn.stream) is not trio.SocketStream:
            raise ValueError("read_into: a plain socket's body of len(buf) bytes")
        view = memoryview(buf)
        pending, self._pending = self._pending, b""
        if len(pending) > len(buf):
            raise httpx.RemoteProtocolError("more bytes than the Content-Length")
        view[: len(pending)] = pending
        got = len(pending)
        try:
            while got < len(buf):
                n = await self._conn.receive_into(view[got:], self._read)
                if not n:
                    raise httpx.RemoteProtocolError(
                        f"connection closed {len(buf) - got} bytes short of the Content-Length"
                    )
                got += n
        finally:
            with contextlib.suppress(OSError):  # a closed socket has no next head
                self._conn.lowat(1)  # the next response's head is read as it comes
        self._raw_done = True
        return buf

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        conn = self._conn
        if self._raw_done and self._keep_alive:
            conn.h11 = _new_h11()
            self._pool._release(self._origin, conn)
        elif conn.h11.our_state is h11.DONE and conn.h11.their_state is h11.DONE:
            conn.h11.start_next_cycle()
            self._pool._release(self._origin, conn)
        else:
            await conn.close()


class Pool:
    """GET over HTTP/1.1, connections kept alive per origin.

    A request that fails on a reused connection before any response byte
    arrived is retried once on a fresh one: the server may have closed the
    idle socket just as we wrote, and a GET is safe to repeat.
    """

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self._ssl = ssl_context
        self._idle: dict[Origin, list[_Connection]] = {}
        self._closed = False

    async def get(
        self,
        origin: Origin,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        timeouts: Timeouts,
        *,
        authorization: bytes | None = None,
        while_waiting: Callable[[], None] | None = None,
    ) -> Response:
        """GETs `target` (a raw path) from `origin`, following redirects; the final
        response's head, body unread.

        `authorization` goes only to `origin`, never to where it redirects.
        `while_waiting` runs once the first request is on the wire, so work the
        caller needs anyway overlaps the server's think time.
        """
        first = origin
        once = _Once(while_waiting)
        for _ in range(MAX_REDIRECTS + 1):
            head = [(b"host", origin.host_header), *headers]
            if authorization is not None and origin == first:
                head.append((b"authorization", authorization))
            request = _Request(target, head)
            response = await self._exchange(origin, request, timeouts, once)
            location = response.header(b"location")
            if response.status not in REDIRECTS or not location:
                return response
            await response.aclose()
            url = httpx.URL(
                scheme=origin.scheme, host=origin.host, port=origin.port, raw_path=target
            ).join(location)
            origin, target = Origin.of(url), url.raw_path
        raise httpx.TooManyRedirects(f"more than {MAX_REDIRECTS} redirects")

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                await conn.close()

    # -- connections ---------------------------------------------------------

    async def _exchange(
        self,
        origin: Origin,
        request: _Request,
        timeouts: Timeouts,
        while_waiting: _Once,
    ) -> Response:
        reused = self._checkout(origin)
        conn = reused or await self._connect(origin, timeouts.connect)
        try:
            try:
                head = await self._send(conn, request, timeouts.read, while_waiting)
            except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError):
                if reused is None:
                    raise
                await conn.close()
                conn = await self._connect(origin, timeouts.connect)
                head = await self._send(conn, request, timeouts.read, while_waiting)
        except BaseException:
            await conn.close()
            raise
        return Response(self, origin, conn, head, timeouts.read)

    def _checkout(self, origin: Origin) -> _Connection | None:
        stack = self._idle.get(origin)
        while stack:
            conn = stack.pop()
            if conn.idle_and_open():
                return conn
            conn.sock.close()
        return None

    def _release(self, origin: Origin, conn: _Connection) -> None:
        stack = self._idle.setdefault(origin, [])
        if self._closed or len(stack) >= MAX_IDLE_PER_ORIGIN:
            conn.sock.close()
            return
        stack.append(conn)

    async def _connect(self, origin: Origin, timeout: float) -> _Connection:
        where = f"{origin.host}:{origin.port}"
        try:
            with trio.fail_after(timeout):
                tcp = await trio.open_tcp_stream(origin.host, origin.port)
                stream: trio.abc.Stream = tcp
                if origin.scheme == "https":
                    stream = trio.SSLStream(
                        tcp, self._ssl_context(), server_hostname=origin.host, https_compatible=True
                    )
                    try:
                        await stream.do_handshake()
                    except BaseException:
                        await trio.aclose_forcefully(tcp)
                        raise
        except trio.TooSlowError as exc:
            raise httpx.ConnectTimeout(f"connecting to {where} timed out") from exc
        except (OSError, trio.BrokenResourceError) as exc:
            raise httpx.ConnectError(f"connecting to {where}: {_reason(exc)}") from exc
        return _Connection(stream, tcp.socket)

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = httpx.create_ssl_context()
        return self._ssl

    async def _send(
        self,
        conn: _Connection,
        request: _Request,
        read: float,
        while_waiting: _Once,
    ) -> _Head:
        try:
            await send_all_now(conn.stream, request.data, read)
        except trio.TooSlowError as exc:
            raise httpx.WriteTimeout("sending the request timed out") from exc
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise httpx.WriteError(f"sending the request: {_reason(exc)}") from exc
        while_waiting()
        return await _read_head(conn, read, request)


class _Request:
    """A bodiless GET, serialized here as h11 would, so the bytes can go out
    before h11 has done its bookkeeping. Refuses what h11 would refuse (a
    target or value with control characters: a redirect's Location or a
    token is the server's text) before anything is sent."""

    def __init__(self, target: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        if not TARGET.fullmatch(target):
            raise httpx.LocalProtocolError(f"illegal request target {target[:100]!r}")
        if not plain_fields(headers):
            for name, value in headers:
                if not FIELD_VALUE.fullmatch(value):
                    raise httpx.LocalProtocolError(f"illegal value in header {name.decode()!r}")
            raise httpx.LocalProtocolError("illegal header name")
        self.target = target
        self.headers = headers
        self.data = write_head(b"GET " + target + b" HTTP/1.1", headers)

    def event(self) -> h11.Request:
        return h11.Request(method="GET", target=self.target, headers=self.headers)


@dataclass(frozen=True)
class _Head:
    """A final response's head, and the body bytes that came with it."""

    status: int
    http_version: bytes
    headers: list[tuple[bytes, bytes]] | tuple[tuple[bytes, bytes], ...]
    length: int | None  # None: chunked, read through h11
    pending: bytes = b""

    @classmethod
    def plain(cls, head: PlainHead, pending: bytes) -> _Head:
        return cls(head.status, head.http_version, head.headers, head.length, pending)

    @classmethod
    def of_h11(cls, event: h11.Response, conn: h11.Connection) -> _Head:
        length = _body_length(event)
        pending = b"" if length is None else bytes(conn.trailing_data[0])
        return cls(event.status_code, event.http_version, event.headers, length, pending)


async def _read_head(conn: _Connection, read: float, request: _Request) -> _Head:
    """Reads the final response's head. A plain one (protocol.heads: what a blob
    GET gets) is parsed here; any other, or anything odd, is h11's to parse or
    refuse, from the same bytes. h11 learns of the request only then: after a
    plain head the body is read raw and the connection gets a fresh h11 state
    (Response.aclose), so its bookkeeping of a plain exchange (a third of a peer
    request's client time in the testbed's storm) would be thrown away."""
    data = b""
    closed = False
    while len(data) <= MAX_HEADER_BYTES:
        received = await conn.receive(HEAD_RECEIVE_SIZE, read, head=True)
        if not received:
            closed = True
            break
        data += received
        end = data.find(b"\r\n\r\n")
        if end >= 0:
            head = parse_plain_head(data[:end])
            if head is not None:
                return _Head.plain(head, data[end + 4 :])
            break
        if b"\n\n" in data or b"\n\r\n" in data:
            break  # bare LF line ends: h11 reads those
    try:
        conn.h11.send(request.event())
        conn.h11.send(h11.EndOfMessage())
    except h11.LocalProtocolError as exc:
        raise httpx.LocalProtocolError(str(exc)) from exc
    conn.h11.receive_data(data)
    if closed:
        conn.h11.receive_data(b"")
    while True:
        event = await conn.next_event(read, HEAD_RECEIVE_SIZE)
        if isinstance(event, h11.Response):
            return _Head.of_h11(event, conn.h11)
        if isinstance(event, h11.ConnectionClosed):
            raise httpx.RemoteProtocolError("server closed the connection before answering")
        # h11.InformationalResponse (100 Continue and the like): keep reading.


def _new_h11() -> h11.Connection:
    return h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEADER_BYTES)


def _body_length(head: h11.Response) -> int | None:
    """The body's length when a Content-Length fixes it (the response to a GET),
    None for a chunked body. h11 already refused conflicting or bad lengths."""
    if head.status_code in (204, 304):
        return 0
    length = None
    for key, value in head.headers:
        if key == b"transfer-encoding":
            return None
        if key == b"content-length":
            length = int(value)
    return length


class _Once:
    """Calls `fn` the first time it is called, never again (a retry or a redirect
    must not prepare twice)."""

    def __init__(self, fn: Callable[[], None] | None) -> None:
        self._fn = fn

    def __call__(self) -> None:
        fn, self._fn = self._fn, None
        if fn is not None:
            fn()


def _reason(exc: BaseException) -> str:
    cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else exc
    if cause is None:
        return type(exc).__name__
    return getattr(cause, "strerror", None) or str(cause) or type(cause).__name__
