"""The cell's local layer store: content-addressed blob files plus an SQLite index.

Owns everything under ``data_dir`` that holds bytes of images: ``blobs/sha256/<hex[:2]>/<hex>``
(verified blobs only), ``tmp/`` (downloads in progress) and ``index.db`` (an sqlite-utils
database in WAL mode with blob metadata, tag memory and, later, pins). It never touches the
network, never parses manifests, and never lets an unverified byte appear under ``blobs/``.

Theory of operation
-------------------
The files are the truth; the index is a cache of facts about them that is repaired at open.

A blob is born in ``tmp/`` as a :class:`BlobWriter`. Bytes are appended with raw ``os.pwrite``
(no user-space buffer, so a reader that opened ``writer.path`` sees them at once: this is how
the daemon streams a download to every waiter) and hashed incrementally. ``commit`` checks the
sha256 against the digest the blob was asked for; on a mismatch the temp file is deleted and
:class:`DigestMismatch` is raised. On a match the file is fsynced, renamed to its final name,
its directory is fsynced, and only then is a row inserted in the index and the entry published
in the in-memory map. So the states a crash can leave are, in order:

1. a file in ``tmp/``               -> deleted at the next open;
2. a file in ``blobs/`` and no row  -> re-hashed at open: indexed if the hash matches its name,
                                       deleted otherwise;
3. a file and a row                 -> the normal state.

``delete`` runs the same way backwards (forget in memory, unlink, drop the row), so a crash in
the middle leaves a row without a file, which open drops. After :meth:`Store.open` the index and
the files agree exactly, whatever moment the previous process died at.

The mirror's hit path must not wait for SQLite: :meth:`Store.lookup` and :meth:`Store.blob_path`
read an in-memory dict filled at open and updated after each commit/delete. Access times go to a
second dict (:meth:`Store.touch`) and reach the index in one transaction when the daemon calls
:meth:`Store.flush_access` from a worker thread.

Every method is synchronous and thread-safe: one sqlite3 connection behind one lock. The trio
daemon calls the slow ones (``commit``, ``put_bytes``, ``write`` with large chunks,
``flush_access``, tags, ``delete``) through ``trio.to_thread.run_sync``. One process owns a
data_dir at a time (an ``flock`` on ``data_dir/lock``), because open empties ``tmp/``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import itertools
import os
import re
import shutil
import sqlite3
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from protocol.pieces import PieceHasher, PieceTable

# sqlite-utils imports numpy and pandas whenever it can, to map their types to columns.
# Where numpy is installed (the venv of the tests and benches has it, for the
# simulator's plots), that cost a daemon 16 MiB of its ~60 MiB, 0.12 s of start-up and
# an OpenBLAS thread, for types the store never writes. So sqlite-utils is imported
# with them hidden (an import of a module set to None fails, and sqlite-utils goes
# without), and they stay importable for anything else in the process.
_HIDDEN = [name for name in ("numpy", "pandas") if name not in sys.modules]
sys.modules.update(dict.fromkeys(_HIDDEN))
try:
    import sqlite_utils
finally:
    for _name in _HIDDEN:
        del sys.modules[_name]

_DIGEST_RE = re.compile(r"sha256:([0-9a-f]{64})")
_ALGO_RE = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*")
_HEX_RE = re.compile(r"[0-9a-f]{64}")
_SHARD_RE = re.compile(r"[0-9a-f]{2}")
_HASH_CHUNK = 1 << 20
_IOV_MAX = 1024  # Linux's limit on one writev's buffers
_WRITE_GROUP = 1 << 20  # bytes hashed and written while in the CPU's cache
# Every write call stays under 2 MiB (write_at's are at most this; write_chunks' groups
# end once they pass _WRITE_GROUP). A write that covers an aligned 2 MiB lets the
# kernel (6.x, large folios) back it with one 2 MiB folio, a whole free pageblock: on a
# VM whose host takes back free memory (this project's machine), its first touch cost
# 4.8-5.6 CPU-s per GiB written, against 0.18-0.21 for writes of 1 MiB. A 2 MiB piece
# from a peer in one pwrite made a cell's peer intake 3x the CPU of its registry intake.
_MAX_WRITE = 1 << 20
_SCHEMA_VERSION = 1
_UNREADABLE_DB = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


@dataclass(frozen=True)
class BlobEntry:
    """A verified blob in the store: what the mirror needs to serve it without I/O."""

    digest: str  # "sha256:<hex>"
    size: int
    path: Path
    media_type: str | None  # set for manifests (the daemon stores manifests as blobs too)
    source: str | None  # "upstream:docker.io", "registry:<url>", "peer:<cell>"


@dataclass(frozen=True)
class Pin:
    """An app pinned to one image digest by staging."""

    app: str
    image: str  # as staged: "docker.io/acme/shop:2.1"
    ns: str
    name: str
    digest: str  # the manifest digest runtimes pull
    size: int  # manifest + config + layers
    staged_at: float
    private: bool


class DigestMismatch(Exception):
    """Bytes did not hash to the digest they were fetched for; nothing was stored."""

    def __init__(self, expected: str, actual: str) -> None:
        super().__init__(f"digest mismatch: expected {expected}, got {actual}")
        self.expected = expected
        self.actual = actual


class StoreFull(OSError):
    """The disk under data_dir ran out of space; the blob being written was dropped."""


class StoreLocked(RuntimeError):
    """Another process (or another Store in this one) already has this data_dir open."""


def parse_digest(digest: str) -> str:
    """The hex part of a ``sha256:<64 lowercase hex>`` digest, or ValueError.

    This runs before any path is built from a digest, so nothing but 64 hex characters can
    ever reach the file system (no traversal, no separators, no NUL).
    """
    if not isinstance(digest, str):
        raise ValueError(f"digest must be a string, not {type(digest).__name__}")
    m = _DIGEST_RE.fullmatch(digest)
    if m is not None:
        return m.group(1)
    algo, sep, _ = digest.partition(":")
    if sep and _ALGO_RE.fullmatch(algo) and algo != "sha256":
        raise ValueError(f"unsupported digest algorithm {algo!r}: the store keeps sha256 only")
    raise ValueError(f"invalid digest {digest[:80]!r}: want 'sha256:' + 64 lowercase hex")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256_file(path: Path) -> tuple[str, int]:
    """(hex digest, size) of a file, read without following symlinks."""
    h = hashlib.sha256()
    size = 0
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb", buffering=0) as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _remove_any(path: Path) -> None:
    """Remove a file, symlink or directory tree without following symlinks."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _full_disk(exc: OSError, what: str) -> OSError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreFull(exc.errno, f"store disk full while {what}: {os.strerror(exc.errno)}")
    return exc


