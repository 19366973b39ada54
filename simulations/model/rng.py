"""Random streams for the simulator: one `random.Random` per concern, derived from the seed.

Owns: turning (seed, concern name) into an independent, reproducible stream.
Never: uses Python's `hash()` (salted per process) or the OS's entropy. A concern that
draws more or fewer numbers (say, loss) never shifts another's stream (say, latency),
so changing one knob of a scenario changes only what it should.
"""

from __future__ import annotations

import hashlib
import random


def derive(seed: int, concern: str) -> random.Random:
    """An independent stream for `concern` under `seed` (same inputs, same stream)."""
    digest = hashlib.sha256(f"{seed}/{concern}".encode()).digest()
    return random.Random(int.from_bytes(digest[:16], "big"))


def derive_bytes(seed: int, concern: str, size: int = 32) -> bytes:
    """Reproducible key material (cluster keys, node ids) for `concern` under `seed`."""
    out = b""
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}/{concern}/{counter}".encode()).digest()
        counter += 1
    return out[:size]
