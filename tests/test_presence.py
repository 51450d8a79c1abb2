"""The presence node (presenced.core.presence) with plain fakes: members that record what
they are sent, and outputs that record what the node asks of the daemon around it."""

from __future__ import annotations

import json
from typing import Any

import attrs
import pytest

from presenced.core.crdt import Change, PresenceState, ReplicaId
from presenced.core.liveness import DOWN, UP, Transition
from presenced.core.presence import Presence

TICK_S = 0.025
#: The phase clock runs ahead of the node's clock by a whole number of ticks: boundaries fall
#: on multiples of 25 ms of the node's clock.
PHASE_OFFSET = 1_700_000_000.0
HERE = ReplicaId("eu", 1)
THERE = ReplicaId("us", 1)


@attrs.define(eq=False)
class FakeMember:
    user: str
    session: str
    rooms: dict[str, None] = attrs.Factory(dict)
    got: list[dict[str, Any]] = attrs.Factory(list)
    closed: tuple[int, str] | None = None

    def push(self, frame: bytes, room: str | None = None) -> None:
        self.got.append(json.loads(frame))

    def send(self, message: dict[str, Any], room: str | None = None) -> None:
        self.got.append(message)

    def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)

    def types(self) -> list[str]:
        return [message["type"] for message in self.got]


@attrs.define
class Counters:
    updates_in: int = 0
    diffs_flushed: int = 0
    frames_out: int = 0

    def count_frames(self, count: int, size: int) -> None:
        self.frames_out += count


@attrs.define
class RecordingOutputs:
    """Records every call; answers the link questions with what a test sets."""

    calls: list[tuple[Any, ...]] = attrs.Factory(list)
    awaiting: bool = False
    pending: bool = False

    def frame(self, message: dict[str, Any]) -> bytes:
        self.calls.append(("frame", message["type"]))
        return json.dumps(message).encode()

    def local_changed(self) -> None:
        self.calls.append(("local_changed",))

    def awaiting_batches(self) -> bool:
        return self.awaiting

    def paced_pending(self) -> bool:
        return self.pending

    def flood(self, room: str, event: str, data: Any, user: str, session: str, region: str) -> None:
        self.calls.append(("flood", room, event, data, user, session, region))

    def request_digests(self) -> None:
        self.calls.append(("request_digests",))

    def replica_up(self, replica: ReplicaId) -> None:
        self.calls.append(("replica_up", replica))

    def replica_gone(self, replica: ReplicaId, status: str) -> None:
        self.calls.append(("replica_gone", replica, status))

    def user_appeared(self, user: str) -> None:
        self.calls.append(("user_appeared", user))

    def wake_at(self, at: float) -> None:
        self.calls.append(("wake_at", round(at, 6)))

    def named(self, name: str) -> list[tuple[Any, ...]]:
        return [call for call in self.calls if call[0] == name]


@attrs.define
class Clock:
    now: float = 100.0

    def __call__(self) -> float:
        return self.now

    def phase(self) -> float:
        return self.now + PHASE_OFFSET


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def outputs() -> RecordingOutputs:
    return RecordingOutputs()


@pytest.fixture
def node(clock: Clock, outputs: RecordingOutputs) -> Presence:
    return Presence(
        HERE,
        "eu",
        tick_s=TICK_S,
        down_after_s=3.0,
        purge_after_s=30.0,
        clock=clock,
        phase_clock=clock.phase,
        outputs=outputs,
        metrics=Counters(),
    )


def join(node: Presence, member: FakeMember, room: str, meta: dict[str, Any]) -> None:
    member.rooms[room] = None
    node.join(member, room, meta, "r1")


def peer_changes(node: Presence, *entries: tuple[str, str, dict[str, Any]]) -> list[Change]:
    """Entries put by the replica THERE, merged into the node's state as gossip would."""
    there = PresenceState(THERE, "us")
    for user, session, meta in entries:
        there.put("r", user, session, meta)
    delta = there.extract(THERE, 0)
    assert delta is not None
    return node.state.merge(delta).changes


def test_a_join_sends_the_state_then_the_join_diff(
    node: Presence, outputs: RecordingOutputs
) -> None:
    ann, bob = FakeMember("ann", "a1"), FakeMember("bob", "b1")
    join(node, ann, "r", {"x": 1})
    assert ann.types() == ["state", "diff"]
    assert ann.got[0]["ref"] == "r1" and ann.got[0]["presences"] == {}
    assert ann.got[1]["joins"] == {"ann": [{"session": "a1", "meta": {"x": 1}, "region": "eu"}]}
    # the node told the daemon: peers send it now, the ticker wakes at the next boundary
    assert ("local_changed",) in outputs.calls
    assert outputs.named("wake_at") == [("wake_at", 100.025)]
    assert ("user_appeared", "ann") in outputs.calls

    join(node, bob, "r", {"x": 2})
    assert bob.got[0]["type"] == "state"
    assert bob.got[0]["presences"] == {"ann": [{"session": "a1", "meta": {"x": 1}, "region": "eu"}]}
    # bob's join is in the tick's flush (the room flushed this tick already)
    assert ann.types() == ["state", "diff"]
    node.flush_dirty()
    assert ann.got[-1]["joins"] == {"bob": [{"session": "b1", "meta": {"x": 2}, "region": "eu"}]}
    assert bob.got[-1] == ann.got[-1]
    assert outputs.named("frame") == [("frame", "diff"), ("frame", "diff")]  # once per flush


