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


def _cdf(ax: Any, values: list[float], total: int, strategy: str, label: str) -> None:
    """A step CDF of sorted `values` over `total` cells (cells missing stay below 1)."""
    ys = [(i + 1) / total for i in range(len(values))]
    ax.step(values, ys, where="post", color=COLORS.get(strategy), label=label)
    ax.set_ylabel("fraction of cells")
    ax.set_ylim(0, 1.02)
    ax.grid(True, which="both", alpha=0.3)


def _completion(runs: dict[str, Any], name: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for strategy, run in runs.items():
        pull = run["pull"]
        if pull["times_s"] and pull["cells"]:
            p99 = pull["completion_s"]["p99"]
            _cdf(ax, pull["times_s"], pull["cells"], strategy, f"{strategy} (p99 {p99:.1f} s)")
    ax.set_xscale("log")
    ax.set_xlabel("time from pull start to image complete (s, log)")
    ax.legend()
    ax.set_title(f"{name}: completion time per cell")
    return _save(fig, path)


def _bytes(runs: dict[str, Any], name: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels = list(runs)
    sources = (
        ("from_upstream", "tab:purple"),
        ("from_central", "tab:green"),
        ("from_peers", "tab:gray"),
    )
    width = 0.8 / len(sources)
    for k, (key, color) in enumerate(sources):
        copies = [runs[s]["bytes"][key] / runs[s]["bytes"]["image_bytes"] for s in labels]
        xs = [i + (k - 1) * width for i in range(len(labels))]
        bars = ax.bar(xs, copies, width, label=key.replace("_", " "), color=color)
        ax.bar_label(bars, labels=[f"{c:.3g}" if c else "" for c in copies], fontsize="small")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yscale("log")
    ax.set_ylim(bottom=0.1)
    ax.set_ylabel("bytes received by cells (image copies, log)")
    ax.legend()
    ax.set_title(f"{name}: bytes by source")
    return _save(fig, path)


def _upload(runs: dict[str, Any], name: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for strategy, run in runs.items():
        copies = run["upload"]["per_cell_copies"]
        if copies:
            _cdf(ax, copies, len(copies), strategy, f"{strategy} (max {copies[-1]:.2f})")
    ax.set_xlabel("bytes uploaded by a cell (image copies)")
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
