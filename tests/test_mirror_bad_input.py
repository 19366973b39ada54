"""Hostile and malformed requests get a clear 4xx, and the daemon keeps serving.

Requests are written to a raw socket so nothing normalises them on the way
(httpx would collapse `..` and re-encode paths).
"""

from __future__ import annotations

import socket

import httpx
import pytest

from tests.support.images import make_image, push_image

BAD_TARGETS = [
    b"/v2/../../etc/passwd/manifests/latest",
    b"/v2/library/%2e%2e/manifests/latest",
    b"/v2/library%2Fdemo/manifests/latest",
    b"/v2/library/demo/manifests/..%2f..%2fetc",
    b"/v2/Library/Demo/manifests/latest",
    b"/v2/library//demo/manifests/latest",
    b"/v2/library/demo/manifests/" + b"t" * 200,
    b"/v2/library/demo/blobs/sha256:abc",
    b"/v2/library/demo/blobs/md5:" + b"0" * 32,
    b"/v2/library/demo/blobs/sha256:" + b"G" * 64,
    b"/v2/library/demo/blobs/sha256:../../../../etc/passwd",
    b"/v2/" + b"a/" * 1500 + b"manifests/latest",
    b"/v2/library/demo/manifests/latest?ns=evil.example/../x",
    b"/v2/library/demo/manifests/latest?ns=a&ns=b",
    b"/v2/library/\x00demo/manifests/latest",
    b"/etc/passwd",
    b"/",
]


def raw_request(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout) as s:
        s.sendall(data)
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            chunks.append(chunk)
            if b"\r\n\r\n" in b"".join(chunks) and b"Connection: close" not in b"".join(chunks):
                head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
                length = [
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                ]
                if length and len(body) >= length[0]:
                    break
        return b"".join(chunks)


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


@pytest.mark.parametrize("target", BAD_TARGETS, ids=range(len(BAD_TARGETS)))
def test_bad_targets_get_4xx(cell, target):
    resp = raw_request(
        cell.port, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    status = status_of(resp)
    assert 400 <= status < 500, resp[:300]
    body = resp.partition(b"\r\n\r\n")[2]
    assert b"Traceback" not in resp
    if body:
        assert b'"errors"' in body
    # and the daemon is still serving everyone else
    assert httpx.get(f"{cell.url}/v2/").status_code == 200


def test_garbage_and_oversized_headers(cell):
    for junk in (
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 100,  # a TLS hello
        b"GARBAGE\r\n\r\n",
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n",
        b"GET /v2/ HTTP/9.9\r\n\r\n",
    ):
        resp = raw_request(cell.port, junk)
        if resp:
            assert 400 <= status_of(resp) < 500 or status_of(resp) == 505, resp[:200]
            assert b"Traceback" not in resp
    assert httpx.get(f"{cell.url}/v2/").status_code == 200
    assert "Traceback" not in cell.log()


@pytest.mark.parametrize(
    "method,path",
    [
        ("POST", "/v2/library/demo/blobs/uploads/"),
        ("PUT", "/v2/library/demo/manifests/latest"),
        ("PATCH", "/v2/library/demo/blobs/uploads/abc"),
        ("DELETE", "/v2/library/demo/manifests/sha256:" + "a" * 64),
        ("DELETE", "/v2/library/demo/blobs/sha256:" + "a" * 64),
    ],
)
def test_push_endpoints_unsupported(cell, method, path):
    r = httpx.request(method, f"{cell.url}{path}", content=b"x" * 100)
    assert r.status_code == 405
    assert r.json()["errors"][0]["code"] == "UNSUPPORTED"


def test_blob_of_another_algorithm_is_rejected_before_any_fetch(cell, hub):
    img = make_image((100,))
    push_image(hub.url, "library/demo", "v1", img)
    before = len(hub.requests())
    r = httpx.get(f"{cell.url}/v2/library/demo/blobs/sha999:" + "a" * 64)
    assert 400 <= r.status_code < 500
    assert len(hub.requests()) == before
