"""celld.http_client, the lean client blob GETs take: what a registry operator sees.

Connections are kept alive and reused (one TCP connection for many GETs), a
connection the server closed while idle is replaced without the caller noticing,
credentials go to the origin they were made for and not where it redirects, and
a proxy in the environment sends the daemon back to httpx, which knows proxies.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import h11
import httpx
import pytest
import trio

from celld.daemon import _blob_pool
from celld.http_client import Origin, Pool, Response, Timeouts, _Request

TIMEOUTS = Timeouts(connect=2.0, read=5.0)
TRICKLE = 3 << 20  # /trickle's body: half of it, then nothing until the client had that half
DRIP = (
    3 << 20
)  # /drip's body, in 12 writes a few ms apart; /short's promise, of which it sends half
SEEP = 2 << 20  # /seep's body, in 16 KiB writes 2 ms apart: a registry on a slow link


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.connections = 0
        self.seen: list[tuple[str, str | None]] = []  # (path, Authorization)
        self.close_after_each = False
        self.redirect_to: str | None = None
        self.resume = threading.Event()  # /trickle sends its second half once set

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


# Heads a blob GET rarely gets, which the client leaves to h11: each answers "hello".
RAW = {
    "/chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhe\r\n3\r\nllo\r\n0\r\n\r\n",
    "/interim": b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    "/bare-lf": b"HTTP/1.1 200 OK\nContent-Length: 5\n\nhello",
    "/folded": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Long: a\r\n b\r\n\r\nhello",
}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like a registry
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.connections += 1

    def do_GET(self) -> None:
        self.server.seen.append((self.path, self.headers.get("Authorization")))
        if self.path in RAW:
            self.wfile.write(RAW[self.path])
            return
        if self.path.startswith("/redirect") and self.server.redirect_to:
            self.send_response(307)
            self.send_header("Location", self.server.redirect_to + "/data")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path == "/trickle":
            half = TRICKLE // 2
            self.send_response(200)
            self.send_header("Content-Length", str(TRICKLE))
            self.end_headers()
            self.wfile.write(b"a" * half)
            self.wfile.flush()
            if self.server.resume.wait(10):
                self.wfile.write(b"b" * half)
            return
        if self.path == "/seep":
            self.send_response(200)
            self.send_header("Content-Length", str(SEEP))
            self.end_headers()
            for i in range(SEEP // (16 << 10)):
                self.wfile.write(bytes([i % 251]) * (16 << 10))
                self.wfile.flush()
                time.sleep(0.002)
            return
        if self.path in ("/drip", "/short"):
            self.send_response(200)
            self.send_header("Content-Length", str(DRIP))
            self.end_headers()
            step = DRIP // 12
            for i in range(6 if self.path == "/short" else 12):
                self.wfile.write(bytes([i]) * step)
                self.wfile.flush()
                time.sleep(0.005)
            self.close_connection = self.path == "/short"
            return
        body = self.path.encode() * 1000
        self.send_response(200)
        if self.path.startswith("/big-head"):
            for i in range(50):  # a head spanning several of the client's reads
                self.send_header(f"X-Filler-{i}", "f" * 1000)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        if self.server.close_after_each:
            self.close_connection = True  # closes without saying so in a header

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[_Server]:
    yield from _serve()


@pytest.fixture
def storage() -> Iterator[_Server]:
    yield from _serve()


def _serve() -> Iterator[_Server]:
    srv = _Server()
    threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


async def _open(pool: Pool, url: str, authorization: bytes | None = None) -> Response:
    parsed = httpx.URL(url)
    return await pool.get(
        Origin.of(parsed), parsed.raw_path, [], TIMEOUTS, authorization=authorization
    )


async def _get(pool: Pool, url: str, authorization: bytes | None = None) -> tuple[int, bytes]:
    response = await _open(pool, url, authorization)
    try:
        body = b"".join([chunk async for chunk in response.chunks()])
    finally:
        await response.aclose()
    return response.status, body


async def test_connections_are_kept_alive_and_reused(server: _Server) -> None:
    pool = Pool()
    for i in range(5):
        assert await _get(pool, f"{server.url}/v2/{i}") == (200, f"/v2/{i}".encode() * 1000)
    await pool.aclose()
    assert server.connections == 1


async def test_a_head_larger_than_one_read_and_its_body_arrive_whole(server: _Server) -> None:
    pool = Pool()
    for _ in range(2):
        status, body = await _get(pool, server.url + "/big-head")
        assert (status, body) == (200, b"/big-head" * 1000)
    assert server.connections == 1
    await pool.aclose()


async def test_a_source_that_pauses_still_has_its_bytes_delivered(server: _Server) -> None:
    """The bytes a source sent before it went quiet reach the caller without
    waiting for a receive buffer to fill, and the connection then serves the
    next GET (its small head is read at once)."""
    pool = Pool()
    response = await _open(pool, server.url + "/trickle")
    body = bytearray()
    async for chunk in response.chunks():
        body += chunk
        if len(body) >= TRICKLE // 2:
            server.resume.set()  # the second half comes only after the first arrived
    await response.aclose()
    assert body == b"a" * (TRICKLE // 2) + b"b" * (TRICKLE // 2)
    assert await _get(pool, server.url + "/v2/next") == (200, b"/v2/next" * 1000)
    assert server.connections == 1
    await pool.aclose()


async def test_a_body_from_a_slow_source_is_streamed_in_few_large_chunks(
    server: _Server,
) -> None:
    """A streamed body that arrives 16 KiB at a time (a registry on a slow link)
    reaches the caller in chunks of hundreds of KiB, not one per write: each chunk
    wakes the fetch's writer and hasher, so a lease holder's CPU followed the
    number of chunks (4.2 CPU-s per 128 MiB from a 50 Mbit/s registry, 0.6 in
    large chunks). The bytes are all there, in order, and the next response's
    small head on the same connection is read at once, not after a timeout."""
    pool = Pool()
    for _ in range(2):
        response = await _open(pool, server.url + "/seep")
        chunks = [bytes(chunk) async for chunk in response.chunks()]
        await response.aclose()
        assert b"".join(chunks) == b"".join(
            bytes([i % 251]) * (16 << 10) for i in range(SEEP // (16 << 10))
        )
        assert len(chunks) <= 32, f"{len(chunks)} chunks for {SEEP // (16 << 10)} writes"
        with trio.fail_after(TIMEOUTS.read / 2):
            assert await _get(pool, server.url + "/v2/next") == (200, b"/v2/next" * 1000)
    assert server.connections == 1
    await pool.aclose()


async def test_a_body_read_whole_arrives_whole_and_the_next_head_at_once(
    server: _Server,
) -> None:
    """`read` waits for the socket to hold a MiB before it wakes (SO_RCVLOWAT): the
    dripped body still arrives whole, and the next response's small head on the
    same connection is read as it comes, not after the read timeout."""
    pool = Pool()
    for _ in range(2):
        response = await _open(pool, server.url + "/drip")
        body = await response.read(DRIP)
        await response.aclose()
        assert body == b"".join(bytes([i]) * (DRIP // 12) for i in range(12))
        assert await _get(pool, server.url + "/v2/next") == (200, b"/v2/next" * 1000)
    assert server.connections == 1
    await pool.aclose()


async def test_a_body_read_whole_that_ends_short_is_an_error_not_a_hang(
    server: _Server,
) -> None:
    pool = Pool()
    response = await _open(pool, server.url + "/short")
    with pytest.raises(httpx.RemoteProtocolError, match="short of the Content-Length"):
        with trio.fail_after(TIMEOUTS.read / 2):  # the close, not the read timeout
            await response.read(DRIP)
    await response.aclose()
    await pool.aclose()


@pytest.mark.parametrize("path", sorted(RAW))
async def test_heads_left_to_h11_still_deliver_their_body(server: _Server, path: str) -> None:
    pool = Pool()
    for _ in range(2):  # and the connection is reused after them
        assert await _get(pool, server.url + path) == (200, b"hello")
    assert server.connections == 1
    await pool.aclose()


async def test_a_head_h11_refuses_is_a_protocol_error(server: _Server) -> None:
    RAW["/broken"] = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nBad Name: x\r\n\r\nhello"
    try:
        with pytest.raises(httpx.RemoteProtocolError):
            await _get(Pool(), server.url + "/broken")
    finally:
        del RAW["/broken"]


async def test_a_connection_the_server_closed_is_replaced(server: _Server) -> None:
    server.close_after_each = True
    pool = Pool()
    for i in range(3):
        assert await _get(pool, f"{server.url}/v2/{i}") == (200, f"/v2/{i}".encode() * 1000)
    await pool.aclose()
    assert server.connections == 3


async def test_a_body_left_unread_does_not_poison_the_pool(server: _Server) -> None:
    pool = Pool()
    response = await _open(pool, f"{server.url}/v2/a")
    await response.aclose()  # the caller gave up mid-body: that connection cannot be reused
    assert await _get(pool, f"{server.url}/v2/b") == (200, b"/v2/b" * 1000)
    await pool.aclose()
    assert server.connections == 2


async def test_authorization_stays_with_its_origin_across_redirects(
    server: _Server, storage: _Server
) -> None:
    server.redirect_to = storage.url
    pool = Pool()
    status, body = await _get(pool, f"{server.url}/redirect", authorization=b"Bearer secret")
    await pool.aclose()
    assert (status, body) == (200, b"/data" * 1000)
    assert server.seen == [("/redirect", "Bearer secret")]
    assert storage.seen == [("/data", None)]


async def test_a_dead_origin_is_a_connect_error() -> None:
    pool = Pool()
    with pytest.raises(httpx.ConnectError, match=r"127\.0\.0\.1:1\b"):
        await _open(pool, "http://127.0.0.1:1/v2/")
    await pool.aclose()


def test_a_proxy_in_the_environment_keeps_blob_gets_on_httpx(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(name, raising=False)
    assert isinstance(_blob_pool(), Pool)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    assert _blob_pool() is None


def test_a_request_goes_out_as_h11_would_write_it() -> None:
    headers = [
        (b"host", b"127.0.0.1:5000"),
        (b"user-agent", b"celld/0.1"),
        (b"authorization", b"Bearer a b"),
    ]
    request = _Request(b"/v2/library/a/blobs/sha256:" + b"0" * 64, headers)
    conn = h11.Connection(h11.CLIENT)
    assert request.data == conn.send(request.event()) + conn.send(h11.EndOfMessage())


@pytest.mark.parametrize("value", [b"Bearer x\r\nX-Injected: 1", b"Bearer \x00", b"", b" lead"])
async def test_a_header_value_that_would_split_the_request_is_refused_unsent(
    server: _Server, value: bytes
) -> None:
    pool = Pool()
    with pytest.raises(httpx.LocalProtocolError):
        await _open(pool, f"{server.url}/v2/a", authorization=value)
    await pool.aclose()
    assert server.connections == 0
