"""Scenarios: TOML files that say what to simulate, parsed into frozen values.

Owns: the scenario file format, its units ("300MB/s", "1.5GB", "16MiB", "_ms" keys) and
its validation, with errors that name the offending key.
Never: runs anything; a Scenario is a value that `world.py` turns into a simulation.

A scenario file (every table is optional except [cells]):

    name = "storm"              # defaults to the file's stem
    description = "..."
    duration = 60.0             # simulated seconds
    seed = 1
    strategies = ["celld", "central-only", "spegel"]   # the first is the subject

    [cells]        count, zones (list of names, assigned round robin), upload, download,
                   intake ("0": unlimited, the default) and intake_shared (see Cells)
    [network]      same_zone_ms, cross_zone_ms, jitter_median_ms, jitter_sigma, loss,
                   rebalance_quantum_ms
    [upstream]     bandwidth, latency_ms            (the image's home registry: the Hub)
    [central]      bandwidth, latency_ms, has_image (the platform's central registry)
    [image]        layers = ["1.5GB", "1.5GB"]
    [pull]         start, spread (seconds), cells ("all" or a count)
    [membership]   mode ("swim" | "static"), seeds, and any parameter of the protocol's
                   membership configuration (passed through by name, e.g.
                   protocol_period_ms)
    [swarm]        parameters passed through to the protocol's placement/swarm objects
    [[faults]]     at, kind = crash | restart | leave | join | partition | heal,
                   cells = [indices] or count = n, zones = [...] (partition)
    [goals]        completion_p99_max_s, origin_copies_max, upload_copies_max,
                   join_converged_max_s, first_detection_max_s, dead_detected_max_s,
                   false_dead_max
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from simulations.model.network import LinkModel

STRATEGIES = ("celld", "central-only", "spegel")
FAULT_KINDS = ("crash", "restart", "leave", "join", "partition", "heal")
GOALS = (
    "completion_p99_max_s",
    "origin_copies_max",
    "upload_copies_max",
    "join_converged_max_s",
    "first_detection_max_s",
    "dead_detected_max_s",
    "false_dead_max",
)

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "kbit": 10**3 / 8,
    "mbit": 10**6 / 8,
    "gbit": 10**9 / 8,
}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]*)\s*(?:/s)?\s*$")


class ScenarioError(ValueError):
    """The scenario file is wrong; the message names the key."""


def parse_size(value: object, key: str) -> float:
    """'300MB/s' -> 3e8, '16MiB' -> 16777216, 1000 -> 1000.0 (bytes or bytes/s)."""
    if isinstance(value, bool):
        raise ScenarioError(f"{key}: expected a size, got {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ScenarioError(f"{key}: must not be negative")
        return float(value)
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m and m.group(2).lower() in _UNITS:
            return float(m.group(1)) * _UNITS[m.group(2).lower()]
    raise ScenarioError(f"{key}: expected a size like '300MB/s' or '16MiB', got {value!r}")


@dataclass(frozen=True)
class Cells:
    """`intake`: the bytes/s a cell's CPU can take in (fetch, verify, write, and hand to
    its runtime), over all its downloads; 0 for no limit. `intake_shared`: one CPU for
    every cell, `intake` being all of theirs together: the testbed, whose cells run on
    one machine. Measure it where the links do not bind (the testbed's storm with
    `--link 10gbit`: cells x image / p50), then let the links bind to see which wins."""

    count: int
    zones: tuple[str, ...]
    upload: float
    download: float
    intake: float = 0.0
    intake_shared: bool = False


@dataclass(frozen=True)
class Server:
    """The upstream or the central registry: one node with its own bandwidth."""

    bandwidth: float
    latency_s: float
    has_image: bool


@dataclass(frozen=True)
class Pull:
    start: float
    spread: float
    cells: int  # how many of the initial cells pull; -1 = all


@dataclass(frozen=True)
class Fault:
    at: float
    kind: str
    cells: tuple[int, ...] = ()
    count: int = 0
    zones: tuple[str, ...] = ()


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    duration: float
    seed: int
    strategies: tuple[str, ...]
    cells: Cells
    link: LinkModel
    quantum: float
    upstream: Server
    central: Server
    layers: tuple[int, ...]
    pull: Pull | None
    membership_mode: str
    seeds: int
    membership: tuple[tuple[str, Any], ...]
    swarm: tuple[tuple[str, Any], ...]
    faults: tuple[Fault, ...]
    goals: tuple[tuple[str, float], ...] = field(default=())

    @property
    def image_size(self) -> int:
        return sum(self.layers)

    def with_seed(self, seed: int) -> Scenario:
        return replace(self, seed=seed)


def _table(doc: dict[str, Any], key: str) -> dict[str, Any]:
    value = doc.get(key, {})
    if not isinstance(value, dict):
        raise ScenarioError(f"[{key}]: expected a table")
    return value


def _num(table: dict[str, Any], key: str, default: float, where: str) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ScenarioError(f"{where}.{key}: expected a number, got {value!r}")
    return float(value)


def _check_keys(table: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ScenarioError(f"[{where}]: unknown key(s) {', '.join(unknown)}")


def load(path: str | Path) -> Scenario:
    """Read and validate a scenario file."""
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ScenarioError(f"{path}: {e}") from e
    return parse(doc, default_name=path.stem)


def parse(doc: dict[str, Any], default_name: str = "scenario") -> Scenario:
    top = {
        "name",
        "description",
        "duration",
        "seed",
        "strategies",
        "cells",
        "network",
        "upstream",
        "central",
        "image",
        "pull",
        "membership",
        "swarm",
        "faults",
        "goals",
    }
    _check_keys(doc, top, "top level")

    c = _table(doc, "cells")
    _check_keys(c, {"count", "zones", "upload", "download", "intake", "intake_shared"}, "cells")
    count = c.get("count")
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ScenarioError("cells.count: expected a positive integer")
    zones = c.get("zones", ["a"])
    if not isinstance(zones, list) or not zones or not all(isinstance(z, str) for z in zones):
        raise ScenarioError("cells.zones: expected a non-empty list of names")
    cells = Cells(
        count=count,
        zones=tuple(zones),
        upload=parse_size(c.get("upload", "125MB/s"), "cells.upload"),
        download=parse_size(c.get("download", "125MB/s"), "cells.download"),
        intake=parse_size(c.get("intake", "0"), "cells.intake"),
        intake_shared=c.get("intake_shared", False),
    )
    if not isinstance(cells.intake_shared, bool):
        raise ScenarioError("cells.intake_shared: expected true or false")

    n = _table(doc, "network")
    _check_keys(
        n,
        {
            "same_zone_ms",
            "cross_zone_ms",
            "jitter_median_ms",
            "jitter_sigma",
            "loss",
            "rebalance_quantum_ms",
        },
        "network",
    )
    loss = _num(n, "loss", 0.0, "network")
    if not 0.0 <= loss < 1.0:
        raise ScenarioError("network.loss: expected a probability in [0, 1)")
    link = LinkModel(
        same_zone_s=_num(n, "same_zone_ms", 0.5, "network") / 1000,
        cross_zone_s=_num(n, "cross_zone_ms", 2.0, "network") / 1000,
        jitter_median_s=_num(n, "jitter_median_ms", 0.2, "network") / 1000,
        jitter_sigma=_num(n, "jitter_sigma", 0.5, "network"),
        loss=loss,
    )
    quantum = _num(n, "rebalance_quantum_ms", 1.0, "network") / 1000

    def server(key: str, bandwidth: str, latency_ms: float, has_image: bool) -> Server:
        t = _table(doc, key)
        _check_keys(t, {"bandwidth", "latency_ms", "has_image"}, key)
        return Server(
            bandwidth=parse_size(t.get("bandwidth", bandwidth), f"{key}.bandwidth"),
            latency_s=_num(t, "latency_ms", latency_ms, key) / 1000,
            has_image=bool(t.get("has_image", has_image)),
        )

    upstream = server("upstream", "1250MB/s", 20.0, True)
    central = server("central", "1250MB/s", 1.0, False)

    im = _table(doc, "image")
    _check_keys(im, {"layers"}, "image")
    layers = tuple(int(parse_size(x, "image.layers")) for x in im.get("layers", []))

    pull = None
    if "pull" in doc:
        p = _table(doc, "pull")
        _check_keys(p, {"start", "spread", "cells"}, "pull")
        who = p.get("cells", "all")
        if who == "all":
            who = -1
        elif not isinstance(who, int) or isinstance(who, bool) or not 0 < who <= count:
            raise ScenarioError("pull.cells: expected 'all' or a count of cells")
        pull = Pull(_num(p, "start", 1.0, "pull"), _num(p, "spread", 0.0, "pull"), who)
        if not layers:
            raise ScenarioError("[pull] needs [image] layers")

    m = dict(_table(doc, "membership"))
    mode = m.pop("mode", "swim")
    if mode not in ("swim", "static"):
        raise ScenarioError("membership.mode: expected 'swim' or 'static'")
    seeds = m.pop("seeds", 3)
    if not isinstance(seeds, int) or seeds < 1:
        raise ScenarioError("membership.seeds: expected a positive integer")
    sw = _table(doc, "swarm")

    strategies = doc.get("strategies", ["celld"])
    if (
        not isinstance(strategies, list)
        or not strategies
        or any(s not in STRATEGIES for s in strategies)
    ):
        raise ScenarioError(f"strategies: expected a list drawn from {', '.join(STRATEGIES)}")

    faults = []
    for i, f in enumerate(doc.get("faults", [])):
        where = f"faults[{i}]"
        if not isinstance(f, dict):
            raise ScenarioError(f"{where}: expected a table")
        _check_keys(f, {"at", "kind", "cells", "count", "zones"}, where)
        kind = f.get("kind")
        if kind not in FAULT_KINDS:
            raise ScenarioError(f"{where}.kind: expected one of {', '.join(FAULT_KINDS)}")
        idx = f.get("cells", [])
        if not isinstance(idx, list) or not all(isinstance(x, int) and 0 <= x < count for x in idx):
            raise ScenarioError(f"{where}.cells: expected indices of initial cells")
        fz = f.get("zones", [])
        if any(z not in cells.zones for z in fz):
            raise ScenarioError(f"{where}.zones: unknown zone")
        fcount = f.get("count", 0)
        if kind == "join" and (not isinstance(fcount, int) or fcount < 1):
            raise ScenarioError(f"{where}.count: a join needs count >= 1")
        if kind == "partition" and not fz:
            raise ScenarioError(f"{where}.zones: a partition cuts these zones from the rest")
        faults.append(Fault(_num(f, "at", 0.0, where), kind, tuple(idx), fcount, tuple(fz)))
    faults.sort(key=lambda f: f.at)

    g = _table(doc, "goals")
    _check_keys(g, set(GOALS), "goals")
    goals = tuple((k, _num(g, k, 0.0, "goals")) for k in GOALS if k in g)

    duration = _num(doc, "duration", 60.0, "top level")
    if duration <= 0:
        raise ScenarioError("duration: must be positive")
    seed = doc.get("seed", 1)
    if not isinstance(seed, int):
        raise ScenarioError("seed: expected an integer")
    return Scenario(
        name=str(doc.get("name", default_name)),
        description=str(doc.get("description", "")),
        duration=duration,
        seed=seed,
        strategies=tuple(strategies),
        cells=cells,
        link=link,
        quantum=quantum,
        upstream=upstream,
        central=central,
        layers=layers,
        pull=pull,
        membership_mode=mode,
        seeds=seeds,
        membership=tuple(sorted(m.items())),
        swarm=tuple(sorted(sw.items())),
        faults=tuple(faults),
        goals=goals,
    )
