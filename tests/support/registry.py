"""Debian's docker-registry (distribution 2.8) as a Hub or a central registry.

Tests start one per role on a free loopback port, with its own storage, and
read its access log to count what reached it (one upstream GET per digest is
a claim about the registry's log, not about celld's own counters).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

from tests.support.procs import LoopbackProcess

ACCESS_LINE = re.compile(r'"(?P<method>[A-Z]+) (?P<uri>\S+) HTTP/[0-9.]+" (?P<status>\d{3}) ')


@dataclass
class Registry(LoopbackProcess):
    """One docker-registry process; `stop()`/`start()` keep port and storage."""

    auth: dict | None = None

    @property
    def log_path(self) -> Path:
        return self.root / "registry.log"

    def _config(self) -> str:
        lines = [
            "version: 0.1",
            "log:",
            "  level: info",
            "  formatter: text",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {self.root / 'data'}",
            "  delete:",
            "    enabled: true",
            "  maintenance:",
            "    uploadpurging:",
            "      enabled: false",
            "http:",
            f"  addr: 127.0.0.1:{self.port}",
            "  secret: celld-tests-not-a-secret",
        ]
        if self.auth:
            lines.append("auth:")
            for kind, opts in self.auth.items():
                lines.append(f"  {kind}:")
                for k, v in opts.items():
                    lines.append(f"    {k}: {v}")
        return "\n".join(lines) + "\n"

    def start(self) -> Registry:
        self.root.mkdir(parents=True, exist_ok=True)
        cfg = self.root / "config.yml"
        cfg.write_text(self._config())
        self.spawn(["docker-registry", "serve", str(cfg)], self.log_path)
        return self

    def _settled_log(self, quiet: float = 0.1, limit: float = 2.0) -> str:
        """The access log once it stops growing. The registry logs a request after
        answering it, so its last line can trail what the client already saw."""
        last = -1
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            size = self.log_path.stat().st_size if self.log_path.exists() else 0
            if size == last:
                break
            last = size
            time.sleep(quiet)
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def requests(
        self, method: str | None = None, uri_pattern: str = ""
    ) -> list[tuple[str, str, int]]:
        """Requests in the access log as (method, uri, status), filtered."""
        pat = re.compile(uri_pattern)
        out = []
        text = self._settled_log()
        for m in ACCESS_LINE.finditer(text):
            if method and m["method"] != method:
                continue
            if pat.search(m["uri"]):
                out.append((m["method"], m["uri"], int(m["status"])))
        return out
