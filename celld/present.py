"""What the admin commands look like on a terminal: sizes, tables, times, progress.

Owns the human spelling of figures (binary sizes like "1.2 GiB", relative
times like "3 min ago"), column alignment, and the one rewritten line that
shows staging's progress. Pure functions of their arguments: never reads the
clock, the environment or the terminal itself (the caller passes `now` and
the stream), so every output is testable byte for byte. Never sees a
credential: nothing here is handed one.
"""

from __future__ import annotations

import datetime as dt
import re
from collections import deque
from collections.abc import Callable, Collection, Sequence
from typing import TextIO

_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
# A cell that reads as a figure: 12, 3.5, 1.2 GiB, 87.5%, 38.1 MiB/s.
_FIGURE = re.compile(r"^-?\d[\d,]*(\.\d+)?( ?([KMGTPE]i)?B(/s)?|%)?$")


def human_size(n: float) -> str:
    """Bytes in binary units with one decimal: 512 B, 1.0 KiB, 1.2 GiB.

    Binary because that is what `df -h`, `du -h` and registries' size limits
    (max_bytes = "50GiB") use on the same machine.
    """
    if n < 1024:
        return f"{int(n)} B"
    value = float(n)
    for unit in _UNITS:
        value /= 1024
        # 1023.96 KiB would print as "1024.0 KiB": move up a unit instead.
        if round(value, 1) < 1024 or unit == _UNITS[-1]:
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def human_rate(bytes_per_second: float) -> str:
    return f"{human_size(bytes_per_second)}/s"


def short_digest(digest: str) -> str:
    """The first 12 hex digits, as `docker images` shows an image ID."""
    return digest.partition(":")[2][:12] or digest[:12]


def percent(part: float, whole: float) -> str:
    """One decimal; "<0.1%" rather than a "0.0%" that hides a non-zero part."""
    if not whole:
        return "-"
    if 0 < part / whole < 0.001:
        return "<0.1%"
    return f"{100 * part / whole:.1f}%"


def ago(ts: float | None, now: float, tz: dt.tzinfo | None = None) -> str:
    """How long before `now` the unix time `ts` was: "just now", "3 min ago".

    Beyond two weeks (or in the future, when clocks disagree) the date itself
    says more than a count of days: "2026-10-01", in `tz` (None: local time).
    """
    if ts is None:
        return "never"
    seconds = now - ts
    if seconds < -60 or seconds >= 14 * 86400:
        return dt.datetime.fromtimestamp(ts, tz).date().isoformat()
    if seconds < 5:
        return "just now"
    if seconds < 60:
        return f"{int(seconds)} s ago"
    if seconds < 3600:
        return f"{int(seconds // 60)} min ago"
    if seconds < 48 * 3600:
        return f"{int(seconds // 3600)} h ago"
    return f"{int(seconds // 86400)} days ago"


def table(
    rows: Sequence[Sequence[object]],
    headers: Sequence[str] | None = None,
    right: Collection[int] | None = None,
) -> str:
    """Rows in columns two spaces apart, no trailing blanks, no final newline.

    A column whose every non-empty cell is a figure (a number, a size, a
    percentage) is right-aligned so that magnitudes line up; `right` names
    the right-aligned columns explicitly instead.
    """
    width = max([len(headers or ())] + [len(r) for r in rows])
    text = [[str(c) for c in r] + [""] * (width - len(r)) for r in rows]
    if right is None:
        right = {
            i
            for i in range(width)
            if any(r[i] for r in text) and all(_FIGURE.match(r[i]) for r in text if r[i])
        }
    lines = ([list(headers) + [""] * (width - len(headers))] if headers else []) + text
    widths = [max(len(line[i]) for line in lines) for i in range(width)]
    out = []
    for line in lines:
        cells = [
            c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(line)
        ]
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)


def transfer_line(
    label: str,
    blobs_done: int,
    blobs_total: int,
    bytes_done: int,
    bytes_total: int,
    rate: float | None,
) -> str:
    """`fetch  2/3 blobs  45.2 MiB / 120.0 MiB  38.1 MiB/s` (no rate until known)."""
    parts = [
        label,
        f"{blobs_done}/{blobs_total} blobs",
        f"{human_size(bytes_done)} / {human_size(bytes_total)}",
    ]
    if rate is not None:
        parts.append(human_rate(rate))
    return "  ".join(parts)


class RateMeter:
    """Bytes per second over the last `window` seconds of samples.

    A window, not the average since the start: a transfer that stalls shows
    its rate falling instead of a stale mean. The caller passes the times.
    """

    def __init__(self, window: float = 3.0, min_span: float = 0.25) -> None:
        self.window = window
        self.min_span = min_span
        self._samples: deque[tuple[float, float]] = deque()

    def add(self, now: float, total_bytes: float) -> None:
        self._samples.append((now, total_bytes))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window:
            self._samples.popleft()

    def rate(self) -> float | None:
        if len(self._samples) < 2:
            return None
        (t0, b0), (t1, b1) = self._samples[0], self._samples[-1]
        if t1 - t0 < self.min_span:
            return None
        return max(b1 - b0, 0) / (t1 - t0)


class ProgressLine:
    """One line of a terminal, rewritten in place with a carriage return.

    Each update pads with blanks over what the previous one left, and is cut
    to the terminal's width: a line that wraps can no longer be rewritten.
    `clear()` (or leaving the `with` block, errors included) blanks the line
    so that whatever is printed next starts on a clean one.
    """

    def __init__(self, stream: TextIO, columns: Callable[[], int] = lambda: 80) -> None:
        self.stream = stream
        self.columns = columns
        self._shown = 0

    def update(self, text: str) -> None:
        text = text[: max(self.columns() - 1, 0)]
        self.stream.write("\r" + text + " " * max(self._shown - len(text), 0))
        self.stream.flush()
        self._shown = len(text)

    def clear(self) -> None:
        if self._shown:
            self.stream.write("\r" + " " * self._shown + "\r")
            self.stream.flush()
            self._shown = 0

    def __enter__(self) -> ProgressLine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.clear()
