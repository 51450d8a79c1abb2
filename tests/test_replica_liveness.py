"""Replica liveness (presenced.core.liveness): the CRDT clock that rides on heartbeat rows.

A row carries the replica's clock when it beat, relays pass it on unchanged, and the ``up``
transition carries it: the node shows the replica's entries once its copy holds that clock
(see tests/test_crdt.py for that half, tests/test_cluster_laws.py for the whole story).
"""

from __future__ import annotations

from presenced.core.crdt import ReplicaId
from presenced.core.liveness import DOWN, PURGED, RETIRED, UP, Beat, Liveness, Transition

HERE = ReplicaId("eu", 1)
AP = ReplicaId("ap", 5)


def liveness(now: float = 0.0) -> Liveness:
    return Liveness(HERE, down_after_s=3.0, purge_after_s=20.0, now=now)


def test_own_row_carries_the_clock_it_is_given() -> None:
    live = liveness()
    live.beat()
    assert live.beats(0.0, 17) == [Beat(HERE, 1, 0.0, 17)]


def test_first_sighting_is_up_with_the_rows_clock_and_relayed_unchanged() -> None:
    live = liveness()
    assert live.observe(Beat(AP, 4, 0.5, 12), now=10.0) == [Transition(AP, UP, 12)]
    # Relayed as it came: same heartbeat and clock, older by the time since.
    assert live.beats(11.0, 3)[1] == Beat(AP, 4, 1.5, 12)
    # A newer heartbeat brings a newer clock; an older or equal one changes nothing.
    assert live.observe(Beat(AP, 5, 0.0, 15), now=11.0) == []
    assert live.observe(Beat(AP, 5, 0.0, 99), now=11.0) == []
    assert live.beats(11.0, 3)[1] == Beat(AP, 5, 0.0, 15)


def test_back_up_carries_the_newest_clock() -> None:
    live = liveness()
    live.observe(Beat(AP, 1, 0.0, 3), now=0.0)
    assert live.check(4.0) == [Transition(AP, DOWN)]
    # The beat that brings it back says how far it wrote meanwhile.
    assert live.observe(Beat(AP, 9, 0.2, 40), now=10.0) == [Transition(AP, UP, 40)]
    assert live.status(AP) == UP


def test_a_row_without_a_clock_keeps_the_last_one_known() -> None:
    """A relay that does not gossip clocks (clock 0) does not make a known clock unknown."""
    live = liveness()
    live.observe(Beat(AP, 1, 0.0, 8), now=0.0)
    live.check(4.0)
    assert live.observe(Beat(AP, 2, 0.0), now=5.0) == [Transition(AP, UP, 8)]
    fresh = liveness()
    assert fresh.observe(Beat(AP, 2, 0.0), now=5.0) == [Transition(AP, UP, 0)]


def test_comeback_after_purge_and_retirement() -> None:
    live = liveness()
    live.observe(Beat(AP, 1, 0.0, 3), now=0.0)
    live.check(4.0)
    assert live.check(21.0) == [Transition(AP, PURGED)]
    assert live.observe(Beat(AP, 1, 0.0, 3), now=22.0) == []  # a stale relay
    assert live.observe(Beat(AP, 2, 0.0, 30), now=22.0) == [Transition(AP, UP, 30)]
    newer = ReplicaId("ap", 6)
    assert live.observe(Beat(newer, 1, 0.0, 2), now=23.0) == [
        Transition(AP, RETIRED),
        Transition(newer, UP, 2),
    ]
