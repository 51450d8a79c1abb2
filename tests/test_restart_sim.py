"""A daemon restarts: how soon everyone sees the truth again, and what a fetch says meanwhile.

Simulated clusters in virtual time (real daemons on the in-memory network). The restarted
daemon only listens (the others dial it), which is the slow case: it cannot call anyone,
so it is back exactly when its dialers next try.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio

from presenced.core.answers import FETCH_ANSWER_S
from presenced.testing.cluster import Cluster, FakeClient
from presenced.testing.simnet import SimNetwork

#: The promise (docs/operations.md, "Restarts"): every client view is right again within
#: this long after a restarted daemon is ready.
RECONVERGE_S = 2.0


async def listener_mesh(nursery: trio.Nursery, seed: int) -> Cluster:
    """Full mesh a, b, c where ``a`` dials nobody: b dials a, c dials a and b."""
    net = SimNetwork(seed=seed, latency=0.03, jitter=0.01)
    cluster = Cluster(nursery, net)
    await cluster.start("a")
    await cluster.start("b", peers=["a"])
    await cluster.start("c", peers=["a", "b"])
    await cluster.settle(3)
    return cluster


def count_dials(cluster: Cluster, name: str) -> list[float]:
    """Record the virtual time of every dial daemon ``name`` makes from now on."""
    peers = cluster.node(name).gossip
    assert peers is not None
    transport: Any = peers.transport
    dial = transport.dial
    times: list[float] = []

    async def counted(url: str) -> Any:
        times.append(trio.current_time())
        return await dial(url)

    transport.dial = counted
    return times


async def until(condition: Callable[[], bool], timeout_s: float, step_s: float = 0.005) -> float:
    """Virtual seconds until ``condition()`` holds (checked every ``step_s``); inf if never."""
    start = trio.current_time()
    while not condition():
        if trio.current_time() - start > timeout_s:
            return float("inf")
        await trio.sleep(step_s)
    return trio.current_time() - start


def views_agree(clients: list[FakeClient], room: str) -> Callable[[], bool]:
    expected = {(client.user, client.session) for client in clients}
    return lambda: all(set(client.sees(room)) == expected for client in clients)


@pytest.mark.parametrize("seed", range(1, 7))
async def test_views_reconverge_soon_after_a_listener_restarts(
    autojump_clock: object, seed: int
) -> None:
    async with trio.open_nursery() as nursery:
        cluster = await listener_mesh(nursery, seed)
        clients = {name: cluster.client(name, f"u-{name}") for name in "abc"}
        for client in clients.values():
            client.join("r")
        await cluster.settle(1)
        assert views_agree(list(clients.values()), "r")()
        dials = {name: count_dials(cluster, name) for name in "bc"}
        cluster.crash("a")
        await trio.sleep(12)  # long enough for any backoff to have grown to its cap
        down_s = 12.0
        await cluster.start("a")  # ready: listening for its peers
        clients["a"] = cluster.client("a", "u-a")  # its user reconnects at once
        clients["a"].join("r")
        took = await until(views_agree(list(clients.values()), "r"), timeout_s=30)
        assert took < RECONVERGE_S, f"seed {seed}: views converged {took:.2f} s after ready"
        # No dial storm while a was down: each dialer tried about once a second (the cap),
        # never more than twice a second.
        for name, times in dials.items():
            during = [t for t in times if t < times[0] + down_s]
            assert len(during) <= 2 * down_s + 2, f"{name} dialed {len(during)} times"
        nursery.cancel_scope.cancel()


async def test_a_dialer_hurries_when_gossip_says_its_peer_is_back(autojump_clock: object) -> None:
    """c hears of a's new incarnation from b (who reached it first) and dials a at once,
    not at the end of its own backoff wait."""
    async with trio.open_nursery() as nursery:
        cluster = await listener_mesh(nursery, seed=3)
        cluster.crash("a")
        await trio.sleep(12)
        c_dials = count_dials(cluster, "c")
        await cluster.start("a")
        c_peers = cluster.node("c").gossip
        b_peers = cluster.node("b").gossip
        assert c_peers is not None and b_peers is not None
        # Whoever links first, the other links within a few link delays of hearing about it.
        first = await until(lambda: "a" in b_peers.links or "a" in c_peers.links, 5)
        both = await until(lambda: "a" in b_peers.links and "a" in c_peers.links, 5)
        assert first < 1.1 and both < 0.5, (first, both)
        assert c_dials  # (c's link to a is its own dial: a dials nobody)
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------- fetch after restart


Start = Callable[[Cluster], Awaitable[None]]


async def _restart_listener(cluster: Cluster) -> None:
    await cluster.start("ap")  # dials nobody: waits for us to redial it


async def _restart_dialer(cluster: Cluster) -> None:
    await cluster.start("ap", peers=["us"])


@pytest.mark.parametrize("restart", [_restart_listener, _restart_dialer])
async def test_a_fetch_right_after_a_restart_is_never_a_false_empty(
    autojump_clock: object, restart: Start
) -> None:
    """50 reliable messages wait at eu for bob; bob's daemon ap restarts and bob fetches as
    soon as it is ready, before ap has any link: he gets all 50, not "nothing"."""
    async with trio.open_nursery() as nursery:
        net = SimNetwork(seed=21, latency=0.04)
        cluster = Cluster(nursery, net)
        await cluster.start("ap")
        await cluster.start("us", peers=["ap"])
        await cluster.start("eu", peers=["us"])
        await cluster.settle(3)
        ann = cluster.client("eu", "ann")
        for i in range(50):
            ann.send_to("bob", {"text": f"m{i}"}, mode="reliable")
        await cluster.settle(1)
        assert len(ann.received("stored")) == 50
        cluster.crash("ap")
        await trio.sleep(8)
        await restart(cluster)
        bob = cluster.client("ap", "bob")  # in no room: nothing is pushed, only fetched
        ref = bob.fetch()
        took = await until(lambda: bool(bob.received("fetched") or bob.received("error")), 5)
        assert not bob.received("error")
        [done] = bob.received("fetched", ref=ref)
        assert done["count"] == 50, f"a false empty: {done}"
        assert (done["remaining"], done["complete"]) == (0, True)
        assert [m["data"]["text"] for m in bob.received("message")] == [f"m{i}" for i in range(50)]
        assert took <= FETCH_ANSWER_S
        nursery.cancel_scope.cancel()


async def test_a_fetch_says_so_when_a_daemon_that_may_hold_messages_is_down(
    autojump_clock: object,
) -> None:
    """eu holds bob's messages and is cut off: a fetch at ap cannot ask it, so it answers
    ``unavailable`` (nothing came, and the answer is not complete), never a false empty."""
    async with trio.open_nursery() as nursery:
        net = SimNetwork(seed=22, latency=0.02)
        cluster = Cluster(nursery, net)
        await cluster.start("us")
        await cluster.start("eu", peers=["us"])
        await cluster.start("ap", peers=["us"])
        await cluster.settle(3)
        ann = cluster.client("eu", "ann")
        for i in range(5):
            ann.send_to("bob", {"text": f"m{i}"}, mode="reliable")
        await cluster.settle(1)
        net.partition(["eu"], ["us", "ap"])
        await cluster.settle(5)  # eu is down everywhere (down_after 3 s), not yet purged
        bob = cluster.client("ap", "bob")
        ref = bob.fetch()
        await cluster.settle(3.5)
        assert not bob.received("fetched")
        [error] = bob.received("error", ref=ref)
        assert error["code"] == "unavailable" and error["retry_after_ms"] > 0
        # Messages of its own daemon still come, with the answer saying it is incomplete.
        cat = cluster.client("ap", "cat")
        cat.send_to("bob", {"text": "local"}, mode="reliable")
        await cluster.settle(0.1)
        ref = bob.fetch()
        await cluster.settle(3.5)
        [done] = bob.received("fetched", ref=ref)
        assert done["count"] == 1 and done["complete"] is False and done["retry_after_ms"] > 0
        net.heal()
        await cluster.settle(5)  # eu is back (its redial): now every daemon can be asked
        ref = bob.fetch()
        await cluster.settle(3.5)
        [done] = bob.received("fetched", ref=ref)
        assert (done["count"], done["remaining"], done["complete"]) == (5, 0, True)
        nursery.cancel_scope.cancel()
