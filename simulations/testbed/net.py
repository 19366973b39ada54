"""The testbed's network: a bridge, one network namespace per host, shaped veth links.

Owns every namespace, veth pair and bridge a run makes, their names and their
removal. Names carry a run id (`ctb-<rid>-...`, veths `ctb<rid>...`), so two
runs or a leftover never collide, and `cleanup()` finds what a run left by that
prefix. The bridge lives in a namespace of its own and no address here routes
anywhere: hosts get 10.77.0.X/24 on their veth, and no default route is ever
added, so nothing a host sends can leave the testbed.

Shaping is tc tbf on the egress of both ends of each veth (the host's end
shapes its upload, the bridge's end its download): this kernel has no netem.
Every host's TCP runs the congestion control the run names, set on its one route
(`congctl`): a new namespace otherwise inherits the root namespace's, which on
this machine is BBR, and the sysctl of a namespace cannot take one the root does
not allow, while a route's can.
Must never touch a namespace or link without the testbed's prefix.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "ctb"
SUBNET = "10.77.0"
# Who owns a run: <rid> -> the pid of the process that made it (for `cleanup`).
OWNERS = Path("/run/celld-testbed")

_RATE = re.compile(r"^(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit|tbit)$", re.IGNORECASE)
_RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}


class NetError(RuntimeError):
    """The testbed's network could not be built: one line naming the step that failed."""


def parse_rate(text: str) -> int:
    """A tc rate ("200mbit", "1gbit") as bits per second."""
    m = _RATE.match(text.strip())
    if not m:
        raise ValueError(f"expected a rate like 200mbit or 10gbit, got {text!r}")
    return int(float(m[1]) * _RATE_UNITS[m[2].lower()])


def congestion_controls() -> list[str]:
    """The TCP congestion controls this kernel can run now (built in or loaded)."""
    path = Path("/proc/sys/net/ipv4/tcp_available_congestion_control")
    return path.read_text().split()


