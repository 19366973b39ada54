"""Staging against real registries: pin, push to central, pull without the Hub.

Hubs are docker-registry processes (anonymous, token auth, htpasswd), the
central registries are docker-registry processes, the runtime is containerd.
"""

from __future__ import annotations

import base64
import secrets
from pathlib import Path

import httpx
import pytest

from celld.sources import central_repo, private_repo
from tests.support.celld import Celld
from tests.support.containerd import Containerd
from tests.support.images import make_image, make_index, push_image
from tests.support.registry import Registry

ACCEPT = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json"


@pytest.fixture
def cluster_key(tmp_path: Path) -> Path:
    path = tmp_path / "cluster.key"
    path.write_text(secrets.token_hex(32) + "\n")
    return path


@pytest.fixture
def centrals(tmp_path: Path):
    regs = [Registry(tmp_path / f"central-{i}").start() for i in (1, 2)]
    yield regs
    for reg in regs:
        reg.stop()


def new_cell(root: Path, hub_url: str, centrals, key: Path, **kw) -> Celld:
    return Celld(
        root,
        upstreams={"docker.io": hub_url},
        registries=[c.url for c in centrals],
        key_file=key,
        **kw,
    ).start()


def done(events: list[dict]) -> dict:
    last = events[-1]
    assert last["event"] == "done", last
    return last


def all_digests(image) -> set[str]:
    return {image.digest} | {b.digest for b in image.blobs}


def test_stage_pins_pushes_and_a_fresh_cell_pulls_without_the_hub(
    tmp_path, hub, centrals, cluster_key, containerd: Containerd
):
    image = make_image((40_000, 90_000))
    push_image(hub.url, "acme/shop", "2.1", image)
    cell = new_cell(tmp_path / "a", hub.url, centrals, cluster_key)
    try:
        events = cell.stage("docker.io/acme/shop:2.1", "shop-prod")
        result = done(events)
        assert result["digest"] == image.digest
        assert result["reference"] == f"{cell.host}/acme/shop@{image.digest}"
        assert result["token"] is None and result["private"] is False
        assert events[0]["event"] == "resolved"
        with cell.admin() as admin:
            pins = admin.get("/v1/pins").json()["pins"]
        assert [(p["app"], p["digest"]) for p in pins] == [("shop-prod", image.digest)]
        for central in centrals:
            repo = central_repo("docker.io", "acme/shop")
            r = httpx.get(
                f"{central.url}/v2/{repo}/manifests/{image.digest}", headers={"Accept": ACCEPT}
            )
            assert r.status_code == 200 and r.content == image.manifest.data
            for blob in image.blobs:
                assert (
                    httpx.get(f"{central.url}/v2/{repo}/blobs/{blob.digest}").content == blob.data
                )
    finally:
        cell.stop()

    hub.stop()
    fresh = new_cell(tmp_path / "b", hub.url, centrals, cluster_key)
    try:
        containerd.write_hosts("docker.io", fresh.url)
        pulled = containerd.pull(f"docker.io/acme/shop@{image.digest}").check()
        assert pulled.content_digests() == all_digests(image)
        assert fresh.metric("celld_fetches_total", source="registry", outcome="ok") == 1 + len(
            image.blobs
        )
        assert fresh.metric("celld_fetches_total", source="upstream", outcome="ok") == 0
    finally:
        fresh.stop()

    centrals[0].stop()
    third = new_cell(tmp_path / "c", hub.url, centrals, cluster_key)
    try:
        other = containerd.view(containerd.namespace + "-third")
        other.write_hosts("docker.io", third.url)
        assert other.pull(f"docker.io/acme/shop@{image.digest}").check().content_digests() == (
            all_digests(image)
        )
    finally:
        third.stop()


