"""The layer store on real files: what the daemon and an operator rely on."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from celld import store as store_mod
from celld.store import BlobEntry, BlobWriter, DigestMismatch, Store, StoreFull, StoreLocked
from protocol.pieces import MiB, PieceTable
from tests.support.celld import Celld


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if not p.is_dir())


def test_write_commit_lookup_and_reopen(tmp_path: Path) -> None:
    data = os.urandom(300_000)
    digest = sha(data)
    s = Store.open(tmp_path / "data")
    w = s.new_writer(digest, media_type=None, source="upstream:docker.io")
    assert w.path.parent == tmp_path / "data" / "tmp"
    for i in range(0, len(data), 65536):
        w.write(data[i : i + 65536])
    assert w.written == len(data)
    assert s.lookup(digest) is None  # not visible before commit
    assert files_under(tmp_path / "data" / "blobs") == []
    entry = w.commit()
    hex_ = digest.removeprefix("sha256:")
    assert entry == BlobEntry(
        digest,
        len(data),
        tmp_path / "data" / "blobs" / "sha256" / hex_[:2] / hex_,
        None,
        "upstream:docker.io",
    )
    assert entry.path.read_bytes() == data
    assert entry.path.stat().st_mode & 0o077 == 0  # private layers: for the daemon's user only
    assert s.lookup(digest) == entry
    assert s.blob_path(digest) == entry.path
    assert list((tmp_path / "data" / "tmp").iterdir()) == []
    s.close()

    s2 = Store.open(tmp_path / "data")
    assert s2.lookup(digest) == entry
    assert s2.total_bytes() == len(data)
    s2.close()


def test_streaming_reader_sees_bytes_before_commit(store: Store) -> None:
    data = os.urandom(200_000)
    w = store.new_writer(sha(data))
    with open(w.path, "rb") as reader:
        w.write(data[:1000])
        assert reader.read() == data[:1000]
        w.write(data[1000:])
        entry = w.commit()
        # The descriptor opened on the temp file keeps reading the same inode after rename.
        assert reader.read() == data[1000:]
    assert entry.path.read_bytes() == data


def test_mismatch_raises_and_leaves_nothing(store: Store) -> None:
    good = os.urandom(50_000)
    bad = bytearray(good)
    bad[1234] ^= 1
    w = store.new_writer(sha(good))
    w.write(bytes(bad))
    with pytest.raises(DigestMismatch) as info:
        w.commit()
    assert info.value.expected == sha(good)
    assert info.value.actual == sha(bytes(bad))
    assert store.lookup(sha(good)) is None
    assert files_under(store.data_dir / "blobs") == []
    assert files_under(store.data_dir / "tmp") == []
    with pytest.raises(DigestMismatch):
        store.put_bytes(sha(good), bytes(bad))
    assert files_under(store.data_dir / "blobs") == []
    assert files_under(store.data_dir / "tmp") == []
    assert store.total_bytes() == 0


def test_abort_cleans_and_is_idempotent(store: Store) -> None:
    data = b"x" * 1000
    w = store.new_writer(sha(data))
    w.write(data[:10])
    assert w.path.exists()
    w.abort()
    w.abort()
    assert not w.path.exists()
    with pytest.raises(ValueError):
        w.write(b"more")
    with pytest.raises(ValueError):
        w.commit()
    assert store.lookup(sha(data)) is None


def test_writer_as_context_manager_aborts_on_error(store: Store) -> None:
    data = b"y" * 100
    with pytest.raises(RuntimeError), store.new_writer(sha(data)) as w:
        w.write(data)
        raise RuntimeError("the upstream hung up")
    assert files_under(store.data_dir / "tmp") == []
    assert store.lookup(sha(data)) is None


def test_put_bytes_keeps_media_type_and_source(store: Store) -> None:
    manifest = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}'
    mt = "application/vnd.oci.image.manifest.v1+json"
    entry = store.put_bytes(sha(manifest), manifest, media_type=mt, source="registry:http://c")
    assert entry.media_type == mt
    assert entry.source == "registry:http://c"
    assert entry.path.read_bytes() == manifest
    # Storing it again keeps the one file and what was known about it.
    again = store.put_bytes(sha(manifest), manifest)
    assert again == entry
    assert store.total_bytes() == len(manifest)


def test_two_writers_of_one_digest(store: Store) -> None:
    data = os.urandom(10_000)
    w1 = store.new_writer(sha(data), source="peer:a")
    w2 = store.new_writer(sha(data), source="upstream:docker.io")
    assert w1.path != w2.path
    w1.write(data)
    w2.write(data)
    e1 = w1.commit()
    e2 = w2.commit()
    assert e1 == e2
    assert store.total_bytes() == len(data)
    assert files_under(store.data_dir / "tmp") == []
    assert len(files_under(store.data_dir / "blobs")) == 1


@pytest.mark.parametrize(
    "digest",
    [
        "sha256:" + "A" * 64,  # uppercase
        "sha256:" + "a" * 63,
        "sha256:" + "a" * 65,
        "sha256:../../../../etc/passwd",
        "sha256:" + "a" * 62 + "/a",
        "sha256:" + "a" * 64 + "\x00",
        "sha256:" + "a" * 64 + "\n",
        "../" + "a" * 64,
        "a" * 64,
        "",
        "sha512:" + "a" * 128,
        "blake3:" + "a" * 64,
    ],
)
def test_bad_digests_are_refused_before_any_path(store: Store, digest: str) -> None:
    with pytest.raises(ValueError):
        store.new_writer(digest)
    with pytest.raises(ValueError):
        store.put_bytes(digest, b"")
    with pytest.raises(ValueError):
        store.delete(digest)
    with pytest.raises(ValueError):
        store.set_tag("docker.io", "library/x", "latest", digest, 1.0)
    assert store.lookup(digest) is None
    assert files_under(store.data_dir / "tmp") == []


def test_unknown_algorithm_is_named() -> None:
    with pytest.raises(ValueError, match="sha512"):
        store_mod.parse_digest("sha512:" + "a" * 128)


def test_tags_round_trip_and_survive_reopen(tmp_path: Path) -> None:
    d1, d2 = sha(b"1"), sha(b"2")
    s = Store.open(tmp_path / "data")
    assert s.get_tag("docker.io", "library/alpine", "3.20") is None
    s.set_tag("docker.io", "library/alpine", "3.20", d1, 100.0)
    s.set_tag("ghcr.io", "library/alpine", "3.20", d2, 100.0)
    assert s.get_tag("docker.io", "library/alpine", "3.20") == d1
    s.set_tag("docker.io", "library/alpine", "3.20", d2, 200.0)  # the tag moved
    s.close()
    s = Store.open(tmp_path / "data")
    assert s.get_tag("docker.io", "library/alpine", "3.20") == d2
    assert s.get_tag("ghcr.io", "library/alpine", "3.20") == d2
    assert s.get_tag("docker.io", "library/alpine", "latest") is None
    s.close()


def test_touch_is_batched_until_flush_and_persists(tmp_path: Path) -> None:
    s = Store.open(tmp_path / "data", clock=lambda: 1000.0)
    data = b"layer"
    s.put_bytes(sha(data), data)
    assert s.last_access(sha(data)) == 1000.0
    s.touch(sha(data), 2000.0)
    s.touch(sha(data), 3000.0)
    s.touch(sha(b"not stored"), 3000.0)  # ignored, not an error
    db_path = tmp_path / "data" / "index.db"
    from sqlite_utils import Database

    def on_disk() -> float:
        other = Database(db_path)
        try:
            return other["blobs"].get(sha(data))["last_access"]
        finally:
            other.close()

    assert on_disk() == 1000.0  # touch did not write
    s.flush_access()
    assert on_disk() == 3000.0
    s.touch(sha(data), 2500.0)  # an older time never moves last_access back
    s.flush_access()
    assert on_disk() == 3000.0
    s.touch(sha(data), 4000.0)
    s.close()  # close flushes what is pending
    s = Store.open(tmp_path / "data")
    assert s.last_access(sha(data)) == 4000.0
    s.close()


def test_entries_total_bytes_and_delete(store: Store) -> None:
    blobs = [os.urandom(n) for n in (0, 1, 4096, 100_000)]
    for b in blobs:
        store.put_bytes(sha(b), b, source="upstream:docker.io")
    assert store.total_bytes() == sum(map(len, blobs))
    assert sorted(e.digest for e in store.entries()) == sorted(sha(b) for b in blobs)
    assert all(e.path.stat().st_size == e.size for e in store.entries())
    store.delete(sha(blobs[3]))
    store.delete(sha(blobs[3]))  # already gone: no error
    assert store.lookup(sha(blobs[3])) is None
    assert store.total_bytes() == sum(map(len, blobs[:3]))
    assert len(store) == 3
    assert len(files_under(store.data_dir / "blobs")) == 3


def test_a_second_open_of_the_same_dir_is_refused(store: Store) -> None:
    with pytest.raises(StoreLocked):
        Store.open(store.data_dir)


def test_concurrent_threads(store: Store) -> None:
    blobs = [os.urandom(5000 + i) for i in range(40)]
    errors: list[BaseException] = []

    def work(chunk: list[bytes]) -> None:
        try:
            for b in chunk:
                w = store.new_writer(sha(b))
                w.write(b)
                w.commit()
                store.touch(sha(b), 5.0)
                store.flush_access()
                store.set_tag("ns", "name", str(len(b)), sha(b), 1.0)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(blobs[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(store.entries()) == 40
    assert store.total_bytes() == sum(map(len, blobs))


# ---- a full disk -------------------------------------------------------------------------


def test_enospc_on_write_is_clear_and_leaves_nothing(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Injected: works without root. The test below does it on a real full tmpfs."""
    data = os.urandom(100_000)
    w = store.new_writer(sha(data))
    w.write(data[:50_000])
    real_pwrite = os.pwrite

    def full_write(fd: int, b: bytes, offset: int) -> int:
        if fd == w._fd:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_pwrite(fd, b, offset)

    monkeypatch.setattr(store_mod.os, "pwrite", full_write)
    with pytest.raises(StoreFull, match="disk full") as info:
        w.write(data[50_000:])
    assert info.value.errno == errno.ENOSPC
    assert not w.path.exists()
    assert files_under(store.data_dir / "tmp") == []
    assert files_under(store.data_dir / "blobs") == []
    assert store.lookup(sha(data)) is None


