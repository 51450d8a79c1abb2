"""The gossip policy of one link (presenced.core.gossip), as plain unit tests.

Two daemons' views of each other back to back, like h11's ConnectionPair: each side has its
own CRDT state, liveness table and route table, and what one side's view builds crosses a
wire (encoded and decoded, as on a real link) to the other side, which observes its beats (the
node's part) and hands it to its view. Every test runs with either side as the dialer."""

from __future__ import annotations

import pytest

from presenced.core import peer_wire as wire
from presenced.core.crdt import Delta, PresenceState, ReplicaId
from presenced.core.gossip import (
    PeerView,
    bye_accepted,
    dialer_of,
    hello_problem,
    keeps_existing,
    live_link_states,
)
from presenced.core.liveness import UP, Beat, Liveness
from presenced.core.routing import LinkState, RouteTable

TIMINGS = {"digest_interval_s": 2.0, "ping_interval_s": 2.0, "link_timeout_s": 2.5}


class Side:
    """One daemon: what a node holds that the view reads, and its view of the other side."""

    def __init__(self, name: str, now: float) -> None:
        self.replica = ReplicaId(name, 1)
        self.state = PresenceState(self.replica, name)
        self.liveness = Liveness(self.replica, down_after_s=3.0, purge_after_s=30.0, now=now)
        self.routes = RouteTable(name, 1)
        self.links: tuple[str, ...] = ()
        self.view: PeerView

    def build(self, now: float, *, batch: bool = False) -> wire.Gossip | None:
        args = (now, self.state, self.liveness, self.routes, self.links)
        return self.view.build(*args, batch=batch)

    def receive(self, message: wire.Gossip, now: float) -> tuple[list[object], bool]:
        """What a link does with a gossip message: the node observes its beats first (an
        up replica is shown once the copy holds the clock it beat with), then the view
        merges the rest. Returns the changes to apply and whether the writer wakes."""
        for beat in message.beats:
            for transition in self.liveness.observe(beat, now):
                if transition.status == UP:
                    self.state.show(transition.replica, transition.clock)
        changes, _merged, wake = self.view.on_gossip(message, self.state, self.liveness)
        return list(changes), wake


class Pair:
    """Two sides linked to each other; ``dialer`` dialled the link."""

    def __init__(self, dialer_is_eu: bool) -> None:
        self.now = 100.0
        eu, us = Side("eu", self.now), Side("us", self.now)
        self.dialer, self.acceptor = (eu, us) if dialer_is_eu else (us, eu)
        for side, other in ((eu, us), (us, eu)):
            side.view = PeerView(side.replica, other.replica, self.now, **TIMINGS)
            side.links = (other.replica.node,)

    def other(self, side: Side) -> Side:
        return self.acceptor if side is self.dialer else self.dialer

    def send(self, sender: Side, *, batch: bool = False) -> wire.Gossip | None:
        """Build on ``sender`` and deliver over the wire; the message as received."""
        if batch:  # the tick's send: the gossip, and a ping if one is due (not delivered)
            due = sender.view.due(self.now, *args(sender), batch=True)
            message = next((m for m in due if isinstance(m, wire.Gossip)), None)
        else:
            message = sender.build(self.now)
        if message is None:
            return None
        received = wire.decode(wire.encode(message))
        assert isinstance(received, wire.Gossip)
        self.other(sender).receive(received, self.now)
        return received

    def sync(self) -> None:
        """The start of a link: each side's first message (beats, digest) both ways, and the
        deltas the digests ask for."""
        for _ in range(2):
            self.send(self.dialer)
            self.send(self.acceptor)


ROLES = pytest.mark.parametrize("dialer_is_eu", [True, False], ids=["eu-dials", "us-dials"])


def visible_keys(side: Side) -> set[tuple[str, str, str]]:
    return set(side.state.visible())


