"""Resuming a session on another daemon, of the same or another region.

Simulated clusters (trio MockClock) run the production daemons; every frame a watcher gets
is checked: the resumed session never leaves nor joins again.
"""

from __future__ import annotations

from typing import Any

import trio

from presenced.testing.cluster import Cluster, FakeClient
from presenced.testing.simnet import SimNetwork

GRACE_S = 10.0


async def mesh(nursery: trio.Nursery, **kwargs: Any) -> Cluster:
    """eu, us and ap, each linked to the other two."""
    cluster = Cluster(nursery, SimNetwork(seed=5, latency=0.04), **kwargs)
    await cluster.start("eu")
    await cluster.start("us", peers=["eu"])
    await cluster.start("ap", peers=["eu", "us"])
    await cluster.settle(3)
    return cluster


def watch(client: FakeClient, session: str, seen: list[str]) -> None:
    """Record every join or leave of ``session`` in any frame ``client`` gets."""

    def check(_: FakeClient, message: dict[str, Any]) -> None:
        if message["type"] == "diff":
            for kind in ("joins", "leaves"):
                for entries in message[kind].values():
                    seen.extend(kind for entry in entries if entry["session"] == session)

    client.on_message = check


async def moved_session(
    cluster: Cluster,
) -> tuple[FakeClient, dict[str, Any], list[FakeClient], list[str]]:
    """ann on eu in lobby with two rooms; watchers on us and ap; ann's connection drops."""
    ann = cluster.client("eu", "ann")
    welcome = ann.hello()
    ann.join("lobby", {"name": "Ann"})
    ann.join("side", {"x": 1})
    watchers = [cluster.client(name, f"w-{name}") for name in ("us", "ap")]
    for watcher in watchers:
        watcher.join("lobby")
    await cluster.settle(1)
    for watcher in watchers:
        assert watcher.sees("lobby")[("ann", welcome["session"])] == {"name": "Ann"}
    seen: list[str] = []
    for watcher in watchers:
        watch(watcher, welcome["session"], seen)
    ann.drop()
    await cluster.settle(1)
    return ann, welcome, watchers, seen


async def test_a_session_resumes_on_another_region_and_nobody_sees_it_leave(
    autojump_clock: object,
) -> None:
    async with trio.open_nursery() as nursery:
        cluster = await mesh(nursery, resume_grace_s=GRACE_S)
        _, welcome, watchers, seen = await moved_session(cluster)
        session = welcome["session"]

        again = cluster.client("us", "ann")
        back = again.hello(resume=welcome["resume"])
        assert back["resumed"] is True and back["session"] == session
        assert list(again.rooms) == ["lobby", "side"]
        assert again.sees("lobby")[("ann", session)] == {"name": "Ann"}
        assert again.sees("side")[("ann", session)] == {"x": 1}
        await cluster.settle(1)
        for watcher in watchers:
            assert watcher.view["lobby"]["ann"][session] == ({"name": "Ann"}, "us")

        # It is a member on us: it updates from there, and everyone sees the update.
        again.update("lobby", {"name": "Ann", "x": 7})
        await cluster.settle(1)
        for watcher in watchers:
            assert watcher.sees("lobby")[("ann", session)] == {"name": "Ann", "x": 7}

        # eu's grace runs out: its copy goes, the session stays everywhere.
        await cluster.settle(GRACE_S + 2)
        assert not cluster.node("eu").sessions.detached
        assert cluster.node("eu").metrics.sessions_expired == 1
        for name in ("eu", "us", "ap"):
            assert cluster.visible(name)[("lobby", "ann", session)] == {"name": "Ann", "x": 7}
        for watcher in watchers:
            assert watcher.sees("lobby")[("ann", session)] == {"name": "Ann", "x": 7}
        assert seen == []
        assert cluster.node("us").metrics.sessions_resumed_elsewhere == 1

        # A leave on us is a leave everywhere (and the only one).
        again.leave("lobby")
        await cluster.settle(1)
        assert seen == ["leaves", "leaves"]
        for name in ("eu", "us", "ap"):
            assert ("lobby", "ann", session) not in cluster.visible(name)
        nursery.cancel_scope.cancel()


