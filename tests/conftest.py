"""Fixtures shared by every test: real registries on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from celld.store import Store
from tests.support.celld import Celld
from tests.support.registry import Registry

pytest_plugins = ["tests.support.fixtures", "tests.support.auth"]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """An empty blob store in the test's directory."""
    s = Store.open(tmp_path / "data")
    yield s
    s.close()


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Registry]:
    """A docker-registry playing Docker Hub (the upstream for ns=docker.io)."""
    reg = Registry(tmp_path / "hub").start()
    yield reg
    reg.stop()


@pytest.fixture
def central(tmp_path: Path) -> Iterator[Registry]:
    """A docker-registry playing the platform's central registry."""
    reg = Registry(tmp_path / "central").start()
    yield reg
    reg.stop()


@pytest.fixture
def cell(tmp_path: Path, hub: Registry) -> Iterator[Celld]:
    """A celld whose docker.io upstream is the test Hub."""
    daemon = Celld(tmp_path / "cell", upstreams={"docker.io": hub.url}).start()
    yield daemon
    daemon.stop()
