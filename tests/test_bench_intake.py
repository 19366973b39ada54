"""The intake benchmark still runs end to end and prints every figure the README quotes.

Not a timing test: a small blob, one round, and only the shape of the report is
checked, so a change that breaks a contender (the registry, nginx, celld's
intake on a HEAD or a GET, a cell taking a blob from its peer) is caught here
rather than at the next run. The bench itself fails when a cell took a byte
from anything but the source it stands for.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from simulations.bench import bare_intake
from simulations.bench.intake import REPO, registry_file, seed_blob
from tests.support.procs import run_module
from tests.support.registry import Registry

NUMBER = r"[0-9]+(?:\.[0-9]+)?"
CONTENDERS = [
    "direct",
    "direct to file",
    "bare pipeline",
    "nginx",
    "celld<-registry",
    "celld<-nginx",
    "celld<-peer",
    "celld<-registry GET",
    "celld<-nginx GET",
    "celld<-registry committed",
    "celld<-nginx committed",
]


def test_intake_bench_reports_every_contender():
    before = set(Path("/dev/shm").glob("celld-intake-*"))
    report = run_module("simulations.bench.intake", "--size-mib", "8", "--rounds", "1")
    header = "intake of an uncached 8 MiB blob, median of 1 rounds, warm pages (a ballast):"
    assert header in report, report
    for name in CONTENDERS:
        line = rf"^{re.escape(name)}( +{NUMBER}){{5}}(   rounds: {NUMBER})?$"
        assert re.search(line, report, re.M), (name, report)
    for name in ("celld<-registry", "celld<-nginx", "celld<-peer", "celld<-peer giver"):
        assert re.search(rf"^{re.escape(name)} peak RSS: {NUMBER} MiB$", report, re.M), report
    # Each intake's CPU per GiB, the taker's and its giver's: every process did some work
    cpu = re.search(r"^CPU-s per GiB taken in \(median; [^)]*\): (.*)$", report, re.M)
    assert cpu, report
    figures = dict(part.rsplit(" ", 1) for part in cpu.group(1).split(", "))
    assert set(figures) == {
        "celld<-registry",
        "celld<-nginx",
        "celld<-peer",
        "celld<-peer giver",
        "bare pipeline",
    }
    assert all(float(v) > 0 for v in figures.values()), report
    assert set(Path("/dev/shm").glob("celld-intake-*")) == before  # its ballast removed


def test_the_bare_pipeline_takes_in_a_blob_and_checks_its_digest(
    hub: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The intake bench's floor does the work it stands for: every byte of the blob
    lands in the file, and bytes that are not the digest's fail it."""
    size = 3 * 2**20 + 5
    digest = seed_blob(hub, REPO, size)
    url = f"{hub.url}/v2/{REPO}/blobs/{digest}"
    out = tmp_path / "bare.out"
    assert bare_intake.main([url, digest, str(size), str(out)]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["mib_s"] > 0 and figures["cpu_s_per_gib"] > 0
    assert out.read_bytes() == registry_file(hub, digest).read_bytes()
    wrong = "sha256:" + "0" * 64
    assert bare_intake.main([url, wrong, str(size), str(out)]) == 1
    assert "not " + wrong in capsys.readouterr().err
