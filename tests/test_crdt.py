"""Unit tests for the presence CRDT (presenced.core.crdt)."""

from __future__ import annotations

import pytest

from presenced.core.crdt import (
    JOIN,
    LEAVE,
    UPDATE,
    Change,
    Delta,
    DeltaError,
    MergeResult,
    PresenceState,
    ReplicaId,
)

A = ReplicaId("a", 1)
B = ReplicaId("b", 1)
C = ReplicaId("c", 1)


def state(replica: ReplicaId = A, region: str | None = None, **kw: int) -> PresenceState:
    return PresenceState(replica, region or f"region-{replica.node}", **kw)


def sync(dst: PresenceState, src: PresenceState) -> list[Change]:
    """One anti-entropy answer from src to dst; every delta must apply."""
    changes: list[Change] = []
    for delta in src.missing(dst.digest()):
        result = dst.merge(delta)
        assert result.outcome == "applied", (delta, result)
        changes.extend(result.changes)
    return changes


def live(s: PresenceState, replica: ReplicaId) -> dict:
    return dict(s.partitions[replica].live())


# ---------------------------------------------------------------------- local writes


def test_put_join_then_update() -> None:
    s = state()
    c1 = s.put("room", "u1", "s1", {"x": 1})
    assert c1 == Change(JOIN, "room", "u1", "s1", {"x": 1}, "region-a")
    c2 = s.put("room", "u1", "s1", {"x": 2})
    assert c2 == Change(UPDATE, "room", "u1", "s1", {"x": 2}, "region-a")
    assert s.get("room", "u1", "s1") == {"x": 2}
    assert s.get("room", "u1", "other") is None
    assert s.digest() == {A: 2}
    assert s.visible() == {("room", "u1", "s1"): ({"x": 2}, "region-a")}


def test_remove_returns_leave_with_last_meta() -> None:
    s = state()
    s.put("room", "u1", "s1", {"x": 1})
    s.put("room", "u1", "s1", {"x": 2})
    leave = s.remove("room", "u1", "s1")
    assert leave == Change(LEAVE, "room", "u1", "s1", {"x": 2}, "region-a")
    assert s.get("room", "u1", "s1") is None
    assert s.visible() == {}
    assert list(s.rooms()) == []
    assert s.digest() == {A: 3}
    assert s.own.tombstones == 1


def test_remove_absent_is_none_and_takes_no_counter() -> None:
    s = state()
    assert s.remove("room", "u1", "s1") is None
    assert s.digest() == {A: 0}
    s.put("room", "u1", "s1", {})
    s.remove("room", "u1", "s1")
    assert s.remove("room", "u1", "s1") is None  # removing a tombstone: nothing
    assert s.digest() == {A: 2}


def test_put_after_remove_is_a_join_and_clears_the_tombstone() -> None:
    s = state()
    s.put("room", "u1", "s1", {"x": 1})
    s.remove("room", "u1", "s1")
    assert s.own.tombstones == 1
    change = s.put("room", "u1", "s1", {"x": 3})
    assert change.kind == JOIN
    assert s.own.tombstones == 0
    assert s.own.live_count() == 1


def test_tombstone_limit_must_be_positive() -> None:
    with pytest.raises(ValueError):
        PresenceState(A, "r", tombstone_limit=0)


# ---------------------------------------------------------------------- reading


def test_room_presences_and_rooms() -> None:
    a, b = state(A), state(B)
    a.put("lobby", "u1", "s1", {"c": 1})
    a.put("lobby", "u2", "s2", {"c": 2})
    a.put("other", "u1", "s3", {"c": 3})
    b.put("lobby", "u3", "s4", {"c": 4})
    sync(b, a)
    assert sorted(b.room_presences("lobby")) == [
        ("u1", "s1", {"c": 1}, "region-a"),
        ("u2", "s2", {"c": 2}, "region-a"),
        ("u3", "s4", {"c": 4}, "region-b"),
    ]
    assert list(b.room_presences("other")) == [("u1", "s3", {"c": 3}, "region-a")]
    assert list(b.room_presences("nowhere")) == []
    assert sorted(b.rooms()) == ["lobby", "other"]
    a.remove("other", "u1", "s3")
    sync(b, a)
    assert sorted(b.rooms()) == ["lobby"]


def test_digest_reports_every_partition() -> None:
    a, b = state(A), state(B)
    a.put("r", "u", "s1", {})
    a.put("r", "u", "s2", {})
    b.put("r", "v", "s3", {"k": 1})
    sync(b, a)
    assert b.digest() == {A: 2, B: 1}
    assert a.digest() == {A: 2}


