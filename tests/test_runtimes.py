"""Real runtimes pull through celld: containerd, skopeo, podman and docker.

containerd is pointed at celld with hosts.toml (the image's own registry is a
dead port, so a pull can only succeed through the mirror); skopeo and podman
with a registries.conf mirror; docker with its daemon's registry-mirrors (its
fallback, Docker Hub itself, ends at the dead proxy port). Every digest is
checked end to end in the runtime's own store.
"""

from __future__ import annotations

import gzip
import secrets
from pathlib import Path

import pytest

from tests.support.celld import Celld
from tests.support.containerd import Containerd
from tests.support.docker import Docker
from tests.support.images import Image, Index, make_image, make_index, push_image, sha256
from tests.support.podman import Podman
from tests.support.registry import Registry
from tests.support.skopeo import skopeo_copy, stored_blobs, top_digest, write_registries_conf


def all_digests(image: Image | Index) -> set[str]:
    if isinstance(image, Index):
        return {image.digest}.union(*(all_digests(img) for img in image.images.values()))
    return {image.digest} | {blob.digest for blob in image.blobs}


def test_containerd_pulls_images_of_several_upstreams(
    containerd: Containerd, hub: Registry, tmp_path
) -> None:
    ghcr = Registry(tmp_path / "ghcr").start()
    cell = Celld(tmp_path / "cell", upstreams={"docker.io": hub.url, "ghcr.io": ghcr.url}).start()
    try:
        a, b = make_image((4096, 300_000)), make_image((8192,))
        push_image(hub.url, "library/web", "1.0", a)
        push_image(ghcr.url, "acme/api", "2.0", b)
        containerd.write_hosts("docker.io", cell.url)
        containerd.write_hosts("ghcr.io", cell.url)

        ra = containerd.pull("docker.io/library/web:1.0").check()
        rb = containerd.pull("ghcr.io/acme/api:2.0").check()
        assert ra.image_digest() == a.digest
        assert rb.image_digest() == b.digest
        assert containerd.content_digests() == all_digests(a) | all_digests(b)
        for blob in [*a.blobs, *b.blobs]:
            assert containerd.content_bytes(blob.digest) == blob.data
        assert len(hub.requests("GET", r"/blobs/")) == len(a.blobs)
        assert len(ghcr.requests("GET", r"/blobs/")) == len(b.blobs)
        assert cell.metric("celld_mirror_served_total", kind="blob") >= len(a.blobs) + len(b.blobs)
    finally:
        cell.stop()
        ghcr.stop()


def test_containerd_unpacks_one_platform_of_an_index(
    containerd: Containerd, cell: Celld, hub: Registry
) -> None:
    index = make_index(("amd64", "arm64"))
    push_image(hub.url, "acme/multi", "3", index)
    containerd.write_hosts("docker.io", cell.url)
    arm = containerd.view(containerd.namespace + "-arm")
    arm.pull("docker.io/acme/multi:3", platform="linux/arm64", unpack=True).check()
    assert arm.image_digest("docker.io/acme/multi:3") == index.digest
    assert arm.content_digests() == {index.digest} | all_digests(index.images["arm64"])
    containerd.pull("docker.io/acme/multi:3", all_platforms=True).check()
    assert containerd.content_digests() == all_digests(index)


def test_second_cell_runtime_pulls_from_store_when_hub_is_down(
    containerd: Containerd, cell: Celld, hub: Registry
) -> None:
    image = make_image((50_000, 70_000))
    push_image(hub.url, "library/shop", "2.1", image)
    containerd.write_hosts("docker.io", cell.url)
    containerd.pull("docker.io/library/shop:2.1").check()
    hub.stop()
    for ref in ("docker.io/library/shop:2.1", f"docker.io/library/shop@{image.digest}"):
        fresh = containerd.view(containerd.namespace + f"-{len(ref)}")
        result = fresh.pull(ref).check()
        assert result.content_digests() == all_digests(image)
    assert cell.metric("celld_stale_tags_served_total") >= 1


