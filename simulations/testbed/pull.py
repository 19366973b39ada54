"""One cell's pull in a storm, run inside the cell's namespace by the storm.

`ip netns exec NS python -m simulations.testbed.pull ...` waits for the storm's
common start (Unix time), copies the image with skopeo through a mirror (celld's,
or the pull-through cache's), notes when the copy ended, and prints one JSON
line. Never raises: a failed pull is a line too. The storm then runs `check` on
each copy once every cell's pull has ended: hashing 256 MiB the moment one copy
ends would take CPU from the cells still pulling (2 cores for 8 cells).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tests.support.containerd import DEAD_SERVER
from tests.support.skopeo import stored_blobs, top_digest, write_registries_conf


def skopeo_env(home: Path, procs: int) -> dict[str, str]:
    """The environment skopeo runs in: proxies dead but for the testbed's subnet, and
    GOMAXPROCS when `procs` > 0 (0: Go's default, one per core of the machine)."""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(home)}
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        env[name] = DEAD_SERVER
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost,10.77.0.0/24"
    if procs > 0:
        env["GOMAXPROCS"] = str(procs)
    return env


def pull(
    ref: str, mirror: str, dest: Path, timeout: float, procs: int = 0
) -> subprocess.CompletedProcess:
    """skopeo copy through `mirror` (host:port) into an OCI layout, digests preserved.

    Like tests.support.skopeo.skopeo_copy, but the mirror may be on the testbed's
    subnet: HTTP(S)_PROXY is a dead port and only loopback and 10.77.0.0/24 are
    exempt, so a ref no mirror covers fails here instead of going anywhere."""
    conf = write_registries_conf(
        dest.parent / f"{dest.name}.registries.conf", {"docker.io": mirror}
    )
    env = skopeo_env(dest.parent, procs)
    cmd = ["skopeo", "--insecure-policy", "--registries-conf", str(conf), "copy"]
    cmd += ["--src-tls-verify=false", "--retry-times", "0", "--preserve-digests"]
    return subprocess.run(
        [*cmd, f"docker://{ref}", f"oci:{dest}"],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env=env,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m simulations.testbed.pull")
    p.add_argument("--ref", required=True)
    p.add_argument("--mirror", required=True)
    p.add_argument("--dest", type=Path, required=True)
    p.add_argument("--start-at", type=float, required=True, help="Unix time of the storm")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--procs", type=int, default=0, help="skopeo's GOMAXPROCS (0: Go's default)")
    args = p.parse_args(argv)

    time.sleep(max(0.0, args.start_at - time.time()))
    started = time.time()
    out: dict[str, object] = {"started": started}
    try:
        done = pull(args.ref, args.mirror, args.dest, args.timeout, args.procs)
        out["ended"] = time.time()
        if done.returncode != 0:
            out["error"] = (done.stderr.strip().splitlines() or ["skopeo failed"])[-1][-300:]
    except subprocess.TimeoutExpired:
        out["ended"] = time.time()
        out["error"] = f"skopeo still copying after {args.timeout:.0f} s"
    except OSError as exc:
        out["ended"] = time.time()
        out["error"] = f"running skopeo: {exc}"
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # skopeo's, once it has ended
    out["client_cpu_s"] = usage.ru_utime + usage.ru_stime
    if "error" in out:
        shutil.rmtree(args.dest, ignore_errors=True)
    print(json.dumps(out), flush=True)
    return 0 if "error" not in out else 1


def check(dest: Path, expect: str) -> dict[str, object]:
    """The copy in `dest`, checked (every stored blob against its digest, the top
    digest against `expect`) and then removed: digest, blobs, bytes, and error when
    it is wrong."""
    out: dict[str, object] = {}
    try:
        blobs = stored_blobs(dest)
        out["digest"] = top_digest(dest)
        out["blobs"] = len(blobs)
        out["bytes"] = sum(path.stat().st_size for path in blobs.values())
        if out["digest"] != expect:
            out["error"] = f"copied {out['digest']}, expected {expect}"
    except (OSError, ValueError) as exc:
        out["error"] = f"checking the copy: {exc}"
    finally:
        shutil.rmtree(dest, ignore_errors=True)
    return out


if __name__ == "__main__":
    sys.exit(main())