# ---------------------------------------------------------------------- extraction


def test_extract_since_zero_is_full_without_tombstones() -> None:
    s = state()
    s.put("r", "u1", "s1", {"n": 1})
    s.put("r", "u2", "s2", {"n": 2})
    s.remove("r", "u1", "s1")
    s.put("r", "u3", "s3", {"n": 3})
    delta = s.extract(A, 0)
    assert delta == Delta(
        A,
        "region-a",
        0,
        4,
        ((("r", "u2", "s2"), 2, {"n": 2}), (("r", "u3", "s3"), 4, {"n": 3})),
        full=True,
    )


def test_extract_nothing_new_is_none() -> None:
    s = state()
    assert s.extract(A, 0) is None  # empty partition
    s.put("r", "u", "s", {"n": 1})
    assert s.extract(A, 1) is None
    assert s.extract(A, 7) is None  # a peer claiming to be ahead: nothing to send
    assert s.extract(B, 0) is None  # unknown replica


def test_extract_partial_has_only_newer_records_in_order() -> None:
    s = state()
    s.put("r", "u1", "s1", {"n": 1})  # 1
    s.put("r", "u2", "s2", {"n": 2})  # 2
    s.put("r", "u3", "s3", {"n": 3})  # 3
    s.remove("r", "u2", "s2")  # 4
    s.put("r", "u1", "s1", {"n": 5})  # 5
    s.put("r", "u4", "s4", {"n": 6})  # 6
    delta = s.extract(A, 3)
    assert delta is not None
    assert not delta.full
    assert (delta.since, delta.clock) == (3, 6)
    assert delta.records == (
        (("r", "u2", "s2"), 4, None),
        (("r", "u1", "s1"), 5, {"n": 5}),
        (("r", "u4", "s4"), 6, {"n": 6}),
    )
    delta = s.extract(A, 1)
    assert delta is not None
    # u1's write at 1 was overwritten at 5, so it appears once, at its latest counter.
    assert [counter for _, counter, _ in delta.records] == [3, 4, 5, 6]


def test_missing_answers_a_digest() -> None:
    a, b, c = state(A), state(B), state(C)
    a.put("r", "u", "s1", {})
    b.put("r", "u", "s2", {})
    sync(c, b)
    sync(a, c)  # a now relays b's partition
    deltas = {d.replica: d for d in a.missing({A: 0, B: 1})}
    assert set(deltas) == {A}
    deltas = {d.replica: d for d in a.missing({})}
    assert set(deltas) == {A, B}
    assert all(d.full for d in deltas.values())


# ---------------------------------------------------------------------- merging


def test_merge_applied_emits_joins_updates_leaves() -> None:
    a, b = state(A), state(B)
    a.put("r", "u1", "s1", {"n": 1})
    a.put("r", "u2", "s2", {"n": 2})
    result = b.merge(a.extract(A, 0))
    assert result.outcome == "applied"
    assert sorted(result.changes, key=lambda c: c.user) == [
        Change(JOIN, "r", "u1", "s1", {"n": 1}, "region-a"),
        Change(JOIN, "r", "u2", "s2", {"n": 2}, "region-a"),
    ]
    a.put("r", "u1", "s1", {"n": 3})
    a.remove("r", "u2", "s2")
    a.put("r", "u5", "s5", {"n": 5})
    result = b.merge(a.extract(A, 2))
    assert result.outcome == "applied"
    assert result.changes == [
        Change(UPDATE, "r", "u1", "s1", {"n": 3}, "region-a"),
        Change(LEAVE, "r", "u2", "s2", {"n": 2}, "region-a"),
        Change(JOIN, "r", "u5", "s5", {"n": 5}, "region-a"),
    ]
    assert b.digest()[A] == 5
    assert live(b, A) == live(a, A)


def test_merge_duplicate_is_stale() -> None:
    a, b = state(A), state(B)
    a.put("r", "u1", "s1", {"n": 1})
    delta = a.extract(A, 0)
    assert b.merge(delta).outcome == "applied"
    again = b.merge(delta)
    assert again.outcome == "stale"
    assert again.changes == []


def test_merge_older_delta_cannot_resurrect_a_leave() -> None:
    a, b = state(A), state(B)
    a.put("r", "u1", "s1", {"n": 1})
    old = a.extract(A, 0)
    a.remove("r", "u1", "s1")
    b.merge(a.extract(A, 0))
    assert b.visible() == {}
    result = b.merge(old)
    assert result.outcome == "stale"
    assert result.changes == []
    assert b.visible() == {}


