"""A reverse proxy on loopback that can break the bytes a registry sends.

Tests put it between celld (or skopeo, or containerd) and a docker-registry to
play an upstream that lies or dies: it flips one byte of a blob body
(`corrupt`), cuts a blob body short and drops the connection (`truncate_after`),
or accepts a connection and never answers (`stall`). Otherwise it forwards
requests and responses unchanged, streaming: a 256 MiB body passes through in
chunks, never whole in memory.

Theory of operation: one thread accepts; each client connection gets a thread
that parses it with h11 (server side) and relays every request over its own
upstream connection, also parsed with h11 (client side), so keep-alive,
chunked bodies and HEAD responses are framed by h11, not by hand. The fault
settings are read once per response, when its head arrives, so changing them
mid-test affects the next response, never half of one. Faults apply only to
GET responses (200/206) whose target matches `affects` (blob GETs by
default); everything else always passes through intact, so a test can break
layers while manifests still resolve.

It never speaks to anything but its one upstream on loopback, and it is test
support: plain sockets and threads, not celld's trio.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from dataclasses import dataclass, field

import h11

RECV_SIZE = 256 * 1024


class _Closed(Exception):
    """A peer went away (or stop() closed its socket); end this connection."""


def _next_event(conn: h11.Connection, sock: socket.socket) -> h11.Event | type[h11.PAUSED]:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        try:
            data = sock.recv(RECV_SIZE)
        except OSError as exc:
            raise _Closed from exc
        conn.receive_data(data)


@dataclass
class FaultProxy:
    """An HTTP/1.1 reverse proxy to `upstream` ("127.0.0.1:PORT") with faults.

    `corrupt`: flip the byte at body offset `corrupt_at` (negative counts from
    the end of a Content-Length body; clamped to the body) of matching
    responses; Content-Length is kept. `truncate_after`: send that many body
    bytes of a matching response, then close the connection. `hold_after`: send
    that many body bytes of the next matching response, then nothing more, the
    connection open until the client goes (a read that is still going when its
    reader dies); once, then it is None again. `rate`: send matching bodies at
    that many bytes a second (a registry behind a slow, shared link). `stall`: read
    requests but never answer them. `requests` lists every (method, target)
    received (`request_headers` their headers, in the same order),
    `connections` counts client connections accepted, `blob_gets` the targets of blob GETs forwarded upstream,
    `corrupted`, `truncated` and `held` the targets that were actually harmed.
    """

    upstream: str
    corrupt: bool = False
    corrupt_at: int = 0
    truncate_after: int | None = None
    hold_after: int | None = None
    rate: int | None = None
    stall: bool = False
    affects: str = r"/blobs/sha256:[0-9a-f]{64}"
    port: int = 0
    connections: int = 0
    requests: list[tuple[str, str]] = field(default_factory=list)
    request_headers: list[list[tuple[str, str]]] = field(default_factory=list)
    blob_gets: list[str] = field(default_factory=list)
    corrupted: list[str] = field(default_factory=list)
    truncated: list[str] = field(default_factory=list)
    held: list[str] = field(default_factory=list)
    _listener: socket.socket | None = field(default=None, init=False, repr=False, compare=False)
    _threads: list[threading.Thread] = field(
        default_factory=list, init=False, repr=False, compare=False
    )
    _sockets: set[socket.socket] = field(default_factory=set, init=False, repr=False, compare=False)
    _lock: threading.Lock = field(
        default_factory=threading.Lock, init=False, repr=False, compare=False
    )
    _stopping: threading.Event = field(
        default_factory=threading.Event, init=False, repr=False, compare=False
    )

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def headers_seen(self, name: str) -> set[str]:
        """Every value the header `name` had in the requests received."""
        name = name.lower()
        return {v for headers in self.request_headers for k, v in headers if k == name}

    def start(self) -> FaultProxy:
        """Listen (on the same port again after a stop) and serve in threads."""
        self._stopping.clear()
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        listener.settimeout(0.1)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._spawn(self._accept_loop)
        return self

    def stop(self) -> None:
        """Close the listener and every open connection, and join the threads."""
        self._stopping.set()
        with self._lock:
            sockets = list(self._sockets)
            threads = list(self._threads)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            thread.join(5)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            self._threads.clear()

    def __enter__(self) -> FaultProxy:
        return self.start() if self._listener is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, target, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()

    def _track(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            self._sockets.add(sock)
        if self._stopping.is_set():
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        return sock

    def _forget(self, sock: socket.socket | None) -> None:
        if sock is None:
            return
        with self._lock:
            self._sockets.discard(sock)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        listener = self._listener
        while not self._stopping.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            self.connections += 1
            self._spawn(self._serve, self._track(client))

    def _connect_upstream(self) -> socket.socket:
        host, _, port = self.upstream.rpartition(":")
        return self._track(socket.create_connection((host, int(port)), timeout=10))

    def _serve(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        try:
            server = h11.Connection(h11.SERVER)
            up_conn: h11.Connection | None = None
            while not self._stopping.is_set():
                event = _next_event(server, client)
                if not isinstance(event, h11.Request):
                    return  # ConnectionClosed, or garbage h11 already refused
                target = event.target.decode("latin-1")
                method = event.method.decode("latin-1")
                self.requests.append((method, target))
                self.request_headers.append(
                    [(k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers]
                )
                if self.stall:
                    self._hold(client)
                    return
                if up_conn is None or up_conn.our_state is not h11.IDLE:
                    self._forget(upstream)
                    try:
                        upstream = self._connect_upstream()
                    except OSError:
                        client.sendall(self._bad_gateway(server))
                        return
                    up_conn = h11.Connection(h11.CLIENT)
                if method == "GET" and re.search(self.affects, target):
                    self.blob_gets.append(target)
                upstream.sendall(up_conn.send(event))
                self._relay_request_body(server, client, up_conn, upstream)
                if not self._relay_response(server, client, up_conn, upstream, method, target):
                    return
                if server.our_state is not h11.DONE or server.their_state is not h11.DONE:
                    return
                server.start_next_cycle()
                if up_conn.our_state is h11.DONE and up_conn.their_state is h11.DONE:
                    up_conn.start_next_cycle()
        except (_Closed, OSError, h11.ProtocolError):
            return
        finally:
            self._forget(upstream)
            self._forget(client)

    def _hold(self, client: socket.socket) -> None:
        """The stall and hold faults: keep the connection open, send nothing more."""
        while not self._stopping.is_set():
            try:
                if not client.recv(RECV_SIZE):
                    return
            except OSError:
                return

    @staticmethod
    def _bad_gateway(server: h11.Connection) -> bytes:
        body = b"upstream unreachable\n"
        headers = [("content-length", str(len(body))), ("connection", "close")]
        return (
            server.send(h11.Response(status_code=502, headers=headers))
            + server.send(h11.Data(data=body))
            + server.send(h11.EndOfMessage())
        )

    @staticmethod
    def _relay_request_body(
        server: h11.Connection,
        client: socket.socket,
        up_conn: h11.Connection,
        upstream: socket.socket,
    ) -> None:
        while True:
            event = _next_event(server, client)
            if isinstance(event, h11.Data):
                upstream.sendall(up_conn.send(event))
            elif isinstance(event, h11.EndOfMessage):
                upstream.sendall(up_conn.send(event))
                return
            else:
                raise _Closed

    def _relay_response(
        self,
        server: h11.Connection,
        client: socket.socket,
        up_conn: h11.Connection,
        upstream: socket.socket,
        method: str,
        target: str,
    ) -> bool:
        """Stream one response to the client; False if the connection must end."""
        while True:
            event = _next_event(up_conn, upstream)
            if isinstance(event, h11.InformationalResponse):
                client.sendall(server.send(event))
                continue
            if not isinstance(event, h11.Response):
                raise _Closed
            break
        harmed = (
            method == "GET" and event.status_code in (200, 206) and re.search(self.affects, target)
        )
        flip_at: int | None = None
        cut_at: int | None = None
        if harmed and self.corrupt:
            flip_at = self.corrupt_at
            length = _content_length(event.headers)
            if length:
                flip_at = min(max(flip_at + length if flip_at < 0 else flip_at, 0), length - 1)
            elif flip_at < 0:
                flip_at = 0
        if harmed and self.truncate_after is not None:
            cut_at = self.truncate_after
        hold_at: int | None = None
        if harmed and self.hold_after is not None:
            hold_at, self.hold_after = self.hold_after, None
        rate = self.rate if harmed else None
        began = time.monotonic()
        client.sendall(server.send(event))
        offset = 0
        while True:
            event = _next_event(up_conn, upstream)
            if isinstance(event, h11.Data):
                data = event.data
                if flip_at is not None and offset <= flip_at < offset + len(data):
                    buf = bytearray(data)
                    buf[flip_at - offset] ^= 0xFF
                    data = bytes(buf)
                    self.corrupted.append(target)
                if hold_at is not None and offset + len(data) >= hold_at:
                    client.sendall(server.send(h11.Data(data=data[: hold_at - offset])))
                    self.held.append(target)
                    self._hold(client)
                    return False
                if cut_at is not None and offset + len(data) >= cut_at:
                    client.sendall(server.send(h11.Data(data=data[: cut_at - offset])))
                    self.truncated.append(target)
                    return False
                if rate is None:
                    client.sendall(server.send(h11.Data(data=data)))
                for start in range(0, len(data), 64 * 1024) if rate else ():
                    part = data[start : start + 64 * 1024]
                    client.sendall(server.send(h11.Data(data=part)))
                    late = began + (offset + start + len(part)) / rate - time.monotonic()
                    if late > 0:
                        time.sleep(late)
                offset += len(data)
            elif isinstance(event, h11.EndOfMessage):
                client.sendall(server.send(event))
                return True
            else:
                raise _Closed


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name.lower() == b"content-length":
            return int(value)
    return None
