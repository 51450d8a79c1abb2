"""The pure rules behind "every request is answered" (presenced/core/answers.py)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from presenced.core.answers import (
    CLUSTER_GRACE_S,
    FETCH_ANSWER_S,
    RETRY_AFTER_MS,
    ClusterView,
    Deadlines,
    Fetches,
    FetchProgress,
    Senders,
    cluster_settled,
    fetch_reply,
    known_nodes,
)

# ---------------------------------------------------------------------- deadlines


def test_deadlines_come_due_in_order_and_answered_ones_never() -> None:
    table: Deadlines[str, int] = Deadlines(5.0, limit=100)
    table.add("a", 1, now=0.0)
    table.add("b", 2, now=1.0)
    table.add("c", 3, now=2.0)
    assert table.next_deadline() == 5.0
    assert table.answered("b") and not table.answered("b")
    assert table.due(4.9) == []
    assert table.due(7.0) == [("a", 1), ("c", 3)]
    assert len(table) == 0 and table.next_deadline() is None


def test_deadlines_over_the_limit_hand_back_the_oldest_at_once() -> None:
    table: Deadlines[int, None] = Deadlines(5.0, limit=2)
    assert table.add(1, None, 0.0) == [] and table.add(2, None, 0.0) == []
    assert table.add(3, None, 0.0) == [(1, None)]
    assert 1 not in table and 3 in table


@given(st.lists(st.tuples(st.floats(0, 1), st.booleans()), max_size=40), st.floats(0, 20))
def test_due_is_exactly_the_unanswered_past_their_deadline(
    events: list[tuple[float, bool]], now: float
) -> None:
    table: Deadlines[int, None] = Deadlines(5.0, limit=1000)
    clock = 0.0
    expected = set()
    for key, (step, answer) in enumerate(events):
        clock += step
        table.add(key, None, clock)
        if answer:
            table.answered(key)
        elif clock + 5.0 <= now:
            expected.add(key)
    assert {key for key, _ in table.due(now)} == expected


# ---------------------------------------------------------------------- fetch


def view(settled: bool = True, known: str = "", reachable: str = "", down: str = "") -> ClusterView:
    return ClusterView(settled, frozenset(known), frozenset(reachable), frozenset(down))


def test_a_fetch_asks_itself_first_then_whoever_becomes_reachable() -> None:
    fetch = FetchProgress("a", limit=10, deadline=3.0)
    assert fetch.to_ask(view(known="bc", reachable="b")) == ["a", "b"]
    assert fetch.to_ask(view(known="bc", reachable="bc")) == ["c"]
    assert fetch.to_ask(view(known="bc", reachable="bc")) == []


def test_a_fetch_is_complete_only_when_everyone_known_answered_on_a_settled_view() -> None:
    fetch = FetchProgress("a", limit=10, deadline=3.0)
    fetch.to_ask(view(known="b", reachable="b"))
    assert fetch.on_answer("a", 0) and not fetch.on_answer("a", 0)
    assert not fetch.on_answer("z", 5)  # never asked
    assert not fetch.complete(view(known="b", reachable="b"))
    assert not fetch.finished(view(known="b", reachable="b"), now=1.0)
    assert fetch.on_answer("b", 2)
    assert fetch.complete(view(known="b", reachable="b"))
    assert not fetch.complete(view(settled=False, known="b", reachable="b"))
    assert fetch.remaining == 2


def test_a_fetch_does_not_wait_for_daemons_that_are_down_but_says_it_is_incomplete() -> None:
    fetch = FetchProgress("a", limit=10, deadline=3.0)
    cluster = view(known="bc", reachable="b", down="c")
    fetch.to_ask(cluster)
    fetch.on_answer("a", 0)
    fetch.on_answer("b", 0)
    assert fetch.finished(cluster, now=0.1) and not fetch.complete(cluster)
    # Unsettled, or an up daemon without a route yet: wait (until the deadline).
    assert not fetch.finished(view(settled=False, known="b", reachable="b"), now=0.1)
    assert not fetch.finished(view(known="bc", reachable="b"), now=0.1)
    assert fetch.finished(view(known="bc", reachable="b"), now=3.0)


def test_an_incomplete_fetch_never_reads_as_empty() -> None:
    assert fetch_reply(1, 0, 0, complete=True) == {
        "type": "fetched",
        "ref": 1,
        "count": 0,
        "remaining": 0,
        "complete": True,
    }
    error = fetch_reply(1, 0, 0, complete=False)
    assert error["type"] == "error" and error["code"] == "unavailable"
    assert error["retry_after_ms"] == RETRY_AFTER_MS
    partial = fetch_reply(1, 3, 0, complete=False)
    assert partial["type"] == "fetched" and partial["count"] == 3
    assert partial["complete"] is False and partial["retry_after_ms"] == RETRY_AFTER_MS


def test_known_nodes_and_which_are_down() -> None:
    statuses = [("b", True), ("c", False), ("c", False), ("d", False), ("d", True), ("a", True)]
    known, down = known_nodes("a", statuses, routed=["a", "b", "e"], linked=["f"])
    assert known == frozenset("bcdef") and down == frozenset("c")


def test_a_daemon_knows_the_cluster_once_a_link_synced_or_after_the_grace() -> None:
    assert cluster_settled(peered=False, synced_link=False, uptime_s=0)
    assert cluster_settled(peered=True, synced_link=True, uptime_s=0)
    assert not cluster_settled(peered=True, synced_link=False, uptime_s=CLUSTER_GRACE_S - 0.1)
    assert cluster_settled(peered=True, synced_link=False, uptime_s=CLUSTER_GRACE_S)


def test_senders_one_delivered_per_recipient_and_region() -> None:
    senders: Senders[str] = Senders()
    senders.remember("m", "tab", 1, now=0.0)
    assert senders.first_confirmation("m", "bob", "ap")
    assert not senders.first_confirmation("m", "bob", "ap")  # a retransmission confirmed again
    assert senders.first_confirmation("m", "bob", "us")  # another region is news
    assert senders.first_confirmation("unknown", "bob", "ap")  # forgotten: still told


def test_senders_a_timeout_or_a_delivered_silences_a_later_error() -> None:
    senders: Senders[str] = Senders()
    senders.remember("m", "tab", 1, now=0.0)
    assert not senders.answered("m", "bob")
    assert senders.time_out("m", "bob")
    assert senders.answered("m", "bob")
    senders.first_confirmation("m", "carl", "ap")
    assert not senders.time_out("m", "carl")  # delivered first: no timeout
    assert senders.answered("m", "carl")


def test_senders_are_forgotten_after_their_memory_and_beyond_the_limit() -> None:
    senders: Senders[str] = Senders(memory_s=10.0, limit=4)
    for n in range(5):
        senders.remember(f"m{n}", "tab", n, now=float(n))
    assert len(senders) == 3 and senders.get("m0") is None  # the oldest quarter went
    senders.forget_expired(13.0)
    assert [senders.get(f"m{n}") is None for n in range(2, 5)] == [True, True, False]


def test_fetches_answer_once_when_finished() -> None:
    fetches: Fetches[str] = Fetches("eu")
    view = ClusterView(settled=True, known=frozenset({"ap"}), reachable=frozenset({"ap"}))
    progress = fetches.start("f1", "tab", 7, "bob", 10, now=0.0)
    assert progress.to_ask(view) == ["eu", "ap"] and fetches.next_deadline() == FETCH_ANSWER_S
    assert fetches.on_pulled("f1", "eu", 0)
    assert fetches.finish_if_done("f1", view, 0.1) is None  # ap has not answered
    assert fetches.on_pulled("f1", "ap", 2) and not fetches.on_pulled("f1", "ap", 2)
    conn, reply = fetches.finish_if_done("f1", view, 0.2) or (None, {})
    assert conn == "tab" and reply["complete"] is True and reply["remaining"] == 2
    assert len(fetches) == 0 and fetches.finish_if_done("f1", view, 0.3) is None
