"""The simulated network: latency in virtual time, FIFO, loss, duplication, partitions, crashes."""

from __future__ import annotations

import math
import time

import pytest
import trio
import trio.testing

from presenced.server.peers.transport import ChannelClosed, PeerChannel, PeerTransport
from presenced.testing import SimChannel, SimNetwork, SimStats, SimTransport


async def _listen(
    nursery: trio.Nursery, transport: SimTransport
) -> trio.MemoryReceiveChannel[PeerChannel]:
    """Serve ``transport``; hand each accepted channel to the test (kept open until cancelled)."""
    send, accepted = trio.open_memory_channel[PeerChannel](math.inf)

    async def handler(channel: PeerChannel) -> None:
        send.send_nowait(channel)
        await trio.sleep_forever()

    await nursery.start(transport.serve, handler)
    return accepted


async def _pair(
    nursery: trio.Nursery, net: SimNetwork, a: str = "eu", b: str = "us"
) -> tuple[SimChannel, PeerChannel]:
    """A channel dialed from node ``a`` to node ``b``: (dialer's end, listener's end)."""
    accepted = await _listen(nursery, net.transport(b, f"sim://{b}"))
    near = await net.transport(a, f"sim://{a}").dial(f"sim://{b}")
    far = await accepted.receive()
    return near, far


async def test_protocol_conformance() -> None:
    net = SimNetwork()
    transport: PeerTransport = net.transport("eu", "sim://eu")
    assert isinstance(transport, SimTransport)


async def test_delivery_after_latency(autojump_clock: trio.testing.MockClock) -> None:
    net = SimNetwork(seed=1)
    net.set_latency("eu", "us", 0.050)
    async with trio.open_nursery() as nursery:
        t0 = trio.current_time()
        near, far = await _pair(nursery, net)
        assert trio.current_time() - t0 == pytest.approx(0.100)  # dial costs one round trip
        assert near.remote_label == "us" and far.remote_label == "eu"
        assert near.remote_names == frozenset({"us"}) and far.remote_names == frozenset({"eu"})

        sent_at = trio.current_time()
        await near.send(b"hello")
        assert trio.current_time() == sent_at  # send does not wait for delivery
        assert await far.receive() == b"hello"
        assert trio.current_time() - sent_at == pytest.approx(0.050)

        sent_at = trio.current_time()
        await far.send(b"back")
        assert await near.receive() == b"back"
        assert trio.current_time() - sent_at == pytest.approx(0.050)
        nursery.cancel_scope.cancel()


async def test_per_direction_latency(autojump_clock: trio.testing.MockClock) -> None:
    net = SimNetwork(latency=0.010)
    net.set_latency("eu", "us", 0.200, both_ways=False)
    async with trio.open_nursery() as nursery:
        near, far = await _pair(nursery, net)
        t0 = trio.current_time()
        await near.send(b"x")
        await far.receive()
        assert trio.current_time() - t0 == pytest.approx(0.200)
        t0 = trio.current_time()
        await far.send(b"y")
        await near.receive()
        assert trio.current_time() - t0 == pytest.approx(0.010)
        nursery.cancel_scope.cancel()


async def _jittery_run(seed: int) -> list[tuple[int, float]]:
    net = SimNetwork(seed=seed)
    net.set_latency("eu", "us", 0.010, jitter=0.500)
    received: list[tuple[int, float]] = []
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        near, far = await _pair(nursery, net)

        async def sender() -> None:
            for i in range(300):
                await near.send(i.to_bytes(4, "big"))
                await trio.sleep(0.001 * (i % 7))

        nursery.start_soon(sender)
        for _ in range(300):
            data = await far.receive()
            received.append((int.from_bytes(data, "big"), trio.current_time() - t0))
        nursery.cancel_scope.cancel()
    return received


