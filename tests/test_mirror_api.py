"""The mirror's OCI pull API, checked with plain HTTP against a real Hub.

Each test starts a docker-registry as the Hub and a `celld serve` process,
pushes an image the test built, and asserts what a runtime would see.
"""

from __future__ import annotations

import hashlib

import httpx
import pytest

from tests.support.images import (
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    make_image,
    make_index,
    push_image,
)

ACCEPT_ALL = ", ".join(
    [
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        OCI_MANIFEST,
        OCI_INDEX,
        "*/*",
    ]
)


@pytest.fixture
def image(hub):
    img = make_image((3000, 200_000))
    push_image(hub.url, "library/demo", "v1", img)
    return img


def test_api_base(cell):
    r = httpx.get(f"{cell.url}/v2/")
    assert r.status_code == 200
    assert r.headers["docker-distribution-api-version"] == "registry/2.0"
    assert r.json() == {}


def test_manifest_by_tag_and_digest(cell, image):
    for ref in ("v1", image.digest):
        r = httpx.get(
            f"{cell.url}/v2/library/demo/manifests/{ref}?ns=docker.io",
            headers={"Accept": ACCEPT_ALL},
        )
        assert r.status_code == 200, r.text
        assert r.content == image.manifest.data
        assert r.headers["content-type"] == OCI_MANIFEST
        assert r.headers["docker-content-digest"] == image.digest
        assert int(r.headers["content-length"]) == len(image.manifest.data)
    head = httpx.head(f"{cell.url}/v2/library/demo/manifests/v1", headers={"Accept": ACCEPT_ALL})
    assert head.status_code == 200
    assert head.headers["docker-content-digest"] == image.digest
    assert int(head.headers["content-length"]) == len(image.manifest.data)
    assert head.content == b""


def test_request_without_ns_goes_to_docker_io(cell, image):
    r = httpx.get(f"{cell.url}/v2/library/demo/manifests/v1", headers={"Accept": ACCEPT_ALL})
    assert r.status_code == 200
    assert r.headers["docker-content-digest"] == image.digest


def test_blobs_stream_and_verify(cell, image, hub):
    for blob in image.blobs:
        r = httpx.get(f"{cell.url}/v2/library/demo/blobs/{blob.digest}?ns=docker.io")
        assert r.status_code == 200
        assert r.content == blob.data
        assert r.headers["docker-content-digest"] == blob.digest
    # Second round: all from the store, no more upstream GETs.
    before = len(hub.requests("GET", r"/blobs/"))
    for blob in image.blobs:
        r = httpx.get(f"{cell.url}/v2/library/demo/blobs/{blob.digest}")
        assert r.content == blob.data
        h = httpx.head(f"{cell.url}/v2/library/demo/blobs/{blob.digest}")
        assert h.status_code == 200 and int(h.headers["content-length"]) == len(blob.data)
    assert len(hub.requests("GET", r"/blobs/")) == before
    assert cell.metric("celld_mirror_served_total", kind="blob", source="store") >= len(image.blobs)


@pytest.mark.parametrize("cached", [True, False], ids=["hit", "miss"])
def test_range_rules(cell, image, cached):
    blob = image.layers[1]
    data, size = blob.data, len(blob.data)
    url = f"{cell.url}/v2/library/demo/blobs/{blob.digest}"
    if cached:
        httpx.get(url).raise_for_status()
    cases = {
        "bytes=0-99": (0, 99),
        "bytes=100-": (100, size - 1),
        "bytes=-500": (size - 500, size - 1),
        f"bytes=10-{size + 1000}": (10, size - 1),
        f"bytes=-{size + 5}": (0, size - 1),
    }
    for header, (start, end) in cases.items():
        r = httpx.get(url, headers={"Range": header})
        assert r.status_code == 206, header
        assert r.headers["content-range"] == f"bytes {start}-{end}/{size}", header
        assert r.content == data[start : end + 1], header
    r = httpx.get(url, headers={"Range": f"bytes={size}-"})
    assert r.status_code == 416
    assert r.headers["content-range"] == f"bytes */{size}"
    # A malformed Range is ignored, as the RFC allows: the whole blob.
    r = httpx.get(url, headers={"Range": "pages=1-2"})
    assert r.status_code == 200 and r.content == data


