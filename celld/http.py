"""A small HTTP/1.1 server core: h11 on trio sockets, with a sendfile path.

Owns accepting connections and the connection loop shared by the mirror, the
metrics listener and the admin socket: parsing with h11 (bounded header size),
keep-alive, idle and stall timeouts, and writing bodies. h11 is the state
machine for every exchange; on the plain path (a whole HTTP/1.1 GET or HEAD
in one read, a response with a Content-Length, see protocol/heads.py) celld
parses the request and writes the head itself and h11 records both once the
head is out, because a cache miss's first byte waits on that path.

A handler turns a `Request` into a `Response`; the body is either bytes, a
file range sent with os.sendfile (the cache-hit path moves bytes in the
kernel), or a `Body` that streams itself (a blob still being downloaded). A body that fails mid-way closes the connection before the
declared length is complete, so a client never mistakes a partial or
unverified body for a whole one.

Never lets a handler's exception reach the client as a traceback: it becomes
a 500 with a JSON error, or a closed connection once headers are out.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import h11
import trio

from celld.receive import receive_head, send_all_now
from protocol.errors import OCIError, oci_error
from protocol.heads import parse_plain_request, plain_fields, write_head

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 16 * 1024
IDLE_TIMEOUT = 75.0  # keep-alive idle, like nginx's keepalive_timeout
HEADER_TIMEOUT = 15.0  # a started request must finish its headers in this time
SEND_STALL_TIMEOUT = 60.0  # a client that reads nothing for this long is dropped
MAX_DISCARDED_BODY = 1024 * 1024  # request bodies (pushes) we read and drop

_FRAMING = frozenset({b"connection", b"transfer-encoding"})  # h11 may rewrite these


@dataclass(frozen=True)
class Request:
    method: bytes
    target: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes = b""

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def header_values(self, name: bytes) -> list[bytes]:
        return [v for k, v in self.headers if k == name]


class Output(Protocol):
    async def send_bytes(self, data: bytes) -> None: ...
    async def sendfile(self, fd: int, offset: int, count: int) -> None: ...


class Body(Protocol):
    """A body that writes itself; raising aborts the connection."""

    length: int

    async def write(self, out: Output) -> None: ...


@dataclass(frozen=True)
class FileRange:
    """`length` bytes of an open file from `offset`, sent with sendfile.

    The response owns `fd` and closes it when the body is sent or abandoned.
    """

    fd: int
    offset: int
    length: int

    async def write(self, out: Output) -> None:
        await out.sendfile(self.fd, self.offset, self.length)

    def close(self) -> None:
        os.close(self.fd)


@dataclass(frozen=True)
class Streamed:
    """A body of unknown length, sent chunked as `produce` calls its `send`
    (progress). A callback, not an async generator, so the producer may run
    nurseries and cancel scopes of its own."""

    produce: Callable[[Callable[[bytes], Awaitable[None]]], Awaitable[None]]


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes | FileRange | Body | Streamed = b""
    on_done: Callable[[int], None] | None = None  # called with the body bytes sent

    @property
    def length(self) -> int | None:
        if isinstance(self.body, Streamed):
            return None
        return len(self.body) if isinstance(self.body, bytes) else self.body.length


def error_response(err: OCIError, *, head: bool = False) -> Response:
    body = err.body()
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    headers.extend(err.headers)
    return Response(err.status, headers, b"" if head else body)


Handler = Callable[[Request], Awaitable[Response]]


class _SocketOutput:
    """Writes to a trio socket stream; sendfile waits for writability itself."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.sent = 0
        self._bulk = False  # the socket's unsent queue is the kernel's to size (`sendfile`)

    async def send_bytes(self, data: bytes) -> None:
        await send_all_now(self.stream, data, SEND_STALL_TIMEOUT)
        self.sent += len(data)

    async def sendfile(self, fd: int, offset: int, count: int) -> None:
        """Sends a file range, as much of it per wake-up as the socket buffer takes.

        trio caps every SocketStream's unsent bytes at 16 KiB (TCP_NOTSENT_LOWAT,
        so that a sender of messages never queues stale ones), and such a socket
        polls writable again only once under 8 KiB are left: on a link slower
        than the sender (a peer on a shaped 50 Mbit/s link) each wake-up moved
        ~64 KiB, and the wake-ups, not the copies, were most of a cell's CPU
        in uploads (0.8 CPU-s per 128 MiB against 0.13 on loopback). A file body
        is bulk: the cap goes back to the system's (none, by default), so the
        autotuned send buffer decides, as for nginx's sendfile, and a wake-up
        moves a third of it (~600 KiB there).
        """
        sock = self.stream.socket
        if not self._bulk:
            self._bulk = True
            with contextlib.suppress(OSError, AttributeError):  # no such option: as trio left it
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, 0)
        end = offset + count
        while offset < end:
            want = min(end - offset, 1 << 30)
            try:
                n = os.sendfile(sock.fileno(), fd, offset, want)
            except BlockingIOError:
                n = -1
            if n == 0:
                raise OSError(errno.EIO, "file shorter than the range to send")
            if n > 0:
                offset += n
                self.sent += n
            if n == want:
                # Give other tasks a turn between kernel copies.
                await trio.lowlevel.checkpoint()
            else:  # the buffer is full: another try now would only say so (EAGAIN)
                with trio.fail_after(SEND_STALL_TIMEOUT):
                    await trio.lowlevel.wait_writable(sock)


