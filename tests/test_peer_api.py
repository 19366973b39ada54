"""The peer API on loopback: a real celld.http server running Peer over a real Store,
asked by PeerClient (and by raw sockets where a client would not misbehave)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from celld.http import serve
from celld.http_client import Origin, Pool, Timeouts
from celld.metrics import Metrics
from celld.peer import (
    MAX_SPARE,
    Complete,
    Partial,
    Peer,
    PeerClient,
    PeerError,
    PieceAnswer,
    StoreBlobs,
)
from celld.store import Store
from protocol import peerauth
from protocol.pieces import MiB, PieceTable, piece_size_for
from protocol.swarm import Uploader

KEY = bytes(range(32))
PIECE = piece_size_for(1)  # the policy's smallest piece (a blob up to a GiB)
SIZE = 2 * PIECE + PIECE // 4 + 12345  # three pieces, the last one short
TIMEOUTS = Timeouts(connect=2.0, read=10.0)


def _blob(size: int = SIZE, seed: int = 1) -> tuple[str, bytes]:
    data = random.Random(seed).randbytes(size)
    return "sha256:" + hashlib.sha256(data).hexdigest(), data


@dataclass
class Cell:
    addr: str
    peer: Peer
    metrics: Metrics
    uploader: Uploader

    def value(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


@contextlib.asynccontextmanager
async def running(blobs, *, slots: int = 4, rate: float = 0) -> AsyncIterator[Cell]:
    metrics = Metrics()
    uploader = Uploader("server", slots=slots, have_wait=1.0)
    peer = Peer(KEY, uploader, blobs, metrics, upload_rate=rate)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(serve, "127.0.0.1", 0, peer.handle)
        port = listeners[0].socket.getsockname()[1]
        yield Cell(f"127.0.0.1:{port}", peer, metrics, uploader)
        nursery.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def client(**kw) -> AsyncIterator[PeerClient]:
    c = PeerClient(kw.pop("cluster_key", KEY), kw.pop("cell", "asker"), **kw)
    try:
        yield c
    finally:
        await c.aclose()


async def read_blob(c: PeerClient, addr: str, digest: str, start: int = 0) -> bytes:
    out = bytearray()
    async with c.blob(addr, digest, start=start) as body:
        async for chunk in body.chunks():
            out += chunk
        assert body.length == len(out)
    return bytes(out)


async def test_whole_blob_by_sendfile_is_intact(store: Store) -> None:
    digest, data = _blob()
    store.put_bytes(digest, data)
    async with running(StoreBlobs(store)) as cell, client() as c:
        got = await read_blob(c, cell.addr, digest)
        assert hashlib.sha256(got).hexdigest() == digest.removeprefix("sha256:")
        # the server counts once its last write returned, which may be just after the
        # client read the last byte
        with trio.fail_after(5):
            while cell.value("celld_peer_sent_bytes_total", endpoint="blob") != SIZE:
                await trio.sleep(0.01)
        assert cell.value("celld_peer_requests_total", endpoint="blob", outcome="ok") == 1
        assert cell.uploader.load == 0  # the whole-blob slot was given back


async def test_a_cell_of_the_previous_version_is_told_not_held(store: Store) -> None:
    """A v1 cell (2 MiB pieces) may still ask a restarted v2 cell until its probes fail:
    it gets 404, "not held", never the bytes of a span it would check as another piece."""
    digest, data = _blob()
    store.put_bytes(digest, data)
    async with running(StoreBlobs(store)) as cell:
        pool = Pool()
        for path in ("", "/pieces", "/pieces/0"):
            target = f"/v1/blobs/{digest}{path}".encode()
            headers = peerauth.sign(KEY, "old", b"GET", target, time.time(), os.urandom(16))
            r = await pool.get(_origin(cell.addr), target, headers, TIMEOUTS)
            assert r.status == 404
            assert r.header(b"celld-have") is None  # nothing said about the blob
            await r.aclose()
        await pool.aclose()
        assert cell.value("celld_peer_sent_bytes_total", endpoint="piece") == 0


async def test_range_resumes_a_blob(store: Store) -> None:
    digest, data = _blob()
    store.put_bytes(digest, data)
    async with running(StoreBlobs(store)) as cell, client() as c:
        assert await read_blob(c, cell.addr, digest, start=SIZE - 5000) == data[-5000:]
        pool = Pool()
        target = f"/v2/blobs/{digest}".encode()
        headers = peerauth.sign(KEY, "raw", b"GET", target, time.time(), os.urandom(16))
        r = await pool.get(_origin(cell.addr), target, [*headers, (b"range", b"bytes=5-9")],
                           TIMEOUTS)  # fmt: skip
        assert r.status == 206 and r.header(b"content-range") == f"bytes 5-9/{SIZE}"
        assert await r.read(100) == data[5:10]
        await r.aclose()
        headers = peerauth.sign(KEY, "raw", b"GET", target, time.time(), os.urandom(16))
        r = await pool.get(_origin(cell.addr), target, [*headers, (b"range", b"bytes=99999999-")],
                           TIMEOUTS)  # fmt: skip
        assert r.status == 416 and r.header(b"content-range") == f"bytes */{SIZE}"
        await r.aclose()
        await pool.aclose()


async def test_table_matches_the_bytes_and_every_piece_verifies(store: Store) -> None:
    digest, data = _blob()
    store.put_bytes(digest, data, private_scope="app-secret")  # private: peers still get it
    expected = PieceTable.from_bytes(data, piece_size_for(SIZE))
    async with running(StoreBlobs(store)) as cell, client() as c:
        async with trio.open_nursery() as n:  # many askers, one hashing
            for _ in range(3):
                n.start_soon(c.table, cell.addr, digest)
        reply = await c.table(cell.addr, digest)
        table = reply.table
        assert table == expected and table.complete and table.count == 3
        assert reply.private == {"app-secret"}  # the asker keeps it private to the same app
        recycled = None
        for i in (0, 1, 0, 2):  # each OK piece's buffer handed back for the next
            result = await c.piece(cell.addr, digest, i, table)
            assert result.answer is PieceAnswer.OK
            offset, length = table.span(i)
            assert result.data == data[offset : offset + length]
            assert result.have == 0b111 and result.complete
            if recycled is not None and length == len(recycled):
                assert result.data is recycled  # reused, and holding this piece's bytes
            c.recycle(result.data)
            recycled = result.data
        async with client(cell="long-lived") as d:
            # other blobs' short last pieces handed back, then whole pieces of other
            # sizes: a whole piece of this size is still kept, and the one reused
            for n in range(MAX_SPARE):
                d.recycle(bytearray(PIECE // 2 + n + 1))
            whole = (await d.piece(cell.addr, digest, 0, table)).data
            d.recycle(whole)
            for n in range(MAX_SPARE - 1):
                d.recycle(bytearray(PIECE >> (n + 1)))
            assert (await d.piece(cell.addr, digest, 1, table)).data is whole
        missing = await c.piece(cell.addr, digest, 3, table)
        assert missing.answer is PieceAnswer.MISSING and missing.have == 0b111
        unknown = "sha256:" + "0" * 64
        with pytest.raises(PeerError) as err:
            await c.table(cell.addr, unknown)
        assert err.value.status == 404


async def test_a_lying_peer_piece_is_bad_never_ok(store: Store) -> None:
    """The server holds other bytes under the digest, and the right table: the client's
    check catches them. Without a table, the server hashes its copy before it sends a
    piece with its hash, finds it damaged, and drops it instead."""
    digest, data = _blob()
    _, other = _blob(seed=2)
    path = store.data_dir / "liar"
    path.write_bytes(other)
    table = PieceTable.from_bytes(data)
    damaged: list[str] = []

    class Liar:
        stored_table: PieceTable | None = table

        def find(self, d: str):
            return Complete(path, SIZE, table=self.stored_table) if d == digest else None

        def corrupt(self, d: str) -> None:
            damaged.append(d)

    liar = Liar()
    async with running(liar) as cell, client() as c:
        result = await c.piece(cell.addr, digest, 1, table)
        assert result.answer is PieceAnswer.BAD and result.data == b""
        partial = PieceTable(table.blob_size, table.piece_size, (table.hashes[0], None, None))
        result = await c.piece(cell.addr, digest, 1, partial)  # the liar's hash: still BAD
        assert result.answer is PieceAnswer.BAD and result.learned is None
        liar.stored_table = None
        result = await c.piece(cell.addr, digest, 1, partial)
        assert result.answer is PieceAnswer.MISSING and damaged == [digest]


async def test_a_piece_brings_the_hash_a_partial_table_lacks(store: Store) -> None:
    """An asker that got a partial table (its sender was still downloading) takes the
    other pieces' hashes from the replies that carry them, and checks each piece."""
    digest, data = _blob()
    store.put_bytes(digest, data)
    full = PieceTable.from_bytes(data)
    first = PieceTable(full.blob_size, full.piece_size, (full.hashes[0], None, None))
    async with running(StoreBlobs(store)) as cell, client() as c:
        for i in (1, 2):
            result = await c.piece(cell.addr, digest, i, first)
            assert result.answer is PieceAnswer.OK and result.learned == full.hashes[i]
            offset, length = full.span(i)
            assert result.data == data[offset : offset + length]
        known = await c.piece(cell.addr, digest, 0, first)
        assert known.answer is PieceAnswer.OK and known.learned is None
        assert cell.value("celld_peer_requests_total", endpoint="table", outcome="ok") == 0


