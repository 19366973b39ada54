"""The `celld` command: argument parsing and one-line errors.

Owns what a user sees when something is wrong before the daemon runs: a bad
config file is one line naming the key and the problem, exit status 2; a
listener that cannot bind (a port in use) is one line naming its key, address
and reason (celld.listen), exit status 1. Never prints a traceback for a
user's mistake.

The admin commands (`stage`, `pins`, `unpin`, `ls`, `stats`, `gc`) are
clients of the running daemon's admin socket (celld.admin_client) and print
with celld.present: a dead daemon, a refused staging or a dropped connection
is one line and exit status 1, a usage error exit status 2. A registry
password comes from stdin or the environment, never argv, and is never
printed.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import trio

from celld import config as config_mod
from celld.admin_client import AdminClient, AdminError, Credentials
from celld.listen import ListenError
from celld.present import (
    ProgressLine,
    RateMeter,
    ago,
    human_size,
    percent,
    short_digest,
    table,
    transfer_line,
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="celld", description="A peer-to-peer container-layer cache.")
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the cell's daemon (registry mirror on localhost)")
    serve.add_argument("--config", type=Path, help="TOML configuration file")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    _add_admin_parsers(sub)
    sim = sub.add_parser(
        "simulate", help="simulate a fleet scenario (simulations/scenarios/*.toml)"
    )
    sim.add_argument("scenario", type=Path, help="a TOML scenario")
    sim.add_argument("--out", type=Path, required=True, help="directory for report.json and plots")
    sim.add_argument("--seed", type=int, default=None, help="override the scenario's seed")
    return p


def _load_config(path: Path | None, *, with_key: bool = False) -> config_mod.Config:
    """The config, or one line and exit 2; `serve` also checks the cluster key
    (admin commands only need the data_dir, not the key)."""
    try:
        cfg = config_mod.load(path)
        if with_key:
            config_mod.load_cluster_key(cfg)
        return cfg
    except config_mod.ConfigError as exc:
        where = f"{path}: " if path else ""
        print(f"celld: {where}{exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _first(group: BaseExceptionGroup) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def _cannot_start(exc: ListenError | OSError) -> int:
    """One line: a listener names its key and address (celld.listen)."""
    reason = exc if isinstance(exc, ListenError) else exc.strerror or exc
    print(f"celld: cannot start: {reason}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "simulate":
        from simulations.__main__ import main as simulate

        seed = ["--seed", str(args.seed)] if args.seed is not None else []
        return simulate(["run", str(args.scenario), "--out", str(args.out), *seed])
    if args.command in ADMIN_COMMANDS:
        return _run_admin(args)
    if args.command == "serve":
        cfg = _load_config(args.config, with_key=True)
        logging.basicConfig(
            level=getattr(logging, args.log_level.upper()),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
        # httpx logs every request line at INFO; keep the daemon's log for events.
        logging.getLogger("httpx").setLevel(logging.WARNING)
        logging.getLogger("httpcore").setLevel(logging.WARNING)
        from celld.daemon import run_until_signalled

        try:
            trio.run(run_until_signalled, cfg)
        except BaseExceptionGroup as group:
            exc = _first(group)
            if not isinstance(exc, (ListenError, OSError)):
                raise
            return _cannot_start(exc)
        except (ListenError, OSError) as exc:
            return _cannot_start(exc)
    return 0


# -- the admin commands: clients of the running daemon's admin socket -------

ADMIN_COMMANDS = ("stage", "pins", "unpin", "ls", "stats", "gc", "peers")
USERNAME_ENV = "CELLD_REGISTRY_USERNAME"
PASSWORD_ENV = "CELLD_REGISTRY_PASSWORD"
TOKEN_HINT = "(use as the password of any user, or as a Bearer token)"
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


class _RefusePassword(argparse.Action):
    """`--password` exists only to be refused without echoing its value:
    argv is readable by every user of the machine (/proc/<pid>/cmdline)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:  # type: ignore[override]
        parser.error(
            "unrecognized arguments: --password (argv is visible to every user of the machine;"
            f" use --password-stdin or {PASSWORD_ENV})"
        )


