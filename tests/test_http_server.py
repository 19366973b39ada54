"""The server core's plain path: requests parsed and response heads written by
celld itself, h11 everywhere else, and byte for byte what h11 alone would do."""

from __future__ import annotations

import errno
import os
import socket
import struct

import h11
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from celld.http import (
    FileRange,
    Request,
    Response,
    _accept_one,
    _Full,
    _plain_head,
    serve,
    serve_connection,
)

GET = b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n"


def _h11_head(status: int, headers: list[tuple[bytes, bytes]], method: bytes = b"GET") -> bytes:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(method + b" / HTTP/1.1\r\nHost: x\r\n\r\n")
    conn.next_event()
    return conn.send(h11.Response(status_code=status, headers=headers))


_names = st.one_of(
    st.sampled_from(
        [b"Content-Type", b"content-length", b"Etag", b"Connection", b"Transfer-Encoding"]
    ),
    st.binary(min_size=1, max_size=12),
)
_values = st.one_of(st.from_regex(rb"\A[0-9]{1,12}\Z"), st.binary(max_size=24))


@given(
    status=st.integers(min_value=200, max_value=599),
    headers=st.lists(st.tuples(_names, _values), max_size=6),
    length=st.one_of(st.none(), st.integers(min_value=0, max_value=2**40)),
)
def test_a_head_written_here_is_the_one_h11_writes(
    status: int, headers: list[tuple[bytes, bytes]], length: int | None
) -> None:
    if length is not None:
        headers = [*headers, (b"content-length", str(length).encode())]
    ours = _plain_head(status, headers)
    if ours is None:
        return
    assert ours == _h11_head(status, headers)
    assert ours == _h11_head(status, headers, b"HEAD")


def test_the_blob_head_takes_the_plain_path() -> None:
    headers = [
        (b"Content-Type", b"application/octet-stream"),
        (b"Docker-Content-Digest", b"sha256:" + b"a" * 64),
        (b"Etag", b'"sha256:' + b"a" * 64 + b'"'),
        (b"Accept-Ranges", b"bytes"),
        (b"content-length", b"268435456"),
    ]
    assert _plain_head(200, headers) == _h11_head(200, headers)


def test_what_h11_would_rewrite_is_left_to_h11() -> None:
    length = (b"content-length", b"3")
    assert _plain_head(200, [(b"Connection", b"close"), length]) is None
    assert _plain_head(200, [(b"Transfer-Encoding", b"chunked"), length]) is None
    assert _plain_head(200, [(b"content-length", b"3, 3")]) is None
    assert _plain_head(200, [length, length]) is None
    assert _plain_head(200, [(b"X", b"a\r\nInjected: 1"), length]) is None
    assert _plain_head(204, [length]) is None
    assert _plain_head(200, []) is None


async def _exchange(requests: bytes) -> bytes:
    """What a client that sent `requests` at once reads until the server closes."""

    async def handler(request: Request) -> Response:
        return Response(200, [("Content-Type", "text/plain")], b"hi " + request.target)

    a, b = trio.socket.socketpair()
    server, client = trio.SocketStream(a), trio.SocketStream(b)
    received = bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_connection, server, handler)
        await client.send_all(requests)
        with trio.fail_after(5):
            while data := await client.receive_some(65536):
                received += data
                if received.count(b"hi /") == requests.count(b"GET"):
                    await client.send_eof()
        nursery.cancel_scope.cancel()
    return bytes(received)


def _expected(requests: list[bytes]) -> bytes:
    """The bytes h11 alone writes for the same exchange."""
    conn = h11.Connection(h11.SERVER)
    out = b""
    for raw in requests:
        conn.receive_data(raw)
        event = conn.next_event()
        assert isinstance(event, h11.Request)
        assert isinstance(conn.next_event(), h11.EndOfMessage)
        body = b"" if event.method == b"HEAD" else b"hi " + event.target
        length = len(b"hi " + event.target)
        headers = [
            (b"Content-Type", b"text/plain"),
            (b"content-length", str(length).encode()),
        ]
        out += conn.send(h11.Response(status_code=200, headers=headers))
        out += conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
        if conn.our_state is h11.MUST_CLOSE:
            break
        conn.start_next_cycle()
    return out


async def test_pipelined_requests_get_h11s_bytes() -> None:
    requests = [b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n", b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n"]
    assert await _exchange(b"".join(requests)) == _expected(requests)