class _Discard(Exception):
    """The connection can't carry another request; close it quietly."""


async def _next_event(conn: h11.Connection, stream: trio.SocketStream, timeout: float):
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        if conn.their_state is h11.IDLE:  # a request's head: read at once
            data = await receive_head(stream, MAX_HEADER_BYTES, timeout)
        else:
            with trio.move_on_after(timeout) as scope:
                data = await stream.receive_some(65536)
            if scope.cancelled_caught:
                raise _Discard
        conn.receive_data(data)


@dataclass(frozen=True)
class _Incoming:
    request: Request
    http_version: bytes
    deferred: bytes | None  # a plain request's bytes, for h11 to record later


async def _next_request(
    conn: h11.Connection, stream: trio.SocketStream, out: _SocketOutput, max_body: int
) -> _Incoming | None:
    """The connection's next request, or None when it is done: closed by the
    client, or refused with a response already sent."""
    if conn.their_state is h11.IDLE and not conn.trailing_data[0]:
        # A new request: a plain one is parsed here and recorded by h11 once
        # the response head is out (see _send_response).
        data = await receive_head(stream, MAX_HEADER_BYTES, IDLE_TIMEOUT)
        plain = parse_plain_request(data)
        if plain is not None:
            return _Incoming(Request(plain.method, plain.target, plain.headers), b"1.1", data)
        conn.receive_data(data)
    try:
        first = conn.their_state is h11.IDLE
        event = await _next_event(conn, stream, IDLE_TIMEOUT if first else HEADER_TIMEOUT)
    except h11.RemoteProtocolError as exc:
        await _send_protocol_error(conn, out, exc)
        return None
    if not isinstance(event, h11.Request):  # ConnectionClosed, PAUSED
        return None
    if event.http_version not in (b"1.0", b"1.1"):  # h11 parses any digit.digit
        err = oci_error("UNSUPPORTED", event.http_version.decode("latin-1"), status=505)
        await _send_response(conn, out, error_response(err), head=False)
        return None
    try:
        body = await _read_body(conn, stream, max_body)
    except _TooLarge:
        err = oci_error("SIZE_INVALID", f"request body over {max_body} bytes", status=413)
        await _send_response(conn, out, error_response(err), head=False)
        return None
    except h11.RemoteProtocolError as exc:
        await _send_protocol_error(conn, out, exc)
        return None
    request = Request(event.method, event.target, tuple(event.headers), body)
    return _Incoming(request, event.http_version, None)