@ROLES
@pytest.mark.parametrize("writer", ["dialer", "acceptor"])
def test_a_change_on_one_side_reaches_the_other(dialer_is_eu: bool, writer: str) -> None:
    pair = Pair(dialer_is_eu)
    pair.sync()
    source = pair.dialer if writer == "dialer" else pair.acceptor
    sink = pair.other(source)
    source.state.put("lobby", "ann", "s1", {"x": 1})
    assert source.view.at_boundary(True)
    message = pair.send(source, batch=True)
    assert message is not None and message.batch
    assert [d.replica for d in message.deltas] == [source.replica]
    assert visible_keys(sink) == {("lobby", "ann", "s1")}
    assert sink.view.sent is not None and sink.view.sent[source.replica] == message.deltas[0].clock
    # Once sent, the change is not sent again: the view believes the peer holds it.
    assert not source.view.at_boundary(False)
    assert pair.send(source) is None


@ROLES
def test_no_deltas_flow_before_the_peers_first_digest(dialer_is_eu: bool) -> None:
    pair = Pair(dialer_is_eu)
    pair.dialer.state.put("lobby", "ann", "s1", {})
    first = pair.send(pair.dialer)
    assert first is not None and first.digest is not None and first.deltas == ()
    answer = pair.send(pair.acceptor)  # with its digest: now the dialer knows what it lacks
    assert answer is not None and answer.digest is not None
    assert pair.dialer.view.own_due
    second = pair.send(pair.dialer)
    assert second is not None and [d.full for d in second.deltas] == [True]
    assert visible_keys(pair.acceptor) == {("lobby", "ann", "s1")}


@ROLES
def test_a_digest_repairs_a_lost_message(dialer_is_eu: bool) -> None:
    pair = Pair(dialer_is_eu)
    pair.sync()
    source, sink = pair.dialer, pair.acceptor
    source.state.put("lobby", "ann", "s1", {})
    pair.send(source)
    source.state.put("lobby", "bob", "s2", {})
    source.view.own_due = True
    assert source.build(pair.now) is not None  # lost on the way
    source.state.put("lobby", "cy", "s3", {})
    source.view.own_due = True
    late = source.build(pair.now)
    assert late is not None and late.deltas[0].since > 0
    changes, wake = sink.receive(late, pair.now)
    # A gap: nothing applied, and the sink's writer wakes to send its digest.
    assert changes == [] and wake and sink.view.digest_due
    digest = pair.send(sink)
    assert digest is not None and digest.digest is not None
    assert source.view.own_due  # the digest says what the sink lacks: it goes at once
    repair = pair.send(source)
    assert repair is not None and repair.deltas
    assert visible_keys(sink) == {
        ("lobby", n, s) for n, s in [("ann", "s1"), ("bob", "s2"), ("cy", "s3")]
    }


@ROLES
def test_a_relayed_replica_reaches_the_far_side_and_not_back(dialer_is_eu: bool) -> None:
    """A third daemon's replica merged on one side is passed on to the other side, but not
    back to its origin, nor to a peer that has a direct link to it."""
    pair = Pair(dialer_is_eu)
    pair.sync()
    far = ReplicaId("ap", 7)
    relay, sink = pair.dialer, pair.acceptor
    far_state = PresenceState(far, "ap")
    far_state.put("lobby", "zed", "s9", {})
    delta = far_state.extract(far, 0)
    assert delta is not None
    relay.liveness.observe(Beat(far, 1, 0.0, delta.clock), pair.now)
    assert relay.state.merge(delta).outcome == "applied"
    sink.liveness.observe(Beat(far, 1, 0.0, delta.clock), pair.now)
    assert relay.view.passes_on([far])
    assert not relay.view.passes_on([sink.replica])  # (news of the peer itself)
    message = pair.send(relay)
    assert message is not None and [d.replica for d in message.deltas] == [far]
    assert ("lobby", "zed", "s9") in visible_keys(sink)
    # A peer that says it links to ap directly gets ap's news from ap, not relayed.
    relay.view.remote_links = frozenset({"ap"})
    assert not relay.view.passes_on([far])