async def test_bad_macs_get_401_and_are_counted(store: Store) -> None:
    digest, data = _blob(size=1000)
    store.put_bytes(digest, data)
    async with running(StoreBlobs(store)) as cell:
        async with client(cluster_key=bytes(32)) as forger:
            with pytest.raises(PeerError) as err:
                await forger.table(cell.addr, digest)
            assert err.value.status == 401
        async with client(now=lambda: time.time() - 120) as late:
            with pytest.raises(PeerError) as err:
                await late.table(cell.addr, digest)
            assert err.value.status == 401
        pool = Pool()
        target = f"/v2/blobs/{digest}/pieces".encode()
        r = await pool.get(_origin(cell.addr), target, [], TIMEOUTS)  # unsigned
        assert r.status == 401
        assert "missing" in json.loads(await r.read(4096))["errors"][0]["detail"]
        await r.aclose()
        headers = peerauth.sign(KEY, "raw", b"GET", target, time.time(), os.urandom(16))
        statuses = []
        for _ in range(2):  # the same signed request twice
            r = await pool.get(_origin(cell.addr), target, headers, TIMEOUTS)
            statuses.append(r.status)
            await r.aclose()
        assert statuses == [200, 401]
        # a MAC made for one path does not open another
        other = f"/v2/blobs/{digest}".encode()
        headers = peerauth.sign(KEY, "raw", b"GET", target, time.time(), os.urandom(16))
        r = await pool.get(_origin(cell.addr), other, headers, TIMEOUTS)
        assert r.status == 401
        await r.aclose()
        await pool.aclose()
        for reason, n in (("bad_mac", 2), ("stale", 1), ("missing", 1), ("replayed", 1)):
            assert cell.value("celld_peer_auth_failures_total", reason=reason) == n, reason
        assert cell.value("celld_peer_requests_total", endpoint="other", outcome="error_401") == 5
        assert cell.value("celld_peer_sent_bytes_total", endpoint="blob") == 0


