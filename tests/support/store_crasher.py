"""A process that works a layer store hard until it is killed (tests/test_store_crash.py).

Run as ``python -m tests.support.store_crasher DATA_DIR LOG SEED [--crash-at POINT --after N]``.
It opens the store, then loops forever over what the daemon does: small manifests through
put_bytes, layers through writers in chunks (now and then a large one), corrupt downloads,
aborted downloads, deletes, touches and flushes, tags. Before and after every step that
changes the store it appends a line to LOG (``begin``/``committed``, ``deleting``/``deleted``,
``tagging``/``tagged``), so that the test can tell what the store had acknowledged when the
process died. LOG lines reach the kernel at once, which is all a kill -9 needs.

``--crash-at`` kills the process itself (SIGKILL) at one exact point of the N+1st commit or
delete, to hit windows that random kills reach only by luck:
``before-rename`` (temp file complete and fsynced), ``after-rename`` (file in place, no row),
``mid-delete`` (file unlinked, row still there), ``mid-write`` (the N+1st chunk of any
download; with ``--large-first`` the first download is an 8 MiB layer in 64 KiB chunks).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import signal
from pathlib import Path
from typing import Any

from celld import store as store_mod
from celld.store import DigestMismatch, Store

MAX_STORE_BYTES = 24 << 20


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _arm(point: str, after: int) -> None:
    """Replace one step of the store with a SIGKILL on its (after+1)th call."""
    calls = 0

    def should_die() -> bool:
        nonlocal calls
        calls += 1
        return calls > after

    if point == "before-rename":
        real_rename = store_mod.os.rename

        def rename(src: Any, dst: Any) -> None:
            if should_die():
                _die()
            real_rename(src, dst)

        store_mod.os.rename = rename  # type: ignore[assignment]
    elif point == "after-rename":
        real_insert = Store._index_insert

        def insert(self: Store, *args: Any) -> None:
            if should_die():
                _die()
            real_insert(self, *args)

        Store._index_insert = insert  # type: ignore[method-assign]
    elif point == "mid-write":
        real_write = store_mod.BlobWriter.write

        def write(self: store_mod.BlobWriter, data: bytes) -> None:
            if should_die():
                _die()
            real_write(self, data)

        store_mod.BlobWriter.write = write  # type: ignore[method-assign]
    elif point == "mid-delete":
        real_delete = Store._index_delete

        def delete(self: Store, digest: str) -> None:
            if should_die():
                _die()
            real_delete(self, digest)

        Store._index_delete = delete  # type: ignore[method-assign]
    else:
        raise SystemExit(f"unknown crash point {point!r}")


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def run(data_dir: Path, log_path: Path, seed: int, deletes: bool, large_first: bool) -> None:
    rng = random.Random(seed)
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def log(*words: str) -> None:
        os.write(fd, (" ".join(words) + "\n").encode())

    store = Store.open(data_dir)
    log("open")
    known = [e.digest for e in store.entries()]
    step = 0
    while True:
        step += 1
        roll = rng.random()
        if large_first and step == 1:
            data = rng.randbytes(8 << 20)
            digest = sha(data)
            log("begin", digest, str(len(data)))
            with store.new_writer(digest, source="upstream:docker.io") as writer:
                for i in range(0, len(data), 65536):
                    writer.write(data[i : i + 65536])
                writer.commit()
            log("committed", digest)
            known.append(digest)
        elif roll < 0.35:
            data = rng.randbytes(rng.randrange(0, 64 << 10))
            digest = sha(data)
            log("begin", digest, str(len(data)))
            store.put_bytes(digest, data, media_type="application/json", source="test")
            log("committed", digest)
            known.append(digest)
        elif roll < 0.7:
            size = 8 << 20 if rng.random() < 0.1 else rng.randrange(0, 1 << 20)
            data = rng.randbytes(size)
            digest = sha(data)
            corrupt = rng.random() < 0.15
            give_up = not corrupt and rng.random() < 0.1
            if corrupt and data:
                spoiled = bytearray(data)
                spoiled[rng.randrange(len(data))] ^= 0xFF
                data = bytes(spoiled)
            log("begin", digest, str(len(data)))
            writer = store.new_writer(digest, source="upstream:docker.io")
            chunk = rng.choice([4096, 65536, 1 << 20])
            for i in range(0, len(data), chunk):
                writer.write(data[i : i + chunk])
                if give_up and i > len(data) // 2:
                    break
            if give_up:
                writer.abort()
                log("aborted", digest)
                continue
            try:
                writer.commit()
            except DigestMismatch:
                log("mismatch", digest)
                continue
            log("committed", digest)
            known.append(digest)
        elif roll < 0.8 and known and (deletes or store.total_bytes() > MAX_STORE_BYTES):
            digest = known.pop(rng.randrange(len(known)))
            log("deleting", digest)
            store.delete(digest)
            log("deleted", digest)
        elif roll < 0.9 and known:
            for digest in rng.sample(known, min(len(known), 5)):
                store.touch(digest, 1e9 + step)
            store.flush_access()
        elif known:
            digest = rng.choice(known)
            tag = f"t{rng.randrange(4)}"
            log("tagging", tag, digest)
            store.set_tag("docker.io", "library/crash", tag, digest, float(step))
            log("tagged", tag, digest)
        while store.total_bytes() > MAX_STORE_BYTES and known:
            digest = known.pop(0)
            log("deleting", digest)
            store.delete(digest)
            log("deleted", digest)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data_dir", type=Path)
    ap.add_argument("log", type=Path)
    ap.add_argument("seed", type=int)
    ap.add_argument("--crash-at")
    ap.add_argument("--after", type=int, default=0)
    ap.add_argument("--deletes", action="store_true", help="delete often, not only when full")
    ap.add_argument("--large-first", action="store_true", help="begin with an 8 MiB layer")
    args = ap.parse_args()
    if args.crash_at:
        _arm(args.crash_at, args.after)
    deletes = args.deletes or args.crash_at == "mid-delete"
    run(args.data_dir, args.log, args.seed, deletes, args.large_first)


if __name__ == "__main__":
    main()
