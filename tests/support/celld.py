"""celld itself as tests see it: a real `celld serve` process on loopback.

Tests write a config (the contract's keys), start the daemon as a separate
process, talk to its mirror and metrics over HTTP, and may SIGKILL it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.support.procs import LoopbackProcess, free_port


@dataclass(frozen=True)
class Cluster:
    """A cell's [cluster] table: gossip and the peer API on `listen` (127.0.0.X:port)."""

    listen: str
    seeds: tuple[str, ...] = ()
    zone: str = ""
    upload_slots: int | None = None
    upload_rate: str | None = None
    stall_timeout: float | None = None

    def lines(self) -> list[str]:
        out = [f'listen = "{self.listen}"']
        if self.seeds:
            out.append("seeds = [" + ", ".join(f'"{s}"' for s in self.seeds) + "]")
        if self.zone:
            out.append(f'zone = "{self.zone}"')
        peer = (self.upload_slots, self.upload_rate, self.stall_timeout)
        if any(v is not None for v in peer):
            out.append("[peer]")
        if self.upload_slots is not None:
            out.append(f"upload_slots = {self.upload_slots}")
        if self.upload_rate is not None:
            out.append(f'upload_rate = "{self.upload_rate}"')
        if self.stall_timeout is not None:
            out.append(f"stall_timeout = {self.stall_timeout}")
        return out


def cluster_address(i: int) -> str:
    """A distinct loopback address for cell i (Linux routes all of 127/8 to lo)."""
    return f"127.0.0.{10 + i}:{free_port()}"


@dataclass
class Celld(LoopbackProcess):
    """`celld serve` with a config the test describes; mirror on `port`."""

    upstreams: dict[str, str] = field(default_factory=dict)
    registries: list[str] = field(default_factory=list)
    extra: str = ""
    key_file: Path | None = None
    max_bytes: str | None = None
    platform: str | None = None
    metrics_port: int = field(default_factory=free_port)
    name: str = "test-cell"
    cluster: Cluster | None = None

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log_path(self) -> Path:
        return self.root / "celld.log"

    @property
    def config_path(self) -> Path:
        return self.root / "celld.toml"

    def write_config(self) -> Path:
        lines = [
            "[cell]",
            f'name = "{self.name}"',
            f'data_dir = "{self.data_dir}"',
            *([f'platform = "{self.platform}"'] if self.platform else []),
            "[mirror]",
            f'listen = "127.0.0.1:{self.port}"',
            "[metrics]",
            f'listen = "127.0.0.1:{self.metrics_port}"',
        ]
        if self.key_file is not None or self.cluster is not None:
            lines += ["[cluster]"]
            if self.key_file is not None:
                lines.append(f'key_file = "{self.key_file}"')
            if self.cluster is not None:
                lines += self.cluster.lines()
        if self.max_bytes is not None:
            lines += ["[store]", f'max_bytes = "{self.max_bytes}"']
        for url in self.registries:
            lines += ["[[registry]]", f'url = "{url}"']
        for host, url in self.upstreams.items():
            lines += [f'[upstreams."{host}"]', f'url = "{url}"']
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text("\n".join(lines) + "\n" + self.extra)
        return self.config_path

    def start(self) -> Celld:
        self.write_config()
        self.spawn(
            [sys.executable, "-m", "celld", "serve", "--config", str(self.config_path)],
            self.log_path,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            ports=(self.metrics_port,),
            timeout=20,
        )
        return self

    def peers(self) -> dict[str, dict]:
        """GET /v1/peers on the admin socket, as {name: member}."""
        with self.admin() as client:
            doc = client.get("/v1/peers").json()
        return {m["name"]: m for m in doc["members"]}

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def blob_stored(self, digest: str, timeout: float = 10.0) -> bool:
        """Is the blob in the store? Waits for a commit in progress: a client may
        have every verified byte a moment before the fsync and rename are done."""
        path = self.data_dir / "blobs" / "sha256" / digest[7:9] / digest[7:]
        deadline = time.monotonic() + timeout
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        return path.exists()

    def admin(self) -> httpx.Client:
        """A client of the daemon's admin API on its unix socket."""
        transport = httpx.HTTPTransport(uds=str(self.data_dir / "admin.sock"))
        return httpx.Client(transport=transport, base_url="http://celld", timeout=120)

    def stage(
        self, image: str, app: str, *, username: str | None = None, password: str | None = None
    ) -> list[dict]:
        """POST /v1/stage; the NDJSON events, last one "done" or "error"."""
        body = {"image": image, "app": app, "username": username, "password": password}
        with self.admin() as client, client.stream("POST", "/v1/stage", json=body) as r:
            if r.status_code != 200:
                r.read()
                return [{"event": "error", "status": r.status_code, "message": r.json()["error"]}]
            return [json.loads(line) for line in r.iter_lines() if line.strip()]

    def metrics_text(self) -> str:
        """The daemon's /metrics, as Prometheus text."""
        return httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics").text

    def metrics(self) -> dict[str, float]:
        """Samples of the Prometheus text as {'name{labels}': value}."""
        out = {}
        for line in self.metrics_text().splitlines():
            if line.startswith("#") or not line.strip():
                continue
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
        return out

    def samples(self, name: str) -> list[tuple[dict[str, str], float]]:
        """Each sample of `name`: its labels and its value."""
        out = []
        for key, value in self.metrics().items():
            m = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?", key)
            if m and m[1] == name:
                out.append((dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m[2] or "")), value))
        return out

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels`."""
        return sum(
            value
            for got, value in self.samples(name)
            if all(got.get(k) == v for k, v in labels.items())
        )
