"""Warm memory for a storm: a ballast file in the work dir's tmpfs, given back as the storm fills it.

Why. This machine is a VM whose host backs guest memory lazily: a page the guest
frees goes back to the host within a second or two (free page reporting), and
the next first touch of such a page costs whoever touches it several CPU-seconds
per GiB (measured here: 4.5-7 CPU-s per GiB written to a tmpfs, against 0.5-0.9
for pages still backed, the same code). A storm writes about two image copies
of new pages per cell (celld's store, the runtime's copy): 8 cells x 256 MiB
make 4 GiB, some 25 CPU-seconds of the 2 cores' ~60 in a 30 s storm, charged to
skopeo and celld alike wherever they write: a figure of the host, not of the
protocol. The cells of a real fleet own their memory.

So, before a storm (setup, not timed), `Ballast.fill` writes a file over the
free part of the tmpfs but `headroom`, which touches those pages; while the
storm runs, a thread gives the file back in `step`s whenever the tmpfs's free
space falls below `headroom - step`. The pages it frees are written again
within a fraction of a second, before the host has taken them back (measured:
0.9 CPU-s per GiB for a writer that follows the ballast down, 6.3 for one
that does not). The writers never see less free space than without a ballast
but for `headroom`: a thread starved longer than `headroom` takes to fill would
let a write fail with ENOSPC, which the storm reports as a failed pull.

A writer to a disk's page cache draws on the same free pages: with `free=memfree`
the ballast (any tmpfs) follows the machine's free memory instead, and `fill(size)`
writes only what the writer will take (simulations/bench/intake.py).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from pathlib import Path

MiB = 1 << 20
_CHUNK = 4 * MiB


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def memfree() -> int:
    """The machine's free memory (MemFree): what the page cache takes new pages from."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemFree:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemFree")


def filesystem_type(path: Path) -> str:
    """The type of the filesystem `path` is on (its longest mount point in mountinfo)."""
    target = os.path.realpath(path)
    best, kind = "", ""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            mount = fields[4].replace("\\040", " ")
            fstype = fields[fields.index("-") + 1]
            inside = target == mount or target.startswith(mount.rstrip("/") + "/")
            if inside and len(mount) >= len(best):
                best, kind = mount, fstype
    return kind


class Ballast:
    """A file of touched pages in `directory`'s filesystem, shrunk as others fill it."""

    def __init__(
        self,
        directory: Path,
        headroom: int = 256 * MiB,
        step: int = 64 * MiB,
        # 8 cells write ~20 MB in 20 ms at 200 Mbit/s, far under `headroom - step`;
        # each poll is a wake-up on the cores the cells share (at 5 ms: 2.7% of the
        # 2 cores through a storm, in perf, truncation included)
        poll: float = 0.02,
        free: Callable[[], int] | None = None,
    ) -> None:
        self.path = directory / "ballast"
        # what the ballast follows down: by default its own filesystem's free space
        self.free = free if free is not None else (lambda: free_bytes(directory))
        self.headroom = headroom
        self.step = step
        self.poll = poll
        self.size = 0
        self.filled = 0  # bytes the last fill wrote
        self.given_back = 0  # bytes given back while following
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def fill(self, size: int | None = None) -> int:
        """Write the ballast up to `size` bytes (default: over the free space but
        `headroom`), touching every page: the bytes written. Only on a tmpfs: on a
        disk, "all but the headroom" is the disk (a storm whose tmpfs was unmounted
        under it once wrote 73 GB into /tmp)."""
        self.stop()
        kind = filesystem_type(self.path.parent)
        if kind != "tmpfs":
            raise RuntimeError(
                f"ballast: {self.path.parent} is on {kind or 'no known filesystem'}, not a tmpfs"
            )
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            self.size = 0
        if size is None:
            want = max(0, self.free() - self.headroom) // _CHUNK * _CHUNK
        else:
            want = max(0, size - self.size + _CHUNK - 1) // _CHUNK * _CHUNK
        chunk = b"\xa5" * _CHUNK  # not zeros: the pages are really written
        target = self.size + want
        while self.size < target:
            self.size += os.pwrite(self._fd, chunk, self.size)
        self.filled, self.given_back = want, 0
        return want

    def follow(self, floor: int | None = None) -> None:
        """Give the ballast back a step whenever the free space falls below `floor`
        (default: `headroom - step`), until `stop`."""
        self._stop.clear()
        low = self.headroom - self.step if floor is None else floor
        self._thread = threading.Thread(
            target=self._follow, args=(low,), name="ballast", daemon=True
        )
        self._thread.start()

    def _follow(self, low: int) -> None:
        # The storm keeps both cores busy; a late step could leave a writer with no
        # space, so this thread runs ahead of the storm's processes when it may.
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), -10)
        while not self._stop.wait(self.poll) and self._fd is not None:
            if self.size and self.free() < low:
                size = max(0, self.size - self.step)
                os.ftruncate(self._fd, size)
                self.given_back += self.size - size
                self.size = size

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def remove(self) -> None:
        self.stop()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.path.unlink(missing_ok=True)
        self.size = 0
