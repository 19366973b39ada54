"""Images the tests make themselves: random layers, real tar+gzip, real JSON.

Nothing is downloaded: every layer is a gzip'd tar of random bytes, so that
containerd can unpack it and a digest mismatch anywhere is detectable. The
pusher speaks the distribution push API directly (monolithic uploads) to a
real docker-registry; it is the tests' own, independent of celld's code.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field

import httpx

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def random_layer(size: int, name: str = "payload") -> bytes:
    """A gzip'd tar holding one file of `size` random bytes (incompressible)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(f"data/{name}")
        info.size = size
        info.mode = 0o644
        tar.addfile(info, io.BytesIO(os.urandom(size)))
    return gzip.compress(raw.getvalue(), compresslevel=1, mtime=0)


@dataclass(frozen=True)
class Blob:
    media_type: str
    data: bytes

    @property
    def digest(self) -> str:
        return sha256(self.data)

    def descriptor(self, **extra: object) -> dict:
        return {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": len(self.data),
            **extra,
        }


@dataclass
class Image:
    """A single-platform image: config + layers + manifest."""

    config: Blob
    layers: list[Blob]
    manifest: Blob

    @property
    def digest(self) -> str:
        return self.manifest.digest

    @property
    def blobs(self) -> list[Blob]:
        return [self.config, *self.layers]


@dataclass
class Index:
    """A multi-platform image: an OCI index or docker manifest list."""

    images: dict[str, Image]
    manifest: Blob

    @property
    def digest(self) -> str:
        return self.manifest.digest


def make_image(
    layer_sizes: tuple[int, ...] = (4096, 65536),
    *,
    docker: bool = False,
    arch: str = "amd64",
    os_name: str = "linux",
    base: Image | None = None,
) -> Image:
    """An image of random layers; on top of `base`'s layers when given (shared layers)."""
    layer_type = DOCKER_LAYER if docker else OCI_LAYER
    layers = [
        *(base.layers if base else []),
        *(Blob(layer_type, random_layer(n, f"f{i}")) for i, n in enumerate(layer_sizes)),
    ]
    diff_ids = [sha256(gzip.decompress(layer.data)) for layer in layers]
    config = Blob(
        DOCKER_CONFIG if docker else OCI_CONFIG,
        json.dumps(
            {
                "architecture": arch,
                "os": os_name,
                "config": {"Cmd": ["/bin/true"]},
                "rootfs": {"type": "layers", "diff_ids": diff_ids},
                "history": [{"created_by": "celld tests"} for _ in layers],
            }
        ).encode(),
    )
    media = DOCKER_MANIFEST if docker else OCI_MANIFEST
    manifest = Blob(
        media,
        json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": media,
                "config": config.descriptor(),
                "layers": [layer.descriptor() for layer in layers],
            },
            indent=3,
        ).encode(),
    )
    return Image(config, layers, manifest)


def make_index(
    platforms: tuple[str, ...] = ("amd64", "arm64"),
    *,
    docker: bool = False,
    layer_sizes: tuple[int, ...] = (4096, 65536),
) -> Index:
    images = {arch: make_image(layer_sizes, docker=docker, arch=arch) for arch in platforms}
    media = DOCKER_LIST if docker else OCI_INDEX
    body = {
        "schemaVersion": 2,
        "mediaType": media,
        "manifests": [
            img.manifest.descriptor(platform={"architecture": arch, "os": "linux"})
            for arch, img in images.items()
        ],
    }
    return Index(images, Blob(media, json.dumps(body, indent=2).encode()))


@dataclass
class Pusher:
    """Pushes blobs and manifests to a registry with monolithic uploads."""

    base_url: str
    auth: httpx.Auth | tuple[str, str] | None = None
    client: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.client = httpx.Client(base_url=self.base_url, auth=self.auth, timeout=60)

    def close(self) -> None:
        self.client.close()

    def blob(self, name: str, blob: Blob) -> None:
        if self.client.head(f"/v2/{name}/blobs/{blob.digest}").status_code == 200:
            return
        r = self.client.post(f"/v2/{name}/blobs/uploads/")
        r.raise_for_status()
        location = r.headers["location"]
        sep = "&" if "?" in location else "?"
        r = self.client.put(
            f"{location}{sep}digest={blob.digest}",
            content=blob.data,
            headers={"Content-Type": "application/octet-stream"},
        )
        r.raise_for_status()

    def manifest(self, name: str, ref: str, blob: Blob) -> None:
        r = self.client.put(
            f"/v2/{name}/manifests/{ref}",
            content=blob.data,
            headers={"Content-Type": blob.media_type},
        )
        r.raise_for_status()

    def image(self, name: str, tag: str, image: Image) -> None:
        for blob in image.blobs:
            self.blob(name, blob)
        self.manifest(name, tag, image.manifest)

    def index(self, name: str, tag: str, index: Index) -> None:
        for img in index.images.values():
            for blob in img.blobs:
                self.blob(name, blob)
            self.manifest(name, img.digest, img.manifest)
        self.manifest(name, tag, index.manifest)


def push_image(
    base_url: str,
    name: str,
    tag: str,
    image: Image | Index,
    *,
    auth: httpx.Auth | tuple[str, str] | None = None,
) -> None:
    pusher = Pusher(base_url, auth=auth)
    try:
        if isinstance(image, Index):
            pusher.index(name, tag, image)
        else:
            pusher.image(name, tag, image)
    finally:
        pusher.close()
