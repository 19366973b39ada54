"""What a run measures: pull completions, bytes by source, uploads, membership views.

Owns: the counters a run accumulates and their summary as plain JSON values.
Never: influences the simulation (reading a metric changes nothing), or holds a float
whose printed form could differ between runs (summaries are rounded).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

ROUND = 6


def r(x: float) -> float:
    """Round for the report: stable text, no noise digits."""
    return round(float(x), ROUND)


def quantile(sorted_values: list[float], q: float) -> float:
    """The q-quantile by nearest rank (the value that q of the cells reached)."""
    if not sorted_values:
        return math.nan
    k = max(0, min(len(sorted_values) - 1, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[k]


def summary(values: list[float]) -> dict[str, float | int | None]:
    v = sorted(values)
    if not v:
        return {"count": 0, "p50": None, "p90": None, "p99": None, "max": None, "mean": None}
    return {
        "count": len(v),
        "p50": r(quantile(v, 0.50)),
        "p90": r(quantile(v, 0.90)),
        "p99": r(quantile(v, 0.99)),
        "max": r(v[-1]),
        "mean": r(sum(v) / len(v)),
    }


@dataclass
class Tracked:
    """One membership event whose spread through the cells' views is followed.

    kind "join": the cells that know `member` as alive; kind "dead": the cells that have
    declared `member` dead (crashed or left). Observers are the live cells other than
    the member; `curve` is the fraction after each change.
    """

    kind: str
    member: int
    at: float
    knowers: set[int] = field(default_factory=set)
    live_knowers: int = 0  # knowers that are live cells (kept by the world)
    first_suspect: float | None = None  # "dead" events: when anyone first suspected it
    curve: list[tuple[float, float]] = field(default_factory=list)


class Metrics:
    """Counters for one run of one strategy."""

    def __init__(self, cells: int, image_size: int) -> None:
        self.cells = cells
        self.image_size = image_size
        self.pull_started: dict[int, float] = {}
        self.pull_done: dict[int, float] = {}
        self.first_byte: dict[tuple[int, int], float] = {}  # (cell, layer) -> time
        self.from_upstream = 0.0
        self.from_central = 0.0
        self.from_peers = 0.0
        self.upstream_sent = 0.0
        self.uploaded = [0.0] * cells
        self.downloads_failed = 0
        self.tracked: list[Tracked] = []
        self.false_dead: list[tuple[float, int, int]] = []  # (time, observer, member)
        self.false_suspect = 0
        self.protocol_errors: dict[str, int] = {}

    def count_error(self, name: str) -> None:
        self.protocol_errors[name] = self.protocol_errors.get(name, 0) + 1

    def pull_summary(self) -> dict[str, object]:
        durations = sorted(
            self.pull_done[c] - self.pull_started[c]
            for c in sorted(self.pull_done)
            if c in self.pull_started
        )
        return {
            "cells": len(self.pull_started),
            "completed": len(durations),
            "incomplete": len(self.pull_started) - len(durations),
            "completion_s": summary(durations),
            "times_s": [r(x) for x in durations],
            # when the runtime could be streamed a layer's first byte, from the pull's
            # start (strategies that stream report it; the others leave it empty)
            "layer_first_byte_s": summary(
                [t - self.pull_started[c] for (c, _), t in self.first_byte.items()]
            ),
        }

    def bytes_summary(self) -> dict[str, float]:
        size = float(self.image_size) or 1.0
        return {
            "image_bytes": self.image_size,
            "from_upstream": r(self.from_upstream),
            "from_central": r(self.from_central),
            "from_peers": r(self.from_peers),
            "upstream_sent": r(self.upstream_sent),
            "origin_copies": r((self.from_upstream + self.from_central) / size),
            "upstream_copies": r(self.upstream_sent / size),
        }

    def upload_summary(self) -> dict[str, object]:
        size = float(self.image_size) or 1.0
        copies = sorted(u / size for u in self.uploaded)
        return {
            "max_copies": r(copies[-1]) if copies else 0.0,
            "p50_copies": r(quantile(copies, 0.5)) if copies else 0.0,
            "p99_copies": r(quantile(copies, 0.99)) if copies else 0.0,
            "per_cell_copies": [r(x) for x in copies],
        }

    def membership_summary(self) -> dict[str, object]:
        events = []
        for t in self.tracked:

            def reach(frac: float, t: Tracked = t) -> float | None:
                for when, f in t.curve:
                    if f >= frac - 1e-12:
                        return r(when - t.at)
                return None

            events.append(
                {
                    "kind": t.kind,
                    "member": t.member,
                    "at": r(t.at),
                    "t50_s": reach(0.5),
                    "t90_s": reach(0.9),
                    "t99_s": reach(0.99),
                    "t100_s": reach(1.0),
                    "first_suspect_s": (
                        r(t.first_suspect - t.at) if t.first_suspect is not None else None
                    ),
                    "final_fraction": r(t.curve[-1][1]) if t.curve else 0.0,
                    "curve": [[r(a), r(b)] for a, b in _thin(t.curve)],
                }
            )

        def mean(key: str, kind: str) -> float | None:
            xs = [e[key] for e in events if e["kind"] == kind and e[key] is not None]
            return r(sum(xs) / len(xs)) if xs else None

        return {
            "first_suspect_mean_s": mean("first_suspect_s", "dead"),
            "dead_all_mean_s": mean("t100_s", "dead"),
            "join_all_mean_s": mean("t100_s", "join"),
            "events": events,
            "false_dead": len(self.false_dead),
            "false_dead_first": [[r(a), b, c] for a, b, c in self.false_dead[:20]],
            "false_suspect": self.false_suspect,
        }


def _thin(curve: list[tuple[float, float]], points: int = 400) -> list[tuple[float, float]]:
    """Keep at most about `points` steps of a curve (always its first and last)."""
    if len(curve) <= points:
        return curve
    step = len(curve) / points
    keep = [curve[int(i * step)] for i in range(points)]
    keep.append(curve[-1])
    return keep
