"""Manifests, indexes, platform selection and Accept negotiation (protocol.manifest)."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.errors import OCIError
from protocol.manifest import (
    ALL_MANIFEST_TYPES,
    DOCKER_CONFIG,
    DOCKER_FOREIGN_LAYER,
    DOCKER_LAYER,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    INDEX_TYPES,
    MANIFEST_TYPES,
    MAX_MANIFEST_BYTES,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    UPSTREAM_ACCEPT,
    Descriptor,
    Manifest,
    Platform,
    negotiate,
    not_acceptable,
    parse_manifest,
    select_platform,
)
from protocol.reference import Digest, parse_digest
from tests.support.images import make_image, make_index, push_image
from tests.support.registry import Registry


def digest(n: int) -> str:
    return "sha256:" + hashlib.sha256(str(n).encode()).hexdigest()


def descriptor(n: int, media_type: str = OCI_LAYER_GZIP, size: int = 10, **extra: object) -> dict:
    return {"mediaType": media_type, "digest": digest(n), "size": size, **extra}


def image_doc(media_type: str | None = OCI_MANIFEST, **over: object) -> dict:
    doc: dict = {
        "schemaVersion": 2,
        "config": descriptor(0, OCI_CONFIG),
        "layers": [descriptor(1), descriptor(2, size=0)],
    }
    if media_type:
        doc["mediaType"] = media_type
    doc.update(over)
    return doc


def index_doc(platforms: list[dict | None], media_type: str | None = OCI_INDEX) -> dict:
    doc: dict = {
        "schemaVersion": 2,
        "manifests": [
            descriptor(i, OCI_MANIFEST, **({"platform": p} if p else {}))
            for i, p in enumerate(platforms)
        ],
    }
    if media_type:
        doc["mediaType"] = media_type
    return doc


def parse(doc: object, content_type: str | None = None) -> Manifest:
    return parse_manifest(json.dumps(doc).encode(), content_type)


def invalid(data: bytes, content_type: str | None = None) -> OCIError:
    with pytest.raises(OCIError) as err:
        parse_manifest(data, content_type)
    assert (err.value.code, err.value.status) == ("MANIFEST_INVALID", 400)
    return err.value


def test_oci_image_manifest() -> None:
    m = parse(image_doc())
    assert m.media_type == OCI_MANIFEST and not m.is_index
    assert m.config == Descriptor(OCI_CONFIG, parse_digest(digest(0)), 10)
    assert [str(d.digest) for d in m.blobs] == [digest(0), digest(1), digest(2)]
    assert m.layers[1].size == 0
    assert m.manifests == ()


def test_docker_manifest() -> None:
    doc = image_doc(DOCKER_MANIFEST, config=descriptor(0, DOCKER_CONFIG))
    doc["layers"] = [descriptor(1, DOCKER_LAYER)]
    m = parse(doc)
    assert m.media_type == DOCKER_MANIFEST and len(m.blobs) == 2


def test_foreign_layer_urls() -> None:
    layer = descriptor(1, DOCKER_FOREIGN_LAYER, urls=["https://example.invalid/layer"])
    m = parse(image_doc(DOCKER_MANIFEST, layers=[layer]))
    assert m.layers[0].urls == ("https://example.invalid/layer",)
    assert m.config is not None and m.config.urls == ()
    invalid(json.dumps(image_doc(layers=[descriptor(1, urls="https://x")])).encode())
    invalid(json.dumps(image_doc(layers=[descriptor(1, urls=[1])])).encode())


def test_index_and_manifest_list() -> None:
    amd64 = {"os": "linux", "architecture": "amd64"}
    for media_type in (OCI_INDEX, DOCKER_MANIFEST_LIST):
        m = parse(index_doc([amd64, None], media_type))
        assert m.is_index and m.media_type == media_type
        assert m.blobs == () and m.config is None
        assert m.manifests[0].platform == Platform("linux", "amd64")
        assert m.manifests[1].platform is None


def test_media_type_falls_back_to_content_type_then_shape() -> None:
    assert parse(image_doc(None), DOCKER_MANIFEST + "; charset=utf-8").media_type == (
        DOCKER_MANIFEST
    )
    assert parse(image_doc(None), None).media_type == OCI_MANIFEST
    assert parse(image_doc(None), "application/json").media_type == OCI_MANIFEST
    assert parse(index_doc([], None), None).media_type == OCI_INDEX
    # The document's own mediaType wins over the header.
    assert parse(image_doc(DOCKER_MANIFEST), OCI_MANIFEST).media_type == DOCKER_MANIFEST


@pytest.mark.parametrize(
    "doc",
    [
        [],
        "manifest",
        None,
        image_doc(schemaVersion=1),
        image_doc(schemaVersion="2"),
        image_doc(schemaVersion=True),
        image_doc(schemaVersion=2.0),
        {k: v for k, v in image_doc().items() if k != "schemaVersion"},
        image_doc(mediaType="application/vnd.docker.distribution.manifest.v1+prettyjws"),
        image_doc(mediaType=5),
        image_doc(config=None),
        image_doc(config="sha256:x"),
        image_doc(layers=None),
        image_doc(layers={"a": 1}),
        image_doc(layers=[descriptor(1, size=-1)]),
        image_doc(layers=[descriptor(1, size=True)]),
        image_doc(layers=[descriptor(1, size=1.5)]),
        image_doc(layers=[descriptor(1, size="10")]),
        image_doc(layers=[descriptor(1, size=1 << 63)]),
        image_doc(layers=[{**descriptor(1), "digest": "sha256:abc"}]),
        image_doc(layers=[{**descriptor(1), "digest": "md5:" + "a" * 32}]),
        image_doc(layers=[{**descriptor(1), "digest": None}]),
        image_doc(layers=[{**descriptor(1), "mediaType": ""}]),
        image_doc(layers=[5]),
        image_doc(manifests=[]),  # CVE-2021-41190: a manifest that is also an index
        {**index_doc([]), "layers": []},
        {**index_doc([]), "config": descriptor(0)},
        index_doc([{"os": "linux"}]),
        index_doc([{"os": "linux", "architecture": 64}]),
        {**index_doc([]), "manifests": "x"},
    ],
)
def test_invalid_documents_are_manifest_invalid(doc: object) -> None:
    invalid(json.dumps(doc).encode())


@pytest.mark.parametrize(
    "data",
    [b"", b"{", b"\xff\xfe\x00", b"[" * 100_000, b'{"schemaVersion": 2, "size": 1e99999}', b"nul"],
)
def test_garbage_is_manifest_invalid(data: bytes) -> None:
    invalid(data)


def test_four_mib_limit() -> None:
    doc = image_doc()
    doc["annotations"] = {"pad": ""}
    base = len(json.dumps(doc).encode())
    doc["annotations"]["pad"] = "x" * (MAX_MANIFEST_BYTES - base)
    data = json.dumps(doc).encode()
    assert len(data) == MAX_MANIFEST_BYTES
    assert len(parse_manifest(data, None).layers) == 2
    err = invalid(data + b" ")
    assert err.detail == {"reason": "larger than 4 MiB", "size": MAX_MANIFEST_BYTES + 1}


def test_digest_error_is_reported_inside_manifest_invalid() -> None:
    err = invalid(json.dumps(image_doc(layers=[{**descriptor(1), "digest": "x"}])).encode())
    assert isinstance(err.detail, dict) and err.detail["reason"] == "layers[0].digest is invalid"


# --- platforms ------------------------------------------------------------------------

PLATFORMS = [
    {"os": "unknown", "architecture": "unknown"},  # an attestation manifest
    {"os": "linux", "architecture": "amd64"},
    {"os": "linux", "architecture": "arm", "variant": "v6"},
    {"os": "linux", "architecture": "arm", "variant": "v7"},
    {"os": "linux", "architecture": "arm64", "variant": "v8"},
    {"os": "linux", "architecture": "arm64", "variant": "v9"},
    {"os": "windows", "architecture": "amd64"},
    None,
]
INDEX = parse(index_doc(PLATFORMS))


@pytest.mark.parametrize(
    ("want", "position"),
    [
        (Platform("linux", "amd64"), 1),
        (Platform("linux", "x86_64"), 1),
        (Platform("Linux", "AMD64"), 1),
        (Platform("linux", "arm64"), 4),  # arm64 means v8
        (Platform("linux", "aarch64"), 4),
        (Platform("linux", "arm64", "v8"), 4),
        (Platform("linux", "arm64", "8"), 4),
        (Platform("linux", "arm64", "v9"), 5),
        (Platform("linux", "arm"), 3),  # arm means v7
        (Platform("linux", "armhf"), 3),
        (Platform("linux", "armel"), 2),
        (Platform("linux", "arm", "6"), 2),
        (Platform("windows", "amd64"), 6),
        (Platform("linux", "s390x"), None),
        (Platform("linux", "arm", "v5"), None),
        (Platform("darwin", "amd64"), None),
        (Platform("linux", "amd64", "v3"), None),
    ],
)
def test_select_platform_like_containerd(want: Platform, position: int | None) -> None:
    chosen = select_platform(INDEX, want)
    assert chosen == (None if position is None else INDEX.manifests[position])


def test_arm64_without_variant_in_index_matches_v8() -> None:
    index = parse(index_doc([{"os": "linux", "architecture": "arm64"}]))
    assert select_platform(index, Platform("linux", "arm64", "v8")) == index.manifests[0]
    assert select_platform(index, Platform("linux", "arm64", "v9")) is None


def test_first_match_wins() -> None:
    amd64 = {"os": "linux", "architecture": "amd64"}
    index = parse(index_doc([amd64, amd64]))
    assert select_platform(index, Platform("linux", "amd64")) == index.manifests[0]


# --- Accept negotiation ---------------------------------------------------------------

CONTAINERD_ACCEPT = (
    b"application/vnd.docker.distribution.manifest.v2+json, "
    b"application/vnd.docker.distribution.manifest.list.v2+json, "
    b"application/vnd.oci.image.manifest.v1+json, "
    b"application/vnd.oci.image.index.v1+json, */*"
)


def test_negotiate() -> None:
    assert negotiate(None, OCI_INDEX)
    assert negotiate([], OCI_INDEX)
    assert negotiate([""], OCI_INDEX)
    assert negotiate([CONTAINERD_ACCEPT], OCI_INDEX)
    docker = [DOCKER_MANIFEST, DOCKER_MANIFEST_LIST.encode(), OCI_MANIFEST]
    assert negotiate(docker, DOCKER_MANIFEST_LIST)
    assert not negotiate(docker, OCI_INDEX)
    assert negotiate([f"{OCI_INDEX.upper()} ; q=0.5"], OCI_INDEX)
    assert not negotiate([f"{OCI_INDEX};q=0"], OCI_INDEX)
    assert not negotiate([f"{OCI_INDEX};q=0.0, text/html"], OCI_INDEX)
    assert negotiate(["text/html;q=1, */*;q=0.1"], OCI_INDEX)
    assert not negotiate(["text/html, */*;q=0"], OCI_INDEX)
    assert negotiate(["application/*"], OCI_INDEX)
    assert not negotiate(["application/vnd.oci.image.index.v1"], OCI_INDEX)
    assert negotiate([f"{OCI_INDEX};q=bogus"], OCI_INDEX)


def test_negotiate_on_a_huge_accept_header_is_fast() -> None:
    start = time.perf_counter()
    assert not negotiate(["text/html;q=1;a=b," * 2000] * 4, OCI_INDEX)
    assert time.perf_counter() - start < 0.1


def test_upstream_accept_names_every_type_we_parse() -> None:
    assert set(ALL_MANIFEST_TYPES) == set(MANIFEST_TYPES) | set(INDEX_TYPES)
    for media_type in ALL_MANIFEST_TYPES:
        assert negotiate([UPSTREAM_ACCEPT], media_type)
    assert "*/*" not in UPSTREAM_ACCEPT


def test_not_acceptable_is_manifest_unknown() -> None:
    err = not_acceptable(OCI_INDEX)
    assert (err.code, err.status) == ("MANIFEST_UNKNOWN", 404)


# --- properties -----------------------------------------------------------------------


@given(st.binary(max_size=2000), st.sampled_from([None, OCI_INDEX, "text/plain", ""]))
def test_random_bytes_raise_only_manifest_invalid(data: bytes, content_type: str | None) -> None:
    try:
        parse_manifest(data, content_type)
    except OCIError as err:
        assert err.code == "MANIFEST_INVALID"


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 1 << 64) | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3)
    ),
    max_leaves=10,
)
KEYS = st.sampled_from(["schemaVersion", "mediaType", "config", "layers", "manifests", "size"])


@given(st.dictionaries(KEYS, JSONISH | st.just(2) | st.sampled_from(ALL_MANIFEST_TYPES)))
def test_random_documents_raise_only_manifest_invalid(doc: dict) -> None:
    try:
        parse(doc)
    except OCIError as err:
        assert err.code == "MANIFEST_INVALID"


DESCRIPTORS = st.builds(
    lambda blob, size, media: {"mediaType": media, "digest": str(Digest.of(blob)), "size": size},
    st.binary(max_size=8),
    st.integers(0, (1 << 63) - 1),
    st.sampled_from([OCI_LAYER_GZIP, DOCKER_LAYER, "application/x-anything"]),
)


@given(st.sampled_from(MANIFEST_TYPES), DESCRIPTORS, st.lists(DESCRIPTORS, max_size=5))
def test_generated_manifests_keep_every_descriptor(
    media_type: str, config: dict, layers: list[dict]
) -> None:
    m = parse({"schemaVersion": 2, "mediaType": media_type, "config": config, "layers": layers})
    got = [(d.media_type, str(d.digest), d.size) for d in m.blobs]
    assert got == [(d["mediaType"], d["digest"], d["size"]) for d in [config, *layers]]


# --- what a real registry serves ------------------------------------------------------


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    reg = Registry(Path(tmp_path_factory.mktemp("manifest-registry"))).start()
    yield reg
    reg.stop()


@pytest.mark.parametrize("docker", [False, True])
def test_parses_what_docker_registry_serves(registry: Registry, docker: bool) -> None:
    index = make_index(("amd64", "arm64"), docker=docker, layer_sizes=(64,))
    name = "docker/multi" if docker else "oci/multi"
    push_image(registry.url, name, "v1", index)
    with httpx.Client(base_url=registry.url, headers={"Accept": UPSTREAM_ACCEPT}) as client:
        r = client.get(f"/v2/{name}/manifests/v1")
        assert r.status_code == 200
        top = parse_manifest(r.content, r.headers["content-type"])
        assert top.is_index and str(Digest.of(r.content)) == r.headers["docker-content-digest"]
        chosen = select_platform(top, Platform("linux", "arm64"))
        assert chosen is not None and str(chosen.digest) == index.images["arm64"].digest
        r = client.get(f"/v2/{name}/manifests/{chosen.digest}")
        image = parse_manifest(r.content, r.headers["content-type"])
        assert image.media_type == (DOCKER_MANIFEST if docker else OCI_MANIFEST)
        assert [str(d.digest) for d in image.blobs] == [
            b.digest for b in index.images["arm64"].blobs
        ]
        for blob in image.blobs:
            assert client.head(f"/v2/{name}/blobs/{blob.digest}").status_code == 200


def test_negotiation_agrees_with_docker_registry(registry: Registry) -> None:
    """distribution answers MANIFEST_UNKNOWN for an OCI type the Accept leaves out.

    It also refuses OCI types to `Accept: */*` and to no Accept at all, which RFC 9110
    says accept anything; there negotiate() follows the RFC, not distribution."""
    push_image(registry.url, "oci/index", "v1", make_index(("amd64",), layer_sizes=(64,)))
    push_image(registry.url, "oci/image", "v1", make_image((64,)))
    accepts = [UPSTREAM_ACCEPT, DOCKER_MANIFEST, f"{DOCKER_MANIFEST}, {OCI_MANIFEST}"]
    with httpx.Client(base_url=registry.url) as client:
        for name, media_type in (("oci/index", OCI_INDEX), ("oci/image", OCI_MANIFEST)):
            for accept in accepts:
                r = client.get(f"/v2/{name}/manifests/v1", headers={"Accept": accept})
                ours = negotiate([accept], media_type)
                assert (r.status_code == 200) == ours, (name, accept)
                if not ours:
                    body = json.loads(r.content)
                    assert body["errors"][0]["code"] == not_acceptable(media_type).code
