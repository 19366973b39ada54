"""Starting and stopping the real programs tests run against, on loopback.

Owns free-port picking and waiting for a port to answer; each program's own
module (registry, containerd, nginx) builds on these.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

_handed_out: set[int] = set()


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds it took for `check` to hold; AssertionError after `timeout`."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)
    return time.monotonic() - start


def free_port() -> int:
    """A port nothing listens on now and that this process has not handed out before:
    the kernel may offer the same free port to two calls in a row, and a celld's mirror
    and metrics listeners then collide ("metrics.listen: must differ from mirror.listen",
    seen in CI)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def wait_for_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before port {port} opened")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def stop_process(proc: subprocess.Popen | None, timeout: float = 5.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""


@dataclass
class LoopbackProcess:
    """A process the tests start, listening on a loopback port, logging to a file.

    Subclasses say how to start it (`start`), this class how to spawn, wait,
    report a failed start with the log's tail, and stop.
    """

    root: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def spawn(
        self,
        argv: list[str],
        log_path: Path,
        *,
        env: dict[str, str] | None = None,
        ports: tuple[int, ...] = (),
        timeout: float = 15.0,
    ) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )
        try:
            for port in (self.port, *ports):
                wait_for_port(port, self.proc, timeout=timeout)
        except Exception as exc:
            raise RuntimeError(f"{argv[0]} did not start:\n{tail(log_path)}") from exc

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None


def run_module(module: str, *args: str, timeout: float = 300) -> str:
    """`python -m module args` from the checkout's root, as a user runs a bench or a
    tool; its stdout, once it exited 0 (else the test fails with its stderr)."""
    root = Path(__file__).resolve().parent.parent.parent
    out = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout
