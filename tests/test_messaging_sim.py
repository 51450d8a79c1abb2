"""Direct messages across simulated clusters (line, ring, star) in virtual time.

Real daemons (routing, message store, peer links) on the in-memory network; clients are
attached to nodes directly and record every frame they are sent.
"""

from __future__ import annotations

from pathlib import Path

import trio
from store_helpers import deny_commit

from presenced.core import peer_wire as wire
from presenced.core.answers import FAST_ANSWER_S
from presenced.server.messaging import COMMIT_INTERVAL_S, HOP_LIMIT
from presenced.testing.cluster import Cluster, FakeClient
from presenced.testing.simnet import SimNetwork


async def line(nursery: trio.Nursery, net: SimNetwork, **kwargs: object) -> Cluster:
    """eu — us — ap: eu and ap only meet through us."""
    cluster = Cluster(nursery, net, **kwargs)  # type: ignore[arg-type]
    await cluster.start("us")
    await cluster.start("eu", peers=["us"])
    await cluster.start("ap", peers=["us"])
    await cluster.settle(3)
    return cluster


async def ring(nursery: trio.Nursery, net: SimNetwork, **kwargs: object) -> Cluster:
    """a — b — c — d — a."""
    cluster = Cluster(nursery, net, **kwargs)  # type: ignore[arg-type]
    await cluster.start("a")
    await cluster.start("b", peers=["a"])
    await cluster.start("c", peers=["b"])
    await cluster.start("d", peers=["c", "a"])
    await cluster.settle(3)
    return cluster


async def star(nursery: trio.Nursery, net: SimNetwork, **kwargs: object) -> Cluster:
    """hub with leaves x, y, z."""
    cluster = Cluster(nursery, net, **kwargs)  # type: ignore[arg-type]
    await cluster.start("hub")
    for leaf in ("x", "y", "z"):
        await cluster.start(leaf, peers=["hub"])
    await cluster.settle(3)
    return cluster


def texts(client: FakeClient) -> list[str]:
    return [m["data"]["text"] for m in client.received("message")]


async def committed() -> None:
    """Let the daemons' group commits run (``stored`` waits for the commit)."""
    await trio.sleep(COMMIT_INTERVAL_S + 0.001)


async def test_fast_message_two_hops_with_delivered_and_read(autojump_clock: object) -> None:
    async with trio.open_nursery() as nursery:
        cluster = await line(nursery, SimNetwork(seed=1, latency=0.04))
        ann = cluster.client("eu", "ann")
        bob = cluster.client("ap", "bob")
        bob.join("lobby")
        await cluster.settle(1)
        assert cluster.node("eu").gossip.routes.path("ap") == ("eu", "us", "ap")  # type: ignore[union-attr]
        sent = trio.current_time()
        ref = ann.send_to("bob", {"text": "hi"})
        await trio.sleep(0.5)
        [message] = bob.received("message")
        assert message["from"] == "ann" and message["region"] == "eu"
        assert message["mode"] == "fast" and "to" not in message
        [delivered] = ann.received("delivered", ref=ref)
        assert delivered == {
            "type": "delivered",
            "ref": ref,
            "id": message["id"],
            "to": "bob",
            "region": "ap",
        }
        bob.mark_read(message["id"])
        bob.mark_read(message["id"])  # a second read is not a second receipt
        await trio.sleep(0.5)
        assert ann.received("read", ref=ref, by="bob", id=message["id"])
        assert len(ann.received("read")) == 1
        # Two link delays each way at 40 ms: the message itself took about 80 ms.
        assert trio.current_time() - sent < 2
        nursery.cancel_scope.cancel()


async def test_fast_message_to_nobody_is_refused_at_once(autojump_clock: object) -> None:
    async with trio.open_nursery() as nursery:
        cluster = await line(nursery, SimNetwork(seed=2, latency=0.04))
        ann = cluster.client("eu", "ann")
        ref = ann.send_to("ghost", {"text": "anyone?"})
        [error] = ann.received("error", ref=ref)
        assert error["code"] == "not_online" and error["to"] == "ghost"
        nursery.cancel_scope.cancel()