def test_merge_overlapping_delta_skips_known_records() -> None:
    a, b = state(A), state(B)
    a.put("r", "u1", "s1", {"n": 1})  # 1
    a.put("r", "u2", "s2", {"n": 2})  # 2
    a.put("r", "u3", "s3", {"n": 3})  # 3
    b.merge(a.extract(A, 0))
    a.put("r", "u4", "s4", {"n": 4})  # 4
    delta = a.extract(A, 1)  # (1, 4]: records 2 and 3 are already known to b
    assert delta is not None and len(delta.records) == 3
    result = b.merge(delta)
    assert result.outcome == "applied"
    assert result.changes == [Change(JOIN, "r", "u4", "s4", {"n": 4}, "region-a")]
    assert b.digest()[A] == 4
    assert live(b, A) == live(a, A)


def test_merge_gap() -> None:
    a, b = state(A), state(B)
    a.put("r", "u1", "s1", {"n": 1})
    a.put("r", "u2", "s2", {"n": 2})
    a.put("r", "u3", "s3", {"n": 3})
    result = b.merge(a.extract(A, 2))
    assert result.outcome == "gap"
    assert result.changes == []
    assert b.visible() == {}
    assert b.digest() == {A: 0, B: 0}
    b.merge(a.extract(A, 0))
    a.put("r", "u4", "s4", {"n": 4})
    a.put("r", "u5", "s5", {"n": 5})
    result = b.merge(a.extract(A, 4))
    assert result.outcome == "gap"
    assert b.digest()[A] == 3
    assert sync(b, a) == [
        Change(JOIN, "r", "u4", "s4", {"n": 4}, "region-a"),
        Change(JOIN, "r", "u5", "s5", {"n": 5}, "region-a"),
    ]


def test_merge_own_delta() -> None:
    a, b = state(A), state(B)
    a.put("r", "u1", "s1", {"n": 1})
    b.merge(a.extract(A, 0))
    a.put("r", "u1", "s1", {"n": 2})
    # A relay echoes an old copy of a's own partition back: ignored.
    result = a.merge(b.extract(A, 0))
    assert result.outcome == "own"
    assert result.changes == []
    assert a.get("r", "u1", "s1") == {"n": 2}


def test_newer_incarnation_retires_older() -> None:
    old, new, b = state(ReplicaId("n", 1)), state(ReplicaId("n", 2)), state(B)
    old.put("r", "u1", "s1", {"n": 1})
    old.put("r", "u2", "s2", {"n": 2})
    new.put("r", "u3", "s3", {"n": 3})
    sync(b, old)
    result = b.merge(new.extract(new.local, 0))
    assert result.outcome == "applied"
    # The old incarnation's users leave before the new one's join.
    assert [(c.kind, c.user) for c in result.changes] == [
        (LEAVE, "u1"),
        (LEAVE, "u2"),
        (JOIN, "u3"),
    ]
    assert old.local in b.retired
    assert old.local not in b.digest()
    assert set(b.visible()) == {("r", "u3", "s3")}
    # The old incarnation never comes back, even with fresh writes.
    old.put("r", "u9", "s9", {})
    assert b.merge(old.extract(old.local, 0)) == b.merge(old.extract(old.local, 1))
    assert b.merge(old.extract(old.local, 0)).outcome == "retired"
    assert set(b.visible()) == {("r", "u3", "s3")}


def test_older_incarnation_is_refused() -> None:
    old, new, b = state(ReplicaId("n", 1)), state(ReplicaId("n", 2)), state(B)
    old.put("r", "u1", "s1", {"n": 1})
    new.put("r", "u3", "s3", {"n": 3})
    sync(b, new)
    result = b.merge(old.extract(old.local, 0))
    assert result.outcome == "retired"
    assert result.changes == []
    assert old.local in b.retired
    assert set(b.visible()) == {("r", "u3", "s3")}
    assert b.digest() == {B: 0, new.local: 1}


def test_older_incarnation_of_local_node_is_refused() -> None:
    old = state(ReplicaId("a", 0))
    old.put("r", "u1", "s1", {})
    a = state(A)
    result = a.merge(old.extract(old.local, 0))
    assert result.outcome == "retired"
    assert a.visible() == {}


