"""`python -m simulations.testbed storm|cleanup`: the testbed's command line.

Owns the options and the exit codes: 0 every surviving cell completed with the
right digest, 1 some did not, 2 the testbed could not be built (one line saying
why, never a traceback), 130 interrupted (after cleaning up).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from simulations.testbed import net
from simulations.testbed.storm import Interrupted, Storm, StormOptions


def _interrupt(signum: int, _frame: object) -> None:
    raise Interrupted(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.testbed")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("storm", help="every cell pulls one image at once; print the figures")
    s.add_argument("--cells", type=int, default=12)
    s.add_argument("--image-mib", type=float, default=1024, help="image size (MiB)")
    s.add_argument("--layers", type=int, default=4, help="layers the image is split in")
    s.add_argument("--link", default="200mbit", help="each cell's link, both ways (tc rate)")
    s.add_argument("--hub-link", help="the Hub's link (default: --link)")
    s.add_argument("--central-link", help="the central registry's link (default: --link)")
    s.add_argument(
        "--modes",
        default="celld,proxy",
        help="storms to run, in order: celld, proxy (the pull-through cache)",
    )
    s.add_argument(
        "--cluster",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="cells share: [cluster] and [peer] in every cell's config (--no-cluster: alone)",
    )
    s.add_argument("--racks", type=int, default=1, help="zones the cells are spread over")
    s.add_argument("--kill", type=int, default=0, help="kill -9 this many cells mid-storm")
    s.add_argument("--kill-at", type=float, help="seconds into the storm (default 0.3 x limit)")
    s.add_argument("--stage-central", action="store_true", help="push the image to central too")
    s.add_argument("--run-id", help="4 hex digits naming the run (default: random)")
    s.add_argument("--workdir", type=Path, help="logs and stores (default: a new temp dir)")
    s.add_argument("--keep", action="store_true", help="keep the temp work dir")
    s.add_argument("--json", type=Path, dest="json_out", help="write the figures as JSON")
    s.add_argument("--timeout", type=float, default=1800, help="one cell's pull (s)")
    s.add_argument(
        "--tmpfs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the work dir on a tmpfs when it fits in memory (the cells share no disk)",
    )
    s.add_argument(
        "--warm",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep the tmpfs's pages touched through each storm (see ballast.py)",
    )
    s.add_argument(
        "--tcp",
        default="cubic",
        help="every host's TCP congestion control: cubic (Linux's default), bbr, reno..., "
        "or 'system' for whatever the machine's root namespace runs",
    )
    s.add_argument(
        "--runtime-procs",
        type=int,
        default=1,
        help="each cell's skopeo runs with this GOMAXPROCS; 0 for Go's default (every core)",
    )
    c = sub.add_parser("cleanup", help="remove what runs left behind")
    c.add_argument("--run-id", help="only this run")
    c.add_argument("--all", action="store_true", help="also runs whose owner still lives")
    args = parser.parse_args(argv)

    if args.command == "cleanup":
        return cleanup(args.run_id, args.all)
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    problems = [m for m in modes if m not in ("celld", "proxy")]
    if problems or not modes:
        parser.error(f"--modes: expected celld and/or proxy, got {args.modes!r}")
    if not 1 <= args.cells <= 240:
        parser.error("--cells: expected 1 to 240")
    if not 0 <= args.kill < args.cells:
        parser.error("--kill: expected fewer than --cells")
    tcp = None if args.tcp == "system" else args.tcp
    if tcp is not None and tcp not in net.congestion_controls():
        parser.error(f"--tcp: {tcp} is not one of {' '.join(net.congestion_controls())}")
    if args.runtime_procs < 0:
        parser.error("--runtime-procs: expected 0 (Go's default) or more")
    if args.layers < 1 or args.image_mib <= 0:
        parser.error("--layers and --image-mib: expected positive numbers")
    opts = StormOptions(
        cells=args.cells,
        image_mib=args.image_mib,
        layers=args.layers,
        link=args.link,
        hub_link=args.hub_link,
        central_link=args.central_link,
        modes=modes,
        cluster=args.cluster,
        racks=args.racks,
        kill=args.kill,
        kill_at=args.kill_at,
        stage_central=args.stage_central,
        run_id=args.run_id,
        workdir=args.workdir,
        keep=args.keep,
        tcp=tcp,
        json_out=args.json_out,
        timeout=args.timeout,
        tmpfs=args.tmpfs,
        warm=args.warm,
        runtime_procs=args.runtime_procs,
    )
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        storm = Storm(opts, out=lambda line: print(line, flush=True))
        return storm.run()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (net.NetError, RuntimeError, OSError, subprocess.SubprocessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (Interrupted, KeyboardInterrupt) as exc:
        print(f"interrupted ({exc or 'SIGINT'}): stopped", file=sys.stderr)
        return 130


def cleanup(run_id: str | None, everything: bool) -> int:
    ids = [run_id] if run_id else sorted(net.run_ids())
    for rid in ids:
        if not everything and net.owner_alive(rid):
            print(f"run {rid}: its storm still runs (pid in {net.OWNERS / rid}); --all removes it")
            continue
        removed = net.remove_run(rid)
        mounts = [
            line.split()[1]
            for line in Path("/proc/mounts").read_text().splitlines()
            if line.startswith(f"ctb-{rid} ")
        ]
        for mount in mounts:  # a killed run's tmpfs work dir, and the dir under it
            subprocess.run(["umount", mount], check=False)
            with contextlib.suppress(OSError):
                os.rmdir(mount)
        print(f"run {rid}: removed {len(removed)} namespaces and links, {len(mounts)} tmpfs")
    if not ids:
        print("nothing to clean up")
    return 0


if __name__ == "__main__":
    sys.exit(main())