def test_manifest_list_with_two_platforms(cell, hub):
    index = make_index(("amd64", "arm64"))
    push_image(hub.url, "acme/multi", "latest", index)
    r = httpx.get(f"{cell.url}/v2/acme/multi/manifests/latest", headers={"Accept": ACCEPT_ALL})
    assert r.headers["content-type"] == OCI_INDEX
    assert r.headers["docker-content-digest"] == index.digest
    for img in index.images.values():
        m = httpx.get(
            f"{cell.url}/v2/acme/multi/manifests/{img.digest}", headers={"Accept": ACCEPT_ALL}
        )
        assert m.content == img.manifest.data
        for blob in img.blobs:
            b = httpx.get(f"{cell.url}/v2/acme/multi/blobs/{blob.digest}")
            assert hashlib.sha256(b.content).hexdigest() == blob.digest.split(":")[1]


def test_accept_negotiation(cell, hub):
    index = make_index(("amd64",))
    push_image(hub.url, "acme/idx", "1", index)
    only_docker = {"Accept": DOCKER_MANIFEST}
    r = httpx.get(f"{cell.url}/v2/acme/idx/manifests/1", headers=only_docker)
    assert r.status_code == 404
    assert r.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    r = httpx.get(
        f"{cell.url}/v2/acme/idx/manifests/1",
        headers=[("Accept", DOCKER_MANIFEST), ("Accept", OCI_INDEX)],
    )
    assert r.status_code == 200


def test_unknown_manifest_and_blob(cell, image):
    r = httpx.get(f"{cell.url}/v2/library/demo/manifests/nope", headers={"Accept": ACCEPT_ALL})
    assert r.status_code == 404
    assert r.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    missing = "sha256:" + "ab" * 32
    r = httpx.get(f"{cell.url}/v2/library/demo/blobs/{missing}")
    assert r.status_code == 404
    assert r.json()["errors"][0]["code"] == "BLOB_UNKNOWN"


def test_several_upstreams_by_ns(tmp_path, hub):
    from tests.support.celld import Celld
    from tests.support.registry import Registry

    other = Registry(tmp_path / "ghcr").start()
    try:
        a, b = make_image((1000,)), make_image((2000,))
        push_image(hub.url, "library/app", "1", a)
        push_image(other.url, "org/app", "1", b)
        cell = Celld(
            tmp_path / "cell", upstreams={"docker.io": hub.url, "ghcr.io": other.url}
        ).start()
        try:
            ra = httpx.get(
                f"{cell.url}/v2/library/app/manifests/1?ns=docker.io",
                headers={"Accept": ACCEPT_ALL},
            )
            rb = httpx.get(
                f"{cell.url}/v2/org/app/manifests/1?ns=ghcr.io", headers={"Accept": ACCEPT_ALL}
            )
            assert ra.headers["docker-content-digest"] == a.digest
            assert rb.headers["docker-content-digest"] == b.digest
            blob = b.layers[0]
            got = httpx.get(f"{cell.url}/v2/org/app/blobs/{blob.digest}?ns=ghcr.io")
            assert got.content == blob.data
            assert other.requests("GET", blob.digest)
            assert not hub.requests("GET", blob.digest)
            r = httpx.get(
                f"{cell.url}/v2/org/app/manifests/1?ns=quay.io", headers={"Accept": ACCEPT_ALL}
            )
            assert r.status_code == 404
            assert r.json()["errors"][0]["code"] == "NAME_UNKNOWN"
        finally:
            cell.stop()
    finally:
        other.stop()