@ROLES
def test_heartbeats_digests_and_pings_come_due_with_time(dialer_is_eu: bool) -> None:
    pair = Pair(dialer_is_eu)
    pair.sync()
    view = pair.dialer.view
    view.ping_due = False
    assert not view.at_boundary(False)
    assert not view.on_heartbeat(pair.now + 0.5)
    assert view.beat_due and not view.digest_due and not view.ping_due
    view.heard_at = pair.now + 2.0
    assert not view.on_heartbeat(pair.now + 2.0)
    assert view.digest_due and view.ping_due
    assert view.next_digest_at == pair.now + 4.0
    # A ping goes only with the tick's message; its pong measures the round trip once.
    due = view.due(pair.now + 2.0, *args(pair.dialer), batch=True)
    assert isinstance(due[-1], wire.PeerPing)
    assert view.on_pong(due[-1].id, pair.now + 2.25) == 0.25
    assert view.on_pong(due[-1].id, pair.now + 2.5) is None
    # A peer silent past the link timeout: the link is to be closed.
    assert view.on_heartbeat(pair.now + 4.6)


def args(side: Side) -> tuple[PresenceState, Liveness, RouteTable, tuple[str, ...]]:
    return side.state, side.liveness, side.routes, side.links


def test_a_link_idle_for_a_tick_sends_at_once_else_at_the_boundary() -> None:
    view = Pair(True).dialer.view
    view.own_due = False
    view.sent_tick = 10
    assert not view.poke(10) and not view.poke(11)  # sent in this tick or the previous one
    assert not view.own_due
    assert view.poke(12) and view.own_due


def test_the_batch_mark_says_which_links_a_flush_waits_for() -> None:
    view = Pair(True).dialer.view
    view.mark_batch(5, phase_s=0.002, hold_s=0.0075)  # early in tick 5
    assert view.awaited(6) and not view.awaited(5)
    view.mark_batch(6, phase_s=0.02, hold_s=0.0075)  # late in tick 6
    assert not view.awaited(7)


@pytest.mark.parametrize("first", ["eu-dialled", "us-dialled"])
def test_the_duplicate_link_rule_keeps_the_same_link_on_both_sides(first: str) -> None:
    """Both daemons dial each other; each sees the two links arrive in either order. Both
    keep the link dialled by the node whose name sorts first."""
    links = {"eu-dialled": "eu", "us-dialled": "us"}
    second = next(name for name in links if name != first)
    kept = {}
    for own, remote in (("eu", "us"), ("us", "eu")):
        for order in ((first, second), (second, first)):
            existing, new = order
            dialers = [dialer_of(own, remote, links[link] == own) for link in order]
            keep_old = keeps_existing(own, remote, dialers[0], dialers[1])
            kept[own, order] = existing if keep_old else new
    assert set(kept.values()) == {"eu-dialled"}


def test_a_bye_only_from_the_node_it_names() -> None:
    us = ReplicaId("us", 3)
    assert bye_accepted(us, us)
    assert not bye_accepted(ReplicaId("ap", 3), us)
    assert not bye_accepted(ReplicaId("us", 2), us)  # (an older incarnation's: not this link's)


def test_hello_checks() -> None:
    hello = wire.Hello("us", "us-east", 1)
    assert hello_problem(hello, "eu", None) is None
    assert hello_problem(hello, "eu", frozenset({"us"})) is None
    assert "certificate names" in str(hello_problem(hello, "eu", frozenset({"ap"})))
    assert "this node itself" in str(hello_problem(hello, "us", None))
    assert "not a hello" in str(hello_problem(wire.PeerPing(1), "eu", None))
    old = wire.Hello("us", "us-east", 1, version=wire.PEER_PROTOCOL_VERSION + 1)
    assert "version" in str(hello_problem(old, "eu", None))


def test_a_dead_replicas_link_states_are_not_learned() -> None:
    side = Side("eu", 0.0)
    ap = ReplicaId("ap", 1)
    side.liveness.observe(Beat(ap, 1, 0.0, 0), 0.0)
    side.liveness.retire(ap)
    states = [LinkState("ap", 1, 2, (("eu", 10),)), LinkState("us", 1, 1, ())]
    assert [s.node for s in live_link_states(states, side.liveness)] == ["us"]


def test_a_broken_delta_is_a_protocol_error() -> None:
    pair = Pair(True)
    pair.sync()
    bad = wire.Gossip(deltas=(Delta(pair.dialer.replica, "eu", 5, 3, (), full=False),))
    with pytest.raises(wire.PeerProtocolError):
        pair.acceptor.view.on_gossip(bad, pair.acceptor.state, pair.acceptor.liveness)
