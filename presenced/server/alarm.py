"""The ticker's alarm: sleep until a deadline that other tasks may move earlier.

trio wakes a task at a deadline by cancelling a scope: a ``Cancelled`` exception thrown through
the task, cancel status recalculated, the scope unwound. On the 2-vCPU VM of
docs/benchmarks.md that costs ~350 µs of CPU per wake-up, against ~180 µs for a wake-up on a
readable file descriptor, and a busy ticker wakes two or three times per tick. So on Linux,
under trio's system clock, the ticker sleeps on a kernel timer (``timerfd``) that trio waits on
like a socket: :class:`KernelAlarm`. Python 3.11 has no ``os.timerfd_create`` (3.13 does, and
would replace the ctypes calls here). Anywhere else, and under a mock clock (simulations in
virtual time, which only trio's own deadlines follow), it is :class:`ScopeAlarm`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import sys
from collections.abc import Callable
from typing import Protocol

import trio
import trio.testing


class Alarm(Protocol):
    async def sleep_until(self, deadline: float) -> None:
        """Sleep until ``deadline`` (trio time; inf: until moved), or until moved earlier and
        that time has come."""

    def move(self, deadline: float) -> None:
        """Wake the sleeper at ``deadline`` if that is earlier than it would wake (no effect
        while nobody sleeps)."""

    def close(self) -> None:
        """Release what the alarm holds."""


class ScopeAlarm:
    """trio's own deadline: works under any clock."""

    def __init__(self) -> None:
        self._scope: trio.CancelScope | None = None

    async def sleep_until(self, deadline: float) -> None:
        with trio.CancelScope(deadline=deadline) as self._scope:
            try:
                await trio.sleep_forever()
            finally:
                self._scope = None

    def move(self, deadline: float) -> None:
        if self._scope is not None and deadline < self._scope.deadline:
            self._scope.deadline = deadline

    def close(self) -> None:
        pass


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


_CLOCK_MONOTONIC = 1


class KernelAlarm:
    """A Linux ``timerfd`` armed with the time left until the deadline; trio waits for it to
    become readable. Relative arming keeps it independent of trio's clock offset."""

    def __init__(self, libc: ctypes.CDLL, clock: Callable[[], float] = trio.current_time) -> None:
        self._settime = libc.timerfd_settime
        fd = libc.timerfd_create(_CLOCK_MONOTONIC, os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "timerfd_create failed")
        self._fd: int | None = fd
        self._clock = clock
        self._spec = _Itimerspec()
        #: The deadline of the sleep in progress (None: nobody sleeps).
        self._deadline: float | None = None

    async def sleep_until(self, deadline: float) -> None:
        assert self._fd is not None, "the alarm is closed"
        self._deadline = deadline
        self._arm(deadline)
        try:
            while True:
                await trio.lowlevel.wait_readable(self._fd)
                try:
                    os.read(self._fd, 8)  # (the expiration count; reading it clears the fd)
                    return
                except BlockingIOError:
                    continue  # moved after it fired: the new expiry is still to come
        finally:
            self._deadline = None

    def move(self, deadline: float) -> None:
        if self._deadline is not None and deadline < self._deadline:
            self._deadline = deadline
            self._arm(deadline)

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            trio.lowlevel.notify_closing(fd)
            os.close(fd)

    def _arm(self, deadline: float) -> None:
        value = self._spec.it_value
        if math.isinf(deadline):
            value.tv_sec = value.tv_nsec = 0  # disarmed: only a move wakes the sleeper
        else:
            # (never zero, which would disarm it: a deadline already past fires at once)
            nanoseconds = max(1, math.ceil((deadline - self._clock()) * 1e9))
            value.tv_sec, value.tv_nsec = divmod(nanoseconds, 1_000_000_000)
        if self._settime(self._fd, 0, ctypes.byref(self._spec), None) != 0:
            raise OSError(ctypes.get_errno(), "timerfd_settime failed")


def _libc_with_timerfd() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.timerfd_create.restype = ctypes.c_int
        libc.timerfd_settime.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def open_alarm(clock: Callable[[], float]) -> Alarm:
    """The cheapest alarm that keeps ``clock``'s time: a kernel timer when ``clock`` is trio's
    system clock on Linux, trio's own deadlines otherwise."""
    run_clock = trio.lowlevel.current_clock()
    if (clock is trio.current_time or clock == run_clock.current_time) and not isinstance(
        run_clock, trio.testing.MockClock
    ):
        libc = _libc_with_timerfd()
        if libc is not None:
            try:
                return KernelAlarm(libc, clock)
            except OSError:
                pass
    return ScopeAlarm()
