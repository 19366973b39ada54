"""PNG plots of a report (matplotlib, Agg backend: no display needed).

Owns: turning a report dict into figures.
Never: computes a result (everything drawn is already in report.json).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

COLORS = {"celld": "tab:blue", "central-only": "tab:red", "spegel": "tab:orange"}


def draw(report: dict[str, Any], out: Path) -> list[Path]:
    """Write the plots that apply to this report; returns their paths."""
    runs: dict[str, dict[str, Any]] = report["runs"]
    name = report["scenario"]["name"]
    written = []
    if any("pull" in run for run in runs.values()):
        written.append(_completion(runs, name, out / "completion_cdf.png"))
        written.append(_bytes(runs, name, out / "bytes_by_source.png"))
        written.append(_upload(runs, name, out / "upload_per_cell.png"))
        written.append(_timeline(runs, name, out / "timeline.png"))
    first = next(iter(runs.values()))
    if first["membership"]["events"]:
        written.append(_membership(first, name, out / "membership_convergence.png"))
    return written


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _completion(runs: dict[str, Any], name: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for strategy, run in runs.items():
        times = run["pull"]["times_s"]
        total = run["pull"]["cells"]
        if not times or not total:
            continue
        ys = [(i + 1) / total for i in range(len(times))]
        p99 = run["pull"]["completion_s"]["p99"]
        ax.step(
            times,
            ys,
            where="post",
            color=COLORS.get(strategy),
            label=f"{strategy} (p99 {p99:.1f} s)",
        )
    ax.set_xscale("log")
    ax.set_xlabel("time from pull start to image complete (s, log)")
    ax.set_ylabel("fraction of cells")
    ax.set_ylim(0, 1.02)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title(f"{name}: completion time per cell")
    return _save(fig, path)


def _bytes(runs: dict[str, Any], name: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels = list(runs)
    parts = {"from_upstream": [], "from_central": [], "from_peers": []}
    for strategy in labels:
        b = runs[strategy]["bytes"]
        for k in parts:
            parts[k].append(b[k])
    bottom = [0.0] * len(labels)
    for k, color in zip(parts, ("tab:purple", "tab:green", "tab:gray"), strict=True):
        vals = [v / 1e9 for v in parts[k]]
        ax.bar(labels, vals, bottom=bottom, label=k.replace("_", " "), color=color)
        bottom = [a + b for a, b in zip(bottom, vals, strict=True)]
    ax.set_ylabel("GB received by cells")
    ax.set_yscale("symlog")
    ax.legend()
    ax.set_title(f"{name}: bytes by source")
    return _save(fig, path)


def _upload(runs: dict[str, Any], name: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for strategy, run in runs.items():
        copies = run["upload"]["per_cell_copies"]
        if not copies:
            continue
        ys = [(i + 1) / len(copies) for i in range(len(copies))]
        ax.step(
            copies,
            ys,
            where="post",
            color=COLORS.get(strategy),
            label=f"{strategy} (max {copies[-1]:.2f})",
        )
    ax.set_xlabel("bytes uploaded by a cell (image copies)")
    ax.set_ylabel("fraction of cells")
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(f"{name}: upload per cell")
    return _save(fig, path)


def _timeline(runs: dict[str, Any], name: str, path: Path) -> Path:
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for strategy, run in runs.items():
        rows = run["timeline"]["rows"]
        if not rows:
            continue
        ts = [row[0] for row in rows]
        color = COLORS.get(strategy)
        top.plot(ts, [row[1] for row in rows], color=color, label=f"{strategy}: cells done")
        top.plot(
            ts,
            [row[2] for row in rows],
            color=color,
            linestyle=":",
            label=f"{strategy}: peer upload in use",
        )
        bottom.plot(ts, [row[3] for row in rows], color=color, label=strategy)
    top.set_ylabel("fraction")
    top.set_ylim(0, 1.02)
    top.grid(True, alpha=0.3)
    top.legend(fontsize="small")
    bottom.set_ylabel("MB/s out of the registries")
    bottom.set_xlabel("simulated time (s, log)")
    bottom.set_xscale("log")
    bottom.grid(True, which="both", alpha=0.3)
    bottom.legend(fontsize="small")
    top.set_title(f"{name}: over time")
    return _save(fig, path)


def _membership(run: dict[str, Any], name: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for e in run["membership"]["events"][:12]:
        xs = [p[0] - e["at"] for p in e["curve"]]
        ys = [p[1] for p in e["curve"]]
        what = "knows it joined" if e["kind"] == "join" else "declared it dead"
        ax.step(
            xs, ys, where="post", label=f"cell {e['member']} {e['kind']} at {e['at']:g} s: {what}"
        )
    ax.set_xlabel("time since the event (s)")
    ax.set_ylabel("fraction of live cells")
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title(f"{name}: membership convergence")
    return _save(fig, path)