def test_older_incarnation_is_refused_after_the_newer_one_retired() -> None:
    """BUG: ``_admit`` only looks at the partitions held, not at ``retired``.

    b hears of n#2, then n#2 says goodbye (``retire``). A stale relay that never heard of n#2
    then forwards n#1's partition: it is admitted, and n#1's dead entries become visible again,
    although n#1 is older than an incarnation known to have replaced it.
    """
    n1, n2, b = state(ReplicaId("n", 1)), state(ReplicaId("n", 2)), state(B)
    n1.put("r", "ghost", "s1", {"n": 1})
    n2.put("r", "u2", "s2", {"n": 2})
    sync(b, n2)
    b.retire(n2.local)
    result = b.merge(n1.extract(n1.local, 0))
    assert result.outcome == "retired"
    assert b.visible() == {}


def test_full_delta_replaces_the_copy() -> None:
    a, b = state(A, tombstone_limit=1), state(B)
    a.put("r", "keep", "s1", {"n": 1})  # 1
    a.put("r", "change", "s2", {"n": 2})  # 2
    a.put("r", "gone", "s3", {"n": 3})  # 3
    sync(b, a)
    a.put("r", "change", "s2", {"n": 4})  # 4
    a.remove("r", "gone", "s3")  # 5
    a.put("r", "tmp1", "s4", {})  # 6
    a.remove("r", "tmp1", "s4")  # 7: two tombstones > limit 1: collected, floor 7
    a.put("r", "new", "s5", {"n": 8})  # 8
    assert a.own.floor == 7
    delta = a.extract(A, 3)
    assert delta is not None and delta.full
    result = b.merge(delta)
    assert result.outcome == "applied"
    assert sorted((c.kind, c.user, dict(c.meta)) for c in result.changes) == [
        (JOIN, "new", {"n": 8}),
        (LEAVE, "gone", {"n": 3}),
        (UPDATE, "change", {"n": 4}),
    ]
    assert live(b, A) == live(a, A)
    assert b.partitions[A].floor == 8
    # The copy keeps counter order, so b can relay incremental deltas from it.
    assert [r.counter for r in b.partitions[A].records.values()] == [1, 4, 8]
    a.put("r", "later", "s6", {"n": 9})
    sync(b, a)
    c = state(C)
    sync(c, b)
    assert live(c, A) == live(a, A)


def test_full_delta_with_unordered_records_is_stored_in_counter_order() -> None:
    """A full delta's records need not come in counter order; the copy keeps the partition
    invariant (records in increasing counter order) anyway."""
    b = state(B)
    records = (
        (("r", "u3", "s3"), 7, {"n": 3}),
        (("r", "u1", "s1"), 2, {"n": 1}),
        (("r", "u2", "s2"), 5, {"n": 2}),
    )
    assert b.merge(Delta(A, "region-a", 0, 8, records, full=True)).outcome == "applied"
    assert [r.counter for r in b.partitions[A].records.values()] == [2, 5, 7]
    b.merge(Delta(A, "region-a", 8, 9, ((("r", "u1", "s1"), 9, None),)))
    assert [r.counter for r in b.partitions[A].records.values()] == [5, 7, 9]
    assert b.extract(A, 8) == Delta(A, "region-a", 8, 9, ((("r", "u1", "s1"), 9, None),))


# ---------------------------------------------------------------------- liveness


def test_hide_and_show_again() -> None:
    a, b = state(A), state(B)
    a.put("r", "u1", "s1", {"n": 1})
    a.put("r", "u2", "s2", {"n": 2})
    sync(b, a)
    down = b.hide(A)
    assert sorted((c.kind, c.user, dict(c.meta)) for c in down) == [
        (LEAVE, "u1", {"n": 1}),
        (LEAVE, "u2", {"n": 2}),
    ]
    assert b.visible() == {}
    assert list(b.room_presences("r")) == []
    assert b.hide(A) == []  # already hidden
    # Merges while hidden are stored but emit nothing.
    a.put("r", "u1", "s1", {"n": 10})
    a.remove("r", "u2", "s2")
    a.put("r", "u3", "s3", {"n": 3})
    changes = sync(b, a)
    assert changes == []
    assert b.visible() == {}
    assert b.digest()[A] == 5
    up = b.show(A, a.own.clock)
    assert sorted((c.kind, c.user, dict(c.meta)) for c in up) == [
        (JOIN, "u1", {"n": 10}),
        (JOIN, "u3", {"n": 3}),
    ]
    assert all(c.region == "region-a" for c in up)
    assert b.visible() == a.visible()
    assert sorted(b.room_presences("r")) == sorted(a.room_presences("r"))
    assert b.show(A, a.own.clock) == []


