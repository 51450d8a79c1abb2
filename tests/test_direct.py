"""The direct-message machine (presenced.core.direct) as plain unit tests: a dict store, a
fake world, clocks passed in, effects read as data. No SQLite, no trio, no network."""

from __future__ import annotations

from collections import deque
from typing import Any

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st

from presenced.core import peer_wire as wire
from presenced.core import protocol
from presenced.core.answers import FAST_ANSWER_S, ClusterView
from presenced.core.direct import (
    ACK_TIMEOUT_S,
    HOP_LIMIT,
    SWEEP_INTERVAL_S,
    WINDOW,
    DirectMessages,
)
from presenced.core.direct_effects import (
    CommitSoon,
    Effect,
    Forward,
    Reply,
    Show,
    TellSender,
    Wake,
)
from presenced.testing.memory_store import MemoryStore

EXPIRE_AT = 1e9


@attrs.define
class Counters:
    messages_sent: int = 0
    messages_stored: int = 0
    messages_delivered: int = 0
    errors: dict[str, int] = attrs.field(factory=dict)

    def count_message_error(self, code: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1


@attrs.define
class World:
    """Where users are, and the next hop to each node (``hops``; absent: no route)."""

    where: dict[str, list[str]] = attrs.field(factory=dict)
    hops: dict[str, str] = attrs.field(factory=dict)
    here: set[str] = attrs.field(factory=set)
    view: ClusterView = attrs.field(
        factory=lambda: ClusterView(settled=True, known=frozenset(), reachable=frozenset())
    )

    def user_nodes(self, user: str) -> list[str]:
        return self.where.get(user, [])

    def next_hop(self, dest: str) -> str | None:
        return self.hops.get(dest)

    def has_sessions(self, user: str) -> bool:
        return user in self.here

    def cluster_view(self, now: float) -> ClusterView:
        return self.view


def machine(
    name: str = "eu", world: World | None = None, store: MemoryStore | None = None
) -> tuple[DirectMessages[str], World, MemoryStore, Counters]:
    world = world or World()
    store = store or MemoryStore()
    counters = Counters()
    return DirectMessages(name, name, f"{name}.1", store, world, counters), world, store, counters


def fast(to: str, data: Any = "hi", ref: int = 1) -> protocol.Send:
    return protocol.Send(ref, (to,), data, protocol.FAST, False)


def reliable(to: str, data: Any = "hi", ref: int = 1) -> protocol.Send:
    return protocol.Send(ref, (to,), data, protocol.RELIABLE, False)


def of(kind: type, effects: list[Effect[str]]) -> list[Any]:
    return [effect for effect in effects if isinstance(effect, kind)]


def direct(id: str = "ap.1.1", dest: str = "eu", hops: int = HOP_LIMIT, **kw: Any) -> wire.Direct:
    fields: dict[str, Any] = dict(
        id=id,
        origin="ap",
        dest=dest,
        hops=hops,
        sender="ann",
        session="s1",
        region="ap",
        to="bob",
        group=(),
        data="hi",
        reliable=False,
    )
    fields.update(kw)
    return wire.Direct(**fields)


# ---------------------------------------------------------------------- origin, fast


def test_a_fast_message_to_a_local_user_is_shown_and_confirmed_at_once() -> None:
    m, world, _, counters = machine()
    world.where["bob"] = ["eu"]
    world.here.add("bob")
    effects = m.send("ann-tab", "ann", "s1", fast("bob"), now=0.0, wall_s=100.0)
    [show] = of(Show, effects)
    assert show.user == "bob" and show.frame["from"] == "ann" and show.frame["data"] == "hi"
    assert show.frame["sent_at"] == 100_000
    [told] = of(TellSender, effects)
    assert told.conn == "ann-tab" and told.frame["type"] == "delivered"
    assert told.frame["ref"] == 1 and told.frame["to"] == "bob"
    assert counters.messages_sent == 1 and counters.messages_delivered == 1
    assert m.status()["fast_unanswered"] == 0


def test_a_fast_message_goes_to_every_node_of_the_recipient_by_its_next_hop() -> None:
    m, world, _, _ = machine()
    world.where["bob"] = ["ap", "us"]
    world.hops.update(ap="us", us="us")
    effects = m.send("tab", "ann", "s1", fast("bob"), now=0.0, wall_s=0.0)
    forwards = of(Forward, effects)
    assert [(f.hop, f.message.dest, f.message.hops) for f in forwards] == [
        ("us", "ap", HOP_LIMIT),
        ("us", "us", HOP_LIMIT),
    ]
    assert not of(TellSender, effects)


def test_a_fast_message_to_nobody_online_is_refused() -> None:
    m, _, _, counters = machine()
    [told] = of(TellSender, m.send("tab", "ann", "s1", fast("bob"), 0.0, 0.0))
    assert told.frame["code"] == protocol.NOT_ONLINE
    assert counters.errors == {protocol.NOT_ONLINE: 1}


def test_an_unanswered_fast_message_is_answered_timeout_and_a_late_error_is_not_sent() -> None:
    m, world, _, _ = machine()
    world.where["bob"] = ["ap"]
    world.hops["ap"] = "ap"
    [forward] = of(Forward, m.send("tab", "ann", "s1", fast("bob"), 0.0, 0.0))
    assert m.wake_at(0.0, EXPIRE_AT) == SWEEP_INTERVAL_S
    assert not of(TellSender, m.sweep(FAST_ANSWER_S - 0.01, 0.0))
    [told] = of(TellSender, m.sweep(FAST_ANSWER_S, 0.0))
    assert told.frame["code"] == protocol.TIMEOUT and told.frame["id"] == forward.message.id
    late_error = wire.Receipt(
        forward.message.id, "ap", "eu", HOP_LIMIT, wire.ERROR, "bob", "ap", protocol.NOT_ONLINE
    )
    assert not of(TellSender, m.on_routed(late_error, "ap", FAST_ANSWER_S + 1, 0.0))
    late_delivered = attrs.evolve(late_error, kind=wire.DELIVERED, code="")
    [told] = of(TellSender, m.on_routed(late_delivered, "ap", FAST_ANSWER_S + 1, 0.0))
    assert told.frame["type"] == "delivered"  # still true, so still passed on


def test_a_link_that_cannot_take_a_copy_is_an_unreachable_error() -> None:
    m, world, _, _ = machine()
    world.where["bob"] = ["ap"]
    world.hops["ap"] = "ap"
    [forward] = of(Forward, m.send("tab", "ann", "s1", fast("bob"), 0.0, 0.0))
    [told] = of(TellSender, m.unsendable(forward.message, 0.0, 0.0))
    assert told.frame["code"] == protocol.UNREACHABLE


# ---------------------------------------------------------------------- origin, reliable


def test_stored_and_the_first_copy_wait_for_the_commit() -> None:
    m, world, store, counters = machine()
    world.where["bob"] = ["ap"]
    world.hops["ap"] = "ap"
    effects = m.send("tab", "ann", "s1", reliable("bob"), 0.0, 50.0)
    assert effects == [CommitSoon()] and store.in_batch and store.pending_total() == 1
    effects = m.flush(0.025, 50.0)
    [stored] = of(Reply, effects)
    assert stored.frame == {"type": "stored", "ref": 1, "id": "eu.1.1"}
    [copy] = of(Forward, effects)
    assert copy.message.reliable and copy.message.seq == 1 and copy.message.prev == 0
    assert copy.message.attempt == 0 and copy.message.sent_at == 50_000
    assert counters.messages_stored == 1 and m.pending_users == {"bob"}


def test_a_failed_commit_refuses_the_batch_with_internal() -> None:
    m, world, store, counters = machine()
    world.where["bob"] = ["ap"]
    world.hops["ap"] = "ap"
    m.send("tab", "ann", "s1", reliable("bob"), 0.0, 0.0)
    store.fail_commits = 1
    effects = m.flush(0.025, 0.0)
    [refused] = of(Reply, effects)
    assert refused.frame["code"] == protocol.INTERNAL and refused.frame["ref"] == 1
    assert not of(Forward, effects) and store.pending_total() == 0
    assert counters.errors == {protocol.INTERNAL: 1}


def test_an_unconfirmed_copy_is_sent_again_after_the_ack_timeout() -> None:
    m, world, _, _ = machine()
    world.where["bob"] = ["ap"]
    world.hops["ap"] = "ap"
    m.send("tab", "ann", "s1", reliable("bob"), 0.0, 0.0)
    [first] = of(Forward, m.flush(0.0, 0.0))
    assert not of(Forward, m.sweep(ACK_TIMEOUT_S - 0.01, 0.0))
    [again] = of(Forward, m.sweep(ACK_TIMEOUT_S, 0.0))
    assert again.message == attrs.evolve(first.message, attempt=1)


def test_at_most_a_window_of_copies_is_in_flight_per_recipient() -> None:
    m, world, store, _ = machine()
    for n in range(WINDOW + 10):
        store.add(f"x.{n}", "ann", "s1", ["bob"], n, 0.0)
    m, _, _, _ = machine(world=world, store=store)  # restarts with messages pending
    world.where["bob"] = ["ap"]
    world.hops["ap"] = "ap"
    copies = of(Forward, m.sweep(0.0, 0.0))
    assert len(copies) == WINDOW
    assert [c.message.prev for c in copies[:3]] == [0, 1, 2]  # each names its predecessor
    confirm = wire.Receipt("x.0", "ap", "eu", HOP_LIMIT, wire.DELIVERED, "bob", "ap")
    assert not of(Forward, m.on_routed(confirm, "ap", 0.1, 0.0))  # topped up at the sweep
    [next_copy] = of(Forward, m.sweep(0.2, 0.0))
    assert next_copy.message.id == f"x.{WINDOW}"


def test_one_delivered_per_recipient_and_region_then_the_message_is_gone() -> None:
    m, world, store, _ = machine()
    world.where["bob"] = ["ap"]
    world.hops["ap"] = "ap"
    m.send("tab", "ann", "s1", reliable("bob"), 0.0, 0.0)
    m.flush(0.0, 0.0)
    receipt = wire.Receipt("eu.1.1", "ap", "eu", HOP_LIMIT, wire.DELIVERED, "bob", "ap")
    [told] = of(TellSender, m.on_routed(receipt, "ap", 0.1, 0.0))
    assert told.frame["type"] == "delivered"
    again = attrs.evolve(receipt, attempt=1)  # a retransmission confirmed again
    assert not of(TellSender, m.on_routed(again, "ap", 0.2, 0.0))
    m.flush(0.3, 0.0)
    assert store.pending_total() == 0 and m.pending_users == set()


# ---------------------------------------------------------------------- forwarder


def test_a_forwarded_copy_loses_one_hop() -> None:
    m, world, _, _ = machine("us")
    world.hops["eu"] = "eu"
    [forward] = of(Forward, m.on_routed(direct(hops=5), "ap", 0.0, 0.0))
    assert forward.hop == "eu" and forward.message.hops == 4


def test_a_copy_out_of_hops_or_seen_from_another_link_is_an_error_for_the_origin() -> None:
    m, world, _, _ = machine("us")
    world.hops.update(eu="eu", ap="ap")
    [error] = of(Forward, m.on_routed(direct(hops=1), "ap", 0.0, 0.0))
    assert error.hop == "ap" and error.message.kind == wire.ERROR
    assert error.message.code == protocol.HOP_LIMIT and error.message.dest == "ap"
    looping = direct("ap.1.2")
    assert of(Forward, m.on_routed(looping, "ap", 0.0, 0.0))[0].hop == "eu"
    assert m.on_routed(looping, "ap", 0.0, 0.0) == []  # the same link twice: a duplicate
    [error] = of(Forward, m.on_routed(looping, "eu", 0.0, 0.0))
    assert error.message.kind == wire.ERROR and error.message.code == protocol.HOP_LIMIT


# ---------------------------------------------------------------------- recipient daemon


def test_a_reliable_copy_is_shown_once_and_confirmed_after_the_commit() -> None:
    m, world, store, _ = machine()
    world.here.add("bob")
    world.hops["ap"] = "ap"
    copy = direct(reliable=True, seq=7)
    effects = m.on_routed(copy, "ap", 0.0, 0.0)
    assert [type(e) for e in effects] == [Show, CommitSoon]  # delivered waits for the commit
    [receipt] = of(Forward, m.flush(0.025, 0.0))
    assert receipt.message.kind == wire.DELIVERED and store.last_delivered("ap", "ann", "bob") == 7
    retransmitted = attrs.evolve(copy, attempt=1)
    effects = m.on_routed(retransmitted, "ap", 1.0, 0.0)
    assert not of(Show, effects)  # confirmed again, never shown twice
    assert of(Forward, effects)[0].message.kind == wire.DELIVERED


def test_a_copy_whose_predecessor_was_not_shown_is_deferred() -> None:
    m, world, _, _ = machine()
    world.here.add("bob")
    world.hops["ap"] = "ap"
    effects = m.on_routed(direct(reliable=True, seq=8, prev=7), "ap", 0.0, 0.0)
    assert not of(Show, effects)
    assert of(Forward, effects)[0].message.kind == wire.DEFERRED


def test_read_receipts_once_per_user_and_only_for_messages_shown_to_them() -> None:
    m, world, _, _ = machine()
    world.here.add("bob")
    world.hops["ap"] = "ap"
    m.on_routed(direct(), "ap", 0.0, 0.0)
    [read] = of(Forward, m.mark_read("bob", protocol.MarkRead(None, "ap.1.1"), 1.0, 0.0))
    assert read.message.kind == wire.READ and read.message.dest == "ap"
    assert m.mark_read("bob", protocol.MarkRead(None, "ap.1.1"), 2.0, 0.0) == []
    try:
        m.mark_read("carl", protocol.MarkRead(3, "ap.1.1"), 2.0, 0.0)
    except protocol.ProtocolError as exc:
        assert exc.code == protocol.BAD_REQUEST and exc.ref == 3
    else:
        raise AssertionError("carl was never shown ap.1.1")


# ---------------------------------------------------------------------- fetch and timers


def test_a_fetch_alone_in_its_cluster_pulls_from_itself_and_answers_complete() -> None:
    m, world, store, _ = machine()
    store.add("x.1", "ann", "s1", ["bob"], "hello", 0.0)
    world.here.add("bob")
    effects = m.fetch("bob-tab", "bob", protocol.Fetch(9, 10), 0.0, 0.0)
    [shown] = of(Show, effects)
    assert shown.frame["data"] == "hello"
    [answer] = of(Reply, effects)
    assert answer.if_connected and answer.conn == "bob-tab"
    assert answer.frame == {
        "type": "fetched",
        "ref": 9,
        "count": 1,
        "remaining": 0,
        "complete": True,
    }


def test_an_idle_machine_sleeps_until_the_expiry_pass() -> None:
    m, world, _, _ = machine()
    assert m.wake_at(0.0, 60.0) == 60.0  # nothing can time out: no sweep twice a second
    world.where["bob"] = ["ap"]
    world.hops["ap"] = "ap"
    effects = m.send("tab", "ann", "s1", fast("bob"), 1.0, 0.0)
    assert Wake() in effects  # a deadline appeared: the sleeping loop is woken once
    assert m.wake_at(1.0, 60.0) == 1.0 + SWEEP_INTERVAL_S


# ---------------------------------------------------------------------- a law


@attrs.define
class Pair:
    """Two machines linked back to back (eu ↔ ap) and the copies on the wire between them."""

    eu: DirectMessages[str]
    ap: DirectMessages[str]
    wire: deque[tuple[str, wire.Routed]] = attrs.field(factory=deque)
    shown: list[Any] = attrs.field(factory=list)
    now: float = 0.0

    def take(self, at: str, effects: list[Effect[str]]) -> None:
        for effect in effects:
            if isinstance(effect, Forward):
                self.wire.append((effect.hop, effect.message))
            elif isinstance(effect, Show) and at == "ap":
                self.shown.append(effect.frame["data"])

    def deliver(self) -> None:
        hop, message = self.wire.popleft()
        to = self.ap if hop == "ap" else self.eu
        self.take(hop, to.on_routed(message, "eu" if hop == "ap" else "ap", self.now, 0.0))

    def tick(self, seconds: float) -> None:
        self.now += seconds
        self.take("eu", self.eu.sweep(self.now, 0.0))
        self.take("ap", self.ap.sweep(self.now, 0.0))


@settings(max_examples=60, deadline=None)
@given(
    count=st.integers(1, 8),
    steps=st.lists(st.sampled_from(["deliver", "drop", "dup", "swap", "tick"]), max_size=80),
)
def test_reliable_messages_are_shown_once_in_order_whatever_the_wire_does(
    count: int, steps: list[str]
) -> None:
    eu_world = World(where={"bob": ["ap"]}, hops={"ap": "ap"})
    ap_world = World(where={"bob": ["ap"]}, hops={"eu": "eu"}, here={"bob"})
    pair = Pair(machine("eu", eu_world)[0], machine("ap", ap_world)[0])
    for n in range(count):
        pair.take("eu", pair.eu.send("tab", "ann", "s1", reliable("bob", n, n), 0.0, 0.0))
    pair.take("eu", pair.eu.flush(0.0, 0.0))
    for step in steps:  # the wire loses, duplicates and reorders; time passes
        if step == "tick":
            pair.tick(1.0)
        elif pair.wire and step == "deliver":
            pair.deliver()
        elif pair.wire and step == "drop":
            pair.wire.popleft()
        elif pair.wire and step == "dup":
            pair.wire.append(pair.wire[0])
        elif len(pair.wire) > 1 and step == "swap":
            pair.wire[0], pair.wire[1] = pair.wire[1], pair.wire[0]
        pair.take("ap", pair.ap.flush(pair.now, 0.0))
    for _ in range(4 * count + 4):  # then it heals
        while pair.wire:
            pair.deliver()
        pair.take("ap", pair.ap.flush(pair.now, 0.0))
        pair.take("eu", pair.eu.flush(pair.now, 0.0))
        pair.tick(ACK_TIMEOUT_S)
    assert pair.shown == list(range(count))
    assert pair.eu.store.pending_total() == 0
