"""The server API across three regions on the simulated network (virtual time): a publish
reaches every region's members, a server message reaches a user in another region, reads
cover the whole mesh, and a disconnect closes and refuses a user everywhere."""

from __future__ import annotations

import json
from typing import Any

import trio

from presenced.core.kicks import CLOSE_DISCONNECTED, CLOSE_REFUSED
from presenced.server.api import Api
from presenced.testing.cluster import Cluster, FakeClient
from presenced.testing.simnet import SimNetwork

KEY = b"k" * 40
AUTH = {"authorization": "Bearer " + KEY.decode()}


async def mesh(nursery: trio.Nursery) -> Cluster:
    """eu — us — ap in a line (eu and ap meet only through us), 40 ms a link."""
    cluster = Cluster(nursery, SimNetwork(seed=5, latency=0.04), tick_ms=25)
    await cluster.start("us")
    await cluster.start("eu", peers=["us"])
    await cluster.start("ap", peers=["us"])
    await cluster.settle(3)
    return cluster


async def ask(cluster: Cluster, name: str, call: str, body: dict[str, Any]) -> Any:
    api = Api(cluster.daemons[name].daemon, KEY)
    status, document, _ = await api.answer(
        "POST", f"/api/v1/{call}", AUTH, json.dumps(body).encode()
    )
    assert status == 200, document
    return document


def members(cluster: Cluster) -> dict[str, FakeClient]:
    clients = {name: cluster.client(name, f"u-{name}") for name in ("eu", "us", "ap")}
    for client in clients.values():
        client.join("r", {"at": client.node.region})
    return clients


async def test_publish_reaches_every_region_from_the_server(autojump_clock: object) -> None:
    async with trio.open_nursery() as nursery:
        cluster = await mesh(nursery)
        clients = members(cluster)
        await cluster.settle(1)
        answer = await ask(cluster, "eu", "publish", {"room": "r", "event": "e", "data": 7})
        assert answer["members_here"] == 1
        await cluster.settle(0.2)  # two 40 ms hops to ap
        for client in clients.values():
            [frame] = client.received("broadcast")
            assert frame["from"] == {"server": True, "region": "eu"} and frame["data"] == 7
        nursery.cancel_scope.cancel()


async def test_reads_cover_the_whole_mesh(autojump_clock: object) -> None:
    async with trio.open_nursery() as nursery:
        cluster = await mesh(nursery)
        members(cluster)
        cluster.client("ap", "u-eu").join("r")  # u-eu has a second session, in ap
        await cluster.settle(1)
        for name in ("eu", "us", "ap"):
            occupancy = await ask(cluster, name, "occupancy", {"room": "r"})
            assert occupancy == {
                "room": "r",
                "sessions": 4,
                "users": 3,
                "regions": {"ap": 2, "eu": 1, "us": 1},
            }
            presence = await ask(cluster, name, "presence", {"room": "r"})
            assert sorted(e["region"] for e in presence["presences"]["u-eu"]) == ["ap", "eu"]
            rooms = await ask(cluster, name, "rooms", {})
            assert rooms["rooms"] == [{"room": "r", "sessions": 4, "users": 3}]
        nursery.cancel_scope.cancel()


async def test_server_message_to_another_region(autojump_clock: object) -> None:
    async with trio.open_nursery() as nursery:
        cluster = await mesh(nursery)
        clients = members(cluster)
        await cluster.settle(1)
        answer = await ask(cluster, "eu", "send", {"to": ["u-ap", "ghost"], "data": "hi"})
        assert answer["recipients"] == {
            "u-ap": {"status": "delivered", "regions": ["ap"]},
            "ghost": {"status": "not_online"},
        }
        [message] = clients["ap"].received("message")
        assert message["server"] is True and message["region"] == "eu"
        answer = await ask(cluster, "eu", "send", {"to": "u-ap", "data": 1, "mode": "reliable"})
        assert answer["recipients"] == {"u-ap": {"status": "delivered", "regions": ["ap"]}}
        nursery.cancel_scope.cancel()


async def test_disconnect_everywhere_and_refuse(autojump_clock: object) -> None:
    async with trio.open_nursery() as nursery:
        cluster = await mesh(nursery)
        clients = members(cluster)
        twin = cluster.client("ap", "u-eu")  # the same user in another region
        twin.join("r")
        await cluster.settle(1)
        answer = await ask(
            cluster, "us", "disconnect", {"user": "u-eu", "reason": "bye", "refuse_s": 60}
        )
        assert answer["closed_here"] == 0  # u-eu has no session on us itself
        await cluster.settle(0.5)
        assert clients["eu"].closed == (CLOSE_DISCONNECTED, "bye")
        assert twin.closed == (CLOSE_DISCONNECTED, "bye")
        assert clients["ap"].closed is None and clients["us"].closed is None
        occupancy = await ask(cluster, "us", "occupancy", {"room": "r"})
        assert occupancy["users"] == 2 and occupancy["sessions"] == 2
        # Refused on every daemon for refuse_s, then welcome again.
        for name in ("eu", "ap"):
            again = cluster.client(name, "u-eu")
            again.hello()
            assert again.closed == (CLOSE_REFUSED, "refused by the server")
            assert again.received("error")[-1]["code"] == "refused"
        await cluster.settle(60)
        later = cluster.client("ap", "u-eu")
        later.hello()
        assert later.closed is None
        nursery.cancel_scope.cancel()