def test_a_returning_replica_stays_hidden_until_its_copy_is_current() -> None:
    """The heal bug: b holds a's partition from before a cut; during the cut u2 leaves. When
    liveness says a is up again (with a's clock at that heartbeat), b must not show its stored
    copy (u2 would join, and leave a round trip later); it shows a once a merge brings the copy
    to that clock, and then only what is live."""
    a, b = state(A), state(B)
    a.put("r", "u1", "s1", {"n": 1})
    a.put("r", "u2", "s2", {"n": 2})
    sync(b, a)
    b.hide(A)  # a is down: cut off
    held = b.digest()[A]
    a.remove("r", "u2", "s2")
    a.put("r", "u1", "s1", {"n": 11})
    assert b.show(A, a.own.clock) == []  # the stored copy is older than a's heartbeat
    assert b.awaiting == {A: a.own.clock}
    assert b.visible() == {}
    # A delta that does not reach the clock keeps it hidden.
    partial = a.extract(A, held)
    assert partial is not None
    first = Delta(A, partial.region, held, held + 1, partial.records[:1])
    assert b.merge(first) == MergeResult("applied", [])
    assert b.visible() == {}
    # The one that does shows exactly what is live.
    result = b.merge(a.extract(A, b.digest()[A]))  # type: ignore[arg-type]
    assert result == MergeResult("applied", [Change(JOIN, "r", "u1", "s1", {"n": 11}, "region-a")])
    assert b.awaiting == {}
    assert b.visible() == a.visible()
    # Shown replicas are kept current as usual.
    assert sync(b, a) == []
    a.put("r", "u4", "s4", {})
    assert [c.kind for c in sync(b, a)] == [JOIN]


def test_a_replica_first_heard_of_by_its_heartbeat_waits_for_its_clock() -> None:
    """A replica liveness reports before any delta of it arrived (a restarted daemon hears
    of it through a relay): its first deltas are held back until one reaches the clock the
    heartbeat carried. A clock of 0 (a peer that does not gossip clocks) shows at once."""
    a, b = state(A), state(B)
    a.put("r", "u1", "s1", {"n": 1})
    a.put("r", "u2", "s2", {"n": 2})
    stale = a.extract(A, 0)
    a.remove("r", "u2", "s2")
    assert b.show(A, a.own.clock) == []
    assert b.merge(stale) == MergeResult("applied", [])  # type: ignore[arg-type]
    assert b.visible() == {} and b.awaiting == {A: 3}
    result = b.merge(a.extract(A, b.digest()[A]))  # type: ignore[arg-type]
    assert result.changes == [Change(JOIN, "r", "u1", "s1", {"n": 1}, "region-a")]
    assert b.visible() == a.visible()
    c = state(C)
    assert c.show(A, 0) == []
    assert c.awaiting == {}
    assert [ch.user for ch in c.merge(stale).changes] == ["u1", "u2"]  # type: ignore[arg-type]


def test_hide_forgets_an_awaited_clock() -> None:
    a, b = state(A), state(B)
    a.put("r", "u1", "s1", {})
    sync(b, a)
    b.hide(A)
    a.put("r", "u2", "s2", {})
    b.show(A, a.own.clock)
    assert b.awaiting == {A: 2}
    assert b.hide(A) == []
    assert b.awaiting == {}
    assert sync(b, a) == []  # down again: stored, not shown
    assert b.show(A, 99) == []  # (a clock no copy holds yet)
    assert b.drop(A) == [] and b.awaiting == {}  # purged: forgotten with the partition
    assert b.show(A, 99) == [] and b.awaiting == {A: 99}
    assert b.retire(A) == [] and b.awaiting == {}  # retired: for good


def test_full_delta_while_hidden_emits_nothing() -> None:
    a, b = state(A, tombstone_limit=1), state(B)
    a.put("r", "u1", "s1", {"n": 1})
    sync(b, a)
    b.hide(A)
    a.remove("r", "u1", "s1")
    a.put("r", "u2", "s2", {})
    a.remove("r", "u2", "s2")
    a.put("r", "u3", "s3", {"n": 3})
    delta = a.extract(A, 1)
    assert delta is not None and delta.full
    assert b.merge(delta).changes == []
    assert b.show(A, a.own.clock) == [Change(JOIN, "r", "u3", "s3", {"n": 3}, "region-a")]


def test_hide_and_show_ignore_local_and_unknown() -> None:
    a = state(A)
    a.put("r", "u1", "s1", {})
    assert a.hide(A) == []
    assert a.visible() != {}
    assert a.show(A, 5) == [] and a.awaiting == {}
    assert a.hide(B) == []
    assert a.show(B, 0) == []
    a.retire(C)
    assert a.show(C, 3) == [] and a.awaiting == {}


