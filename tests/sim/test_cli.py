"""`python -m simulations run` writes report.json and the plots an operator looks at."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCENARIOS = Path(__file__).resolve().parents[2] / "simulations" / "scenarios"
ROOT = SCENARIOS.parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def _run(*args: str, hash_seed: str = "0") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "simulations", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONHASHSEED": hash_seed},
    )


def test_cli_writes_report_and_plots_for_a_storm(tmp_path: Path) -> None:
    out = tmp_path / "storm"
    proc = _run("run", str(SCENARIOS / "tiny_storm.toml"), "--out", str(out), "--seed", "5")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["scenario"]["seed"] == 5
    assert set(report["runs"]) == {"celld", "central-only", "spegel"}
    for name in ("completion_cdf.png", "bytes_by_source.png", "upload_per_cell.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000, name
    assert "celld" in proc.stdout and "p99" in proc.stdout


def test_cli_draws_membership_convergence(tmp_path: Path) -> None:
    out = tmp_path / "members"
    proc = _run("run", str(SCENARIOS / "tiny_membership.toml"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert (out / "membership_convergence.png").read_bytes().startswith(PNG)
    assert json.loads((out / "report.json").read_text())["runs"]["celld"]["membership"]["events"]


def test_cli_explains_a_bad_scenario(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[cells]\ncount = 3\nupload = "very fast"\n')
    proc = _run("run", str(bad), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert "cells.upload" in proc.stderr
    assert not (tmp_path / "out" / "report.json").exists()


def test_same_seed_same_bytes_across_processes(tmp_path: Path) -> None:
    """Different string hashing per process must not change anything (no set or dict
    order of names leaks into the simulation)."""
    reports = []
    for hash_seed in ("1", "2"):
        out = tmp_path / hash_seed
        proc = _run(
            "run", str(SCENARIOS / "tiny_storm.toml"), "--out", str(out), hash_seed=hash_seed
        )
        assert proc.returncode == 0, proc.stderr
        reports.append((out / "report.json").read_bytes())
    assert reports[0] == reports[1]


def test_celld_simulate_is_the_same_command(tmp_path: Path) -> None:
    """Operators run `celld simulate`; it is `python -m simulations run`, same report."""
    out = tmp_path / "via-celld"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "celld",
            "simulate",
            str(SCENARIOS / "tiny_membership.toml"),
            "--out",
            str(out),
            "--seed",
            "3",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    assert proc.returncode == 0, proc.stderr
    direct = tmp_path / "direct"
    assert (
        _run(
            "run", str(SCENARIOS / "tiny_membership.toml"), "--out", str(direct), "--seed", "3"
        ).returncode
        == 0
    )
    assert (out / "report.json").read_bytes() == (direct / "report.json").read_bytes()


# What `import matplotlib` does where it is not installed (./scripts/serve's install):
# every finder comes up empty and the import raises ModuleNotFoundError.
NO_MATPLOTLIB = """\
import sys


class _NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _NotInstalled())
"""


def test_celld_simulate_without_matplotlib_writes_the_report_and_says_what_draws_plots(
    tmp_path: Path,
) -> None:
    """The issue's command after the README's install: no traceback; the run, the
    report and the summary as with matplotlib, one line about the plots, same status."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(NO_MATPLOTLIB)
    pythonpath = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "celld", "simulate", str(SCENARIOS / "tiny_storm.toml")]
    proc = subprocess.run(
        [*argv, "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": pythonpath},
    )
    assert proc.stderr == (
        "plots skipped: matplotlib is not installed; pip install 'celld[sim]' draws them\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert "celld" in proc.stdout and "p99" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["report.json"]
    with_plots = tmp_path / "with-plots"
    assert _run("run", str(SCENARIOS / "tiny_storm.toml"), "--out", str(with_plots)).returncode == 0
    assert (with_plots / "completion_cdf.png").exists()
    assert (out / "report.json").read_bytes() == (with_plots / "report.json").read_bytes()