async def serve_connection(
    stream: trio.SocketStream, handler: Handler, *, max_body: int = 0
) -> None:
    """Serves one connection; request bodies up to `max_body` reach the handler."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
    out = _SocketOutput(stream)
    try:
        while True:
            incoming = await _next_request(conn, stream, out, max_body)
            if incoming is None:
                return
            request = incoming.request
            try:
                response = await handler(request)
            except OCIError as err:
                response = error_response(err, head=request.method == b"HEAD")
            except Exception:
                log.exception("handler failed for %s %r", request.method, request.target[:200])
                response = error_response(
                    OCIError("UNKNOWN", "internal error", 500), head=request.method == b"HEAD"
                )
            plain = (
                incoming.http_version == b"1.1"
                and request.method in (b"GET", b"HEAD")
                and request.header(b"connection") is None
            )
            await _send_response(
                conn,
                out,
                response,
                head=request.method == b"HEAD",
                plain=plain,
                deferred=incoming.deferred,
            )
            if conn.our_state is h11.IDLE:  # a plain exchange h11 had no part in
                continue
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return
    except (_Discard, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
        return
    except OSError as exc:
        log.debug("connection dropped: %s", exc)
        return
    except Exception as exc:
        # A body that failed after its headers went out (a fetch that did not
        # verify): the client sees the connection close short of
        # Content-Length; everyone else is served as before.
        log.warning("response aborted: %s", exc)
        return
    finally:
        with trio.move_on_after(1) as cleanup:
            cleanup.shield = True
            await stream.aclose()


class _TooLarge(Exception):
    pass


async def _read_body(conn: h11.Connection, stream: trio.SocketStream, keep: int) -> bytes:
    """Reads a request body: keeps up to `keep` bytes, or with keep=0 drops up to a
    bound (a push attempt the mirror refuses anyway)."""
    parts: list[bytes] = []
    seen = 0
    while True:
        event = await _next_event(conn, stream, HEADER_TIMEOUT)
        if isinstance(event, h11.EndOfMessage):
            return b"".join(parts)
        if isinstance(event, h11.Data):
            seen += len(event.data)
            if keep:
                if seen > keep:
                    raise _TooLarge
                parts.append(bytes(event.data))
            elif seen > MAX_DISCARDED_BODY:
                raise _Discard
        elif isinstance(event, h11.ConnectionClosed):
            raise _Discard


async def _send_protocol_error(
    conn: h11.Connection, out: _SocketOutput, exc: h11.RemoteProtocolError
) -> None:
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    status = exc.error_status_hint if 400 <= exc.error_status_hint < 500 else 400
    response = error_response(
        oci_error("UNSUPPORTED", str(exc), "malformed request", status=status)
    )
    response.headers.append(("Connection", "close"))
    with contextlib.suppress(
        trio.BrokenResourceError, trio.ClosedResourceError, OSError, h11.LocalProtocolError
    ):
        await _send_response(conn, out, response, head=False)
    await _linger(out.stream)


async def _linger(stream: trio.SocketStream) -> None:
    """Reads what the client still sends before closing, like nginx's lingering
    close: closing with unread input makes the kernel send RST, which can
    destroy the error response before the client reads it."""
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        await stream.send_eof()
        with trio.move_on_after(1.0):
            received = 0
            while received < 1 << 20:
                data = await stream.receive_some(65536)
                if not data:
                    break
                received += len(data)


async def _send_response(
    conn: h11.Connection,
    out: _SocketOutput,
    response: Response,
    *,
    head: bool,
    plain: bool = False,
    deferred: bytes | None = None,
) -> None:
    """`plain`: the request was an HTTP/1.1 GET or HEAD that said nothing of the
    connection, so h11 would write a framed response's head as given.
    `deferred`: the bytes of a request parsed without h11, for h11 to record
    before it records the response (after the head is out, if it can be)."""
    body = response.body
    header_end = out.sent
    try:
        headers = [(k.encode(), v.encode()) for k, v in response.headers]
        names = {k.lower() for k, _ in headers}
        if b"content-length" not in names and response.length is not None:
            headers.append((b"content-length", str(response.length).encode()))
        data = _plain_head(response.status, headers) if plain else None
        if data is not None and deferred is not None and not isinstance(body, Streamed):
            # One plain request, parsed without h11, answered with a plain framed
            # head: h11 would only follow along (a fifth of the peer API's Python
            # time in the testbed's storm), so it is left in its fresh state, which
            # is the state it would be in after this exchange (serve_connection).
            await out.send_bytes(data)
            header_end = out.sent
            if not head and response.length:
                if isinstance(body, bytes):
                    await out.send_bytes(body)
                else:
                    await body.write(out)
                    if out.sent - header_end != response.length:
                        raise OSError(errno.EIO, "body shorter than its Content-Length")
            return
        if data is None:
            _record_request(conn, deferred)
            data = conn.send(h11.Response(status_code=response.status, headers=headers))
            await out.send_bytes(data)
        else:
            # The head goes out first; h11 records the exchange after, while
            # the client reads: on a miss its checks would delay the first byte.
            await out.send_bytes(data)
            _record_request(conn, deferred)
            conn.send(h11.Response(status_code=response.status, headers=headers))
        header_end = out.sent
        if not head and isinstance(body, Streamed):

            async def send_chunk(chunk: bytes) -> None:
                if chunk:
                    await out.send_bytes(conn.send(h11.Data(data=chunk)))

            await body.produce(send_chunk)
        elif not head and response.length:
            if isinstance(body, bytes):
                await out.send_bytes(conn.send(h11.Data(data=body)))
            else:
                # Tell h11 the bytes are sent (it only counts them), then let
                # the body put them on the wire itself.
                conn.send_with_data_passthrough(h11.Data(data=_Length(response.length)))
                await body.write(out)
                if out.sent - header_end != response.length:
                    raise OSError(errno.EIO, "body shorter than its Content-Length")
        tail = conn.send(h11.EndOfMessage())
        if tail:
            await out.send_bytes(tail)
    finally:
        if isinstance(body, FileRange):
            body.close()
        if response.on_done is not None:
            response.on_done(max(0, out.sent - header_end))


def _record_request(conn: h11.Connection, deferred: bytes | None) -> None:
    """Lets h11 parse a request celld parsed itself, so its state machine (keep-
    alive, the next cycle) follows. protocol.heads only takes requests h11 reads
    the same; one that still surprised it ends the connection."""
    if deferred is None:
        return
    conn.receive_data(deferred)
    if not isinstance(conn.next_event(), h11.Request):
        raise _Discard
    if not isinstance(conn.next_event(), h11.EndOfMessage):
        raise _Discard


def _plain_head(status: int, headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The head h11 writes for a response with a Content-Length, or None where h11
    might write another (no length, framing or connection headers of ours,
    anything it could refuse): then h11 writes it."""
    if status < 200 or status in (204, 304) or not plain_fields(headers):
        return None
    lengths = 0
    for name, value in headers:
        lower = name.lower()
        if lower in _FRAMING:
            return None
        if lower == b"content-length":
            # h11 folds repeated or listed lengths into one: only a lone number
            # is written as given.
            lengths += 1
            if not value.isdigit():
                return None
    if lengths != 1:
        return None
    return write_head(b"HTTP/1.1 %d " % status, headers)


