"""The network model's loss and latency match their parameters on a sample."""

from __future__ import annotations

import math

from simulations.model.engine import Engine
from simulations.model.network import LinkModel, Network
from simulations.model.rng import derive


def _net(link: LinkModel) -> tuple[Engine, Network, list[float]]:
    engine = Engine()
    net = Network(engine, link, derive(1, "latency"), derive(1, "loss"), 0.0)
    a = net.add_node("a", 0, 1e8, 1e8)
    b = net.add_node("b", 0, 1e8, 1e8)
    c = net.add_node("c", 1, 1e8, 1e8)
    assert (a, b, c) == (0, 1, 2)
    arrivals: list[float] = []
    for node in (a, b, c):
        net.listen(node, lambda src, data: arrivals.append(engine.now - float(data.decode())))
    return engine, net, arrivals


def test_loss_rate_matches_probability() -> None:
    engine, net, arrivals = _net(LinkModel(loss=0.1))
    n = 20_000
    for _ in range(n):
        net.send(0, 1, b"0")
    engine.run(10.0)
    lost = net.dropped_loss / n
    # binomial: sd = sqrt(0.1 * 0.9 / 20000) = 0.0021; 4 sd either way
    assert abs(lost - 0.1) < 0.0085
    assert len(arrivals) + net.dropped_loss == n


def test_latency_is_zone_base_plus_lognormal_jitter() -> None:
    link = LinkModel(same_zone_s=0.001, cross_zone_s=0.010, jitter_median_s=0.002, jitter_sigma=0.5)
    engine, net, arrivals = _net(link)
    n = 5_000
    for i in range(n):
        engine.call_at(i * 0.001, lambda dst: net.send(0, dst, str(engine.now).encode()), 1)
    engine.run(100.0)
    same = sorted(arrivals)
    arrivals.clear()
    for i in range(n):
        engine.call_at(200 + i * 0.001, lambda dst: net.send(0, dst, str(engine.now).encode()), 2)
    engine.run(400.0)
    cross = sorted(arrivals)
    assert len(same) == len(cross) == n
    jitter_mean = 0.002 * math.exp(0.5**2 / 2)
    assert abs(sum(same) / n - (0.001 + jitter_mean)) < 0.0001
    assert abs(sum(cross) / n - (0.010 + jitter_mean)) < 0.0001
    # the median of the jitter is its parameter
    assert abs(same[n // 2] - 0.003) < 0.0001
    assert min(same) > 0.001 and min(cross) > 0.010


def test_crashed_and_partitioned_nodes_get_nothing() -> None:
    engine, net, arrivals = _net(LinkModel(jitter_median_s=0.0))
    net.crash(1)
    net.send(0, 1, b"0")
    net.partition([0, 0, 1])
    net.send(0, 2, b"0")
    engine.run(1.0)
    assert arrivals == []
    assert net.dropped_down == 1 and net.dropped_partition == 1
    net.heal()
    net.restart(1)
    net.send(0, 1, b"1")
    net.send(0, 2, b"1")
    engine.run(2.0)
    assert len(arrivals) == 2
