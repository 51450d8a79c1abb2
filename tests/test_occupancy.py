"""Occupancy (count-only watchers), pure: the room index's counters, the node's watches and
flushes (presenced.core.occupancy, presenced.core.presence), the session rules and the
decoding of a count-only ``join``."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from test_presence import (  # the node's fakes
    THERE,
    Clock,
    FakeMember,
    RecordingOutputs,
    join,
    peer_changes,
)

from presenced.auth import anonymous_grant
from presenced.core import client_wire as w
from presenced.core.client_decode import decode_client_frame
from presenced.core.crdt import PresenceState, ReplicaId
from presenced.core.limits import Limits
from presenced.core.liveness import DOWN, UP, Transition
from presenced.core.presence import Presence
from presenced.core.session import SessionRules

# ---------------------------------------------------------------------- the counters


def recount(state: PresenceState, room: str) -> tuple[int, int]:
    """What the counters must say: the visible entries of ``room``, counted from scratch."""
    keys = [key for key in state.visible() if key[0] == room]
    return len(keys), len({user for _, user, _ in keys})


ROOMS = ("r0", "r1")
USERS = ("u0", "u1", "u2")
SESSIONS = ("s0", "s1")  # shared by the writers: a key may be held by two replicas (resume)
step = st.tuples(
    st.sampled_from(("put",) * 4 + ("remove",) * 3 + ("gossip",) * 2 + ("hide", "show", "drop")),
    st.integers(0, 1),  # which writer
    st.sampled_from(ROOMS),
    st.sampled_from(USERS),
    st.sampled_from(SESSIONS),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(step, min_size=20, max_size=80))
def test_counters_equal_a_recount_of_the_visible_entries_after_any_sequence(
    script: list[tuple[str, int, str, str, str]],
) -> None:
    """Joins, leaves, updates, keys held by two writers, hide, show and purge: the counters
    of every replica equal a recount after every step."""
    note(repr(script))
    writers = [PresenceState(ReplicaId("a", 1), "eu"), PresenceState(ReplicaId("b", 1), "us")]
    observer = PresenceState(ReplicaId("o", 1), "ap")
    everyone = [*writers, observer]

    def gossip(src: PresenceState, dst: PresenceState) -> None:
        for delta in src.missing(dst.digest()):
            if delta.replica in dst.partitions and not dst.partitions[delta.replica].up:
                continue  # hidden: liveness says it is down; a later show brings it back
            dst.merge(delta)

    for kind, which, room, user, session in script:
        writer = writers[which]
        other = writers[1 - which]
        if kind == "put":
            writer.put(room, user, session, {"n": len(script)})
        elif kind == "remove":
            writer.remove(room, user, session)
        elif kind == "gossip":
            gossip(writer, other)
            gossip(writer, observer)
        else:
            part = observer.partitions.get(writer.local)
            if part is None:
                continue
            if kind == "hide" and part.up:
                observer.hide(writer.local)
            elif kind == "show" and not part.up:
                observer.show(writer.local, part.clock)
            elif kind == "drop":
                observer.drop(writer.local)
        for state in everyone:
            for name in ROOMS:
                assert state.room_counts(name) == recount(state, name)
            assert set(state.index.room_users) == set(state.index.rooms)


def test_a_session_held_by_two_replicas_counts_once() -> None:
    here, there = PresenceState(ReplicaId("a", 1), "eu"), PresenceState(ReplicaId("b", 1), "us")
    here.put("r", "ann", "s1", {})
    there.merge(here.extract(here.local, 0))  # type: ignore[arg-type]
    there.put("r", "ann", "s1", {"moved": True})  # resumed on b: both hold it
    there.put("r", "ann", "s2", {})
    there.put("r", "bob", "s3", {})
    assert there.room_counts("r") == (3, 2)
    there.hide(here.local)  # the old copy goes: still one session
    assert there.room_counts("r") == (3, 2)
    there.remove("r", "ann", "s1")
    there.remove("r", "ann", "s2")
    assert there.room_counts("r") == (1, 1)
    there.remove("r", "bob", "s3")
    assert there.room_counts("r") == (0, 0) and there.index.room_users == {}


# ---------------------------------------------------------------------- the node


def watch(node: Presence, member: FakeMember, room: str, ref: Any = "w1") -> None:
    node.watch(member, room, ref)


def occupancies(member: FakeMember) -> list[tuple[int, int]]:
    return [(m["sessions"], m["users"]) for m in member.got if m["type"] == "occupancy"]


@pytest.fixture
def node() -> Presence:
    from test_presence import Counters

    clock = Clock()
    return Presence(
        ReplicaId("eu", 1),
        "eu",
        tick_s=0.025,
        down_after_s=3.0,
        purge_after_s=30.0,
        clock=clock,
        phase_clock=clock.phase,
        outputs=RecordingOutputs(),
        metrics=Counters(),
    )


def clock_of(node: Presence) -> Clock:
    assert isinstance(node.clock, Clock)
    return node.clock


def test_a_watcher_gets_the_counts_as_the_join_reply_and_is_no_presence(node: Presence) -> None:
    ann, bob, eve = FakeMember("ann", "a1"), FakeMember("ann", "a2"), FakeMember("eve", "e1")
    join(node, ann, "r", {})
    join(node, bob, "r", {})
    watch(node, eve, "r", ref=7)
    assert eve.got == [{"type": "occupancy", "ref": 7, "room": "r", "sessions": 2, "users": 1}]
    assert node.state.room_counts("r") == (2, 1)  # eve is not counted, nor in the CRDT
    assert all(key[1] != "eve" for key in node.state.visible())
    node.flush_dirty()
    assert all("eve" not in str(m) for m in ann.got)  # nobody sees the watcher


def test_counts_go_at_most_once_per_tick_and_only_when_they_change(node: Presence) -> None:
    clock = clock_of(node)
    eve, ann = FakeMember("eve", "e1"), FakeMember("ann", "a1")
    watch(node, eve, "r")
    join(node, ann, "r", {"x": 1})  # a quiet room: at once (the leading edge)
    assert occupancies(eve) == [(0, 0), (1, 1)]
    node.update(ann, "r", {"x": 2})  # an update changes no count: no frame, no flush
    bob, cy = FakeMember("bob", "b1"), FakeMember("cy", "c1")
    join(node, bob, "r", {})
    join(node, cy, "r", {})
    assert occupancies(eve) == [(0, 0), (1, 1)]  # this tick sent one already
    assert node.has_dirty and node.plan.flush_at == pytest.approx(100.025)
    node.flush_dirty()  # still the same tick: nothing
    assert occupancies(eve) == [(0, 0), (1, 1)]
    clock.now = node.plan.flush_at
    node.flush_dirty()  # the next tick: one frame with both joins
    assert occupancies(eve) == [(0, 0), (1, 1), (3, 3)]
    clock.now = 100.030
    join(node, dan := FakeMember("dan", "d1"), "r", {})
    node.leave(dan, "r")  # a join and a leave within a tick: no frame
    clock.now = 100.060  # (mid-tick: the phase clock's floats are coarse at a boundary)
    node.flush_dirty()
    assert occupancies(eve) == [(0, 0), (1, 1), (3, 3)]
    assert not node.has_dirty


def test_a_frame_is_encoded_once_for_all_watchers(node: Presence) -> None:
    outputs = node.outputs
    assert isinstance(outputs, RecordingOutputs)
    watchers = [FakeMember(f"w{i}", f"w{i}") for i in range(5)]
    for watcher in watchers:
        watch(node, watcher, "r")
    outputs.calls.clear()
    join(node, FakeMember("ann", "a1"), "r", {})
    assert outputs.named("frame").count(("frame", "occupancy")) == 1
    assert all(occupancies(watcher)[-1] == (1, 1) for watcher in watchers)


def test_a_room_with_watchers_and_no_member_here_counts_every_region(node: Presence) -> None:
    eve = FakeMember("eve", "e1")
    watch(node, eve, "r")
    assert node.feeds == {} and node.members == {}  # no feed: O(1) per room
    node.apply(peer_changes(node, ("cy", "c1", {}), ("cy", "c2", {}), ("dee", "d1", {})))
    assert occupancies(eve)[-1] == (3, 2)
    clock_of(node).now = 100.1
    node.on_transitions([Transition(THERE, DOWN)])  # the region goes down: its users leave
    assert occupancies(eve)[-1] == (0, 0)
    clock_of(node).now = 100.2
    node.on_transitions([Transition(THERE, UP)])
    assert occupancies(eve)[-1] == (3, 2)
    assert node.feeds == {}


def test_leave_and_disconnect_end_a_watch(node: Presence) -> None:
    eve, zed = FakeMember("eve", "e1"), FakeMember("zed", "z1")
    watch(node, eve, "r")
    watch(node, zed, "r")
    node.leave(eve, "r")
    node.disconnect(zed)
    assert node.watches.rooms == {} and node.watches.by_watcher == {}
    join(node, FakeMember("ann", "a1"), "r", {})
    assert occupancies(eve) == [(0, 0)] and occupancies(zed) == [(0, 0)]


def test_a_detached_session_stops_watching(node: Presence) -> None:
    eve = FakeMember("eve", "e1")
    watch(node, eve, "r")
    assert node.detach(eve) == []
    assert node.watches.rooms == {}


def test_a_member_that_watches_leaves_and_a_watcher_that_joins_stops_watching(
    node: Presence,
) -> None:
    ann, eve = FakeMember("ann", "a1"), FakeMember("eve", "e1")
    join(node, ann, "r", {})
    join(node, eve, "r", {})
    watch(node, eve, "r")
    assert occupancies(eve)[-1] == (1, 1)  # eve is no longer in the room
    assert node.state.room_counts("r") == (1, 1) and eve not in node.members["r"]
    join(node, eve, "r", {"back": True})
    assert node.watches.rooms == {}
    assert node.state.room_counts("r") == (2, 2)


# ---------------------------------------------------------------------- rules and wire

LIMITS = Limits(max_rooms_per_connection=2)


def test_watched_rooms_count_towards_the_rooms_limit() -> None:
    rules = SessionRules(LIMITS, now=0.0)
    rules.greeted(anonymous_grant("ann"))
    rules.join(w.Join(1, "a", view=w.VIEW_COUNT))
    rules.join(w.Join(2, "b"))
    with pytest.raises(w.ProtocolError) as info:
        rules.join(w.Join(3, "c", view=w.VIEW_COUNT))
    assert info.value.code == w.TOO_MANY_ROOMS
    rules.join(w.Join(4, "a"))  # switching a room's view is no new room
    rules.join(w.Join(5, "b", view=w.VIEW_COUNT))
    assert rules.rooms == {"a": None} and rules.watching == {"b": None}
    # A watcher may not update or broadcast; leave ends the watch.
    for message in (w.Update(6, "b", {}), w.Broadcast(7, "b", "e")):
        with pytest.raises(w.ProtocolError) as info:
            rules.update(message, None) if isinstance(message, w.Update) else rules.broadcast(
                message
            )
        assert info.value.code == w.NOT_JOINED
    assert rules.leave(w.Leave(8, "b")) == {"type": "left", "ref": 8, "room": "b"}
    assert rules.watching == {}


def test_a_count_only_join_decodes_and_is_strict() -> None:
    frame = '{"type":"join","room":"r","view":"count","ref":3}'
    assert decode_client_frame(frame, LIMITS) == w.Join(3, "r", {}, w.VIEW_COUNT)
    members = '{"type":"join","room":"r","view":"members","meta":{"a":1}}'
    assert decode_client_frame(members, LIMITS) == w.Join(None, "r", {"a": 1})
    for bad in (
        '{"type":"join","room":"r","view":"counts"}',
        '{"type":"join","room":"r","view":1}',
        '{"type":"join","room":"r","view":"count","meta":{}}',
    ):
        with pytest.raises(w.ProtocolError) as info:
            decode_client_frame(bad, LIMITS)
        assert info.value.code == w.BAD_REQUEST
    message = w.Join(3, "r", view=w.VIEW_COUNT)
    assert w.to_wire(message) == {"type": "join", "ref": 3, "room": "r", "view": "count"}
