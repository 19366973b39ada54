"""skopeo (and podman's) view of a mirror: registries.conf, copies, what was stored.

containers/image, the library under skopeo and podman, finds a mirror in a
registries.conf (v2) `[[registry.mirror]]` table. It tries the mirrors first
and then the registry's own `location`; that location is set to a dead
loopback port here, so a copy succeeds through the mirror or fails, and never
sends a byte off the machine. Unlike containerd it sends no `ns` parameter:
to the mirror, a request from skopeo looks like one for docker.io.

The file is passed with `--registries-conf` (or CONTAINERS_REGISTRIES_CONF
for podman); /etc/containers/registries.conf is never read for mirrors nor
written. Like every runtime here it runs with `loopback_only_env()`, so a
ref no mirror covers fails at the dead port instead of going out. skopeo checks every blob's digest as it copies; `stored_blobs()`
checks the files it wrote once more, so a test compares digests it can trust.
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import tempfile
import tomllib
from collections.abc import Mapping
from pathlib import Path

from tests.support.containerd import DEAD_SERVER, loopback_only_env

# The registries' own locations: nothing listens there.
DEAD_LOCATION = DEAD_SERVER.removeprefix("http://")


def write_registries_conf(path: Path, mirrors: Mapping[str, str]) -> Path:
    """Write a registries.conf where each registry prefix has one insecure mirror.

    `mirrors` maps a registry prefix ("docker.io", "ghcr.io") to a mirror
    "host:port" (or "host:port/path"). Short names are not resolved.
    """
    lines = ["unqualified-search-registries = []", 'short-name-mode = "disabled"', ""]
    for prefix, mirror in mirrors.items():
        lines += [
            "[[registry]]",
            f'prefix = "{prefix}"',
            f'location = "{DEAD_LOCATION}"',
            "insecure = true",
            "[[registry.mirror]]",
            f'location = "{mirror}"',
            "insecure = true",
            "",
        ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


def write_mirror_auth_file(path: Path, registries_conf: Path, creds: str) -> Path:
    """An auth.json giving `creds` ("user:password") to every mirror in the conf.

    containers/image sends `--src-creds`/`--creds` to a registry's own
    location only, never to its mirrors (checked with skopeo 1.9: the mirror
    gets no Authorization and answers 401); mirrors find theirs in an auth
    file, by host.
    """
    conf = tomllib.loads(registries_conf.read_text())
    token = base64.b64encode(creds.encode()).decode()
    auths = {
        mirror["location"]: {"auth": token}
        for registry in conf.get("registry", [])
        for mirror in registry.get("mirror", [])
    }
    path.write_text(json.dumps({"auths": auths}))
    path.chmod(0o600)
    return path


def skopeo_copy(
    src: str,
    dest_dir: Path,
    *,
    registries_conf: Path | None = None,
    creds: str | None = None,
    all_images: bool = False,
    layout: str = "oci",
    platform: str | None = None,
    timeout: float = 120.0,
) -> subprocess.CompletedProcess:
    """`skopeo copy docker://SRC oci:DEST_DIR` (or `dir:`); never raises for a failed copy.

    layout="oci" keeps digests or fails (`--preserve-digests`): a docker
    manifest cannot be stored in an OCI layout unconverted, so copy docker
    media types with layout="dir", which stores manifests as they came.
    `creds` is "user:password", for the registry and for its mirrors (through
    a temporary auth file, see `write_mirror_auth_file`); `platform` ("linux/arm64") picks the instance
    of an index when not `all_images`. A copy still running after `timeout`
    raises subprocess.TimeoutExpired (the process is killed).
    """
    if "://" not in src:
        src = f"docker://{src}"
    cmd = ["skopeo", "--insecure-policy"]
    if registries_conf is not None:
        cmd += ["--registries-conf", str(registries_conf)]
    if platform:
        os_name, _, arch = platform.partition("/")
        cmd += ["--override-os", os_name, "--override-arch", arch]
    cmd += ["copy", "--src-tls-verify=false", "--retry-times", "0"]
    if all_images:
        cmd.append("--all")
    if layout == "oci":
        cmd.append("--preserve-digests")
        dest = f"oci:{dest_dir}"
    elif layout == "dir":
        dest = f"dir:{dest_dir}"
    else:
        raise ValueError(f"layout must be 'oci' or 'dir', not {layout!r}")
    with tempfile.TemporaryDirectory(prefix="skopeo-auth-") as tmp:
        if creds:
            cmd += ["--src-creds", creds]
            if registries_conf is not None:
                auth = write_mirror_auth_file(Path(tmp) / "auth.json", registries_conf, creds)
                cmd += ["--src-authfile", str(auth)]
        return subprocess.run(
            [*cmd, src, dest],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            env=loopback_only_env(),
        )


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def stored_blobs(dest_dir: Path) -> dict[str, Path]:
    """Every blob skopeo stored (manifests included): digest -> file.

    Reads an OCI layout (blobs/sha256/<hex>) or a `dir:` copy (<hex> files and
    manifest.json, <hex>.manifest.json for instances of a list), and raises
    ValueError if any file's bytes do not hash to the digest it is stored as.
    """
    found: dict[str, Path] = {}
    if (dest_dir / "oci-layout").exists():
        for path in sorted((dest_dir / "blobs").glob("*/*")):
            digest = f"{path.parent.name}:{path.name}"
            if _sha256_file(path) != digest:
                raise ValueError(f"{path} does not hash to {digest}")
            found[digest] = path
        return found
    for path in sorted(dest_dir.iterdir()):
        if path.name == "version":
            continue
        actual = _sha256_file(path)
        stem = path.name.removesuffix(".manifest.json")
        if path.name != "manifest.json" and actual != f"sha256:{stem}":
            raise ValueError(f"{path} does not hash to sha256:{stem}")
        found[actual] = path
    return found


def top_digest(dest_dir: Path) -> str:
    """The digest of what was copied: the manifest or index the source named."""
    if (dest_dir / "oci-layout").exists():
        index = json.loads((dest_dir / "index.json").read_text())
        (entry,) = index["manifests"]
        return entry["digest"]
    return _sha256_file(dest_dir / "manifest.json")
