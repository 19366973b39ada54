"""The storm: every cell pulls one uncached image at once, through celld or a pull-through cache.

Owns the run of one storm on the testbed's network (net.py): the Hub and the
central registry (real docker-registry processes in their namespaces), one
`celld serve` per cell namespace, the pull-through cache for comparison
(docker-registry in proxy mode in the central's namespace), one skopeo per
cell started at the same instant (pull.py), and the figures. Everything it
starts it stops, and the network it builds it removes, on success, error,
Ctrl-C or SIGTERM alike.

The figures are of three kinds: the veth byte counters of each host (the
honest physical figure, TCP/IP headers and ACKs included; sampled through the
storm by links.py, they also say how much of its rate each link carried), the registries'
access logs (blob bytes they answered with), and the cells' own metrics (bytes
by source, peer requests, whole reads from a registry by why). With `--cluster`
(the default) the cells share, so the Hub sends about one copy in all; with
`--no-cluster` each cell takes every blob from the central registry or the Hub.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from simulations.testbed import links, net, pull
from simulations.testbed.ballast import Ballast
from tests.support.celld import Celld
from tests.support.images import Image, make_image, push_image
from tests.support.procs import stop_process
from tests.support.registry import Registry

REPO = Path(__file__).resolve().parents[2]
REGISTRY_PORT = 5000
PROXY_PORT = 5001
MIRROR_PORT = 5000
METRICS_PORT = 9090
CLUSTER_PORT = 7946
IMAGE_NAME = "library/storm"
IMAGE_REF = f"docker.io/{IMAGE_NAME}:v1"
MiB = 1 << 20
LINK_SAMPLE_S = 0.1  # how often the link sampler reads the veths' counters
# A registry's access line with the body bytes it wrote (the combined log format).
ACCESS_BYTES = re.compile(
    r'"(?P<method>[A-Z]+) (?P<uri>\S+) HTTP/[0-9.]+" (?P<status>\d{3}) (?P<bytes>\d+)'
)


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived: unwind, stop everything, remove the network."""


@dataclass(frozen=True)
class StormOptions:
    cells: int = 12
    image_mib: float = 1024
    layers: int = 4
    link: str = "200mbit"
    hub_link: str | None = None  # default: link
    central_link: str | None = None  # default: link
    modes: tuple[str, ...] = ("celld", "proxy")
    cluster: bool = False
    racks: int = 1
    kill: int = 0
    kill_at: float | None = None  # seconds into the storm; default 0.3 x the limit
    stage_central: bool = False
    run_id: str | None = None
    workdir: Path | None = None
    keep: bool = False
    json_out: Path | None = None
    timeout: float = 1800.0
    tmpfs: bool = True  # the work dir on a tmpfs of its own, when it fits in memory
    warm: bool = True  # a Ballast in that tmpfs through each storm: see ballast.py
    tcp: str | None = "cubic"  # every host's congestion control (None: the machine's)
    # Each runtime's GOMAXPROCS (0: Go's default, every core). On a fleet a cell's
    # runtime has the cell's cores; here every cell's skopeo would run one Go P per
    # core of the 2 they all share, and idle Ps spin looking for work.
    runtime_procs: int = 1