def test_skopeo_copies_through_the_mirror(cell: Celld, hub: Registry, tmp_path) -> None:
    image = make_image((10_000, 20_000))
    push_image(hub.url, "library/tool", "5", image)
    conf = write_registries_conf(tmp_path / "registries.conf", {"docker.io": cell.host})
    out = tmp_path / "oci"
    proc = skopeo_copy("docker.io/library/tool:5", out, registries_conf=conf)
    assert proc.returncode == 0, proc.stderr
    assert top_digest(out) == image.digest
    assert set(stored_blobs(out)) >= {blob.digest for blob in image.blobs}
    assert cell.metric("celld_mirror_served_total", kind="blob") >= len(image.blobs)


def test_podman_pulls_through_the_mirror(podman: Podman, cell: Celld, hub: Registry) -> None:
    image = make_image((10_000,))
    push_image(hub.url, "library/pod", "1", image)
    write_registries_conf(podman.registries_conf, {"docker.io": cell.host})
    proc = podman.pull("docker.io/library/pod:1")
    assert proc.returncode == 0, proc.stderr
    assert podman.inspect("docker.io/library/pod:1")["Digest"] == image.digest
    assert cell.metric("celld_mirror_served_total", kind="blob") >= len(image.blobs)


@pytest.mark.parametrize("corrupt_at", [0, -1], ids=["first-byte", "last-byte"])
def test_containerd_fails_on_corrupt_upstream_then_recovers(
    containerd: Containerd, hub: Registry, fault_proxy, tmp_path, corrupt_at: int
) -> None:
    image = make_image((300_000,))
    push_image(hub.url, "library/flaky", "1", image)
    proxy = fault_proxy(hub.host, corrupt=True, corrupt_at=corrupt_at)
    cell = Celld(tmp_path / "c", upstreams={"docker.io": proxy.url}).start()
    try:
        containerd.write_hosts("docker.io", cell.url)
        bad = containerd.pull("docker.io/library/flaky:1", timeout=60)
        assert not bad.ok
        assert cell.metric("celld_digest_mismatches_total") >= 1
        proxy.corrupt = False
        # containerd keeps a partial download and resumes it; a fresh
        # namespace starts clean, as a retry on another cell would.
        containerd.drop_partial_downloads()
        good = containerd.view(containerd.namespace + "-retry").pull("docker.io/library/flaky:1")
        good.check()
        assert good.content_digests() == all_digests(image)
    finally:
        cell.stop()


# docker ---------------------------------------------------------------------


def assert_docker_has(docker: Docker, ref: str, image: Image, pulled: str | None = None) -> dict:
    """docker's own record of the pull: the manifest (or list, `pulled`) digest
    it verified, the config as the image id, the diff_ids it checked unpacking."""
    info = docker.inspect(ref)
    assert info is not None, f"docker has no image {ref}"
    assert [d.rpartition("@")[2] for d in info["RepoDigests"]] == [pulled or image.digest]
    assert info["Id"] == image.config.digest
    assert info["RootFS"]["Layers"] == [sha256(gzip.decompress(b.data)) for b in image.layers]
    return info


@pytest.mark.parametrize("docker_media", [True, False], ids=["docker-v2", "oci"])
def test_docker_pulls_through_the_mirror(
    dockerd, cell: Celld, hub: Registry, docker_media: bool
) -> None:
    image = make_image((4096, 30_000, 70_000), docker=docker_media)
    push_image(hub.url, "library/web", "1.0", image)
    docker = dockerd(cell.url)

    proc = docker.pull("library/web:1.0")
    assert proc.returncode == 0, proc.stderr

    assert_docker_has(docker, "library/web:1.0", image)
    assert cell.metric("celld_mirror_served_total", kind="blob") == len(image.blobs)
    assert {uri for _, uri, _ in hub.requests("GET", "/blobs/")} == {
        f"/v2/library/web/blobs/{blob.digest}" for blob in image.blobs
    }
    assert len(hub.requests("GET", "/blobs/")) == len(image.blobs)


def test_docker_takes_one_platform_of_a_manifest_list(dockerd, cell: Celld, hub: Registry) -> None:
    index = make_index(("amd64", "arm64"), docker=True)
    push_image(hub.url, "library/multi", "2", index)
    docker = dockerd(cell.url)
    proc = docker.run("pull", "--platform", "linux/arm64", "library/multi:2")
    assert proc.returncode == 0, proc.stderr
    arm = index.images["arm64"]
    info = assert_docker_has(docker, "library/multi:2", arm, pulled=index.digest)
    assert info["Architecture"] == "arm64"
    assert {uri for _, uri, _ in hub.requests("GET", "/blobs/")} == {
        f"/v2/library/multi/blobs/{blob.digest}" for blob in arm.blobs
    }


