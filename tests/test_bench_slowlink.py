"""The slow-link benchmark still runs end to end, prints every figure, and leaves no namespace.

Not a timing test: a small blob, one round, on a link fast enough to take
seconds, and only the shape of the report is checked, so a change that breaks a
contender (nginx, curl, a cell taking a blob from its peer or as the lease holder
from the registry, the shaping) is caught here rather than at the next run.
"""

from __future__ import annotations

import re
import subprocess

from tests.support.procs import run_module

NUMBER = r"[0-9]+(?:\.[0-9]+)?"
LINES = [
    "nginx",
    "celld giver",
    "curl <- nginx",
    "celld taker",
    "curl <- registry",
    "celld lease holder",
]
RATIOS = [
    "celld giver / nginx",
    "celld taker / curl <- nginx",
    "celld lease holder / curl <- registry",
]


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def test_slowlink_bench_reports_every_contender_and_cleans_up():
    before = _namespaces()
    argv = ["--rate", "400mbit", "--size-mib", "8", "--rounds", "1"]
    report = run_module("simulations.bench.slowlink", *argv)
    header = "CPU-s per GiB of a 8 MiB blob over loopback shaped to 400mbit (tbf), median of 1"
    assert header in report, report
    for name in LINES:
        assert re.search(rf"^{re.escape(name)} +{NUMBER}   rounds: {NUMBER}$", report, re.M), (
            name,
            report,
        )
    for name in RATIOS:
        assert re.search(rf"^{re.escape(name)}: {NUMBER}$", report, re.M), (name, report)
    assert _namespaces() == before
