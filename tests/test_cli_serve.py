"""`celld serve` as a user runs it: defaults, signals, one-line errors."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.support.celld import Celld
from tests.support.procs import free_port, wait_for_port


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
    assert proc.stderr == (
        f"celld: cannot start: mirror.listen 127.0.0.1:{port}: address already in use\n"
    ), proc.stderr


# -- a second cell on the same host: which listener could not open -----------


@pytest.fixture
def first_cell(tmp_path):
    cell = Celld(tmp_path / "first").start()
    yield cell
    cell.stop()


def _serve_second(tmp_path: Path, data_dir: Path, mirror: int, metrics: int | None):
    config = tmp_path / "second.toml"
    metrics_table = f'listen = "127.0.0.1:{metrics}"' if metrics else "enabled = false"
    config.write_text(
        f'[cell]\ndata_dir = "{data_dir}"\n[mirror]\nlisten = "127.0.0.1:{mirror}"\n'
        f"[metrics]\n{metrics_table}\n"
    )
    return subprocess.run(
        [sys.executable, "-m", "celld", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )


def _assert_first_still_serves(cell: Celld) -> None:
    assert httpx.get(f"{cell.url}/v2/").status_code == 200
    assert httpx.get(f"http://127.0.0.1:{cell.metrics_port}/metrics").status_code == 200
    with cell.admin() as admin:
        assert admin.get("/v1/status").status_code == 200


def test_second_cell_on_the_first_cells_metrics_port(tmp_path, first_cell):
    """The issue's case: a second cell without its own [metrics] listen."""
    port = first_cell.metrics_port
    proc = _serve_second(tmp_path, tmp_path / "second", free_port(), port)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr == (
        f"celld: cannot start: metrics.listen 127.0.0.1:{port}: address already in use\n"
    )
    _assert_first_still_serves(first_cell)


def test_second_cell_on_the_first_cells_mirror_port(tmp_path, first_cell):
    proc = _serve_second(tmp_path, tmp_path / "second", first_cell.port, free_port())
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr == (
        f"celld: cannot start: mirror.listen 127.0.0.1:{first_cell.port}: address already in use\n"
    )
    _assert_first_still_serves(first_cell)


def test_second_cell_on_the_first_cells_data_dir(tmp_path, first_cell):
    """Its own ports, the first's data_dir (admin socket, store): refused before the
    first's admin socket is touched."""
    proc = _serve_second(tmp_path, first_cell.data_dir, free_port(), free_port())
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr == (
        f"celld: cannot start: cell.data_dir {first_cell.data_dir}: in use by another celld\n"
    )
    _assert_first_still_serves(first_cell)


def test_admin_socket_that_cannot_bind_names_its_path(tmp_path):
    """A data_dir so deep that `admin.sock` exceeds a unix socket's 108 bytes."""
    data_dir = tmp_path / ("d" * 60) / ("d" * 60)
    proc = _serve_second(tmp_path, data_dir, free_port(), None)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr == (
        f"celld: cannot start: cell.data_dir {data_dir / 'admin.sock'}: AF_UNIX path too long\n"
    )
