"""celld.receive: a head already in the socket is read without a scheduler round;
bytes the socket has room for are written at once."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from celld.receive import receive_head, send_all_now


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


async def test_bytes_the_socket_takes_are_written_at_once() -> None:
    ours, theirs = _pair()
    await send_all_now(ours, b"HTTP/1.1 200 OK\r\n\r\n", 5)
    with trio.testing.assert_no_checkpoints():
        assert await receive_head(theirs, 1024, 5) == b"HTTP/1.1 200 OK\r\n\r\n"


async def test_more_than_the_socket_holds_arrives_whole_and_in_order() -> None:
    ours, theirs = _pair()
    data = bytes(range(256)) * (16 << 10)  # 4 MiB, far beyond a socket buffer
    got = bytearray()
    async with trio.open_nursery() as nursery:

        async def read() -> None:
            while len(got) < len(data):
                got.extend(await theirs.receive_some(1 << 16))

        nursery.start_soon(read)
        await send_all_now(ours, data, 5)
    assert got == data


async def test_a_peer_that_reads_nothing_is_too_slow() -> None:
    ours, _theirs = _pair()
    with pytest.raises(trio.TooSlowError):
        await send_all_now(ours, b"x" * (16 << 20), 0.05)


async def test_other_streams_take_send_all() -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    await send_all_now(ours, b"x", 5)
    assert await theirs.receive_some(10) == b"x"
