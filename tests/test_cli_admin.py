"""The admin commands as a cell admin runs them: `celld stage`, `pins`, `unpin`,
`ls`, `stats`, `gc`, against a real `celld serve` and real docker-registry
processes; plus the pure presentation helpers they print with.

Every command runs as `python -m celld ...` in a subprocess, so what is
checked is what a user sees: stdout, stderr, the exit status, and (for the
progress line) what a terminal receives through a pseudo-terminal.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import pty
import re
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

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
from tests.support.celld import Celld
from tests.support.images import make_image, push_image
from tests.support.registry import Registry

ROOT = Path(__file__).resolve().parents[1]
ENV = {
    k: v
    for k, v in os.environ.items()
    if k not in ("CELLD_REGISTRY_USERNAME", "CELLD_REGISTRY_PASSWORD")
}
ENV["PYTHONPATH"] = str(ROOT)


def celld(
    *argv: str, stdin: str | None = None, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "celld", *argv],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**ENV, **(env or {})},
        timeout=timeout,
        stdin=None if stdin is not None else subprocess.DEVNULL,
    )


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("celld: "), proc.stderr
    return lines[0]


# -- present.py ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (2**20 - 1, "1.0 MiB"),  # not "1024.0 KiB"
        (45.2 * 2**20, "45.2 MiB"),
        (int(1.23 * 2**30), "1.2 GiB"),
        (50 * 2**30, "50.0 GiB"),
        (3 * 2**40, "3.0 TiB"),
    ],
)
def test_human_size(n, text):
    assert human_size(n) == text


def test_ago_counts_then_gives_the_date():
    now = 1_800_000_000.0
    assert ago(now - 2, now) == "just now"
    assert ago(now - 42, now) == "42 s ago"
    assert ago(now - 3 * 60 - 59, now) == "3 min ago"
    assert ago(now - 5 * 3600, now) == "5 h ago"
    assert ago(now - 3 * 86400, now) == "3 days ago"
    assert ago(now - 30 * 86400, now, tz=dt.UTC) == "2026-12-16"
    assert ago(now + 3600, now, tz=dt.UTC) == "2027-01-15"  # a clock ahead of ours
    assert ago(None, now) == "never"


def test_table_aligns_columns_and_right_aligns_figures():
    text = table(
        [["shop-prod", "1.2 GiB", "3 min ago", 12], ["a", "512 B", "just now", 3]],
        ["APP", "SIZE", "STAGED", "N"],
    )
    assert text.splitlines() == [
        "APP           SIZE  STAGED      N",
        "shop-prod  1.2 GiB  3 min ago  12",
        "a            512 B  just now    3",
    ]
    # explicit alignment, no headers, blank cells and short rows
    assert table([["store", "1.0 KiB of 2.0 KiB"], ["x"]], right=()) == (
        "store  1.0 KiB of 2.0 KiB\nx"
    )


def test_short_digest_percent_and_transfer_line():
    assert short_digest("sha256:" + "ab12" * 16) == "ab12ab12ab12"
    assert [percent(1, 8), percent(0, 8), percent(1, 10_000), percent(1, 0)] == [
        "12.5%",
        "0.0%",
        "<0.1%",
        "-",
    ]
    assert (
        transfer_line("fetch", 2, 3, int(45.2 * 2**20), 120 * 2**20, 38.1 * 2**20)
        == "fetch  2/3 blobs  45.2 MiB / 120.0 MiB  38.1 MiB/s"
    )
    assert transfer_line("push 127.0.0.1:5000", 0, 1, 0, 10, None) == (
        "push 127.0.0.1:5000  0/1 blobs  0 B / 10 B"
    )


def test_rate_meter_uses_a_recent_window():
    meter = RateMeter(window=3.0)
    meter.add(0.0, 0)
    assert meter.rate() is None
    meter.add(0.1, 10)
    assert meter.rate() is None  # too short a span to tell
    for t in range(1, 11):
        meter.add(float(t), t * 1000)
    assert meter.rate() == pytest.approx(1000)
    meter.add(14.0, 10_000)  # a stall shows as a falling rate
    assert meter.rate() < 1000


def test_progress_line_rewrites_pads_truncates_and_clears():
    out = io.StringIO()
    with ProgressLine(out, columns=lambda: 11) as line:
        line.update("fetch 1/3 blobs")
        line.update("push 3/3")
    assert out.getvalue() == "\rfetch 1/3 \rpush 3/3  \r        \r"  # cut at width - 1
    quiet = io.StringIO()
    with ProgressLine(quiet):
        pass
    assert quiet.getvalue() == ""


# -- usage and a dead daemon (no registries needed) ---------------------------


@pytest.fixture
def no_daemon(tmp_path: Path) -> Path:
    config = tmp_path / "celld.toml"
    config.write_text(f'[cell]\ndata_dir = "{tmp_path / "data"}"\n')
    return config


@pytest.mark.parametrize(
    "argv",
    [["stage", "acme/shop:1", "--app", "shop"], ["pins"], ["unpin", "shop"], ["ls"], ["stats"],
     ["gc"], ["pins", "--json"]],
)  # fmt: skip
def test_daemon_not_running_is_one_line_exit_1(no_daemon, argv):
    proc = celld(*argv, "--config", str(no_daemon))
    assert proc.returncode == 1
    sock = no_daemon.parent / "data" / "admin.sock"
    assert one_error_line(proc) == f"celld: the daemon is not running (no socket at {sock})"
    assert proc.stdout == ""


def test_a_stale_socket_of_a_dead_daemon_is_one_line(no_daemon):
    data = no_daemon.parent / "data"
    data.mkdir()
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(data / "admin.sock"))  # bound, never listening: what kill -9 leaves
    proc = celld("pins", "--config", str(no_daemon))
    assert proc.returncode == 1
    assert "the daemon is not running" in one_error_line(proc)


def test_password_on_argv_is_refused_without_echoing_it(no_daemon):
    secret = "hunter2-" + secrets.token_hex(4)
    for argv in (["--password", secret], [f"--password={secret}"]):
        proc = celld(
            "stage", "acme/shop:1", "--app", "shop", "--username", "u", *argv,
            "--config", str(no_daemon),
        )  # fmt: skip
        assert proc.returncode == 2
        assert "unrecognized arguments: --password" in proc.stderr
        assert secret not in proc.stderr + proc.stdout


@pytest.mark.parametrize(
    ("argv", "env", "says"),
    [
        (["stage", "acme/shop:1", "--app", "a", "--password-stdin"], {}, "needs --username"),
        (["stage", "acme/shop:1", "--app", "a", "--username", "u"], {}, "--password-stdin"),
        (["stage", "acme/shop:1", "--app", "a"], {"CELLD_REGISTRY_PASSWORD": "x"}, "user name"),
        (["stage", "acme/shop:1"], {}, "--app"),
        (["unpin"], {}, "app"),
        (["gc", "--keep", "soon"], {}, "duration"),
        (["stage", "acme/shop:1", "--app", "a", "--platform", "amd64"], {}, "os/arch"),
        (["pins", "--bogus"], {}, "unrecognized"),
    ],
)
def test_usage_errors_exit_2(no_daemon, argv, env, says):
    proc = celld(*argv, "--config", str(no_daemon), env=env)
    assert proc.returncode == 2, proc.stderr
    assert says in proc.stderr.splitlines()[-1]
    assert "Traceback" not in proc.stderr


def test_a_bad_config_is_one_line_exit_2(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text('[store]\nmax_bytes = "lots"\n')
    proc = celld("pins", "--config", str(config))
    assert proc.returncode == 2
    assert "max_bytes" in one_error_line(proc)


# -- against a real daemon ---------------------------------------------------


def start_cell(root: Path, upstream: str, central: Registry) -> Celld:
    """A staging-capable celld: a Hub upstream, one central registry, a cluster key."""
    root.mkdir(parents=True, exist_ok=True)
    key = root / "cluster.key"
    key.write_text(secrets.token_hex(32) + "\n")
    return Celld(
        root / "cell", upstreams={"docker.io": upstream}, registries=[central.url], key_file=key
    ).start()


@pytest.fixture
def staging_cell(tmp_path: Path, hub: Registry, central: Registry) -> Iterator[Celld]:
    daemon = start_cell(tmp_path / "staging", hub.url, central)
    yield daemon
    daemon.stop()


def test_stage_pins_ls_stats_gc_unpin(staging_cell: Celld, hub: Registry):
    cfg = ["--config", str(staging_cell.config_path)]
    image = make_image((150_000, 70_000))
    push_image(hub.url, "acme/shop", "2.1", image)

    staged = celld("stage", "docker.io/acme/shop:2.1", "--app", "shop-prod", *cfg)
    assert staged.returncode == 0, staged.stderr
    assert staged.stdout == f"{staging_cell.host}/acme/shop@{image.digest}\n"
    assert staged.stderr == ""  # not a terminal: no progress

    again = celld("stage", "acme/shop:2.1", "--app", "shop-prod", "--json", *cfg)
    assert again.returncode == 0, again.stderr
    doc = json.loads(again.stdout)
    assert doc["digest"] == image.digest
    assert doc["reference"] == f"{staging_cell.host}/acme/shop@{image.digest}"
    assert doc["app"] == "shop-prod" and doc["token"] is None and doc["private"] is False
    size = doc["size"]
    assert size == sum(len(b.data) for b in image.blobs) + len(image.manifest.data)

    pins = celld("pins", *cfg)
    assert pins.returncode == 0, pins.stderr
    header, row = pins.stdout.splitlines()
    assert header.split()[:5] == ["APP", "IMAGE", "DIGEST", "SIZE", "STAGED"]
    assert row.split()[:3] == ["shop-prod", "docker.io/acme/shop:2.1", image.digest[7:19]]
    assert human_size(size) in row and row.rstrip().endswith("just now")
    assert header.index("SIZE") + len("SIZE") == row.index(human_size(size)) + len(
        human_size(size)
    )  # sizes are right-aligned under their header
    pins_json = json.loads(celld("pins", "--json", *cfg).stdout)
    assert [(p["app"], p["digest"], p["size"]) for p in pins_json["pins"]] == [
        ("shop-prod", image.digest, size)
    ]

    # a blob pulled through the mirror, pinned by nobody: what gc frees
    loose = make_image((60_000,))
    push_image(hub.url, "acme/loose", "1", loose)
    layer = loose.layers[0]
    got = httpx.get(f"{staging_cell.url}/v2/acme/loose/blobs/{layer.digest}")
    assert got.content == layer.data
    again = httpx.get(f"{staging_cell.url}/v2/acme/loose/blobs/{layer.digest}")
    assert again.content == layer.data  # a hit this time

    ls = celld("ls", *cfg)
    assert ls.returncode == 0, ls.stderr
    images_part, blobs_part = ls.stdout.split("\n\n")
    assert images_part.splitlines()[0].split() == ["IMAGE", "DIGEST", "SIZE", "LAST", "USED",
                                                    "PINNED", "BY"]  # fmt: skip
    assert any(
        line.startswith(f"docker.io/acme/shop@{image.digest[:19]}... ")
        and line.endswith("shop-prod")
        for line in images_part.splitlines()
    ), images_part
    blob_lines = {line.split()[0]: line for line in blobs_part.splitlines()[1:]}
    for blob in image.blobs:
        line = blob_lines[blob.digest[7:19]]
        assert "upstream:docker.io" in line and "shop-prod" in line
        assert human_size(len(blob.data)) in line
    assert blob_lines[layer.digest[7:19]].split()[-1] == "-"  # pinned by nobody
    ls_json = json.loads(celld("ls", "--json", *cfg).stdout)
    assert {b["digest"] for b in ls_json["blobs"]} >= {b.digest for b in image.blobs} | {
        layer.digest
    }

    stats = celld("stats", *cfg)
    assert stats.returncode == 0, stats.stderr
    lines = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in stats.stdout.splitlines())
    used = json.loads(celld("stats", "--json", *cfg).stdout)["store"]["bytes"]
    assert lines["store"] == f"{human_size(used)} of 50.0 GiB (<0.1%)"
    assert lines["pinned"] == human_size(size)
    assert (lines["hits"], lines["misses"], lines["hit ratio"]) == ("1", "1", "50.0%")
    for key in ("blobs", "hits", "misses", "served", "joins", "mismatches", "stale tags"):
        assert key in lines, stats.stdout

    gc = celld("gc", "--keep", "0", *cfg)
    assert gc.returncode == 0, gc.stderr
    assert gc.stdout == f"freed {human_size(len(layer.data))} in 1 blob\n"
    assert httpx.head(f"{staging_cell.url}/v2/acme/shop/blobs/{image.layers[0].digest}").is_success
    stored = {p.name for p in (staging_cell.data_dir / "blobs").rglob("*") if p.is_file()}
    assert layer.digest[7:] not in stored
    assert all(b.digest[7:] in stored for b in image.blobs)  # pins survive gc

    unpinned = celld("unpin", "shop-prod", *cfg)
    assert unpinned.returncode == 0, unpinned.stderr
    assert unpinned.stdout == f"unpinned shop-prod (was {image.digest})\n"
    assert celld("pins", *cfg).stdout == "no app is pinned\n"
    unknown = celld("unpin", "shop-prod", *cfg)
    assert unknown.returncode == 1
    assert one_error_line(unknown) == "celld: no app 'shop-prod' is pinned"
    assert unknown.stdout == ""


def test_stage_error_is_one_line_exit_1(staging_cell: Celld):
    cfg = ["--config", str(staging_cell.config_path)]
    missing = celld("stage", "acme/nothing:1", "--app", "nothing", *cfg)
    assert missing.returncode == 1
    assert one_error_line(missing)
    assert missing.stdout == ""
    bad_app = celld("stage", "acme/nothing:1", "--app", "Not Valid", "--json", *cfg)
    assert bad_app.returncode == 1
    assert "app id" in one_error_line(bad_app)


def test_a_moved_tag_says_the_pin_moved(staging_cell: Celld, hub: Registry):
    cfg = ["--config", str(staging_cell.config_path)]
    first, second = make_image((1000,)), make_image((2000,))
    push_image(hub.url, "acme/app", "stable", first)
    assert celld("stage", "acme/app:stable", "--app", "app", *cfg).returncode == 0
    push_image(hub.url, "acme/app", "stable", second)
    moved = celld("stage", "acme/app:stable", "--app", "app", *cfg)
    assert moved.returncode == 0, moved.stderr
    assert moved.stdout == f"{staging_cell.host}/acme/app@{second.digest}\n"
    assert moved.stderr == f"app: pin moved from {first.digest}\n"


def run_on_terminal(argv: list[str]) -> tuple[int, str, str]:
    """Run celld with stderr on a pseudo-terminal; (status, stdout, terminal)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "celld", *argv],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=slave,
        cwd=ROOT,
        env=ENV,
    )
    os.close(slave)
    seen: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the last writer closed the terminal
                return
            if not chunk:
                return
            seen.append(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        out, _ = proc.communicate(timeout=60)
    finally:
        reader.join(10)
        os.close(master)
    return proc.returncode, out.decode(), b"".join(seen).decode()


def test_progress_is_shown_on_a_terminal_only(staging_cell: Celld, hub: Registry):
    cfg = ["--config", str(staging_cell.config_path)]
    image = make_image((40_000, 40_000, 40_000))
    push_image(hub.url, "acme/tty", "1", image)
    ref = f"{staging_cell.host}/acme/tty@{image.digest}\n"

    status, out, terminal = run_on_terminal(["stage", "acme/tty:1", "--app", "tty", *cfg])
    assert status == 0, terminal
    assert out == ref
    central_host = staging_cell.registries[0].split("://")[1]
    size = sum(len(b.data) for b in image.blobs)  # config + 3 layers
    assert f"\rpush {central_host}  4/4 blobs  {human_size(size)} / {human_size(size)}" in (
        terminal
    ), terminal
    assert "\rresolved docker.io/acme/tty:1 -> " + image.digest[7:19] in terminal
    # the line is blanked at the end: the terminal is left on a clean line
    assert terminal.endswith("\r"), repr(terminal[-80:])
    assert terminal.rstrip("\r ").count("\r") >= 2

    status, out, terminal = run_on_terminal(["stage", "acme/tty:1", "--app", "tty", "--json", *cfg])
    assert status == 0
    assert json.loads(out)["digest"] == image.digest
    assert terminal == ""  # --json: no progress line even on a terminal

    piped = celld("stage", "acme/tty:1", "--app", "tty", *cfg)
    assert piped.stdout == ref and piped.stderr == ""


# -- private images: credentials from stdin or the environment ---------------


@pytest.fixture
def private_cell(tmp_path: Path, token_hub, central: Registry) -> Iterator[Celld]:
    daemon = start_cell(tmp_path / "private", token_hub.url, central)
    yield daemon
    daemon.stop()


def test_private_stage_prints_a_working_token(private_cell: Celld, token_hub):
    cfg = ["--config", str(private_cell.config_path)]
    image = make_image((5000,))
    token_hub.push("acme/secret", "1", image)
    ((user, password),) = token_hub.users.items()

    wrong = celld(
        "stage", "acme/secret:1", "--app", "secret", "--username", user, "--password-stdin",
        *cfg, stdin="not-" + password + "\n",
    )  # fmt: skip
    assert wrong.returncode == 1
    assert password not in one_error_line(wrong)
    assert celld("pins", "--json", *cfg).stdout.count('"app"') == 0

    staged = celld(
        "stage", "acme/secret:1", "--app", "secret", "--username", user, "--password-stdin",
        *cfg, stdin=password + "\n",
    )  # fmt: skip
    assert staged.returncode == 0, staged.stderr
    ref_line, token_line = staged.stdout.splitlines()
    assert ref_line == f"{private_cell.host}/acme/secret@{image.digest}"
    m = re.fullmatch(
        r"token: (\S+)  \(use as the password of any user, or as a Bearer token\)", token_line
    )
    assert m, token_line
    token = m[1]
    assert password not in staged.stdout + staged.stderr
    blob = image.layers[0]
    url = f"{private_cell.url}/v2/acme/secret/blobs/{blob.digest}"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, auth=("anyone", token)).content == blob.data
    assert httpx.get(url, headers={"Authorization": f"Bearer {token}"}).content == blob.data

    from_env = celld(
        "stage", "acme/secret:1", "--app", "secret", "--json", *cfg,
        env={"CELLD_REGISTRY_USERNAME": user, "CELLD_REGISTRY_PASSWORD": password},
    )  # fmt: skip
    assert from_env.returncode == 0, from_env.stderr
    doc = json.loads(from_env.stdout)
    assert doc["private"] is True and doc["token"] == token
    assert doc["digest"] == image.digest and doc["app"] == "secret"


def test_a_daemon_dying_mid_stage_is_one_line(tmp_path, hub, central, fault_proxy):
    stalled = fault_proxy(hub.host, stall=True)
    daemon = start_cell(tmp_path / "dying", stalled.url, central)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "celld", "stage", "acme/shop:1", "--app", "shop",
             "--config", str(daemon.config_path)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, cwd=ROOT, env=ENV,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while not stalled.requests and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stalled.requests, "the daemon never asked the upstream"
        daemon.kill()
        out, err = proc.communicate(timeout=30)
    finally:
        daemon.stop()
    assert proc.returncode == 1
    assert err.count("\n") == 1 and err.startswith("celld: "), err
    assert "closed the connection" in err
    assert out == ""
