"""The report of a scenario: one JSON file and a few PNG plots.

Owns: running every strategy a scenario names, checking the scenario's goals against
the subject strategy (the first), and drawing the plots when matplotlib (the `sim`
extra) is installed; without it the report is the same and the plots are skipped.
Never: puts anything run-dependent but the simulation's own results in report.json (no
wall time, no paths, no dates), so the same seed gives the same bytes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from simulations.model.scenario import Scenario, load
from simulations.model.world import World


def simulate(sc: Scenario) -> dict[str, Any]:
    """Run every strategy of `sc` and return the report (a JSON-ready dict)."""
    runs = {strategy: World(sc, strategy).run() for strategy in sc.strategies}
    return {
        "scenario": {
            "name": sc.name,
            "description": sc.description,
            "seed": sc.seed,
            "cells": sc.cells.count,
            "zones": list(sc.cells.zones),
            "duration_s": sc.duration,
            "layers_bytes": list(sc.layers),
            "image_bytes": sc.image_size,
            "loss": sc.link.loss,
            "strategies": list(sc.strategies),
        },
        "goals": check_goals(sc, runs[sc.strategies[0]]),
        "runs": runs,
    }


def _measure(goal: str, run: dict[str, Any]) -> float | None:
    pull = run.get("pull", {})
    mem = run.get("membership", {})
    events = mem.get("events", [])
    if goal == "completion_p99_max_s":
        if not pull or pull["incomplete"]:
            return math.inf if pull else None
        return pull["completion_s"]["p99"]
    if goal == "origin_copies_max":
        return run["bytes"]["origin_copies"] if "bytes" in run else None
    if goal == "upload_copies_max":
        return run["upload"]["max_copies"] if "upload" in run else None
    if goal in ("join_converged_max_s", "dead_detected_max_s"):
        kind = "join" if goal == "join_converged_max_s" else "dead"
        times = [e["t100_s"] for e in events if e["kind"] == kind]
        if not times:
            return None
        return math.inf if None in times else max(times)
    if goal == "first_detection_max_s":
        times = [e["first_suspect_s"] for e in events if e["kind"] == "dead"]
        if not times:
            return None
        return math.inf if None in times else max(times)
    if goal == "false_dead_max":
        return float(mem.get("false_dead", 0))
    return None


def check_goals(sc: Scenario, run: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for goal, limit in sc.goals:
        measured = _measure(goal, run)
        met = measured is not None and measured <= limit
        shown = None if measured is None or math.isinf(measured) else measured
        out.append({"goal": goal, "limit": limit, "measured": shown, "met": met})
    return out


def write_report(report: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.json"
    path.write_text(json.dumps(report, indent=1, sort_keys=True, allow_nan=False) + "\n")
    return path


SIM_EXTRA = "pip install 'celld[sim]'"


def run_scenario(
    path: str | Path, out_dir: str | Path, seed: int | None = None, *, plots: bool = True
) -> dict:
    """Simulate the scenario at `path`, write report.json and (with `plots`, when
    matplotlib is installed: see `draw_plots`) the plots into `out_dir`, and return
    the report. `seed` overrides the scenario's."""
    sc = load(path)
    if seed is not None:
        sc = sc.with_seed(seed)
    report = simulate(sc)
    out = Path(out_dir)
    write_report(report, out)
    if plots:
        draw_plots(report, out)
    return report


def draw_plots(report: dict[str, Any], out_dir: Path) -> str | None:
    """Draws the PNG plots into `out_dir`; None when drawn, else why not. The plots
    need matplotlib (the `sim` extra), which `./scripts/serve`'s install leaves out;
    the simulation and its report do not need it."""
    try:
        from simulations.model.plots import draw
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").split(".")[0]
        if not missing or missing in ("simulations", "protocol", "celld"):
            raise  # our own import broke: a bug, not a missing extra
        if missing == "matplotlib":
            return "matplotlib is not installed"
        return f"matplotlib cannot be imported (no module named {missing!r})"
    draw(report, out_dir)
    return None
