"""kill -9 at any moment, then open: the store must be whole.

A real child process (tests/support/store_crasher.py) works the store until it is SIGKILLed,
at random moments and at the exact crash windows of a commit and a delete. After each kill,
Store.open must leave tmp/ empty, every indexed blob's file present with the right sha256 and
size, every file under blobs/ indexed, and everything the child had acknowledged (a commit
that returned, a delete that returned, a tag that was set) still true.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlite_utils

from celld.store import BlobEntry, Store

REPO = Path(__file__).resolve().parent.parent


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def spawn(data_dir: Path, log: Path, seed: int, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.support.store_crasher",
            str(data_dir),
            str(log),
            str(seed),
            *extra,
        ],
        cwd=REPO,
        stderr=subprocess.PIPE,
    )


def wait_for_line(log: Path, word: str, proc: subprocess.Popen[bytes], count: int) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if log.exists() and log.read_text().split().count(word) >= count:
            return
        if proc.poll() is not None:
            raise AssertionError(f"crasher exited {proc.returncode}: {proc.stderr.read()!r}")
        time.sleep(0.005)
    raise AssertionError(f"crasher never logged {word!r}")


def kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    err = proc.stderr.read().decode(errors="replace")
    assert proc.returncode == -signal.SIGKILL, f"crasher died by itself: {err}"


def audit(data_dir: Path) -> Store:
    """Open the store and check that files, index and memory agree exactly."""
    store = Store.open(data_dir)
    assert list((data_dir / "tmp").iterdir()) == [], "tmp/ not emptied"

    entries = {e.digest: e for e in store.entries()}
    for e in entries.values():
        h = hashlib.sha256(e.path.read_bytes()).hexdigest()
        assert "sha256:" + h == e.digest, f"indexed file {e.path} has the wrong bytes"
        assert e.path.stat().st_size == e.size
    on_disk = {p for p in (data_dir / "blobs").rglob("*") if not p.is_dir()}
    assert on_disk == {e.path for e in entries.values()}, "blobs/ and the index disagree"
    assert store.total_bytes() == sum(e.size for e in entries.values())

    # The index a later process would read says the same as the memory map.
    ro = sqlite3.connect(f"file:{data_dir / 'index.db'}?mode=ro", uri=True)
    try:
        rows = {
            r["digest"]: BlobEntry(
                r["digest"], r["size"], entries[r["digest"]].path, r["media_type"], r["source"]
            )
            for r in sqlite_utils.Database(ro)["blobs"].rows
            if r["digest"] in entries
        }
        count = ro.execute("select count(*) from blobs").fetchone()[0]
    finally:
        ro.close()
    assert count == len(entries)
    assert rows == entries
    return store


def check_acknowledged(store: Store, log: Path) -> int:
    """What the child saw return before it died is still true. Returns commits seen."""
    last: dict[str, str] = {}
    tags: dict[str, tuple[str | None, set[str]]] = {}  # tag -> (acknowledged, in flight)
    commits = 0
    for line in log.read_text().splitlines():
        word, *args = line.split()
        if word in ("begin", "committed", "deleting", "deleted", "mismatch", "aborted"):
            last[args[0]] = word
            commits += word == "committed"
        elif word == "tagging":
            acked, _ = tags.get(args[0], (None, set()))
            tags[args[0]] = (acked, {args[1]})
        elif word == "tagged":
            tags[args[0]] = (args[1], set())
    for digest, word in last.items():
        present = store.lookup(digest) is not None
        if word == "committed":
            assert present, f"acknowledged commit of {digest} lost"
        elif word in ("deleted", "mismatch", "aborted"):
            assert not present, f"{digest} present after {word}"
    for tag, (acked, in_flight) in tags.items():
        assert store.get_tag("docker.io", "library/crash", tag) in {acked} | in_flight
    return commits


def test_random_kills(tmp_path: Path) -> None:
    """A dozen seeds on one data_dir: each round recovers what the previous kill left."""
    data_dir, log = tmp_path / "data", tmp_path / "log"
    log.touch()
    started = time.monotonic()
    for seed in range(12):
        rng = random.Random(seed)
        # Every fourth round begins with an 8 MiB layer in 64 KiB chunks (the kill often lands
        # in it); odd rounds delete often, so kills also land in deletes.
        flags = ["--large-first"] if seed % 4 == 1 else []
        flags += ["--deletes"] if seed % 2 else []
        proc = spawn(data_dir, log, seed, *flags)
        if seed % 4 == 3:
            # Now and then kill it early: in its imports, or while open() repairs the store.
            time.sleep(rng.uniform(0.0, 0.4))
        else:
            # Kill after a random amount of work, then a random fraction of a step, so that the
            # test means the same on a fast machine and on a loaded CI runner.
            text = log.read_text().split()
            wait_for_line(log, "open", proc, count=text.count("open") + 1)
            more = rng.randrange(0, 25)
            wait_for_line(log, "committed", proc, count=text.count("committed") + more)
            time.sleep(rng.uniform(0.0, 0.1))
        kill(proc)
        store = audit(data_dir)
        try:
            check_acknowledged(store, log)
        finally:
            store.close()
    assert time.monotonic() - started < 40
    # The rounds did real work, large blobs included, or they proved nothing.
    text = log.read_text()
    assert text.count("committed") > 50  # ~90 awaited commits across the rounds
    assert text.count("deleted") > 0
    assert f" {8 << 20}\n" in text  # at least one large layer was written in chunks


@pytest.mark.parametrize(
    ("point", "after", "expect_present"),
    [
        ("before-rename", 3, False),  # complete temp file: swept, nothing visible
        ("after-rename", 3, True),  # file in place, no row: re-hashed, indexed
        ("mid-delete", 1, False),  # file gone, row left: row dropped
    ],
)
def test_kill_in_the_crash_windows(
    tmp_path: Path, point: str, after: int, expect_present: bool
) -> None:
    data_dir, log = tmp_path / "data", tmp_path / "log"
    proc = spawn(data_dir, log, 7, "--crash-at", point, "--after", str(after))
    try:
        proc.wait(timeout=30)
    finally:
        kill(proc)
    word, digest, *_ = log.read_text().splitlines()[-1].split()
    assert word == ("deleting" if point == "mid-delete" else "begin")
    hex_ = digest.removeprefix("sha256:")
    final = data_dir / "blobs" / "sha256" / hex_[:2] / hex_
    # The dead process left exactly the state this window is about.
    if point == "before-rename":
        assert [p.name.split(".")[0] for p in (data_dir / "tmp").iterdir()] == [hex_]
        assert not final.exists()
    elif point == "after-rename":
        assert final.exists()
    store = audit(data_dir)
    try:
        assert (store.lookup(digest) is not None) == expect_present
        check_acknowledged(store, log)
        if point == "after-rename":
            assert store.recovery.files_indexed == 1
        if point == "mid-delete":
            assert store.recovery.rows_dropped == 1
    finally:
        store.close()


def test_kill_during_a_large_download(tmp_path: Path) -> None:
    """Half of an 8 MiB layer in tmp/ at the kill; after open: no trace of it anywhere."""
    data_dir, log = tmp_path / "data", tmp_path / "log"
    proc = spawn(data_dir, log, 1, "--large-first", "--crash-at", "mid-write", "--after", "64")
    try:
        proc.wait(timeout=30)
    finally:
        kill(proc)
    word, digest, size = log.read_text().splitlines()[-1].split()
    assert (word, size) == ("begin", str(8 << 20))
    [partial] = (data_dir / "tmp").iterdir()
    assert partial.stat().st_size == 64 * 65536
    assert not any(p.is_file() for p in (data_dir / "blobs").rglob("*"))
    store = audit(data_dir)
    try:
        assert store.lookup(digest) is None
        assert store.recovery.tmp_removed == 1
        assert store.entries() == []
    finally:
        store.close()


# ---- crash leftovers built by hand -------------------------------------------------------


@pytest.fixture
def seeded(tmp_path: Path) -> Iterator[tuple[Path, list[bytes]]]:
    blobs = [os.urandom(n) for n in (10, 2000, 70_000)]
    s = Store.open(tmp_path / "data")
    for b in blobs:
        s.put_bytes(sha(b), b, media_type="m", source="s")
    s.close()
    yield tmp_path / "data", blobs


def blob_file(data_dir: Path, data: bytes) -> Path:
    hex_ = hashlib.sha256(data).hexdigest()
    return data_dir / "blobs" / "sha256" / hex_[:2] / hex_


def test_file_without_row_is_indexed_if_its_hash_matches(
    seeded: tuple[Path, list[bytes]],
) -> None:
    data_dir, blobs = seeded
    orphan = os.urandom(5000)
    p = blob_file(data_dir, orphan)
    p.parent.mkdir(exist_ok=True)
    p.write_bytes(orphan)
    liar = blob_file(data_dir, b"what the name promises")
    liar.parent.mkdir(exist_ok=True)
    liar.write_bytes(b"other bytes")
    store = audit(data_dir)
    try:
        assert store.lookup(sha(orphan)) == BlobEntry(sha(orphan), 5000, p, None, None)
        assert store.lookup(sha(b"what the name promises")) is None
        assert not liar.exists()
        assert all(store.lookup(sha(b)) is not None for b in blobs)
        assert store.recovery.files_indexed == 1
        assert store.recovery.files_removed == 1
    finally:
        store.close()


def test_row_without_file_is_dropped(seeded: tuple[Path, list[bytes]]) -> None:
    data_dir, blobs = seeded
    blob_file(data_dir, blobs[1]).unlink()
    store = audit(data_dir)
    try:
        assert store.lookup(sha(blobs[1])) is None
        assert store.lookup(sha(blobs[0])) is not None
        assert store.recovery.rows_dropped == 1
    finally:
        store.close()


def test_corrupt_and_truncated_files_are_caught_by_size(seeded: tuple[Path, list[bytes]]) -> None:
    data_dir, blobs = seeded
    blob_file(data_dir, blobs[2]).write_bytes(blobs[2][:-1])  # truncated
    with open(blob_file(data_dir, blobs[1]), "ab") as f:  # grown
        f.write(b"!")
    store = audit(data_dir)
    try:
        assert store.lookup(sha(blobs[2])) is None
        assert store.lookup(sha(blobs[1])) is None
        assert store.lookup(sha(blobs[0])) is not None
    finally:
        store.close()


def test_row_with_a_wrong_size_is_repaired_from_the_file(
    seeded: tuple[Path, list[bytes]],
) -> None:
    data_dir, blobs = seeded
    db = sqlite_utils.Database(data_dir / "index.db")
    db.execute("update blobs set size = 1 where digest = ?", [sha(blobs[2])])
    db.conn.commit()
    db.close()
    store = audit(data_dir)
    try:
        entry = store.lookup(sha(blobs[2]))
        assert entry is not None
        assert entry.size == len(blobs[2])
        assert entry.media_type == "m"
        assert store.recovery.rows_repaired == 1
    finally:
        store.close()


def test_garbage_under_blobs_and_tmp_is_removed(
    seeded: tuple[Path, list[bytes]], tmp_path: Path
) -> None:
    data_dir, blobs = seeded
    shard = data_dir / "blobs" / "sha256"
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "keep").write_text("must survive")
    hex0 = hashlib.sha256(blobs[0]).hexdigest()
    wrong_shard = shard / ("00" if hex0[:2] != "00" else "01")
    wrong_shard.mkdir(exist_ok=True)
    (wrong_shard / hex0).write_bytes(blobs[0])  # right bytes, wrong directory
    (shard / hex0[:2] / (hex0 + ".part")).write_bytes(b"x")
    (shard / hex0[:2] / hex0.upper()).write_bytes(blobs[0])
    (shard / "zz").mkdir()
    (shard / "zz" / "x").write_bytes(b"x")
    (shard / "stray-file").write_bytes(b"x")
    (data_dir / "blobs" / "sha512").mkdir()
    (shard / "ab").mkdir(exist_ok=True)
    (shard / "ab" / ("ab" + "0" * 62)).symlink_to(outside / "keep")
    # A shard directory that is a symlink: named so no seeded blob lives there.
    taken = {hashlib.sha256(b).hexdigest()[:2] for b in blobs} | {"00", "01", "ab"}
    (shard / next(f"{i:02x}" for i in range(256) if f"{i:02x}" not in taken)).symlink_to(outside)
    (data_dir / "tmp" / "half.part").write_bytes(b"half a layer")
    (data_dir / "tmp" / "somedir").mkdir()
    (data_dir / "tmp" / "somedir" / "f").write_bytes(b"x")
    (data_dir / "tmp" / "link").symlink_to(outside)

    store = audit(data_dir)
    try:
        assert sorted(e.digest for e in store.entries()) == sorted(sha(b) for b in blobs)
        assert (outside / "keep").read_text() == "must survive"
        assert store.recovery.tmp_removed == 3
    finally:
        store.close()


def test_an_unreadable_index_is_rebuilt_from_the_files(seeded: tuple[Path, list[bytes]]) -> None:
    data_dir, blobs = seeded
    (data_dir / "index.db").write_bytes(b"this is not an SQLite database" * 100)
    store = audit(data_dir)
    try:
        assert store.recovery.index_rebuilt
        assert sorted(e.digest for e in store.entries()) == sorted(sha(b) for b in blobs)
        assert (data_dir / "index.db.corrupt").exists()
    finally:
        store.close()
