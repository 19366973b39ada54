"""celld.listen: the one call a listener's bind runs inside, for TCP and UDP alike."""

from __future__ import annotations

import socket

import pytest
import trio

from celld.listen import ListenError, naming


def test_a_udp_bind_on_a_taken_port_names_key_and_address():
    """The shape a later listener (the cluster address, UDP) gets with one call."""
    udp = (socket.AF_INET, socket.SOCK_DGRAM)
    with socket.socket(*udp) as taken, socket.socket(*udp) as second:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        with pytest.raises(ListenError) as caught, naming("cluster.listen", f"127.0.0.1:{port}"):
            second.bind(("127.0.0.1", port))
    assert str(caught.value) == f"cluster.listen 127.0.0.1:{port}: address already in use"


async def test_a_task_that_fails_to_bind_before_it_started():
    """nursery.start raises what the task raised before `started`: naming sees it."""

    async def listener(*, task_status=trio.TASK_STATUS_IGNORED):
        await trio.open_tcp_listeners(0, host="192.0.2.1")  # not this host's address
        task_status.started()

    async with trio.open_nursery() as nursery:
        with pytest.raises(ListenError) as caught, naming("cluster.listen", "192.0.2.1:0"):
            await nursery.start(listener)
    assert str(caught.value) == "cluster.listen 192.0.2.1:0: cannot assign requested address"