async def test_a_busy_cell_says_503_and_serves_again_once_free(store: Store) -> None:
    digest, data = _blob()
    store.put_bytes(digest, data)
    async with running(StoreBlobs(store), slots=1, rate=4 * MiB) as cell:
        async with client(cell="a") as a, client(cell="b") as b:
            table = PieceTable.from_bytes(data)
            first: list = []

            async def slow() -> None:
                first.append(await a.piece(cell.addr, digest, 0, table))

            async with trio.open_nursery() as n:
                n.start_soon(slow)
                while cell.uploader.load == 0:
                    await trio.sleep(0.005)
                busy = await b.piece(cell.addr, digest, 1, table)
                assert busy.answer is PieceAnswer.BUSY and busy.have == 0b111
                with pytest.raises(PeerError) as err:  # a whole blob needs a slot too
                    await read_blob(b, cell.addr, digest)
                assert err.value.status == 503
            assert first[0].answer is PieceAnswer.OK
            assert (await b.piece(cell.addr, digest, 1, table)).answer is PieceAnswer.OK
        assert cell.uploader.busy_replies == 2
        assert cell.value("celld_peer_requests_total", endpoint="piece", outcome="error_503") == 1


async def test_a_queued_upload_starts_when_the_slot_frees(store: Store) -> None:
    digest, data = _blob()
    store.put_bytes(digest, data)
    metrics = Metrics()
    uploader = Uploader("server", slots=1, queue=1)
    peer = Peer(KEY, uploader, StoreBlobs(store), metrics, upload_rate=4 * MiB)  # a piece: 0.25 s
    table = PieceTable.from_bytes(data)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(serve, "127.0.0.1", 0, peer.handle)
        addr = f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        results: dict[str, PieceAnswer] = {}
        async with client(cell="a") as a, client(cell="b") as b, client(cell="c") as c:

            async def ask(who: PeerClient, name: str, index: int) -> None:
                results[name] = (await who.piece(addr, digest, index, table)).answer

            async with trio.open_nursery() as n:
                n.start_soon(ask, a, "a", 0)
                while uploader.load == 0:
                    await trio.sleep(0.005)
                n.start_soon(ask, b, "b", 1)  # queued behind a
                await trio.sleep(0.05)
                n.start_soon(ask, c, "c", 2)  # slot and queue full
        nursery.cancel_scope.cancel()
    assert results == {"a": PieceAnswer.OK, "b": PieceAnswer.OK, "c": PieceAnswer.BUSY}
    assert uploader.load == 0 and uploader.uploads_done == 2