def spawn_in(
    netns: str,
    argv: list[str],
    log_path: Path,
    *,
    ports: tuple[int, ...],
    env: dict[str, str] | None = None,
    timeout: float = 20.0,
    wait: bool = True,
) -> subprocess.Popen:
    """Start argv inside netns, logging to log_path; return once every port listens
    there (or at once, without `wait`: then `wait_ready`).

    A session of its own, so a Ctrl-C at the terminal reaches the storm alone,
    which then stops its children in order."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            net.netns_exec(netns, argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=REPO,
            start_new_session=True,
        )
    if wait:
        wait_ready(netns, proc, log_path, ports, timeout)
    return proc


def wait_ready(
    netns: str,
    proc: subprocess.Popen,
    log_path: Path,
    ports: tuple[int, ...],
    timeout: float = 20.0,
) -> None:
    try:
        for port in ports:
            net.wait_listening(netns, port, proc, log_path, timeout)
    except BaseException:
        stop_process(proc)
        raise


@dataclass
class NsRegistry(Registry):
    """docker-registry listening on every address of its namespace; a pull-through
    cache of `proxy_url` when given (distribution's `proxy: remoteurl:`)."""

    netns: str = ""
    proxy_url: str | None = None

    def _config(self) -> str:
        text = (
            super()._config().replace(f"addr: 127.0.0.1:{self.port}", f"addr: 0.0.0.0:{self.port}")
        )
        if self.proxy_url:
            text += f"proxy:\n  remoteurl: {self.proxy_url}\n"
        return text

    def start(self) -> NsRegistry:
        self.root.mkdir(parents=True, exist_ok=True)
        cfg = self.root / "config.yml"
        cfg.write_text(self._config())
        argv = ["docker-registry", "serve", str(cfg)]
        self.proc = spawn_in(self.netns, argv, self.log_path, ports=(self.port,))
        return self

    def blob_bytes(self, since: int) -> tuple[int, int]:
        """(blob GETs answered 200/206, body bytes written) in the log after offset `since`."""
        text = self._settled_log()[since:]
        gets = written = 0
        for m in ACCESS_BYTES.finditer(text):
            if m["method"] == "GET" and "/blobs/" in m["uri"] and m["status"] in ("200", "206"):
                gets += 1
                written += int(m["bytes"])
        return gets, written

    def log_size(self) -> int:
        return len(self._settled_log())


@dataclass
class NsCelld(Celld):
    """`celld serve` in a cell's namespace: mirror and metrics on its own 127.0.0.1."""

    netns: str = ""
    name: str = "cell"

    def write_config(self) -> Path:
        path = super().write_config()
        # The support class names every cell "test-cell"; cells of a cluster need their own.
        path.write_text(path.read_text().replace('name = "test-cell"', f'name = "{self.name}"', 1))
        return path

    def start(self, wait: bool = True) -> NsCelld:
        self.write_config()
        argv = [sys.executable, "-m", "celld", "serve", "--config", str(self.config_path)]
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONUNBUFFERED": "1"}
        self.proc = spawn_in(self.netns, argv, self.log_path, ports=(), env=env, wait=False)
        if wait:
            self.wait_ready()
        return self

    def metrics_text(self) -> str:
        """The cell's own /metrics (in its namespace, so through curl there); "" when
        the daemon does not answer."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        argv = net.netns_exec(self.netns, ["curl", "-s", "--max-time", "5", url])
        done = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        return done.stdout

    def fetched_by_source(self) -> dict[str, int]:
        """celld_fetched_bytes by source; {} when the daemon does not answer."""
        return {labels["source"]: int(v) for labels, v in self.samples("celld_fetched_bytes_total")}

    def peer_requests(self) -> dict[str, int]:
        """The peer API requests this cell answered, by "endpoint outcome", and the have
        queries it was sent ("have query": datagrams, not requests)."""
        counts = {
            f"{labels['endpoint']} {labels['outcome']}": int(v)
            for labels, v in self.samples("celld_peer_requests_total")
        }
        for labels, v in self.samples("celld_gossip_datagrams_received_total"):
            if labels["kind"] == "HaveQuery":
                counts["have query"] = int(v)
        return counts

    def registry_reads(self) -> dict[str, int]:
        """Blobs this cell read whole from the registries, by why (lease, no_lease, ...)."""
        return {labels["why"]: int(v) for labels, v in self.samples("celld_registry_reads_total")}

    def settled_fetched_by_source(self, limit: float = 15.0) -> dict[str, int]:
        """fetched_by_source once it stops growing: a blob is counted when it is
        committed (fsync, rename), which may be just after the runtime had its last
        verified byte and the pull ended."""
        last = self.fetched_by_source()
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            time.sleep(0.5)
            now = self.fetched_by_source()
            if now == last:
                break
            last = now
        return last

    def wait_ready(self) -> None:
        ports = (self.port, self.metrics_port)
        wait_ready(self.netns, self.proc, self.log_path, ports, timeout=60)  # type: ignore[arg-type]


def _grown(
    before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]
) -> dict[str, tuple[int, int]]:
    """Each host's pair of counters (either way of its link) over the storm."""
    return {r: (after[r][0] - before[r][0], after[r][1] - before[r][1]) for r in after}


def cluster_lines(
    key_file: Path, address: str, seeds: list[str], zone: str, upload_slots: int = 4
) -> str:
    """The [cluster] and [peer] tables of issue 11 for one cell."""
    quoted = ", ".join(f'"{s}:{CLUSTER_PORT}"' for s in seeds)
    return (
        "[cluster]\n"
        f'key_file = "{key_file}"\n'
        f'listen = "{address}:{CLUSTER_PORT}"\n'
        f"seeds = [{quoted}]\n"
        f'zone = "{zone}"\n'
        "[peer]\n"
        f"upload_slots = {upload_slots}\n"
    )


def layer_sizes(image_mib: float, layers: int) -> tuple[int, ...]:
    total = int(image_mib * MiB)
    base = total // layers
    return tuple([base] * (layers - 1) + [total - base * (layers - 1)])


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..1): with 12 cells, p99 is the slowest."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p * len(ordered)) - 1)]