async def test_group_message_reaches_every_session_everywhere(autojump_clock: object) -> None:
    async with trio.open_nursery() as nursery:
        cluster = await star(nursery, SimNetwork(seed=3, latency=0.02))
        ann = cluster.client("x", "ann")
        bob_phone = cluster.client("y", "bob")
        bob_laptop = cluster.client("z", "bob")
        cat = cluster.client("hub", "cat")
        for client in (bob_phone, bob_laptop, cat):
            client.join("r")
        await cluster.settle(1)
        ref = ann.send_to(["bob", "cat"], {"text": "standup"})
        await trio.sleep(0.5)
        for client in (bob_phone, bob_laptop, cat):
            [message] = client.received("message")
            assert message["to"] == ["bob", "cat"]
        confirmations = {(m["to"], m["region"]) for m in ann.received("delivered", ref=ref)}
        assert confirmations == {("bob", "y"), ("bob", "z"), ("cat", "hub")}
        nursery.cancel_scope.cancel()


async def test_reliable_message_waits_for_an_offline_recipient(autojump_clock: object) -> None:
    async with trio.open_nursery() as nursery:
        cluster = await line(nursery, SimNetwork(seed=4, latency=0.04))
        ann = cluster.client("eu", "ann")
        refs = [ann.send_to("bob", {"text": f"m{i}"}, mode="reliable") for i in range(20)]
        await committed()
        assert [m["ref"] for m in ann.received("stored")] == refs
        assert not ann.received("error")
        await cluster.settle(5)
        bob = cluster.client("ap", "bob")  # comes online in another region
        bob.join("lobby")
        await cluster.settle(3)
        assert texts(bob) == [f"m{i}" for i in range(20)]
        assert {m["ref"] for m in ann.received("delivered")} == set(refs)
        assert cluster.node("eu").messenger.store.pending_total() == 0  # type: ignore[union-attr]
        nursery.cancel_scope.cancel()


async def test_route_fails_over_when_a_link_breaks(autojump_clock: object) -> None:
    async with trio.open_nursery() as nursery:
        net = SimNetwork(seed=5, latency=0.02)
        cluster = await ring(nursery, net)
        ann = cluster.client("a", "ann")
        bob = cluster.client("b", "bob")
        bob.join("r")
        await cluster.settle(1)
        routes = cluster.node("a").gossip.routes  # type: ignore[union-attr]
        assert routes.path("b") == ("a", "b")
        net.partition(["a"], ["b"])  # only the a—b link: a still reaches d, c
        ann.send_to("bob", {"text": "during"}, mode="reliable")
        await cluster.settle(4)
        assert routes.path("b") == ("a", "d", "c", "b")
        ann.send_to("bob", {"text": "after"})
        await cluster.settle(1)
        assert texts(bob) == ["during", "after"]
        nursery.cancel_scope.cancel()


async def test_partitioned_recipient_is_unreachable_for_fast_messages(
    autojump_clock: object,
) -> None:
    async with trio.open_nursery() as nursery:
        net = SimNetwork(seed=6, latency=0.02)
        cluster = await line(nursery, net, down_after_s=30.0, purge_after_s=60.0)
        ann = cluster.client("eu", "ann")
        bob = cluster.client("ap", "bob")
        bob.join("r")
        await cluster.settle(1)
        net.partition(["eu", "us"], ["ap"])
        await cluster.settle(4)  # bob still looks present (down_after 30 s), but no route
        ref = ann.send_to("bob", {"text": "hello?"})
        await trio.sleep(0.5)
        [error] = ann.received("error", ref=ref)
        assert error["code"] == "unreachable"
        nursery.cancel_scope.cancel()


async def test_hop_limit_is_an_error_back_to_the_sender(autojump_clock: object) -> None:
    async with trio.open_nursery() as nursery:
        cluster = await line(nursery, SimNetwork(seed=7, latency=0.02))
        ann = cluster.client("eu", "ann")
        bob = cluster.client("ap", "bob")
        bob.join("r")
        await cluster.settle(1)
        us = cluster.node("us").messenger
        assert us is not None
        # A copy that arrives at us with one hop left cannot go on to ap.
        us.on_routed(
            wire.Direct("eu.x.1", "eu", "ap", 1, "ann", "s", "eu", "bob", (), {}, False), "eu"
        )
        # A copy arriving twice over different links is a loop.
        looping = wire.Direct(
            "eu.x.2", "eu", "ap", HOP_LIMIT, "ann", "s", "eu", "bob", (), 1, False
        )
        us.on_routed(looping, "eu")
        us.on_routed(looping, "ap")
        await trio.sleep(0.5)
        codes = [(m["id"], m["code"]) for m in ann.received("error")]
        assert ("eu.x.1", "hop_limit") in codes and ("eu.x.2", "hop_limit") in codes
        assert len(bob.received("message")) == 1  # the looping one, once
        nursery.cancel_scope.cancel()


async def test_origin_crash_between_stored_and_delivery_loses_nothing(
    autojump_clock: object, tmp_path: Path
) -> None:
    async with trio.open_nursery() as nursery:
        net = SimNetwork(seed=8, latency=0.03)
        cluster = await line(nursery, net, data_root=tmp_path)
        ann = cluster.client("eu", "ann")
        for i in range(5):
            ann.send_to("bob", {"text": f"m{i}"}, mode="reliable")
        await committed()
        assert len(ann.received("stored")) == 5
        cluster.crash("eu")
        await cluster.settle(1)
        await cluster.start("eu", peers=["us"])
        bob = cluster.client("ap", "bob")
        bob.join("r")
        await cluster.settle(5)
        assert texts(bob) == [f"m{i}" for i in range(5)]
        nursery.cancel_scope.cancel()


async def test_relay_and_recipient_crashes_neither_lose_nor_double(
    autojump_clock: object, tmp_path: Path
) -> None:
    async with trio.open_nursery() as nursery:
        net = SimNetwork(seed=9, latency=0.03)
        cluster = await line(nursery, net, data_root=tmp_path)
        ann = cluster.client("eu", "ann")
        bob = cluster.client("ap", "bob")
        bob.join("r")
        await cluster.settle(1)
        for i in range(10):
            ann.send_to("bob", {"text": f"a{i}"}, mode="reliable")
        await trio.sleep(0.05)  # some are on the wire when the relay dies
        cluster.crash("us")
        for i in range(10):
            ann.send_to("bob", {"text": f"b{i}"}, mode="reliable")
        await cluster.settle(2)
        await cluster.start("us")
        await cluster.settle(6)
        expected = [f"a{i}" for i in range(10)] + [f"b{i}" for i in range(10)]
        assert texts(bob) == expected
        # The recipient's daemon crashes after showing them; a retransmission of anything
        # it confirmed late is not shown again by the restarted daemon.
        cluster.crash("ap")
        await cluster.settle(1)
        await cluster.start("ap", peers=["us"])
        bob2 = cluster.client("ap", "bob")
        bob2.join("r")
        for i in range(3):
            ann.send_to("bob", {"text": f"c{i}"}, mode="reliable")
        await cluster.settle(6)
        assert texts(bob2) == [f"c{i}" for i in range(3)]
        assert cluster.node("eu").messenger.store.pending_total() == 0  # type: ignore[union-attr]
        nursery.cancel_scope.cancel()


