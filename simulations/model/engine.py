"""The simulator's clock: a virtual time and a heap of callbacks to run at given times.

Owns: simulated time and the order in which scheduled callbacks run.
Never: reads the wall clock, or lets two runs of the same inputs run callbacks in a
different order. Ties on time are broken by a sequence number in scheduling order, so
the heap never compares callbacks and the order never depends on object identity.

Cancellation is left to callers: a callback that may become stale carries a version
number and checks it when it runs (cheaper than deleting from the heap).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Any

Callback = Callable[[Any], None]


class Engine:
    """Runs callbacks in order of virtual time; `now` is the time of the running one."""

    __slots__ = ("_heap", "_seq", "events_run", "now")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callback, Any]] = []
        self._seq = 0
        self.now = 0.0
        self.events_run = 0

    def call_at(self, when: float, fn: Callback, arg: Any = None) -> None:
        """Run `fn(arg)` at virtual time `when` (never earlier than now)."""
        if when < self.now:
            when = self.now
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, fn, arg))

    def call_later(self, delay: float, fn: Callback, arg: Any = None) -> None:
        self.call_at(self.now + delay, fn, arg)

    def run(self, until: float) -> None:
        """Run every callback due at or before `until`; the clock then reads `until`."""
        heap = self._heap
        pop = heapq.heappop
        n = 0
        while heap and heap[0][0] <= until:
            when, _, fn, arg = pop(heap)
            self.now = when
            fn(arg)
            n += 1
        self.events_run += n
        self.now = max(self.now, until)

    def pending(self) -> int:
        return len(self._heap)
