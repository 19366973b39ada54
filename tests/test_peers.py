"""Cells share layers: real `celld serve` processes take blobs from each other.

The Hub and the central registry are real docker-registry processes; their access
logs are the proof of what reached them. The runtime is skopeo, pulling through a
cell's mirror as a runtime on that cell would.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from celld.peering import TABLE_WAIT
from protocol import peerauth
from tests.support.celld import Celld, Cluster, cluster_address
from tests.support.images import Blob, Image, make_image, push_image
from tests.support.procs import wait_until
from tests.support.proxy import FaultProxy
from tests.support.registry import Registry
from tests.support.skopeo import skopeo_copy, stored_blobs, write_registries_conf
from tests.test_cluster import KEY, key_file  # noqa: F401

MiB = 1 << 20


@pytest.fixture
def cells(
    tmp_path: Path,
    key_file: Path,  # noqa: F811 (the fixture, from test_cluster)
    hub: Registry,
    central: Registry,
) -> Iterator[Callable[..., list[Celld]]]:
    started: list[Celld] = []

    def start(
        n: int,
        upload_rate: str | None = None,
        upstream: str | None = None,
        stall_timeout: float | None = None,
        **kw,
    ) -> list[Celld]:
        addrs = [cluster_address(i) for i in range(n)]
        out = []
        for i, addr in enumerate(addrs):
            cell = Celld(
                tmp_path / f"cell-{i}",
                name=f"cell-{i}",
                key_file=key_file,
                # every cell names a few others, as operators configure seeds
                cluster=Cluster(
                    addr,
                    tuple(x for x in addrs[:3] if x != addr),
                    upload_rate=upload_rate,
                    stall_timeout=stall_timeout,
                ),
                upstreams={"docker.io": upstream or hub.url},
                registries=[central.url],
                **kw,
            ).start()
            started.append(cell)
            out.append(cell)
        names = {c.name for c in out}
        for cell in out:
            wait_until(
                lambda cell=cell: (
                    {n for n, m in cell.peers().items() if m["state"] == "alive"} == names
                ),
                # gossip tells most within a second; a lost update is repaired by the
                # next push-pull (30 s), which a loaded CI machine sometimes needs
                35,
                f"{cell.name} sees every cell",
            )
        return out

    yield start
    for cell in started:
        cell.stop()


def pull(cell: Celld, ref: str, dest: Path) -> dict[str, Path]:
    """skopeo copy through the cell's mirror; every blob checked against its digest."""
    conf = write_registries_conf(dest.with_suffix(".conf"), {"docker.io": cell.host})
    out = skopeo_copy(f"docker.io/{ref}", dest, registries_conf=conf, timeout=180)
    assert out.returncode == 0, out.stderr + "\n" + cell.log()[-3000:]
    return stored_blobs(dest)


def blob_gets(reg: Registry) -> list[tuple[str, str, int]]:
    return [r for r in reg.requests("GET", r"/blobs/sha256:") if r[2] == 200]


def one_layer(hub: Registry, repo: str, size: int) -> tuple[Image, Blob, str]:
    """An image of one layer of `size` random bytes in the Hub: (image, layer, ref)."""
    image = make_image((size,))
    push_image(hub.url, repo, "1", image)
    return image, image.layers[0], f"{repo}@{image.digest}"


def blobs_of(image: Image) -> set[str]:
    return {b.digest for b in image.blobs}


