"""celld.registry against real docker-registry processes: pull, push, and both auth schemes.

What a user of the fetch chain and of staging relies on: images come back byte for
byte; public images pull anonymously through the token flow; private ones need the
right credentials and say so in one line that never holds the secret; tokens are
reused rather than asked for on every request; a dead registry fails fast as
`Unavailable`; credentials never follow a redirect to blob storage.
"""

from __future__ import annotations

import base64
import logging
import math
import pickle
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
import trio

from celld.http_client import Pool
from celld.registry import (
    Credentials,
    NotFound,
    RegistryClient,
    RegistryError,
    Unauthorized,
    Unavailable,
)
from tests.support.images import OCI_MANIFEST, make_image, push_image, random_layer, sha256
from tests.support.procs import free_port
from tests.support.registry import Registry

if TYPE_CHECKING:
    from tests.support.auth import AuthHub

# token_hub and htpasswd_hub, until tests/conftest.py offers them to every test.

ACCEPT = f"{OCI_MANIFEST}, application/vnd.docker.distribution.manifest.v2+json"


@pytest.fixture(params=["httpx", "lean"])
async def pool(request: pytest.FixtureRequest) -> AsyncIterator[Pool | None]:
    """Blob GETs through httpx, or through the daemon's lean client (celld.http_client):
    every blob test runs on both, since the daemon uses one and staging the other."""
    if request.param == "httpx":
        yield None
        return
    lean = Pool()
    yield lean
    await lean.aclose()


async def read_blob(client: RegistryClient, name: str, digest: str) -> tuple[bytes, int]:
    """The blob's bytes and how many chunks they came in."""
    data, chunks = bytearray(), 0
    async with client.open_blob(name, digest) as blob:
        async for chunk in blob.aiter_bytes():
            data += chunk
            chunks += 1
        assert blob.size == len(data)
    return bytes(data), chunks


async def test_anonymous_pull_of_manifest_and_streamed_blob(
    hub: Registry, pool: Pool | None
) -> None:
    image = make_image((1000, 3_000_000))
    push_image(hub.url, "library/demo", "v1", image)
    client = RegistryClient(hub.url, pool=pool)
    try:
        got = await client.get_manifest("library/demo", "v1", ACCEPT)
        assert (got.media_type, got.data, got.digest) == (
            OCI_MANIFEST,
            image.manifest.data,
            image.digest,
        )
        head = await client.head_manifest("library/demo", image.digest, ACCEPT)
        assert head == (OCI_MANIFEST, image.digest, len(image.manifest.data))
        for blob in image.blobs:
            data, _ = await read_blob(client, "library/demo", blob.digest)
            assert data == blob.data
        _, chunks = await read_blob(client, "library/demo", image.layers[1].digest)
        assert chunks > 1, "a large layer arrives in pieces, not in one read"
    finally:
        await client.aclose()


async def test_missing_things_are_not_found(hub: Registry, pool: Pool | None) -> None:
    image = make_image((100,))
    push_image(hub.url, "acme/app", "v1", image)
    async with httpx.AsyncClient() as http:
        client = RegistryClient(hub.url, http=http, pool=pool)
        with pytest.raises(NotFound) as tag:
            await client.get_manifest("acme/app", "no-such-tag", ACCEPT)
        assert tag.value.status == 404
        assert tag.value.code == "MANIFEST_UNKNOWN"
        with pytest.raises(NotFound):
            await client.get_manifest("acme/nothing-here", "v1", ACCEPT)
        missing = sha256(b"never pushed")
        with pytest.raises(NotFound):
            async with client.open_blob("acme/app", missing):
                pass
        assert not await client.has_blob("acme/app", missing)
        assert await client.has_blob("acme/app", image.layers[0].digest)
        await client.aclose()
        assert not http.is_closed, "a shared httpx client stays open for its owner"


