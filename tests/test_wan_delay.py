"""The TCP delay proxy used by `presenced demo --wan-delay-ms` and the benchmarks."""

from __future__ import annotations

import socket

import pytest
import trio

from presenced.wan_delay import serve_delay_proxy

DELAY = 0.05


async def echo_server(nursery: trio.Nursery, closed: trio.Event | None = None) -> int:
    async def echo(stream: trio.SocketStream) -> None:
        async with stream:
            while data := await stream.receive_some(65536):
                await stream.send_all(data)
        if closed is not None:
            closed.set()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    nursery.start_soon(trio.serve_listeners, echo, listeners)
    return int(listeners[0].socket.getsockname()[1])


async def read_exactly(stream: trio.SocketStream, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = await stream.receive_some(size - len(data))
        assert chunk, "closed early"
        data += chunk
    return data


async def test_each_direction_is_delayed_and_order_is_kept(nursery: trio.Nursery) -> None:
    port = await echo_server(nursery)
    proxy = await nursery.start(serve_delay_proxy, "127.0.0.1", port, DELAY)
    stream = await trio.open_tcp_stream("127.0.0.1", proxy)
    async with stream:
        started = trio.current_time()
        await stream.send_all(b"ping")
        assert await read_exactly(stream, 4) == b"ping"
        round_trip = trio.current_time() - started
        assert 2 * DELAY <= round_trip < 2 * DELAY + 0.5
        # Many writes in a row arrive in order, and the delay does not add up per chunk.
        started = trio.current_time()
        payload = b"".join(i.to_bytes(4, "big") for i in range(20000))
        for offset in range(0, len(payload), 1000):
            await stream.send_all(payload[offset : offset + 1000])
        assert await read_exactly(stream, len(payload)) == payload
        assert trio.current_time() - started < 2 * DELAY + 1.0


async def test_a_close_on_either_side_closes_both(nursery: trio.Nursery) -> None:
    closed = trio.Event()
    port = await echo_server(nursery, closed)
    proxy = await nursery.start(serve_delay_proxy, "127.0.0.1", port, DELAY)
    client = await trio.open_tcp_stream("127.0.0.1", proxy)
    await client.send_all(b"last words")
    await client.send_eof()
    # What was sent before the close still arrives, the upstream sees the close (and closes),
    # and its answer and its close reach the client.
    with trio.fail_after(2):
        assert await read_exactly(client, 10) == b"last words"
        await closed.wait()
        assert await client.receive_some(100) == b""
    await client.aclose()

    # The upstream closing first closes the client.
    async def hang_up(stream: trio.SocketStream) -> None:
        await stream.send_all(b"bye")
        await stream.aclose()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    nursery.start_soon(trio.serve_listeners, hang_up, listeners)
    proxy = await nursery.start(
        serve_delay_proxy, "127.0.0.1", listeners[0].socket.getsockname()[1], DELAY
    )
    client = await trio.open_tcp_stream("127.0.0.1", proxy)
    with trio.fail_after(2):
        assert await read_exactly(client, 3) == b"bye"
        assert await client.receive_some(100) == b""
    await client.aclose()


async def test_unreachable_upstream_closes_the_client(nursery: trio.Nursery) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound but not listening: refused
        proxy = await nursery.start(serve_delay_proxy, "127.0.0.1", port, DELAY)
        client = await trio.open_tcp_stream("127.0.0.1", proxy)
        with trio.fail_after(2):
            assert await client.receive_some(100) == b""
        await client.aclose()
    with pytest.raises(ValueError, match="negative"):
        await serve_delay_proxy("127.0.0.1", port, -1)
