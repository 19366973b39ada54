"""The serve benchmark still runs end to end and prints every figure the README quotes.

Not a timing test: a small blob, one round, and only the shape of the report is
checked, so a change that breaks a contender (celld, nginx, the registry, the
reverse proxy, the TCP relay) is caught here rather than at the next bench run.
"""

from __future__ import annotations

import re

from simulations.bench.serve import goal_line
from tests.support.procs import run_module

NUMBER = r"[0-9]+(?:\.[0-9]+)?"


ARGS = ["--size-mib", "1", "--rounds", "1", "--ttfb-blobs", "2"]


def test_serve_bench_reports_every_contender():
    report = run_module("simulations.bench.serve", *ARGS)
    for clients in (1, 16):
        assert re.search(rf"^\s+{clients}( +{NUMBER}){{5}}$", report, re.M), report
    assert re.search(rf"^celld peak RSS: {NUMBER} MiB$", report, re.M), report
    for name in ("celld", "nginx-proxy", "tcp-relay"):
        line = (
            rf"^uncached 1 MiB TTFB, median of 2: {name} {NUMBER} ms, direct {NUMBER} ms, "
            rf"ratio {NUMBER}; median of paired ratios {NUMBER}, of paired differences "
            rf"[+-]{NUMBER} ms$"
        )
        assert re.search(line, report, re.M), report
    assert re.search(
        rf"^uncached 1 MiB throughput, median of 2: celld {NUMBER} MiB/s", report, re.M
    ), report
    goal = rf"^goal: celld added [+-]{NUMBER} ms (<=|>) nginx-proxy added [+-]{NUMBER} ms \+ 0\.5 ms: (met|missed)$"
    assert re.search(goal, report, re.M), report


def test_goal_line_says_met_or_missed_by_the_added_times():
    assert goal_line(0.0013, 0.0009) == (
        "goal: celld added +1.30 ms <= nginx-proxy added +0.90 ms + 0.5 ms: met"
    )
    assert goal_line(0.0022, 0.0016) == (
        "goal: celld added +2.20 ms > nginx-proxy added +1.60 ms + 0.5 ms: missed"
    )
    assert goal_line(0.0014, 0.0009).endswith(": met")  # the margin is inclusive
