"""Occupancy from outside: a watcher on one daemon of a simulated mesh (virtual time) sees
every region's counts, at most once per tick; and a raw WebSocket client, written from
docs/protocol.md, watches a real daemon's room."""

from __future__ import annotations

import itertools
import json
import math
from typing import Any

import trio
from trio_websocket import open_websocket_url

from presenced.testing.cluster import Cluster, FakeClient
from presenced.testing.simnet import SimNetwork

TICK = 0.025


async def test_a_watcher_counts_every_region_at_most_once_per_tick(
    autojump_clock: object,
) -> None:
    async with trio.open_nursery() as nursery:
        net = SimNetwork(seed=3, latency=0.02)
        cluster = Cluster(nursery, net, tick_ms=25)
        await cluster.start("eu")
        await cluster.start("us", peers=["eu"])
        await cluster.start("ap", peers=["eu", "us"])
        await cluster.settle(3)
        eve = cluster.client("eu", "eve")
        arrivals: list[tuple[float, dict[str, Any]]] = []
        eve.on_message = lambda _, message: arrivals.append((trio.current_time(), message))
        cluster.node("eu").watch(eve, "big", "w1")
        assert arrivals[0][1] == {
            "type": "occupancy",
            "ref": "w1",
            "room": "big",
            "sessions": 0,
            "users": 0,
        }
        members: list[FakeClient] = []
        # Members join and leave in us and ap, several per tick, for 40 ticks: user k has
        # two sessions (two tabs), so users are half the sessions.
        await trio.sleep((TICK / 2 - trio.current_time() % TICK) % TICK)
        for step in range(40):
            for region in ("us", "ap"):
                for tab in range(2):
                    client = cluster.client(region, f"{region}-{step}")
                    client.join("big", {"tab": tab})
                    members.append(client)
            if step % 4 == 3:
                for gone in members[:3]:
                    gone.leave("big")
                del members[:3]
            if step % 5 == 0:
                members[-1].update("big", {"moved": step})  # a move changes no count
            await trio.sleep(TICK)
        await cluster.settle(1)
        expected = (len(members), len({client.user for client in members}))
        counts = [(m["sessions"], m["users"]) for _, m in arrivals if m["type"] == "occupancy"]
        assert counts[-1] == expected and expected[0] > 100
        assert len(counts) > 20  # it changed as it went
        # At most one frame per tick (of the phase clock: virtual time here), and each one
        # says something new.
        ticks = [math.floor(t / TICK + 1e-9) for t, m in arrivals[1:] if m["type"] == "occupancy"]
        assert len(ticks) == len(set(ticks))
        assert all(a != b for a, b in itertools.pairwise(counts[1:]))
        # The watcher is nobody's presence: no region sees it.
        for name in ("eu", "us", "ap"):
            assert all(user != "eve" for _, user, _ in cluster.visible(name))
        cluster.node("eu").leave(eve, "big")
        before = len(arrivals)
        members[0].leave("big")
        await cluster.settle(1)
        assert len(arrivals) == before  # leave ended the watch
        nursery.cancel_scope.cancel()


async def test_a_raw_client_watches_a_rooms_counts(start_daemon: Any) -> None:
    """Written from docs/protocol.md: join with "view": "count" gets an occupancy frame
    with the ref, then one when a member joins or leaves; the member never sees the
    watcher; leave ends it with left."""
    running = await start_daemon()

    async def send(ws: Any, message: dict[str, Any]) -> None:
        await ws.send_message(json.dumps(message))

    async def recv(ws: Any) -> dict[str, Any]:
        with trio.fail_after(5):
            message = json.loads(await ws.get_message())
        assert isinstance(message, dict)
        return message

    async with (
        open_websocket_url(running.url, subprotocols=["presenced.v1"]) as watcher,
        open_websocket_url(running.url) as member,
    ):
        await send(watcher, {"type": "hello", "user": "eve", "ref": 1})
        assert (await recv(watcher))["type"] == "welcome"
        await send(member, {"type": "hello", "user": "ann", "ref": 1})
        assert (await recv(member))["type"] == "welcome"
        await send(watcher, {"type": "join", "room": "hall", "view": "count", "ref": 2})
        assert await recv(watcher) == {
            "type": "occupancy",
            "ref": 2,
            "room": "hall",
            "sessions": 0,
            "users": 0,
        }
        await send(member, {"type": "join", "room": "hall", "meta": {"n": 1}, "ref": 2})
        state = await recv(member)
        assert state["type"] == "state" and state["presences"] == {}
        one = {"type": "occupancy", "room": "hall", "sessions": 1, "users": 1}
        assert await recv(watcher) == one
        joined = await recv(member)  # its own join: the watcher is not in it
        assert joined["type"] == "diff" and list(joined["joins"]) == ["ann"]
        # A watcher is not a member: it may not update or broadcast.
        await send(watcher, {"type": "update", "room": "hall", "meta": {"x": 1}, "ref": 3})
        assert (await recv(watcher))["code"] == "not_joined"
        await send(member, {"type": "leave", "room": "hall", "ref": 3})
        assert (await recv(member))["type"] == "left"
        none = {"type": "occupancy", "room": "hall", "sessions": 0, "users": 0}
        assert await recv(watcher) == none
        await send(watcher, {"type": "leave", "room": "hall", "ref": 4})
        assert await recv(watcher) == {"type": "left", "ref": 4, "room": "hall"}
        await send(watcher, {"type": "join", "room": "hall", "view": "count", "meta": {}, "ref": 5})
        assert (await recv(watcher))["code"] == "bad_request"
