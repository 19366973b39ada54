"""The `celld` command: argument parsing and one-line errors.

Owns what a user sees when something is wrong before the daemon runs: a bad
config file is one line naming the key and the problem, exit status 2; a
port in use is one line, exit status 1. Never prints a traceback for a
user's mistake.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import trio

from celld import config as config_mod


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="celld", description="A peer-to-peer container-layer cache.")
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the cell's daemon (registry mirror on localhost)")
    serve.add_argument("--config", type=Path, help="TOML configuration file")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def _load_config(path: Path | None) -> config_mod.Config:
    try:
        cfg = config_mod.load(path)
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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        cfg = _load_config(args.config)
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
            if not isinstance(exc, OSError):
                raise
            print(f"celld: cannot start: {exc.strerror or exc}", file=sys.stderr)
            return 1
        except OSError as exc:
            print(f"celld: cannot start: {exc.strerror or exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
