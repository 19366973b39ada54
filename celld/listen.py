"""Naming the listener that could not open.

Owns `ListenError`, the start-up failure a user fixes by changing one key of
the config (or stopping whatever holds the address), and `naming`, the one
call every listener's bind runs inside: mirror, metrics, the admin socket,
and any later one (the cluster address, UDP and TCP). cli.py prints it as
one line, `metrics.listen 127.0.0.1:5051: address already in use`; it never
reaches a user as a traceback.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class ListenError(Exception):
    """`key address: reason`, the reason in lower case as a sentence goes on."""

    def __init__(self, key: str, address: object, reason: str) -> None:
        super().__init__(key, str(address), reason)
        self.key, self.address, self.reason = key, str(address), reason

    def __str__(self) -> str:
        return f"{self.key} {self.address}: {self.reason}"


@contextlib.contextmanager
def naming(key: str, address: object) -> Iterator[None]:
    """Turns an OSError of the bind inside into a ListenError naming `key` and
    `address`. Works around sync and async binds alike (and around
    `nursery.start` of a task that binds, which raises what the task raised
    before it started)."""
    try:
        yield
    except OSError as exc:
        raise ListenError(key, address, _reason(exc)) from None


def _reason(exc: OSError) -> str:
    text = exc.strerror or str(exc) or type(exc).__name__
    # "Address already in use" -> "address ...", but "AF_UNIX path too long" stays.
    if text[:2].istitle():
        return text[0].lower() + text[1:]
    return text
