"""podman as a runtime that pulls through a registries.conf mirror, when it can.

Each `Podman` has its own storage (`--root`, `--runroot`, vfs driver, which
needs no overlay mounts) under a test's tmp dir (the runroot in a short /tmp
dir: podman 4.3 refuses one over 50 characters), so pulls never touch the
machine's image store. It runs as root here; rootless podman needs user
namespaces and newuidmap, which a CI sandbox may not have, so tests ask
`podman_unavailable_reason()` and skip with its answer rather than fail.

What it still writes outside its dirs (podman 4.3 has no flag against it):
/var/lib/containers/cache/blob-info-cache-v1.boltdb, shared with skopeo,
which records where blobs were seen (it cannot make a pull into fresh storage
skip a download), and an empty /run/containers/networks.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.support.containerd import loopback_only_env
from tests.support.skopeo import write_mirror_auth_file


@dataclass(frozen=True)
class Podman:
    """podman with private storage under `root` and mirrors from `registries_conf`."""

    root: Path
    registries_conf: Path | None = None
    runroot: Path | None = None  # podman refuses one longer than 50 characters

    def _cmd(self, *args: str) -> list[str]:
        return [
            "podman",
            "--root",
            str(self.root / "storage"),
            "--runroot",
            str(self.runroot or self.root / "run"),
            "--tmpdir",
            str(self.root / "tmp"),
            "--network-config-dir",
            str(self.root / "networks"),
            "--storage-driver",
            "vfs",
            "--cgroup-manager",
            "cgroupfs",
            "--events-backend",
            "file",
            *args,
        ]

    def run(
        self, *args: str, timeout: float = 120.0, check: bool = False
    ) -> subprocess.CompletedProcess:
        env = loopback_only_env()
        if self.registries_conf is not None:
            env["CONTAINERS_REGISTRIES_CONF"] = str(self.registries_conf)
        return subprocess.run(
            self._cmd(*args),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            check=check,
            stdin=subprocess.DEVNULL,
        )

    def pull(
        self,
        ref: str,
        *,
        platform: str | None = None,
        creds: str | None = None,
        timeout: float = 120.0,
    ) -> subprocess.CompletedProcess:
        """`podman pull --tls-verify=false REF`; never raises for a failed pull.

        `creds` ("user:password") go to the registry and, through a temporary
        auth file, to its mirrors (podman, like skopeo, sends --creds to the
        registry's own location only)."""
        args = ["pull", "--tls-verify=false"]
        if platform:
            args += ["--platform", platform]
        with tempfile.TemporaryDirectory(prefix="podman-auth-") as tmp:
            if creds:
                args += ["--creds", creds]
                if self.registries_conf is not None:
                    auth = Path(tmp) / "auth.json"
                    write_mirror_auth_file(auth, self.registries_conf, creds)
                    args += ["--authfile", str(auth)]
            return self.run(*args, ref, timeout=timeout)

    def inspect(self, ref: str) -> dict:
        """`podman image inspect`: Digest (the manifest or index pulled), Id (the
        config's hex digest), RootFS.Layers (the diff_ids it unpacked)."""
        out = self.run("image", "inspect", ref, check=True).stdout
        (info,) = json.loads(out)
        return info


@functools.cache
def podman_unavailable_reason() -> str | None:
    """Why podman cannot pull here (its own error text), or None if it can."""
    if shutil.which("podman") is None:
        return "podman is not installed"
    if os.geteuid() != 0:
        return "podman tests run podman as root (rootless needs newuidmap and subuids)"
    with tempfile.TemporaryDirectory(prefix="podman-probe-") as tmp:
        try:
            probe = Podman(Path(tmp)).run("images", timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"podman did not run: {exc}"
        if probe.returncode != 0:
            return f"podman images failed: {probe.stderr.strip()[-500:]}"
    return None


def podman_available() -> bool:
    return podman_unavailable_reason() is None
