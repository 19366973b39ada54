"""A cell's intake: how fast celld fetches, verifies and stores an uncached blob.

The goal (issue 11): at least 1 GiB/s on loopback, so celld is not what limits
a 10 Gbit/s link. Every contender runs in the same process tree at the same
time, interleaved over rounds (the machine is shared and noisy, so only
figures measured side by side mean anything), for a blob of --size-mib:

- direct: curl GETs the blob from docker-registry, to /dev/null. The reference,
  and the ceiling on this machine: the registry's sending and a reader doing
  nothing with the bytes.
- direct to file: the same GET into a file beside the cells' stores: the ceiling
  of any reader that keeps the bytes. On this VM it is far under `direct` at
  times: the host takes back the pages the guest frees, and the first touch of
  one costs 4-7 CPU-s per GiB then (see simulations/testbed/ballast.py), so a
  GiB written can take seconds whoever writes it.
- bare pipeline: celld's work with nothing around it (simulations.bench.bare_intake):
  a GET over a plain socket, sha256 in one thread, blake3 per 1 MiB piece and the
  write in another, no event loop, HTTP library or store. The floor of celld's
  intake on this machine, in Python: what celld's daemon adds is the difference.
- nginx: curl GETs the same file from nginx (sendfile): the "fast peer", what a
  cell serving a whole blob from its store could send at best.
- celld<-registry: a real `celld serve` whose upstream is the registry takes in
  the blob: bytes fetched, sha256 verified, blake3 per piece computed (the
  PieceTable the cell can serve to peers), written to the store, committed.
- celld<-nginx: the same from a second `celld serve` whose central registry is
  nginx serving the blob's file at the registry path: what a registry as fast
  as a file server would give.
- celld<-peer: a cell of a two-cell cluster takes in a blob the other cell
  holds complete (taken from the registry before, untimed): pieces over the
  peer API, each checked with blake3, the sha256 over the prefix as it grows,
  as in a storm. Pieces land in any order, so the temp file is full before it
  is all there: its figure is the committed one (fsync and rename included).

How the intake is triggered and timed: a HEAD of the uncached blob through the
cell's mirror. It answers once the fetch has its head, and the fetch goes on in
the daemon with no client to send to, so what is timed is the intake alone.
The bench polls the cell's data dir every millisecond: "intake" is the time
until the temp file holds every byte (the fetch path writes a batch only after
hashing it, so a full file is a hashed one: verification follows at once),
"committed" until the blob is in `blobs/` (after the fsync and the rename, so
it includes the disk). A GET of another uncached blob through the mirror
(curl, as a runtime would) is timed too: intake plus sending every byte to
the client, the figure a pull sees.

Warm pages (the default; --no-warm for cold ones): this VM's host takes back
the pages the guest frees, and the first touch of one costs 4-7 CPU-s per GiB
then (simulations/testbed/ballast.py), whoever writes it: `direct to file`
fell to 463 MiB/s in such rounds, the cells' intakes to 210-354. So, as the
testbed does for its storms, before each contender (untimed) a ballast on a
tmpfs touches twice the blob's size of pages, and while it runs gives them back
in steps as the machine's free memory falls: every writer, celld or curl, takes
pages still backed, as on a machine that owns its memory.

Prints MiB/s (medians over rounds), the ratio of each to the direct GET, to
nginx, to `direct to file` (the share of what this machine lets any writer
keep, in the same rounds) and to the bare pipeline; the CPU per GiB of each
cell and of the bare pipeline; and each cell's peak RSS. Run:
python -m simulations.bench.intake [--size-mib 1024] [--rounds 3]
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from simulations.bench.serve import Nginx, cpu_seconds, curl_many, peak_rss_mib
from simulations.testbed.ballast import Ballast, memfree
from tests.support.celld import Celld, Cluster, cluster_address
from tests.support.procs import wait_until
from tests.support.registry import Registry

REPO = "library/bench"
NGINX_REPO = "docker.io/library/bench"  # celld.sources.central_repo("docker.io", REPO)
SEED_CHUNK = 16 << 20
INTAKES = ["celld<-registry", "celld<-nginx"]
PEER = "celld<-peer"
GIVER = "celld<-peer giver"  # the cell it takes from (its CPU is counted too)
BARE = "bare pipeline"  # simulations.bench.bare_intake: the floor of celld's work
CONTENDERS = [
    "direct", "direct to file", BARE, "nginx", *INTAKES, PEER, *(f"{name} GET" for name in INTAKES)
]  # fmt: skip


def registry_file(registry: Registry, digest: str) -> Path:
    """Where docker-registry's filesystem driver keeps a blob's bytes."""
    hex_ = digest.removeprefix("sha256:")
    return registry.root / "data/docker/registry/v2/blobs/sha256" / hex_[:2] / hex_ / "data"


def seed_blob(registry: Registry, repo: str, size: int) -> str:
    """Puts `size` random bytes in the registry's storage as a blob of `repo`, as a
    push would leave them (the data file and the repository's layer link), and
    returns its digest. A push of a GiB through the registry's upload API takes
    minutes on a busy 2-core machine; the bench times reads, not pushes."""
    storage = registry.root / "data/docker/registry/v2"
    storage.mkdir(parents=True, exist_ok=True)
    part = storage / "seed.part"
    digest = hashlib.sha256()
    with part.open("wb") as f:
        for offset in range(0, size, SEED_CHUNK):
            data = os.urandom(min(SEED_CHUNK, size - offset))
            digest.update(data)
            f.write(data)
    name = "sha256:" + digest.hexdigest()
    final = registry_file(registry, name)
    final.parent.mkdir(parents=True, exist_ok=True)
    part.rename(final)
    link = storage / "repositories" / repo / "_layers/sha256" / digest.hexdigest() / "link"
    link.parent.mkdir(parents=True, exist_ok=True)
    link.write_text(name)
    return name


def bare_intake(url: str, digest: str, size: int, out: Path) -> dict[str, float]:
    """simulations.bench.bare_intake's figures for one GET of `url` into `out` (removed
    after): the least the same work costs on this machine."""
    done = subprocess.run(
        [sys.executable, "-m", "simulations.bench.bare_intake", url, digest, str(size), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    out.unlink(missing_ok=True)
    if done.returncode != 0:
        raise RuntimeError(f"bare_intake: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout)


def peer_pair(tmp: Path, registry: Registry) -> tuple[Celld, Celld]:
    """Two cells of one cluster (a giver and a taker) whose upstream is `registry`,
    started, once they see each other alive."""
    key = tmp / "cluster.key"
    key.write_text(os.urandom(32).hex() + "\n")
    addrs = [cluster_address(i) for i in range(2)]
    giver, taker = (
        Celld(
            tmp / f"cell-{name}",
            name=name,
            key_file=key,
            cluster=Cluster(addr, tuple(a for a in addrs if a != addr)),
            upstreams={"docker.io": registry.url},
        ).start()
        for name, addr in zip(("giver", "taker"), addrs, strict=True)
    )
    try:
        wait_until(
            lambda: taker.peers().get(giver.name, {}).get("state") == "alive",
            30,
            "the two cells form a cluster",
        )
    except BaseException:
        giver.stop()
        taker.stop()
        raise
    return giver, taker


def intake(cell: Celld, digest: str, size: int, timeout: float = 600.0) -> tuple[float, float]:
    """(seconds until every byte is in the temp file, until committed) of the
    fetch a HEAD through the mirror starts."""
    hex_ = digest.removeprefix("sha256:")
    final = cell.data_dir / "blobs" / "sha256" / hex_[:2] / hex_
    tmp = cell.data_dir / "tmp"
    conn = http.client.HTTPConnection("127.0.0.1", cell.port, timeout=30)
    started = time.perf_counter()
    conn.request("HEAD", f"/v2/{REPO}/blobs/{digest}")
    response = conn.getresponse()
    response.read()
    conn.close()
    if response.status != 200:
        raise RuntimeError(f"HEAD through {cell.url}: {response.status}")
    full = None
    deadline = started + timeout
    while time.perf_counter() < deadline:
        now = time.perf_counter()
        if final.exists():
            return (full or now) - started, now - started
        if full is None:
            for entry in os.scandir(tmp):
                if entry.name.startswith(hex_):
                    try:
                        if entry.stat().st_size == size:
                            full = now
                    except FileNotFoundError:
                        pass  # renamed into place just now
        time.sleep(0.001)
    raise TimeoutError(f"{digest} not committed in {cell.url} after {timeout}s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warm", action=argparse.BooleanOptionalAction, default=True,
                    help="warm pages for every contender (see above)")  # fmt: skip
    args = ap.parse_args()
    size = args.size_mib * 2**20
    mib = size / 2**20

    with tempfile.TemporaryDirectory(prefix="celld-intake-") as tmp_name:
        tmp = Path(tmp_name)
        tmp.chmod(0o755)  # nginx's worker runs as nobody
        registry = Registry(tmp / "registry").start()
        nginx = Nginx(tmp / "nginx")
        cells: dict[str, Celld] = {}
        ballast: Ballast | None = None
        if args.warm:
            shm = Path(tempfile.mkdtemp(prefix="celld-intake-", dir="/dev/shm"))
            ballast = Ballast(shm, step=64 << 20, poll=0.002, free=memfree)
        try:
            # Three blobs a round, each uncached in the cells that time it: one
            # taken in on a HEAD, one pulled with a GET, one taken from a peer.
            rounds = [
                tuple(seed_blob(registry, REPO, size) for _ in range(3)) for _ in range(args.rounds)
            ]
            os.sync()  # the pushes' dirty pages, written back now rather than while timed
            nginx.start(
                {
                    f"v2/{NGINX_REPO}/blobs/{digest}": registry_file(registry, digest)
                    for pair in rounds
                    for digest in pair
                },
                registry.url,
            )
            cells["celld<-registry"] = Celld(
                tmp / "cell-registry", upstreams={"docker.io": registry.url}
            ).start()
            cells["celld<-nginx"] = Celld(
                tmp / "cell-nginx",
                upstreams={"docker.io": registry.url},
                registries=[f"http://127.0.0.1:{nginx.port}"],
            ).start()

            giver, taker = cells[GIVER], cells[PEER] = peer_pair(tmp, registry)

            rates: dict[str, list[float]] = {name: [] for name in CONTENDERS}
            committed: dict[str, list[float]] = {name: [] for name in INTAKES}
            # CPU-s per GiB taken in, by process: what a rate on busy cores cannot say
            cpu: dict[str, list[float]] = {name: [] for name in [*INTAKES, PEER, GIVER, BARE]}
            gib = size / 2**30
            for i, (head_digest, get_digest, peer_digest) in enumerate(rounds):
                direct = f"{registry.url}/v2/{REPO}/blobs/{head_digest}"
                # One untimed read of each blob first: the registry's (and the
                # page cache's) first read is slower, and whoever went first
                # would pay for it.
                curl_many(direct, 1, 1)
                curl_many(f"{registry.url}/v2/{REPO}/blobs/{get_digest}", 1, 1)
                intake(giver, peer_digest, size)  # untimed: the peer's copy
                kept = tmp / "curl.out"  # beside the cells' stores: the same disk and memory

                def to_file(url: str = direct, kept: Path = kept) -> float:
                    rate = curl_many(url, 1, 1, out=str(kept)) / 2**20
                    kept.unlink()
                    return rate

                def bare(url: str = direct, d: str = head_digest, kept: Path = kept) -> float:
                    figures = bare_intake(url, d, size, kept)
                    cpu[BARE].append(figures["cpu_s_per_gib"])
                    return figures["mib_s"]

                runs = {
                    "direct": lambda url=direct: curl_many(url, 1, 1) / 2**20,
                    "direct to file": to_file,
                    BARE: bare,
                    "nginx": lambda d=head_digest: (
                        curl_many(f"http://127.0.0.1:{nginx.port}/v2/{NGINX_REPO}/blobs/{d}", 1, 1)
                        / 2**20
                    ),
                }
                for name in INTAKES:

                    def run_intake(cell=cells[name], name=name, d=head_digest) -> float:
                        before = cpu_seconds(cell.proc.pid)
                        full, done = intake(cell, d, size)
                        cpu[name].append((cpu_seconds(cell.proc.pid) - before) / gib)
                        committed[name].append(mib / done)
                        return mib / full

                    def run_get(cell=cells[name], d=get_digest) -> float:
                        rate = curl_many(f"{cell.url}/v2/{REPO}/blobs/{d}", 1, 1) / 2**20
                        cell.blob_stored(d, timeout=120)  # its commit is not the next one's noise
                        return rate

                    runs[name] = run_intake
                    runs[f"{name} GET"] = run_get

                def run_peer(d: str = peer_digest) -> float:
                    pids = {PEER: taker.proc.pid, GIVER: giver.proc.pid}
                    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
                    _, done = intake(taker, d, size)
                    for name, pid in pids.items():
                        cpu[name].append((cpu_seconds(pid) - before[name]) / gib)
                    return mib / done

                runs[PEER] = run_peer
                first = i % len(CONTENDERS)
                for name in CONTENDERS[first:] + CONTENDERS[:first]:
                    if ballast is not None:
                        ballast.fill(2 * size)
                    time.sleep(0.5)
                    if ballast is not None:
                        ballast.follow(floor=memfree() - ballast.step)
                    try:
                        rates[name].append(runs[name]())
                    finally:
                        if ballast is not None:
                            ballast.stop()
            rss = {name: peak_rss_mib(cell.proc.pid) for name, cell in cells.items()}
            # Each cell took every byte from the source it stands for.
            for name, kind, blobs in (
                ("celld<-registry", "upstream", 2),
                ("celld<-nginx", "registry", 2),
                (PEER, "peer", 1),
            ):
                fetched = cells[name].metric("celld_fetched_bytes_total", source=kind)
                if fetched != blobs * args.rounds * size:
                    raise RuntimeError(f"{name} fetched {fetched:.0f} bytes from its {kind}")
        finally:
            for cell in cells.values():
                cell.stop()
            nginx.stop()
            registry.stop()
            if ballast is not None:
                ballast.remove()
                ballast.path.parent.rmdir()

    med = {name: statistics.median(values) for name, values in rates.items()}
    pages = "warm pages (a ballast)" if args.warm else "cold pages (no ballast)"
    print(
        f"intake of an uncached {args.size_mib} MiB blob, median of {args.rounds} rounds, {pages}:"
    )
    refs = (med["direct"], med["nginx"], med["direct to file"], med[BARE])
    print(f"{'':<24} {'MiB/s':>8} {'/direct':>8} {'/nginx':>8} {'/to file':>8} {'/bare':>8}")

    def line(name: str, rate: float) -> str:
        return f"{name:<24} {rate:>8.0f}" + "".join(f" {rate / ref:>8.2f}" for ref in refs)

    for name in CONTENDERS:
        print(line(name, med[name]) + "   rounds: " + " ".join(f"{v:.0f}" for v in rates[name]))
    for name in INTAKES:
        print(line(name + " committed", statistics.median(committed[name])))
    print(
        "CPU-s per GiB taken in (median; fetched, hashed, written, committed): "
        + ", ".join(f"{name} {statistics.median(v):.2f}" for name, v in cpu.items())
    )
    for name, peak in rss.items():
        print(f"{name} peak RSS: {peak:.0f} MiB")


if __name__ == "__main__":
    main()
