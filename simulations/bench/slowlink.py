"""CPU per GiB moved over a slow link: celld's sender and receivers against nginx and curl.

On a fleet a cell's links are slower than its cores, and what a byte costs there
is mostly how often the sender and the reader wake up, not the copy: each wake-up
runs trio's loop, cancel scopes and the fetch's stages around a small chunk. This
bench measures it on one link shaped like the testbed's (tc tbf on loopback, in a
network namespace it makes and removes), each contender moving the same blob over
the same link, interleaved over rounds (the machine is shared and noisy):

- nginx -> curl: nginx sends the blob's file (sendfile, one worker), curl reads it
  to /dev/null. The sender's reference (nginx's CPU) and the reader's (curl's).
- celld peer: a cell of a two-cell cluster takes the blob from the other, which
  holds it complete: the giver's CPU (pieces sent with sendfile) against nginx's,
  the taker's (each piece checked with blake3, the sha256 over the prefix, the
  file written) against curl's.
- registry -> curl, and celld <- registry: curl, then a cell as the fetch lease
  holder, read a blob from docker-registry over the link; the cell's CPU against
  curl's (the registry's is the same for both and not counted).

The readers' ratios include what celld does with each byte and curl does not
(hashing, writing: about 1 CPU-s per GiB here on loopback); run with `--rate 0`
(no shaping) for that floor. Prints CPU-s per GiB (medians over rounds) and the
ratios. Needs root (ip netns, tc). Run:
python -m simulations.bench.slowlink [--rate 50mbit] [--size-mib 128] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from simulations.bench.intake import REPO, intake, peer_pair, registry_file, seed_blob
from simulations.bench.serve import Nginx, cpu_seconds
from simulations.testbed.net import parse_rate, run, tbf_args
from tests.support.celld import Celld
from tests.support.registry import Registry

SENDERS = ["nginx", "celld giver"]
READERS = ["curl <- nginx", "celld taker", "curl <- registry", "celld lease holder"]
PAIRS = [("celld giver", "nginx"), ("celld taker", "curl <- nginx")]
PAIRS += [("celld lease holder", "curl <- registry")]


def cpu_per_gib(pids: list[int], move: Callable[[], object], gib: float) -> list[float]:
    """Each process's CPU-s per GiB while `move` moves `gib` GiB."""
    before = [cpu_seconds(p) for p in pids]
    move()
    return [(cpu_seconds(p) - b) / gib for p, b in zip(pids, before, strict=True)]


