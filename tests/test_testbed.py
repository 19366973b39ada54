"""The testbed as its user runs it: a small storm, a kill, and interruptions.

Each test runs `python -m simulations.testbed` as a separate process, as root,
in network namespaces it builds itself (3 cells, an image of a few MiB, links
of 100-200 mbit), and checks what a user would: every cell completed with the
image's digest, the figures are printed and add up, and nothing of the run
(namespace, veth, bridge, process) is left afterwards, also when the run is
interrupted or killed. Where namespaces cannot be made, the storm says why and
the test fails with that reason: it never skips.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from celld.config import Listen, from_dict, load_cluster_key
from simulations.testbed import links, net, pull
from simulations.testbed.ballast import Ballast, MiB, filesystem_type, free_bytes
from simulations.testbed.storm import cluster_lines

REPO = Path(__file__).resolve().parents[1]


def start_testbed(*args: str, **kw: object) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "simulations.testbed", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        **kw,  # type: ignore[arg-type]
    )


def finish(proc: subprocess.Popen, timeout: float = 120) -> str:
    out, _ = proc.communicate(timeout=timeout)
    return out


def wait_for_line(proc: subprocess.Popen, needle: str, timeout: float = 60) -> str:
    """Read the storm's output until `needle`; what it printed so far."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            break
        seen.append(line)
        if needle in line:
            return "".join(seen)
    proc.kill()
    raise AssertionError(f"no {needle!r} in the storm's output:\n{''.join(seen)}")


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that mention `text` (the run's work dir)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{entry.name}: {cmdline}")
    return found


def assert_nothing_left(rid: str, workdir: Path) -> None:
    assert net.leftovers(rid) == []
    assert not (net.OWNERS / rid).exists()
    assert processes_mentioning(str(workdir)) == []


def rid_for(tmp_path: Path) -> str:
    """A run id of this test's own (4 hex digits): parallel runs never share one."""
    return secrets.token_hex(2)


def test_storm_through_celld_and_the_pull_through_cache(tmp_path: Path) -> None:
    rid, workdir, report = rid_for(tmp_path), tmp_path / "wd", tmp_path / "storm.json"
    proc = start_testbed(
        "storm", "--cells", "3", "--image-mib", "4", "--link", "200mbit",
        "--run-id", rid, "--workdir", str(workdir), "--json", str(report),
    )  # fmt: skip
    out = finish(proc)
    assert proc.returncode == 0, out
    figures = json.loads(report.read_text())
    digest = figures["image_digest"]
    celld, proxy = figures["storms"]
    assert [celld["mode"], proxy["mode"]] == ["celld", "proxy"]
    for storm in (celld, proxy):
        assert storm["completed"] == 3
        assert {c["digest"] for c in storm["per_cell"].values()} == {digest}
        assert 0 < storm["p50_s"] <= storm["p99_s"] <= storm["max_s"]
        assert storm["limit_s"] == pytest.approx(storm["image_bytes"] * 8 / 200e6)
        # A cell's link cannot beat its rate: nobody finishes under the physical limit.
        assert storm["p50_s"] >= storm["limit_s"]
    image = celld["image_bytes"]
    # Cells share: the Hub sends about one copy (the fetch lease), the peers the rest.
    assert celld["hub_log"]["bytes"] + celld["central_log"]["bytes"] <= 1.05 * image
    assert celld["hub_wire_bytes"] >= image
    # celld's own count agrees with what skopeo stored (manifests included), to the byte.
    stored = sum(c["bytes"] for c in celld["per_cell"].values())
    fetched = celld["celld_fetched_bytes"]
    assert sum(fetched.values()) == stored
    assert fetched["peer"] >= 2 * image
    # What the peer APIs answered: at least the pieces the peers sent (4 MiB = 1 piece).
    assert celld["peer_requests"]["piece ok"] >= 2
    # Every blob GET the registries logged was a cell's whole read under a fetch lease.
    gets = celld["hub_log"]["blob_gets"] + celld["central_log"]["blob_gets"]
    assert celld["registry_reads"] == {"lease": gets}, out
    assert sum(celld["lease_reads"].values()) == gets
    assert set(celld["lease_reads"]) <= set(celld["per_cell"])
    # The cores' time over the storm, and the daemons' share of it.
    cpu = celld["cpu_s"]
    assert 0 < cpu["celld"] <= cpu["busy"] <= cpu["all"]
    assert "celld" not in proxy["cpu_s"] and proxy["cpu_s"]["all"] > 0
    # ...and the rest of it: the runtimes' (each skopeo's, from its worker), the
    # registries' and the kernel's softirq, where the links' shaping runs.
    for storm in (celld, proxy):
        cpu = storm["cpu_s"]
        assert all(c["client_cpu_s"] > 0 for c in storm["per_cell"].values())
        assert cpu["clients"] == pytest.approx(
            sum(c["client_cpu_s"] for c in storm["per_cell"].values())
        )
        assert 0 < cpu["registries"] < cpu["busy"] and 0 <= cpu["softirq"] < cpu["busy"]
    assert figures["runtime_procs"] == 1
    assert out.count("(skopeo, GOMAXPROCS=1)") == 2, out
    # How busy the links were, from their counters sampled through the storm: a share
    # of the rate, never much more (tbf lets a burst of 4 ms through, not a pull's worth).
    for storm in (celld, proxy):
        use = storm["link_use"]
        assert 0 < use["cells_down_whole"] <= 1.05 and 0 < use["cells_down_middle"] <= 1.05
        assert 0 < use["registry_up"] <= 1.05 and use["registry_busy_s"] > 0
    assert [celld["link_use"]["registry"], proxy["link_use"]["registry"]] == ["hub", "central"]
    # Where the tbf queues dropped packets, both ways of every host's link.
    for storm in (celld, proxy):
        drops = storm["queue_drops"]
        assert set(drops) == {"hub", "central", *storm["per_cell"]}
        assert all(v["up"] >= 0 and v["down"] >= 0 for v in drops.values())
    # The pull-through cache sends each cell a copy over the central's link.
    assert proxy["central_log"]["bytes"] == 3 * image
    assert proxy["central_wire_bytes"] >= 3 * image
    assert proxy["hub_log"]["bytes"] >= image
    for needle in (
        "p50 ",
        "p99 ",
        "max ",
        "physical limit",
        "p99/limit ",
        "from the Hub",
        "from central",
        "busiest link",
        "retransmitted",
        "link use ",
        "queue drops ",
        "cores ",
        ", skopeo ",
        ", softirq ",
    ):
        assert out.count(needle) == 2, out
    assert out.count("peer requests  piece ") == 1, out
    holders = ", ".join(f"{r} {n}" for r, n in sorted(celld["lease_reads"].items()))
    assert (
        f"registry reads {gets} blobs read whole from a registry: {gets} under a fetch lease"
        f" ({holders}), none without one" in out
    )
    assert "largest upload" in out
    assert "3/3 cells completed with the right digest" in out
    assert_nothing_left(rid, workdir)


def test_cells_killed_mid_storm_leave_the_others_complete(tmp_path: Path) -> None:
    rid, workdir, report = rid_for(tmp_path), tmp_path / "wd", tmp_path / "storm.json"
    proc = start_testbed(
        "storm", "--cells", "3", "--image-mib", "8", "--link", "100mbit", "--modes", "celld",
        "--cluster", "--kill", "1", "--kill-at", "0.3",
        "--run-id", rid, "--workdir", str(workdir), "--json", str(report),
    )  # fmt: skip
    out = finish(proc)
    assert proc.returncode == 0, out
    (storm,) = json.loads(report.read_text())["storms"]
    assert storm["killed"] == ["c03"]
    assert storm["completed"] == storm["survivors"] == 2
    assert "error" in storm["per_cell"]["c03"]
    digest = json.loads(report.read_text())["image_digest"]
    assert {storm["per_cell"][c]["digest"] for c in ("c01", "c02")} == {digest}
    assert "killed (-9) celld on c03" in out
    assert "2/2 cells completed with the right digest (1 killed: c03)" in out
    assert_nothing_left(rid, workdir)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_storm_removes_everything(tmp_path: Path, sig: signal.Signals) -> None:
    rid, workdir = rid_for(tmp_path), tmp_path / "wd"
    proc = start_testbed(
        "storm", "--cells", "3", "--image-mib", "16", "--link", "100mbit",
        "--run-id", rid, "--workdir", str(workdir),
    )  # fmt: skip
    wait_for_line(proc, "storm (celld)")
    time.sleep(2.5)  # past the storm's common start: skopeo, celld and registries all busy
    assert net.leftovers(rid), "the run's namespaces should exist mid-storm"
    assert processes_mentioning(str(workdir))
    proc.send_signal(sig)
    out = finish(proc, timeout=60)
    assert proc.returncode == 130, out
    assert f"interrupted ({sig.name})" in out
    assert f"cleaned up run {rid}" in out
    assert "Traceback" not in out
    assert_nothing_left(rid, workdir)


def test_cleanup_removes_what_a_killed_storm_left(tmp_path: Path) -> None:
    rid, workdir = rid_for(tmp_path), tmp_path / "wd"
    proc = start_testbed(
        "storm", "--cells", "2", "--image-mib", "16", "--link", "100mbit",
        "--run-id", rid, "--workdir", str(workdir),
    )  # fmt: skip
    wait_for_line(proc, "storm (celld)")
    proc.kill()  # no finally runs: the namespaces and their processes stay
    proc.wait()
    assert net.leftovers(rid)
    done = subprocess.run(
        [sys.executable, "-m", "simulations.testbed", "cleanup", "--run-id", rid],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"run {rid}: removed" in done.stdout
    assert_nothing_left(rid, workdir)


def tmpfs_mounts(rid: str) -> list[str]:
    lines = Path("/proc/mounts").read_text().splitlines()
    return [line.split()[1] for line in lines if line.startswith(f"ctb-{rid} ")]


@pytest.mark.parametrize("ending", ["completes", "killed"])
def test_the_default_work_dir_is_a_tmpfs_that_goes_with_the_run(
    tmp_path: Path, ending: str
) -> None:
    """Without --workdir the cells' stores and the runtimes' copies go on a tmpfs of the
    run's own (they would share one disk here), removed when the run ends, or by
    `cleanup` when it was killed."""
    rid = rid_for(tmp_path)
    proc = start_testbed(
        "storm", "--cells", "2", "--image-mib", "16", "--link", "100mbit",
        "--modes", "celld", "--run-id", rid,
    )  # fmt: skip
    out = wait_for_line(proc, "storm (celld)")
    assert "work dir on a tmpfs" in out
    assert " MiB of ballast in the tmpfs" in out  # ballast.py: warm pages for the storm
    (workdir,) = tmpfs_mounts(rid)
    assert workdir in out
    if ending == "completes":
        out = finish(proc)
        assert proc.returncode == 0, out
        assert "2/2 cells completed with the right digest" in out
    else:
        proc.kill()
        proc.wait()
        assert tmpfs_mounts(rid) == [workdir]
        done = subprocess.run(
            [sys.executable, "-m", "simulations.testbed", "cleanup", "--run-id", rid],
            cwd=REPO, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0 and "1 tmpfs" in done.stdout, done.stdout + done.stderr
    assert tmpfs_mounts(rid) == []
    assert not Path(workdir).exists()
    assert_nothing_left(rid, Path(workdir))


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    where = tmp_path / "tmpfs"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "ctb-test", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def test_the_ballast_gives_its_pages_back_as_a_writer_fills_the_tmpfs(small_tmpfs: Path) -> None:
    """A writer that fills the tmpfs past the ballast's headroom never runs out of
    space: the ballast gives its pages back in steps ahead of it."""
    ballast = Ballast(small_tmpfs, headroom=16 * MiB, step=4 * MiB, poll=0.001)
    filled = ballast.fill()
    assert 44 * MiB <= filled <= 48 * MiB
    assert free_bytes(small_tmpfs) <= 16 * MiB + 64 * 1024  # the tmpfs rounds to pages
    ballast.follow()
    chunk = os.urandom(MiB // 4)
    with (small_tmpfs / "pull").open("wb") as f:
        for _ in range(4 * 40):  # 40 MiB at ~4 MiB per 10 ms at most: the poll keeps up
            f.write(chunk)
            f.flush()
            time.sleep(0.0025)
    ballast.stop()
    assert ballast.given_back >= 40 * MiB - 16 * MiB
    assert ballast.size == filled - ballast.given_back
    ballast.remove()
    assert not ballast.path.exists()
    assert free_bytes(small_tmpfs) >= 64 * MiB - 41 * MiB


def test_the_ballast_refuses_a_directory_that_is_not_a_tmpfs() -> None:
    """Its tmpfs unmounted under a running storm, the ballast once filled the disk
    under it (73 GB of /tmp): it writes nothing anywhere but on a tmpfs."""
    with tempfile.TemporaryDirectory(dir=Path(__file__).parent) as on_disk:  # the checkout
        assert filesystem_type(Path(on_disk)) != "tmpfs"
        ballast = Ballast(Path(on_disk))
        with pytest.raises(RuntimeError, match="not a tmpfs"):
            ballast.fill(4 * MiB)  # a size, so that a lost guard cannot fill this disk
        assert not ballast.path.exists()


def test_a_ballast_that_follows_free_memory_gives_back_what_writers_take(
    small_tmpfs: Path,
) -> None:
    """The intake bench's ballast follows the machine's free memory (a disk's page
    cache draws on it, not on the tmpfs): it keeps the size it was filled to, and
    gives back a step whenever free memory falls under its floor, so the writers'
    pages are the ones it touched; never more than they took."""
    base, taken = 100 * MiB, [0]
    ballast: Ballast

    def free() -> int:  # what the kernel would say: pages given back are free again
        return base - taken[0] + ballast.given_back

    ballast = Ballast(small_tmpfs, step=4 * MiB, poll=0.001, free=free)
    try:
        assert ballast.fill(10 * MiB) == 12 * MiB  # whole 4 MiB chunks
        assert ballast.fill(10 * MiB) == 0  # already that large
        ballast.follow(floor=free() - ballast.step)
        time.sleep(0.05)
        assert ballast.given_back == 0  # nobody took memory yet
        for took, back in ((6, 4), (6, 8), (1, 12), (20, 12)):  # free ends a step under
            taken[0] += took * MiB
            deadline = time.monotonic() + 5
            while ballast.given_back < back * MiB and time.monotonic() < deadline:
                time.sleep(0.001)
            time.sleep(0.02)  # and no further
            assert ballast.given_back == back * MiB, (took, back)
        ballast.stop()
        assert ballast.size == 0  # all of it went to the writers
    finally:
        ballast.remove()


def test_the_cluster_lines_are_the_ones_the_daemon_parses(tmp_path: Path) -> None:
    key = tmp_path / "cluster.key"
    key.write_text(secrets.token_hex(32) + "\n")
    text = cluster_lines(key, "10.77.0.12", ["10.77.0.10", "10.77.0.11"], "rack-2")
    config = from_dict(tomllib.loads(text))
    assert config.cluster is not None
    assert config.cluster.listen == Listen("10.77.0.12", 7946)
    assert config.cluster.seeds == (Listen("10.77.0.10", 7946), Listen("10.77.0.11", 7946))
    assert config.cluster.zone == "rack-2"
    assert config.peer.upload_slots == 4
    assert len(load_cluster_key(config)) == 32  # type: ignore[arg-type]


def test_every_host_runs_the_congestion_control_the_run_names() -> None:
    """Both ends of a connection between two hosts, the dialer and the accepted
    socket, run the run's congestion control, not the root namespace's."""
    root = Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()
    other = next(cc for cc in ("reno", "cubic", "bbr") if cc != root)
    assert other in net.congestion_controls()
    bed = net.Testbed(secrets.token_hex(2), tcp=other)
    try:
        bed.build()
        a, b = bed.add_host("c01", 10, 10**9), bed.add_host("c02", 11, 10**9)
        probe = (
            "import socket, sys\n"
            "def cc(s): return s.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16)"
            ".rstrip(b'\\0').decode()\n"
            "if sys.argv[1] == 'listen':\n"
            "    srv = socket.create_server((sys.argv[2], 9100)); print('up', flush=True)\n"
            "    conn, _ = srv.accept(); print(cc(conn), flush=True)\n"
            "else:\n"
            "    print(cc(socket.create_connection((sys.argv[2], 9100))))\n"
        )
        server = subprocess.Popen(
            net.netns_exec(b.netns, [sys.executable, "-c", probe, "listen", b.address]),
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert server.stdout.readline().strip() == "up"  # type: ignore[union-attr]
            dial = net.netns_exec(a.netns, [sys.executable, "-c", probe, "dial", b.address])
            done = subprocess.run(dial, capture_output=True, text=True, timeout=30)
            assert done.stdout.strip() == other, done.stderr
            assert server.stdout.readline().strip() == other  # type: ignore[union-attr]
        finally:
            server.kill()
            server.wait()
    finally:
        bed.destroy()
    assert net.leftovers(bed.rid) == []


def test_queue_drops_are_counted_on_the_link_whose_queue_overflowed() -> None:
    """A burst of UDP far over a host's rate overflows its own uplink's queue: the
    drops are counted there, and none on the receiver's downlink, which only ever
    gets what the sender's link let through at its rate."""
    bed = net.Testbed(secrets.token_hex(2))
    try:
        bed.build()
        a, b = bed.add_host("c01", 10, 8 * 10**6), bed.add_host("c02", 11, 8 * 10**6)
        before = bed.drops()
        assert before == {"c01": (0, 0), "c02": (0, 0)}
        blast = (
            "import socket, sys\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "for _ in range(2000): s.sendto(bytes(1400), (sys.argv[1], 9))\n"
        )
        done = subprocess.run(
            net.netns_exec(a.netns, [sys.executable, "-c", blast, b.address]),
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        after = bed.drops()
        # 2.8 MB at once into a 1 MB/s link whose queue holds 20 ms (and a 64 KiB burst)
        assert after["c01"][0] > 1000, after
        assert after["c02"] == (0, 0) and after["c01"][1] == 0, after
    finally:
        bed.destroy()
    assert net.leftovers(bed.rid) == []


def test_each_runtime_runs_with_the_go_procs_the_storm_names(tmp_path: Path) -> None:
    """8 skopeos sharing 2 cores each ran 2 Go Ps by default; --runtime-procs caps them."""
    capped = pull.skopeo_env(tmp_path, 1)
    assert capped["GOMAXPROCS"] == "1"
    default = pull.skopeo_env(tmp_path, 0)
    assert "GOMAXPROCS" not in default
    # Either way the runtime reaches only loopback and the testbed's subnet.
    for env in (capped, default):
        assert env["HTTPS_PROXY"] == env["HTTP_PROXY"] != ""
        assert env["NO_PROXY"] == "127.0.0.1,localhost,10.77.0.0/24"
    bad = subprocess.run(
        [sys.executable, "-m", "simulations.testbed", "storm", "--runtime-procs", "-1"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "--runtime-procs" in bad.stderr, bad.stderr


def test_tbf_settings_scale_with_the_rate() -> None:
    assert net.parse_rate("200mbit") == 200_000_000
    assert net.parse_rate("10gbit") == 10**10
    with pytest.raises(ValueError):
        net.parse_rate("200 Mbps")
    # 64 KiB at least (one GSO segment), 4 ms of the rate above that.
    assert net.tbf_args(200_000_000)[4] == str(100_000)
    assert net.tbf_args(10**8 // 8)[4] == str(64 * 1024)
    assert net.tbf_args(10**10)[4] == str(5_000_000)


def test_link_use_is_the_share_of_the_rate_between_two_samples() -> None:
    """links.use reads the samples nearest inside the span; busy_span is where a link
    carried at least a tenth of its rate."""
    rate = 8_000_000  # 1 MB/s
    samples = [(t, {"v": (int(min(max(t - 1, 0), 3) * 500_000), 0)}) for t in range(7)]
    # rx grows 0.5 MB/s from t=1 to t=4, then stops
    assert links.use(samples, "v", 0, rate, 0, 6) == pytest.approx(1.5e6 * 8 / (rate * 6))
    assert links.use(samples, "v", 0, rate, 1.5, 3.5) == pytest.approx(0.5)
    assert links.use(samples, "v", 0, rate, 2.5, 2.9) is None  # no two samples inside
    assert links.busy_span(samples, "v", 0, rate) == (1, 4)
    assert links.busy_span(samples, "v", 1, rate) is None