def test_no_write_call_hands_the_kernel_2_mib(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pieces from peers (write_at, in any order) and streams (write_chunks, in chunks of
    any size) reach the file in calls under 2 MiB: one that covers an aligned 2 MiB gets
    a 2 MiB folio, which cost this machine 25x the CPU per byte (see store._MAX_WRITE)."""
    piece = 2 * 1024 * 1024
    data = os.urandom(3 * piece)
    sizes: list[int] = []
    real_pwrite, real_pwritev = os.pwrite, os.pwritev

    def pwrite(fd: int, b, offset: int) -> int:
        sizes.append(len(b))
        return real_pwrite(fd, b, offset)

    def pwritev(fd: int, bufs, offset: int) -> int:
        sizes.append(sum(map(len, bufs)))
        return real_pwritev(fd, bufs, offset)

    def unused(*args: object) -> int:
        raise AssertionError("the store writes at an offset, never at the fd's")

    monkeypatch.setattr(store_mod.os, "pwrite", pwrite)
    monkeypatch.setattr(store_mod.os, "pwritev", pwritev)
    monkeypatch.setattr(store_mod.os, "write", unused)
    monkeypatch.setattr(store_mod.os, "writev", unused)
    w = store.new_writer(sha(data))
    w.write_at(2 * piece, data[2 * piece :])  # the last piece first, as a swarm may
    w.write_at(0, data[: 2 * piece])
    w.advance(len(data))
    w.commit()
    assert sizes and max(sizes) <= 1 << 20
    streamed = os.urandom(5 * piece)
    sizes.clear()
    w = store.new_writer(sha(streamed))
    w.write_chunks([streamed[:piece], streamed[piece : 4 * piece], streamed[4 * piece :]])
    w.commit()
    assert sizes and max(sizes) < 2 * piece
    assert store.lookup(sha(data)) is not None and store.lookup(sha(streamed)) is not None


def test_pieces_that_extend_the_prefix_append_after_ones_put_further_on(store: Store) -> None:
    """A cell taking pieces from peers appends (and hashes from memory) each piece that
    extends the hashed prefix, and puts the others where they belong to hash them once
    the prefix reaches them: the appends land at the prefix's end, not after the
    pieces put further on, and the blob commits with its digest."""
    piece = MiB
    data = os.urandom(5 * piece + 7)
    w = store.new_writer(sha(data))
    w.write_at(3 * piece, data[3 * piece : 4 * piece])  # arrived early: put, not hashed
    w.write_chunks([data[:piece]])  # the prefix's next: appended, hashed
    w.write_chunks([data[piece : 2 * piece]])
    assert w.written == 2 * piece
    w.write_at(4 * piece, data[4 * piece :])
    w.write_chunks([data[2 * piece : 3 * piece]])
    w.advance(len(data) - 3 * piece)  # the ones put before, read back
    assert w.matches()
    entry = w.commit()
    assert entry.path.read_bytes() == data


def test_a_blob_from_peers_keeps_the_table_its_pieces_were_checked_against(
    store: Store,
) -> None:
    """A blob written piece by piece (write_at) keeps the table it came with, so the
    cell serves it to other peers without hashing the file again; only a complete
    table of the blob's size, and only once the digest matched."""
    data = os.urandom(3 * MiB + 5)
    table = PieceTable.from_bytes(data)

    def pieced(blob: bytes, given: PieceTable | None, digest: str | None = None) -> BlobWriter:
        w = store.new_writer(digest or sha(blob))
        w.write_at(0, blob)
        w.advance(len(blob))
        w.table = given
        return w

    pieced(data, table).commit()
    assert store.piece_table(sha(data)) == table

    other = os.urandom(2 * MiB)
    whole = PieceTable.from_bytes(other)
    partial = PieceTable(whole.blob_size, whole.piece_size, (None, *whole.hashes[1:]))
    pieced(other, partial).commit()  # not complete: hashed on a peer's first ask instead
    assert store.lookup(sha(other)) is not None and store.piece_table(sha(other)) is None

    claimed = sha(b"other bytes")
    with pytest.raises(DigestMismatch):
        pieced(data, table, claimed).commit()
    assert store.piece_table(claimed) is None


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs, when this process may mount one (root); skipped otherwise."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "celld-test", str(mnt)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_real_full_disk(tiny_disk: Path) -> None:
    s = Store.open(tiny_disk / "data")
    small = os.urandom(100_000)
    s.put_bytes(sha(small), small)
    big = os.urandom(2_000_000)
    w = s.new_writer(sha(big))
    with pytest.raises(StoreFull) as info:
        for i in range(0, len(big), 65536):
            w.write(big[i : i + 65536])
    assert info.value.errno == errno.ENOSPC
    assert files_under(tiny_disk / "data" / "tmp") == []
    assert s.lookup(sha(big)) is None
    assert [e.digest for e in s.entries()] == [sha(small)]
    # The space came back: the next blob that fits is stored.
    other = os.urandom(200_000)
    assert s.put_bytes(sha(other), other).path.read_bytes() == other
    s.close()
    s = Store.open(tiny_disk / "data")
    assert sorted(e.digest for e in s.entries()) == sorted([sha(small), sha(other)])
    s.close()


def test_the_daemon_does_not_load_numpy(tmp_path: Path) -> None:
    """sqlite-utils imports numpy whenever it is installed (it is here, for the
    simulator's plots): 16 MiB of a daemon's memory and a thread for nothing. A real
    `celld serve` has no numpy mapped, and a process that imported celld.store can
    still import numpy itself."""
    cell = Celld(tmp_path / "cell", upstreams={"docker.io": "http://127.0.0.1:9"}).start()
    try:
        maps = Path(f"/proc/{cell.proc.pid}/maps").read_text()
    finally:
        cell.stop()
    assert "numpy" not in maps and "openblas" not in maps
    code = (
        "import sys, celld.store, sqlite_utils.db as db; "
        "assert 'numpy' not in sys.modules and db.np is None; "
        "import numpy; print(numpy.__name__)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "numpy", done.stderr
