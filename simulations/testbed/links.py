"""How busy each host's link was through a storm: its veth's byte counters, sampled.

Owns the sampler a storm runs in the bridge's namespace (`python -m
simulations.testbed.links INTERVAL DEV...`) and the reading of its samples. Every
INTERVAL seconds it reads each device's byte counters from sysfs, the bridge's end
of each host's veth (its tx is what the host received, its rx what it sent), and on
SIGTERM prints the samples as one JSON line. A sample reads two small files a device,
well under a millisecond for a whole testbed: an `ip -s link` a host a sample would
start ten processes a tenth of a second on the cores the cells share.

`use()` turns one device's samples into the share of its link's rate used over a
span, `busy_span()` finds when it carried anything: the storm's "link use" line,
which says whether a storm was short of bytes to send (links idle) or of links
(links full).
"""

from __future__ import annotations

import itertools
import json
import signal
import sys
import time
from pathlib import Path

Sample = tuple[float, dict[str, tuple[int, int]]]  # (Unix time, device -> (rx, tx) bytes)


def read(devices: list[str]) -> dict[str, tuple[int, int]]:
    out = {}
    for dev in devices:
        stats = Path("/sys/class/net", dev, "statistics")
        out[dev] = (int((stats / "rx_bytes").read_text()), int((stats / "tx_bytes").read_text()))
    return out


def sample(interval: float, devices: list[str]) -> list[Sample]:
    """Samples until SIGTERM (or SIGINT)."""
    stop = False

    def done(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, done)
    signal.signal(signal.SIGINT, done)
    samples: list[Sample] = []
    while not stop:
        samples.append((time.time(), read(devices)))
        time.sleep(interval)
    samples.append((time.time(), read(devices)))
    return samples


def use(
    samples: list[Sample], device: str, way: int, rate_bps: int, start: float, end: float
) -> float | None:
    """The share of `rate_bps` that `device` carried (way 0: its rx, 1: its tx) from
    `start` to `end` (Unix times), from the samples nearest inside them; None when
    fewer than two samples fall in the span."""
    inside = [(t, s[device][way]) for t, s in samples if start <= t <= end and device in s]
    if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
        return None
    (t0, b0), (t1, b1) = inside[0], inside[-1]
    return (b1 - b0) * 8 / (rate_bps * (t1 - t0))


def busy_span(
    samples: list[Sample], device: str, way: int, rate_bps: int
) -> tuple[float, float] | None:
    """From the first to the last sampling interval in which `device` carried at least
    a tenth of its rate: when a link was in use at all."""
    busy = [
        (a[0], b[0])
        for a, b in itertools.pairwise(samples)
        if (b[1][device][way] - a[1][device][way]) * 8 >= 0.1 * rate_bps * (b[0] - a[0])
    ]
    return (busy[0][0], busy[-1][1]) if busy else None


def main(argv: list[str]) -> None:
    interval, devices = float(argv[0]), argv[1:]
    samples = sample(interval, devices)
    print(json.dumps(samples), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
