"""Multi-daemon scenarios on the simulated network, in virtual time (trio MockClock).

Each test runs real daemons (CRDT, liveness, peer links, fan-out) with an in-memory network;
clients are attached to nodes directly and decode every frame they are sent, so what they
"see" is what a browser would see.
"""

from __future__ import annotations

import pytest
import trio

from presenced.core import peer_wire as wire
from presenced.testing.cluster import Cluster, FakeClient
from presenced.testing.simnet import SimNetwork


async def line(nursery: trio.Nursery, net: SimNetwork, **kwargs: object) -> Cluster:
    """eu — us — ap: eu and ap only meet through us."""
    cluster = Cluster(nursery, net, **kwargs)  # type: ignore[arg-type]
    await cluster.start("us")
    await cluster.start("eu", peers=["us"])
    await cluster.start("ap", peers=["us"])
    await cluster.settle(2)
    return cluster


async def mesh_of_three(
    nursery: trio.Nursery, latency: float, seed: int = 11, settle: float = 3
) -> tuple[Cluster, SimNetwork]:
    """eu, us and ap, each linked to the other two."""
    net = SimNetwork(seed=seed, latency=latency)
    cluster = Cluster(nursery, net, tick_ms=25)
    await cluster.start("eu")
    await cluster.start("us", peers=["eu"])
    await cluster.start("ap", peers=["eu", "us"])
    await cluster.settle(settle)
    return cluster, net


def movers(cluster: Cluster) -> dict[str, FakeClient]:
    """A user per region, in room "r"."""
    clients = {name: cluster.client(name, f"u-{name}") for name in ("eu", "us", "ap")}
    for client in clients.values():
        client.join("r")
    return clients


TICK = 0.025


async def to_mid_tick() -> None:
    """Sleep to the middle of a tick (virtual time is the clock ticks are aligned to). Moves
    are made there: one at the very instant of a boundary races that tick's work."""
    phase = trio.current_time() % TICK
    if abs(phase - TICK / 2) > 1e-6:
        await trio.sleep((TICK / 2 - phase) % TICK)


async def move_every_tick(clients: dict[str, FakeClient], ticks: int, start: int = 0) -> None:
    await to_mid_tick()
    for step in range(start, start + ticks):
        for client in clients.values():
            client.update("r", {"x": step})
        await trio.sleep(0.025)


async def busy_near_mesh(
    nursery: trio.Nursery,
) -> tuple[Cluster, SimNetwork, dict[str, FakeClient]]:
    """Three regions 1 ms apart, a user in each moving every tick (mid-tick): every link is
    read by the ticker."""
    cluster, net = await mesh_of_three(nursery, latency=0.001)
    clients = movers(cluster)
    await move_every_tick(clients, 20)
    assert paced(cluster) == {"eu": ["ap", "us"], "us": ["ap", "eu"], "ap": ["eu", "us"]}
    return cluster, net, clients


def paced(cluster: Cluster, names: tuple[str, ...] = ("eu", "us", "ap")) -> dict[str, list[str]]:
    """Per node, the peers whose links its ticker reads."""
    return {
        name: sorted(link.remote.node for link in cluster.node(name).gossip.paced)  # type: ignore[union-attr]
        for name in names
    }


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
        cluster = await line(nursery, net, down_after_s=3.0, purge_after_s=30.0)
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
        cluster, net = await mesh_of_three(nursery, latency=0.03, seed=4, settle=2)
        clients = movers(cluster)
        await cluster.settle(1)
        net.partition(["ap"], ["eu", "us"])
        clients["eu"].update("r", {"during": 1})
        clients["ap"].leave("r")
        await cluster.settle(5)
        assert set(clients["eu"].sees("r")) == {
            ("u-eu", clients["eu"].session),
            ("u-us", clients["us"].session),
        }
        net.heal()
        await cluster.settle(15)
        expected = cluster.visible("eu")
        assert cluster.visible("us") == expected == cluster.visible("ap")
        assert clients["us"].sees("r") == {
            ("u-eu", clients["eu"].session): {"during": 1},
            ("u-us", clients["us"].session): {},
        }
        nursery.cancel_scope.cancel()


