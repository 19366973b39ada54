"""The fetch path's intake: what a fetched blob ends with besides its bytes.

A blob fetched from a real docker-registry ends with its piece table (blake3
per piece, for the peer API), equal to the one computed from its bytes, and
while it downloads the pieces it reports done are on disk. A byte flipped by
the upstream still aborts the fetch: every waiter's transfer fails and
nothing is stored. In-process where the test needs the daemon's objects
(Sources, Store); a real `celld serve` where a runtime's view is the point.
"""

from __future__ import annotations

import os

import httpx
import trio

from celld.config import from_dict
from celld.http_client import Pool
from celld.metrics import Metrics
from celld.sources import Fetch, Sources
from celld.store import Store
from protocol.pieces import MiB, PieceTable
from tests.support.celld import Celld
from tests.support.images import Blob, Pusher

SIZE = 4 * 4 * MiB + 12345  # five pieces of 4 MiB, the last one short


def blob_files(cell: Celld) -> set[str]:
    root = cell.data_dir / "blobs"
    return {p.name for p in root.rglob("*") if p.is_file()} if root.exists() else set()


async def test_fetched_blob_has_the_piece_table_of_its_bytes(hub, tmp_path):
    blob = Blob("application/octet-stream", os.urandom(SIZE))
    pusher = Pusher(hub.url)
    pusher.blob("library/pieces", blob)
    pusher.close()
    want = PieceTable.from_bytes(blob.data)
    config = from_dict(
        {
            "cell": {"data_dir": str(tmp_path / "data")},
            "upstreams": {"docker.io": {"url": hub.url}},
        }
    )
    store = Store.open(config.data_dir)
    pool = Pool()
    seen: list[tuple[int, int]] = []  # (written, pieces_done) at every wake-up
    try:
        async with httpx.AsyncClient() as client, trio.open_nursery() as nursery:
            sources = Sources(config, store, Metrics(), nursery, client, pool=pool)
            fetch = sources.blob("library/pieces", blob.digest, "docker.io")
            assert isinstance(fetch, Fetch)
            while not fetch.finished:
                changed = fetch.changed
                seen.append((fetch.written, fetch.pieces_done))
                table = fetch.piece_table()
                if table is not None:
                    # What a peer would be served now: the pieces done, no more.
                    assert table.known.bit_count() == fetch.pieces_done
                    assert all(h == want.hashes[i] for i, h in enumerate(table.hashes) if h)
                await changed.wait()
        assert fetch.error is None and fetch.entry is not None
        assert fetch.pieces_done == want.count
        assert fetch.piece_table() == want
        assert store.piece_table(blob.digest) == want
        # Every piece counted done was on disk: within what was written then.
        for written, done in seen:
            assert min(done * want.piece_size, SIZE) <= written
        assert any(0 < done < want.count for _, done in seen), seen
    finally:
        await pool.aclose()
        store.close()
    # A store opened later does not know it (the table is not kept across restarts):
    # the peer API hashes the file then, checking the digest in the same pass.
    reopened = Store.open(config.data_dir)
    try:
        assert reopened.piece_table(blob.digest) is None
        assert reopened.piece_table("sha256:" + "0" * 64) is None
    finally:
        reopened.close()


async def test_corrupt_byte_aborts_every_waiter_and_stores_nothing(hub, fault_proxy, tmp_path):
    blob = Blob("application/octet-stream", os.urandom(SIZE))
    pusher = Pusher(hub.url)
    pusher.blob("library/bad", blob)
    pusher.close()
    # A byte in the middle: most of the body has gone to the waiters by the
    # time the digest check at the end fails.
    proxy = fault_proxy(hub.host, corrupt=True, corrupt_at=SIZE // 2)
    cell = Celld(tmp_path / "c", upstreams={"docker.io": proxy.url}).start()
    outcomes: list[object] = []

    async def pull(client: httpx.AsyncClient) -> None:
        received = 0
        try:
            async with client.stream("GET", f"/v2/library/bad/blobs/{blob.digest}") as r:
                assert r.status_code == 200
                async for chunk in r.aiter_raw():
                    received += len(chunk)
        except httpx.TransportError as exc:
            outcomes.append((type(exc), received))
            return
        outcomes.append(("complete", received))

    try:
        async with (
            httpx.AsyncClient(base_url=cell.url, timeout=60) as client,
            trio.open_nursery() as nursery,
        ):
            for _ in range(4):
                nursery.start_soon(pull, client)
        assert proxy.corrupted
        assert len(outcomes) == 4
        for outcome, received in outcomes:  # type: ignore[misc]
            assert outcome is httpx.RemoteProtocolError, outcomes
            assert received < SIZE
        assert blob.digest.removeprefix("sha256:") not in blob_files(cell)
        assert not list((cell.data_dir / "tmp").iterdir())
        assert cell.metric("celld_digest_mismatches_total", source="upstream") == 1
    finally:
        cell.stop()
