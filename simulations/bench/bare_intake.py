"""The least a cell's intake costs on this machine: celld's work with nothing around it.

One GET of a blob from a registry over a plain socket (no HTTP library, no event loop,
no store): the main thread reads the body into 4 MiB buffers (a socket that wakes it
once a MiB is in, as celld's reads do), one thread runs the sha256 over them, another
the blake3 of every 1 MiB piece and the write into a file, and the buffers go round
again once both are done with them. The digest is checked at the end. This is the
floor `simulations.bench.intake` sets celld's intake against (`bare pipeline`): the
same bytes fetched, verified and written on the same cores in the same rounds, so the
difference is what celld's daemon adds (trio, HTTP, the store, the peer protocol),
and the floor itself is what this machine allows any implementation in Python.

Prints one JSON line: {"mib_s": ..., "cpu_s_per_gib": ...}, timed from the request to
the last byte written; exits 1 when the bytes do not match the digest. Run:
python -m simulations.bench.bare_intake URL DIGEST SIZE OUT
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import resource
import socket
import sys
import threading
import time
from urllib.parse import urlsplit

import blake3

CHUNK = 4 << 20  # a buffer of the socket's reads
PIECE = 1 << 20  # blake3 per piece, as a cell's piece table of a blob under 512 MiB
BUFFERS = 12


def _head(sock: socket.socket) -> bytes:
    """Reads the response head; returns what came after it."""
    data = b""
    while b"\r\n\r\n" not in data:
        got = sock.recv(65536)
        if not got:
            raise SystemExit("the registry closed before its answer's head")
        data += got
    head, _, rest = data.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0]
    if b" 200 " not in status + b" ":
        raise SystemExit(f"the registry answered {status.decode(errors='replace')}")
    return rest


def take(url: str, size: int, out: str) -> str:
    """GETs `url` (`size` bytes) into `out`; returns the sha256 of what came."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port or 80))
    request = f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: close\r\n\r\n"
    sock.sendall(request.encode())
    pending = _head(sock)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, PIECE)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    sha = hashlib.sha256()
    free: queue.Queue[bytearray] = queue.Queue()
    for _ in range(BUFFERS):
        free.put(bytearray(CHUNK))
    to_hash: queue.Queue[tuple[memoryview, bytearray] | None] = queue.Queue()
    to_write: queue.Queue[tuple[memoryview, bytearray] | None] = queue.Queue()
    done: dict[int, int] = {}
    lock = threading.Lock()

    def release(buf: bytearray) -> None:  # the second stage done with it frees it
        with lock:
            if done.pop(id(buf), 0):
                free.put(buf)
            else:
                done[id(buf)] = 1

    def hasher() -> None:
        while (item := to_hash.get()) is not None:
            sha.update(item[0])
            release(item[1])

    def writer() -> None:
        offset = 0
        while (item := to_write.get()) is not None:
            view, buf = item
            for start in range(0, len(view), PIECE):
                piece = view[start : start + PIECE]
                blake3.blake3(piece).digest()
                offset += os.pwrite(fd, piece, offset)
            release(buf)

    threads = [threading.Thread(target=hasher), threading.Thread(target=writer)]
    for thread in threads:
        thread.start()
    left = size
    try:
        while left:
            buf = free.get()
            want = min(CHUNK, left)
            view = memoryview(buf)[:want]
            n = min(len(pending), want)
            view[:n] = pending[:n]
            pending = pending[n:]
            while n < want:
                got = sock.recv_into(view[n:])
                if not got:
                    raise SystemExit(f"the registry sent {size - left + n} of {size} bytes")
                n += got
            left -= want
            to_hash.put((view, buf))
            to_write.put((view, buf))
    finally:
        to_hash.put(None)
        to_write.put(None)
        for thread in threads:
            thread.join()
        os.close(fd)
        sock.close()
    return "sha256:" + sha.hexdigest()


def main(argv: list[str] | None = None) -> int:
    url, digest, size_text, out = argv if argv is not None else sys.argv[1:]
    size = int(size_text)
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    got = take(url, size, out)
    took = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    if got != digest:
        print(f"{url}: the bytes hash to {got}, not {digest}", file=sys.stderr)
        return 1
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    gib = size / 2**30
    print(json.dumps({"mib_s": size / 2**20 / took, "cpu_s_per_gib": cpu / gib}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