async def test_fetch_pulls_pending_messages_without_joining_a_room(
    autojump_clock: object,
) -> None:
    async with trio.open_nursery() as nursery:
        cluster = await line(nursery, SimNetwork(seed=10, latency=0.03))
        ann = cluster.client("eu", "ann")
        cat = cluster.client("us", "cat")
        for i in range(3):
            ann.send_to("bob", {"text": f"ann{i}"}, mode="reliable")
        cat.send_to("bob", {"text": "cat0"}, mode="reliable")
        await cluster.settle(1)
        bob = cluster.client("ap", "bob")  # connected, but in no room: not "online"
        ref = bob.fetch(limit=3)
        await cluster.settle(2)
        [done] = bob.received("fetched", ref=ref)
        assert done["count"] == 3 and done["remaining"] == 1
        got = texts(bob)
        assert len(got) == 3
        assert [t for t in got if t.startswith("ann")] == sorted(
            t for t in got if t.startswith("ann")
        )
        ref = bob.fetch()
        await cluster.settle(2)
        [done] = bob.received("fetched", ref=ref)
        assert done == {"type": "fetched", "ref": ref, "count": 1, "remaining": 0, "complete": True}
        assert sorted(texts(bob)) == ["ann0", "ann1", "ann2", "cat0"]
        nursery.cancel_scope.cancel()