class BlobWriter:
    """One download in progress: a temp file that grows, hashed as it grows.

    Other tasks may open ``path`` and read it while it grows (bytes reach the kernel on every
    ``write``). After ``commit`` the file has moved under ``blobs/`` (open descriptors keep
    working); after ``abort`` or a failed commit it is gone. Use it as a context manager to
    abort on any exception. One writer belongs to one task: its methods are not meant to be
    called from two threads at once (waiters only read ``path`` up to ``written``).
    """

    def __init__(
        self,
        store: Store,
        digest: str,
        hex_: str,
        path: Path,
        fd: int,
        media_type: str | None,
        source: str | None,
    ) -> None:
        self._store = store
        self.digest = digest
        self._hex = hex_
        self.path = path
        self._fd: int | None = fd
        self._hash = hashlib.sha256()
        self.media_type = media_type
        self.source = source
        self.private_scope: str | None = None
        self.written = 0
        # blake3 per piece, once the blob's size is known (`expect`): the table a
        # cell serves to peers, built from the same pass over the bytes as sha256.
        self.pieces: PieceHasher | None = None
        # Or, for pieces from peers (written with `write_at`), the table each was
        # checked against: kept beside the blob if its digest matches, so the cell
        # serves it without hashing the whole file again on a peer's first ask.
        self.table: PieceTable | None = None

    def expect(self, size: int) -> PieceHasher:
        """The blob will be `size` bytes: hash its pieces as they are written."""
        if self.written or self.pieces is not None:
            raise ValueError(f"writer for {self.digest} already started")
        self.pieces = PieceHasher(size)
        return self.pieces

    @property
    def closed(self) -> bool:
        return self._fd is None

    def write(self, data: bytes) -> None:
        """Append ``data`` and hash it. On a full disk: abort, then raise :class:`StoreFull`."""
        self.write_chunks([data])

    def write_chunks(self, chunks: list[bytes], *, sha256: bool = True) -> None:
        """Hash, then append, ``chunks`` in order. Large chunks release the GIL
        while hashed and written, so a worker thread runs this.

        The bytes go through in groups of about _WRITE_GROUP, each hashed (sha256,
        blake3 per piece) and written while it is still in the CPU's cache: a
        pass each over a whole 8 MiB batch would read it from memory every time.
        ``sha256=False``: the caller runs :meth:`hash_chunks` on the same chunks
        in another thread at the same time (the two touch disjoint state); the
        blob's pieces are still hashed before they are written."""
        fd = self._require_open()
        group: list[memoryview] = []
        grouped = 0
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                for start in range(0, len(view), _WRITE_GROUP):
                    part = view[start : start + _WRITE_GROUP]
                    if sha256:
                        self._hash.update(part)
                    if self.pieces is not None:
                        self.pieces.feed(part)
                    group.append(part)
                    grouped += len(part)
                    if grouped >= _WRITE_GROUP:
                        self._writev(fd, group)
                        group, grouped = [], 0
            self._writev(fd, group)
        except OSError as exc:
            self.abort()
            raise _full_disk(exc, f"writing {self.digest}") from exc

    def hash_chunks(self, chunks: list[bytes]) -> None:
        """The sha256 half of ``write_chunks(chunks, sha256=False)``."""
        for chunk in chunks:
            self._hash.update(chunk)

    def _writev(self, fd: int, views: list[memoryview]) -> None:
        while views:
            at = self.written  # not the fd's offset: `write_at` may have put later pieces
            if len(views) == 1:
                n = os.pwrite(fd, views[0], at)
            else:
                n = os.pwritev(fd, views[:_IOV_MAX], at)
            self.written += n
            while views and n >= len(views[0]):
                n -= len(views.pop(0))
            if n:
                views[0] = views[0][n:]

    def write_at(self, offset: int, data: bytes) -> None:
        """Put ``data`` at ``offset``, unhashed: pieces from peers land in any order.
        ``advance`` hashes them once every byte before them is in. On a full disk:
        abort, then raise :class:`StoreFull`."""
        fd = self._require_open()
        view = memoryview(data)
        try:
            while view:
                n = os.pwrite(fd, view[:_MAX_WRITE], offset)
                view, offset = view[n:], offset + n
        except OSError as exc:
            self.abort()
            raise _full_disk(exc, f"writing {self.digest}") from exc

    def advance(self, n: int) -> None:
        """Hash the ``n`` bytes that ``write_at`` put right after the ``written`` ones,
        and count them written: readers may follow up to there."""
        fd = self._require_open()
        buf = memoryview(bytearray(min(n, _WRITE_GROUP)))  # one buffer, not one per MiB
        at, left = self.written, n
        while left:
            got = os.preadv(fd, [buf[: min(left, len(buf))]], at)
            if not got:
                raise ValueError(f"{self.digest}: {n} bytes to hash, {n - left} on disk")
            self._hash.update(buf[:got])
            at, left = at + got, left - got
        self.written += n

    def matches(self) -> bool:
        """Do the bytes written so far hash to the digest? (Cheap: the running hash
        is copied, not finished.) Lets verified bytes reach readers before the
        fsync and rename that ``commit`` still does."""
        return "sha256:" + self._hash.hexdigest() == self.digest

    def commit(self) -> BlobEntry:
        """Verify, fsync, rename into place, fsync the directory, index; return the entry.

        Raises :class:`DigestMismatch` (temp file deleted) when the bytes are not the digest.
        """
        fd = self._require_open()
        actual = "sha256:" + self._hash.hexdigest()
        if actual != self.digest:
            self.abort()
            raise DigestMismatch(self.digest, actual)
        try:
            os.fsync(fd)
        except OSError as exc:
            self.abort()
            raise _full_disk(exc, f"flushing {self.digest}") from exc
        self._fd = None
        try:
            os.close(fd)
            entry = self._store._publish(self._hex, self.path, self.written, self)
            table = self.table
            if self.pieces is not None and self.pieces.blob_size == self.written:
                table = self.pieces.finish()
            if table is not None and table.complete and table.blob_size == self.written:
                self._store._tables[self.digest] = table
            return entry
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            raise

    def abort(self) -> None:
        """Close and delete the temp file. Idempotent; a no-op after a successful commit."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def _require_open(self) -> int:
        if self._fd is None:
            raise ValueError(f"writer for {self.digest} is already committed or aborted")
        return self._fd

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.abort()

    def __del__(self) -> None:
        # A writer dropped without commit/abort must not leak its descriptor; the file itself
        # is swept at the next open if the process dies first.
        with contextlib.suppress(Exception):
            self.abort()


@dataclass(frozen=True)
class RecoveryReport:
    """What :meth:`Store.open` repaired, for logs and tests."""

    tmp_removed: int = 0
    rows_dropped: int = 0  # row whose file was missing, or the row was garbage
    files_indexed: int = 0  # file without row whose hash matched its name
    files_removed: int = 0  # garbage, misnamed, corrupt or unverifiable files
    rows_repaired: int = 0  # size in the row disagreed with a file whose hash was right
    index_rebuilt: bool = False  # index.db was unreadable, set aside as index.db.corrupt


class Store:
    """The blob store of one data_dir. Open with :meth:`Store.open`."""

    def __init__(self, data_dir: Path, *, clock: Callable[[], float] = time.time) -> None:
        # Use Store.open(); __init__ only sets fields so open() can build in steps.
        self.data_dir = Path(data_dir)
        self.blobs_dir = self.data_dir / "blobs" / "sha256"
        self.tmp_dir = self.data_dir / "tmp"
        self._clock = clock
        self._lock = threading.Lock()  # the connection, the entry map and the files
        self._access_lock = threading.Lock()  # only the pending access times (held briefly)
        self._entries: dict[str, BlobEntry] = {}
        self._total = 0
        self._pending_access: dict[str, float] = {}
        self._pins: dict[str, Pin] = {}
        self._pinned: dict[str, set[str]] = {}  # digest -> apps whose pin needs it
        self._private: dict[str, frozenset[str]] = {}  # digest -> app scopes
        self._in_use: collections.Counter[str] = collections.Counter()
        self._tables: dict[str, PieceTable] = {}  # digest -> its pieces' blake3 (a cache)
        self.max_bytes: int | None = None
        self._seq = itertools.count()
        self._lock_fd: int | None = None
        self._conn: sqlite3.Connection | None = None
        self._db: sqlite_utils.Database | None = None
        self.recovery = RecoveryReport()

    # ---- opening and recovery -------------------------------------------------------------

    @classmethod
    def open(cls, data_dir: Path, *, clock: Callable[[], float] = time.time) -> Store:
        """Open (creating if needed) the store in ``data_dir`` and repair it after any crash."""
        store = cls(data_dir, clock=clock)
        # Private layers (issue 3) live here too: only the daemon's user may read the store.
        store.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        store._take_lock()
        try:
            store.blobs_dir.parent.mkdir(mode=0o700, exist_ok=True)
            store.blobs_dir.mkdir(mode=0o700, exist_ok=True)
            store.tmp_dir.mkdir(mode=0o700, exist_ok=True)
            try:
                store._open_db()
                store._recover()
            except sqlite3.DatabaseError as exc:
                # The files are the truth: an index SQLite cannot read is set aside and
                # rebuilt from them (blobs are re-hashed; tags and access times are lost).
                if getattr(exc, "sqlite_errorcode", None) not in _UNREADABLE_DB:
                    raise
                store._set_aside_index()
                store._open_db()
                store._recover()
                store.recovery = dataclasses.replace(store.recovery, index_rebuilt=True)
        except BaseException:
            store.close()
            raise
        return store

    def _take_lock(self) -> None:
        fd = os.open(self.data_dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreLocked(f"{self.data_dir} is already open by another store") from None
        self._lock_fd = fd

    def _set_aside_index(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = self._db = None
        index = self.data_dir / "index.db"
        os.replace(index, self.data_dir / "index.db.corrupt")
        for suffix in ("-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                (self.data_dir / f"index.db{suffix}").unlink()

    def _open_db(self) -> None:
        conn = sqlite3.connect(
            self.data_dir / "index.db", check_same_thread=False, isolation_level=None
        )
        self._conn = conn
        db = sqlite_utils.Database(conn)
        self._db = db
        db.enable_wal()
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=5000")
        # Each statement commits on its own: sqlite-utils 3.x commits inside create(), so
        # these must not run in a transaction of ours (all of them are idempotent).
        db["blobs"].create(
            {
                "digest": str,
                "size": int,
                "media_type": str,
                "source": str,
                "created_at": float,
                "last_access": float,
            },
            pk="digest",
            not_null={"size", "created_at", "last_access"},
            if_not_exists=True,
        )
        db["tags"].create(
            {"ns": str, "name": str, "tag": str, "digest": str, "updated_at": float},
            pk=("ns", "name", "tag"),
            not_null={"digest", "updated_at"},
            if_not_exists=True,
        )
        # An app pinned to one image digest, and every digest that image needs.
        db["pins"].create(
            {
                "app": str,
                "digest": str,
                "staged_at": float,
                "image": str,
                "ns": str,
                "name": str,
                "size": int,
                "private": int,
            },
            pk="app",
            not_null={"digest", "staged_at"},
            if_not_exists=True,
        )
        for column, kind in (
            ("image", str),
            ("ns", str),
            ("name", str),
            ("size", int),
            ("private", int),
        ):
            if column not in db["pins"].columns_dict:
                db["pins"].add_column(column, kind)
        db["pin_blobs"].create(
            {"app": str, "digest": str}, pk=("app", "digest"), if_not_exists=True
        )
        # Content fetched with an app's credentials: served only with its pull token.
        db["private"].create(
            {"digest": str, "scope": str}, pk=("digest", "scope"), if_not_exists=True
        )
        db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")

    def _recover(self) -> None:
        tmp_removed = 0
        for child in list(self.tmp_dir.iterdir()):
            _remove_any(child)
            tmp_removed += 1
        files, files_removed = self._scan_blob_files()
        rows_dropped = rows_repaired = files_indexed = 0
        entries: dict[str, BlobEntry] = {}
        db = self._db_()
        with self._lock, self._transaction():
            for row in list(db.query("select * from blobs")):
                digest = row["digest"]
                hex_ = _DIGEST_RE.fullmatch(digest) if isinstance(digest, str) else None
                size = files.pop(hex_.group(1), None) if hex_ else None
                if hex_ is None or size is None:
                    db.execute("delete from blobs where digest = ?", [digest])
                    rows_dropped += 1
                    continue
                path = self._final_path(hex_.group(1))
                if size != row["size"]:
                    if not self._verify_file(hex_.group(1), path):
                        _remove_any(path)
                        db.execute("delete from blobs where digest = ?", [digest])
                        files_removed += 1
                        continue
                    db.execute("update blobs set size = ? where digest = ?", [size, digest])
                    rows_repaired += 1
                entries[digest] = BlobEntry(digest, size, path, row["media_type"], row["source"])
            # Files with no row: the crash window between rename and index insert, or an
            # index that lost its last transactions on power loss.
            for hex_, size in sorted(files.items()):
                path = self._final_path(hex_)
                if not self._verify_file(hex_, path):
                    _remove_any(path)
                    files_removed += 1
                    continue
                mtime = path.stat().st_mtime
                digest = "sha256:" + hex_
                entry = BlobEntry(digest, size, path, None, None)
                self._index_insert(entry, mtime)
                entries[digest] = entry
                files_indexed += 1
            self._entries = entries
            self._total = sum(e.size for e in entries.values())
        self.recovery = RecoveryReport(
            tmp_removed, rows_dropped, files_indexed, files_removed, rows_repaired
        )
        self._load_pins_and_marks()

    def _load_pins_and_marks(self) -> None:
        db = self._db_()
        with self._lock:
            self._pins = {
                row["app"]: Pin(
                    app=row["app"],
                    image=row["image"] or "",
                    ns=row["ns"] or "",
                    name=row["name"] or "",
                    digest=row["digest"],
                    size=row["size"] or 0,
                    staged_at=row["staged_at"],
                    private=bool(row["private"]),
                )
                for row in db.query("select * from pins")
            }
            pinned: dict[str, set[str]] = {}
            for row in db.query("select app, digest from pin_blobs"):
                pinned.setdefault(row["digest"], set()).add(row["app"])
            self._pinned = pinned
            private: dict[str, set[str]] = {}
            for row in db.query("select digest, scope from private"):
                private.setdefault(row["digest"], set()).add(row["scope"])
            self._private = {d: frozenset(s) for d, s in private.items()}

    def _scan_blob_files(self) -> tuple[dict[str, int], int]:
        """{hex: size} of well-formed blob files; everything else under blobs/ is removed."""
        files: dict[str, int] = {}
        removed = 0
        root = self.blobs_dir.parent
        for child in list(root.iterdir()):
            if child.name != "sha256" or not child.is_dir() or child.is_symlink():
                _remove_any(child)
                removed += 1
        for shard in list(self.blobs_dir.iterdir()):
            if not _SHARD_RE.fullmatch(shard.name) or shard.is_symlink() or not shard.is_dir():
                _remove_any(shard)
                removed += 1
                continue
            for f in list(shard.iterdir()):
                st = f.lstat()
                if (
                    not _HEX_RE.fullmatch(f.name)
                    or f.name[:2] != shard.name
                    or not stat.S_ISREG(st.st_mode)
                ):
                    _remove_any(f)
                    removed += 1
                    continue
                files[f.name] = st.st_size
        return files, removed

    @staticmethod
    def _verify_file(hex_: str, path: Path) -> bool:
        try:
            actual, _ = _sha256_file(path)
        except OSError:
            return False
        return actual == hex_

    # ---- the hot path: memory only --------------------------------------------------------

    def lookup(self, digest: str) -> BlobEntry | None:
        """The entry of a stored, verified blob, or None. Memory only: safe on the event loop.

        A malformed digest is simply not stored (None); validate user input in protocol/.
        """
        return self._entries.get(digest)

    def blob_path(self, digest: str) -> Path | None:
        """The file of a stored blob (for sendfile), or None. Memory only."""
        entry = self._entries.get(digest)
        return entry.path if entry is not None else None

    def __contains__(self, digest: str) -> bool:
        return digest in self._entries

    def __len__(self) -> int:
        """How many blobs are stored (memory only, unlike ``len(entries())`` which sorts)."""
        return len(self._entries)

    def touch(self, digest: str, now: float) -> None:
        """Remember that ``digest`` was served at ``now``; reaches the index at flush_access."""
        if digest in self._entries:
            with self._access_lock:
                self._pending_access[digest] = now

    def total_bytes(self) -> int:
        return self._total

    def entries(self) -> list[BlobEntry]:
        """Every stored blob, sorted by digest."""
        # dict.copy() runs in C without releasing the GIL: a consistent snapshot without
        # waiting for the lock that a commit may hold during an fsync.
        return sorted(self._entries.copy().values(), key=lambda e: e.digest)

    def piece_table(self, digest: str) -> PieceTable | None:
        """The blake3 table of a stored blob's pieces, kept from the fetch that wrote it
        (what the peer API serves); None when it is not known (not stored, or stored
        before this process started: the peer API then hashes the file, checking the
        blob's digest in the same pass, see celld.peer)."""
        if digest not in self._entries:
            return None
        return self._tables.get(digest)

    # ---- writing --------------------------------------------------------------------------

    def new_writer(
        self,
        digest: str,
        *,
        media_type: str | None = None,
        source: str | None = None,
        private_scope: str | None = None,
    ) -> BlobWriter:
        """Start a download of ``digest`` into a fresh temp file (several may run at once).

        ``private_scope``: the bytes come with an app's credentials; the blob is marked
        private to it before it can be seen (see ``_publish``)."""
        hex_ = parse_digest(digest)
        self._require_open()
        path = self.tmp_dir / f"{hex_}.{os.getpid()}.{next(self._seq)}.part"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise _full_disk(exc, f"creating a temp file for {digest}") from exc
        writer = BlobWriter(self, digest, hex_, path, fd, media_type, source)
        writer.private_scope = private_scope
        return writer

    def put_bytes(
        self,
        digest: str,
        data: bytes,
        *,
        media_type: str | None = None,
        source: str | None = None,
        private_scope: str | None = None,
    ) -> BlobEntry:
        """Store a small blob (a manifest, a config) held in memory, verified before any write."""
        parse_digest(digest)
        actual = "sha256:" + hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise DigestMismatch(digest, actual)
        with self.new_writer(
            digest, media_type=media_type, source=source, private_scope=private_scope
        ) as writer:
            if data:
                writer.expect(len(data))  # its piece table too: peers ask for it first
            writer.write(data)
            return writer.commit()

    def _publish(self, hex_: str, tmp_path: Path, size: int, writer: BlobWriter) -> BlobEntry:
        """Rename a verified, fsynced temp file into place, then index and publish it.

        Runs under the lock from rename to index so that a concurrent ``delete`` of the same
        digest cannot slip between them and leave a row without its file.
        """
        digest = "sha256:" + hex_
        final = self._final_path(hex_)
        entry = BlobEntry(digest, size, final, writer.media_type, writer.source)
        with self._lock:
            db = self._db_()
            old = self._entries.get(digest)
            if old is not None:
                # Identical bytes are already in place (two writers of one digest): keep the
                # stored file, which readers may hold open, drop ours, and only fill in what
                # the stored entry did not know (a blob re-indexed at open has no media type).
                tmp_path.unlink()
                merged = BlobEntry(
                    digest,
                    old.size,
                    old.path,
                    old.media_type or entry.media_type,
                    old.source or entry.source,
                )
                if merged != old:
                    db.execute(
                        "update blobs set media_type = ?, source = ? where digest = ?",
                        [merged.media_type, merged.source, digest],
                    )
                    self._entries[digest] = merged
                return merged
            if writer.private_scope is not None:
                # Marked before the file can be found: a crash after the rename
                # re-indexes the file at open, and the mark must already be there.
                self._mark_private_locked(digest, writer.private_scope)
            try:
                if not final.parent.is_dir():
                    final.parent.mkdir(mode=0o700, exist_ok=True)
                    _fsync_dir(self.blobs_dir)
                os.rename(tmp_path, final)
                _fsync_dir(final.parent)
            except OSError as exc:
                raise _full_disk(exc, f"moving {digest} into place") from exc
            try:
                self._index_insert(entry, self._clock())
            except sqlite3.Error as exc:
                # Without a row the file would be invisible until the next open; take it
                # back out so that memory, index and files keep agreeing now.
                with contextlib.suppress(FileNotFoundError):
                    final.unlink()
                if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
                    raise StoreFull(errno.ENOSPC, f"index disk full while adding {digest}") from exc
                raise
            self._entries[digest] = entry
            self._total += size
        return entry

    def _index_insert(self, entry: BlobEntry, now: float) -> None:
        """Insert the row of a blob whose file is already in place (called under the lock).

        Plain SQL rather than ``table.insert``: sqlite-utils 3.x would commit the transaction
        that recovery runs this in.
        """
        self._db_().conn.execute(
            "insert or replace into blobs"
            " (digest, size, media_type, source, created_at, last_access)"
            " values (?, ?, ?, ?, ?, ?)",
            [entry.digest, entry.size, entry.media_type, entry.source, now, now],
        )

    def delete(self, digest: str) -> None:
        """Remove a blob: from memory first (no new hit), then its file, then its row.

        Readers that already opened the file keep reading it. Deleting a blob that is not
        stored is a no-op.
        """
        hex_ = parse_digest(digest)
        with self._lock:
            entry = self._entries.pop(digest, None)
            self._tables.pop(digest, None)
            with self._access_lock:
                self._pending_access.pop(digest, None)
            if entry is not None:
                self._total -= entry.size
            with contextlib.suppress(FileNotFoundError):
                self._final_path(hex_).unlink()
            self._index_delete(digest)
            if self._private.pop(digest, None) is not None:
                self._db_().execute("delete from private where digest = ?", [digest])

    def _index_delete(self, digest: str) -> None:
        """Drop the row of a blob whose file is already gone (called under the lock)."""
        self._db_().execute("delete from blobs where digest = ?", [digest])

    # ---- bookkeeping ----------------------------------------------------------------------

    def flush_access(self) -> None:
        """Write the batched last-access times in one transaction (call from a worker thread)."""
        with self._access_lock:
            pending, self._pending_access = self._pending_access, {}
        if not pending:
            return
        with self._lock:
            db = self._db_()
            with self._transaction():
                db.conn.executemany(
                    "update blobs set last_access = max(last_access, ?) where digest = ?",
                    [(t, d) for d, t in pending.items()],
                )

    def last_access(self, digest: str) -> float | None:
        """The last access time of a blob (the flushed one, or a pending touch if newer)."""
        pending = self._pending_access.get(digest)
        with self._lock:
            rows = list(
                self._db_().query("select last_access from blobs where digest = ?", [digest])
            )
        if not rows:
            return None
        flushed = rows[0]["last_access"]
        return max(flushed, pending) if pending is not None else flushed

    def set_tag(self, ns: str, name: str, tag: str, digest: str, now: float) -> None:
        """Remember that ``ns/name:tag`` resolved to ``digest`` (for stale-if-error)."""
        parse_digest(digest)
        with self._lock:
            self._db_()["tags"].upsert(
                {"ns": ns, "name": name, "tag": tag, "digest": digest, "updated_at": now},
                pk=("ns", "name", "tag"),
            )

    def get_tag(self, ns: str, name: str, tag: str) -> str | None:
        """The last digest ``ns/name:tag`` resolved to, or None if it never did."""
        with self._lock:
            rows = list(
                self._db_().query(
                    "select digest from tags where ns = ? and name = ? and tag = ?",
                    [ns, name, tag],
                )
            )
        return rows[0]["digest"] if rows else None

    # ---- pins, privacy and eviction ---------------------------------------------------------

    def pin(self, pin: Pin, digests: Iterable[str]) -> Pin | None:
        """Pin ``pin.app`` to ``pin.digest``, protecting ``digests`` (the image's manifests
        and blobs) from eviction; returns the app's previous pin, if any."""
        needed = sorted(set(digests) | {pin.digest})
        with self._lock, self._transaction():
            db = self._db_()
            previous = self._pins.get(pin.app)
            db.execute("delete from pin_blobs where app = ?", [pin.app])
            db["pins"].insert(
                {**dataclasses.asdict(pin), "private": int(pin.private)}, replace=True
            )
            db["pin_blobs"].insert_all(
                [{"app": pin.app, "digest": d} for d in needed], replace=True
            )
            for apps in self._pinned.values():
                apps.discard(pin.app)
            for d in needed:
                self._pinned.setdefault(d, set()).add(pin.app)
            self._pinned = {d: apps for d, apps in self._pinned.items() if apps}
            self._pins[pin.app] = pin
        return previous

    def unpin(self, app: str) -> Pin | None:
        """Remove an app's pin (its blobs stay, now evictable); None if it had none."""
        with self._lock, self._transaction():
            pin = self._pins.pop(app, None)
            if pin is None:
                return None
            db = self._db_()
            db.execute("delete from pins where app = ?", [app])
            db.execute("delete from pin_blobs where app = ?", [app])
            for apps in self._pinned.values():
                apps.discard(app)
            self._pinned = {d: apps for d, apps in self._pinned.items() if apps}
        return pin

    def pins(self) -> list[Pin]:
        return sorted(self._pins.copy().values(), key=lambda p: p.app)

    def pinned_by(self, digest: str) -> tuple[str, ...]:
        """The apps whose pin needs ``digest``. Memory only."""
        return tuple(sorted(self._pinned.get(digest, ())))

    def pinned_bytes(self, excluding: str | None = None) -> int:
        """Bytes of stored blobs some pin needs (other than ``excluding``'s alone)."""
        total = 0
        for digest, apps in self._pinned.copy().items():
            if apps - {excluding} and (entry := self._entries.get(digest)) is not None:
                total += entry.size
        return total

    def mark_private(self, digest: str, scope: str) -> None:
        """Record that ``digest`` was fetched with ``scope``'s credentials."""
        with self._lock:
            self._mark_private_locked(digest, scope)

    def _mark_private_locked(self, digest: str, scope: str) -> None:
        scopes = self._private.get(digest, frozenset())
        if scope in scopes:
            return
        self._db_()["private"].insert({"digest": digest, "scope": scope}, replace=True)
        self._private[digest] = scopes | {scope}

    def clear_private(self, digest: str) -> None:
        """Forget ``digest``'s private marks: it was shown to be public."""
        with self._lock:
            if self._private.pop(digest, None) is not None:
                self._db_().execute("delete from private where digest = ?", [digest])

    def private_scopes(self, digest: str) -> frozenset[str]:
        """The app scopes that may read ``digest``; empty for public content. Memory only."""
        return self._private.get(digest, frozenset())

    def acquire(self, digest: str) -> None:
        """Keeps ``digest`` from eviction while a response serves it; pair with release."""
        self._in_use[digest] += 1

    def release(self, digest: str) -> None:
        self._in_use[digest] -= 1
        if self._in_use[digest] <= 0:
            del self._in_use[digest]

    def _evictable(self, older_than: float | None = None) -> list[BlobEntry]:
        """Unpinned, unserved blobs, least recently used first (call under no lock)."""
        self.flush_access()
        with self._lock:
            rows = list(
                self._db_().query("select digest, last_access from blobs order by last_access")
            )
        out = []
        for row in rows:
            digest = row["digest"]
            if digest in self._pinned or self._in_use.get(digest):
                continue
            if older_than is not None and row["last_access"] >= older_than:
                continue
            entry = self._entries.get(digest)
            if entry is not None:
                out.append(entry)
        return out

    def over_limit(self, incoming: int) -> bool:
        """Would ``incoming`` more bytes push the store over ``max_bytes``? Memory only."""
        return self.max_bytes is not None and self._total + incoming > self.max_bytes

    def make_room(self, incoming: int) -> list[BlobEntry]:
        """Evicts least recently used blobs until ``incoming`` more bytes fit under
        ``max_bytes``. Pinned blobs and blobs being served are never evicted, so the
        store may stay over the limit when they alone fill it; returns what went."""
        if not self.over_limit(incoming):
            return []
        evicted = []
        for entry in self._evictable():
            if self._total + incoming <= self.max_bytes:
                break
            self.delete(entry.digest)
            evicted.append(entry)
        return evicted

    def gc(self, keep_since: float) -> list[BlobEntry]:
        """Removes every blob no pin needs and nobody pulled since ``keep_since``."""
        removed = []
        for entry in self._evictable(older_than=keep_since):
            self.delete(entry.digest)
            removed.append(entry)
        return removed

    def tags(self) -> list[dict]:
        """Every remembered tag: ns, name, tag, digest, updated_at."""
        with self._lock:
            return list(self._db_().query("select * from tags order by ns, name, tag"))

    def access_times(self) -> dict[str, float]:
        """Last access of every blob (flushed, or pending if newer)."""
        with self._lock:
            rows = {
                r["digest"]: r["last_access"]
                for r in self._db_().query("select digest, last_access from blobs")
            }
        for digest, t in self._pending_access.copy().items():
            if digest in rows:
                rows[digest] = max(rows[digest], t)
        return rows

    # ---- closing --------------------------------------------------------------------------

    def close(self) -> None:
        """Flush access times, close the index and release the data_dir. Idempotent."""
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self.flush_access()
            with self._lock:
                self._conn.close()
                self._conn = None
                self._db = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- helpers --------------------------------------------------------------------------

    def _final_path(self, hex_: str) -> Path:
        return self.blobs_dir / hex_[:2] / hex_

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """One SQLite transaction (sqlite-utils' own ``atomic()`` exists only from 4.0 on)."""
        conn = self._db_().conn
        conn.execute("BEGIN")
        try:
            yield
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:  # SQLite may have rolled back already (SQLITE_FULL)
                conn.execute("ROLLBACK")
            raise

    def _db_(self) -> sqlite_utils.Database:
        if self._db is None:
            raise ValueError("store is closed")
        return self._db

    def _require_open(self) -> None:
        self._db_()

    def iter_tmp(self) -> Iterator[Path]:
        """Temp files of downloads in progress (for diagnostics)."""
        return iter(sorted(self.tmp_dir.iterdir()))