@dataclass
class Phase:
    """One storm's outcome: per-cell results and the byte figures."""

    mode: str
    cells: dict[str, dict] = field(default_factory=dict)
    killed: list[str] = field(default_factory=list)
    wire: dict[str, tuple[int, int]] = field(default_factory=dict)  # role -> (rx, tx) delta
    hub_log: tuple[int, int] = (0, 0)
    central_log: tuple[int, int] = (0, 0)
    cluster_listening: int | None = None  # cells whose daemon listens on the cluster port
    fetched: dict[str, int] = field(default_factory=dict)  # celld's own account, by source
    retransmits: dict[str, int] = field(default_factory=dict)  # TCP segments, by host
    drops: dict[str, tuple[int, int]] = field(default_factory=dict)  # packets (up, down), by host
    peer_requests: dict[str, int] = field(default_factory=dict)  # "endpoint outcome" -> n
    registry_reads: dict[str, int] = field(default_factory=dict)  # why -> blobs (all cells)
    lease_reads: dict[str, int] = field(default_factory=dict)  # cell -> blobs read under a lease
    cpu: dict[str, float] = field(default_factory=dict)  # see _cpu_snapshot
    ballast: tuple[int, int] | None = None  # (bytes filled, given back during the storm)
    start_at: float = 0.0  # the pulls' common start (Unix time)
    link_samples: list[links.Sample] = field(default_factory=list)  # the veths' counters