def test_moved_tag_moves_the_pin(tmp_path, hub, centrals, cluster_key):
    first, second = make_image((1000,)), make_image((2000,))
    push_image(hub.url, "acme/app", "stable", first)
    cell = new_cell(tmp_path / "a", hub.url, centrals, cluster_key)
    try:
        assert done(cell.stage("acme/app:stable", "app"))["digest"] == first.digest
        push_image(hub.url, "acme/app", "stable", second)
        moved = done(cell.stage("acme/app:stable", "app"))
        assert moved["digest"] == second.digest
        assert moved["moved_from"] == first.digest
        with cell.admin() as admin:
            assert [p["digest"] for p in admin.get("/v1/pins").json()["pins"]] == [second.digest]
            assert admin.delete("/v1/pins/app").json()["digest"] == second.digest
            assert admin.get("/v1/pins").json()["pins"] == []
            assert admin.delete("/v1/pins/app").status_code == 404
    finally:
        cell.stop()


def test_index_stages_the_cells_platform(tmp_path, hub, centrals, cluster_key):
    index = make_index(("amd64", "arm64"))
    push_image(hub.url, "acme/multi", "1", index)
    cell = new_cell(tmp_path / "a", hub.url, centrals, cluster_key, platform="linux/arm64")
    try:
        assert done(cell.stage("acme/multi:1", "multi"))["digest"] == index.images["arm64"].digest
    finally:
        cell.stop()


def test_wrong_credentials_pin_nothing_push_nothing(tmp_path, token_hub, centrals, cluster_key):
    image = make_image((3000,))
    token_hub.push("acme/secret", "1", image)
    cell = new_cell(tmp_path / "a", token_hub.url, centrals, cluster_key)
    try:
        events = cell.stage("acme/secret:1", "secret", username="alice", password="wrong")
        assert events[-1]["event"] == "error" and events[-1]["status"] == 401
        assert "wrong" not in events[-1]["message"]
        with cell.admin() as admin:
            assert admin.get("/v1/pins").json()["pins"] == []
        for central in centrals:
            assert not central.requests("PUT", r"/manifests/")
        assert not list((cell.data_dir / "blobs").rglob("*" + image.layers[0].digest[7:]))
    finally:
        cell.stop()


def test_pins_beyond_max_bytes_fail_with_the_shortfall(tmp_path, hub, centrals, cluster_key):
    small, big = make_image((100_000,)), make_image((900_000,))
    push_image(hub.url, "acme/small", "1", small)
    push_image(hub.url, "acme/big", "1", big)
    cell = new_cell(tmp_path / "a", hub.url, centrals, cluster_key, max_bytes="1MB")
    try:
        done(cell.stage("acme/small:1", "small"))
        error = cell.stage("acme/big:1", "big")[-1]
        assert error["event"] == "error" and error["status"] == 507
        assert "short by" in error["message"]
        # nothing already stored is lost
        for blob in small.blobs:
            assert httpx.get(f"{cell.url}/v2/acme/small/blobs/{blob.digest}").content == blob.data
        with cell.admin() as admin:
            assert [p["app"] for p in admin.get("/v1/pins").json()["pins"]] == ["small"]
    finally:
        cell.stop()


