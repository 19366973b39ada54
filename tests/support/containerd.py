"""A private containerd (Debian's 1.6) for tests: its own root, state and socket.

Tests pull through a mirror the way a cell's runtime does: `ctr` reads a
hosts.toml whose `[host."http://127.0.0.1:PORT"]` is the mirror, and whose
`server` is a dead loopback port by default, so a pull succeeds through the
mirror or not at all (never through the registry the image names, and never
off the machine). containerd then sends `?ns=<registry host>` with every
request to the mirror, which is how celld picks the upstream; the value is
query-escaped (`ns=registry.example%3A5000` for a host with a port).

What it knows about containerd 1.6 here (checked, not assumed):
- An `http://` host in hosts.toml is enough for plain HTTP; `--plain-http` is
  not needed (it only changes the scheme of a `server` written without one).
- hosts.toml is read by `ctr` itself, per command (`--hosts-dir`), so every
  test can have its own hosts dir on one shared daemon.
- `ctr images pull` always unpacks; `ctr content fetch` runs the same fetch
  (resolve, manifests, every blob, image record) without unpacking, so
  `pull(unpack=False)` uses it. Unpacking works here with both the overlayfs
  and the native snapshotter.
- containerd verifies every blob against its digest (and every unpacked layer
  against the config's diff_ids) before committing it; content in the store is
  therefore byte-exact. `content_bytes()` reads it back through the API for
  tests that want to compare bytes themselves.
- A failed blob download stays behind as a partial "ingest" that the next
  pull resumes (with a Range request) or commits as it is. After a corrupt
  transfer it is poisoned: retries in that namespace keep failing with the
  same wrong digest until `drop_partial_downloads()` or a fresh `view()`.
- A ref whose registry has no hosts.toml in the hosts dir would go to that
  registry itself; `pull()` refuses it, and every ctr runs with
  `loopback_only_env()` in case a test builds its own command line.
- The content store is made "isolated" per namespace: with the default
  "shared" policy a blob fetched in one namespace is silently reused by the
  next, and a second test's pull would never reach the mirror.

Owns: the daemon process and the `ctr` command lines. Never touches
/etc/containerd, /run/containerd, /var/lib/containerd or /opt/containerd.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.procs import stop_process, tail

# Nothing listens on port 1 (binding it needs root, and nobody here does):
# a connection there is refused at once.
DEAD_SERVER = "http://127.0.0.1:1"


def loopback_only_env() -> dict[str, str]:
    """The environment for every runtime the tests start: nothing leaves loopback.

    Go's net/http (ctr, skopeo, podman) sends every request for a host that is
    not loopback through HTTP(S)_PROXY, without even resolving its name; the
    proxy here is the dead port. So a ref that no hosts.toml or
    registries.conf maps to a mirror fails with "proxyconnect tcp: dial tcp
    127.0.0.1:1", instead of looking up registry-1.docker.io. Mirrors on
    127.0.0.0/8 and localhost are never proxied.
    """
    env = {k: v for k, v in os.environ.items() if k.lower() != "no_proxy"}
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        env[name] = DEAD_SERVER
    return env


# Plugins that cost start-up time, need kernel features or write outside the
# root dir; a pull needs content, metadata, images, leases, snapshotters, diff.
DISABLED_PLUGINS = (
    "io.containerd.grpc.v1.cri",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.internal.v1.opt",  # would create /opt/containerd
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.internal.v1.tracing",
)


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True)
class PullResult:
    """What one `ctr` pull printed, and a handle to ask the store about it."""

    ref: str
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool
    containerd: Containerd = field(repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def check(self) -> PullResult:
        """Raise with ctr's own output when the pull failed."""
        if not self.ok:
            raise AssertionError(
                f"ctr pull {self.ref} exited {self.returncode}:\n{self.output[-4000:]}"
            )
        return self

    def image_digest(self) -> str | None:
        return self.containerd.image_digest(self.ref)

    def content_digests(self) -> set[str]:
        return self.containerd.content_digests()


