"""celld.receive: a head already in the socket is read without a scheduler round."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from celld.receive import receive_head


def _pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    a, b = trio.socket.socketpair()
    return trio.SocketStream(a), trio.SocketStream(b)


async def test_a_head_already_received_is_read_without_yielding() -> None:
    ours, theirs = _pair()
    await theirs.send_all(b"GET / HTTP/1.1\r\n\r\n")
    with trio.testing.assert_no_checkpoints():
        assert await receive_head(ours, 4, 5) == b"GET "
    with trio.testing.assert_no_checkpoints():
        assert await receive_head(ours, 1024, 5) == b"/ HTTP/1.1\r\n\r\n"


async def test_with_nothing_received_it_waits_like_receive_some() -> None:
    ours, theirs = _pair()
    async with trio.open_nursery() as nursery:

        async def later() -> None:
            await trio.sleep(0.05)
            await theirs.send_all(b"late")

        nursery.start_soon(later)
        with trio.testing.assert_checkpoints():
            assert await receive_head(ours, 1024, 5) == b"late"
    await theirs.aclose()
    assert await receive_head(ours, 1024, 5) == b""


async def test_other_streams_take_receive_some() -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    await theirs.send_all(b"x")
    with trio.testing.assert_checkpoints():
        assert await receive_head(ours, 10, 5) == b"x"


async def test_nothing_within_the_timeout_is_too_slow() -> None:
    ours, _theirs = _pair()
    with trio.testing.assert_checkpoints(), pytest.raises(trio.TooSlowError):
        await receive_head(ours, 1024, 0.05)