def test_lru_eviction_spares_pins_and_gc_frees_unpinned(tmp_path, hub, centrals, cluster_key):
    pinned = make_image((300_000,))
    push_image(hub.url, "acme/pinned", "1", pinned)
    others = [make_image((300_000,)) for _ in range(3)]
    for i, img in enumerate(others):
        push_image(hub.url, f"acme/other{i}", "1", img)
    cell = new_cell(tmp_path / "a", hub.url, centrals, cluster_key, max_bytes="1MB")
    try:
        done(cell.stage("acme/pinned:1", "pinned"))
        for i, img in enumerate(others):
            layer = img.layers[0]
            got = httpx.get(f"{cell.url}/v2/acme/other{i}/blobs/{layer.digest}")
            assert got.content == layer.data
            assert cell.blob_stored(layer.digest)
        stored = {p.name for p in (cell.data_dir / "blobs").rglob("*") if p.is_file()}
        assert pinned.layers[0].digest[7:] in stored
        assert others[0].layers[0].digest[7:] not in stored  # the least recently used went
        assert others[2].layers[0].digest[7:] in stored
        assert cell.metric("celld_store_evictions_total") >= 1
        with cell.admin() as admin:
            stats = admin.get("/v1/stats").json()
            assert stats["store"]["bytes"] <= 1_000_000
            freed = admin.post("/v1/gc", json={"keep_seconds": 0}).json()
        assert freed["freed_bytes"] > 0
        stored = {p.name for p in (cell.data_dir / "blobs").rglob("*") if p.is_file()}
        assert all(b.digest[7:] in stored for b in pinned.blobs)
        assert others[2].layers[0].digest[7:] not in stored
    finally:
        cell.stop()


def test_private_image_needs_its_token(
    tmp_path, token_hub, centrals, cluster_key, containerd: Containerd
):
    image = make_image((20_000, 30_000))
    token_hub.push("acme/secret", "1", image)
    public = make_image((5000,))
    token_hub.push("public/base", "1", public)
    ((user, password),) = token_hub.users.items()
    cell = new_cell(tmp_path / "a", token_hub.url, centrals, cluster_key)
    try:
        result = done(cell.stage("acme/secret:1", "secret-app", username=user, password=password))
        token = result["token"]
        assert result["private"] and token
        repo = private_repo("secret-app", "docker.io", "acme/secret")
        for central in centrals:
            assert (
                httpx.get(
                    f"{central.url}/v2/{repo}/manifests/{image.digest}", headers={"Accept": ACCEPT}
                ).status_code
                == 200
            )
            public_repo = central_repo("docker.io", "acme/secret")
            assert (
                httpx.get(
                    f"{central.url}/v2/{public_repo}/manifests/{image.digest}",
                    headers={"Accept": ACCEPT},
                ).status_code
                == 404
            )
        done(cell.stage("public/base:1", "base"))  # a second app, public

        containerd.write_hosts("docker.io", cell.url)
        ref = f"docker.io/acme/secret@{image.digest}"
        assert not containerd.pull(ref, timeout=60).ok
        tag = httpx.get(f"{cell.url}/v2/acme/secret/manifests/1", headers={"Accept": ACCEPT})
        assert tag.status_code == 401
        blob = httpx.get(f"{cell.url}/v2/acme/secret/blobs/{image.layers[0].digest}")
        assert blob.status_code == 401 and "www-authenticate" in blob.headers
        other_app = done(cell.stage("public/base:1", "base"))
        assert other_app["token"] is None
        with_token = containerd.view(containerd.namespace + "-tok")
        with_token.write_hosts("docker.io", cell.url)
        with_token.pull(ref, user=f"runtime:{token}").check()
        assert with_token.content_digests() == all_digests(image)
    finally:
        cell.stop()

    token_hub.stop()
    fresh = new_cell(tmp_path / "b", token_hub.url, centrals, cluster_key)
    try:
        r = httpx.get(
            f"{fresh.url}/v2/acme/secret/manifests/{image.digest}",
            headers={"Accept": ACCEPT, "Authorization": f"Bearer {token}"},
        )
        assert r.status_code == 200 and r.content == image.manifest.data
        for blob in image.blobs:
            got = httpx.get(f"{fresh.url}/v2/acme/secret/blobs/{blob.digest}", auth=("x", token))
            assert got.content == blob.data
            assert httpx.get(f"{fresh.url}/v2/acme/secret/blobs/{blob.digest}").status_code == 401
    finally:
        fresh.stop()


def _haystacks(paths: list[Path]) -> list[tuple[Path, bytes]]:
    out = []
    for root in paths:
        for path in [root] if root.is_file() else root.rglob("*"):
            if path.is_file() and not path.is_socket():
                out.append((path, path.read_bytes()))
    return out