def curl_cpu(url: str, size: int) -> float:
    """CPU-s of one curl reading `url` to /dev/null (its rusage), checking it got `size`."""
    proc = subprocess.Popen(
        ["curl", "-s", "-f", "-o", "/dev/null", "-w", "%{size_download}", url],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    got = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0 or int(got or 0) != size:
        raise RuntimeError(f"curl {url}: exit {proc.returncode}, {got} of {size} bytes")
    return usage.ru_utime + usage.ru_stime


def shape(rate: str) -> None:
    if rate != "0":
        run(["tc", "qdisc", "replace", "dev", "lo", "root", *tbf_args(parse_rate(rate))])


def unshape() -> None:
    run(["tc", "qdisc", "del", "dev", "lo", "root"], check=False)


def inside(args: argparse.Namespace) -> None:
    """The bench proper, run in its own network namespace (whose lo it shapes)."""
    size = args.size_mib << 20
    gib = size / 2**30
    run(["ip", "link", "set", "lo", "up", "mtu", "1500"])  # veth's MTU, as in the testbed
    with tempfile.TemporaryDirectory(prefix="celld-slowlink-") as tmp_name:
        tmp = Path(tmp_name)
        tmp.chmod(0o755)  # nginx's worker runs as nobody
        registry = Registry(tmp / "registry").start()
        nginx = Nginx(tmp / "nginx")
        cells: list[Celld] = []
        try:
            # Per round: one blob for nginx and the peers, one for each registry reader.
            rounds = [
                tuple(seed_blob(registry, REPO, size) for _ in range(3)) for _ in range(args.rounds)
            ]
            os.sync()
            nginx.start(
                {f"blobs/{d}": registry_file(registry, d) for r in rounds for d in r}, registry.url
            )
            giver, taker = peer_pair(tmp, registry)
            cells += [giver, taker]
            holder = Celld(tmp / "cell-holder", upstreams={"docker.io": registry.url}).start()
            cells.append(holder)
            cost: dict[str, list[float]] = {name: [] for name in SENDERS + READERS}
            for i, (peer_digest, curl_digest, cell_digest) in enumerate(rounds):
                intake(giver, peer_digest, size)  # untimed, unshaped: the giver's copy
                assert nginx.proc is not None
                nginx_pid = nginx.proc.pid
                nginx_url = f"http://127.0.0.1:{nginx.port}/blobs/{peer_digest}"
                registry_url = f"{registry.url}/v2/{REPO}/blobs/{curl_digest}"

                def from_nginx(url: str = nginx_url, pid: int = nginx_pid) -> None:
                    read: list[float] = []
                    (sent,) = cpu_per_gib([pid], lambda: read.append(curl_cpu(url, size)), gib)
                    cost["nginx"].append(sent)
                    cost["curl <- nginx"].append(read[0] / gib)

                def from_peer(d: str = peer_digest) -> None:
                    pids = [giver.proc.pid, taker.proc.pid]
                    sent, took = cpu_per_gib(pids, lambda: intake(taker, d, size), gib)
                    cost["celld giver"].append(sent)
                    cost["celld taker"].append(took)

                def from_registry(url: str = registry_url) -> None:
                    cost["curl <- registry"].append(curl_cpu(url, size) / gib)

                def lease_holder(d: str = cell_digest) -> None:
                    (took,) = cpu_per_gib([holder.proc.pid], lambda: intake(holder, d, size), gib)
                    cost["celld lease holder"].append(took)

                runs = [from_nginx, from_peer, from_registry, lease_holder]
                first = i % len(runs)
                for move in runs[first:] + runs[:first]:
                    shape(args.rate)
                    try:
                        time.sleep(0.5)
                        move()
                    finally:
                        unshape()
        finally:
            for cell in cells:
                cell.stop()
            nginx.stop()
            registry.stop()

    med = {name: statistics.median(values) for name, values in cost.items()}
    link = "unshaped loopback" if args.rate == "0" else f"loopback shaped to {args.rate} (tbf)"
    print(
        f"CPU-s per GiB of a {args.size_mib} MiB blob over {link}, median of {args.rounds} rounds:"
    )
    for name in SENDERS + READERS:
        rounds = " ".join(f"{v:.2f}" for v in cost[name])
        print(f"{name:<20} {med[name]:>7.2f}   rounds: {rounds}")
    for ours, ref in PAIRS:
        print(f"{ours} / {ref}: {med[ours] / med[ref]:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rate", default="50mbit", help="the link's rate (tc's units), 0: unshaped")
    ap.add_argument("--size-mib", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rate != "0":
        try:
            parse_rate(args.rate)
        except ValueError as exc:
            raise SystemExit(f"--rate: {exc} (or 0: unshaped)") from None
    if args.inside:
        inside(args)
        return
    netns = f"celld-slowlink-{os.getpid()}"
    run(["ip", "netns", "add", netns])
    try:
        argv = [sys.executable, "-m", "simulations.bench.slowlink", "--inside"]
        argv += ["--rate", args.rate, "--size-mib", str(args.size_mib)]
        argv += ["--rounds", str(args.rounds)]
        done = subprocess.run(["ip", "netns", "exec", netns, *argv], check=False)
    finally:
        run(["ip", "netns", "del", netns], check=False)
    sys.exit(done.returncode)


if __name__ == "__main__":
    main()
