"""A few human lines from a report (what the command prints)."""

from __future__ import annotations

from typing import Any


def summarize(report: dict[str, Any]) -> str:
    sc = report["scenario"]
    lines = [f"{sc['name']}: {sc['cells']} cells, seed {sc['seed']}"]
    for strategy, run in report["runs"].items():
        parts = [f"  {strategy:13}"]
        pull = run.get("pull")
        if pull:
            c = pull["completion_s"]
            if c["count"]:
                parts.append(f"done {pull['completed']}/{pull['cells']}")
                parts.append(f"p50 {c['p50']:.2f} s p99 {c['p99']:.2f} s max {c['max']:.2f} s")
            else:
                parts.append(f"done 0/{pull['cells']}")
            b = run["bytes"]
            parts.append(f"origin {b['origin_copies']:.3f} copies")
            parts.append(f"max upload {run['upload']['max_copies']:.2f} copies")
        mem = run["membership"]
        for e in mem["events"][:4]:
            t = e["t100_s"]
            parts.append(
                f"{e['kind']} {e['member']}: all in "
                + (f"{t:.2f} s" if t is not None else f"never ({e['final_fraction']:.3f})")
            )
        if mem["events"] or mem.get("false_dead"):
            parts.append(f"false dead {mem['false_dead']}")
        m = run["messages"]
        parts.append(f"{m['per_cell_per_s']:.1f} msg/cell/s")
        lines.append("  ".join(parts))
    for g in report["goals"]:
        mark = "met " if g["met"] else "MISSED"
        lines.append(f"  goal {g['goal']} <= {g['limit']}: {g['measured']} {mark}")
    return "\n".join(lines)