class Storm:
    """One run: build, storm each mode, report, clean up (see `run`)."""

    def __init__(self, opts: StormOptions, out=print) -> None:
        self.opts = opts
        self.out = out
        self.rid = opts.run_id or secrets.token_hex(2)
        if not re.fullmatch(r"[0-9a-f]{4}", self.rid):
            raise ValueError(f"--run-id: expected 4 hex digits, got {self.rid!r}")
        self.link_bps = net.parse_rate(opts.link)
        self.hub_bps = net.parse_rate(opts.hub_link or opts.link)
        self.central_bps = net.parse_rate(opts.central_link or opts.link)
        self.bed = net.Testbed(self.rid, tcp=opts.tcp)
        self.procs: list[subprocess.Popen] = []
        self.registries: list[NsRegistry] = []
        self.cellds: dict[str, NsCelld] = {}
        self.made_workdir = opts.workdir is None
        self.workdir = opts.workdir or Path(tempfile.mkdtemp(prefix=f"celld-testbed-{self.rid}-"))
        self.image: Image | None = None
        self.mounted = False
        self.ballast: Ballast | None = None

    # -- building ---------------------------------------------------------------

    def build(self) -> None:
        o = self.opts
        self.out(f"run {self.rid}: {o.cells} cells, links {o.link}, work dir {self.workdir}")
        self._mount_tmpfs()
        self.bed.build()
        self.hub = self.bed.add_host("hub", 2, self.hub_bps)
        self.central = self.bed.add_host("central", 3, self.central_bps)
        self.cell_hosts = [
            self.bed.add_host(f"c{i + 1:02d}", 10 + i, self.link_bps) for i in range(o.cells)
        ]
        self.out(
            f"network: bridge {self.bed.bridge} in {self.bed.bridge_netns}, {len(self.bed.hosts)} hosts on {net.SUBNET}.0/24, tbf both ways, TCP {o.tcp or 'as the machine'}"
        )

        sizes = layer_sizes(o.image_mib, o.layers)
        self.out(f"image: {o.image_mib:g} MiB in {len(sizes)} layers (random, gzip'd tar)")
        self.image = make_image(sizes)
        hub_root = self.workdir / "hub"
        central_root = self.workdir / "central"
        # Pushed into each registry's storage by a loopback instance: setup, not storm traffic.
        targets = [hub_root] + ([central_root] if o.stage_central else [])
        for root in targets:
            staging = Registry(root)
            staging.start()
            try:
                push_image(staging.url, IMAGE_NAME, "v1", self.image)
            finally:
                staging.stop()
        self.image_bytes = sum(len(b.data) for b in self.image.blobs)
        self.hub_registry = self._registry(hub_root, self.hub, REGISTRY_PORT)
        self.central_registry = self._registry(central_root, self.central, REGISTRY_PORT)

    def _registry(
        self, root: Path, host: net.Host, port: int, proxy: str | None = None
    ) -> NsRegistry:
        reg = NsRegistry(root, port=port, netns=host.netns, proxy_url=proxy)
        reg.start()
        self.registries.append(reg)
        self.procs.append(reg.proc)  # type: ignore[arg-type]
        return reg

    def _start_cellds(self) -> None:
        o = self.opts
        key_file = self.workdir / "cluster.key"
        if o.cluster:
            key_file.write_text(secrets.token_hex(32) + "\n")
            key_file.chmod(0o600)
        addresses = [h.address for h in self.cell_hosts]
        per_rack = math.ceil(len(self.cell_hosts) / max(1, o.racks))
        for i, host in enumerate(self.cell_hosts):
            extra = ""
            if o.cluster:
                seeds = [a for a in addresses[:3] if a != host.address]
                extra = cluster_lines(key_file, host.address, seeds, f"rack-{i // per_rack + 1}")
            cell = NsCelld(
                self.workdir / "cells" / host.role,
                port=MIRROR_PORT,
                metrics_port=METRICS_PORT,
                upstreams={"docker.io": f"http://{self.hub.address}:{REGISTRY_PORT}"},
                registries=[f"http://{self.central.address}:{REGISTRY_PORT}"],
                extra=extra,
                netns=host.netns,
                name=host.role,
            )
            self.cellds[host.role] = cell
            cell.start(wait=False)  # all at once: a daemon takes a second to import
            self.procs.append(cell.proc)  # type: ignore[arg-type]
        for cell in self.cellds.values():
            cell.wait_ready()

    def _wait_for_cluster(self, timeout: float = 30.0) -> None:
        """Start the storm once every cell sees every other alive (`celld peers --json`
        in each cell's namespace, issue 11), so the figures measure sharing, not gossip
        converging; say so and go on when the daemon has no such command or the wait
        runs out. (Asking only c01 once let a storm start with a cell blind to three
        others, which then read a layer from the Hub beside its lease holder.)"""
        deadline = time.monotonic() + timeout
        others = len(self.cell_hosts) - 1
        waiting = list(self.cell_hosts)
        alive: dict[str, int] = {}
        while waiting and time.monotonic() < deadline:
            for host in list(waiting):
                cell = self.cellds[host.role]
                argv = [sys.executable, "-m", "celld", "peers", "--config", str(cell.config_path)]
                done = subprocess.run(
                    net.netns_exec(host.netns, [*argv, "--json"]),
                    capture_output=True, text=True, stdin=subprocess.DEVNULL, cwd=REPO,
                )  # fmt: skip
                if done.returncode != 0:
                    self.out(
                        f"cluster: `celld peers` answered {done.returncode}: not waiting for it"
                    )
                    return
                try:
                    doc = json.loads(done.stdout)
                except json.JSONDecodeError:
                    self.out("cluster: `celld peers --json` printed no JSON: not waiting for it")
                    return
                members = doc.get("members", []) if isinstance(doc, dict) else doc
                seen = sum(
                    isinstance(m, dict) and m.get("state") == "alive" and m.get("name") != host.role
                    for m in members
                )
                alive[host.role] = seen
                if seen >= others:
                    waiting.remove(host)
            if waiting:
                time.sleep(0.5)
        if not waiting:
            self.out(f"cluster: every cell sees the {others} others alive")
        else:
            short = ", ".join(f"{h.role} {alive.get(h.role, 0)}" for h in waiting)
            self.out(f"cluster: after {timeout:.0f} s some see fewer than {others} others: {short}")

    # -- one storm --------------------------------------------------------------

    def limit_s(self) -> float:
        return self.image_bytes * 8 / self.link_bps

    def storm(self, mode: str) -> Phase:
        o = self.opts
        phase = Phase(mode)
        if mode == "celld":
            self._start_cellds()
            if o.cluster:
                phase.cluster_listening = sum(
                    net.listening(h.netns, CLUSTER_PORT, "u")
                    or net.listening(h.netns, CLUSTER_PORT, "t")
                    for h in self.cell_hosts
                )
                if phase.cluster_listening:
                    self._wait_for_cluster()
            mirror = f"127.0.0.1:{MIRROR_PORT}"
        else:
            hub_url = f"http://{self.hub.address}:{REGISTRY_PORT}"
            self._registry(self.workdir / "proxy", self.central, PROXY_PORT, proxy=hub_url)
            mirror = f"{self.central.address}:{PROXY_PORT}"
        if self.ballast is not None:
            filled = self.ballast.fill()
            self.out(
                f"memory: {filled / MiB:.0f} MiB of ballast in the tmpfs, given back as the "
                "storm writes (this VM's host takes freed pages back; see ballast.py)"
            )
            self.ballast.follow()
        before = self.bed.counters()
        retrans_before = self.bed.retransmits()
        drops_before = self.bed.drops()
        hub_since = self.hub_registry.log_size()
        central_reg = self.central_registry if mode == "celld" else self.registries[-1]
        central_since = central_reg.log_size()

        start_at = time.time() + 1.0 + 0.3 * len(self.cell_hosts)
        workers: dict[str, subprocess.Popen] = {}
        dests: dict[str, Path] = {}
        for host in self.cell_hosts:
            dests[host.role] = self.workdir / "pulls" / mode / host.role
            argv = [sys.executable, "-m", "simulations.testbed.pull", "--ref", IMAGE_REF]
            argv += ["--mirror", mirror, "--dest", str(dests[host.role])]
            argv += ["--start-at", f"{start_at:.3f}", "--timeout", str(o.timeout)]
            argv += ["--procs", str(o.runtime_procs)]
            (self.workdir / "pulls" / mode).mkdir(parents=True, exist_ok=True)
            workers[host.role] = self._popen_in(host.netns, argv, stderr=subprocess.STDOUT)
        procs = f"GOMAXPROCS={o.runtime_procs}" if o.runtime_procs else "Go's default GOMAXPROCS"
        self.out(f"storm ({mode}): {len(workers)} cells pull {IMAGE_REF} at once (skopeo, {procs})")
        sampler = self._sample_links()
        time.sleep(max(0.0, start_at - time.time()))
        phase.start_at = start_at
        cpu_before = self._cpu_snapshot()

        if o.kill and mode == "celld":
            kill_at = o.kill_at if o.kill_at is not None else 0.3 * self.limit_s()
            time.sleep(max(0.0, start_at + kill_at - time.time()))
            for host in self.cell_hosts[-o.kill :]:
                self.cellds[host.role].kill()
                phase.killed.append(host.role)
            self.out(f"killed (-9) celld on {', '.join(phase.killed)} at {kill_at:.1f} s")

        for role, proc in workers.items():
            stdout, _ = proc.communicate(timeout=o.timeout + 60)
            lines = [line for line in stdout.splitlines() if line.startswith("{")]
            try:
                result = json.loads(lines[-1])
            except (IndexError, json.JSONDecodeError):
                result = {"error": f"worker printed no result: {stdout.strip()[-300:]}"}
            if "ended" in result:
                result["seconds"] = result["ended"] - start_at
            if "started" in result:
                # A worker that began late (a busy machine) had its lateness counted in.
                result["late_s"] = max(0.0, result["started"] - start_at)
            phase.cells[role] = result
        cpu_after = self._cpu_snapshot()  # the daemons alive throughout (none killed)
        phase.link_samples = self._sampled(sampler)
        if self.ballast is not None:
            self.ballast.stop()
            phase.ballast = (self.ballast.filled, self.ballast.given_back)
        phase.cpu = {k: v - cpu_before[k] for k, v in cpu_after.items() if k in cpu_before}
        if mode == "celld":
            phase.cpu["celld"] = sum(v for k, v in phase.cpu.items() if k.startswith("celld "))
        phase.cpu["registries"] = sum(v for k, v in phase.cpu.items() if k.startswith("registry "))
        phase.cpu["clients"] = sum(c.get("client_cpu_s", 0.0) for c in phase.cells.values())
        for role, result in phase.cells.items():  # every pull has ended: check the copies
            if "error" not in result:
                result.update(pull.check(dests[role], self.image.digest))  # type: ignore[union-attr]

        after = self.bed.counters()
        retrans_after = self.bed.retransmits()
        phase.retransmits = {r: retrans_after[r] - retrans_before[r] for r in retrans_after}
        phase.drops = _grown(drops_before, self.bed.drops())
        phase.wire = _grown(before, after)
        phase.hub_log = self.hub_registry.blob_bytes(hub_since)
        phase.central_log = central_reg.blob_bytes(central_since)
        if mode == "celld":
            for role, cell in self.cellds.items():
                if role not in phase.killed:
                    for source, n in cell.settled_fetched_by_source().items():
                        phase.fetched[source] = phase.fetched.get(source, 0) + n
                    for key, n in cell.peer_requests().items():
                        phase.peer_requests[key] = phase.peer_requests.get(key, 0) + n
                    for key, n in cell.registry_reads().items():
                        phase.registry_reads[key] = phase.registry_reads.get(key, 0) + n
                        if key == "lease" and n:
                            phase.lease_reads[role] = n
                stop_process(cell.proc)
        return phase

    def _sample_links(self) -> subprocess.Popen:
        """The link sampler (links.py), in the bridge's namespace, where every host's
        veth has its other end."""
        devices = [h.veth_bridge for h in self.bed.hosts.values()]
        argv = [sys.executable, "-m", "simulations.testbed.links", str(LINK_SAMPLE_S), *devices]
        return self._popen_in(self.bed.bridge_netns, argv)

    def _popen_in(self, netns: str, argv: list[str], stderr: int | None = None) -> subprocess.Popen:
        """A process of the storm in `netns`, its output piped; stopped with the run."""
        proc = subprocess.Popen(
            net.netns_exec(netns, argv),
            stdout=subprocess.PIPE,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            cwd=REPO,
            text=True,
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def _sampled(self, proc: subprocess.Popen) -> list[links.Sample]:
        proc.terminate()
        try:
            stdout, _ = proc.communicate(timeout=10)
            return [(t, {d: tuple(v) for d, v in s.items()}) for t, s in json.loads(stdout)]
        except (subprocess.TimeoutExpired, json.JSONDecodeError):
            proc.kill()
            return []  # the figures go without link use

    def _cpu_snapshot(self) -> dict[str, float]:
        """CPU seconds so far: of every core (busy, steal: what the hypervisor gave
        others, and all), and of the celld daemons. The cells share this machine's
        cores, so a storm that keeps them busy measures the CPU, not the links."""
        ticks = os.sysconf("SC_CLK_TCK")
        with open("/proc/stat") as f:
            user, nice, system, idle, iowait, irq, softirq, steal = (
                int(v) / ticks for v in f.readline().split()[1:9]
            )
        snap = {
            "busy": user + nice + system + irq + softirq,
            "softirq": softirq,  # the links: veth, bridge and tbf run here, not in a process
            "steal": steal,
            "all": user + nice + system + idle + iowait + irq + softirq + steal,
        }
        procs = {f"celld {role}": cell.proc for role, cell in self.cellds.items()}
        procs |= {f"registry {i}": reg.proc for i, reg in enumerate(self.registries)}
        for name, proc in procs.items():  # one process's user + sys
            with contextlib.suppress(OSError, AttributeError):
                stat = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
                snap[name] = (int(stat[11]) + int(stat[12])) / ticks
        return snap

    # -- figures ----------------------------------------------------------------

    def figures(self, phase: Phase) -> dict:
        survivors = {r: c for r, c in phase.cells.items() if r not in phase.killed}
        ok = {r: c for r, c in survivors.items() if "error" not in c}
        times = [c["seconds"] for c in ok.values()]
        cells_tx = {r: phase.wire[r][1] for r in phase.cells}
        biggest = max(cells_tx, key=cells_tx.__getitem__) if cells_tx else None
        limit = self.limit_s()
        fig = {
            "mode": phase.mode,
            "cells": len(phase.cells),
            "killed": phase.killed,
            "completed": len(ok),
            "survivors": len(survivors),
            "per_cell": phase.cells,
            "p50_s": percentile(times, 0.5) if times else None,
            "p99_s": percentile(times, 0.99) if times else None,
            "max_s": max(times) if times else None,
            "limit_s": limit,
            "image_bytes": self.image_bytes,
            "hub_wire_bytes": phase.wire["hub"][1],
            "central_wire_bytes": phase.wire["central"][1],
            "hub_log": {"blob_gets": phase.hub_log[0], "bytes": phase.hub_log[1]},
            "central_log": {"blob_gets": phase.central_log[0], "bytes": phase.central_log[1]},
            "cells_upload_bytes": sum(cells_tx.values()),
            "largest_upload": {"cell": biggest, "bytes": cells_tx.get(biggest, 0)},
            "cluster_listening": phase.cluster_listening,
            "celld_fetched_bytes": phase.fetched,
            "retransmitted_segments": phase.retransmits,
            "queue_drops": {r: {"up": up, "down": down} for r, (up, down) in phase.drops.items()},
            "peer_requests": phase.peer_requests,
            "registry_reads": phase.registry_reads,
            "lease_reads": phase.lease_reads,
            "cpu_s": phase.cpu,
            "ballast_bytes": (
                {"filled": phase.ballast[0], "given_back": phase.ballast[1]}
                if phase.ballast
                else None
            ),
        }
        fig["p99_over_limit"] = fig["p99_s"] / limit if times else None
        # The floor a storm cannot beat when its bytes all cross one registry's link.
        rates = {"hub": self.hub_bps, "central": self.central_bps}
        floors = [
            (phase.wire[role][d] * 8 / rate, role, ("received", "sent")[d], phase.wire[role][d])
            for role, rate in rates.items()
            for d in (0, 1)
        ]
        secs, role, way, nbytes = max(floors)
        fig["busiest_registry_link"] = {"host": role, "way": way, "bytes": nbytes, "seconds": secs}
        fig["link_use"] = self._link_use(phase, ok, fig)
        return fig

    def _link_use(self, phase: Phase, ok: dict[str, dict], fig: dict) -> dict:
        """How much of their rate the links carried: each cell's download from the start
        to its pull's end, and through the middle half of the median pull (no ramp, no
        tail); the busiest registry's upload while it sent. Links short of their rate
        with the cores idle mean the cells had too little to ask for; full links, that
        the storm could not go faster on them."""
        samples, start = phase.link_samples, phase.start_at
        if not samples or not ok:
            return {}
        hosts = self.bed.hosts
        whole = {
            r: links.use(samples, hosts[r].veth_bridge, 1, self.link_bps, start, c["ended"])
            for r, c in ok.items()
        }
        p50 = fig["p50_s"]
        middle = {
            r: links.use(
                samples,
                hosts[r].veth_bridge,
                1,
                self.link_bps,
                start + p50 / 4,
                start + 3 * p50 / 4,
            )
            for r in ok
        }
        registry = fig["busiest_registry_link"]["host"]
        rate = self.hub_bps if registry == "hub" else self.central_bps
        span = links.busy_span(samples, hosts[registry].veth_bridge, 0, rate)
        sent = links.use(samples, hosts[registry].veth_bridge, 0, rate, *span) if span else None

        def median(values: dict) -> float | None:
            known = [v for v in values.values() if v is not None]
            return percentile(known, 0.5) if known else None

        return {
            "cells_down_whole": median(whole),
            "cells_down_middle": median(middle),
            "registry": registry,
            "registry_up": sent,
            "registry_busy_s": span[1] - span[0] if span else None,
        }

    def print_figures(self, fig: dict) -> None:
        o, img = self.opts, fig["image_bytes"]

        def size(n: int) -> str:
            return f"{n / MiB:.1f} MiB ({n / img:.2f} copies)"

        if fig["mode"] == "celld":
            if not o.cluster:
                what = "celld, standalone cells ([cluster] not configured)"
            elif fig["cluster_listening"]:
                what = f"celld, cluster ({fig['cluster_listening']}/{fig['cells']} cells listen on :{CLUSTER_PORT})"
            else:
                what = f"celld, [cluster] configured but no daemon listens on :{CLUSTER_PORT}: standalone cells"
        else:
            what = "pull-through cache (docker-registry proxy mode, in the central's namespace)"
        p = self.out
        p("")
        p(f"== {what}")
        p(
            f"   {fig['cells']} cells, image {img / MiB:.1f} MiB, cell links {o.link}, Hub {o.hub_link or o.link}, central {o.central_link or o.link}"
        )
        if fig["completed"]:
            p(
                f"   completion     p50 {fig['p50_s']:.2f} s   p99 {fig['p99_s']:.2f} s   max {fig['max_s']:.2f} s"
                f"   physical limit {fig['limit_s']:.2f} s   p99/limit {fig['p99_over_limit']:.2f}"
            )
        per = "  ".join(
            f"{r} {c['seconds']:.1f}" if "error" not in c else f"{r} FAILED"
            for r, c in sorted(fig["per_cell"].items())
        )
        p(f"   per cell (s)   {per}")
        late = max((c.get("late_s", 0.0) for c in fig["per_cell"].values()), default=0.0)
        if late > 0.2:
            p(
                f"   note           a pull started {late:.2f} s after the common start (busy machine)"
            )
        p(
            f"   from the Hub   {size(fig['hub_wire_bytes'])} on its link; access log: {fig['hub_log']['blob_gets']} blob GETs, {size(fig['hub_log']['bytes'])}"
        )
        p(
            f"   from central   {size(fig['central_wire_bytes'])} on its link; access log: {fig['central_log']['blob_gets']} blob GETs, {size(fig['central_log']['bytes'])}"
        )
        b = fig["busiest_registry_link"]
        rate = (o.hub_link if b["host"] == "hub" else o.central_link) or o.link
        p(
            f"   busiest link   {b['host']} {b['way']} {size(b['bytes'])}: {b['seconds']:.2f} s at {rate}"
            " (a floor of the completion, like one cell's limit)"
        )
        use = fig["link_use"]
        if use.get("cells_down_whole") is not None:
            line = (
                f"   link use       cells' downloads {use['cells_down_whole']:.0%} of their rate from the start to their end"
                f" (median), {use['cells_down_middle']:.0%} through the middle half of the median pull"
            )
            if use["registry_up"] is not None:
                line += f"; {use['registry']}'s upload {use['registry_up']:.0%} for {use['registry_busy_s']:.1f} s"
            p(line)
        rt = fig["retransmitted_segments"]
        p(
            f"   retransmitted  TCP segments: Hub {rt['hub']}, central {rt['central']}, cells {sum(v for k, v in rt.items() if k not in ('hub', 'central'))}"
        )
        qd = fig["queue_drops"]
        cells = [v for k, v in qd.items() if k not in ("hub", "central")]
        down = sorted(v["down"] for v in cells)
        p(
            f"   queue drops    packets the tbf queues dropped: Hub's uplink {qd['hub']['up']},"
            f" central's {qd['central']['up']}; cells' downlinks {sum(down)}"
            f" ({down[0]}-{down[-1]} a cell), uplinks {sum(v['up'] for v in cells)}"
        )
        lu = fig["largest_upload"]
        p(
            f"   from peers     cells sent {size(fig['cells_upload_bytes'])} in all, TCP ACKs and requests included; largest upload {lu['cell']} {size(lu['bytes'])}"
        )
        if fig["mode"] == "celld":
            account = ", ".join(
                f"{k} {size(v)}" for k, v in sorted(fig["celld_fetched_bytes"].items())
            )
            p(
                f"   celld's count  fetched into the stores of the cells alive: {account or 'nothing'}"
            )
            pr = fig["peer_requests"]
            if pr:

                def n(key: str) -> int:
                    return pr.get(key, 0)

                p(
                    f"   peer requests  piece {n('piece ok')} (busy {n('piece error_503')}, missing {n('piece error_404')}),"
                    f" have queries {n('have query')}, table {n('table ok')} (404 {n('table error_404')})"
                )
            reads = fig["registry_reads"]
            if reads:
                others = ", ".join(f"{k} {v}" for k, v in sorted(reads.items()) if k != "lease")
                # how the leases spread: one cell holding them all brings every byte
                # into the swarm through its own links
                holders = ", ".join(f"{r} {n}" for r, n in sorted(fig["lease_reads"].items()))
                p(
                    f"   registry reads {sum(reads.values())} blobs read whole from a registry: "
                    f"{reads.get('lease', 0)} under a fetch lease ({holders or 'no cell'}), "
                    f"{others or 'none without one'}"
                )
        cpu = fig["cpu_s"]
        if cpu.get("all"):
            daemons = sum(1 for k in cpu if k.startswith("celld "))
            line = f"   cpu            {os.cpu_count()} cores {cpu['busy'] / cpu['all']:.0%} busy, steal {cpu['steal'] / cpu['all']:.0%}, from the start to the last pull"
            if "celld" in cpu:
                line += f"; celld {cpu['celld']:.1f} CPU-s ({daemons} daemons)"
            # where the rest went: the runtimes, the registries, the links
            line += f", skopeo {cpu['clients']:.1f}, registries {cpu['registries']:.1f}"
            line += f", softirq {cpu['softirq']:.1f} of {cpu['busy']:.1f} busy"
            p(line)
        verdict = f"   digests        {fig['completed']}/{fig['survivors']} cells completed with the right digest"
        if fig["killed"]:
            verdict += f" ({len(fig['killed'])} killed: {', '.join(fig['killed'])})"
        p(verdict)
        for r, c in sorted(fig["per_cell"].items()):
            if "error" in c and r not in fig["killed"]:
                p(f"   {r}: {c['error']}")

    def _mount_tmpfs(self) -> None:
        """Every cell of a real fleet writes to a disk of its own; here they share one.
        A storm writes the image twice per cell (celld's store, the runtime's copy) at
        the cells' link rates at once: 8 cells on 200 Mbit/s write 400 MB/s, twice what
        this machine's disk takes with fsync (208 MB/s), and the disk, not the network,
        would bind. So the run's own temp work dir goes on a tmpfs when the run fits in
        half the memory available (else it stays on disk, and the run says so)."""
        if not self.opts.tmpfs or not self.made_workdir:
            return
        need = int(self.opts.image_mib * MiB * (2 * self.opts.cells + 3)) + 256 * MiB
        free = _mem_available()
        if need > free // 2:
            self.out(
                f"work dir on disk: a tmpfs would take {need / MiB:.0f} MiB of the "
                f"{free / MiB:.0f} MiB available (the disk may bind before the links)"
            )
            return
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={need},mode=0700", f"ctb-{self.rid}",
             str(self.workdir)],
            check=True,
        )  # fmt: skip
        self.mounted = True
        self.out(f"work dir on a tmpfs of {need / MiB:.0f} MiB (the cells share no disk)")
        if self.opts.warm:
            self.ballast = Ballast(self.workdir)

    # -- the whole run ----------------------------------------------------------

    def run(self) -> int:
        """Build, storm every mode, print; always stop and remove everything."""
        results = []
        try:
            self.build()
            for mode in self.opts.modes:
                fig = self.figures(self.storm(mode))
                self.print_figures(fig)
                results.append(fig)
            if self.opts.json_out:
                self.opts.json_out.write_text(
                    json.dumps(
                        {
                            "run_id": self.rid,
                            "image_digest": self.image.digest,  # type: ignore[union-attr]
                            "tcp": self.opts.tcp,
                            "runtime_procs": self.opts.runtime_procs,
                            "storms": results,
                        },
                        indent=1,
                    )
                )
        finally:
            self.teardown()
        good = all(f["completed"] == f["survivors"] for f in results)
        return 0 if good else 1

    def teardown(self) -> None:
        """Stop every process, remove every namespace, veth and bridge of the run.
        Signals wait until it is done: a second Ctrl-C must not leave half a testbed."""
        old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            for proc in self.procs:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
            deadline = time.monotonic() + 5
            for proc in self.procs:
                try:
                    proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            removed = net.remove_run(self.rid)
            left = net.leftovers(self.rid)
            if self.ballast is not None:
                self.ballast.remove()
            if self.mounted and not self.opts.keep:
                subprocess.run(["umount", str(self.workdir)], check=False)
            if self.made_workdir and not self.opts.keep:
                shutil.rmtree(self.workdir, ignore_errors=True)
            msg = f"cleaned up run {self.rid}: {len(removed)} namespaces and links removed"
            self.out(msg + (f"; STILL THERE: {', '.join(left)}" if left else ""))
        finally:
            for s, h in old.items():
                signal.signal(s, h)


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0
