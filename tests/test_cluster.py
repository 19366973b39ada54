"""Cells meet: real `celld serve` processes gossiping over UDP on loopback addresses.

Each cell listens on its own 127.0.0.X address (gossip over UDP and the peer API over
TCP on the same port), with the same cluster key, joining through seeds as an
operator would configure them. What is asserted is what an operator checks:
`celld peers`, the metrics, and how fast a leave or a crash is seen.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from protocol import wire
from tests.support.celld import Celld, Cluster, cluster_address
from tests.support.procs import wait_until

KEY = bytes(range(32))


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "cluster.key"
    path.write_text(KEY.hex() + "\n")
    return path


@pytest.fixture
def start_cell(tmp_path: Path, key_file: Path) -> Iterator[Callable[..., Celld]]:
    cells: list[Celld] = []

    def start(name: str, listen: str, seeds: tuple[str, ...] = (), **kw) -> Celld:
        cell = Celld(
            tmp_path / name,
            name=name,
            key_file=key_file,
            cluster=Cluster(listen, seeds),
            upstreams={"docker.io": "http://127.0.0.1:9"},
            **kw,
        ).start()
        cells.append(cell)
        return cell

    yield start
    for cell in cells:
        cell.stop()


def states(cell: Celld) -> dict[str, str]:
    return {name: m["state"] for name, m in cell.peers().items()}


def three_cells(start_cell) -> tuple[Celld, Celld, Celld]:
    a_addr, b_addr, c_addr = (cluster_address(i) for i in range(3))
    a = start_cell("cell-a", a_addr)
    b = start_cell("cell-b", b_addr, (a_addr,))
    c = start_cell("cell-c", c_addr, (b_addr,))
    everyone = {"cell-a": "alive", "cell-b": "alive", "cell-c": "alive"}
    for cell in (a, b, c):
        wait_until(lambda cell=cell: states(cell) == everyone, 10, f"{cell.name} sees all")
    return a, b, c


def test_cells_form_a_cluster_from_seeds(start_cell):
    a, b, c = three_cells(start_cell)
    # C named only B as its seed, yet A knows C's address: it came by gossip.
    assert a.peers()["cell-c"]["addr"] == c.cluster.listen
    assert a.peers()["cell-b"]["last_heard"] is not None
    assert a.metric("celld_gossip_members", state="alive") == 3
    assert a.metric("celld_gossip_datagrams_received_total") > 0
    assert a.metric("celld_gossip_datagrams_sent_total") > 0

    out = subprocess.run(
        [sys.executable, "-m", "celld", "peers", "--config", str(a.config_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:4] == ["NAME", "ADDRESS", "ZONE", "STATE"]
    assert any(line.startswith("cell-a (this cell)") for line in lines)
    assert sum(" alive " in line for line in lines) == 3
    doc = json.loads(
        subprocess.run(
            [sys.executable, "-m", "celld", "peers", "--json", "--config", str(b.config_path)],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    )
    assert {m["name"] for m in doc["members"]} == {"cell-a", "cell-b", "cell-c"}


def test_a_lone_cell_says_so(tmp_path):
    cell = Celld(tmp_path / "alone", upstreams={"docker.io": "http://127.0.0.1:9"}).start()
    try:
        out = subprocess.run(
            [sys.executable, "-m", "celld", "peers", "--config", str(cell.config_path)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 0
        assert "alone" in out.stdout
    finally:
        cell.stop()


def test_sigterm_leaves_and_peers_know_at_once(start_cell):
    a, b, c = three_cells(start_cell)
    c.stop()  # SIGTERM
    took = wait_until(lambda: states(a).get("cell-c") == "left", 3, "A sees C left")
    assert states(b).get("cell-c") == "left"
    # a leave is news, not a failure: nobody had to suspect C first
    assert "member cell-c: left the cluster" in a.log()
    assert "member cell-c: suspected" not in a.log() + b.log()
    assert took < 3


def test_kill_9_is_declared_dead_and_a_restart_rejoins(start_cell, tmp_path):
    a, b, c = three_cells(start_cell)
    b.kill()
    killed = time.monotonic()
    wait_until(lambda: states(a).get("cell-b") == "dead", 15, "A declares B dead")
    wait_until(lambda: states(c).get("cell-b") == "dead", 5, "C declares B dead")
    dead_after = time.monotonic() - killed
    assert a.metric("celld_gossip_probe_failures_total") >= 1
    assert "member cell-b: suspected by" in a.log() + c.log()
    # a few protocol periods (1 s each), as membership.py's figures say for small clusters
    assert dead_after < 15

    b.start()  # same name, same data dir: it rejoins and refutes its death
    wait_until(lambda: states(a).get("cell-b") == "alive", 10, "A sees B back")
    wait_until(lambda: states(c).get("cell-b") == "alive", 10, "C sees B back")
    assert a.peers()["cell-b"]["incarnation"] >= 1


def test_forged_stale_and_replayed_datagrams_are_dropped_and_counted(start_cell):
    a, b, _ = three_cells(start_cell)
    host, port = a.cluster.listen.rsplit(":", 1)
    target = (host, int(port))
    now = time.time()
    forger = wire.Codec(os.urandom(32), "cell-x", now=now)
    insider = wire.Codec(KEY, "cell-x", now=now)
    stale = insider.seal(wire.Gossip(()), now - 120)
    fresh = insider.seal(wire.Gossip(()), now)
    older = bytes([1]) + insider.seal(wire.Gossip(()), now)[1:]  # a cell of 2 MiB pieces
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(older, target)
        s.sendto(b"\x01garbage", target)
        s.sendto(b"\x00" * 2000, target)
        s.sendto(forger.seal(wire.Gossip(()), now), target)
        s.sendto(stale, target)
        s.sendto(fresh, target)
        s.sendto(fresh, target)  # the same bytes again: a replay

    def dropped(reason: str) -> float:
        return a.metric("celld_gossip_datagrams_dropped_total", reason=reason)

    wait_until(lambda: dropped("replayed") == 1, 5, "the replay is counted")
    assert dropped("truncated") == 1
    assert dropped("oversized") == 1
    assert dropped("bad_mac") == 1
    assert dropped("stale") == 1
    assert dropped("bad_version") == 1
    assert "Traceback" not in a.log()
    # nothing of it disturbed the cluster
    assert states(a) == {"cell-a": "alive", "cell-b": "alive", "cell-c": "alive"}
    assert "cell-x" not in states(b)


def test_a_taken_cluster_address_is_one_line_naming_the_key(tmp_path, key_file):
    addr = cluster_address(0)
    host, port = addr.rsplit(":", 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind((host, int(port)))
        cell = Celld(tmp_path / "c", key_file=key_file, cluster=Cluster(addr))
        cell.write_config()
        out = subprocess.run(
            [sys.executable, "-m", "celld", "serve", "--config", str(cell.config_path)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert out.returncode == 1
    assert (
        out.stderr.strip() == f"celld: cannot start: cluster.listen {addr}: address already in use"
    )
