"""The simulator's clock: a virtual time and the callbacks to run at given times.

Owns: simulated time and the order in which scheduled callbacks run.
Never: reads the wall clock, or lets two runs of the same inputs run callbacks in a
different order. Callbacks due at the same time run in the order they were scheduled,
so the order never depends on object identity.

Theory of operation. The queue is a heap of distinct times (plain floats) plus, for each
time, the list of callbacks due then, in scheduling order. A heap of floats compares
floats, where a heap of (time, sequence, callback, argument) tuples compares tuples: in a
storm of thousands of cells the queue holds tens of thousands of events, and that
difference is most of the cost of popping one. Many events share a time (rebalances on
the quantum grid, several sends in one callback), and those share one heap entry. A
callback scheduled for the time being run goes into a fresh list for that time, which
runs after the current one: the same order as a sequence number would give.

Cancellation is left to callers: a callback that may become stale carries a version
number and checks it when it runs (cheaper than deleting from the queue).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Any

Callback = Callable[[Any], None]


class Engine:
    """Runs callbacks in order of virtual time; `now` is the time of the running one."""

    __slots__ = ("_due", "_times", "events_run", "now")

    def __init__(self) -> None:
        self._times: list[float] = []  # heap of the distinct times in _due
        self._due: dict[float, list[tuple[Callback, Any]]] = {}
        self.now = 0.0
        self.events_run = 0

    def call_at(self, when: float, fn: Callback, arg: Any = None) -> None:
        """Run `fn(arg)` at virtual time `when` (never earlier than now)."""
        if when < self.now:
            when = self.now
        batch = self._due.get(when)
        if batch is None:
            self._due[when] = [(fn, arg)]
            heapq.heappush(self._times, when)
        else:
            batch.append((fn, arg))

    def call_later(self, delay: float, fn: Callback, arg: Any = None) -> None:
        self.call_at(self.now + delay, fn, arg)

    def run(self, until: float) -> None:
        """Run every callback due at or before `until`; the clock then reads `until`."""
        times = self._times
        due = self._due
        pop = heapq.heappop
        n = 0
        while times and times[0] <= until:
            when = pop(times)
            batch = due.pop(when)
            self.now = when
            for fn, arg in batch:
                fn(arg)
            n += len(batch)
        self.events_run += n
        self.now = max(self.now, until)

    def pending(self) -> int:
        """Callbacks queued and not yet run (counted when asked: run() keeps no count)."""
        return sum(map(len, self._due.values()))