async def test_graceful_stop_removes_users_everywhere_at_once(autojump_clock: object) -> None:
    async with trio.open_nursery() as nursery:
        cluster = await line(
            nursery, SimNetwork(seed=5, latency=0.02), down_after_s=30.0, purge_after_s=60.0
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


async def test_a_bye_counts_only_from_the_node_it_names(autojump_clock: object) -> None:
    """eu — us — ap. us (a peer with a valid certificate: the cluster trusts it) sends eu a
    bye naming ap, whose link to us is up and which is alive. eu must not retire ap: a bye
    only counts over the link of the replica it names. ap's user stays, and eu keeps
    hearing ap. A real bye (ap stopping) retires ap at its neighbour us only: byes are not
    relayed; eu learns of the stop from the removals ap sent first (at once) and from
    liveness (down, then purged), and ap's next incarnation is welcome everywhere."""
    async with trio.open_nursery() as nursery:
        cluster = await line(
            nursery, SimNetwork(seed=6, latency=0.02), down_after_s=3.0, purge_after_s=20.0
        )
        ann = cluster.client("eu", "ann")
        bob = cluster.client("ap", "bob")
        ann.join("r")
        bob.join("r")
        await cluster.settle(1)
        ap = cluster.node("ap").replica
        eu_link = cluster.node("us").gossip.links["eu"]  # type: ignore[union-attr]
        await eu_link._send(wire.Bye(ap))
        await cluster.settle(5)  # longer than down_after
        eu = cluster.node("eu")
        assert eu.liveness.status(ap) == "up"
        assert ap not in eu.state.retired
        assert set(ann.sees("r")) == {("ann", ann.session), ("bob", bob.session)}
        assert eu.gossip.links["us"].remote == cluster.node("us").replica  # type: ignore[union-attr]

        await cluster.stop("ap")
        await trio.sleep(0.5)  # far less than down_after: the removals did it
        assert set(ann.sees("r")) == {("ann", ann.session)}
        assert cluster.node("us").liveness.status(ap) == "retired"
        assert eu.liveness.status(ap) == "up"  # not relayed: it goes down in its own time
        await cluster.settle(4)
        assert eu.liveness.status(ap) == "down"
        await cluster.start("ap", peers=["us"])
        bob2 = cluster.client("ap", "bob")
        bob2.join("r")
        await cluster.settle(2)
        assert set(ann.sees("r")) == {("ann", ann.session), ("bob", bob2.session)}
        assert eu.liveness.status(ap) == "retired"  # replaced by the new incarnation
        nursery.cancel_scope.cancel()


async def test_one_frame_per_tick_carries_every_region(autojump_clock: object) -> None:
    """Aligned ticks: with nearby peers, a member gets one diff per tick holding the moves of
    all three regions, not one diff per region; and the peers send one gossip message per
    tick, however often relays wake their writers."""
    async with trio.open_nursery() as nursery:
        cluster, _ = await mesh_of_three(nursery, latency=0.001, seed=7)
        clients = movers(cluster)
        await cluster.settle(1)
        watcher = clients["eu"]
        links = cluster.node("eu").gossip.links.values()  # type: ignore[union-attr]
        frames_before = len(watcher.messages)
        await to_mid_tick()
        sent_before = sum(link.messages_out for link in links)
        ticks = 40
        for step in range(ticks):
            for client in clients.values():
                client.update("r", {"x": step})
            await trio.sleep(0.025)
        await cluster.settle(0.2)
        diffs = [m for m in watcher.messages[frames_before:] if m["type"] == "diff"]
        # Every region's last move arrived...
        assert {
            user: sessions[0]["meta"]["x"] for m in diffs for user, sessions in m["updates"].items()
        } == {"u-us": ticks - 1, "u-ap": ticks - 1, "u-eu": ticks - 1}
        # ...in about one frame per tick (three regions flushed separately would be ~3 per tick;
        # the first tick of the burst may take two: no batch told the daemon peers' are coming).
        assert len(diffs) <= ticks + 3
        sent = sum(link.messages_out for link in links) - sent_before
        assert sent <= 2 * (ticks + 2) + 8  # two links, one gossip per tick, pings and pongs
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("latency", [0.001, 0.0045])
async def test_one_frame_per_tick_when_peers_land_before_the_hold(
    autojump_clock: object, latency: float
) -> None:
    """Peers whose batches land after the flush point but early in the tick (a loaded machine,
    a nearby region) are waited for, up to a quarter tick: a member still gets one frame per
    tick with every region's moves, not one for the local moves and one per peer."""
    async with trio.open_nursery() as nursery:
        cluster, _ = await mesh_of_three(nursery, latency=latency, seed=5)
        clients = movers(cluster)
        await move_every_tick(clients, 10)
        watcher = clients["eu"]
        frames_before = len(watcher.messages)
        ticks = 40
        await move_every_tick(clients, ticks, start=10)
        await cluster.settle(0.2)
        diffs = [m for m in watcher.messages[frames_before:] if m["type"] == "diff"]
        last = {
            user: sessions[0]["meta"]["x"] for m in diffs for user, sessions in m["updates"].items()
        }
        assert last == {"u-us": ticks + 9, "u-ap": ticks + 9, "u-eu": ticks + 9}
        assert len(diffs) <= ticks + 3  # (without the hold: ~2 per tick)
        nursery.cancel_scope.cancel()


async def test_near_peers_are_read_at_the_flush_point(autojump_clock: object) -> None:
    """Busy near peers' batches arrive within the poll point: every link is read by the ticker
    (no wake-up per message), and each region's moves still reach the others within a tick.
    Pings still measure the link, to within two poll points."""
    async with trio.open_nursery() as nursery:
        cluster, _ = await mesh_of_three(nursery, latency=0.001)
        clients = movers(cluster)
        await move_every_tick(clients, 20)
        assert paced(cluster) == {"eu": ["ap", "us"], "us": ["ap", "eu"], "ap": ["eu", "us"]}
        await move_every_tick(clients, 100, start=20)  # a few pings' worth
        assert paced(cluster) == {"eu": ["ap", "us"], "us": ["ap", "eu"], "ap": ["eu", "us"]}
        await trio.sleep(0.03)  # the last moves' tick
        seen = {user: meta["x"] for (user, _), meta in clients["eu"].sees("r").items()}
        assert seen == {"u-eu": 119, "u-us": 119, "u-ap": 119}
        for name in ("eu", "us", "ap"):
            node = cluster.node(name)
            for link in node.gossip.links.values():  # type: ignore[union-attr]
                assert link.rtt is not None
                assert 0.0019 <= link.rtt <= 0.002 + 2 * node.plan.poll_point_s
        nursery.cancel_scope.cancel()


async def test_only_the_final_read_that_finds_nothing_unpaces_a_link(
    autojump_clock: object,
) -> None:
    """The ticker reads paced links right after the boundary's own work and at the poll
    point: a batch not in yet is no miss, so the link stays paced; only the tick's last,
    final read (at the hold) hands a link with no batch that tick back to its reader."""
    async with trio.open_nursery() as nursery:
        cluster, _ = await mesh_of_three(nursery, latency=0.001)
        clients = movers(cluster)
        await move_every_tick(clients, 20)
        gossip = cluster.node("eu").gossip
        assert gossip is not None
        link = next(iter(gossip.paced))
        await trio.sleep(TICK / 2 + 0.0005)  # next tick, before the batches (1 ms away)
        link.poll(final=False)  # nothing yet
        assert link.paced
        link.poll()  # no batch this tick
        assert not link.paced
        nursery.cancel_scope.cancel()


async def test_a_tick_whose_batches_are_all_read_flushes_at_once(autojump_clock: object) -> None:
    """Once every paced link's batch of the tick is read (on a loaded machine they are often
    all in by the end of the boundary's own work), the tick's flush waits for nothing: no
    wake-up at the poll point just to flush."""
    async with trio.open_nursery() as nursery:
        cluster, _, clients = await busy_near_mesh(nursery)
        node = cluster.node("eu")
        gossip = node.gossip
        assert gossip is not None
        for client in clients.values():
            client.update("r", {"x": "next"})
        # 2 ms into the next tick: the peers' batches (1 ms away) are in, not read yet
        await trio.sleep(node.tick_s / 2 + 0.002)
        now = trio.current_time()
        assert gossip.paced_pending()
        assert node.flush_time(now) > now
        gossip.poll_paced(final=False)
        assert not gossip.paced_pending()
        assert node.flush_time(now) == now
        nursery.cancel_scope.cancel()


async def test_a_ping_hands_a_paced_link_to_its_reader_for_the_pong_only(
    autojump_clock: object,
) -> None:
    """A ping's pong is read as it arrives (for an honest RTT): the link goes back to its
    reader once the ticker has read the peer's batch, and the pong paces it again, so a
    ping costs one reader wake-up, not the few ticks three batches on time took."""
    async with trio.open_nursery() as nursery:
        cluster, _, clients = await busy_near_mesh(nursery)
        node = cluster.node("eu")
        unpaced = 0
        for step in range(200):  # 5 s: two or three pings on each link
            for client in clients.values():
                client.update("r", {"x": step})
            await trio.sleep(0.025)
            unpaced += 6 - sum(len(links) for links in paced(cluster).values())
        assert unpaced == 0
        for name in ("eu", "us", "ap"):
            for link in cluster.node(name).gossip.links.values():  # type: ignore[union-attr]
                assert link.rtt is not None
                assert 0.0019 <= link.rtt <= 0.002 + 2 * node.plan.poll_point_s
        nursery.cancel_scope.cancel()


async def test_a_late_batch_unpaces_a_link_until_the_next_on_time(autojump_clock: object) -> None:
    """A near peer's batch that misses the hold (a stalled daemon) hands the link to its
    reader; the next batch on time paces it again at once."""
    async with trio.open_nursery() as nursery:
        cluster, net, clients = await busy_near_mesh(nursery)
        net.set_latency("us", "eu", 0.010, both_ways=False)
        await move_every_tick(clients, 1)
        assert paced(cluster)["eu"] == ["ap"]
        net.set_latency("us", "eu", 0.001, both_ways=False)
        await move_every_tick(clients, 2, start=1)
        assert paced(cluster)["eu"] == ["ap", "us"]
        nursery.cancel_scope.cancel()


async def test_changes_read_at_a_boundary_wake_no_link(autojump_clock: object) -> None:
    """The ticker reads busy clients at a tick boundary, right before the tick's gossip goes
    out: their changes must not also wake each link's writer (the leading edge of an idle
    link), which then found nothing left to send."""
    async with trio.open_nursery() as nursery:
        cluster, _ = await mesh_of_three(nursery, latency=0.001)
        clients = movers(cluster)
        await trio.sleep(0.1)  # every link idle for more than a tick
        node = cluster.node("eu")
        links = list(node.gossip.links.values())  # type: ignore[union-attr]
        node.reading_clients = True  # (what the ticker sets around its reads of paced clients)
        clients["eu"].update("r", {"x": "boundary"})
        node.reading_clients = False
        assert not any(link._wakeup.is_set() for link in links)
        clients["eu"].update("r", {"x": "mid-tick"})  # any other change: the leading edge
        assert all(link._wakeup.is_set() for link in links)
        nursery.cancel_scope.cancel()


async def test_news_that_lands_late_in_a_tick_is_not_the_next_tick_batch(
    autojump_clock: object,
) -> None:
    """Link-state news (or a relay) a peer sends late in a tick is read at the next tick's
    first read of the paced link: taken for that tick's batch, the tick's flush went without
    the real batch, and the peer's moves reached members a tick late."""
    async with trio.open_nursery() as nursery:
        cluster, _, clients = await busy_near_mesh(nursery)
        eu = cluster.node("eu")
        late = 0
        for step in range(20, 40):
            for client in clients.values():
                client.update("r", {"x": step})
            await trio.sleep(eu.tick_s * 0.8 - 0.001 - eu.tick_phase_s())  # late in the tick
            for peer in ("us", "ap"):
                news = cluster.node(peer).gossip.links[eu.replica.node]  # type: ignore[union-attr]
                news.view.states_sent = {}  # (its next message repeats every link state: news)
                news.wake()
            await trio.sleep(eu.tick_s * 0.2 + eu.tick_s / 2)  # mid-tick of the next tick
            for peer in ("us", "ap"):
                late += clients["eu"].sees("r")[(f"u-{peer}", clients[peer].session)] != {"x": step}
        assert late == 0
        nursery.cancel_scope.cancel()


async def test_a_tick_encodes_the_gossip_every_peer_gets_once(
    autojump_clock: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tick's gossip is usually the same own changes for every peer: encoded once."""
    from presenced.core import peer_wire

    async with trio.open_nursery() as nursery:
        cluster, _ = await mesh_of_three(nursery, latency=0.001)
        clients = movers(cluster)
        await cluster.settle(0.5)
        gossip = cluster.node("eu").gossip
        assert gossip is not None
        for link in gossip.links.values():  # (nothing else due: the same message for both)
            link.view.beat_due = link.view.digest_due = link.view.ping_due = False
        clients["eu"].update("r", {"x": "once"})
        encoded = []
        real_encode = peer_wire.encode
        monkeypatch.setattr(peer_wire, "encode", lambda m: encoded.append(m) or real_encode(m))
        gossip.at_boundary(True)
        assert len(encoded) == 1
        await cluster.settle(0.1)
        for peer in ("us", "ap"):
            assert clients[peer].sees("r")[("u-eu", clients["eu"].session)] == {"x": "once"}
        nursery.cancel_scope.cancel()


async def test_a_tick_message_the_writer_sends_is_still_the_tick_batch(
    autojump_clock: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With routed messages queued on a link, the tick's gossip goes after them, from the
    link's writer task: it is still marked as the tick's message (else the peer would stop
    pacing and awaiting it whenever direct messages flow)."""
    from presenced.core import peer_wire

    async with trio.open_nursery() as nursery:
        cluster, _, clients = await busy_near_mesh(nursery)
        gossip = cluster.node("eu").gossip
        assert gossip is not None
        link = gossip.links["us"]
        sent: list[peer_wire.PeerMessage] = []
        real_encode = link._encode
        monkeypatch.setattr(link, "_encode", lambda m: sent.append(m) or real_encode(m))
        clients["eu"].update("r", {"x": "queued"})
        link.enqueue(peer_wire.PeerPing(999))  # (a routed message would do the same)
        gossip.at_boundary(True)
        assert not sent  # the writer sends, in order
        await trio.sleep(0.001)
        ping, batch = sent[:2]
        assert isinstance(ping, peer_wire.PeerPing)
        assert isinstance(batch, peer_wire.Gossip) and batch.batch and batch.deltas
        nursery.cancel_scope.cancel()


async def test_a_peer_that_marks_no_tick_message_is_read_as_it_sends(
    autojump_clock: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An older peer sends no ``tk``: its messages are no tick batches, so its link is never
    paced or waited for, and its moves are shown as they arrive."""
    from presenced.core import peer_wire

    real_to_wire = peer_wire._to_wire

    def without_tick(message: peer_wire.PeerMessage) -> dict[str, object]:
        wire = real_to_wire(message)
        wire.pop("tk", None)
        return wire

    async with trio.open_nursery() as nursery:
        cluster, _ = await mesh_of_three(nursery, latency=0.001)
        clients = movers(cluster)
        monkeypatch.setattr(peer_wire, "_to_wire", without_tick)  # every daemon "older"
        await move_every_tick(clients, 20)
        assert paced(cluster) == {"eu": [], "us": [], "ap": []}
        clients["us"].update("r", {"x": "now"})
        await trio.sleep(0.025 + 0.002)  # the next boundary, one link delay and a little
        assert clients["eu"].sees("r")[("u-us", clients["us"].session)] == {"x": "now"}
        nursery.cancel_scope.cancel()


async def test_far_peers_are_read_as_they_arrive(autojump_clock: object) -> None:
    """A far peer's batch lands mid-tick: waiting for the next flush point would add up to a
    tick of latency, so its link keeps its reader task."""
    async with trio.open_nursery() as nursery:
        cluster, _ = await mesh_of_three(nursery, latency=0.040)
        clients = movers(cluster)
        await move_every_tick(clients, 40)
        assert paced(cluster) == {"eu": [], "us": [], "ap": []}
        seen = {user: meta["x"] for (user, _), meta in clients["eu"].sees("r").items()}
        assert seen["u-ap"] >= 37  # one link delay plus a tick behind at most
        nursery.cancel_scope.cancel()


async def test_a_quiet_peer_gets_its_reader_back(autojump_clock: object) -> None:
    """When a paced peer stops sending, its link goes back to being read as data arrives, so
    its next change, whenever it comes, is shown at once (not at the next flush point)."""
    async with trio.open_nursery() as nursery:
        cluster, _ = await mesh_of_three(nursery, latency=0.001)
        clients = movers(cluster)
        await move_every_tick(clients, 20)
        assert paced(cluster)["eu"] == ["ap", "us"]
        await trio.sleep(0.1)  # nobody moves: the next reads find nothing
        assert paced(cluster)["eu"] == []
        await trio.sleep(0.0123)  # mid-tick
        clients["ap"].update("r", {"x": "late"})
        sent = trio.current_time()
        while clients["eu"].sees("r")[("u-ap", clients["ap"].session)] != {"x": "late"}:
            await trio.sleep(0.0005)
        # The quiet link sends at once (leading edge) and eu reads it on arrival: one link
        # delay, not a wait for eu's next flush point.
        assert trio.current_time() - sent <= 0.002
        nursery.cancel_scope.cancel()


async def test_a_paced_link_that_breaks_is_noticed(autojump_clock: object) -> None:
    """The ticker's read meets the broken channel: the link ends (and is redialled)."""
    async with trio.open_nursery() as nursery:
        cluster, _ = await mesh_of_three(nursery, latency=0.001)
        clients = movers(cluster)
        await move_every_tick(clients, 20)
        assert "ap" in paced(cluster)["eu"]
        cluster.crash("ap")
        del clients["ap"]
        await move_every_tick(clients, 8, start=20)
        assert "ap" not in cluster.node("eu").gossip.links  # type: ignore[union-attr]
        assert paced(cluster, ("eu", "us")) == {"eu": ["us"], "us": ["eu"]}
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


def test_flush_jitter_does_not_make_a_busy_room_look_quiet() -> None:
    """Leading edge means "no flush since the previous tick began", not "a tick since the last
    flush": flush times jitter within their ticks, and a room that flushed early in the last
    tick must still fold a change made late in this one into this tick's single frame."""
    from presenced.config import Config
    from presenced.core.crdt import ReplicaId
    from presenced.server.node import Node

    now = [100.0]
    node = Node(Config(tick_ms=25, allow_anonymous=True), ReplicaId("eu", 1), clock=lambda: now[0])
    node.phase_clock = lambda: now[0]  # boundaries at multiples of 25 ms of this clock
    ann, bob = FakeClient(node, "ann"), FakeClient(node, "bob")
    ann.join("r")
    bob.join("r")
    now[0] = 100.001
    node.flush_dirty()  # this tick's flush, 1 ms into it
    frames = len(bob.messages)

    now[0] = 100.0265  # 25.5 ms after that flush, but in the next tick
    ann.update("r", {"x": 1})
    assert len(bob.messages) == frames  # waits for this tick's flush
    now[0] = 100.028
    node.flush_dirty()
    assert len(bob.messages) == frames + 1

    now[0] = 100.0751  # a whole tick without a flush: quiet
    ann.update("r", {"x": 2})
    assert len(bob.messages) == frames + 2  # at once
    assert bob.sees("r")[("ann", ann.session)] == {"x": 2}


async def test_an_idle_daemon_sleeps_through_ticks(autojump_clock: object) -> None:
    """With nothing to send, read or flush, the ticker does not wake at every boundary (on
    a small VM each wake-up costs ~0.3 ms of CPU); a change wakes it for the next one."""
    async with trio.open_nursery() as nursery:
        cluster = Cluster(nursery, SimNetwork(seed=3), tick_ms=25)
        await cluster.start("eu")
        ann, bob = cluster.client("eu", "ann"), cluster.client("eu", "bob")
        ann.join("r")
        bob.join("r")
        await cluster.settle(1)
        metrics = cluster.node("eu").metrics
        wakeups = sum(metrics.flush_counts)
        await trio.sleep(2)  # 80 boundaries
        assert sum(metrics.flush_counts) == wakeups
        ann.update("r", {"x": 1})  # a quiet room: shown at once (leading edge)...
        assert bob.sees("r")[("ann", ann.session)] == {"x": 1}
        await trio.sleep(0.001)
        ann.update("r", {"x": 2})  # ...the next change waits for the tick
        assert bob.sees("r")[("ann", ann.session)] == {"x": 1}
        await trio.sleep(0.026)
        assert bob.sees("r")[("ann", ann.session)] == {"x": 2}
        await trio.sleep(2)
        assert sum(metrics.flush_counts) - wakeups <= 3
        nursery.cancel_scope.cancel()


async def test_links_that_came_up_at_different_moments_stay_paced(autojump_clock: object) -> None:
    """A link paced by its reader mid-tick has already read that tick's batch: the ticker's
    read at that tick's flush point must not find it empty and unpace it (it then flapped
    every tick, when another link was already paced). Four near regions whose links come up
    0.6 s apart (their pings fall on different ticks): the ticker reads nearly every link."""
    names = ("a", "b", "c", "d")
    async with trio.open_nursery() as nursery:
        cluster = Cluster(nursery, SimNetwork(seed=5, latency=0.001), tick_ms=25)
        for i, name in enumerate(names):
            await cluster.start(name, peers=list(names[:i]))
            await trio.sleep(0.6)
        await cluster.settle(3)
        clients = {name: cluster.client(name, f"u-{name}") for name in names}
        for client in clients.values():
            client.join("r")
        await trio.sleep(1)
        await to_mid_tick()
        paced_samples = samples = 0
        for step in range(200):
            for client in clients.values():
                client.update("r", {"x": step})
            await trio.sleep(0.025)
            for name in names:
                gossip = cluster.node(name).gossip
                assert gossip is not None
                paced_samples += len(gossip.paced)
                samples += len(gossip.links)
        assert paced_samples / samples >= 0.9  # (pings unpace a link for a few ticks)
        nursery.cancel_scope.cancel()
