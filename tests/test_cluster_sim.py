"""Multi-daemon scenarios on the simulated network, in virtual time (trio MockClock).

Each test runs real daemons (CRDT, liveness, peer links, fan-out) with an in-memory network;
clients are attached to nodes directly and decode every frame they are sent, so what they
"see" is what a browser would see.
"""

from __future__ import annotations

import trio

from presenced.testing.cluster import Cluster
from presenced.testing.simnet import SimNetwork


async def line(nursery: trio.Nursery, net: SimNetwork, **kwargs: object) -> Cluster:
    """eu — us — ap: eu and ap only meet through us."""
    cluster = Cluster(nursery, net, **kwargs)  # type: ignore[arg-type]
    await cluster.start("us")
    await cluster.start("eu", peers=["us"])
    await cluster.start("ap", peers=["us"])
    await cluster.settle(2)
    return cluster


async def test_regions_see_each_other_through_a_relay(autojump_clock: object) -> None:
    async with trio.open_nursery() as nursery:
        cluster = await line(nursery, SimNetwork(seed=1, latency=0.04))
        ann = cluster.client("eu", "ann")
        bob = cluster.client("ap", "bob")
        ann.join("lobby", {"name": "Ann"})
        bob.join("lobby", {"name": "Bob"})
        await cluster.settle(1)
        assert ann.sees("lobby") == {
            ("ann", ann.session): {"name": "Ann"},
            ("bob", bob.session): {"name": "Bob"},
        }
        assert bob.sees("lobby") == ann.sees("lobby")
        assert bob.view["lobby"]["ann"][ann.session][1] == "eu"
        nursery.cancel_scope.cancel()


async def test_cursor_burst_arrives_as_latest_value(autojump_clock: object) -> None:
    async with trio.open_nursery() as nursery:
        net = SimNetwork(seed=2, latency=0.04)
        cluster = await line(nursery, net)
        ann = cluster.client("eu", "ann")
        bob = cluster.client("ap", "bob")
        ann.join("r")
        bob.join("r")
        await cluster.settle(1)
        before = len(bob.messages)
        for x in range(100):
            ann.update("r", {"x": x})
        await cluster.settle(1)
        xs = [
            entry["meta"]["x"]
            for message in bob.messages[before:]
            if message["type"] == "diff"
            for sessions in message["updates"].values()
            for entry in sessions
        ]
        assert xs[-1] == 99
        assert xs == sorted(xs)
        assert len(xs) < 10  # coalesced across both hops, not 100 frames
        nursery.cancel_scope.cancel()


async def test_crashed_daemon_users_vanish_and_return(autojump_clock: object) -> None:
    async with trio.open_nursery() as nursery:
        net = SimNetwork(seed=3, latency=0.02)
        cluster = await line(nursery, net, down_after=3.0, purge_after=30.0)
        ann = cluster.client("eu", "ann")
        cat = cluster.client("us", "cat")
        ann.join("r")
        cat.join("r")
        await cluster.settle(1)
        assert set(ann.sees("r")) == {("ann", ann.session), ("cat", cat.session)}
        cluster.crash("us")
        await trio.sleep(3.5)
        # eu lost its only link: it must drop us's users within the down period
        assert set(ann.sees("r")) == {("ann", ann.session)}
        await cluster.start("us")
        await cluster.settle(12)  # eu's redial backoff grew while us was down
        # ann is still visible to a new client on the restarted us
        dan = cluster.client("us", "dan")
        dan.join("r")
        await cluster.settle(1)
        assert set(dan.sees("r")) == {("ann", ann.session), ("dan", dan.session)}
        assert set(ann.sees("r")) == {("ann", ann.session), ("dan", dan.session)}
        nursery.cancel_scope.cancel()