def test_b_pulls_from_a_and_no_registry_sends_a_blob(cells, hub, central, tmp_path):
    image = make_image((3 * MiB, 200_000))
    push_image(hub.url, "library/app", "1", image)
    a, b = cells(2)
    pull(a, f"library/app@{image.digest}", tmp_path / "via-a")
    hub_before, central_before = len(blob_gets(hub)), len(blob_gets(central))
    hub_manifests = len(hub.requests("GET", r"/manifests/"))

    got = pull(b, f"library/app@{image.digest}", tmp_path / "via-b")
    assert blobs_of(image) | {image.digest} <= set(got)
    assert len(blob_gets(hub)) == hub_before
    assert len(blob_gets(central)) == central_before
    assert len(hub.requests("GET", r"/manifests/")) == hub_manifests  # pinned: by digest
    size = sum(len(blob.data) for blob in image.blobs) + len(image.manifest.data)
    assert b.metric("celld_fetched_bytes_total", source="peer") == size
    assert b.metric("celld_fetched_bytes_total", source="upstream") == 0
    assert b.metric("celld_fetched_bytes_total", source="registry") == 0
    assert a.metric("celld_peer_sent_bytes_total") >= size
    stats = json.loads(
        subprocess.run(
            [sys.executable, "-m", "celld", "stats", "--json", "--config", str(b.config_path)],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout
    )  # fmt: skip
    assert stats["peers"]["received_bytes"] >= sum(len(x.data) for x in image.layers)
    assert stats["gossip"]["members"]["alive"] == 2
    assert stats["mirror"]["bytes_served"]["peer"] >= sum(len(x.data) for x in image.layers)
    text = subprocess.run(
        [sys.executable, "-m", "celld", "stats", "--config", str(b.config_path)],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    assert "received" in text and "2 alive" in text
    # and B now holds them: a second runtime on B is served from B's store
    pull(b, f"library/app@{image.digest}", tmp_path / "via-b-again")
    assert b.metric("celld_mirror_served_total", kind="blob", source="store") >= 2


def test_a_cell_serves_what_it_took_from_peers_without_hashing_it_again(cells, hub, tmp_path):
    """B took the image from A piece by piece: it keeps the table every piece was checked
    against, so serving C costs it no second pass over the file (a storm's cells each
    re-hashed every layer they had finished, on the first ask after)."""
    image = make_image((3 * MiB, 200_000))
    push_image(hub.url, "library/relay", "1", image)
    a, b, c = cells(3)
    ref = f"library/relay@{image.digest}"
    pull(a, ref, tmp_path / "via-a")
    pull(b, ref, tmp_path / "via-b")
    a.stop()  # SIGTERM: A leaves, and C can only take the image from B
    wait_until(lambda: c.peers()["cell-0"]["state"] == "left", 15, "C hears A leave")
    hub_before = len(blob_gets(hub))

    got = pull(c, ref, tmp_path / "via-c")
    assert blobs_of(image) <= set(got)
    assert len(blob_gets(hub)) == hub_before
    assert c.metric("celld_fetched_bytes_total", source="peer") >= len(image.layers[0].data)
    assert b.metric("celld_peer_sent_bytes_total") >= len(image.layers[0].data)
    assert b.metric("celld_peer_tables_hashed_total") == 0


def test_eviction_withdraws_and_peers_stop_asking(cells, hub, tmp_path):
    image = make_image((2 * MiB,))
    push_image(hub.url, "library/gone", "1", image)
    a, b = cells(2)
    pull(a, f"library/gone@{image.digest}", tmp_path / "via-a")
    removed: set[str] = set()
    everything = blobs_of(image) | {image.digest}

    def gc() -> bool:  # a blob still being sent to skopeo is kept by gc: ask again
        with a.admin() as client:
            r = client.post("/v1/gc", json={"keep_seconds": 0})
            assert r.status_code == 200, r.text
        removed.update(e["digest"] for e in r.json()["removed"])
        return everything <= removed

    wait_until(gc, 10, "gc removes the image")
    hub_before = len(blob_gets(hub))
    pull(b, f"library/gone@{image.digest}", tmp_path / "via-b")
    # A withdrew: B went to the registries, and never asked A for what A removed
    assert len(blob_gets(hub)) > hub_before
    assert b.metric("celld_fetched_bytes_total", source="peer") == 0


def test_peer_api_refuses_unsigned_forged_and_replayed_requests(cells):
    (a,) = cells(1)
    target = f"/v2/blobs/sha256:{'0' * 64}"
    url = f"http://{a.cluster.listen}{target}"
    r = httpx.get(url, timeout=10)
    assert r.status_code == 401
    now = time.time()
    forged = peerauth.sign(os.urandom(32), "cell-x", b"GET", target.encode(), now, os.urandom(16))
    assert httpx.get(url, headers=_h(forged), timeout=10).status_code == 401
    signed = peerauth.sign(KEY, "cell-x", b"GET", target.encode(), now, os.urandom(16))
    assert httpx.get(url, headers=_h(signed), timeout=10).status_code == 404  # a real cell's
    assert httpx.get(url, headers=_h(signed), timeout=10).status_code == 401  # the same again
    old = peerauth.sign(KEY, "cell-x", b"GET", target.encode(), now - 300, os.urandom(16))
    assert httpx.get(url, headers=_h(old), timeout=10).status_code == 401
    for reason in ("missing", "bad_mac", "replayed", "stale"):
        assert a.metric("celld_peer_auth_failures_total", reason=reason) == 1, reason


def _h(headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in headers}


def test_kill_9_of_a_provider_mid_transfer_moves_to_the_other(cells, hub, central, tmp_path):
    image = make_image((24 * MiB,))
    push_image(hub.url, "library/big", "1", image)
    a, b, c = cells(3, upload_rate="6MiB")  # slow uploads: B is mid-transfer when A dies
    ref = f"library/big@{image.digest}"
    pull(a, ref, tmp_path / "via-a")
    pull(c, ref, tmp_path / "via-c")  # from A, at the capped rate
    hub_before, central_before = len(blob_gets(hub)), len(blob_gets(central))
    layer = image.layers[0]

    with ThreadPoolExecutor(1) as pool:
        pulling = pool.submit(pull, b, ref, tmp_path / "via-b")
        wait_until(
            lambda: b.metric("celld_peer_received_bytes_total") >= 4 * MiB, 30, "B is pulling"
        )
        a.kill()
        got = pulling.result()
    assert hashlib.sha256(got[layer.digest].read_bytes()).hexdigest() == layer.digest[7:]
    assert len(blob_gets(hub)) == hub_before and len(blob_gets(central)) == central_before
    # what A had in flight is all it cost: two pieces at most (swarm's max_inflight)
    wasted = b.metric("celld_peer_received_bytes_total") - len(layer.data)
    assert wasted <= 2 * 4 * MiB + len(image.config.data)
    wait_until(lambda: b.peers()["cell-0"]["state"] == "dead", 15, "B declares A dead")


def test_the_runtime_gets_its_first_byte_from_the_first_piece_not_the_last(
    cells, hub, central, tmp_path
):
    """From one complete provider every piece is as rare as the next; rarest first alone
    would take piece 0 at a random point of the transfer and hold the runtime's stream
    until then. The runtime's next piece goes first, so its first byte comes with the
    first piece B receives (B asks A for one piece at a time: max_inflight_per_peer)."""
    image = make_image((48 * MiB,))
    push_image(hub.url, "library/stream", "1", image)
    a, b = cells(2, upload_rate="12MiB")  # 12 pieces of 4 MiB, about 4 s from A
    pull(a, f"library/stream@{image.digest}", tmp_path / "via-a")
    layer = image.layers[0]
    url = f"{b.url}/v2/library/stream/blobs/{layer.digest}?ns=docker.io"
    digest = hashlib.sha256()
    with httpx.stream("GET", url, timeout=60) as r:
        assert r.status_code == 200
        chunks = r.iter_raw()
        first = next(chunks)
        received_at_first_byte = b.metric("celld_peer_received_bytes_total")
        digest.update(first)
        for chunk in chunks:
            digest.update(chunk)
    assert digest.hexdigest() == layer.digest[7:]
    # the first piece, and at most the next one begun: not the 12 pieces' random share
    assert received_at_first_byte < 2 * 4 * MiB, received_at_first_byte
    assert b.metric("celld_fetched_bytes_total", source="upstream") == 0


def test_the_lease_moves_when_the_only_provider_dies(cells, hub, central, tmp_path):
    image = make_image((24 * MiB,))
    push_image(hub.url, "library/solo", "1", image)
    a, b = cells(2, upload_rate="6MiB")
    ref = f"library/solo@{image.digest}"
    pull(a, ref, tmp_path / "via-a")
    layer = image.layers[0]
    with ThreadPoolExecutor(1) as pool:
        pulling = pool.submit(pull, b, ref, tmp_path / "via-b")
        wait_until(
            lambda: b.metric("celld_peer_received_bytes_total") >= 8 * MiB, 30, "B is pulling"
        )
        a.kill()
        got = pulling.result()
    assert hashlib.sha256(got[layer.digest].read_bytes()).hexdigest() == layer.digest[7:]
    from_registries = b.metric("celld_fetched_bytes_total", source="upstream") + b.metric(
        "celld_fetched_bytes_total", source="registry"
    )
    # only what B did not have yet came from the registries, by range
    assert 0 < from_registries <= len(layer.data) - 8 * MiB + 2 * 4 * MiB


def test_a_new_lease_holder_serves_the_pieces_it_read_by_range(cells, hub, central, tmp_path):
    """The lease holder dies mid-read: the cell the lease moves to reads by range the
    pieces nobody had, and their hashes go into the piece table it serves, so the third
    cell verifies them and takes them from it (before a41c858 it could not: it banned
    the new holder and read the blob from the Hub itself)."""
    image, layer, ref = one_layer(hub, "library/relay", 24 * MiB)
    with FaultProxy(hub.host, hold_after=10 * MiB, affects=re.escape(layer.digest)) as proxy:
        a, b, c = cells(3, upstream=proxy.url)
        with ThreadPoolExecutor(3) as pool:
            conf = write_registries_conf(tmp_path / "via-a.conf", {"docker.io": a.host})
            pool.submit(skopeo_copy, f"docker.io/{ref}", tmp_path / "via-a", registries_conf=conf)
            wait_until(lambda: proxy.held, 30, "A holds the lease and is 10 MiB into the layer")
            pulls = [pool.submit(pull, cell, ref, tmp_path / f"via-{cell.name}") for cell in (b, c)]
            for cell in (b, c):  # both have A's partial table and a piece from it
                wait_until(
                    lambda cell=cell: cell.metric("celld_peer_received_bytes_total") >= 4 * MiB,
                    30,
                    f"{cell.name} takes pieces from A",
                )
            a.kill()
            got = [p.result() for p in pulls]
    for blobs in got:
        assert hashlib.sha256(blobs[layer.digest].read_bytes()).hexdigest() == layer.digest[7:]
    upstream = {
        cell.name: cell.metric("celld_fetched_bytes_total", source="upstream") for cell in (b, c)
    }
    holders = [name for name, n in upstream.items() if n > len(image.config.data)]
    assert len(holders) == 1, upstream  # one cell read the rest by range, the other took it
    assert sum(cell.metric("celld_peer_bad_pieces_total") for cell in (b, c)) == 0
    assert min(upstream.values()) <= len(image.config.data), upstream


def test_a_slow_lease_holder_is_waited_for_while_its_read_moves(cells, hub, central, tmp_path):
    """The lease holder's first piece takes longer than TABLE_WAIT (a registry on a
    slow, shared link): the other cell keeps waiting while the holder's read moves,
    and takes the blob from it; the registries send it once."""
    _, layer, ref = one_layer(hub, "library/slow", 6 * MiB)
    rate = 512 * 1024  # the first 4 MiB piece: 8 s, past TABLE_WAIT
    assert 4 * MiB / rate > TABLE_WAIT + 2
    with FaultProxy(hub.host, rate=rate, affects=re.escape(layer.digest)) as proxy:
        a, b = cells(2, upstream=proxy.url)
        with ThreadPoolExecutor(2) as pool:
            via_a = pool.submit(pull, a, ref, tmp_path / "via-a")
            wait_until(lambda: proxy.blob_gets, 30, "A reads the layer under the lease")
            via_b = pool.submit(pull, b, ref, tmp_path / "via-b")
            got = [via_a.result(), via_b.result()]
    for blobs in got:
        assert hashlib.sha256(blobs[layer.digest].read_bytes()).hexdigest() == layer.digest[7:]
    # every blob once from the registries: the layer by A under its lease; the config
    # (both skopeos ask for it once the layer is in, at about the same moment) by
    # whichever cell was granted its lease
    sent = Counter(d for t in proxy.blob_gets for d in re.findall(r"sha256:[0-9a-f]{64}", t))
    assert sent[layer.digest] == 1 and set(sent.values()) == {1}, proxy.blob_gets
    for why in ("no_lease", "no_table", "unfinished", "stalled"):  # B waited, never gave up
        assert b.metric("celld_registry_reads_total", why=why) == 0, why
    assert b.metric("celld_fetched_bytes_total", source="peer") >= len(layer.data)


def test_a_lease_holder_killed_before_its_first_piece_hands_the_lease_on(
    cells, hub, central, tmp_path
):
    """The lease holder dies while the other cell waits for its first piece (its Hub
    read held half a piece in): the other cell cannot reach it, waits until membership
    declares it dead, looks up again and reads the layer under the lease it is then
    granted. (Before, it read the layer at once without the lease: in a kill storm the
    lease then went to a third cell too, and the Hub sent the layer twice more.)"""
    _, layer, ref = one_layer(hub, "library/handover", 12 * MiB)
    with FaultProxy(hub.host, hold_after=MiB // 2, affects=re.escape(layer.digest)) as proxy:
        a, b = cells(2, upstream=proxy.url)
        conf = write_registries_conf(tmp_path / "via-a.conf", {"docker.io": a.host})
        with ThreadPoolExecutor(2) as pool:
            pool.submit(skopeo_copy, f"docker.io/{ref}", tmp_path / "via-a", registries_conf=conf)
            wait_until(
                lambda: proxy.held, 30, "A holds the lease and is half a piece into the layer"
            )
            via_b = pool.submit(pull, b, ref, tmp_path / "via-b")
            wait_until(
                lambda: a.metric("celld_peer_requests_total", endpoint="table") >= 1,
                30,
                "B waits for A's piece table",
            )
            a.kill()
            blobs = via_b.result()
    assert hashlib.sha256(blobs[layer.digest].read_bytes()).hexdigest() == layer.digest[7:]
    # every read B made was under a lease (the layer's, and the config's A never served)
    assert b.metric("celld_registry_reads_total", why="no_table") == 0
    assert b.metric("celld_registry_reads_total") == b.metric(
        "celld_registry_reads_total", why="lease"
    )
    assert "unreachable, looking up again" in b.log()
    assert len([t for t in proxy.blob_gets if layer.digest in t]) == 2  # A's held read, B's


def test_a_transfer_that_stalls_reads_the_rest_from_the_registries(cells, hub, central, tmp_path):
    """The lease holder is alive but its registry read stops 10 MiB into the layer
    (its connection open, no byte more): the other cell has the first pieces from
    it and nothing else comes for stall_timeout. It reads the missing pieces from
    the registries by range, and its runtime gets the whole layer (before, the
    stream broke off and the pull failed with an unexpected EOF)."""
    image, layer, ref = one_layer(hub, "library/stall", 24 * MiB)
    with FaultProxy(hub.host, hold_after=10 * MiB, affects=re.escape(layer.digest)) as proxy:
        a, b = cells(2, upstream=proxy.url, stall_timeout=4)
        conf = write_registries_conf(tmp_path / "via-a.conf", {"docker.io": a.host})
        with ThreadPoolExecutor(1) as pool:
            pool.submit(skopeo_copy, f"docker.io/{ref}", tmp_path / "via-a", registries_conf=conf)
            wait_until(lambda: proxy.held, 30, "A holds the lease and is 10 MiB into the layer")
            blobs = pull(b, ref, tmp_path / "via-b")
            a.kill()  # its read would hold for the registry client's 30 s
    assert hashlib.sha256(blobs[layer.digest].read_bytes()).hexdigest() == layer.digest[7:]
    assert b.metric("celld_peer_received_bytes_total") >= 4 * MiB  # A's first pieces
    assert b.metric("celld_registry_reads_total", why="stalled") == 1
    assert "missing pieces from the registries" in b.log()
    # the rest, and no more than the rest, came from the Hub
    fetched = b.metric("celld_fetched_bytes_total", source="upstream")
    assert 0 < fetched - len(image.config.data) <= len(layer.data) - 4 * MiB


def test_a_restarted_cell_rejoins_and_announces_its_store(cells, hub, tmp_path):
    image = make_image((2 * MiB,))
    push_image(hub.url, "library/back", "1", image)
    a, b = cells(2)
    pull(a, f"library/back@{image.digest}", tmp_path / "via-a")
    wait_until(lambda: b.peers()["cell-0"]["blobs_announced"] >= 3, 10, "B hears A's blobs")
    a.kill()
    wait_until(lambda: b.peers()["cell-0"]["state"] == "dead", 15, "B declares A dead")
    assert b.peers()["cell-0"]["blobs_announced"] == 0
    a.start()
    wait_until(lambda: b.peers()["cell-0"]["state"] == "alive", 15, "A is back")
    wait_until(lambda: b.peers()["cell-0"]["blobs_announced"] >= 3, 10, "A re-announces")
    hub_before = len(blob_gets(hub))
    got = pull(b, f"library/back@{image.digest}", tmp_path / "via-b")
    assert blobs_of(image) <= set(got)
    assert len(blob_gets(hub)) == hub_before
    # what A fetched before its restart has no table in memory: hashed on B's first ask
    assert a.metric("celld_peer_tables_hashed_total") >= 1


def test_eight_cold_pulls_cost_the_registries_about_one_copy(cells, hub, central, tmp_path):
    image = make_image((24 * MiB, 8 * MiB))
    push_image(hub.url, "library/storm", "1", image)
    fleet = cells(8)
    with ThreadPoolExecutor(len(fleet)) as pool:
        results = list(
            pool.map(
                lambda c: pull(c, f"library/storm@{image.digest}", tmp_path / f"dest-{c.name}"),
                fleet,
            )
        )
    for got in results:
        assert blobs_of(image) <= set(got)
    for blob in image.blobs:
        sent = [r for r in blob_gets(hub) + blob_gets(central) if blob.digest in r[1]]
        assert len(sent) <= 2, (blob.digest, sent)  # the lease: about once
        print(f"{blob.digest[:19]}: {len(sent)} GET(s) from the Hub and the central registry")
    # Each GET is one cell's whole read, and the cells say why they made it.
    reads = {
        why: sum(c.metric("celld_registry_reads_total", why=why) for c in fleet)
        for why in ("lease", "no_lease", "unfinished", "no_table")
    }
    gets = [
        r for r in blob_gets(hub) + blob_gets(central) if r[1].split("/")[-1] in blobs_of(image)
    ]
    assert sum(reads.values()) == len(gets), reads
    assert reads["lease"] >= len(image.blobs), reads
    from_peers = sum(c.metric("celld_fetched_bytes_total", source="peer") for c in fleet)
    assert from_peers >= 5 * sum(len(b.data) for b in image.blobs)
    # Cells with nothing to take yet asked what the others hold, in datagrams, answered
    queries, answers = (
        sum(c.metric("celld_gossip_datagrams_received_total", kind=k) for c in fleet)
        for k in ("HaveQuery", "HaveReply")
    )
    print(f"have queries {queries:.0f}, answers {answers:.0f}")
    assert queries > 0 and answers > 0
    for cell in fleet:
        for blob in image.blobs:
            assert cell.blob_stored(blob.digest)


def test_a_corrupt_provider_is_banned_and_the_pull_completes(cells, hub, tmp_path):
    image = make_image((10 * MiB,))
    push_image(hub.url, "library/rot", "1", image)
    a, b, c = cells(3)
    ref = f"library/rot@{image.digest}"
    pull(a, ref, tmp_path / "via-a")
    pull(c, ref, tmp_path / "via-c")  # from A, which hashed its piece table for C
    layer = image.layers[0]
    path = a.data_dir / "blobs" / "sha256" / layer.digest[7:9] / layer.digest[7:]
    data = bytearray(path.read_bytes())
    for at in range(MiB, len(data), 2 * MiB):
        data[at] ^= 0xFF  # the disk rots under A after A verified and announced it
    path.write_bytes(bytes(data))
    hub_before = len(blob_gets(hub))

    got = pull(b, ref, tmp_path / "via-b")
    assert hashlib.sha256(got[layer.digest].read_bytes()).hexdigest() == layer.digest[7:]
    assert len(blob_gets(hub)) == hub_before  # C had it all
    assert b.metric("celld_peer_bad_pieces_total") >= 1
    assert "failed its hash" in b.log()
    assert "Traceback" not in b.log() + a.log()


def test_a_cell_that_finds_its_own_copy_damaged_drops_it(cells, hub, tmp_path):
    image = make_image((3 * MiB,))
    push_image(hub.url, "library/rot2", "1", image)
    a, b = cells(2)
    ref = f"library/rot2@{image.digest}"
    pull(a, ref, tmp_path / "via-a")
    layer = image.layers[0]
    path = a.data_dir / "blobs" / "sha256" / layer.digest[7:9] / layer.digest[7:]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    a.stop()  # the rot is found after a restart: no table kept from the fetch
    a.start()
    wait_until(lambda: b.peers()["cell-0"]["state"] == "alive", 15, "A is back")
    wait_until(lambda: b.peers()["cell-0"]["blobs_announced"] >= 3, 10, "A re-announces")

    got = pull(b, ref, tmp_path / "via-b")  # A refuses to serve it; the Hub does
    assert hashlib.sha256(got[layer.digest].read_bytes()).hexdigest() == layer.digest[7:]
    assert "no longer matches its digest" in a.log()
    wait_until(lambda: not path.exists(), 10, "A drops its damaged copy")
    assert "Traceback" not in b.log() + a.log()


def test_a_private_blob_from_a_peer_stays_private_to_its_app(
    tmp_path,
    token_hub,
    central,
    key_file,  # noqa: F811
    containerd,
):
    secret = make_image((3 * MiB, 20_000))
    token_hub.push("acme/secret", "1", secret)
    ((user, password),) = token_hub.users.items()
    addrs = [cluster_address(i) for i in range(2)]
    a, b = (
        Celld(
            tmp_path / name,
            name=name,
            key_file=key_file,
            cluster=Cluster(addrs[i], (addrs[1 - i],)),
            upstreams={"docker.io": token_hub.url},
            registries=[central.url],
        ).start()
        for i, name in enumerate(("cell-a", "cell-b"))
    )
    try:
        staged = a.stage("acme/secret:1", "secret-app", username=user, password=password)
        token = staged[-1]["token"]
        assert staged[-1]["private"] and token
        wait_until(lambda: b.peers()["cell-a"]["blobs_announced"] >= 1, 10, "B hears of A's")
        token_hub.stop()  # and the central holds it under the app's path only
        ref = f"docker.io/acme/secret@{secret.digest}"
        containerd.write_hosts("docker.io", b.url)

        anonymous = containerd.view(containerd.namespace + "-anon").pull(ref, timeout=60)
        assert not anonymous.ok and "401" in anonymous.output, anonymous.output
        mine = containerd.view(containerd.namespace + "-mine")
        mine.pull(ref, user=f"app:{token}").check()
        for blob in secret.blobs:
            assert mine.content_bytes(blob.digest) == blob.data
        assert b.metric("celld_fetched_bytes_total", source="peer") >= len(secret.layers[0].data)
        # in B's store now, and still only for the app's token
        again = containerd.view(containerd.namespace + "-again").pull(ref, timeout=60)
        assert not again.ok and "401" in again.output, again.output
        assert containerd.view(containerd.namespace + "-again").content_digests() == set()
    finally:
        a.stop()
        b.stop()


def test_eviction_to_make_room_withdraws(cells, hub, tmp_path):
    first, second = make_image((3 * MiB,)), make_image((3 * MiB,))
    push_image(hub.url, "library/first", "1", first)
    push_image(hub.url, "library/second", "1", second)
    a, b = cells(2, max_bytes="5MiB")
    pull(a, f"library/first@{first.digest}", tmp_path / "first-a")
    pull(a, f"library/second@{second.digest}", tmp_path / "second-a")  # evicts the first
    wait_until(lambda: a.metric("celld_store_evictions_total") >= 1, 10, "A evicts")
    layer = first.layers[0]
    assert not a.blob_stored(layer.digest, timeout=0)
    hub_before = len([r for r in blob_gets(hub) if layer.digest in r[1]])
    got = pull(b, f"library/first@{first.digest}", tmp_path / "first-b")
    assert layer.digest in got
    # B was not sent to A for what A evicted: the Hub served it again
    assert len([r for r in blob_gets(hub) if layer.digest in r[1]]) == hub_before + 1
    # A was never asked for what it evicted (its config and manifest it still serves)
    assert a.metric("celld_peer_requests_total", endpoint="table", outcome="error_404") == 0
    assert "Traceback" not in b.log()
