"""The runtime harness works before celld exists: real clients, a real mirror.

A docker-registry is itself a valid mirror for containerd's hosts.toml and for
registries.conf, so each runtime pulls here through a docker-registry playing
the mirror, with the image's own registry unreachable. What these tests pin
down is what celld's tests rely on: containerd sends `?ns=<registry host>` to
a mirror, every runtime verifies digests (a flipped byte fails the pull), and
the stores can be read back to compare digests end to end.
"""

from __future__ import annotations

import gzip
import hashlib
import http.server
import subprocess
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from tests.support.containerd import Containerd, loopback_only_env
from tests.support.docker import HUB_AUTH_KEY
from tests.support.images import Image, Index, make_image, make_index, push_image, sha256
from tests.support.podman import Podman
from tests.support.procs import free_port
from tests.support.registry import Registry
from tests.support.skopeo import skopeo_copy, stored_blobs, top_digest, write_registries_conf

# bcrypt (cost 4, so the registry checks it fast) of "harness-pw".
HTPASSWD = "celld:$2b$04$oe.cVBxNBtgKuCX49bXChOxOWB.T6EupsouthAm5Dg4ipy394709i\n"


def ns_of(uri: str) -> list[str]:
    """The `ns` values of a request, decoded (containerd escapes ':' as %3A)."""
    return parse_qs(urlsplit(uri).query).get("ns", [])


def all_digests(image: Image | Index) -> set[str]:
    if isinstance(image, Index):
        return {image.digest}.union(*(all_digests(img) for img in image.images.values()))
    return {image.digest} | {blob.digest for blob in image.blobs}


# containerd -----------------------------------------------------------------


@pytest.mark.parametrize("registry_host", ["docker.io", "ghcr.io", "registry.example:5000"])
def test_containerd_pulls_through_mirror_and_names_the_registry_in_ns(
    containerd: Containerd, hub: Registry, registry_host: str
) -> None:
    image = make_image((4096, 65536))
    push_image(hub.url, "acme/app", "v1", image)
    containerd.write_hosts(registry_host, hub.url)
    pushed = len(hub.requests())

    ref = f"{registry_host}/acme/app:v1"
    result = containerd.pull(ref).check()

    assert result.image_digest() == image.digest
    assert result.content_digests() == all_digests(image)
    for blob in [image.manifest, *image.blobs]:
        assert containerd.content_bytes(blob.digest) == blob.data
    pulls = hub.requests()[pushed:]
    assert pulls, "the mirror saw no request"
    assert all(ns_of(uri) == [registry_host] for _, uri, _ in pulls), pulls
    assert len(hub.requests("GET", r"/blobs/sha256:")) == len(image.blobs)


def test_containerd_pulls_one_platform_or_all_of_an_index(
    containerd: Containerd, hub: Registry
) -> None:
    index = make_index(("amd64", "arm64"))
    push_image(hub.url, "acme/multi", "2", index)
    containerd.write_hosts("docker.io", hub.url)
    pushed = len(hub.requests())

    arm = containerd.view(containerd.namespace + "-arm")
    arm.pull("docker.io/acme/multi:2", platform="linux/arm64").check()
    assert arm.image_digest("docker.io/acme/multi:2") == index.digest
    assert arm.content_digests() == {index.digest} | all_digests(index.images["arm64"])

    containerd.pull("docker.io/acme/multi:2", all_platforms=True).check()
    assert containerd.content_digests() == all_digests(index)
    assert all(ns_of(uri) == ["docker.io"] for _, uri, _ in hub.requests()[pushed:])


def test_containerd_pull_fails_when_the_mirror_cannot_serve(containerd: Containerd) -> None:
    containerd.write_hosts("docker.io", f"http://127.0.0.1:{free_port()}")
    result = containerd.pull("docker.io/library/absent:1", timeout=30)
    assert not result.ok
    assert "connection refused" in result.output
    assert containerd.images() == {}


