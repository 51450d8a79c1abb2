"""Room feeds (presenced.core.fanout): one diff per tick from the latest value per entry.

A feed's published view is what every local member has been told; a flush folds the pending
changes into it and returns only what differs, so a member applying the diffs one after the
other on top of the snapshot it joined with always holds the published view.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from presenced.core.crdt import JOIN, LEAVE, UPDATE, Change, ChangeKind, Meta
from presenced.core.fanout import Presences, RoomFeed

ROOM = "r"


def change(
    kind: ChangeKind, user: str, session: str, meta: Meta | None = None, region: str = "eu"
) -> Change:
    return Change(kind, ROOM, user, session, meta if meta is not None else {}, region)


def entry(session: str, meta: Meta, region: str = "eu") -> dict[str, Any]:
    return {"session": session, "meta": meta, "region": region}


def test_a_new_feed_publishes_what_the_room_holds() -> None:
    feed = RoomFeed(ROOM, [("ann", "s1", {"x": 1}, "eu"), ("ann", "s2", {"x": 2}, "us")])
    assert feed.snapshot() == {"ann": [entry("s1", {"x": 1}), entry("s2", {"x": 2}, "us")]}
    assert not feed.dirty
    assert feed.flush(1.0) is None


def test_a_join_then_moves_within_a_tick_is_one_join_with_the_last_value() -> None:
    feed = RoomFeed(ROOM)
    feed.note(change(JOIN, "ann", "s1", {"x": 1}))
    for x in range(2, 6):
        feed.note(change(UPDATE, "ann", "s1", {"x": x}))
    assert feed.dirty
    assert feed.flush(1.0) == ({"ann": [entry("s1", {"x": 5})]}, {}, {})
    assert not feed.dirty
    assert feed.snapshot() == {"ann": [entry("s1", {"x": 5})]}


def test_a_join_and_a_leave_within_a_tick_cancel_out() -> None:
    feed = RoomFeed(ROOM)
    feed.note(change(JOIN, "ann", "s1", {"x": 1}))
    feed.note(change(LEAVE, "ann", "s1", {"x": 1}))
    assert feed.flush(1.0) is None
    assert feed.snapshot() == {}
    assert not feed.dirty


def test_a_leave_carries_the_last_published_meta() -> None:
    """Members learn who left with what they last saw of it, not the leave's own meta."""
    feed = RoomFeed(ROOM, [("ann", "s1", {"x": 1}, "eu")])
    feed.note(change(UPDATE, "ann", "s1", {"x": 2}))
    feed.note(change(LEAVE, "ann", "s1", {"x": 2}))
    assert feed.flush(1.0) == ({}, {"ann": [entry("s1", {"x": 1})]}, {})
    assert feed.snapshot() == {}


def test_a_leave_of_an_entry_never_published_says_nothing() -> None:
    feed = RoomFeed(ROOM)
    feed.note(change(LEAVE, "bob", "s1", {"x": 1}))
    assert feed.flush(1.0) is None


def test_an_update_back_to_the_published_value_is_no_diff() -> None:
    feed = RoomFeed(ROOM, [("ann", "s1", {"x": 1}, "eu")])
    feed.note(change(UPDATE, "ann", "s1", {"x": 2}))
    feed.note(change(UPDATE, "ann", "s1", {"x": 1}))  # equal, not the same object
    assert feed.flush(1.0) is None


def test_a_move_to_another_region_is_an_update() -> None:
    feed = RoomFeed(ROOM, [("ann", "s1", {"x": 1}, "eu")])
    feed.note(change(UPDATE, "ann", "s1", {"x": 1}, region="us"))
    assert feed.flush(1.0) == ({}, {}, {"ann": [entry("s1", {"x": 1}, "us")]})


def test_joins_leaves_and_updates_of_one_tick_come_in_one_diff_grouped_by_user() -> None:
    feed = RoomFeed(ROOM, [("ann", "s1", {"x": 1}, "eu"), ("bob", "s1", {}, "us")])
    feed.note(change(UPDATE, "ann", "s1", {"x": 2}))
    feed.note(change(JOIN, "ann", "s2", {"x": 9}))
    feed.note(change(LEAVE, "bob", "s1", {}))
    feed.note(change(JOIN, "cid", "s1", {"y": 1}, region="ap"))
    joins, leaves, updates = feed.flush(1.0) or ({}, {}, {})
    assert joins == {"ann": [entry("s2", {"x": 9})], "cid": [entry("s1", {"y": 1}, "ap")]}
    assert leaves == {"bob": [entry("s1", {}, "us")]}
    assert updates == {"ann": [entry("s1", {"x": 2})]}


def test_a_flush_records_when_it_happened_even_with_nothing_to_send() -> None:
    """The shell paces flushes by ``last_flush``: an empty flush still counts as one."""
    feed = RoomFeed(ROOM)
    assert feed.last_flush == float("-inf")
    assert feed.flush(3.5) is None
    assert feed.last_flush == 3.5
    feed.note(change(JOIN, "ann", "s1"))
    feed.flush(4.0)
    assert feed.last_flush == 4.0


def apply(view: dict[tuple[str, str], tuple[Meta, str]], diff: tuple[Presences, ...]) -> None:
    """What a client does with a diff: joins and updates set, leaves remove."""
    joins, leaves, updates = diff
    for presences, gone in ((joins, False), (leaves, True), (updates, False)):
        for user, entries in presences.items():
            for item in entries:
                key = (user, item["session"])
                if gone:
                    assert key in view, "a leave of an entry the member was never told of"
                    del view[key]
                else:
                    assert (key in view) == (presences is updates), "join/update mixed up"
                    view[key] = (item["meta"], item["region"])


USERS = st.sampled_from(["ann", "bob"])
SESSIONS = st.sampled_from(["s1", "s2"])
CHANGES = st.tuples(
    st.booleans(),  # leave?
    USERS,
    SESSIONS,
    st.fixed_dictionaries({"x": st.integers(0, 2)}),
    st.sampled_from(["eu", "us"]),
)


@given(st.lists(st.lists(CHANGES, max_size=8), max_size=6))
def test_diffs_applied_on_the_snapshot_give_the_latest_values(
    ticks: list[list[tuple[bool, str, str, dict[str, int], str]]],
) -> None:
    feed = RoomFeed(ROOM, [("ann", "s1", {"x": 0}, "eu")])
    client = {
        (user, s["session"]): (s["meta"], s["region"])
        for user, ss in feed.snapshot().items()
        for s in ss
    }
    latest = dict(client)
    for now, tick in enumerate(ticks):
        for leave, user, session, meta, region in tick:
            if leave:
                feed.note(change(LEAVE, user, session, meta, region))
                latest.pop((user, session), None)
            else:
                kind = UPDATE if (user, session) in latest else JOIN
                feed.note(change(kind, user, session, meta, region))
                latest[(user, session)] = (meta, region)
        diff = feed.flush(float(now))
        if diff is not None:
            assert any(diff), "a diff is None rather than empty"
            apply(client, diff)
        assert client == latest
        assert feed.published == latest
