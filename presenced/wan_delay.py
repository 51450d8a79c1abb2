"""A TCP delay proxy: makes a loopback link behave like a long-haul one (for demos and benches).

Every chunk read from one side is written to the other ``delay`` seconds later, in order, in
both directions. A close travels like data: when one side closes, what it sent still arrives
on time, then the other side sees the end of the stream (a half-close), and once it closes
too, both connections are closed. A side that breaks (reset) closes both at once.

It sits between daemons on one machine (`presenced demo --wan-delay-ms`,
`bench/direct_messages.py`) so cross-region behaviour (two hops cost two link delays; a
cursor that crosses an ocean) is visible without an ocean.

It adds latency only, not a bandwidth limit: a chunk's delay starts when it is read.
"""

from __future__ import annotations

import trio

__all__ = ["CHUNK", "serve_delay_proxy"]

#: Bytes read at a time; chunks are forwarded as read (the delay applies per chunk).
CHUNK = 65_536
#: Chunks in flight per direction before reading pauses (bounds memory: 64 x 64 KiB).
IN_FLIGHT = 64


async def _pump(source: trio.abc.Stream, sink: trio.abc.HalfCloseableStream, delay: float) -> None:
    """Forward ``source`` to ``sink``, each chunk ``delay`` seconds after it was read.

    Once the source has closed and everything read from it has been written, ``sink`` gets
    the end of the stream, ``delay`` after the close was seen.
    """
    send, receive = trio.open_memory_channel[tuple[float, bytes]](IN_FLIGHT)

    async def read() -> None:
        async with send:
            while data := await source.receive_some(CHUNK):
                await send.send((trio.current_time() + delay, bytes(data)))
            await send.send((trio.current_time() + delay, b""))  # the close, delayed too

    async def write() -> None:
        async with receive:
            async for due, data in receive:
                await trio.sleep_until(due)
                if data:
                    await sink.send_all(data)
        await sink.send_eof()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        nursery.start_soon(write)


async def _relay(client: trio.SocketStream, host: str, port: int, delay: float) -> None:
    try:
        upstream = await trio.open_tcp_stream(host, port)
    except OSError:
        await trio.aclose_forcefully(client)
        return
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_pump, client, upstream, delay)
            nursery.start_soon(_pump, upstream, client, delay)
    except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass  # one side broke: both are closed below
    finally:
        await trio.aclose_forcefully(upstream)
        await trio.aclose_forcefully(client)


async def serve_delay_proxy(
    host: str,
    port: int,
    delay: float,
    *,
    listen_host: str = "127.0.0.1",
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Proxy an ephemeral port on ``listen_host`` to ``host:port`` with ``delay`` seconds
    each way; ``task_status.started`` gets the port. Runs until cancelled."""
    if delay < 0:
        raise ValueError("delay must not be negative")
    listeners = await trio.open_tcp_listeners(0, host=listen_host)
    task_status.started(int(listeners[0].socket.getsockname()[1]))

    async def handle(stream: trio.SocketStream) -> None:
        await _relay(stream, host, port, delay)

    try:
        await trio.serve_listeners(handle, listeners)
    finally:
        for listener in listeners:
            await listener.aclose()