def tbf_args(rate_bps: int) -> list[str]:
    """tbf settings that reach the rate with TCP over veth: the bucket holds 4 ms of
    the rate (at least 64 KiB, so one GSO segment of 64 KiB passes whole) and the
    queue 20 ms. Measured here with one Python TCP stream: 200mbit -> 190 Mbit/s
    goodput, 1gbit -> 938, 10gbit -> 6949 (unshaped: 5715, so at 10gbit the
    sender is the limit); a 64 KiB bucket gave only 613 at 1gbit."""
    burst = max(64 * 1024, rate_bps // 8 * 4 // 1000)
    return ["tbf", "rate", f"{rate_bps}bit", "burst", str(burst), "latency", "20ms"]


def run(argv: list[str], *, check: bool = True) -> subprocess.CompletedProcess:
    """Run one ip/tc command; a failure is a NetError naming the command and its words."""
    done = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if check and done.returncode != 0:
        raise NetError(f"`{' '.join(argv)}` failed: {done.stderr.strip() or done.returncode}")
    return done


@dataclass(frozen=True)
class Host:
    """One host of the testbed: its namespace, address and the veth pair to the bridge."""

    role: str  # "hub", "central", "c01", ...
    netns: str
    address: str
    veth: str  # the host's end, inside `netns`
    veth_bridge: str  # the bridge's end, inside the bridge's namespace


@dataclass
class Testbed:
    """The network of one run. `build()` then `add_host()`; `destroy()` undoes all."""

    rid: str
    tcp: str | None = None  # congestion control of every host's TCP (None: the root's)
    hosts: dict[str, Host] = field(default_factory=dict)

    @property
    def bridge_netns(self) -> str:
        return f"{PREFIX}-{self.rid}-br"

    @property
    def bridge(self) -> str:
        return f"{PREFIX}{self.rid}br"

    def build(self) -> None:
        OWNERS.mkdir(parents=True, exist_ok=True)
        (OWNERS / self.rid).write_text(str(os.getpid()))
        self._netns_add(self.bridge_netns)
        ns = ["ip", "-n", self.bridge_netns]
        run([*ns, "link", "add", self.bridge, "type", "bridge"])
        run([*ns, "link", "set", self.bridge, "up"])

    def _netns_add(self, name: str) -> None:
        run(["ip", "netns", "add", name])
        run(["ip", "-n", name, "link", "set", "lo", "up"])

    def add_host(self, role: str, index: int, rate_bps: int) -> Host:
        """A namespace on the bridge at 10.77.0.<index>, both directions shaped to rate."""
        if not 2 <= index <= 254:
            raise NetError(f"host index {index} outside 2..254 (at most 250 cells)")
        netns = f"{PREFIX}-{self.rid}-{role}"
        tag = f"{PREFIX}{self.rid}{role[:3]}{index:03d}"[:14]
        host = Host(role, netns, f"{SUBNET}.{index}", tag + "a", tag + "b")
        self._netns_add(netns)
        # Made in the root namespace, each end moved at once: a leftover has the prefix.
        run(["ip", "link", "add", host.veth, "type", "veth", "peer", "name", host.veth_bridge])
        run(["ip", "link", "set", host.veth, "netns", netns])
        run(["ip", "link", "set", host.veth_bridge, "netns", self.bridge_netns])
        br = ["ip", "-n", self.bridge_netns]
        run([*br, "link", "set", host.veth_bridge, "master", self.bridge, "up"])
        run(["ip", "-n", netns, "addr", "add", f"{host.address}/24", "dev", host.veth])
        run(["ip", "-n", netns, "link", "set", host.veth, "up"])
        if self.tcp:
            run(
                [
                    "ip",
                    "-n",
                    netns,
                    "route",
                    "replace",
                    f"{SUBNET}.0/24",
                    "dev",
                    host.veth,
                    "proto",
                    "kernel",
                    "scope",
                    "link",
                    "src",
                    host.address,
                    "congctl",
                    self.tcp,
                ]
            )
        for ns, dev in ((netns, host.veth), (self.bridge_netns, host.veth_bridge)):
            run(["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", *tbf_args(rate_bps)])
        self.hosts[role] = host
        return host

    def counters(self) -> dict[str, tuple[int, int]]:
        """(rx bytes, tx bytes) of each host's veth, as the host sees it: the honest
        physical figure, headers included."""
        out = {}
        for role, host in self.hosts.items():
            done = run(["ip", "-n", host.netns, "-s", "-j", "link", "show", "dev", host.veth])
            stats = json.loads(done.stdout)[0]["stats64"]
            out[role] = (stats["rx"]["bytes"], stats["tx"]["bytes"])
        return out

    def retransmits(self) -> dict[str, int]:
        """TCP segments each host has retransmitted (Tcp RetransSegs of its namespace):
        what its veth counter holds beyond what the applications sent."""
        out = {}
        for role, host in self.hosts.items():
            text = run(netns_exec(host.netns, ["cat", "/proc/net/snmp"])).stdout
            names, values = (
                line.split()[1:] for line in text.splitlines() if line.startswith("Tcp:")
            )
            out[role] = int(dict(zip(names, values, strict=True))["RetransSegs"])
        return out

    def drops(self) -> dict[str, tuple[int, int]]:
        """Packets each host's links dropped, (up, down): the drop counts of its tbf
        queues as `tc -s qdisc` shows them, up on the host's own egress, down on the
        bridge's egress towards it. A TCP flow loses packets where its path's queue
        overflows: these say on which link the flows of a storm were cut back."""
        return {
            role: (
                _qdisc_drops(host.netns, host.veth),
                _qdisc_drops(self.bridge_netns, host.veth_bridge),
            )
            for role, host in self.hosts.items()
        }

    def destroy(self) -> None:
        remove_run(self.rid)


def _qdisc_drops(netns: str, dev: str) -> int:
    done = run(["tc", "-n", netns, "-s", "-j", "qdisc", "show", "dev", dev])
    return sum(int(q.get("drops", 0)) for q in json.loads(done.stdout))


def netns_exec(netns: str, argv: list[str]) -> list[str]:
    return ["ip", "netns", "exec", netns, *argv]


def listening(netns: str, port: int, proto: str = "t") -> bool:
    """Does anything listen on `port` (TCP "t" or UDP "u") inside the namespace?"""
    done = run(["ss", "-N", netns, f"-Hln{proto}", f"sport = :{port}"], check=False)
    return done.returncode == 0 and bool(done.stdout.strip())


def wait_listening(
    netns: str, port: int, proc: subprocess.Popen, log: Path, timeout: float = 20.0
) -> None:
    deadline = time.monotonic() + timeout
    while not listening(netns, port):
        if proc.poll() is not None or time.monotonic() > deadline:
            why = f"exited with {proc.returncode}" if proc.poll() is not None else "timed out"
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
            raise NetError(f"{proc.args[4:6]} in {netns} {why} before port {port} opened:\n{tail}")
        time.sleep(0.05)


def run_ids() -> set[str]:
    """Run ids with a namespace or a root-namespace link left under the prefix."""
    ids = set()
    for line in run(["ip", "netns", "list"]).stdout.splitlines():
        m = re.match(rf"{PREFIX}-([0-9a-f]+)-", line)
        if m:
            ids.add(m[1])
    for name in _root_links():
        m = re.match(rf"{PREFIX}([0-9a-f]{{4}})", name)
        if m:
            ids.add(m[1])
    if OWNERS.is_dir():
        ids |= {p.name for p in OWNERS.iterdir()}
    return ids


def _root_links() -> list[str]:
    done = run(["ip", "-j", "link", "show"])
    return [link["ifname"] for link in json.loads(done.stdout) if link["ifname"].startswith(PREFIX)]


def owner_alive(rid: str) -> bool:
    try:
        pid = int((OWNERS / rid).read_text())
    except (OSError, ValueError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid != os.getpid()


def remove_run(rid: str) -> list[str]:
    """Kill every process in the run's namespaces, delete them (their veths and the
    bridge go with them) and any veth of the run left in the root namespace.
    Returns what it removed."""
    removed = []
    names = [
        line.split()[0]
        for line in run(["ip", "netns", "list"]).stdout.splitlines()
        if line.startswith(f"{PREFIX}-{rid}-")
    ]
    for ns in names:
        for _ in range(50):
            pids = [int(p) for p in run(["ip", "netns", "pids", ns], check=False).stdout.split()]
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        run(["ip", "netns", "del", ns], check=False)
        removed.append(f"netns {ns}")
    for name in _root_links():
        if name.startswith(f"{PREFIX}{rid}"):
            run(["ip", "link", "del", name], check=False)
            removed.append(f"link {name}")
    with contextlib.suppress(FileNotFoundError):
        (OWNERS / rid).unlink()
    return removed


def leftovers(rid: str) -> list[str]:
    """What of run `rid` still exists: namespaces and root-namespace links."""
    found = [
        f"netns {line.split()[0]}"
        for line in run(["ip", "netns", "list"]).stdout.splitlines()
        if line.startswith(f"{PREFIX}-{rid}-")
    ]
    found += [f"link {n}" for n in _root_links() if n.startswith(f"{PREFIX}{rid}")]
    return found