async def test_dead_registry_is_unavailable_quickly() -> None:
    client = RegistryClient(f"http://127.0.0.1:{free_port()}", connect_timeout=1.0)
    start = trio.current_time()
    with pytest.raises(Unavailable) as refused:
        await client.get_manifest("library/demo", "v1", ACCEPT)
    assert trio.current_time() - start < 1.0
    assert "127.0.0.1" in str(refused.value)
    await client.aclose()


async def test_silent_registry_is_unavailable_after_the_read_timeout(pool: Pool | None) -> None:
    with socket.socket() as silent:  # accepts connections (kernel backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        client = RegistryClient(f"http://127.0.0.1:{port}", read_timeout=0.5, pool=pool)
        start = trio.current_time()
        with pytest.raises(Unavailable, match="ReadTimeout"):
            async with client.open_blob("library/demo", sha256(b"x")):
                pass
        assert trio.current_time() - start < 2.0
        await client.aclose()


class _Misbehaving(BaseHTTPRequestHandler):
    """A registry front that sheds load (503 with Retry-After, or 429) or cuts bodies short."""

    def do_GET(self) -> None:
        if "/short/" in self.path:  # promises 100 kB, sends 10 bytes, hangs up
            self.send_response(200)
            self.send_header("Content-Type", OCI_MANIFEST)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"0123456789")
            self.close_connection = True
            return
        status = 429 if "busy" in self.path else 503
        body = b'{"errors":[{"code":"TOOMANYREQUESTS","message":"slow down"}]}'
        self.send_response(status)
        self.send_header("Retry-After", "7")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def misbehaving() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Misbehaving)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


async def test_overloaded_registry_is_unavailable(misbehaving: str, pool: Pool | None) -> None:
    client = RegistryClient(misbehaving, pool=pool)
    for name, status in (("library/down", 503), ("library/busy", 429)):
        with pytest.raises(Unavailable) as exc:
            await client.get_manifest(name, "v1", ACCEPT)
        assert (exc.value.status, exc.value.retry_after) == (status, 7.0)
        assert exc.value.code == "TOOMANYREQUESTS"
        with pytest.raises(Unavailable) as exc:
            async with client.open_blob(name, sha256(b"x")):
                pass
        assert (exc.value.status, exc.value.retry_after) == (status, 7.0)
    await client.aclose()


async def test_body_cut_short_is_unavailable(misbehaving: str, pool: Pool | None) -> None:
    client = RegistryClient(misbehaving, pool=pool)
    with pytest.raises(Unavailable, match="transfer failed"):
        await client.get_manifest("short/app", "v1", ACCEPT)
    received = b""
    with pytest.raises(Unavailable, match="transfer failed"):
        async with client.open_blob("short/app", sha256(b"x")) as blob:
            assert blob.size == 100_000
            async for chunk in blob.aiter_bytes():
                received += chunk
    assert received == b"0123456789"
    await client.aclose()


# -- the token flow ------------------------------------------------------------


async def test_public_image_pulls_anonymously_through_the_token_flow(
    token_hub: AuthHub, pool: Pool | None
) -> None:
    image = make_image((1000, 50_000))
    token_hub.push("public/tool", "v1", image)
    client = RegistryClient(token_hub.url, pool=pool)
    got = await client.get_manifest("public/tool", "v1", ACCEPT)
    assert got.data == image.manifest.data
    for blob in image.blobs:
        assert (await read_blob(client, "public/tool", blob.digest))[0] == blob.data
    await client.aclose()

    tokens = token_hub.tokens
    assert tokens is not None and token_hub.storage is not None
    assert [(r.user, r.scopes, r.granted) for r in tokens.requests] == [
        (None, ("repository:public/tool:pull",), (("public/tool", ("pull",)),))
    ]
    # One 401 taught the client the scheme; every later request carried the token.
    assert [s for _, _, s in token_hub.registry.requests()].count(401) == 1
    # The registry redirected blob GETs to storage, which never saw the token.
    fetched = [(m, p, h) for m, p, h in token_hub.storage.seen if p.endswith("/data")]
    assert len(fetched) == len(image.blobs)
    assert all("Authorization" not in h and "authorization" not in h for _, _, h in fetched)


