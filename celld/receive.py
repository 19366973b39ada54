"""Reading a head that is already in the socket, and writing one the socket
has room for, with no more of trio's machinery than needed.

trio checkpoints on every receive, data or not: fair to other tasks, but on a
cache miss two such rounds lie on the runtime's time to first byte (reading
its request, reading the upstream's answer), each ~0.05 ms of a cold CPU.
`receive_head` takes what the kernel already holds at once and waits (a
checkpoint, in a cancel scope for its deadline) only when there is nothing
yet. Only for heads, which are read once per request and bounded in size: a
body is read with `receive_some`, so a fast sender can never keep the other
tasks from running.

`send_all_now` is the same for writing (a request to a registry, a response
head to a runtime, any bytes the server sends): one write(2) when the socket
takes it all, with no cancel scope or conflict detector around it (tens of
microseconds of a cold CPU each, before the bytes are out), then trio's
checkpoint, as `send_all` has.
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


async def send_all_now(
    stream: trio.abc.SendStream, data: bytes | memoryview, timeout: float
) -> None:
    """`stream.send_all(data)` within `timeout` (else trio.TooSlowError), written
    at once when the socket has room for it; a checkpoint after, as send_all."""
    if type(stream) is trio.SocketStream:
        try:
            sent = os.write(stream.socket.fileno(), data)
        except BlockingIOError:
            sent = 0
        if sent == len(data):
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        data = memoryview(data)[sent:]
    with trio.fail_after(timeout):
        await stream.send_all(data)
