"""Debian's docker.io (dockerd 20.10) for tests: its own daemon per test, on a unix socket.

docker finds a mirror only in the daemon's `registry-mirrors`, read once at
start, and mirrors only Docker Hub: a ref docker resolves against docker.io
(`library/web:1`, `acme/shop@sha256:...`) is tried at the mirror first, then
at registry-1.docker.io. Every test's cell has its own port, so every test
that pulls with docker starts its own dockerd naming that cell (with its
containerd it answers its API 0.4 s after exec here, and stops in 0.02 s):
the simplest way to give each test a fresh runtime with an empty image store
and the right mirror. A session dockerd would need a stable port forwarded
to each test's cell and its image store emptied between tests, to save 0.4 s.

What it knows about dockerd 20.10 here (checked, not assumed):
- daemon.json holds everything: vfs storage (no overlay mounts), no
  iptables, no bridge, and data-root, exec-root, pidfile, socket and trust
  key (`deprecated-key-path`, else it writes /etc/docker/key.json) under the
  test's dirs. The exec-root is a short /tmp dir: the unix sockets under it
  must fit in 108 bytes.
- It runs on a containerd of its own, started by `Containerd` (never the
  session's, never a system one), because the containerd dockerd would start
  itself loads the `opt` plugin, which creates /opt/containerd.
- The mirror is asked `GET /v2/<name>/manifests/<ref>` and blobs with no `ns`
  parameter (to celld that is docker.io). When the mirror fails, dockerd
  falls back to registry-1.docker.io; with `loopback_only_env()` that
  fallback ends at the dead proxy port ("proxyconnect tcp"), so a pull
  succeeds through the mirror or not at all.
- The client sends dockerd the credentials its config.json holds for the
  image's registry (`https://index.docker.io/v1/` for docker.io refs, also
  when the request goes to a mirror). dockerd learns whether to send them
  from the 401 of its `GET /v2/` ping only: a 401 on a manifest or blob is
  never answered with credentials, and a /v2/ challenge it has no
  credentials for ends the pull at that endpoint, before any manifest GET.
  `login()` writes config.json by hand: `docker login` would ask Docker Hub.

What it still writes outside its dirs (dockerd 20.10 has no setting
against it): an empty /run/docker/plugins directory.

Owns: the dockerd process, its config and the `docker` command lines, always
Debian's binaries by full path (/usr/sbin/dockerd, /usr/bin/docker): another
docker client may come first on PATH.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.support.containerd import Containerd, loopback_only_env
from tests.support.procs import stop_process, tail

DOCKERD = "/usr/sbin/dockerd"
DOCKER = "/usr/bin/docker"
HUB_AUTH_KEY = "https://index.docker.io/v1/"  # where the client files docker.io credentials


@dataclass
class Docker:
    """One dockerd whose only registry mirror is `mirror` ("http://127.0.0.1:PORT")."""

    root: Path
    mirror: str
    proc: subprocess.Popen | None = field(default=None, compare=False)
    exec_root: Path | None = field(default=None, compare=False)
    containerd: Containerd | None = field(default=None, compare=False)

    @property
    def log_path(self) -> Path:
        return self.root / "dockerd.log"

    @property
    def socket(self) -> Path:
        assert self.exec_root is not None, "dockerd not started"
        return self.exec_root / "docker.sock"

    @property
    def client_config(self) -> Path:
        """DOCKER_CONFIG: the client's config.json (credentials) lives here."""
        return self.root / "client"

    def _daemon_json(self) -> dict:
        assert self.exec_root is not None and self.containerd is not None
        return {
            "storage-driver": "vfs",
            "iptables": False,
            "ip6tables": False,
            "bridge": "none",
            "data-root": str(self.root / "data"),
            "exec-root": str(self.exec_root / "exec"),
            "pidfile": str(self.root / "dockerd.pid"),
            "deprecated-key-path": str(self.root / "key.json"),
            "hosts": [f"unix://{self.socket}"],
            "containerd": str(self.containerd.address),
            "registry-mirrors": [self.mirror],
        }

    def start(self, timeout: float = 30.0) -> Docker:
        """Start containerd and dockerd; ready once the API answers `/_ping`.
        A daemon that exits or never answers raises with the tail of its log."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.client_config.mkdir(exist_ok=True)
        self.exec_root = Path(tempfile.mkdtemp(prefix="dkr-"))
        self.containerd = Containerd(self.root / "containerd", namespace="moby")
        self.containerd.socket_dir = self.exec_root
        self.containerd.start()
        config = self.root / "daemon.json"
        config.write_text(json.dumps(self._daemon_json(), indent=2))
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [DOCKERD, "--config-file", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=loopback_only_env(),
            )
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        transport = httpx.HTTPTransport(uds=str(self.socket))
        with httpx.Client(transport=transport, base_url="http://docker", timeout=2) as api:
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"dockerd exited with {self.proc.returncode}:\n{tail(self.log_path)}"
                    )
                if self.socket.exists():
                    try:
                        if api.get("/_ping").status_code == 200:
                            return
                    except httpx.TransportError:
                        pass
                time.sleep(0.05)
        log = tail(self.log_path)
        self.stop()
        raise TimeoutError(f"dockerd not ready after {timeout}s:\n{log}")

    def stop(self) -> None:
        """Stop dockerd, then its containerd; remove the short exec-root."""
        stop_process(self.proc, timeout=15)
        self.proc = None
        if self.containerd is not None:
            self.containerd.stop()
            self.containerd = None
        if self.exec_root is not None:
            shutil.rmtree(self.exec_root, ignore_errors=True)
            self.exec_root = None

    def run(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """`docker ARGS...` against this daemon; never raises for a failed command."""
        env = loopback_only_env()
        env["DOCKER_HOST"] = f"unix://{self.socket}"
        env["DOCKER_CONFIG"] = str(self.client_config)
        return subprocess.run(
            [DOCKER, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            stdin=subprocess.DEVNULL,
        )

    def pull(self, ref: str, *, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """`docker pull REF`: through the mirror, or the dead fallback."""
        return self.run("pull", ref, timeout=timeout)

    def login(self, username: str, password: str, registry: str = HUB_AUTH_KEY) -> None:
        """Credentials in the client's config.json, as `docker login` files them."""
        token = base64.b64encode(f"{username}:{password}".encode()).decode()
        path = self.client_config / "config.json"
        path.write_text(json.dumps({"auths": {registry: {"auth": token}}}))
        path.chmod(0o600)

    def inspect(self, ref: str) -> dict | None:
        """`docker image inspect`: Id (the config digest), RepoDigests
        ("name@<manifest digest>"), RootFS.Layers; None when there is no such image."""
        proc = self.run("image", "inspect", ref)
        if proc.returncode != 0:
            return None
        (info,) = json.loads(proc.stdout)
        return info

    def images(self) -> list[str]:
        """Every image id in the store."""
        return self.run("images", "-q", "--no-trunc").stdout.split()
