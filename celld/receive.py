"""Reading a head that is already in the socket without a scheduler round.

trio checkpoints on every receive, data or not: fair to other tasks, but on a
cache miss two such rounds lie on the runtime's time to first byte (reading
its request, reading the upstream's answer), each ~0.05 ms of a cold CPU.
`receive_head` takes what the kernel already holds at once and waits (a
checkpoint, in a cancel scope for its deadline) only when there is nothing
yet. Only for heads, which are read once per request and bounded in size: a
body is read with `receive_some`, so a fast sender can never keep the other
tasks from running.
"""

from __future__ import annotations

import os

import trio


async def receive_head(stream: trio.abc.ReceiveStream, max_bytes: int, timeout: float) -> bytes:
    """`stream.receive_some(max_bytes)` within `timeout` (else trio.TooSlowError),
    at once when the socket holds data."""
    if type(stream) is trio.SocketStream:
        try:
            return os.read(stream.socket.fileno(), max_bytes)
        except BlockingIOError:
            pass
    with trio.fail_after(timeout):
        return await stream.receive_some(max_bytes)
