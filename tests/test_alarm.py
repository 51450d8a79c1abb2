"""The ticker's alarm: it wakes at its deadline, never before, and earlier once moved; the
kernel timer and trio's own deadlines behave the same, and a mock clock gets trio's."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import pytest
import trio
import trio.testing

from presenced.server.alarm import Alarm, KernelAlarm, ScopeAlarm, _libc_with_timerfd, open_alarm

needs_timerfd = pytest.mark.skipif(_libc_with_timerfd() is None, reason="Linux timerfd only")


def alarms() -> list[Alarm]:
    libc = _libc_with_timerfd()
    return [ScopeAlarm()] + ([KernelAlarm(libc)] if libc is not None else [])


async def test_wakes_at_the_deadline_not_before() -> None:
    for alarm in alarms():
        with trio.fail_after(5):
            deadline = trio.current_time() + 0.02
            await alarm.sleep_until(deadline)
            assert trio.current_time() >= deadline, alarm
            await alarm.sleep_until(trio.current_time() - 1)  # already past: at once
        alarm.close()


async def sleeper_wakes(alarm: Alarm, deadline: float, change: Callable[[Alarm], float]) -> None:
    """Put a task to sleep until ``deadline``, apply ``change`` while it sleeps (it returns
    the earliest time the sleeper may wake), and check that it woke, and not before then."""
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(alarm.sleep_until, deadline)
            await trio.sleep(0.005)
            earliest = change(alarm)
    assert trio.current_time() >= earliest, alarm


def moved_to(delay: float) -> Callable[[Alarm], float]:
    def change(alarm: Alarm) -> float:
        at = trio.current_time() + delay
        alarm.move(at)
        return at

    return change


def later_ignored_then_earlier(alarm: Alarm) -> float:
    alarm.move(trio.current_time() + 7200)  # later than it sleeps: ignored
    return moved_to(0.02)(alarm)


async def test_moved_earlier_while_sleeping() -> None:
    for alarm in alarms():
        await sleeper_wakes(alarm, trio.current_time() + 3600, later_ignored_then_earlier)
        await sleeper_wakes(alarm, math.inf, moved_to(0))  # inf: until moved
        alarm.move(0)  # nobody sleeps: no effect
        alarm.close()


@needs_timerfd
async def test_moved_after_it_fired_but_before_the_sleeper_ran() -> None:
    """A move re-arms the timer, which clears an expiry not yet read: the sleeper must still
    wake (the new deadline is already past, so the timer fires again at once)."""
    libc = _libc_with_timerfd()
    assert libc is not None
    alarm = KernelAlarm(libc)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            deadline = trio.current_time() + 0.01
            nursery.start_soon(alarm.sleep_until, deadline)
            await trio.testing.wait_all_tasks_blocked()  # the sleeper has armed the timer
            time.sleep(0.02)  # it fires while this task holds the run loop
            alarm.move(deadline - 0.005)  # ... and is re-armed before the sleeper reads it
        assert trio.current_time() >= deadline
    alarm.close()


async def test_a_cancelled_sleep_leaves_the_alarm_usable() -> None:
    for alarm in alarms():
        with trio.move_on_after(0.01):
            await alarm.sleep_until(math.inf)
        with trio.fail_after(5):
            await alarm.sleep_until(trio.current_time() + 0.01)
        alarm.close()


async def test_the_system_clock_gets_the_kernel_timer_where_there_is_one() -> None:
    alarm = open_alarm(trio.current_time)
    expected = ScopeAlarm if _libc_with_timerfd() is None else KernelAlarm
    assert isinstance(alarm, expected)
    alarm.close()
    assert isinstance(open_alarm(lambda: 0.0), ScopeAlarm)  # not trio's clock
    # (what a node reads: the running clock's own method, trio.current_time without its wrappers)
    alarm = open_alarm(trio.lowlevel.current_clock().current_time)
    assert isinstance(alarm, expected)
    alarm.close()


def test_a_mock_clock_gets_trios_deadlines() -> None:
    async def main() -> None:
        alarm = open_alarm(trio.current_time)
        assert isinstance(alarm, ScopeAlarm)
        await alarm.sleep_until(trio.current_time() + 1000)  # virtual: autojumps

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


async def test_a_node_reads_the_running_clock_and_sleeps_on_the_kernel_timer() -> None:
    from presenced.config import Config
    from presenced.core.crdt import ReplicaId
    from presenced.server.node import Node

    node = Node(Config(allow_anonymous=True), ReplicaId("eu", 1))
    assert node.clock == trio.lowlevel.current_clock().current_time
    assert abs(node.clock() - trio.current_time()) < 0.01
    alarm = open_alarm(node.clock)
    assert isinstance(alarm, ScopeAlarm if _libc_with_timerfd() is None else KernelAlarm)
    alarm.close()