async def test_partition_and_heal_converge(autojump_clock: object) -> None:
    async with trio.open_nursery() as nursery:
        net = SimNetwork(seed=4, latency=0.03)
        cluster = Cluster(nursery, net)
        await cluster.start("eu")
        await cluster.start("us", peers=["eu"])
        await cluster.start("ap", peers=["eu", "us"])
        await cluster.settle(2)
        clients = {name: cluster.client(name, f"user-{name}") for name in ("eu", "us", "ap")}
        for client in clients.values():
            client.join("r")
        await cluster.settle(1)
        net.partition(["ap"], ["eu", "us"])
        clients["eu"].update("r", {"during": 1})
        clients["ap"].leave("r")
        await cluster.settle(5)
        assert set(clients["eu"].sees("r")) == {
            ("user-eu", clients["eu"].session),
            ("user-us", clients["us"].session),
        }
        net.heal()
        await cluster.settle(15)
        expected = cluster.visible("eu")
        assert cluster.visible("us") == expected == cluster.visible("ap")
        assert clients["us"].sees("r") == {
            ("user-eu", clients["eu"].session): {"during": 1},
            ("user-us", clients["us"].session): {},
        }
        nursery.cancel_scope.cancel()


async def test_graceful_stop_removes_users_everywhere_at_once(autojump_clock: object) -> None:
    async with trio.open_nursery() as nursery:
        cluster = await line(
            nursery, SimNetwork(seed=5, latency=0.02), down_after=30.0, purge_after=60.0
        )
        ann = cluster.client("eu", "ann")
        bob = cluster.client("ap", "bob")
        ann.join("r")
        bob.join("r")
        await cluster.settle(1)
        await cluster.stop("eu")
        await trio.sleep(0.5)  # far less than down_after: the goodbye did it
        assert set(bob.sees("r")) == {("bob", bob.session)}
        nursery.cancel_scope.cancel()


async def test_one_frame_per_tick_carries_every_region(autojump_clock: object) -> None:
    """Aligned ticks: with nearby peers, a member gets one diff per tick holding the moves of
    all three regions, not one diff per region; and the peers send one gossip message per
    tick, however often relays wake their writers."""
    async with trio.open_nursery() as nursery:
        net = SimNetwork(seed=7, latency=0.001)
        cluster = Cluster(nursery, net, tick_ms=25)
        await cluster.start("eu")
        await cluster.start("us", peers=["eu"])
        await cluster.start("ap", peers=["eu", "us"])
        await cluster.settle(3)
        movers = {name: cluster.client(name, f"u-{name}") for name in ("eu", "us", "ap")}
        for client in movers.values():
            client.join("r")
        await cluster.settle(1)
        watcher = movers["eu"]
        links = cluster.node("eu").gossip.links.values()  # type: ignore[union-attr]
        frames_before = len(watcher.messages)
        sent_before = sum(link.messages_out for link in links)
        ticks = 40
        for step in range(ticks):
            for client in movers.values():
                client.update("r", {"x": step})
            await trio.sleep(0.025)
        await cluster.settle(0.2)
        diffs = [m for m in watcher.messages[frames_before:] if m["type"] == "diff"]
        # Every region's last move arrived...
        assert {
            user: sessions[0]["meta"]["x"] for m in diffs for user, sessions in m["updates"].items()
        } == {"u-us": ticks - 1, "u-ap": ticks - 1, "u-eu": ticks - 1}
        # ...in about one frame per tick (three regions flushed separately would be ~3 per tick).
        assert len(diffs) <= ticks + 2
        sent = sum(link.messages_out for link in links) - sent_before
        assert sent <= 2 * (ticks + 2) + 8  # two links, one gossip per tick, pings and pongs
        nursery.cancel_scope.cancel()


def test_tick_boundaries_are_aligned_on_the_phase_clock() -> None:
    from presenced.config import Config
    from presenced.core.crdt import ReplicaId
    from presenced.server.node import Node

    wall = 1_700_000_000.0105  # 10.5 ms past a 25 ms boundary
    config = Config(tick_ms=25, allow_anonymous=True)
    node = Node(config, ReplicaId("eu", 1), clock=lambda: 7.0, wall_clock=lambda: wall)
    boundary = node.next_boundary(7.0)
    assert abs(boundary - (7.0 + 0.0145)) < 1e-6
    # At a boundary, the next one is a whole tick away (never the same one again).
    node.phase_clock = lambda: 1_700_000_000.025
    assert abs(node.next_boundary(7.0) - 7.025) < 1e-6