@dataclass
class Containerd:
    """One containerd process, or a view on it with its own namespace.

    `start()` makes root/, state/, config.toml and the gRPC socket under
    `root` (the socket in a short /tmp dir if `root` is too deep for the
    108-byte limit of unix socket paths). `view()` gives another namespace and
    hosts dir on the same daemon: a cheap, isolated "fresh runtime" per test.
    """

    root: Path
    namespace: str = "celld-tests"
    hosts_dir: Path | None = None
    proc: subprocess.Popen | None = field(default=None, compare=False)
    socket_dir: Path | None = field(default=None, compare=False)
    owner: bool = field(default=True, compare=False)

    def __post_init__(self) -> None:
        if self.hosts_dir is None:
            self.hosts_dir = self.root / "hosts"

    @property
    def address(self) -> Path:
        assert self.socket_dir is not None, "containerd not started"
        return self.socket_dir / "containerd.sock"

    @property
    def log_path(self) -> Path:
        return self.root / "containerd.log"

    def _config(self) -> str:
        disabled = ", ".join(_toml_str(p) for p in DISABLED_PLUGINS)
        return "\n".join(
            [
                "version = 2",
                f"root = {_toml_str(str(self.root / 'root'))}",
                f"state = {_toml_str(str(self.root / 'state'))}",
                f"disabled_plugins = [{disabled}]",
                "[grpc]",
                f"  address = {_toml_str(str(self.address))}",
                "[ttrpc]",
                f"  address = {_toml_str(str(self.address) + '.ttrpc')}",
                "[debug]",
                '  level = "info"',
                "[plugins]",
                '  [plugins."io.containerd.metadata.v1.bolt"]',
                '    content_sharing_policy = "isolated"',
                "",
            ]
        )

    def start(self, timeout: float = 15.0) -> Containerd:
        self.root.mkdir(parents=True, exist_ok=True)
        assert self.hosts_dir is not None
        self.hosts_dir.mkdir(parents=True, exist_ok=True)
        if self.socket_dir is None:
            if len(str(self.root / "containerd.sock.ttrpc")) < 100:
                self.socket_dir = self.root
            else:
                self.socket_dir = Path(tempfile.mkdtemp(prefix="ctd-"))
        config = self.root / "config.toml"
        config.write_text(self._config())
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                ["/usr/bin/containerd", "--config", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=loopback_only_env(),
            )
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        """Ready means the gRPC API answers, not just that the socket exists."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"containerd exited with {self.proc.returncode}:\n{tail(self.log_path)}"
                )
            if self.address.exists():
                probe = self.ctr("version", timeout=5, check=False)
                if probe.returncode == 0:
                    return
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"containerd not ready after {timeout}s:\n{tail(self.log_path)}")

    def stop(self) -> None:
        """Stop the daemon (a view never stops the daemon it looks at)."""
        if not self.owner:
            return
        stop_process(self.proc)
        self.proc = None
        if self.socket_dir is not None and self.socket_dir != self.root:
            shutil.rmtree(self.socket_dir, ignore_errors=True)

    def view(self, namespace: str, hosts_dir: Path | None = None) -> Containerd:
        """The same daemon seen from another namespace (a runtime with an empty
        store), with its own hosts dir or, by default, this one's."""
        hosts_dir = hosts_dir or self.hosts_dir
        assert hosts_dir is not None
        hosts_dir.mkdir(parents=True, exist_ok=True)
        return dataclasses.replace(self, namespace=namespace, hosts_dir=hosts_dir, owner=False)

    def ctr(
        self,
        *args: str,
        timeout: float = 60.0,
        check: bool = True,
        text: bool = True,
    ) -> subprocess.CompletedProcess:
        """Run `ctr -a SOCK -n NAMESPACE ARGS...`; raise with its output on failure."""
        cmd = ["/usr/bin/ctr", "-a", str(self.address), "-n", self.namespace, *args]
        proc = subprocess.run(
            cmd,
            capture_output=True,
            timeout=timeout,
            text=text,
            stdin=subprocess.DEVNULL,
            env=loopback_only_env(),
        )
        if check and proc.returncode != 0:
            err = proc.stderr if text else proc.stderr.decode(errors="replace")
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {err}")
        return proc

    def write_hosts(
        self,
        registry_host: str,
        mirror_url: str,
        *,
        server: str | None = None,
        capabilities: Iterable[str] = ("pull", "resolve"),
        extra_headers: Mapping[str, str] | None = None,
    ) -> Path:
        """Write <hosts_dir>/<registry_host>/hosts.toml naming `mirror_url` as a host.

        `registry_host` is the registry part of the refs pulled ("docker.io",
        "ghcr.io", "127.0.0.1:5000"). `server` defaults to a dead loopback
        port, so nothing bypasses the mirror.
        """
        assert self.hosts_dir is not None
        lines = [
            f"server = {_toml_str(server or DEAD_SERVER)}",
            "",
            f"[host.{_toml_str(mirror_url)}]",
            f"  capabilities = [{', '.join(_toml_str(c) for c in capabilities)}]",
        ]
        if extra_headers:
            lines.append(f"  [host.{_toml_str(mirror_url)}.header]")
            lines += [f"    {_toml_str(k)} = {_toml_str(v)}" for k, v in extra_headers.items()]
        path = self.hosts_dir / registry_host / "hosts.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
        return path

    def pull(
        self,
        ref: str,
        *,
        platform: str | None = None,
        all_platforms: bool = False,
        user: str | None = None,
        unpack: bool = False,
        snapshotter: str | None = None,
        timeout: float = 120.0,
    ) -> PullResult:
        """Pull `ref` through the hosts dir; never raises for a failed pull.

        unpack=False runs `ctr content fetch` (everything but the unpack),
        unpack=True `ctr images pull` with `snapshotter` (containerd's default,
        overlayfs, when None). `user` is "name:password" for registries that
        ask for Basic auth. A pull still running after `timeout` is killed and
        reported with timed_out=True. A ref whose registry has no hosts.toml
        here is refused: it could only go to the real registry.
        """
        assert self.hosts_dir is not None
        registry_host = ref.split("/", 1)[0]
        name, _, port = registry_host.rpartition(":") if ":" in registry_host else ("", "", "")
        candidates = [registry_host] + ([f"{name}_{port}_"] if port else [])
        if not any((self.hosts_dir / c / "hosts.toml").exists() for c in candidates):
            raise ValueError(
                f"no hosts.toml for {registry_host!r} in {self.hosts_dir}: "
                "write_hosts() first (refs must name their registry, like docker.io/library/x)"
            )
        if unpack:
            args = ["images", "pull"]
            if snapshotter:
                args += ["--snapshotter", snapshotter]
        else:
            args = ["content", "fetch"]
        args += ["--hosts-dir", str(self.hosts_dir)]
        if platform:
            args += ["--platform", platform]
        if all_platforms:
            args.append("--all-platforms")
        if user:
            args += ["--user", user]
        cmd = ["/usr/bin/ctr", "-a", str(self.address), "-n", self.namespace, *args, ref]
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env=loopback_only_env(),
        )
        timed_out = False
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.kill()
            out, err = proc.communicate()
        return PullResult(ref, proc.returncode, out, err, timed_out, self)

    def images(self) -> dict[str, str]:
        """Image records in this namespace: ref -> target digest."""
        out = self.ctr("images", "ls").stdout.splitlines()
        result = {}
        for line in out[1:]:
            cols = line.split()
            if len(cols) >= 3:
                result[cols[0]] = cols[2]
        return result

    def image_digest(self, ref: str) -> str | None:
        """The digest an image record points to (the manifest or index pulled)."""
        return self.images().get(ref)

    def is_unpacked(self, ref: str, snapshotter: str | None = None) -> bool:
        """`ctr images check -q`: all content present and unpacked in `snapshotter`."""
        args = ["images", "check", "-q"]
        if snapshotter:
            args += ["--snapshotter", snapshotter]
        return ref in self.ctr(*args, f"name=={ref}").stdout.split()

    def content_digests(self) -> set[str]:
        """Every blob (manifests, configs, layers) in this namespace's store."""
        return set(self.ctr("content", "ls", "-q").stdout.split())

    def content_bytes(self, digest: str) -> bytes:
        """A blob's bytes as containerd serves them from its store."""
        return self.ctr("content", "get", digest, text=False).stdout

    def snapshots(self, snapshotter: str | None = None) -> list[str]:
        args = ["snapshots"]
        if snapshotter:
            args += ["--snapshotter", snapshotter]
        lines = self.ctr(*args, "ls").stdout.splitlines()
        return [line.split()[0] for line in lines[1:] if line.strip()]

    def drop_partial_downloads(self) -> None:
        """Run containerd's garbage collector now, which deletes partial downloads.

        containerd resumes a failed blob download from what it already wrote
        (an "ingest"). After a transfer with a flipped byte, that partial is
        poisoned: every retry in the same namespace resumes it, or commits it
        whole, and fails with the same wrong digest, even once the source
        serves good bytes. Dropping it (or pulling from a fresh `view()`)
        makes the next pull start from byte 0.
        """
        lease = self.ctr("leases", "create").stdout.split()[0]
        self.ctr("leases", "rm", "--sync", lease)
        active = self.ctr("content", "active").stdout.splitlines()[1:]
        assert not [line for line in active if line.strip()], f"ingests survived GC: {active}"
