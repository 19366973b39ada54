"""Manifests, indexes and docker manifest lists: media types, parsing, platforms, Accept.

Owns: reading a manifest's bytes into the descriptors the mirror and the fetch chain
need (config, layers, child manifests), picking a platform out of an index the way
containerd does, and deciding whether a client's Accept headers admit a stored
manifest.

Never: does I/O, or trusts a manifest it has not checked. Bad JSON, a wrong
schemaVersion, a bad digest, a negative size, a document that is both a manifest and an
index (the ambiguity of CVE-2021-41190), or more than 4 MiB are all MANIFEST_INVALID.

What the mirror does when a client's Accept does not admit the stored type: it answers
MANIFEST_UNKNOWN (404), as distribution does for an OCI index or manifest a client did
not ask for ("OCI index found, but accept header does not support OCI indexes").
`not_acceptable` builds that error. It never rewrites a manifest into another type:
that would change its digest.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from protocol.errors import OCIError, oci_error
from protocol.reference import Digest, parse_digest

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_FOREIGN_LAYER = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"

MANIFEST_TYPES: tuple[str, ...] = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES: tuple[str, ...] = (OCI_INDEX, DOCKER_MANIFEST_LIST)
ALL_MANIFEST_TYPES: tuple[str, ...] = MANIFEST_TYPES + INDEX_TYPES

# What we ask an upstream for: every type we can parse, docker's first like containerd.
# No "*/*": a registry would then be free to send schema 1, which we cannot verify.
UPSTREAM_ACCEPT: str = ", ".join((DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_MANIFEST, OCI_INDEX))

MAX_MANIFEST_BYTES = 4 * 1024 * 1024
_MAX_SIZE = (1 << 63) - 1


@dataclass(frozen=True)
class Platform:
    """The platform an index entry is for (OCI image-spec `platform`)."""

    os: str
    architecture: str
    variant: str | None = None


@dataclass(frozen=True)
class Descriptor:
    """A pointer to content: its media type, digest and size (and platform in an index)."""

    media_type: str
    digest: Digest
    size: int
    platform: Platform | None = None
    urls: tuple[str, ...] = ()  # where a foreign layer lives (not in any registry)


@dataclass(frozen=True)
class Manifest:
    """A parsed image manifest (config + layers) or index (manifests)."""

    media_type: str
    config: Descriptor | None
    layers: tuple[Descriptor, ...]
    manifests: tuple[Descriptor, ...]

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES

    @property
    def blobs(self) -> tuple[Descriptor, ...]:
        """Every blob an image needs besides its manifest: config first, then layers."""
        return ((self.config,) if self.config is not None else ()) + self.layers


def _invalid(reason: str, **detail: object) -> OCIError:
    return oci_error("MANIFEST_INVALID", {"reason": reason, **detail})


def media_type_of(content_type: str | None) -> str | None:
    """The bare media type of a Content-Type value: no parameters, lowercase."""
    if content_type is None:
        return None
    bare = content_type.split(";", 1)[0].strip().lower()
    return bare or None


def _string(doc: dict[str, Any], key: str, where: str, required: bool = True) -> str | None:
    value = doc.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise _invalid(f"{where}.{key} must be a non-empty string")
    return value


def _platform(value: object, where: str) -> Platform | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _invalid(f"{where}.platform must be an object")
    os = _string(value, "os", f"{where}.platform")
    architecture = _string(value, "architecture", f"{where}.platform")
    variant = _string(value, "variant", f"{where}.platform", required=False)
    assert os is not None and architecture is not None
    return Platform(os, architecture, variant)


def _descriptor(value: object, where: str) -> Descriptor:
    if not isinstance(value, dict):
        raise _invalid(f"{where} must be an object")
    media_type = _string(value, "mediaType", where)
    assert media_type is not None
    digest_text = value.get("digest")
    if not isinstance(digest_text, str):
        raise _invalid(f"{where}.digest must be a string")
    try:
        digest = parse_digest(digest_text)
    except OCIError as err:
        raise _invalid(f"{where}.digest is invalid", digest=err.detail) from None
    size = value.get("size")
    if type(size) is not int or not 0 <= size <= _MAX_SIZE:
        raise _invalid(f"{where}.size must be an integer 0..2^63-1")
    urls = value.get("urls", [])
    if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
        raise _invalid(f"{where}.urls must be a list of strings")
    platform = _platform(value.get("platform"), where)
    return Descriptor(media_type, digest, size, platform, tuple(urls))


def _descriptors(doc: dict[str, Any], key: str) -> tuple[Descriptor, ...]:
    items = doc.get(key)
    if not isinstance(items, list):
        raise _invalid(f"{key} must be a list")
    return tuple(_descriptor(item, f"{key}[{i}]") for i, item in enumerate(items))


def _media_type(doc: dict[str, Any], content_type: str | None) -> str:
    """The document's own mediaType, else the Content-Type, else its shape."""
    declared = doc.get("mediaType")
    if declared is not None:
        if not isinstance(declared, str):
            raise _invalid("mediaType must be a string")
        media_type = declared
    else:
        media_type = media_type_of(content_type) or ""
        if media_type not in ALL_MANIFEST_TYPES:
            # OCI image-spec 1.0 made mediaType optional: tell the kinds apart by shape.
            media_type = OCI_INDEX if "manifests" in doc else OCI_MANIFEST
    if media_type not in ALL_MANIFEST_TYPES:
        raise _invalid("unsupported manifest media type", media_type=media_type[:100])
    return media_type