async def test_fifo_with_jitter_and_determinism(autojump_clock: trio.testing.MockClock) -> None:
    received = await _jittery_run(seed=7)
    assert [i for i, _ in received] == list(range(300))
    times = [t for _, t in received]
    assert times == sorted(times)
    assert len(set(times)) > 10  # jitter really spreads arrivals
    # same seed, same run (up to float rounding: the clock has moved on since)
    assert [t for _, t in await _jittery_run(seed=7)] == pytest.approx(times, abs=1e-9)
    assert [t for _, t in await _jittery_run(seed=8)] != pytest.approx(times, abs=1e-9)


async def test_loss(autojump_clock: trio.testing.MockClock) -> None:
    async def delivered(probability: float, seed: int = 0) -> list[bytes]:
        net = SimNetwork(seed=seed, latency=0.010)
        net.set_loss("eu", "us", probability)
        got: list[bytes] = []
        async with trio.open_nursery() as nursery:
            near, far = await _pair(nursery, net)
            for i in range(200):
                await near.send(b"m%d" % i)
            await near.aclose()  # the close itself is never lost
            with pytest.raises(ChannelClosed):
                while True:
                    got.append(await far.receive())
            assert net.stats[("eu", "us")].messages == 200  # dropped ones were still sent
            nursery.cancel_scope.cancel()
        return got

    assert await delivered(1.0) == []
    assert await delivered(0.0) == [b"m%d" % i for i in range(200)]
    half = await delivered(0.5, seed=3)
    assert 50 < len(half) < 150
    assert half == sorted(half, key=lambda m: int(m[1:]))  # survivors keep their order
    assert await delivered(0.5, seed=3) == half


async def test_duplicates(autojump_clock: trio.testing.MockClock) -> None:
    net = SimNetwork(latency=0.010)
    net.duplicate("eu", "us", 1.0)
    async with trio.open_nursery() as nursery:
        near, far = await _pair(nursery, net)
        for m in (b"a", b"b", b"c"):
            await near.send(m)
        await near.aclose()
        got = []
        with pytest.raises(ChannelClosed):
            while True:
                got.append(await far.receive())
        assert got == [b"a", b"a", b"b", b"b", b"c", b"c"]
        assert net.stats[("eu", "us")] == SimStats(messages=3, bytes=3)
        nursery.cancel_scope.cancel()


