"""Bulk transfers share bandwidth as the model says, checked against arithmetic."""

from __future__ import annotations

import pytest

from simulations.model.engine import Engine
from simulations.model.flows import Flow, FlowNet, Resource

MB = 1_000_000


def _run(flows: list[tuple[tuple[Resource, ...], float]], quantum: float = 0.0) -> list[float]:
    engine = Engine()
    net = FlowNet(engine, quantum)
    done: list[float] = [0.0] * len(flows)

    def finished(i: int):
        def on_end(flow: Flow, ok: bool) -> None:
            assert ok
            done[i] = engine.now

        return on_end

    for i, (resources, size) in enumerate(flows):
        net.start(resources, size, finished(i))
    engine.run(1e9)
    return done


def test_two_flows_from_one_source_each_get_half() -> None:
    src = Resource("s.up", 100 * MB)
    a, b = Resource("a.down", 1000 * MB), Resource("b.down", 1000 * MB)
    # 100 MB each at 50 MB/s: both end at 2 s (alone, one would end at 1 s)
    done = _run([((src, a), 100 * MB), ((src, b), 100 * MB)])
    assert done == [pytest.approx(2.0), pytest.approx(2.0)]


def test_freed_bandwidth_goes_to_the_flow_left() -> None:
    src = Resource("s.up", 100 * MB)
    a, b = Resource("a.down", 1000 * MB), Resource("b.down", 1000 * MB)
    # 50 MB ends at 1 s (50 MB/s); the 100 MB flow has 50 MB left at 100 MB/s: 1.5 s
    done = _run([((src, a), 50 * MB), ((src, b), 100 * MB)])
    assert done == [pytest.approx(1.0), pytest.approx(1.5)]


def test_receiver_download_limits_and_is_shared() -> None:
    s1, s2 = Resource("s1.up", 100 * MB), Resource("s2.up", 100 * MB)
    d = Resource("d.down", 60 * MB)
    # two senders into one 60 MB/s download: 30 MB/s each
    done = _run([((s1, d), 30 * MB), ((s2, d), 60 * MB)])
    assert done == [pytest.approx(1.0), pytest.approx(1.5)]


def test_quantum_delays_redistribution_by_at_most_one_quantum() -> None:
    src = Resource("s.up", 100 * MB)
    a, b = Resource("a.down", 1000 * MB), Resource("b.down", 1000 * MB)
    done = _run([((src, a), 50 * MB), ((src, b), 100 * MB)], quantum=0.01)
    assert done[0] == pytest.approx(1.0)
    assert 1.5 <= done[1] <= 1.5 + 0.01


def test_no_resource_is_ever_oversubscribed() -> None:
    engine = Engine()
    net = FlowNet(engine)
    ups = [Resource(f"u{i}", (i + 1) * 10 * MB) for i in range(4)]
    downs = [Resource(f"d{i}", (4 - i) * 7 * MB) for i in range(4)]
    for i in range(4):
        for j in range(4):
            if i != j:
                net.start((ups[i], downs[j]), (i + j + 1) * MB, lambda f, ok: None)
    checks = 0
    while engine.pending():
        engine.run(engine.now + 0.05)
        for r in ups + downs:
            assert sum(f.rate for f in r.flows.values()) <= r.capacity * (1 + 1e-9)
            checks += 1
    assert checks > 0
