"""`python -m simulations run SCENARIO.toml --out DIR [--seed N]`: simulate and report.

Writes DIR/report.json and PNG plots, prints a short summary and the wall time (the
wall time goes to the terminal only, never into the report, which stays byte-identical
for a given seed). Without matplotlib (the `sim` extra) the run, the report and the
summary are the same; one line on stderr says the plots were skipped and what draws
them, and the exit status does not change.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from simulations.model import run_scenario
from simulations.model.report import SIM_EXTRA, draw_plots
from simulations.model.scenario import ScenarioError
from simulations.model.summary import summarize


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="simulate a scenario and write report.json and plots")
    run.add_argument("scenario", type=Path, help="a TOML scenario (simulations/scenarios/)")
    run.add_argument("--out", type=Path, required=True, help="directory for the report")
    run.add_argument("--seed", type=int, default=None, help="override the scenario's seed")
    args = parser.parse_args(argv)

    started = time.monotonic()
    try:
        report = run_scenario(args.scenario, args.out, seed=args.seed, plots=False)
    except (ScenarioError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # The plots are extra: without matplotlib the run, report and summary stand.
    if (skipped := draw_plots(report, args.out)) is not None:
        print(f"plots skipped: {skipped}; {SIM_EXTRA} draws them", file=sys.stderr)
    print(summarize(report))
    print(f"wall time {time.monotonic() - started:.1f} s; report in {args.out / 'report.json'}")
    return 0 if all(g["met"] for g in report["goals"]) else 1


if __name__ == "__main__":
    sys.exit(main())