async def test_an_empty_blob(store: Store) -> None:
    digest, data = _blob(size=0)
    store.put_bytes(digest, data)
    async with running(StoreBlobs(store)) as cell, client() as c:
        assert await read_blob(c, cell.addr, digest) == b""
        table = (await c.table(cell.addr, digest)).table
        assert table.count == 0 and table.complete


async def test_the_rate_cap_holds_across_uploads(store: Store) -> None:
    size, rate = 3 * MiB, 4 * MiB
    digest, data = _blob(size=size)
    store.put_bytes(digest, data)
    async with running(StoreBlobs(store), rate=rate) as cell:
        got: list[bytes] = []
        start = trio.current_time()
        async with trio.open_nursery() as n:
            for name in ("a", "b"):

                async def one(name: str = name) -> None:
                    async with client(cell=name) as c:
                        got.append(await read_blob(c, cell.addr, digest))

                n.start_soon(one)
        elapsed = trio.current_time() - start
        assert got == [data, data]
        achieved = 2 * size / elapsed
        # a burst of 256 KiB is allowed up front; the rest goes at the cap
        print(f"2 uploads under a {rate / MiB:.0f} MiB/s cap: {achieved / rate:.2f} of it")
        assert 0.6 * rate < achieved < 1.15 * rate, achieved / rate


async def test_a_table_request_waits_for_the_first_verified_piece(tmp_path: Path) -> None:
    """A lease holder whose registry read has only begun holds no piece yet: a table
    request that may wait is answered once the first piece verifies (one request,
    where a 404 would have the asker poll), and one that may not is a 404 at once."""
    digest, data = _blob()
    full = PieceTable.from_bytes(data)
    psize = full.piece_size
    temp = tmp_path / "downloading"
    temp.write_bytes(b"")
    state = {"held": 0}

    class Starting:
        def find(self, d: str):
            if d != digest or not state["held"]:
                return None  # as celld.peering.Peering.find: no verified piece, no table
            hashes = tuple(h if state["held"] >> i & 1 else None for i, h in enumerate(full.hashes))
            return Partial(temp, SIZE, psize, PieceTable(SIZE, psize, hashes), state["held"])

        def receiving(self, d: str) -> int | None:
            return 1234 if d == digest else None  # bytes in, none of a piece verified

    async with running(Starting()) as cell, client() as c:
        with pytest.raises(PeerError) as err:
            await c.table(cell.addr, digest)
        # a 404 that says how far the download is: the asker waits while it moves
        assert (err.value.status, err.value.received) == (404, 1234)
        with pytest.raises(PeerError) as err:
            await c.table(cell.addr, digest, wait=0.1)  # nothing lands in time
        assert (err.value.status, err.value.received) == (404, 1234)
        with pytest.raises(PeerError) as err:
            await c.table(cell.addr, "sha256:" + "0" * 64)  # not downloading that one
        assert (err.value.status, err.value.received) == (404, None)
        replies: list = []

        async def ask() -> None:
            replies.append(await c.table(cell.addr, digest, wait=30))

        async with trio.open_nursery() as n:
            n.start_soon(ask)
            await trio.sleep(0.3)
            assert replies == []  # parked, not answered 404
            temp.write_bytes(data[:psize])
            state["held"] = 0b001
            cell.peer.grew(digest)
        assert replies[0].table.known == 0b001
        assert replies[0].table.merge(full) == full
        outcomes = {
            o: cell.value("celld_peer_requests_total", endpoint="table", outcome=o)
            for o in ("ok", "error_404")
        }
        assert outcomes == {"ok": 1, "error_404": 3}