async def test_a_blob_as_first_request_learns_the_token_flow(
    token_hub: AuthHub, pool: Pool | None
) -> None:
    image = make_image((70_000,))
    token_hub.push("public/tool", "v2", image)
    client = RegistryClient(token_hub.url, pool=pool)
    for blob in image.blobs:  # the first GET meets the 401; the rest carry the token
        assert (await read_blob(client, "public/tool", blob.digest))[0] == blob.data
    await client.aclose()
    assert token_hub.tokens is not None and token_hub.storage is not None
    assert len(token_hub.tokens.requests) == 1
    fetched = [h for _, p, h in token_hub.storage.seen if p.endswith("/data")]
    assert len(fetched) == len(image.blobs)
    assert all("authorization" not in {k.lower() for k in h} for h in fetched)


async def test_private_image_needs_credentials(token_hub: AuthHub, pool: Pool | None) -> None:
    image = make_image((1000,))
    token_hub.push("private/shop", "2.1", image)
    anonymous = RegistryClient(token_hub.url)
    with pytest.raises(Unauthorized) as refused:
        await anonymous.get_manifest("private/shop", "2.1", ACCEPT)
    assert str(refused.value) == (
        f"{token_hub.host} requires credentials for pull access to private/shop"
    )
    await anonymous.aclose()

    alice = Credentials("alice", token_hub.users["alice"])
    client = RegistryClient(token_hub.url, credentials=alice, pool=pool)
    assert (await client.get_manifest("private/shop", "2.1", ACCEPT)).data == image.manifest.data
    blob = image.layers[0]
    assert (await read_blob(client, "private/shop", blob.digest))[0] == blob.data
    await client.aclose()
    assert token_hub.tokens is not None
    assert token_hub.tokens.count(user="alice", password_ok=True, status=200) == 1


async def test_credentials_never_go_to_a_plain_http_realm_on_another_host(
    token_hub: AuthHub,
) -> None:
    image = make_image((100,))
    token_hub.push("private/shop", "2.1", image)
    # The registry as "localhost"; its realm says 127.0.0.1: another host, over http.
    elsewhere = token_hub.url.replace("127.0.0.1", "localhost")
    client = RegistryClient(elsewhere, credentials=Credentials("alice", token_hub.users["alice"]))
    with pytest.raises(Unauthorized, match=r"not sent to its token realm 127\.0\.0\.1"):
        await client.get_manifest("private/shop", "2.1", ACCEPT)
    await client.aclose()
    assert token_hub.tokens is not None
    assert {r.user for r in token_hub.tokens.requests} == {None}