async def test_a_leave_after_a_resume_elsewhere_does_not_wait_for_the_old_grace(
    autojump_clock: object,
) -> None:
    async with trio.open_nursery() as nursery:
        cluster = await mesh(nursery, resume_grace_s=GRACE_S)
        _, welcome, _, seen = await moved_session(cluster)
        session = welcome["session"]
        again = cluster.client("ap", "ann")
        assert again.hello(resume=welcome["resume"])["resumed"] is True
        await cluster.settle(1)
        again.leave("lobby")
        await cluster.settle(1)  # eu still holds its detached copy: it follows the leave
        for name in ("eu", "us", "ap"):
            assert ("lobby", "ann", session) not in cluster.visible(name)
            assert ("side", "ann", session) in cluster.visible(name)
        assert seen.count("joins") == 0 and seen.count("leaves") == 2
        assert cluster.node("eu").sessions.detached[session].rooms == ["side"]
        nursery.cancel_scope.cancel()


async def test_a_resume_elsewhere_after_the_grace_is_a_new_session(
    autojump_clock: object,
) -> None:
    async with trio.open_nursery() as nursery:
        cluster = await mesh(nursery, resume_grace_s=GRACE_S)
        _, welcome, _, seen = await moved_session(cluster)
        await cluster.settle(GRACE_S + 2)
        assert seen == ["leaves", "leaves"]
        again = cluster.client("us", "ann")
        back = again.hello(resume=welcome["resume"])
        assert back["resumed"] is False and back["session"] != welcome["session"]
        assert again.rooms == {}
        nursery.cancel_scope.cancel()


async def test_with_a_token_secret_the_token_is_checked_everywhere(
    autojump_clock: object,
) -> None:
    async with trio.open_nursery() as nursery:
        cluster = await mesh(nursery, resume_grace_s=GRACE_S, token_secret=b"s" * 32)
        _, welcome, _, seen = await moved_session(cluster)
        session = welcome["session"]
        forged = cluster.client("us", "ann")
        assert forged.hello(resume=f"{session}.AAAAAAAAAAAAAAAAAAAAAA")["resumed"] is False
        other = cluster.client("us", "mallory")
        assert other.hello(resume=welcome["resume"])["resumed"] is False
        again = cluster.client("us", "ann")
        assert again.hello(resume=welcome["resume"])["resumed"] is True
        await cluster.settle(GRACE_S + 2)
        assert seen == []
        nursery.cancel_scope.cancel()


async def test_a_resume_elsewhere_takes_over_a_connection_the_old_daemon_thinks_alive(
    autojump_clock: object,
) -> None:
    """The client saw its link die first and resumed on us; eu closes its stale connection
    when it hears of the resume (with a token secret, the resume was checked) and keeps
    the session for the grace; nobody sees a leave or a join."""
    async with trio.open_nursery() as nursery:
        cluster = await mesh(nursery, resume_grace_s=GRACE_S, token_secret=b"s" * 32)
        ann = cluster.client("eu", "ann")
        welcome = ann.hello()
        ann.join("lobby", {"name": "Ann"})
        watcher = cluster.client("ap", "w")
        watcher.join("lobby")
        await cluster.settle(1)
        seen: list[str] = []
        watch(watcher, welcome["session"], seen)
        again = cluster.client("us", "ann")
        assert again.hello(resume=welcome["resume"])["resumed"] is True
        await cluster.settle(1)
        assert ann.closed == (1001, "session resumed on another daemon")
        assert welcome["session"] in cluster.node("eu").sessions.detached
        await cluster.settle(GRACE_S + 2)
        assert watcher.sees("lobby")[("ann", welcome["session"])] == {"name": "Ann"}
        assert seen == []
        nursery.cancel_scope.cancel()