async def test_a_partial_blob_serves_only_verified_pieces(tmp_path: Path) -> None:
    digest, data = _blob()
    full = PieceTable.from_bytes(data)
    psize = full.piece_size
    temp = tmp_path / "downloading"
    held = 0b101
    with temp.open("wb") as f:  # pieces 0 and 2 landed; piece 1 is a hole
        f.write(data[:psize])
        f.seek(2 * psize)
        f.write(data[2 * psize :])
    state = {"held": held}

    class Downloading:
        def find(self, d: str):
            if d != digest:
                return None
            hashes = tuple(h if state["held"] >> i & 1 else None for i, h in enumerate(full.hashes))
            table = PieceTable(SIZE, psize, hashes)
            return Partial(temp, SIZE, psize, table, state["held"])

    async with running(Downloading()) as cell, client() as c:
        table = (await c.table(cell.addr, digest)).table
        assert not table.complete and table.known == held
        assert table.merge(full) == full
        for i in (0, 2):
            ok = await c.piece(cell.addr, digest, i, full)
            assert ok.answer is PieceAnswer.OK and ok.have == held and not ok.complete
        hole = await c.piece(cell.addr, digest, 1, full)
        assert hole.answer is PieceAnswer.MISSING and hole.have == held
        with pytest.raises(PeerError) as err:
            await read_blob(c, cell.addr, digest)
        assert err.value.status == 404

        # the hole lands: the next request for it is served
        with temp.open("r+b") as f:
            f.seek(psize)
            f.write(data[psize : 2 * psize])
        state["held"] = 0b111
        assert (await c.piece(cell.addr, digest, 1, full)).answer is PieceAnswer.OK


async def test_garbage_gets_clean_4xx_never_a_traceback(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    digest, data = _blob(size=100)
    store.put_bytes(digest, data)
    rng = random.Random(7)
    alphabet = "abcdef0123456789/%:?=&.-_~sha256pieceshavewantv1blobs"
    parts = ["/v2/blobs/", digest, "/pieces", "/pieces/", "/have", "?want=", "/", "..", "%00",
             "9" * 12, "-1", "zz", "sha256:", "?", "&want=ff"]  # fmt: skip

    def target() -> str:
        if rng.random() < 0.5:
            return "/" + "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 120)))
        return "".join(rng.choice(parts) for _ in range(rng.randint(1, 6)))

    caplog.set_level(logging.WARNING)
    async with running(StoreBlobs(store)) as cell:
        host, port = cell.addr.rsplit(":", 1)
        for i in range(300):
            t = target().encode()
            if not t.startswith(b"/"):
                t = b"/" + t
            lines = [b"GET " + t + b" HTTP/1.1", b"Host: x"]
            method = rng.choice([b"GET", b"GET", b"POST", b"DELETE", b"HEAD"])
            lines[0] = method + lines[0][3:]
            if i % 3:  # signed, so it reaches the router
                for k, v in peerauth.sign(KEY, f"c{i}", method, t, time.time(), os.urandom(16)):
                    lines.append(k + b": " + v)
            for _ in range(rng.randint(0, 3)):  # and junk headers
                junk = rng.choice([b"celld-mac", b"celld-time", b"celld-cell", b"range", b"x"])
                lines.append(junk + b": " + bytes(rng.choice(b"abc019-=%") for _ in range(9)))
            if method == b"POST":
                lines.append(b"Content-Length: 0")
            status = await _raw(host, int(port), b"\r\n".join(lines) + b"\r\n\r\n")
            if status == 200:  # a signed garbage path can still name the blob
                assert digest.encode() in t
            else:
                assert 400 <= status < 500, (t, status)
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert cell.value("celld_peer_requests_total", endpoint="other", outcome="error_500") == 0


async def _raw(host: str, port: int, request: bytes) -> int:
    stream = await trio.open_tcp_stream(host, port)
    try:
        await stream.send_all(request)
        data = b""
        with trio.fail_after(5):
            while b"\r\n" not in data:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                data += chunk
        return int(data.split(b" ", 2)[1])
    finally:
        await stream.aclose()


def _origin(addr: str) -> Origin:
    host, port = addr.rsplit(":", 1)
    return Origin("http", host, int(port))