def cell_with_central(root: Path, hub: Registry, central: Registry, key: Path) -> Celld:
    return Celld(
        root, upstreams={"docker.io": hub.url}, registries=[central.url], key_file=key
    ).start()


@pytest.fixture
def cluster_key(tmp_path: Path) -> Path:
    path = tmp_path / "cluster.key"
    path.write_text(secrets.token_hex(32) + "\n")
    return path


def test_docker_pulls_a_staged_digest_on_a_fresh_cell_with_the_hub_down(
    dockerd, hub: Registry, central: Registry, cluster_key: Path, tmp_path: Path
) -> None:
    image = make_image((20_000, 50_000), docker=True)
    push_image(hub.url, "acme/shop", "2.1", image)
    staging = cell_with_central(tmp_path / "a", hub, central, cluster_key)
    try:
        assert staging.stage("docker.io/acme/shop:2.1", "shop")[-1]["event"] == "done"
    finally:
        staging.stop()
    hub.stop()

    fresh = cell_with_central(tmp_path / "b", hub, central, cluster_key)
    try:
        docker = dockerd(fresh.url)
        ref = f"acme/shop@{image.digest}"
        proc = docker.pull(ref)
        assert proc.returncode == 0, proc.stderr
        assert_docker_has(docker, ref, image)
        assert fresh.metric("celld_fetches_total", source="registry", outcome="ok") == 1 + len(
            image.blobs
        )
        assert fresh.metric("celld_fetches_total", source="upstream", outcome="ok") == 0
    finally:
        fresh.stop()


def test_docker_pulls_a_private_image_only_with_its_token_as_its_hub_credential(
    dockerd, token_hub, central: Registry, cluster_key: Path, fault_proxy, tmp_path: Path
) -> None:
    """docker sends credentials only to a registry whose `GET /v2/` answered 401, and
    to a mirror only those it files for Docker Hub. celld's `/v2/` answers a Bearer
    challenge (its own /v2/token) on a cell that can hold private images, which
    docker follows anonymously for public pulls and with its docker.io credential
    when it has one: with the pull token filed there, the private pinned image pulls
    through the mirror. Without it, or with another app's token, nothing private is
    served."""
    image = make_image((20_000, 30_000), docker=True)
    token_hub.push("acme/secret", "1", image)
    other = make_image((5_000,), docker=True)
    token_hub.push("acme/other", "1", other)
    ((user, password),) = token_hub.users.items()
    cell = cell_with_central(tmp_path / "cell", token_hub, central, cluster_key)
    try:
        staged = cell.stage("docker.io/acme/secret:1", "billing", username=user, password=password)
        token = staged[-1]["token"]
        assert staged[-1]["private"] and token
        wrong = cell.stage("docker.io/acme/other:1", "shop", username=user, password=password)
        seen = fault_proxy(cell.host)  # to read what docker sends celld
        docker = dockerd(seen.url)

        tokenless = docker.pull(f"acme/secret@{image.digest}")
        assert tokenless.returncode != 0
        docker.login("shop", wrong[-1]["token"])
        assert docker.pull(f"acme/secret@{image.digest}").returncode != 0
        assert docker.images() == []
        assert cell.metric("celld_mirror_unauthorized_total") >= 2
        served_before = cell.metric("celld_mirror_served_total", kind="blob")

        docker.login("billing", token)  # docker.io's credentials: what docker offers a mirror
        pulled = docker.pull(f"acme/secret@{image.digest}")
        assert pulled.returncode == 0, pulled.stderr
        info = docker.inspect(f"acme/secret@{image.digest}")
        assert info is not None and info["Id"] == image.config.digest
        assert cell.metric("celld_mirror_served_total", kind="blob") - served_before == len(
            image.blobs
        )
        assert seen.headers_seen("authorization")  # the token went to celld, and only there
    finally:
        cell.stop()