async def test_requests_one_at_a_time_and_in_pieces_get_h11s_bytes() -> None:
    """The plain path (a whole request per read), a request split across reads
    (h11's path), then the plain path again on the same connection."""

    async def handler(request: Request) -> Response:
        return Response(200, [("Content-Type", "text/plain")], b"hi " + request.target)

    requests = [
        b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n",
        b"HEAD /b HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n",
        b"GET /c HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /d HTTP/1.1\r\nHost: x\r\n\r\n",
    ]
    a, b = trio.socket.socketpair()
    server, client = trio.SocketStream(a), trio.SocketStream(b)
    received = bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_connection, server, handler)
        for i, raw in enumerate(requests):
            pieces = [raw[:7], raw[7:20], raw[20:]] if i == 2 else [raw]
            for piece in pieces:
                await client.send_all(piece)
                await trio.sleep(0.01)
            with trio.fail_after(5):
                while not received.endswith(b"hi " + raw.split()[1]) and not (
                    raw.startswith(b"HEAD") and received.endswith(b"\r\n\r\n")
                ):
                    received += await client.receive_some(65536)
        await client.send_eof()
        with trio.fail_after(5):
            while data := await client.receive_some(65536):
                received += data
    assert bytes(received) == _expected(requests)


async def test_a_file_body_to_a_slow_reader_arrives_whole_through_an_open_send_queue(
    tmp_path,
) -> None:
    """A file body is bulk: its connection's unsent bytes are left to the kernel's
    send buffer (trio caps them at 16 KiB, so a sender on a slow link woke every
    ~64 KiB and spent its CPU on wake-ups: celld.http._SocketOutput.sendfile).
    A reader slower than the sender still gets every byte, in order, as the send
    waits for room between short writes."""
    data = os.urandom(4 << 20)
    path = tmp_path / "blob"
    path.write_bytes(data)

    async def handler(request: Request) -> Response:
        return Response(200, [], FileRange(os.open(path, os.O_RDONLY), 0, len(data)))

    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = await trio.open_tcp_stream(*listener.getsockname())
    server = trio.SocketStream((await listener.accept())[0])
    listener.close()
    queue = socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT
    assert server.socket.getsockopt(*queue) == 16384  # as trio leaves every stream
    received = bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_connection, server, handler)
        await client.send_all(b"GET /blob HTTP/1.1\r\nHost: x\r\n\r\n")
        with trio.fail_after(30):
            while not received.endswith(data[-1024:]) or len(received) < len(data):
                received += await client.receive_some(256 << 10)
                await trio.sleep(0.001)  # slower than loopback: the send buffer fills
        assert server.socket.getsockopt(*queue) == 0  # the system's default: no cap
        nursery.cancel_scope.cancel()
    await client.aclose()
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert body == data


async def test_a_client_that_closes_gets_connection_close_and_nothing_more() -> None:
    for first in (
        b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"GET /a HTTP/1.0\r\n\r\n",
    ):
        requests = [first, b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n"]
        received = await _exchange(b"".join(requests))
        assert received == _expected(requests)
        assert b"Connection: close\r\n" in received
        assert b"hi /b" not in received


class _Listening:
    """A listening socket's accept(), scripted: errors, then connections."""

    def __init__(self, *results: OSError | str) -> None:
        self.results = list(results)

    def accept(self) -> tuple[object, None]:
        result = self.results.pop(0)
        if isinstance(result, OSError):
            raise result
        return result, None


def test_accept_skips_a_connection_that_failed_before_it_was_taken() -> None:
    # accept(2): Linux hands a new socket's pending network error to accept().
    for code in (errno.ECONNABORTED, errno.EPROTO, errno.ECONNRESET, errno.ETIMEDOUT):
        listening = _Listening(OSError(code, os.strerror(code)), "client")
        assert _accept_one(listening) == "client"  # type: ignore[arg-type]
    assert _accept_one(_Listening(BlockingIOError())) is None  # type: ignore[arg-type]


def test_accept_out_of_descriptors_is_a_pause_not_a_crash() -> None:
    with pytest.raises(_Full):
        _accept_one(_Listening(OSError(errno.EMFILE, "Too many open files")))  # type: ignore[arg-type]
    with pytest.raises(OSError):
        _accept_one(_Listening(OSError(errno.EBADF, "Bad file descriptor")))  # type: ignore[arg-type]


async def test_a_client_that_resets_before_it_is_served_leaves_the_server_serving() -> None:
    async def handler(request: Request) -> Response:
        return Response(200, [], b"ok")

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(serve, "127.0.0.1", 0, handler)
        port = listeners[0].socket.getsockname()[1]
        for _ in range(20):  # connect and reset at once (SO_LINGER 0)
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.connect(("127.0.0.1", port))
            s.close()
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(GET)
        with trio.fail_after(5):
            data = b""
            while not data.endswith(b"ok"):
                data += await stream.receive_some(1024)
        assert data.startswith(b"HTTP/1.1 200 ")
        await stream.aclose()
        nursery.cancel_scope.cancel()
