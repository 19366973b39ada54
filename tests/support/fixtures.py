"""Fixtures for the real runtimes: containerd, podman, docker, and the fault proxy.

One containerd daemon serves the whole session (it boots in ~30 ms, but a
daemon per test would still leave a root dir per test); each test gets its own
namespace with an isolated content store and its own hosts dir, which is what
a fresh runtime on a fresh cell looks like.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.containerd import Containerd
from tests.support.docker import Docker
from tests.support.podman import Podman, podman_unavailable_reason
from tests.support.proxy import FaultProxy


@pytest.fixture(scope="session")
def containerd_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    """The session's containerd; tests use `containerd` (a namespace on it)."""
    daemon = Containerd(tmp_path_factory.mktemp("containerd")).start()
    yield daemon
    daemon.stop()


@pytest.fixture
def containerd(containerd_daemon: Containerd, tmp_path: Path) -> Containerd:
    """A runtime with an empty store and an empty hosts dir, on the shared daemon."""
    return containerd_daemon.view(f"t-{uuid.uuid4().hex[:16]}", tmp_path / "containerd-hosts")


@pytest.fixture
def fault_proxy() -> Iterator[Callable[..., FaultProxy]]:
    """Start FaultProxy(upstream_host, **settings) in front of a registry; all
    stop at teardown."""
    started: list[FaultProxy] = []

    def start(upstream: str, **settings: object) -> FaultProxy:
        proxy = FaultProxy(upstream, **settings).start()  # type: ignore[arg-type]
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


@pytest.fixture
def podman(tmp_path: Path) -> Iterator[Podman]:
    """podman with its own storage; its mirrors are read from the
    `registries_conf` path, which the test writes. Skips where podman can't run."""
    reason = podman_unavailable_reason()
    if reason is not None:
        pytest.skip(f"podman unavailable: {reason}")
    runroot = Path(tempfile.mkdtemp(prefix="podman-run-"))
    yield Podman(
        tmp_path / "podman", registries_conf=tmp_path / "podman-registries.conf", runroot=runroot
    )
    shutil.rmtree(runroot, ignore_errors=True)


@pytest.fixture
def dockerd(tmp_path: Path) -> Iterator[Callable[[str], Docker]]:
    """Start a dockerd whose registry mirror is the given URL; all stop at
    teardown. Called in the test's body, so a dockerd that cannot start fails
    the test with its log (see tests/support/docker.py for why one per test)."""
    started: list[Docker] = []

    def start(mirror_url: str) -> Docker:
        daemon = Docker(tmp_path / f"docker-{len(started)}", mirror_url)
        started.append(daemon)
        return daemon.start()

    yield start
    for daemon in started:
        daemon.stop()