def test_retire() -> None:
    a, b = state(A), state(B)
    a.put("r", "u1", "s1", {"n": 1})
    sync(b, a)
    assert b.retire(A) == [Change(LEAVE, "r", "u1", "s1", {"n": 1}, "region-a")]
    assert A not in b.digest()
    assert b.visible() == {}
    assert list(b.rooms()) == []
    a.put("r", "u2", "s2", {})
    assert b.merge(a.extract(A, 0)).outcome == "retired"
    assert b.missing({}) == []
    assert b.retire(A) == []  # already gone
    assert b.retire(C) == []  # never known, but remembered as retired
    assert C in b.retired
    with pytest.raises(ValueError):
        b.retire(B)


def test_drop_forgets_the_partition_but_not_for_good() -> None:
    a, b = state(A), state(B)
    a.put("r", "u1", "s1", {"n": 1})
    sync(b, a)
    assert b.drop(A) == [Change(LEAVE, "r", "u1", "s1", {"n": 1}, "region-a")]
    assert A not in b.digest() and A not in b.retired
    assert b.visible() == {}
    assert b.drop(A) == []
    # A real comeback: the replica's next delta is accepted again, as a whole.
    a.put("r", "u2", "s2", {"n": 2})
    result = b.merge(a.extract(A, b.digest().get(A, 0)))
    assert result.outcome == "applied"
    assert sorted(c.user for c in result.changes) == ["u1", "u2"]
    assert b.visible() == a.visible()
    with pytest.raises(ValueError):
        b.drop(B)


def test_retire_a_down_replica_emits_nothing() -> None:
    a, b = state(A), state(B)
    a.put("r", "u1", "s1", {"n": 1})
    sync(b, a)
    b.hide(A)
    assert b.retire(A) == []


# ---------------------------------------------------------------------- tombstone GC


def test_tombstone_gc_raises_floor_and_falls_back_to_full() -> None:
    a = state(A, tombstone_limit=2)
    behind, just_below, current = state(B), state(ReplicaId("d", 1)), state(C)
    for i in range(4):
        a.put("r", f"u{i}", f"s{i}", {"i": i})  # 1..4
    sync(behind, a)
    a.remove("r", "u0", "s0")  # 5
    sync(just_below, a)
    a.remove("r", "u1", "s1")  # 6
    assert a.own.tombstones == 2 and a.own.floor == 0
    sync(current, a)
    a.remove("r", "u2", "s2")  # 7: 3 tombstones > 2: keep 1 → drop 5 and 6
    assert a.own.tombstones == 1
    assert a.own.floor == 6
    assert [r.counter for r in a.own.records.values()] == [4, 7]
    # A peer at the floor or above still gets an incremental delta with the tombstone.
    delta = a.extract(A, 6)
    assert delta is not None and not delta.full
    assert delta.records == ((("r", "u2", "s2"), 7, None),)
    assert sync(current, a) == [Change(LEAVE, "r", "u2", "s2", {"i": 2}, "region-a")]
    # A peer behind the floor gets the whole partition, which removes what it lacks.
    delta = a.extract(A, 4)
    assert delta is not None and delta.full
    assert (delta.since, delta.clock) == (0, 7)
    changes = sync(behind, a)
    assert sorted((c.kind, c.user) for c in changes) == [
        (LEAVE, "u0"),
        (LEAVE, "u1"),
        (LEAVE, "u2"),
    ]
    assert behind.visible() == a.visible() == current.visible()
    # A peer exactly one below the floor lacks the collected tombstone at the floor itself.
    delta = a.extract(A, 5)
    assert delta is not None and delta.full
    changes = sync(just_below, a)
    assert sorted((c.kind, c.user) for c in changes) == [(LEAVE, "u1"), (LEAVE, "u2")]
    assert just_below.visible() == a.visible()


def test_receiver_collects_tombstones_of_copies() -> None:
    a, b = state(A), state(B, tombstone_limit=2)
    for i in range(3):
        a.put("r", f"u{i}", f"s{i}", {})
    sync(b, a)
    for i in range(3):
        a.remove("r", f"u{i}", f"s{i}")
    sync(b, a)
    part = b.partitions[A]
    assert part.tombstones == 1
    assert part.floor == 5
    # b relays: a peer behind b's floor gets the full copy, one above it the tombstone.
    d = b.extract(A, 3)
    assert d is not None and d.full and d.records == ()
    d = b.extract(A, 5)
    assert d is not None and d.records == ((("r", "u2", "s2"), 6, None),)


