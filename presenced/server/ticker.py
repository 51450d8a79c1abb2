"""The ticker: the trio loop that carries out the tick plan (:mod:`presenced.core.ticks`).

It sleeps on an alarm (:mod:`presenced.server.alarm`: a kernel timer when it can) until the
plan's next wake-up. At a boundary that has work it reads busy clients, has the peer links
send the tick's gossip, and reads the near peers' batches that are in; a near batch still
missing is waited for on its socket, blocking the thread up to the poll point
(``PeerManager.wait_for_batches`` in :mod:`presenced.server.peers.manager`):
a wake-up through trio costs more CPU than the kernel's own, and such a batch usually lands a
millisecond or two after this daemon's boundary work. A batch later than that is read at
the poll point's own wake-up, and a last time at the hold. Rooms flush at the plan's flush
time. So a busy tick costs one wake-up through trio (the boundary) however many regions it
hears from, and only a batch later than the poll point costs a second one.
"""

from __future__ import annotations

import time
from typing import Protocol

from presenced.server.alarm import Alarm, open_alarm
from presenced.server.clients.paced import PacedClients
from presenced.server.node import Node


class PacedLinks(Protocol):
    """The peer layer as the ticker drives it."""

    @property
    def paced(self) -> object:
        """The links the ticker reads (truthy when any)."""
        ...

    def at_boundary(self, local_changed: bool) -> None:
        """Links send the tick's gossip (``local_changed``: own entries changed)."""
        ...

    def poll_paced(self, final: bool = True) -> None:
        """Read the paced links (``final``: the tick's last read for a missing batch)."""
        ...

    def paced_pending(self) -> bool:
        """Whether a paced link's batch of this tick has not been read yet."""
        ...

    def wait_for_batches(self, timeout_s: float) -> bool:
        """Block the thread until a missing batch has input, for at most ``timeout_s``."""
        ...


class Ticker:
    """Runs the tick plan of ``node``; ``links`` is its peer layer (None: no peers),
    ``paced`` the client connections it reads at boundaries."""

    def __init__(self, node: Node, links: PacedLinks | None, paced: PacedClients) -> None:
        self.node = node
        self.links = links
        self.paced = paced

    async def run(self) -> None:
        """Until cancelled: boundaries, paced reads and flushes, each when the plan says."""
        node = self.node
        alarm = open_alarm(node.clock)
        node.outputs.wake_at = alarm.move
        try:
            await self._tick_forever(alarm)
        finally:
            node.outputs.wake_at = _not_now
            alarm.close()

    def _ticking(self) -> bool:
        """Whether the next boundary has work: something wants it, or clients or links are
        paced (an idle daemon sleeps through boundaries)."""
        links = self.links
        node = self.node
        return (
            node.plan.boundary_wanted
            or bool(self.paced)
            or (links is not None and bool(links.paced))
        )

    async def _tick_forever(self, alarm: Alarm) -> None:
        node = self.node
        plan = node.plan
        links = self.links
        clock, phase_clock = node.clock, node.phase_clock
        now = clock()
        plan.boundary_at = plan.next_boundary(now, phase_clock())
        while True:
            boundary, deadline = plan.next_wake(self._ticking())
            await alarm.sleep_until(deadline)
            now = clock()
            started = time.perf_counter()
            # (want_tick may have moved the boundary on between the deadline and now: the
            # boundary slept for is still this one's to handle)
            if plan.pass_boundary(now, phase_clock(), boundary) and self._ticking():
                now = self._boundary_work(now)
            final = plan.take_poll(now)
            if final is not None and links is not None:
                now = self._read_paced(links, final=final)
                if not final and links.paced_pending():
                    plan.poll_at_hold(now, phase_clock())
            if plan.take_flush(now):
                node.flush_dirty()
            node.metrics.observe_flush(time.perf_counter() - started)

    def _boundary_work(self, woke: float) -> float:
        """Read busy clients, send the tick's gossip, read the near batches that are in (or
        land before the poll point), and plan the flush. Returns the time after it."""
        node = self.node
        links = self.links
        node.plan.start_boundary()
        node.reading_clients = True
        try:
            self.paced.read()  # busy clients' updates make this tick's gossip
        finally:
            node.reading_clients = False
        now = woke
        if links is not None:
            links.at_boundary(node.local_dirty)
            if links.paced:
                now = self._await_paced(links, woke + node.plan.poll_point_s)
        node.local_dirty = False
        if node.has_dirty:
            node.flush_by(node.flush_time(now))
        return now

    def _await_paced(self, links: PacedLinks, poll_point: float) -> float:
        """Read the near batches already in (the boundary's work takes a while), then wait
        on their sockets for those still missing, up to the poll point; a batch later than
        that is read at the poll point's own wake-up. Returns the time after the reads."""
        now = self._read_paced(links, final=False)
        while (
            links.paced_pending() and now < poll_point and links.wait_for_batches(poll_point - now)
        ):
            now = self._read_paced(links, final=False)
        if links.paced_pending():
            self.node.plan.poll_missing(poll_point)
        return now

    def _read_paced(self, links: PacedLinks, *, final: bool) -> float:
        """Read paced peer links; what they change is flushed in one frame per room (no
        leading-edge flush per link). Returns the time after the reads."""
        node = self.node
        node.holding = True
        try:
            links.poll_paced(final=final)
        finally:
            node.holding = False
        return node.clock()


def _not_now(at: float) -> None:
    return None


__all__ = ["PacedLinks", "Ticker"]