def parse_manifest(data: bytes, content_type: str | None) -> Manifest:
    """A manifest's bytes as a `Manifest`, or MANIFEST_INVALID saying what is wrong."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise _invalid("larger than 4 MiB", size=len(data))
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        raise _invalid("not JSON") from None
    if not isinstance(doc, dict):
        raise _invalid("not a JSON object")
    if type(doc.get("schemaVersion")) is not int or doc["schemaVersion"] != 2:
        raise _invalid("schemaVersion must be 2")
    media_type = _media_type(doc, content_type)
    if media_type in INDEX_TYPES:
        if "config" in doc or "layers" in doc:
            raise _invalid("an index must not have config or layers")
        return Manifest(media_type, None, (), _descriptors(doc, "manifests"))
    if "manifests" in doc:
        raise _invalid("a manifest must not have manifests")
    config = _descriptor(doc.get("config"), "config")
    return Manifest(media_type, config, _descriptors(doc, "layers"), ())


# containerd's platform normalization (platforms/database.go): aliases of one
# architecture, and the variant an architecture implies when none is written.
_ARCH_ALIASES = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64", "i386": "386"}
_ARCH_IMPLIED = {"armhf": ("arm", "v7"), "armel": ("arm", "v6")}
_VARIANT_ALIASES = {
    "arm64": {"8": "v8", "v8.0": "v8", "9": "v9", "9.0": "v9", "v9.0": "v9"},
    "arm": {"5": "v5", "6": "v6", "7": "v7", "8": "v8"},
    "amd64": {"v1": ""},
}
_DEFAULT_VARIANT = {"arm64": "v8", "arm": "v7"}


def normalize_platform(platform: Platform) -> tuple[str, str, str]:
    """(os, architecture, variant) in containerd's canonical spelling, variant filled."""
    os = platform.os.lower()
    if os == "macos":
        os = "darwin"
    arch = platform.architecture.lower()
    variant = (platform.variant or "").lower()
    if arch in _ARCH_IMPLIED:
        arch, variant = _ARCH_IMPLIED[arch]
    arch = _ARCH_ALIASES.get(arch, arch)
    if arch == "386":
        variant = ""
    variant = _VARIANT_ALIASES.get(arch, {}).get(variant, variant)
    return os, arch, variant or _DEFAULT_VARIANT.get(arch, "")


def select_platform(manifest: Manifest, want: Platform) -> Descriptor | None:
    """The first entry of an index for `want`, matched after containerd's normalization.

    OS and architecture must match; the variant must match too, where a missing variant
    means the architecture's default (arm64 -> v8, arm -> v7, others none). Entries
    without a platform (attestations have "unknown/unknown") never match. Unlike
    containerd's `platforms.Only`, there is no fallback to a compatible platform (arm64
    taking arm/v7, amd64 taking 386), and Windows `os.version` is not compared: a cell
    runs what it asked for or nothing.
    """
    wanted = normalize_platform(want)
    for descriptor in manifest.manifests:
        if descriptor.platform is not None and normalize_platform(descriptor.platform) == wanted:
            return descriptor
    return None


def _accept_items(accept: Iterable[bytes | str]) -> Iterable[tuple[str, float]]:
    for value in accept:
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        for item in text.split(","):
            media_range, *params = item.split(";")
            media_range = media_range.strip().lower()
            if not media_range:
                continue
            q = 1.0
            for param in params:
                key, _, val = param.partition("=")
                if key.strip().lower() == "q":
                    try:
                        q = float(val.strip())
                    except ValueError:
                        q = 1.0
            yield media_range, q


def negotiate(accept: list[bytes | str] | None, media_type: str) -> bool:
    """Whether a client that sent these Accept values takes a manifest of `media_type`.

    Each value may be a comma-separated list (containerd sends one, docker several
    headers). No Accept at all, or none with a media range in it, takes anything.
    Otherwise a range with q > 0 must name the type, or be `*/*` or `application/*`.
    Parameters other than q are ignored. distribution 2.8 is stricter: it refuses OCI
    types to `*/*` and to a request with no Accept; we follow RFC 9110 there.
    """
    if not accept:
        return True
    wanted = media_type.lower()
    seen = False
    for media_range, q in _accept_items(accept):
        seen = True
        if q <= 0:
            continue
        if media_range in ("*/*", wanted) or (
            media_range == "application/*" and wanted.startswith("application/")
        ):
            return True
    return not seen


def not_acceptable(media_type: str) -> OCIError:
    """MANIFEST_UNKNOWN (404) for a stored manifest the client's Accept did not admit."""
    return oci_error(
        "MANIFEST_UNKNOWN",
        {"media_type": media_type},
        f"manifest found, but accept header does not support {media_type}",
    )