# ---------------------------------------------------------------------- malformed deltas


@pytest.mark.parametrize(
    ("since", "clock", "records", "full"),
    [
        (3, 3, (), False),  # since == clock
        (4, 3, (), False),  # since > clock
        (-1, 3, (), False),  # negative since
        (1, 3, ((("r", "u", "s"), 1, {}),), False),  # counter == since
        (1, 3, ((("r", "u", "s"), 4, {}),), False),  # counter > clock
        (0, 3, ((("r", "u", "s"), 0, {}),), True),  # counter 0 in a full delta
        (0, 3, ((("r", "u", "s"), 5, {}),), True),  # counter > clock in a full delta
        (0, 3, ((("r", "u", "s"), 3, {}), (("r", "v", "s"), 2, {})), False),  # out of order
        (0, 3, ((("r", "u", "s"), 2, {}), (("r", "v", "s"), 2, {})), False),  # duplicate
        (0, 3, ((("r", "u", "s"), 2, None),), True),  # tombstone in a full delta
    ],
)
def test_malformed_delta(since: int, clock: int, records: tuple, full: bool) -> None:
    b = state(B)
    with pytest.raises(DeltaError):
        b.merge(Delta(A, "region-a", since, clock, records, full))
    assert b.visible() == {}
    assert A not in b.digest()


def test_malformed_delta_of_known_replica_changes_nothing() -> None:
    a, b = state(A), state(B)
    a.put("r", "u", "s", {"n": 1})
    sync(b, a)
    with pytest.raises(DeltaError):
        b.merge(Delta(A, "region-a", 1, 3, ((("r", "u", "s"), 9, None),)))
    assert b.digest()[A] == 1
    assert live(b, A) == live(a, A)


# ---------------------------------------------------------------------- shutdown


def test_remove_all_local() -> None:
    a, b = state(A), state(B)
    a.put("r1", "u1", "s1", {"n": 1})
    a.put("r2", "u2", "s2", {"n": 2})
    a.put("r2", "u3", "s3", {"n": 3})
    a.remove("r2", "u3", "s3")
    b.put("r1", "v", "t", {"m": 1})
    sync(a, b)
    sync(b, a)
    changes = a.remove_all_local()
    assert sorted((c.kind, c.room, c.user, dict(c.meta)) for c in changes) == [
        (LEAVE, "r1", "u1", {"n": 1}),
        (LEAVE, "r2", "u2", {"n": 2}),
    ]
    assert list(a.own.live()) == []
    assert a.digest()[A] == 6
    assert a.visible() == {("r1", "v", "t"): ({"m": 1}, "region-b")}  # remote entries stay
    assert a.remove_all_local() == []
    assert sorted((c.kind, c.user) for c in sync(b, a)) == [(LEAVE, "u1"), (LEAVE, "u2")]
    assert b.visible() == a.visible()


def test_remove_all_local_with_tiny_tombstone_limit() -> None:
    a, b = state(A, tombstone_limit=1), state(B)
    for i in range(5):
        a.put("r", f"u{i}", f"s{i}", {"i": i})
    sync(b, a)
    assert len(a.remove_all_local()) == 5
    assert a.own.tombstones <= 1
    changes = sync(b, a)
    assert sorted(c.user for c in changes) == [f"u{i}" for i in range(5)]
    assert b.visible() == {}


# ---------------------------------------------------------------------- empty metas


def test_full_delta_carries_entries_with_empty_meta() -> None:
    """BUG: ``extract`` builds full deltas with ``if r.meta``, so a live entry whose meta is
    the empty mapping (falsy) is dropped from every full delta: a fresh peer never sees it,
    and a peer that had it receives a leave when it is sent the full partition."""
    a, b = state(A), state(B)
    a.put("r", "u1", "s1", {})
    delta = a.extract(A, 0)
    assert delta is not None
    assert delta.records == ((("r", "u1", "s1"), 1, {}),)
    b.merge(delta)
    assert b.visible() == a.visible() == {("r", "u1", "s1"): ({}, "region-a")}


def test_full_fallback_keeps_entries_with_empty_meta() -> None:
    """Same bug, via the GC fallback: the peer had the entry and is told it left."""
    a, b = state(A, tombstone_limit=1), state(B)
    a.put("r", "u2", "s2", {"n": 2})  # 1
    sync(b, a)
    a.put("r", "u1", "s1", {})  # 2
    sync(b, a)  # incremental: b has u1
    assert b.visible() == a.visible()
    a.put("r", "x", "s3", {})  # 3
    a.remove("r", "x", "s3")  # 4
    a.put("r", "y", "s4", {})  # 5
    a.remove("r", "y", "s4")  # 6: GC, floor 4
    changes = sync(b, a)
    assert changes == []
    assert b.visible() == a.visible()