async def test_store_full_is_a_clear_error(autojump_clock: object, tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        cluster = Cluster(nursery, SimNetwork(seed=11))
        await cluster.start("eu")
        store = cluster.node("eu").messenger.store  # type: ignore[union-attr]
        store.max_pending_per_recipient = 2
        ann = cluster.client("eu", "ann")
        refs = [ann.send_to("bob", {"text": str(i)}, mode="reliable") for i in range(3)]
        # The limit counts what the open batch holds: refused at once, with a clear reason.
        [error] = ann.received("error", ref=refs[2])
        assert error["code"] == "store_full" and "'bob' already has 2" in error["message"]
        assert not ann.received("stored")
        await committed()
        assert [m["ref"] for m in ann.received("stored")] == refs[:2]
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------- group commit


async def test_a_burst_of_reliable_sends_costs_one_commit(autojump_clock: object) -> None:
    async with trio.open_nursery() as nursery:
        cluster = Cluster(nursery, SimNetwork(seed=12))
        await cluster.start("eu")
        store = cluster.node("eu").messenger.store  # type: ignore[union-attr]
        ann = cluster.client("eu", "ann")
        before = store.commits
        refs = [ann.send_to(["bob", "cat"], {"text": str(i)}, mode="reliable") for i in range(50)]
        assert not ann.received("stored")  # not before the commit
        assert store.in_batch and store.pending_total() == 100
        await committed()
        assert [m["ref"] for m in ann.received("stored")] == refs
        assert store.commits == before + 1 and not store.in_batch
        nursery.cancel_scope.cancel()


async def test_a_failed_commit_means_an_error_not_stored(
    autojump_clock: object, tmp_path: Path
) -> None:
    async with trio.open_nursery() as nursery:
        cluster = Cluster(nursery, SimNetwork(seed=13), data_root=tmp_path)
        await cluster.start("eu")
        store = cluster.node("eu").messenger.store  # type: ignore[union-attr]
        ann = cluster.client("eu", "ann")
        await trio.sleep(1)  # past the first expiry pass (it commits on its own)
        deny_commit(store)
        refs = [ann.send_to("bob", {"text": str(i)}, mode="reliable") for i in range(3)]
        await committed()
        assert not ann.received("stored")
        assert [(m["ref"], m["code"]) for m in ann.received("error")] == [
            (ref, "internal") for ref in refs
        ]
        assert store.pending_total() == 0 and store.pending_recipients() == []
        store._conn().set_authorizer(None)
        ref = ann.send_to("bob", {"text": "again"}, mode="reliable")
        await committed()
        assert [m["ref"] for m in ann.received("stored")] == [ref]
        assert [m.data for m in store.pending("bob")] == [{"text": "again"}]
        nursery.cancel_scope.cancel()


async def test_origin_crash_between_accept_and_commit_loses_only_unacknowledged(
    autojump_clock: object, tmp_path: Path
) -> None:
    async with trio.open_nursery() as nursery:
        cluster = await line(nursery, SimNetwork(seed=14, latency=0.03), data_root=tmp_path)
        ann = cluster.client("eu", "ann")
        for i in range(5):
            ann.send_to("bob", {"text": f"acked{i}"}, mode="reliable")
        await committed()
        assert len(ann.received("stored")) == 5
        for i in range(5):
            ann.send_to("bob", {"text": f"lost{i}"}, mode="reliable")
        cluster.crash("eu")  # before the batch holding lost0..4 commits
        assert len(ann.received("stored")) == 5
        await cluster.settle(1)
        await cluster.start("eu", peers=["us"])
        ann2 = cluster.client("eu", "ann")
        for i in range(2):
            ann2.send_to("bob", {"text": f"after{i}"}, mode="reliable")
        await committed()
        assert len(ann2.received("stored")) == 2
        bob = cluster.client("ap", "bob")
        bob.join("r")
        await cluster.settle(5)
        # Every acknowledged message once, in order; the unacknowledged ones never existed
        # (their seqs were taken again by after0..1, which must not be mistaken for them).
        assert texts(bob) == [f"acked{i}" for i in range(5)] + ["after0", "after1"]
        assert cluster.node("eu").messenger.store.pending_total() == 0  # type: ignore[union-attr]
        nursery.cancel_scope.cancel()


async def test_recipient_daemon_confirms_only_after_its_commit(
    autojump_clock: object, tmp_path: Path
) -> None:
    async with trio.open_nursery() as nursery:
        cluster = await line(nursery, SimNetwork(seed=15, latency=0.03), data_root=tmp_path)
        ann = cluster.client("eu", "ann")
        bob = cluster.client("ap", "bob")
        bob.join("r")
        await cluster.settle(1)
        ap_store = cluster.node("ap").messenger.store  # type: ignore[union-attr]
        deny_commit(ap_store)  # ap shows the messages but cannot record them as shown
        refs = [ann.send_to("bob", {"text": f"m{i}"}, mode="reliable") for i in range(3)]
        await trio.sleep(2)  # within the origin's 3 s retransmission timer
        assert texts(bob)[:1] == ["m0"]  # shown (m1, m2 may wait for m0's mark)...
        assert not ann.received("delivered")  # ...but never confirmed without the mark
        assert cluster.node("eu").messenger.store.pending_total() == 3  # type: ignore[union-attr]
        ap_store._conn().set_authorizer(None)
        await cluster.settle(6)
        # Retransmitted and confirmed once each. The marks were lost with the failed
        # commits, so bob's session was shown some again (as after a crash of ap between
        # showing and committing); the client drops a message id it has already shown.
        assert sorted(m["ref"] for m in ann.received("delivered")) == refs
        assert cluster.node("eu").messenger.store.pending_total() == 0  # type: ignore[union-attr]
        assert list(dict.fromkeys(texts(bob))) == ["m0", "m1", "m2"]
        # Now that the marks are committed, nothing is shown again.
        shown = len(texts(bob))
        ann.send_to("bob", {"text": "m3"}, mode="reliable")
        await cluster.settle(5)
        assert texts(bob)[shown:] == ["m3"]
        assert len(ann.received("delivered")) == 4
        nursery.cancel_scope.cancel()


async def test_an_idle_messenger_sweeps_only_while_something_can_time_out(
    autojump_clock: object,
) -> None:
    """With nothing to retransmit, pump or time out, the messenger does not wake the daemon
    twice a second; a message restarts its sweeps, and its retransmission still happens."""
    async with trio.open_nursery() as nursery:
        cluster = await line(nursery, SimNetwork(seed=8, latency=0.04))
        messenger = cluster.node("eu").messenger
        assert messenger is not None
        sweeps: list[float] = []
        real_sweep = messenger.sweep
        messenger.sweep = lambda now: sweeps.append(now) or real_sweep(now)  # type: ignore[method-assign]
        await trio.sleep(10)
        assert len(sweeps) <= 1  # (the store's expiry pass)
        ann = cluster.client("eu", "ann")
        bob = cluster.client("ap", "bob")
        bob.join("lobby")
        await cluster.settle(1)
        sweeps.clear()
        cluster.net.partition(["eu"], ["us", "ap"])  # the first copy is lost...
        ann.send_to("bob", {"text": "again"}, mode="reliable")
        await committed()
        await trio.sleep(1)
        assert len(sweeps) >= 2  # (in flight: swept twice a second)
        cluster.net.heal()  # ...and it is sent again
        await cluster.settle(10)
        assert texts(bob) == ["again"]
        sweeps.clear()
        await trio.sleep(10)  # delivered and confirmed: nothing left to time out
        assert len(sweeps) <= 1
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------- answers in bounded time


def answer_times(client: FakeClient) -> dict[int, float]:
    """ref -> virtual time of the first answer (``delivered`` or ``error``) the client gets."""
    first: dict[int, float] = {}
    receive = client._receive

    def timed(message: dict[str, object]) -> None:
        ref = message.get("ref")
        if message["type"] in ("delivered", "error") and isinstance(ref, int):
            first.setdefault(ref, trio.current_time())
        receive(message)

    client._receive = timed  # type: ignore[method-assign]
    return first


async def test_every_fast_send_over_a_blackholed_link_is_answered_in_time(
    autojump_clock: object,
) -> None:
    """a — b is blackholed (not reset: writes succeed, nothing arrives) until the link times
    out; fast messages sent meanwhile get ``timeout`` within FAST_ANSWER_S, the rest
    ``delivered``; reliable ones sent meanwhile are retransmitted around the hole."""
    async with trio.open_nursery() as nursery:
        net = SimNetwork(seed=31, latency=0.02)
        cluster = Cluster(nursery, net)
        await cluster.start("a")
        await cluster.start("b", peers=["a"])
        await cluster.start("c", peers=["a", "b"])
        await cluster.settle(3)
        ann = cluster.client("a", "ann")
        bob = cluster.client("b", "bob")
        bob.join("r")
        await cluster.settle(1)
        assert cluster.node("a").gossip.routes.path("b") == ("a", "b")  # type: ignore[union-attr]
        answered = answer_times(ann)
        net.set_loss("a", "b", 1.0)
        sent_at: dict[int, float] = {}
        reliable = []
        for i in range(60):
            sent_at[ann.send_to("bob", {"text": f"f{i}"})] = trio.current_time()
            if i % 10 == 0:
                reliable.append(ann.send_to("bob", {"text": f"r{i}"}, mode="reliable"))
            await trio.sleep(0.05)
        await cluster.settle(FAST_ANSWER_S + 5)
        late = {
            ref: answered.get(ref, float("inf")) - at
            for ref, at in sent_at.items()
            if answered.get(ref, float("inf")) - at > FAST_ANSWER_S + 0.01
        }
        assert not late, f"fast sends answered late or never: {late}"
        codes = {m["code"] for m in ann.received("error")}
        assert codes == {"timeout"}  # the ones that fell into the hole, and only those
        timed_out = {m["ref"] for m in ann.received("error")}
        delivered = {m["ref"] for m in ann.received("delivered")} & set(sent_at)
        assert timed_out and delivered and timed_out | delivered == set(sent_at)
        assert [t for t in texts(bob) if t.startswith("f")] == [
            f"f{i}" for i in range(60) if ann.received("delivered", ref=list(sent_at)[i])
        ]
        # Reliable messages: stored at once, then delivered around the hole, in order.
        assert [m["ref"] for m in ann.received("stored")] == reliable
        assert [t for t in texts(bob) if t.startswith("r")] == [f"r{i}" for i in range(0, 60, 10)]
        assert set(reliable) <= {m["ref"] for m in ann.received("delivered")}
        nursery.cancel_scope.cancel()