def test_nothing_reaches_beyond_loopback(containerd: Containerd, tmp_path: Path) -> None:
    """A pull that would go to the real registry ends at the dead proxy port.

    The runtimes run inside an empty network namespace here, so that if the
    guard were broken the test would see a DNS error rather than send one."""
    with pytest.raises(ValueError, match=r"no hosts\.toml"):
        containerd.pull("quay.io/acme/app:1")
    containerd.write_hosts(
        "docker.io", f"http://127.0.0.1:{free_port()}", server="https://registry-1.docker.io"
    )
    ctr = [
        *("/usr/bin/ctr", "-a", str(containerd.address), "-n", containerd.namespace),
        *("content", "fetch", "--hosts-dir", str(containerd.hosts_dir), "docker.io/library/x:1"),
    ]
    skopeo = ["skopeo", "--insecure-policy", "inspect", "docker://docker.io/library/x:1"]
    for cmd in (ctr, skopeo):
        run = subprocess.run(
            ["unshare", "--net", *cmd],
            env=loopback_only_env(),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert run.returncode != 0
        assert "proxyconnect tcp: dial tcp 127.0.0.1:1" in run.stderr, run.stderr


@pytest.mark.parametrize("snapshotter", ["native", "overlayfs"])
def test_containerd_unpacks_a_pulled_image(
    containerd: Containerd, hub: Registry, snapshotter: str
) -> None:
    image = make_image((1000, 2000, 3000))
    push_image(hub.url, "library/base", "1", image)
    containerd.write_hosts("docker.io", hub.url)

    containerd.pull("docker.io/library/base:1", unpack=True, snapshotter=snapshotter).check()

    assert containerd.is_unpacked("docker.io/library/base:1", snapshotter)
    # containerd checked each layer against the config's diff_ids while unpacking.
    assert len(containerd.snapshots(snapshotter)) == len(image.layers)


def behind_basic_auth(hub: Registry, tmp_path: Path) -> Registry:
    """The hub's storage served again, now asking for Basic auth (the test
    pusher speaks no auth, so images are pushed before)."""
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(HTPASSWD)
    hub.stop()
    return Registry(hub.root, auth={"htpasswd": {"realm": "t", "path": htpasswd}}).start()


def test_containerd_sends_basic_auth_with_user(
    containerd: Containerd, tmp_path: Path, hub: Registry
) -> None:
    image = make_image((2048,))
    push_image(hub.url, "acme/secret", "1", image)
    private = behind_basic_auth(hub, tmp_path)
    try:
        containerd.write_hosts("docker.io", private.url)

        denied = containerd.pull("docker.io/acme/secret:1")
        assert not denied.ok
        assert "401" in denied.output or "unauthorized" in denied.output.lower()

        containerd.pull("docker.io/acme/secret:1", user="celld:harness-pw").check()
        assert containerd.content_digests() == all_digests(image)
    finally:
        private.stop()


def test_containerd_adds_extra_headers(containerd: Containerd, fault_proxy, hub: Registry) -> None:
    image = make_image((100,))
    push_image(hub.url, "library/hdr", "1", image)
    proxy = fault_proxy(hub.host)
    containerd.write_hosts("docker.io", proxy.url, extra_headers={"X-Celld-Test": "yes"})
    containerd.pull("docker.io/library/hdr:1").check()
    assert proxy.headers_seen("x-celld-test") == {"yes"}


# skopeo ---------------------------------------------------------------------


def test_skopeo_copies_through_registries_conf_mirror(tmp_path: Path, hub: Registry) -> None:
    image = make_image((4096, 65536))
    index = make_index(("amd64", "arm64"))
    push_image(hub.url, "library/demo", "v1", image)
    push_image(hub.url, "acme/multi", "latest", index)
    conf = write_registries_conf(tmp_path / "registries.conf", {"docker.io": hub.host})

    single = skopeo_copy("docker.io/library/demo:v1", tmp_path / "one", registries_conf=conf)
    assert single.returncode == 0, single.stderr
    assert top_digest(tmp_path / "one") == image.digest
    assert set(stored_blobs(tmp_path / "one")) == all_digests(image)

    every = skopeo_copy(
        "docker.io/acme/multi:latest", tmp_path / "all", registries_conf=conf, all_images=True
    )
    assert every.returncode == 0, every.stderr
    assert top_digest(tmp_path / "all") == index.digest
    assert set(stored_blobs(tmp_path / "all")) == all_digests(index)


def test_skopeo_keeps_docker_manifests_in_a_dir_copy(tmp_path: Path, hub: Registry) -> None:
    index = make_index(("amd64", "arm64"), docker=True)
    push_image(hub.url, "library/dock", "1", index)
    conf = write_registries_conf(tmp_path / "registries.conf", {"docker.io": hub.host})

    refused = skopeo_copy(
        "docker.io/library/dock:1", tmp_path / "oci", registries_conf=conf, all_images=True
    )
    assert refused.returncode != 0  # an OCI layout would have to rewrite the digests

    copied = skopeo_copy(
        "docker.io/library/dock:1",
        tmp_path / "dir",
        registries_conf=conf,
        all_images=True,
        layout="dir",
    )
    assert copied.returncode == 0, copied.stderr
    assert top_digest(tmp_path / "dir") == index.digest
    assert set(stored_blobs(tmp_path / "dir")) == all_digests(index)


def test_skopeo_never_bypasses_the_mirror(tmp_path: Path, hub: Registry) -> None:
    push_image(hub.url, "library/demo", "v1", make_image((100,)))
    conf = write_registries_conf(tmp_path / "registries.conf", {"docker.io": hub.host})
    hub.stop()
    result = skopeo_copy("docker.io/library/demo:v1", tmp_path / "out", registries_conf=conf)
    assert result.returncode != 0
    assert "127.0.0.1:1" in result.stderr  # the fallback is the dead loopback port


def test_skopeo_sends_creds(tmp_path: Path, hub: Registry) -> None:
    image = make_image((512,))
    push_image(hub.url, "acme/secret", "1", image)
    private = behind_basic_auth(hub, tmp_path)
    try:
        conf = write_registries_conf(tmp_path / "registries.conf", {"docker.io": private.host})
        denied = skopeo_copy("docker.io/acme/secret:1", tmp_path / "no", registries_conf=conf)
        assert denied.returncode != 0
        ok = skopeo_copy(
            "docker.io/acme/secret:1",
            tmp_path / "yes",
            registries_conf=conf,
            creds="celld:harness-pw",
        )
        assert ok.returncode == 0, ok.stderr
        assert set(stored_blobs(tmp_path / "yes")) == all_digests(image)
    finally:
        private.stop()


# podman ---------------------------------------------------------------------


def test_podman_pulls_through_registries_conf_mirror(podman: Podman, hub: Registry) -> None:
    index = make_index(("amd64", "arm64"))
    push_image(hub.url, "acme/multi", "3", index)
    assert podman.registries_conf is not None
    write_registries_conf(podman.registries_conf, {"docker.io": hub.host})

    result = podman.pull("docker.io/acme/multi:3", platform="linux/arm64")
    assert result.returncode == 0, result.stderr

    arm = index.images["arm64"]
    info = podman.inspect("docker.io/acme/multi:3")
    assert info["Digest"] == index.digest
    assert f"sha256:{info['Id']}" == arm.config.digest
    assert info["Architecture"] == "arm64"
    diff_ids = [sha256(gzip.decompress(layer.data)) for layer in arm.layers]
    assert info["RootFS"]["Layers"] == diff_ids
    assert {u for _, u, _ in hub.requests("GET", "/blobs/")} == {
        f"/v2/acme/multi/blobs/{b.digest}" for b in arm.blobs
    }


# docker ---------------------------------------------------------------------


def test_docker_sends_hub_credentials_to_a_mirror_that_challenges_at_v2(
    dockerd, hub: Registry, tmp_path: Path
) -> None:
    """What celld's docker tests rely on: dockerd asks a mirror with no `ns`,
    learns whether to authenticate from the 401 of its `GET /v2/` ping (and,
    without credentials, asks nothing more), and then offers the credentials
    the client holds for docker.io, never those filed under the mirror's host."""
    image = make_image((2048, 4096), docker=True)
    push_image(hub.url, "acme/secret", "1", image)
    private = behind_basic_auth(hub, tmp_path)
    try:
        docker = dockerd(private.url)
        pushed = len(private.requests())
        assert docker.pull("acme/secret:1").returncode != 0
        docker.login("celld", "harness-pw", registry=private.host)
        refused = docker.pull("acme/secret:1")
        assert refused.returncode != 0
        assert "proxyconnect tcp: dial tcp 127.0.0.1:1" in refused.stderr, refused.stderr
        # a /v2/ challenge with no credentials to answer it: not even a manifest GET
        assert private.requests()[pushed:] == [("GET", "/v2/", 401)] * 2

        docker.login("celld", "harness-pw", registry=HUB_AUTH_KEY)
        pulled = docker.pull("acme/secret:1")
        assert pulled.returncode == 0, pulled.stderr
        assert docker.inspect("acme/secret:1")["RepoDigests"] == [f"acme/secret@{image.digest}"]
        pulls = private.requests()
        assert ("GET", "/v2/", 401) in pulls
        assert all(ns_of(uri) == [] for _, uri, _ in pulls)
        assert len(private.requests("GET", "/blobs/")) == len(image.blobs)
    finally:
        private.stop()


# the fault proxy --------------------------------------------------------------


def test_proxy_corruption_fails_skopeo_and_clean_bytes_pass(
    tmp_path: Path, hub: Registry, fault_proxy
) -> None:
    image = make_image((4096, 65536))
    push_image(hub.url, "library/demo", "v1", image)
    proxy = fault_proxy(hub.host, corrupt=True)
    conf = write_registries_conf(tmp_path / "registries.conf", {"docker.io": proxy.host})

    bad = skopeo_copy("docker.io/library/demo:v1", tmp_path / "bad", registries_conf=conf)
    assert bad.returncode != 0
    assert "Digest did not match" in bad.stderr, bad.stderr
    assert proxy.corrupted

    proxy.corrupt = False
    good = skopeo_copy("docker.io/library/demo:v1", tmp_path / "good", registries_conf=conf)
    assert good.returncode == 0, good.stderr
    assert set(stored_blobs(tmp_path / "good")) == all_digests(image)
    assert len(proxy.blob_gets) >= len(image.blobs) + 1


def test_proxy_corruption_fails_containerd_and_nothing_bad_is_stored(
    containerd: Containerd, hub: Registry, fault_proxy
) -> None:
    image = make_image((4096, 65536))
    push_image(hub.url, "library/demo", "v1", image)
    proxy = fault_proxy(hub.host, corrupt=True, corrupt_at=-1)
    containerd.write_hosts("docker.io", proxy.url)

    bad = containerd.pull("docker.io/library/demo:v1")
    assert not bad.ok
    assert "unexpected commit digest" in bad.output, bad.output
    assert not {blob.digest for blob in image.layers} & containerd.content_digests()
    assert all(ns_of(uri) == ["docker.io"] for uri in proxy.blob_gets)

    # containerd may resume a poisoned partial download (whether it keeps one
    # depends on where the transfer failed), so a clean retry drops partials.
    proxy.corrupt = False
    containerd.drop_partial_downloads()
    containerd.pull("docker.io/library/demo:v1").check()
    assert containerd.content_digests() == all_digests(image)


def test_proxy_truncation_fails_skopeo(tmp_path: Path, hub: Registry, fault_proxy) -> None:
    image = make_image((65536,))
    push_image(hub.url, "library/demo", "v1", image)
    proxy = fault_proxy(hub.host, truncate_after=1000)
    conf = write_registries_conf(tmp_path / "registries.conf", {"docker.io": proxy.host})

    result = skopeo_copy("docker.io/library/demo:v1", tmp_path / "out", registries_conf=conf)
    assert result.returncode != 0
    assert "unexpected EOF" in result.stderr, result.stderr
    assert proxy.truncated


def test_proxy_stall_answers_nothing(hub: Registry, fault_proxy) -> None:
    proxy = fault_proxy(hub.host, stall=True)
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(f"{proxy.url}/v2/", timeout=0.3)
    proxy.stall = False
    assert httpx.get(f"{proxy.url}/v2/", timeout=5).status_code == 200
    assert proxy.requests == [("GET", "/v2/"), ("GET", "/v2/")]


# an upstream that frames bodies as a registry may: chunked, or long, or both


class _Streaming(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    block = bytes(range(256)) * 4096  # 1 MiB

    def do_GET(self) -> None:
        size = int(self.path.rsplit("/", 1)[1])
        self.send_response(200)
        if self.path.startswith("/chunked/"):
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for start in range(0, size, len(self.block)):
                piece = self.block[: min(len(self.block), size - start)]
                self.wfile.write(b"%x\r\n%b\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.send_header("Content-Length", str(size))
            self.end_headers()
            for start in range(0, size, len(self.block)):
                self.wfile.write(self.block[: min(len(self.block), size - start)])

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def streaming_upstream() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Streaming)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def expected_sha(size: int) -> str:
    h = hashlib.sha256()
    for start in range(0, size, len(_Streaming.block)):
        h.update(_Streaming.block[: min(len(_Streaming.block), size - start)])
    return h.hexdigest()


def test_proxy_streams_chunked_and_large_bodies_on_one_connection(
    streaming_upstream: str, fault_proxy
) -> None:
    proxy = fault_proxy(streaming_upstream)
    big = 64 << 20
    tracemalloc.start()
    try:
        with httpx.Client(base_url=proxy.url, timeout=30) as client:
            for path, size in [("/chunked/3000000", 3_000_000), (f"/plain/{big}", big)]:
                h = hashlib.sha256()
                with client.stream("GET", path) as r:
                    assert r.status_code == 200
                    for chunk in r.iter_raw():
                        h.update(chunk)
                assert h.hexdigest() == expected_sha(size), path
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"{peak} bytes traced: the body was buffered, not streamed"
    assert proxy.connections == 1  # keep-alive: both requests on one connection


def test_proxy_corrupts_chunked_bodies_too(streaming_upstream: str, fault_proxy) -> None:
    proxy = fault_proxy(streaming_upstream, corrupt=True, corrupt_at=5, affects="/chunked/")
    body = httpx.get(f"{proxy.url}/chunked/1000").content
    good = _Streaming.block[:1000]
    assert len(body) == 1000
    assert [i for i in range(1000) if body[i] != good[i]] == [5]
