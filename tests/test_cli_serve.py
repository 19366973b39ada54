"""`celld serve` as a user runs it: defaults, signals, one-line errors."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import httpx

from tests.support.procs import wait_for_port


def test_serve_with_defaults_then_sigterm(tmp_path):
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "xdg")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "celld", "serve"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for_port(5050, proc, timeout=20)
        r = httpx.get("http://127.0.0.1:5050/v2/")
        assert r.status_code == 200
        assert r.headers["docker-distribution-api-version"] == "registry/2.0"
        assert httpx.get("http://127.0.0.1:5051/metrics").status_code == 200
        assert (tmp_path / "xdg" / "celld" / "index.db").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out
    assert "Traceback" not in out


def test_port_in_use_is_one_line_exit_1(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = tmp_path / "c.toml"
        config.write_text(
            f'[cell]\ndata_dir = "{tmp_path / "d"}"\n[mirror]\nlisten = "127.0.0.1:{port}"\n'
            "[metrics]\nenabled = false\n"
        )
        proc = subprocess.run(
            [sys.executable, "-m", "celld", "serve", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot start" in lines[0], proc.stderr
