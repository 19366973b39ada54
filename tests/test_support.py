"""The test harness itself: images pushed to a real registry come back intact."""

import httpx

from tests.support.images import make_image, make_index, push_image


def test_pushed_image_pulls_back_by_digest(hub):
    image = make_image((1000, 2000))
    push_image(hub.url, "library/demo", "v1", image)
    r = httpx.get(
        f"{hub.url}/v2/library/demo/manifests/v1", headers={"Accept": image.manifest.media_type}
    )
    assert r.status_code == 200
    assert r.headers["docker-content-digest"] == image.digest
    assert r.content == image.manifest.data
    for blob in image.blobs:
        assert httpx.get(f"{hub.url}/v2/library/demo/blobs/{blob.digest}").content == blob.data
    assert len(hub.requests("GET", r"/blobs/sha256:")) == len(image.blobs)


def test_index_of_two_platforms(hub):
    index = make_index()
    push_image(hub.url, "acme/multi", "latest", index)
    r = httpx.get(
        f"{hub.url}/v2/acme/multi/manifests/latest", headers={"Accept": index.manifest.media_type}
    )
    assert r.headers["docker-content-digest"] == index.digest