# ------------------------------------------------------------------ several holders of a key


def _two_holders() -> tuple[PresenceState, PresenceState, PresenceState]:
    """eu holds ann's key; us resumes it (writes the same key); ap has heard both."""
    eu = PresenceState(ReplicaId("eu", 1), "eu")
    us = PresenceState(ReplicaId("us", 1), "us")
    ap = PresenceState(ReplicaId("ap", 1), "ap")
    eu.put("lobby", "ann", "s1", {"x": 1})
    for other in (us, ap):
        other.merge(eu.extract(eu.local, 0))  # type: ignore[arg-type]
    for _ in range(5):  # eu's clock runs ahead of us's
        eu.put("other", "bob", "s9", {})
    change = us.put("lobby", "ann", "s1", {"x": 1})
    assert change.kind == "update" and change.region == "us"  # same meta, new region
    assert us.own.records[("lobby", "ann", "s1")].counter > 1  # past eu's copy
    result = ap.merge(us.extract(us.local, 0))  # type: ignore[arg-type]
    assert [(c.kind, c.region) for c in result.changes] == [("update", "us")]
    return eu, us, ap


def test_a_key_held_twice_is_shown_once_and_the_newest_copy_wins() -> None:
    _, us, ap = _two_holders()
    assert ap.visible() == {("lobby", "ann", "s1"): ({"x": 1}, "us")}
    assert ap.user_nodes("ann") == ["us"]
    assert ap.session_rooms("ann", "s1") == [("lobby", {"x": 1}, us.local)]
    us.put("lobby", "ann", "s1", {"x": 2})
    changes = ap.merge(us.extract(us.local, 1)).changes  # type: ignore[arg-type]
    assert [(c.kind, c.meta) for c in changes] == [("update", {"x": 2})]


def test_dropping_either_copy_alone_shows_no_leave() -> None:
    eu, us, ap = _two_holders()
    eu.merge(us.extract(us.local, 0))  # type: ignore[arg-type]
    # The old copy goes (eu's grace ran out): nothing visible changes.
    leave = eu.remove("lobby", "ann", "s1")
    assert leave is not None and leave.kind == "update" and leave.region == "us"
    changes = ap.merge(eu.extract(eu.local, ap.partitions[eu.local].clock)).changes  # type: ignore[arg-type]
    assert [c for c in changes if c.session == "s1"] == []
    assert ap.visible()[("lobby", "ann", "s1")] == ({"x": 1}, "us")
    # Only the last copy's removal is a leave.
    us.remove("lobby", "ann", "s1")
    changes = ap.merge(us.extract(us.local, ap.partitions[us.local].clock)).changes  # type: ignore[arg-type]
    assert [c.kind for c in changes] == ["leave"]
    assert ("lobby", "ann", "s1") not in ap.visible() and ap.user_nodes("ann") == []


def test_the_new_copy_going_first_falls_back_to_the_old_one_and_tells_its_holder() -> None:
    eu, us, ap = _two_holders()
    eu.merge(us.extract(us.local, 0))  # type: ignore[arg-type]
    assert eu.take_notices() == ([("lobby", "ann", "s1")], [])  # resumed on us
    us.remove("lobby", "ann", "s1")  # left where it lives now
    for state in (eu, ap):
        changes = state.merge(us.extract(us.local, 1)).changes  # type: ignore[arg-type]
        assert [(c.kind, c.region) for c in changes] == [("update", "eu")]  # no leave yet
    assert eu.take_notices() == ([], [("lobby", "ann", "s1")])  # eu must follow
    assert ap.take_notices() == ([], [])
    # Hiding or dropping a holder is not a leave while another copy remains.
    assert ap.hide(us.local) == []


def test_a_hidden_holder_shown_again_does_not_flip_the_shown_copy_without_reason() -> None:
    _, us, ap = _two_holders()
    assert [c.kind for c in ap.hide(us.local)] == ["update"]  # back to eu's copy
    assert ap.visible()[("lobby", "ann", "s1")][1] == "eu"
    assert [c.region for c in ap.show(us.local, 0)] == ["us"]  # newest again
    assert ap.drop(us.local) != [] and ap.visible()[("lobby", "ann", "s1")][1] == "eu"