def test_credentials_leave_no_trace(tmp_path, token_hub, centrals, cluster_key):
    canary = "canary-" + secrets.token_hex(12)
    token_hub.users["mallory"] = canary
    token_hub.tokens.users["mallory"] = canary
    image = make_image((4000,))
    token_hub.push("acme/canary", "1", image)
    cell = new_cell(tmp_path / "a", token_hub.url, centrals, cluster_key)
    try:
        done(cell.stage("acme/canary:1", "canary-app", username="mallory", password=canary))
        cell.stage("acme/canary:1", "canary-bad", username="mallory", password=canary + "x")
        pid = cell.proc.pid
        proc_bytes = [
            (Path(f"/proc/{pid}/cmdline"), Path(f"/proc/{pid}/cmdline").read_bytes()),
            (Path(f"/proc/{pid}/environ"), Path(f"/proc/{pid}/environ").read_bytes()),
        ]
        needles = [canary.encode()]
        for user in ("mallory",):
            for secret in (canary, canary + "x"):
                raw = f"{user}:{secret}".encode()
                needles += [base64.b64encode(raw), base64.urlsafe_b64encode(raw)]
        hay = _haystacks([cell.root, *(c.root for c in centrals)]) + proc_bytes
        assert hay
        for path, data in hay:
            for needle in needles:
                assert needle not in data, f"credential found in {path}"
    finally:
        cell.stop()


def test_basic_auth_hub_and_a_central_registry_with_its_own_account(
    tmp_path, htpasswd_hub, cluster_key
):
    from tests.support.auth import htpasswd_registry

    central = htpasswd_registry(tmp_path / "central", {"celld": "svc-" + secrets.token_hex(8)})
    try:
        image = make_image((7000,))
        htpasswd_hub.push("acme/basic", "1", image)
        ((user, password),) = htpasswd_hub.users.items()
        pw_file = tmp_path / "central.password"
        pw_file.write_text(central.users["celld"] + "\n")
        cell = Celld(
            tmp_path / "a",
            upstreams={"docker.io": htpasswd_hub.url},
            key_file=cluster_key,
            extra=f'[[registry]]\nurl = "{central.url}"\nusername = "celld"\n'
            f'password_file = "{pw_file}"\n',
        ).start()
        try:
            bad = cell.stage("acme/basic:1", "basic", username=user, password="nope")[-1]
            assert bad["event"] == "error" and bad["status"] == 401
            result = done(cell.stage("acme/basic:1", "basic", username=user, password=password))
            assert result["private"] and result["token"]
            repo = private_repo("basic", "docker.io", "acme/basic")
            r = httpx.get(
                f"{central.url}/v2/{repo}/manifests/{image.digest}",
                headers={"Accept": ACCEPT},
                auth=("celld", central.users["celld"]),
            )
            assert r.status_code == 200 and r.content == image.manifest.data
        finally:
            cell.stop()
    finally:
        central.stop()


def test_a_public_layer_staged_privately_stays_public(tmp_path, token_hub, centrals, cluster_key):
    base = make_image((6000,))
    token_hub.push("public/base", "1", base)
    secret = make_image((3000,), base=base)
    token_hub.push("acme/secret", "1", secret)
    ((user, password),) = token_hub.users.items()
    cell = new_cell(tmp_path / "a", token_hub.url, centrals, cluster_key)
    try:
        done(cell.stage("acme/secret:1", "secret", username=user, password=password))
        shared, own = secret.layers
        assert shared.digest == base.layers[0].digest
        r = httpx.get(f"{cell.url}/v2/public/base/blobs/{shared.digest}")
        assert r.status_code == 200 and r.content == shared.data
        assert httpx.get(f"{cell.url}/v2/acme/secret/blobs/{own.digest}").status_code == 401
    finally:
        cell.stop()