async def test_partition_breaks_channels_and_blocks_dials(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = SimNetwork(latency=0.050)
    async with trio.open_nursery() as nursery:
        near, far = await _pair(nursery, net, "eu", "us")
        ap_accepted = await _listen(nursery, net.transport("ap", "sim://ap"))
        await near.send(b"in flight")  # lost with the partition
        got_closed: list[float] = []

        async def reader(channel: PeerChannel) -> None:
            with pytest.raises(ChannelClosed):
                await channel.receive()
            got_closed.append(trio.current_time())

        async with trio.open_nursery() as readers:
            readers.start_soon(reader, near)
            readers.start_soon(reader, far)
            await trio.sleep(0.010)
            cut_at = trio.current_time()
            net.partition(["eu"], ["us", "other"])
        assert got_closed == [cut_at, cut_at]  # both ends break at once
        assert near.closed
        with pytest.raises(ChannelClosed):
            await near.send(b"x")
        with pytest.raises(ChannelClosed):
            await far.send(b"x")
        assert net.open_channels() == 0

        eu = net.transport("eu", "sim://eu")
        await _listen(nursery, eu)
        with pytest.raises(OSError, match="partitioned"):
            await eu.dial("sim://us")
        with pytest.raises(OSError, match="partitioned"):
            await net.transport("us", "sim://us2").dial("sim://eu")
        assert net.is_partitioned("us", "eu") and not net.is_partitioned("eu", "ap")

        await eu.dial("sim://ap")  # the rest of the network still works
        await ap_accepted.receive()

        net.heal()
        again = await eu.dial("sim://us")
        await again.send(b"after heal")
        nursery.cancel_scope.cancel()


async def test_partition_during_dial_fails_it(autojump_clock: trio.testing.MockClock) -> None:
    net = SimNetwork(latency=0.100)
    async with trio.open_nursery() as nursery:
        await _listen(nursery, net.transport("us", "sim://us"))
        eu = net.transport("eu", "sim://eu")

        async def cut() -> None:
            await trio.sleep(0.050)
            net.partition({"eu"}, {"us"})

        nursery.start_soon(cut)
        with pytest.raises(OSError):
            await eu.dial("sim://us")
        assert net.open_channels() == 0
        nursery.cancel_scope.cancel()


async def test_dial_refused_when_nothing_listens() -> None:
    net = SimNetwork()
    with pytest.raises(ConnectionRefusedError, match="nothing listens"):
        await net.transport("eu", "sim://eu").dial("sim://nowhere")


async def test_serve_unregisters_on_cancel_and_rejects_address_in_use(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = SimNetwork()
    us = net.transport("us", "sim://us")
    async with trio.open_nursery() as serving:
        await _listen(serving, us)
        with pytest.raises(OSError, match="in use"):
            await net.transport("us", "sim://us").serve(_never)
        near = await net.transport("eu", "sim://eu").dial("sim://us")
        serving.cancel_scope.cancel()
    # serve is gone: its handler's channel was closed, and the address is free again
    with pytest.raises(ChannelClosed):
        await near.receive()
    with pytest.raises(OSError, match="nothing listens"):
        await net.transport("eu", "sim://eu").dial("sim://us")


async def _never(channel: PeerChannel) -> None:
    await trio.sleep_forever()


async def test_handler_return_closes_channel(autojump_clock: trio.testing.MockClock) -> None:
    net = SimNetwork(latency=0.010)

    async def echo_once(channel: PeerChannel) -> None:
        await channel.send(await channel.receive())

    async with trio.open_nursery() as nursery:
        await nursery.start(net.transport("us", "sim://us").serve, echo_once)
        near = await net.transport("eu", "sim://eu").dial("sim://us")
        await near.send(b"ping")
        assert await near.receive() == b"ping"
        with pytest.raises(ChannelClosed):
            await near.receive()
        nursery.cancel_scope.cancel()


async def test_crash_and_restart(autojump_clock: trio.testing.MockClock) -> None:
    net = SimNetwork(latency=0.020)
    async with trio.open_nursery() as nursery:
        near, far = await _pair(nursery, net, "eu", "us")
        old_eu = net.transport("eu", "sim://eu")
        await _listen(nursery, old_eu)
        net.crash("us")
        assert net.is_crashed("us")
        with pytest.raises(ChannelClosed):
            await near.receive()
        with pytest.raises(ChannelClosed):
            await far.receive()
        with pytest.raises(OSError, match="nothing listens"):
            await old_eu.dial("sim://us")

        net.crash("eu")
        assert not old_eu.alive
        net.restart("eu")
        with pytest.raises(OSError, match="crashed"):
            await old_eu.dial("sim://ap")  # a crashed daemon's transport stays dead
        with pytest.raises(OSError, match="crashed"):
            await old_eu.serve(_never)

        new_us = net.transport("us", "sim://us")  # the restarted daemon
        assert not net.is_crashed("us")
        accepted = await _listen(nursery, new_us)
        eu = net.transport("eu", "sim://eu")
        channel = await eu.dial("sim://us")
        await channel.send(b"welcome back")
        assert await (await accepted.receive()).receive() == b"welcome back"
        nursery.cancel_scope.cancel()


async def test_close_propagates_after_in_flight(autojump_clock: trio.testing.MockClock) -> None:
    net = SimNetwork(latency=0.100)
    async with trio.open_nursery() as nursery:
        near, far = await _pair(nursery, net)
        await near.send(b"1")
        await near.send(b"2")
        closed_at = trio.current_time()
        await near.aclose()
        await near.aclose()  # idempotent
        with pytest.raises(ChannelClosed):
            await near.send(b"3")
        with pytest.raises(ChannelClosed):
            await near.receive()
        await far.send(b"before the close arrives")  # fine: it does not know yet
        assert await far.receive() == b"1"
        assert await far.receive() == b"2"
        with pytest.raises(ChannelClosed):
            await far.receive()
        assert trio.current_time() - closed_at == pytest.approx(0.100)
        with pytest.raises(ChannelClosed):
            await far.send(b"after")
        await far.aclose()
        assert net.open_channels() == 0
        nursery.cancel_scope.cancel()


async def test_stats(autojump_clock: trio.testing.MockClock) -> None:
    net = SimNetwork()
    async with trio.open_nursery() as nursery:
        near, far = await _pair(nursery, net)
        await near.send(b"abc")
        await near.send(b"de")
        await far.send(b"f")
        assert net.stats[("eu", "us")] == SimStats(messages=2, bytes=5)
        assert net.stats[("us", "eu")] == SimStats(messages=1, bytes=1)
        assert net.stats[("eu", "ap")] == SimStats(0, 0)
        assert ("eu", "ap") not in net.stats
        assert net.total_stats() == SimStats(3, 6)
        net.reset_stats()
        assert net.stats == {}
        await near.send(b"g")
        assert net.stats[("eu", "us")] == SimStats(1, 1)
        nursery.cancel_scope.cancel()


async def test_identity_names(autojump_clock: trio.testing.MockClock) -> None:
    net = SimNetwork()
    async with trio.open_nursery() as nursery:
        accepted = await _listen(
            nursery, net.transport("us", "sim://us", names={"us.presence.example", "us"})
        )
        near = await net.transport("eu", "sim://eu", names=None).dial("sim://us")
        far = await accepted.receive()
        assert near.remote_names == frozenset({"us.presence.example", "us"})
        assert far.remote_names is None
        nursery.cancel_scope.cancel()


async def test_runaway_sender_trips_in_flight_bound(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = SimNetwork(latency=1.0, max_in_flight=100)
    async with trio.open_nursery() as nursery:
        near, far = await _pair(nursery, net)
        for _ in range(100):
            await near.send(b"x")
        with pytest.raises(ChannelClosed, match="in flight"):
            await near.send(b"x")
        with pytest.raises(ChannelClosed):
            await far.receive()
        nursery.cancel_scope.cancel()


async def test_run_is_optional_and_startable(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        net = SimNetwork(seed=1)
        await nursery.start(net.run)
        near, far = await _pair(nursery, net)
        await near.send(b"x")
        assert await far.receive() == b"x"
        nursery.cancel_scope.cancel()


async def test_ten_thousand_messages_are_fast(autojump_clock: trio.testing.MockClock) -> None:
    net = SimNetwork(seed=2)
    net.set_latency("eu", "us", 0.030, jitter=0.010)
    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        near, far = await _pair(nursery, net)

        async def sender() -> None:
            for i in range(10_000):
                await near.send(i.to_bytes(4, "big"))
                if i % 100 == 0:
                    await trio.sleep(0.001)

        nursery.start_soon(sender)
        for i in range(10_000):
            assert int.from_bytes(await far.receive(), "big") == i
        nursery.cancel_scope.cancel()
    assert time.perf_counter() - started < 2.0
    assert net.stats[("eu", "us")] == SimStats(10_000, 40_000)


async def test_receive_nowait_sees_only_what_has_arrived(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = SimNetwork(seed=1)
    net.set_latency("eu", "us", 0.050)
    async with trio.open_nursery() as nursery:
        near, far = await _pair(nursery, net)
        await near.send(b"one")
        await near.send(b"two")
        assert far.receive_nowait() is None  # still on its way
        await trio.sleep(0.050)
        assert far.receive_nowait() == b"one"
        assert far.receive_nowait() == b"two"
        assert far.receive_nowait() is None
        await near.aclose()
        assert far.receive_nowait() is None  # the close is on its way too
        await trio.sleep(0.050)
        with pytest.raises(ChannelClosed):
            far.receive_nowait()
        nursery.cancel_scope.cancel()
