"""Real runtimes pull through celld: containerd, skopeo and podman.

containerd is pointed at celld with hosts.toml (the image's own registry is a
dead port, so a pull can only succeed through the mirror); skopeo and podman
with a registries.conf mirror. Every digest is checked end to end in the
runtime's own store.
"""

from __future__ import annotations

import pytest

from tests.support.celld import Celld
from tests.support.containerd import Containerd
from tests.support.images import Image, Index, make_image, make_index, push_image
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