class _Length:
    """Stands in for body bytes in h11's bookkeeping: it only calls len()."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


# accept() errors that mean "out of resources for now": wait, then go on.
_ACCEPT_CAPACITY = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
# Errors accept() reports for one connection that went wrong before it was
# taken (Linux passes a new socket's pending network error on, see accept(2));
# the listener is fine. The set trio's SocketListener skips.
_ACCEPT_SKIP = frozenset(
    getattr(errno, name)
    for name in (
        "EPERM", "ECONNABORTED", "EPROTO", "ENETDOWN", "ENOPROTOOPT", "EHOSTDOWN", "ENONET",
        "EHOSTUNREACH", "EOPNOTSUPP", "ENETUNREACH", "ENOSR", "ESOCKTNOSUPPORT",
        "EPROTONOSUPPORT", "ETIMEDOUT", "ECONNRESET",
    )
    if hasattr(errno, name)
)  # fmt: skip
ACCEPT_BATCH = 64  # connections accepted per wakeup before others get a turn


class _Full(Exception):
    """accept() is out of descriptors or memory for now."""


def _accept_one(sock: socket.socket) -> socket.socket | None:
    """A new connection, or None when there is none (left) to take."""
    while True:
        try:
            client, _ = sock.accept()
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno in _ACCEPT_SKIP:
                continue
            if exc.errno in _ACCEPT_CAPACITY:
                raise _Full(os.strerror(exc.errno)) from exc
            raise
        return client


async def _accept(
    listener: trio.SocketListener, connection: Callable[[trio.SocketStream], Awaitable[None]]
) -> None:
    """Accepts connections the moment the listener polls readable, each
    connection's task starting in the next scheduler round.

    Not trio.serve_listeners: its accept yields once more per connection, and
    on a cold CPU that round and the wrapping around it cost ~0.2 ms before the
    request can be read, all on a miss's time to first byte. A stdlib handle
    (a dup of the same socket) accepts without yielding.
    """
    sock = socket.socket(fileno=os.dup(listener.socket.fileno()))
    sock.setblocking(False)
    try:
        async with trio.open_nursery() as nursery:
            while True:
                await trio.lowlevel.wait_readable(sock)
                for _ in range(ACCEPT_BATCH):
                    try:
                        client = _accept_one(sock)
                    except _Full as exc:
                        log.error("accept failed (%s); retrying in 0.1 s", exc)
                        await trio.sleep(0.1)
                        break
                    if client is None:
                        break
                    nursery.start_soon(_run_connection, client, connection)
    finally:
        sock.close()


async def _run_connection(
    client: socket.socket, connection: Callable[[trio.SocketStream], Awaitable[None]]
) -> None:
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(client))
    try:
        await connection(stream)
    finally:
        await trio.aclose_forcefully(stream)


async def _serve_listeners(
    listeners: list[trio.SocketListener], connection: Callable[[trio.SocketStream], Awaitable[None]]
) -> None:
    try:
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(_accept, listener, connection)
    finally:
        for listener in listeners:
            await trio.aclose_forcefully(listener)


async def serve(
    host: str,
    port: int,
    handler: Handler,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listens and serves until cancelled; reports the listeners once bound."""
    listeners = await trio.open_tcp_listeners(port, host=host, backlog=1024)
    task_status.started(listeners)

    async def one(stream: trio.SocketStream) -> None:
        await serve_connection(stream, handler)

    await _serve_listeners(listeners, one)


async def serve_unix(
    path: Path,
    handler: Handler,
    *,
    max_body: int = 0,
    task_status: trio.TaskStatus[trio.SocketListener] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listens on a unix socket only its owner may use (mode 0600, set before
    any connection can be made) and serves until cancelled."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        await sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(64)
    listener = trio.SocketListener(sock)
    task_status.started(listener)

    async def one(stream: trio.SocketStream) -> None:
        await serve_connection(stream, handler, max_body=max_body)

    try:
        await _serve_listeners([listener], one)
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
