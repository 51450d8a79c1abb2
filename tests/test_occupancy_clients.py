"""The Python client's count-only watch (presenced/client.py): against the fake daemon of
test_client_resume (what it sends, and watching again after a reconnect), and against a
real daemon."""

from __future__ import annotations

from typing import Any

import trio
from test_client_resume import FakeDaemon, client, daemon, until

from presenced.client import connect

__all__ = ["daemon"]  # (the fixture, imported for this module's tests)


def occupancy(room: str, sessions: int, users: int, ref: int | None = None) -> dict[str, Any]:
    frame = {"type": "occupancy", "room": room, "sessions": sessions, "users": users}
    return frame if ref is None else {**frame, "ref": ref}


async def test_watch_sends_a_count_only_join_and_watches_again_after_a_reconnect(
    daemon: FakeDaemon,
) -> None:
    daemon.plan = [("S1", "R1", False, []), ("S1", "R2", True, [])]
    async with client(daemon.url) as ann:
        first = await daemon.connection(0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ann.watch, "hall")
            join = await first.expect("join")
            assert {k: v for k, v in join.items() if k != "ref"} == {
                "type": "join",
                "room": "hall",
                "view": "count",
            }
            await first.send(occupancy("hall", 3, 2, join["ref"]))
        counts = ann.occupancy("hall")
        assert counts == {"sessions": 3, "users": 2}
        await first.send(occupancy("hall", 4, 3))
        await until(lambda: counts == {"sessions": 4, "users": 3})  # the same live dict
        # A watch ends with its connection, resumed or not: the client watches again.
        await first.drop()
        second = await daemon.connection(1)
        again = await second.expect("join")
        assert (again["room"], again["view"]) == ("hall", "count")
        await second.send(occupancy("hall", 5, 3))
        await until(lambda: ann.occupancy("hall") == {"sessions": 5, "users": 3})
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ann.leave, "hall")
            leave = await second.expect("leave")
            await second.send({"type": "left", "ref": leave["ref"], "room": "hall"})
        assert ann.occupancy("hall") == {} and ann.counts == {}


async def test_watch_on_a_real_daemon(start_daemon: Any) -> None:
    running = await start_daemon()
    async with connect(running.url, user="eve") as eve, connect(running.url, user="ann") as ann:
        counts = await eve.watch("hall")
        assert counts == {"sessions": 0, "users": 0}
        await ann.join("hall", {"n": 1})
        await until(lambda: counts == {"sessions": 1, "users": 1})
        await until(lambda: set(ann.presences("hall")) == {"ann"})  # eve is no presence
        await eve.leave("hall")
        await ann.leave("hall")
        assert eve.counts == {}