def test_changes_read_at_a_boundary_poke_no_link(node: Presence, outputs: RecordingOutputs) -> None:
    ann = FakeMember("ann", "a1")
    join(node, ann, "r", {"x": 1})
    outputs.calls.clear()
    node.plan.start_boundary()
    node.reading_clients = True
    node.update(ann, "r", {"x": 2})
    node.reading_clients = False
    assert outputs.named("local_changed") == [] and outputs.named("wake_at") == []
    assert node.local_dirty  # the tick's gossip sends it


def test_a_leave_shows_at_the_next_flush_and_an_empty_room_is_forgotten(
    node: Presence, clock: Clock
) -> None:
    ann, bob = FakeMember("ann", "a1"), FakeMember("bob", "b1")
    join(node, ann, "r", {})
    join(node, bob, "r", {})
    node.flush_dirty()
    node.leave(bob, "r")
    assert ann.got[-1]["joins"] != {}  # not yet
    node.flush_dirty()
    assert ann.got[-1]["leaves"] == {"bob": [{"session": "b1", "meta": {}, "region": "eu"}]}
    node.disconnect(ann)
    assert node.members == {} and node.feeds == {}
    assert node.state.visible() == {}


def test_a_peers_changes_are_flushed_at_the_flush_time(
    node: Presence, clock: Clock, outputs: RecordingOutputs
) -> None:
    ann = FakeMember("ann", "a1")
    join(node, ann, "r", {})
    clock.now = 100.026  # 1 ms into the next tick: the room flushed a tick ago, still busy
    outputs.calls.clear()
    outputs.awaiting = True  # a near peer's batch of this tick is still to come
    node.apply(peer_changes(node, ("cy", "c1", {"x": 1})), from_peer=True)
    assert ann.types() == ["state", "diff"]  # held
    hold_until = 100.025 + node.plan.hold_s
    assert outputs.named("wake_at") == [("wake_at", round(hold_until, 6))]
    assert node.plan.flush_at == pytest.approx(hold_until)
    assert ("user_appeared", "cy") in outputs.calls  # messaging hears of every join

    clock.now = node.plan.flush_at
    assert node.plan.take_flush(clock.now)
    node.flush_dirty()
    assert ann.got[-1]["joins"] == {"cy": [{"session": "c1", "meta": {"x": 1}, "region": "us"}]}


def test_a_peers_changes_flush_at_once_with_no_batch_to_wait_for(
    node: Presence, clock: Clock, outputs: RecordingOutputs
) -> None:
    ann = FakeMember("ann", "a1")
    join(node, ann, "r", {})
    clock.now = 100.026
    outputs.calls.clear()
    node.apply(peer_changes(node, ("cy", "c1", {})), from_peer=True)
    assert outputs.named("wake_at") == [("wake_at", 100.026)]  # the ticker flushes now


def test_a_quiet_room_flushes_a_change_at_once(node: Presence, clock: Clock) -> None:
    ann, bob = FakeMember("ann", "a1"), FakeMember("bob", "b1")
    join(node, ann, "r", {})
    join(node, bob, "r", {})
    node.flush_dirty()
    clock.now = 100.080  # no flush since the previous tick began
    node.update(ann, "r", {"x": 9})
    assert bob.got[-1]["updates"] == {"ann": [{"session": "a1", "meta": {"x": 9}, "region": "eu"}]}


def test_liveness_transitions_show_and_hide_a_replicas_entries(
    node: Presence, outputs: RecordingOutputs
) -> None:
    ann = FakeMember("ann", "a1")
    join(node, ann, "r", {})
    node.apply(peer_changes(node, ("cy", "c1", {})), from_peer=True)
    node.flush_dirty()
    outputs.calls.clear()

    node.on_transitions([Transition(THERE, DOWN)])
    assert ann.got[-1]["leaves"] == {"cy": [{"session": "c1", "meta": {}, "region": "us"}]}
    assert outputs.named("replica_gone") == [("replica_gone", THERE, DOWN)]

    node.on_transitions([Transition(THERE, UP)])
    assert ann.got[-1]["joins"] == {"cy": [{"session": "c1", "meta": {}, "region": "us"}]}
    assert outputs.named("request_digests") == [("request_digests",)]
    assert outputs.named("replica_up") == [("replica_up", THERE)]


def test_a_broadcast_reaches_members_and_floods_once(
    node: Presence, outputs: RecordingOutputs
) -> None:
    ann, bob = FakeMember("ann", "a1"), FakeMember("bob", "b1")
    join(node, ann, "r", {})
    join(node, bob, "r", {})
    before = len(ann.got)
    node.broadcast(ann, "r", "wave", {"hi": 1}, echo=False)
    assert len(ann.got) == before  # no echo
    assert bob.got[-1]["type"] == "broadcast" and bob.got[-1]["data"] == {"hi": 1}
    assert outputs.named("flood") == [("flood", "r", "wave", {"hi": 1}, "ann", "a1", "eu")]


def test_a_resumed_session_gets_fresh_state_and_its_messages(
    node: Presence, outputs: RecordingOutputs
) -> None:
    ann = FakeMember("ann", "a1")
    node.identified(ann)
    join(node, ann, "r", {"x": 1})
    rooms = node.detach(ann)
    assert rooms == ["r"] and node.user_connections("ann") == []
    assert node.state.get("r", "ann", "a1") == {"x": 1}  # still seen by everyone
    again = FakeMember("ann", "a1", rooms=dict.fromkeys(rooms))
    outputs.calls.clear()
    node.attach(again)
    assert again.got[0]["type"] == "state" and "ref" not in again.got[0]
    assert outputs.calls == [("user_appeared", "ann")]


def test_close_all_closes_every_connection(node: Presence) -> None:
    ann = FakeMember("ann", "a1")
    node.connections.add(ann)
    node.close_all(1001, "server shutting down")
    assert ann.closed == (1001, "server shutting down")
