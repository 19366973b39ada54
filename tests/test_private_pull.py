"""A pinned private image pulls on a fresh cell through real runtimes, and only with its token.

Cell A stages a private image (credentials at the token Hub) and is stopped; cell B
starts with an empty store, the same cluster key and the same central registries.
Runtimes send credentials only after a challenge: containerd answers a 401 on
content, skopeo takes its challenge from the `/v2/` ping and fetches a token. B cannot
know that a digest is private (its copy sits under the app's own path), so whatever
the public paths cannot serve is challenged, whether the Hub says "not yours" (up)
or nothing at all (down). Without the token, or with another app's, nothing private
is served, and the answers are the same as for content that does not exist.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support.auth import AuthHub
from tests.support.celld import Celld
from tests.support.containerd import Containerd
from tests.support.images import Image, make_image
from tests.support.podman import Podman
from tests.support.skopeo import skopeo_copy, stored_blobs, top_digest, write_registries_conf
from tests.test_stage import ACCEPT, all_digests, centrals, cluster_key, done, new_cell  # noqa: F401


@dataclass(frozen=True)
class Staged:
    secret: Image  # acme/secret, staged privately by "secret-app"
    token: str
    other_token: str  # "other-app"'s token, for its own private image
    public: Image  # public/base, anonymous at the Hub, staged publicly


@pytest.fixture
def staged(tmp_path: Path, token_hub: AuthHub, centrals, cluster_key: Path) -> Staged:  # noqa: F811
    secret, other, public = make_image((20_000, 30_000)), make_image((7000,)), make_image((9000,))
    token_hub.push("acme/secret", "1", secret)
    token_hub.push("acme/other", "1", other)
    token_hub.push("public/base", "1", public)
    ((user, password),) = token_hub.users.items()
    cell = new_cell(tmp_path / "a", token_hub.url, centrals, cluster_key)
    try:
        token = done(cell.stage("acme/secret:1", "secret-app", username=user, password=password))
        theirs = done(cell.stage("acme/other:1", "other-app", username=user, password=password))
        assert done(cell.stage("public/base:1", "base"))["token"] is None
    finally:
        cell.stop()
    return Staged(secret, token["token"], theirs["token"], public)


@pytest.fixture(params=["hub-up", "hub-down"])
def fresh(request, tmp_path: Path, token_hub: AuthHub, centrals, cluster_key: Path, staged):  # noqa: F811
    """Cell B: an empty store, the same key and central registries; the Hub up or down."""
    if request.param == "hub-down":
        token_hub.stop()
    cell = new_cell(tmp_path / "b", token_hub.url, centrals, cluster_key)
    yield cell
    cell.stop()


def served(cell: Celld) -> float:
    return cell.metric("celld_mirror_served_total")


def challenged(cell: Celld, kind: str | None = None) -> float:
    labels = {"outcome": "error_401"} | ({"kind": kind} if kind else {})
    return cell.metric("celld_mirror_requests_total", **labels)


def token_requests(cell: Celld) -> float:
    return cell.metric("celld_mirror_requests_total", kind="token", outcome="ok")


def test_containerd_pulls_the_pinned_private_image_only_with_its_token(
    fresh: Celld, staged: Staged, containerd: Containerd
) -> None:
    ref = f"docker.io/acme/secret@{staged.secret.digest}"
    containerd.write_hosts("docker.io", fresh.url)

    anonymous = containerd.view(containerd.namespace + "-anon").pull(ref, timeout=60)
    assert not anonymous.ok and "401" in anonymous.output, anonymous.output
    theirs = containerd.view(containerd.namespace + "-other")
    wrong = theirs.pull(ref, user=f"app:{staged.other_token}", timeout=60)
    assert not wrong.ok and "401" in wrong.output, wrong.output
    assert theirs.content_digests() == set()
    assert served(fresh) == 0
    assert fresh.metric("celld_fetches_total", source="registry", outcome="ok") == 0

    mine = containerd.view(containerd.namespace + "-mine")
    mine.pull(ref, user=f"app:{staged.token}").check()
    assert mine.content_digests() == all_digests(staged.secret)
    for blob in staged.secret.blobs:
        assert mine.content_bytes(blob.digest) == blob.data
    # Every byte came from the app's private path on a central registry.
    assert fresh.metric("celld_fetches_total", source="registry", outcome="ok") == 1 + len(
        staged.secret.blobs
    )
    assert fresh.metric("celld_fetches_total", source="upstream", outcome="ok") == 0

    # Now in B's store: still nothing without the token, nor by the tag.
    again = containerd.view(containerd.namespace + "-again").pull(ref, timeout=60)
    assert not again.ok and "401" in again.output
    by_tag = containerd.view(containerd.namespace + "-tag")
    tagged = by_tag.pull("docker.io/acme/secret:1", user=f"app:{staged.token}", timeout=60)
    assert not tagged.ok and by_tag.content_digests() == set()


def test_skopeo_copies_the_pinned_private_image_only_with_its_token(
    fresh: Celld, staged: Staged, tmp_path: Path
) -> None:
    ref = f"docker.io/acme/secret@{staged.secret.digest}"
    conf = write_registries_conf(tmp_path / "registries.conf", {"docker.io": fresh.host})

    for creds in (None, f"app:{staged.other_token}", "app:celld1.forged.0.x"):
        out = tmp_path / f"out-{secrets.token_hex(4)}"
        failed = skopeo_copy(ref, out, registries_conf=conf, creds=creds, timeout=60)
        assert failed.returncode != 0
        assert "unauthorized" in failed.stderr.lower(), failed.stderr
    assert served(fresh) == 0
    assert fresh.metric("celld_fetches_total", source="registry", outcome="ok") == 0

    content_401s = challenged(fresh, "manifest") + challenged(fresh, "blob")
    pings, tokens = challenged(fresh, "base"), token_requests(fresh)
    out = tmp_path / "mine"
    copied = skopeo_copy(ref, out, registries_conf=conf, creds=f"app:{staged.token}")
    assert copied.returncode == 0, copied.stderr
    assert top_digest(out) == staged.secret.digest
    assert set(stored_blobs(out)) == all_digests(staged.secret)
    assert fresh.metric("celld_fetches_total", source="upstream", outcome="ok") == 0
    # skopeo learnt the scheme from its ping and fetched its token once; no content 401.
    assert challenged(fresh, "base") == pings + 1 and token_requests(fresh) == tokens + 1
    assert challenged(fresh, "manifest") + challenged(fresh, "blob") == content_401s


def test_a_tokenless_client_cannot_tell_private_from_absent(
    fresh: Celld, staged: Staged, containerd: Containerd
) -> None:
    """The same status and body for a private digest (in B's store or not) as for one
    that exists nowhere, for manifests, blobs and tags."""
    absent = "sha256:" + secrets.token_hex(32)
    layer = staged.secret.layers[0].digest

    def answers() -> list[tuple[int, bytes, str | None]]:
        out = []
        for path in (
            f"acme/secret/manifests/{staged.secret.digest}",
            f"acme/secret/manifests/{absent}",
            f"acme/secret/blobs/{layer}",
            f"acme/secret/blobs/{absent}",
            "acme/secret/manifests/1",
            "acme/nothing/manifests/1",
        ):
            r = httpx.get(f"{fresh.url}/v2/{path}?ns=docker.io", headers={"Accept": ACCEPT})
            out.append((r.status_code, r.content, r.headers.get("www-authenticate")))
        return out

    before = answers()
    assert len(set(before)) == 1, before
    assert before[0][0] == 401 and before[0][2] == 'Basic realm="celld"'
    containerd.write_hosts("docker.io", fresh.url)
    ref = f"docker.io/acme/secret@{staged.secret.digest}"
    containerd.pull(ref, user=f"app:{staged.token}").check()
    assert fresh.blob_stored(layer)
    assert answers() == before


def test_public_images_pull_on_a_fresh_cell_without_a_token_or_a_challenge(
    fresh: Celld, staged: Staged, containerd: Containerd, tmp_path: Path, request
) -> None:
    hub_up = "hub-up" in request.node.callspec.id
    refs = [f"docker.io/public/base@{staged.public.digest}"]
    if hub_up:
        refs.append("docker.io/public/base:1")
    containerd.write_hosts("docker.io", fresh.url)
    for i, ref in enumerate(refs):
        view = containerd.view(containerd.namespace + f"-{i}")
        assert view.pull(ref).check().content_digests() == all_digests(staged.public)
    assert challenged(fresh) == 0  # containerd was never asked for credentials

    conf = write_registries_conf(tmp_path / "registries.conf", {"docker.io": fresh.host})
    out = tmp_path / "public"
    copied = skopeo_copy(refs[-1], out, registries_conf=conf)
    assert copied.returncode == 0, copied.stderr
    assert top_digest(out) == staged.public.digest
    # skopeo's ping is challenged (it would ping anyway) and it fetches the anonymous
    # token: one round trip more than without private images; content never is.
    assert challenged(fresh, "base") == 1
    assert token_requests(fresh) == 1
    assert challenged(fresh, "manifest") == challenged(fresh, "blob") == 0


def test_podman_pulls_the_pinned_private_image_only_with_its_token(
    fresh: Celld, staged: Staged, podman: Podman
) -> None:
    ref = f"docker.io/acme/secret@{staged.secret.digest}"
    write_registries_conf(podman.registries_conf, {"docker.io": fresh.host})
    for creds in (None, f"app:{staged.other_token}"):
        failed = podman.pull(ref, creds=creds)
        assert failed.returncode != 0
        assert "unauthorized" in failed.stderr.lower(), failed.stderr
    assert served(fresh) == 0
    pulled = podman.pull(ref, creds=f"app:{staged.token}")
    assert pulled.returncode == 0, pulled.stderr
    assert podman.inspect(ref)["Digest"] == staged.secret.digest
    assert fresh.metric("celld_fetches_total", source="upstream", outcome="ok") == 0