async def test_wrong_password_is_one_clear_line_without_secrets(
    token_hub: AuthHub, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    canary = "canary-" + token_hub.users["alice"][::-1]
    creds = Credentials("alice", canary)
    client = RegistryClient(token_hub.url, credentials=creds)
    with pytest.raises(Unauthorized) as refused:
        await client.get_manifest("private/shop", "2.1", ACCEPT)
    await client.aclose()
    message = str(refused.value)
    assert "refused the credentials of user 'alice'" in message
    assert "\n" not in message
    secrets = [canary, base64.b64encode(f"alice:{canary}".encode()).decode()]
    for text in (message, repr(refused.value), repr(creds), str(creds), repr(client), caplog.text):
        for secret in secrets:
            assert secret not in text
    with pytest.raises(TypeError):
        pickle.dumps(creds)
    assert token_hub.tokens is not None
    assert token_hub.tokens.count(user="alice", password_ok=False, status=401) == 1


async def test_tokens_and_passwords_stay_out_of_logs(
    token_hub: AuthHub, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # httpx and httpcore log requests at DEBUG and INFO
    image = make_image((1000,))
    token_hub.push("private/app", "v1", image)
    password = token_hub.users["alice"]
    client = RegistryClient(token_hub.url, credentials=Credentials("alice", password))
    await client.get_manifest("private/app", "v1", ACCEPT)
    await read_blob(client, "private/app", image.layers[0].digest)
    await client.aclose()
    assert token_hub.tokens is not None and token_hub.tokens.issued
    assert "/token?" in caplog.text, "the token request was logged, so the check means something"
    leaks = [password, base64.b64encode(f"alice:{password}".encode()).decode()]
    for token in [*token_hub.tokens.issued, *leaks]:
        assert token not in caplog.text


async def test_tokens_are_cached_per_scope_until_they_expire(token_hub: AuthHub) -> None:
    image = make_image((1000,))
    token_hub.push("public/a", "v1", image)
    token_hub.push("public/b", "v1", image)
    tokens = token_hub.tokens
    assert tokens is not None
    client = RegistryClient(token_hub.url)

    async def pull(name: str) -> None:
        await client.get_manifest(name, "v1", ACCEPT)

    async with trio.open_nursery() as nursery:  # ten at once still ask for one token
        for _ in range(10):
            nursery.start_soon(pull, "public/a")
    for _ in range(3):
        await pull("public/a")
        await read_blob(client, "public/a", image.layers[0].digest)
    assert tokens.count(scopes=("repository:public/a:pull",)) == 1
    await pull("public/b")
    assert tokens.count(scopes=("repository:public/b:pull",)) == 1
    assert len(tokens.requests) == 2

    tokens.expires_in = 1  # the client stops using a token before it expires
    fresh = RegistryClient(token_hub.url)
    await fresh.get_manifest("public/a", "v1", ACCEPT)
    await fresh.get_manifest("public/a", "v1", ACCEPT)
    assert len(tokens.requests) == 3
    await trio.sleep(0.8)
    await fresh.get_manifest("public/a", "v1", ACCEPT)
    assert len(tokens.requests) == 4
    await client.aclose()
    await fresh.aclose()


async def test_token_from_access_token_field(token_hub: AuthHub) -> None:
    assert token_hub.tokens is not None
    token_hub.tokens.token_fields = ("access_token",)  # the OAuth2 spelling only
    image = make_image((100,))
    token_hub.push("public/oauth", "v1", image)
    client = RegistryClient(token_hub.url)
    assert (await client.get_manifest("public/oauth", "v1", ACCEPT)).digest == image.digest
    await client.aclose()


async def test_push_with_token_auth_asks_for_push_and_mount_scopes(token_hub: AuthHub) -> None:
    image = make_image((1000, 30_000))
    alice = Credentials("alice", token_hub.users["alice"])
    client = RegistryClient(token_hub.url, credentials=alice)
    for blob in image.blobs:
        await client.push_blob("private/base", blob.digest, blob.data, chunk_size=8192)
    await client.push_manifest("private/base", "v1", OCI_MANIFEST, image.manifest.data)
    for blob in image.blobs:
        await client.push_blob("private/derived", blob.digest, blob.data, mount_from="private/base")
    digest = await client.push_manifest("private/derived", "v1", OCI_MANIFEST, image.manifest.data)
    assert digest == image.digest
    await client.aclose()

    assert token_hub.tokens is not None
    asked = {r.scopes for r in token_hub.tokens.requests}
    assert ("repository:private/base:pull,push",) in asked
    assert ("repository:private/base:pull", "repository:private/derived:pull,push") in asked
    mounts = token_hub.registry.requests("POST", r"mount=")
    assert [status for _, _, status in mounts if status != 401] == [201] * len(image.blobs)
    anonymous = RegistryClient(token_hub.url)
    with pytest.raises(Unauthorized, match="requires credentials for push access"):
        await anonymous.push_blob("private/base", image.config.digest, image.config.data)
    await anonymous.aclose()


# -- HTTP Basic ----------------------------------------------------------------


async def test_basic_auth(htpasswd_hub: AuthHub) -> None:
    image = make_image((1000,))
    htpasswd_hub.push("team/app", "v1", image)
    password = htpasswd_hub.users["bob"]
    client = RegistryClient(htpasswd_hub.url, credentials=Credentials("bob", password))
    for _ in range(3):
        assert (await client.get_manifest("team/app", "v1", ACCEPT)).data == image.manifest.data
    assert (await read_blob(client, "team/app", image.layers[0].digest))[0] == image.layers[0].data
    await client.aclose()
    statuses = [s for _, _, s in htpasswd_hub.registry.requests(uri_pattern="^/v2/team/app/")]
    assert statuses.count(401) == 1, "after one 401 the client sends Basic credentials at once"

    wrong = RegistryClient(htpasswd_hub.url, credentials=Credentials("bob", "not-" + password))
    with pytest.raises(Unauthorized) as refused:
        await wrong.get_manifest("team/app", "v1", ACCEPT)
    await wrong.aclose()
    assert str(refused.value) == f"{htpasswd_hub.host} refused the credentials of user 'bob'"
    nobody = RegistryClient(htpasswd_hub.url)
    with pytest.raises(Unauthorized, match="requires credentials"):
        await nobody.get_manifest("team/app", "v1", ACCEPT)
    await nobody.aclose()


# -- push ----------------------------------------------------------------------


async def test_push_monolithic_and_chunked_then_pull_back(
    central: Registry, tmp_path: Path
) -> None:
    image = make_image((5000, 100_000))
    small, big = image.layers
    (tmp_path / "small").write_bytes(small.data)
    (tmp_path / "big").write_bytes(big.data)
    client = RegistryClient(central.url)
    await client.push_blob("apps/shop", image.config.digest, image.config.data)  # bytes
    await client.push_blob("apps/shop", small.digest, tmp_path / "small")  # a file, in one PUT
    await client.push_blob("apps/shop", big.digest, tmp_path / "big", chunk_size=32 * 1024)
    digest = await client.push_manifest("apps/shop", "2.1", OCI_MANIFEST, image.manifest.data)
    assert digest == image.digest
    for blob in image.blobs:
        assert await client.has_blob("apps/shop", blob.digest)
    await client.aclose()

    patches = central.requests("PATCH", r"^/v2/apps/shop/blobs/uploads/")
    assert len(patches) == math.ceil(len(big.data) / (32 * 1024))
    assert central.requests("PUT", r"/blobs/uploads/.*digest=") != []
    # Read back with a plain HTTP client, independent of celld's.
    r = httpx.get(f"{central.url}/v2/apps/shop/manifests/2.1", headers={"Accept": OCI_MANIFEST})
    assert r.headers["docker-content-digest"] == image.digest
    for blob in image.blobs:
        assert httpx.get(f"{central.url}/v2/apps/shop/blobs/{blob.digest}").content == blob.data


async def test_mount_from_another_repository(central: Registry) -> None:
    layer = random_layer(20_000)
    digest = sha256(layer)
    client = RegistryClient(central.url)
    await client.push_blob("team/base", digest, layer)
    puts_before = len(central.requests("PUT"))
    await client.push_blob("team/app", digest, layer, mount_from="team/base")
    assert central.requests("POST", r"^/v2/team/app/blobs/uploads/\?.*mount=")[-1][2] == 201
    assert len(central.requests("PUT")) == puts_before, "a mounted blob is not uploaded again"
    assert await client.has_blob("team/app", digest)

    # A source that lacks the blob: the registry opens an upload instead (202), which is used.
    other = random_layer(1000)
    await client.push_blob("team/other", sha256(other), other, mount_from="team/base")
    assert await client.has_blob("team/other", sha256(other))
    await client.aclose()


async def test_corrupt_upload_is_refused_by_the_registry(central: Registry) -> None:
    client = RegistryClient(central.url)
    with pytest.raises(RegistryError) as refused:
        await client.push_blob("apps/bad", sha256(b"what we claim"), b"what we send")
    assert (refused.value.status, refused.value.code) == (400, "DIGEST_INVALID")
    assert not await client.has_blob("apps/bad", sha256(b"what we claim"))
    await client.aclose()
