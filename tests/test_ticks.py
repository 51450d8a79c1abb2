"""The tick plan (presenced.core.ticks): aligned boundaries, flush times, the leading edge and
the ticker's wake-ups, as plain arithmetic on clock values passed in."""

from __future__ import annotations

import math

import attrs
import pytest

from presenced.core.ticks import POLL_POINT_MAX_S, TickPlan

WALL = 1_700_000_000.0  # a multiple of 25 ms: a boundary on the phase clock


@attrs.define
class Links:
    awaiting: bool = False
    pending: bool = False
    asked: list[str] = attrs.Factory(list)

    def awaiting_batches(self) -> bool:
        self.asked.append("awaiting")
        return self.awaiting

    def paced_pending(self) -> bool:
        self.asked.append("pending")
        return self.pending


def test_the_hold_and_poll_point_follow_the_tick() -> None:
    plan = TickPlan(0.030)
    assert plan.hold_s == pytest.approx(0.0075)
    assert plan.poll_point_s == POLL_POINT_MAX_S  # capped for long ticks
    short = TickPlan(0.012)
    assert short.poll_point_s == pytest.approx(0.001)  # a twelfth of a short tick
    with pytest.raises(ValueError):
        TickPlan(0)


def test_boundaries_are_aligned_on_the_phase_clock() -> None:
    plan = TickPlan(0.025)
    # 10.5 ms past a boundary of the phase clock, at clock time 7.0
    assert plan.next_boundary(7.0, WALL + 0.0105) == pytest.approx(7.0145)
    assert plan.interval_start(7.0, WALL + 0.0105) == pytest.approx(6.9895)
    # At a boundary, the next one is a whole tick away (never the same one again).
    assert plan.next_boundary(7.0, WALL + 0.025) == pytest.approx(7.025)
    # A hair before a boundary counts as past it: no busy loop on rounding.
    assert plan.next_boundary(7.0, WALL + 0.025 - 1e-7) == pytest.approx(7.025, abs=1e-6)


def test_tick_index_and_phase() -> None:
    plan = TickPlan(0.025)
    index = plan.tick_index(WALL)
    assert index == round(WALL / 0.025)
    assert plan.tick_index(WALL + 0.0249) == index
    assert plan.tick_index(WALL + 0.025) == index + 1
    assert plan.tick_index(3 * 0.1) == 12  # exact multiples are their own tick despite rounding
    assert plan.tick_phase_s(WALL + 0.010) == pytest.approx(0.010)
    assert plan.tick_phase_s(WALL) == 0.0


def test_a_quiet_room_is_one_without_a_flush_since_the_previous_tick_began() -> None:
    plan = TickPlan(0.025)
    # 5 ms into a tick that began at clock 10.0: quiet means "last flush before 9.975"
    assert plan.quiet_before(10.005, WALL + 0.005, holding=False) == pytest.approx(9.975)
    # While paced links are read, nothing is quiet: what they bring flushes right after.
    assert plan.quiet_before(10.005, WALL + 0.005, holding=True) == -math.inf


def test_flush_time_waits_for_awaited_batches_up_to_the_hold() -> None:
    plan = TickPlan(0.020)
    links = Links(awaiting=True, pending=True)
    # 1 ms into the tick (its boundary at clock 5.0): hold until 5 ms after the boundary
    assert plan.flush_time(5.001, WALL + 0.001, links) == pytest.approx(5.005)
    assert links.asked == ["awaiting"]  # the hold covers the paced reads: not asked
    # past the hold: at once
    assert plan.flush_time(5.006, WALL + 0.006, links) == 5.006


def test_flush_time_waits_for_paced_batches_up_to_the_poll_point() -> None:
    plan = TickPlan(0.020)
    links = Links(pending=True)
    assert plan.flush_time(5.0005, WALL + 0.0005, links) == pytest.approx(5.0 + plan.poll_point_s)
    assert plan.flush_time(5.003, WALL + 0.003, links) == 5.003


def test_flush_time_is_now_without_batches_to_wait_for() -> None:
    plan = TickPlan(0.020)
    assert plan.flush_time(5.001, WALL + 0.001, Links()) == 5.001
    assert plan.flush_time(5.001, WALL + 0.001, None) == 5.001  # no peers


def test_a_wanted_boundary_is_news_once_per_tick() -> None:
    plan = TickPlan(0.025)
    assert plan.want_boundary(7.0, WALL + 0.0105)
    assert plan.boundary_at == pytest.approx(7.0145)
    assert not plan.want_boundary(7.001, WALL + 0.0115)  # already wanted
    plan.start_boundary()
    assert not plan.boundary_wanted
    # wanted again before the planned boundary: that boundary stands
    assert plan.want_boundary(7.002, WALL + 0.0125)
    assert plan.boundary_at == pytest.approx(7.0145)


def test_flush_by_only_moves_the_flush_earlier() -> None:
    plan = TickPlan(0.025)
    assert plan.flush_by(3.0)
    assert not plan.flush_by(3.5)
    assert plan.flush_by(2.5)
    assert plan.flush_at == 2.5
    assert not plan.take_flush(2.4)
    assert plan.take_flush(2.5)
    assert plan.flush_at == math.inf


def test_the_ticker_wakes_at_the_earliest_of_boundary_flush_and_poll() -> None:
    plan = TickPlan(0.025)
    plan.boundary_at = 1.025
    assert plan.next_wake(ticking=False) == (math.inf, math.inf)  # idle: sleeps
    assert plan.next_wake(ticking=True) == (1.025, 1.025)
    plan.flush_by(1.010)
    assert plan.next_wake(ticking=True) == (1.025, 1.010)
    plan.poll_missing(1.002)
    assert plan.next_wake(ticking=False) == (math.inf, 1.002)


def test_pass_boundary_plans_the_next() -> None:
    plan = TickPlan(0.025)
    plan.boundary_at = 1.025
    assert not plan.pass_boundary(1.020, WALL + 0.020, slept_for=math.inf)  # a flush wake-up
    assert plan.pass_boundary(1.0251, WALL + 0.0251, slept_for=1.025)
    assert plan.boundary_at == pytest.approx(1.050)
    # slept for a boundary a want moved on meanwhile: still this wake-up's to handle
    plan.boundary_at = 1.075
    assert plan.pass_boundary(1.0501, WALL + 0.0501, slept_for=1.050)


def test_a_missing_batch_gets_the_poll_point_then_a_last_read_at_the_hold() -> None:
    plan = TickPlan(0.025)
    assert plan.take_poll(1.0) is None  # nothing planned
    plan.poll_missing(1.002)
    assert plan.take_poll(1.001) is None
    assert plan.take_poll(1.002) is False  # not the last read
    assert plan.poll_at == math.inf
    plan.poll_at_hold(1.002, WALL + 0.002)  # the tick began at 1.0
    assert plan.poll_at == pytest.approx(1.00625)
    assert plan.take_poll(1.00625) is True
    # late past the hold already: read at once
    plan.poll_at_hold(1.010, WALL + 0.010)
    assert plan.poll_at == 1.010
