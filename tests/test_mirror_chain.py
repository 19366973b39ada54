"""The fetch chain under load and failure, against real registries.

Counts what reached the Hub in the Hub's own access log, breaks the Hub with
a proxy that flips bytes or cuts bodies, stops registries, and SIGKILLs the
daemon mid-download.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time

import httpx
import pytest
import trio

from celld.sources import central_repo
from tests.support.celld import Celld
from tests.support.images import make_image, push_image
from tests.support.registry import Registry

ACCEPT = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json"


def blob_files(cell: Celld) -> set[str]:
    root = cell.data_dir / "blobs"
    return {p.name for p in root.rglob("*") if p.is_file()} if root.exists() else set()


async def test_fifty_waiters_one_upstream_get(cell, hub):
    image = make_image((32 * 2**20,))
    push_image(hub.url, "library/big", "v1", image)
    layer = image.layers[0]
    want = hashlib.sha256(layer.data).hexdigest()
    results: list[str] = []

    async def pull(client: httpx.AsyncClient) -> None:
        h = hashlib.sha256()
        async with client.stream("GET", f"/v2/library/big/blobs/{layer.digest}?ns=docker.io") as r:
            assert r.status_code == 200
            async for chunk in r.aiter_bytes():
                h.update(chunk)
        results.append(h.hexdigest())

    limits = httpx.Limits(max_connections=60)
    async with (
        httpx.AsyncClient(base_url=cell.url, limits=limits, timeout=60) as client,
        trio.open_nursery() as nursery,
    ):
        for _ in range(50):
            nursery.start_soon(pull, client)
    assert results == [want] * 50
    gets = hub.requests("GET", layer.digest)
    assert len(gets) == 1, gets
    assert cell.metric("celld_singleflight_joins_total") >= 1


def test_bytes_stream_before_the_layer_is_complete(cell, hub, fault_proxy, tmp_path):
    """A store-then-serve cache would send nothing of a body that never completes."""
    image = make_image((8 * 2**20,))
    push_image(hub.url, "library/stream", "v1", image)
    layer = image.layers[0]
    proxy = fault_proxy(hub.host, truncate_after=3 * 2**20)
    streamed = Celld(tmp_path / "s", upstreams={"docker.io": proxy.url}).start()
    try:
        got = bytearray()
        with (
            pytest.raises(httpx.RemoteProtocolError),
            httpx.stream("GET", f"{streamed.url}/v2/library/stream/blobs/{layer.digest}") as r,
        ):
            assert int(r.headers["content-length"]) == len(layer.data)
            for chunk in r.iter_bytes():
                got += chunk
        assert len(got) >= 2**20, len(got)
        assert bytes(got) == layer.data[: len(got)]
        assert layer.digest.split(":")[1] not in blob_files(streamed)
        # the upstream heals: the next request fetches again and completes
        proxy.truncate_after = None
        r = httpx.get(f"{streamed.url}/v2/library/stream/blobs/{layer.digest}", timeout=30)
        assert r.content == layer.data
    finally:
        streamed.stop()


def test_corrupt_upstream_nothing_stored_next_try_succeeds(hub, fault_proxy, tmp_path):
    image = make_image((4 * 2**20,))
    push_image(hub.url, "library/bad", "v1", image)
    layer = image.layers[0]
    proxy = fault_proxy(hub.host, corrupt=True, corrupt_at=-1)
    cell = Celld(tmp_path / "c", upstreams={"docker.io": proxy.url}).start()
    try:
        url = f"{cell.url}/v2/library/bad/blobs/{layer.digest}"
        with pytest.raises(httpx.RemoteProtocolError):
            httpx.get(url, timeout=30)
        assert proxy.corrupted
        assert layer.digest.split(":")[1] not in blob_files(cell)
        assert not list((cell.data_dir / "tmp").iterdir())
        assert cell.metric("celld_digest_mismatches_total", source="upstream") == 1
        # still corrupt: fails again, still nothing stored
        with pytest.raises(httpx.RemoteProtocolError):
            httpx.get(url, timeout=30)
        proxy.corrupt = False
        r = httpx.get(url, timeout=30)
        assert r.status_code == 200 and r.content == layer.data
        assert cell.blob_stored(layer.digest)
    finally:
        cell.stop()


def test_hub_down_cached_images_still_pull(cell, hub):
    image = make_image((5000, 7000))
    push_image(hub.url, "library/app", "2.1", image)
    for ref in ("2.1", image.digest):
        httpx.get(f"{cell.url}/v2/library/app/manifests/{ref}", headers={"Accept": ACCEPT})
    for blob in image.blobs:
        httpx.get(f"{cell.url}/v2/library/app/blobs/{blob.digest}").raise_for_status()
    hub.stop()
    r = httpx.get(
        f"{cell.url}/v2/library/app/manifests/2.1?ns=docker.io", headers={"Accept": ACCEPT}
    )
    assert r.status_code == 200
    assert r.headers["docker-content-digest"] == image.digest
    assert cell.metric("celld_stale_tags_served_total") == 1
    r = httpx.get(f"{cell.url}/v2/library/app/manifests/{image.digest}", headers={"Accept": ACCEPT})
    assert r.content == image.manifest.data
    for blob in image.blobs:
        assert httpx.get(f"{cell.url}/v2/library/app/blobs/{blob.digest}").content == blob.data
    # a tag never seen gets a clear 503 rather than a hang
    r = httpx.get(f"{cell.url}/v2/library/app/manifests/other", headers={"Accept": ACCEPT})
    assert r.status_code == 503
    assert r.json()["errors"][0]["code"] == "UNAVAILABLE"


def test_central_registry_failover(tmp_path, hub):
    first = Registry(tmp_path / "central-1").start()
    second = Registry(tmp_path / "central-2").start()
    image = make_image((9000, 12000))
    push_image(second.url, central_repo("docker.io", "acme/shop"), "2.1", image)
    first.stop()  # dead: connection refused
    hub.stop()
    cell = Celld(
        tmp_path / "cell",
        registries=[first.url, second.url],
        upstreams={"docker.io": hub.url},
    ).start()
    try:
        started = time.monotonic()
        r = httpx.get(
            f"{cell.url}/v2/acme/shop/manifests/{image.digest}?ns=docker.io",
            headers={"Accept": ACCEPT},
        )
        assert r.status_code == 200 and r.content == image.manifest.data
        for blob in image.blobs:
            assert httpx.get(f"{cell.url}/v2/acme/shop/blobs/{blob.digest}").content == blob.data
        assert time.monotonic() - started < 10
        assert len(second.requests("GET", r"/blobs/")) == len(image.blobs)
        assert cell.metric("celld_fetches_total", source="registry", outcome="ok") == 1 + len(
            image.blobs
        )
        assert cell.metric("celld_fetches_total", source="registry", outcome="unavailable") == 1
    finally:
        cell.stop()
        second.stop()


def test_kill_during_large_download_restart_is_clean(tmp_path, hub, fault_proxy):
    image = make_image((96 * 2**20,))
    push_image(hub.url, "library/huge", "v1", image)
    layer = image.layers[0]
    cell = Celld(tmp_path / "k", upstreams={"docker.io": hub.url}).start()
    url = f"{cell.url}/v2/library/huge/blobs/{layer.digest}"
    reader = subprocess.Popen(
        [sys.executable, "-c", f"import httpx; httpx.get({url!r}, timeout=60)"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    tmp = cell.data_dir / "tmp"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        files = list(tmp.iterdir()) if tmp.exists() else []
        if files and any(f.stat().st_size > 0 for f in files):
            break
        time.sleep(0.002)
    cell.kill()
    reader.wait(30)
    cell.start()
    try:
        assert not list(tmp.iterdir()), "temp files survived the restart"
        for name in blob_files(cell):
            path = next((cell.data_dir / "blobs").rglob(name))
            assert hashlib.sha256(path.read_bytes()).hexdigest() == name
        r = httpx.get(url, timeout=60)
        assert r.status_code == 200
        assert hashlib.sha256(r.content).hexdigest() == layer.digest.split(":")[1]
    finally:
        cell.stop()


@pytest.mark.parametrize(
    "text,key",
    [
        ('[store]\nmax_bytes = "lots"\n', "store.max_bytes"),
        ('[mirror]\nlisten = "nowhere"\n', "mirror.listen"),
        ('[[registry]]\nurl = "ftp://x"\n', "registry[0].url"),
        ('[upstreams."docker.io"]\nurl = 5\n', 'upstreams."docker.io".url'),
        ("[cell]\nnmae = 'typo'\n", "cell.nmae"),
        ("this is not toml", "TOML"),
        ('[cluster]\nlisten = "127.0.0.1:7946"\n', "cluster.key_file"),
        ('[cluster]\nkey_file = "/nonexistent/k"\nlisten = "127.0.0.1:7946"\n', "cluster.key_file"),
        ("[peer]\nupload_slots = 0\n", "peer.upload_slots"),
    ],
)
def test_bad_config_one_line_exit_2(tmp_path, text, key):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    proc = subprocess.run(
        [sys.executable, "-m", "celld", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "XDG_DATA_HOME": str(tmp_path)},
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert key in lines[0]


def test_upstream_token_flow_anonymous_for_public_images(tmp_path, token_hub):
    public, private = make_image((3000,)), make_image((4000,))
    token_hub.push("public/app", "1", public)
    token_hub.push("acme/secret", "1", private)
    cell = Celld(tmp_path / "cell", upstreams={"docker.io": token_hub.url}).start()
    try:
        r = httpx.get(f"{cell.url}/v2/public/app/manifests/1", headers={"Accept": ACCEPT})
        assert r.status_code == 200 and r.content == public.manifest.data
        blob = public.layers[0]
        assert httpx.get(f"{cell.url}/v2/public/app/blobs/{blob.digest}").content == blob.data
        assert token_hub.tokens.count(user=None) >= 1
        r = httpx.get(f"{cell.url}/v2/acme/secret/manifests/1", headers={"Accept": ACCEPT})
        assert r.status_code == 401
        assert r.json()["errors"][0]["code"] == "UNAUTHORIZED"
        secret_layer = private.layers[0]
        r = httpx.get(f"{cell.url}/v2/acme/secret/blobs/{secret_layer.digest}")
        assert r.status_code == 401
        assert secret_layer.digest.split(":")[1] not in blob_files(cell)
    finally:
        cell.stop()


def test_central_registry_with_basic_auth(tmp_path, htpasswd_hub, hub):
    image = make_image((6000,))
    htpasswd_hub.push(central_repo("docker.io", "acme/basic"), "1", image)
    ((user, password),) = htpasswd_hub.users.items()
    pw_file = tmp_path / "central.password"
    pw_file.write_text(password + "\n")
    hub.stop()
    cell = Celld(
        tmp_path / "cell",
        upstreams={"docker.io": hub.url},
        extra=f'[[registry]]\nurl = "{htpasswd_hub.url}"\nusername = "{user}"\n'
        f'password_file = "{pw_file}"\n',
    ).start()
    try:
        r = httpx.get(
            f"{cell.url}/v2/acme/basic/manifests/{image.digest}", headers={"Accept": ACCEPT}
        )
        assert r.status_code == 200, r.text
        for blob in image.blobs:
            assert httpx.get(f"{cell.url}/v2/acme/basic/blobs/{blob.digest}").content == blob.data
        assert password not in cell.log()
    finally:
        cell.stop()


def test_dead_central_registry_is_benched_then_retried(tmp_path, hub):
    first = Registry(tmp_path / "central-1").start()
    image = make_image((1000, 2000))
    push_image(first.url, central_repo("docker.io", "acme/retry"), "1", image)
    push_image(hub.url, "acme/retry", "1", image)
    first.stop()
    cell = Celld(
        tmp_path / "cell",
        registries=[first.url],
        upstreams={"docker.io": hub.url},
        extra="[sources]\nretry_after = 1.5\n",
    ).start()
    try:
        config, layer_a, layer_b = image.blobs
        assert httpx.get(f"{cell.url}/v2/acme/retry/blobs/{config.digest}").content == config.data
        assert cell.metric("celld_fetches_total", source="registry", outcome="unavailable") == 1
        first.start()  # back, but benched: the next miss goes straight upstream
        assert httpx.get(f"{cell.url}/v2/acme/retry/blobs/{layer_a.digest}").content == layer_a.data
        assert not first.requests("GET", layer_a.digest)
        time.sleep(1.6)  # the bench expires: the central registry is asked again
        assert httpx.get(f"{cell.url}/v2/acme/retry/blobs/{layer_b.digest}").content == layer_b.data
        assert first.requests("GET", layer_b.digest)
        assert not hub.requests("GET", layer_b.digest)
    finally:
        cell.stop()
        first.stop()