def _duration(text: str) -> float:
    m = _DURATION.match(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(
            f"expected a duration like 0, 90s, 30m, 1h or 2d: {text!r}"
        )
    return float(m[1]) * _SECONDS[m[2]]


def _platform(text: str) -> str:
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise argparse.ArgumentTypeError(
            f"expected os/arch[/variant], like linux/arm64/v8: {text!r}"
        )
    return text


def _add_admin_parsers(sub: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, help="the daemon's TOML configuration file")
    common.add_argument("--json", action="store_true", help="print the API's JSON")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        parser = sub.add_parser(name, help=help, parents=[common], allow_abbrev=False)
        parser.set_defaults(usage_error=parser.error)
        return parser

    stage = command(
        "stage", "pin an app to an image's digest and push it to the central registries"
    )
    stage.add_argument("image", help="e.g. docker.io/acme/shop:2.1")
    stage.add_argument("--app", required=True, help="the app id to pin")
    stage.add_argument("--username", help="registry user name for a private image")
    stage.add_argument(
        "--password-stdin",
        action="store_true",
        help=f"read the registry password from stdin (or set {USERNAME_ENV} and {PASSWORD_ENV})",
    )
    stage.add_argument("--password", nargs="?", action=_RefusePassword, help=argparse.SUPPRESS)
    stage.add_argument(
        "--platform", type=_platform, help="os/arch[/variant] to pick out of an index"
    )
    command("pins", "list pinned apps")
    unpin = command("unpin", "remove an app's pin")
    unpin.add_argument("app")
    command("ls", "list cached images and blobs")
    command("stats", "store and hit figures")
    command("peers", "list the cluster's members as this cell sees them")
    gc = command("gc", "remove blobs that no pin and no recent pull needs")
    gc.add_argument(
        "--keep",
        type=_duration,
        metavar="DURATION",
        help="keep blobs used within this long (0, 90s, 30m, 1h, 2d; default: the daemon's)",
    )


def _run_admin(args: argparse.Namespace) -> int:
    """One admin command; every failure a user can cause is one line."""
    if args.command == "stage":
        _check_credential_usage(args)
    cfg = _load_config(args.config)
    try:
        with AdminClient(cfg.admin_socket) as client:
            return _COMMANDS[args.command](client, args)
    except AdminError as exc:
        print(f"celld: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("celld: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `celld ls | head`: the reader left; say nothing more to it.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _print_json(doc: object) -> None:
    print(json.dumps(doc, indent=2))


def _check_credential_usage(args: argparse.Namespace) -> None:
    """Refuse impossible combinations before anything is read from stdin."""
    if args.password_stdin and not args.username:
        args.usage_error("--password-stdin needs --username")
    if args.username or os.environ.get(USERNAME_ENV):
        if not args.password_stdin and not os.environ.get(PASSWORD_ENV):
            args.usage_error(f"a user name needs --password-stdin or {PASSWORD_ENV}")
    elif os.environ.get(PASSWORD_ENV):
        args.usage_error(
            f"{PASSWORD_ENV} is set but no user name: set {USERNAME_ENV} or --username"
        )


def _credentials(args: argparse.Namespace) -> Credentials | None:
    username = args.username or os.environ.get(USERNAME_ENV)
    if not username:
        return None
    if not args.password_stdin:
        return Credentials(username, os.environ[PASSWORD_ENV])
    if sys.stdin is None:
        args.usage_error("--password-stdin: stdin is closed")
    if sys.stdin.isatty():
        password = getpass.getpass(f"password for {username}: ")
    else:
        password = sys.stdin.readline().removesuffix("\n").removesuffix("\r")
    if not password:
        args.usage_error("--password-stdin: no password on stdin")
    return Credentials(username, password)


class _StageProgress:
    """Turns staging's events into one rewritten line: resolved, fetch, push."""

    def __init__(self, line: ProgressLine, clock: Callable[[], float] = time.monotonic) -> None:
        self.line = line
        self.clock = clock
        self.blobs = 0
        self.bytes = 0
        self.phase: tuple[str, str | None] | None = None
        self.meter = RateMeter()
        self.seen: set[str] = set()

    def __call__(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "resolved":
            self.blobs, self.bytes = int(event.get("blobs", 0)), int(event.get("bytes", 0))
            self.line.update(
                f"resolved {event.get('image')} -> {short_digest(str(event.get('digest')))}"
                f"  {self.blobs} blobs  {human_size(self.bytes)}"
            )
        elif kind == "progress":
            phase = (str(event.get("phase")), event.get("registry"))
            if phase != self.phase:
                self.phase, self.meter, self.seen = phase, RateMeter(), set()
            bytes_done = int(event.get("bytes_done", 0))
            self.meter.add(self.clock(), bytes_done)
            self.seen.add(str(event.get("blob")))
            # Blobs complete in order: every blob seen before this one is done.
            unfinished = int(int(event.get("done", 0)) < int(event.get("total", 0)))
            blobs_done, blobs_total = len(self.seen) - unfinished, max(self.blobs, len(self.seen))
            # Without the contract's bytes_total, the resolved size stands in;
            # it counts the manifest too, so the last blob sets the total.
            bytes_total = event.get("bytes_total") or (
                bytes_done if blobs_done == blobs_total else self.bytes
            )
            label = phase[0] if phase[1] is None else f"{phase[0]} {_host(phase[1])}"
            self.line.update(
                transfer_line(
                    label, blobs_done, blobs_total, bytes_done, int(bytes_total), self.meter.rate()
                )
            )


def _host(url: str) -> str:
    return url.split("://", 1)[-1].rstrip("/")


def _stage(client: AdminClient, args: argparse.Namespace) -> int:
    client.status()  # the daemon is up before anyone types a password
    events = client.stage(args.image, args.app, _credentials(args), args.platform)
    show = sys.stderr.isatty() and not args.json
    result: dict | None = None
    with ProgressLine(sys.stderr, _columns) as line:
        progress = _StageProgress(line)
        for event in events:
            if event.get("event") == "done":
                result = event
            elif event.get("event") == "error":
                raise AdminError(str(event.get("message") or "staging failed"))
            elif show:
                progress(event)
    assert result is not None  # the client raises when the stream ends without one
    result.pop("event", None)
    if args.json:
        _print_json(result)
        return 0
    print(result["reference"])
    if result.get("token"):
        print(f"token: {result['token']}  {TOKEN_HINT}")
    if result.get("moved_from"):
        print(f"{result['app']}: pin moved from {result['moved_from']}", file=sys.stderr)
    return 0


def _columns() -> int:
    return shutil.get_terminal_size((80, 24)).columns


def _pins(client: AdminClient, args: argparse.Namespace) -> int:
    doc = client.pins()
    if args.json:
        _print_json(doc)
        return 0
    pins = sorted(doc.get("pins", []), key=lambda p: p["app"])
    if not pins:
        print("no app is pinned")
        return 0
    now = time.time()
    rows = [
        [
            p["app"],
            p["image"],
            short_digest(p["digest"]),
            human_size(p["size"]),
            ago(p.get("staged_at"), now),
            "private" if p.get("private") else "",
        ]
        for p in pins
    ]
    print(table(rows, ["APP", "IMAGE", "DIGEST", "SIZE", "STAGED", ""]))
    return 0


def _unpin(client: AdminClient, args: argparse.Namespace) -> int:
    doc = client.unpin(args.app)
    if args.json:
        _print_json(doc)
    else:
        print(f"unpinned {doc.get('app', args.app)} (was {doc.get('digest')})")
    return 0


def _short_image(image: str) -> str:
    """`name@sha256:<64 hex>` is too wide for a column beside DIGEST: cut the hex."""
    name, at, digest = image.partition("@")
    return f"{name}@{digest[:19]}..." if at and len(digest) > 19 else image


def _pinned_by(apps: list[str] | None) -> str:
    return ", ".join(apps) if apps else "-"


def _ls(client: AdminClient, args: argparse.Namespace) -> int:
    doc = client.ls()
    if args.json:
        _print_json(doc)
        return 0
    now = time.time()
    images = sorted(doc.get("images", []), key=lambda i: i["image"])
    blobs = sorted(doc.get("blobs", []), key=lambda b: -(b.get("last_used") or 0))
    if images:
        rows = [
            [
                _short_image(i["image"]),
                short_digest(i["digest"]),
                human_size(i["size"]),
                ago(i.get("last_used"), now),
                _pinned_by(i.get("pinned_by")),
            ]
            for i in images
        ]
        print(table(rows, ["IMAGE", "DIGEST", "SIZE", "LAST USED", "PINNED BY"]))
    else:
        print("no image is cached")
    print()
    if blobs:
        rows = [
            [
                short_digest(b["digest"]),
                human_size(b["size"]),
                ago(b.get("last_used"), now),
                b.get("source") or "-",
                _pinned_by(b.get("pinned_by")),
                "private" if b.get("private") else "",
            ]
            for b in blobs
        ]
        print(table(rows, ["BLOB", "SIZE", "LAST USED", "SOURCE", "PINNED BY", ""]))
    else:
        print("no blob is cached")
    return 0


def _stats(client: AdminClient, args: argparse.Namespace) -> int:
    doc = client.stats()
    if args.json:
        _print_json(doc)
        return 0
    store, mirror = doc.get("store", {}), doc.get("mirror", {})
    used, limit = store.get("bytes", 0), store.get("max_bytes", 0)
    hits, misses = int(mirror.get("hits", 0)), int(mirror.get("misses", 0))
    served = mirror.get("bytes_served", {})
    rows = [
        ["store", f"{human_size(used)} of {human_size(limit)} ({percent(used, limit)})"],
        ["blobs", str(store.get("blobs", 0))],
        ["pinned", human_size(store.get("pinned_bytes", 0))],
        ["requests", str(int(mirror.get("requests", 0)))],
        ["hits", str(hits)],
        ["misses", str(misses)],
        ["hit ratio", percent(hits, hits + misses)],
        [
            "served",
            ", ".join(
                f"{human_size(served.get(s, 0))} from {s}"
                for s in ("store", "registry", "upstream", "peer")
            ),
        ],
        ["joins", str(int(doc.get("singleflight_joins", 0)))],
        ["mismatches", str(int(doc.get("digest_mismatches", 0)))],
        ["stale tags", str(int(doc.get("stale_tags_served", 0)))],
    ]
    if "evictions" in doc:
        rows.append(["evictions", str(int(doc["evictions"]))])
    peers, gossip = doc.get("peers"), doc.get("gossip")
    if peers is not None:
        rows.append(
            [
                "peers",
                f"{human_size(peers.get('received_bytes', 0))} received, "
                f"{human_size(peers.get('sent_bytes', 0))} sent, "
                f"{int(peers.get('bad_pieces', 0))} bad pieces, "
                f"{int(peers.get('auth_failures', 0))} refused requests",
            ]
        )
    if gossip is not None:
        states = gossip.get("members", {})
        dropped = gossip.get("datagrams_dropped", {})
        rows.append(
            ["members", ", ".join(f"{n} {s}" for s, n in sorted(states.items()) if n) or "0"]
        )
        rows.append(
            [
                "datagrams",
                f"{int(gossip.get('datagrams_sent', 0))} sent, "
                f"{int(gossip.get('datagrams_received', 0))} received, "
                f"{sum(dropped.values())} dropped"
                + (
                    f" ({', '.join(f'{n} {r}' for r, n in sorted(dropped.items()))})"
                    if dropped
                    else ""
                ),
            ]
        )
        rows.append(["probe failures", str(int(gossip.get("probe_failures", 0)))])
    print(table(rows, right=()))
    return 0


def _peers(client: AdminClient, args: argparse.Namespace) -> int:
    doc = client.peers()
    if args.json:
        _print_json(doc)
        return 0
    if not doc.get("cluster"):
        print("this cell runs alone (no [cluster] listen in its config)")
        return 0
    now = float(doc.get("now", time.time()))
    rows = [
        [
            str(m.get("name", "")) + (" (this cell)" if m.get("name") == doc.get("cell") else ""),
            str(m.get("addr", "")),
            str(m.get("zone") or "-"),
            str(m.get("state", "")),
            str(m.get("incarnation", "")),
            "-" if m.get("last_heard") is None else ago(m["last_heard"], now),
            str(m.get("blobs_announced", 0)),
        ]
        for m in doc.get("members", [])
    ]
    print(
        table(
            rows,
            ["NAME", "ADDRESS", "ZONE", "STATE", "INCARNATION", "LAST HEARD", "BLOBS"],
            right=(4, 6),
        )
    )
    return 0


def _gc(client: AdminClient, args: argparse.Namespace) -> int:
    doc = client.gc(args.keep)
    if args.json:
        _print_json(doc)
        return 0
    n = len(doc.get("removed", []))
    print(f"freed {human_size(doc.get('freed_bytes', 0))} in {n} blob{'' if n == 1 else 's'}")
    return 0


_COMMANDS: dict[str, Callable[[AdminClient, argparse.Namespace], int]] = {
    "stage": _stage,
    "pins": _pins,
    "unpin": _unpin,
    "ls": _ls,
    "stats": _stats,
    "gc": _gc,
    "peers": _peers,
}


if __name__ == "__main__":
    sys.exit(main())
