"""The tick plan: when a daemon's ticks begin, when a tick's changes reach members, and when
the ticker wakes next.

Aligned ticks: a tick boundary is a multiple of ``tick_s`` on the *phase clock* (wall time,
shared by every daemon of a cluster through NTP; a simulation passes its virtual clock), so
every daemon ticks at the same moment. The plan works in the daemon's own (monotonic) clock,
``now``, and is told the phase clock's value at that moment, ``phase_at``: the difference is
the offset between the two.

At a boundary a daemon reads its busy clients and sends its own changes to its peers. It
flushes the tick's changes to members once its near peers' batches of the same tick are in
(:meth:`TickPlan.flush_time`), so a member gets one frame per tick with every region's
changes in it: a peer whose previous batch came within the hold of its boundary is waited
for up to ``hold_s`` after this boundary, a paced link's batch not read yet up to the poll
point (``poll_point_s``), and with neither the tick flushes at once. A room that has not
flushed since the previous tick began flushes at once (the leading edge,
:meth:`TickPlan.quiet_before`): light traffic sees no tick delay.

The plan also keeps the few instants the ticker sleeps towards (the next boundary, if some
work wants it; the flush; the read of paced links) and says which comes first
(:meth:`TickPlan.next_wake`). It is pure: the shell (:mod:`presenced.server.ticker`) sleeps,
reads sockets and flushes.
"""

from __future__ import annotations

import math
from typing import Protocol

#: The latest poll point (seconds after a tick boundary), for long ticks. Near batches that
#: miss the boundary's own work land within ~2 ms on a loaded 2-core VM, whatever the tick
#: (it is the time their daemon waits for a core); later ones get the hold's read.
POLL_POINT_MAX_S = 0.002


class LinkBatches(Protocol):
    """What the plan asks of the peer links about this tick's batches."""

    def awaiting_batches(self) -> bool:
        """Whether a link whose batches come early in each tick has not sent this tick's."""
        ...

    def paced_pending(self) -> bool:
        """Whether a paced link's batch of this tick has not been read yet."""
        ...


class TickPlan:
    """The tick arithmetic of one daemon and the instants its ticker wakes for."""

    def __init__(self, tick_s: float) -> None:
        if not tick_s > 0:
            raise ValueError("tick_s must be positive")
        self.tick_s = tick_s
        #: When, after a boundary, the ticker reads paced peer links (and flushes what they
        #: bring).
        self.poll_point_s = min(tick_s / 12, POLL_POINT_MAX_S)
        #: How long after a boundary a tick's flush may wait for near peers' batches.
        self.hold_s = tick_s / 4
        #: The next boundary (clock time), and whether the ticker must wake for it (besides
        #: paced clients and links, which keep it ticking): an idle daemon sleeps.
        self.boundary_at = -math.inf
        self.boundary_wanted = False
        #: When the ticker flushes dirty rooms next (inf: not scheduled).
        self.flush_at = math.inf
        #: When the ticker reads paced peer links next (this tick's poll point or hold, or
        #: inf), and whether that read is the tick's last for a missing batch.
        self.poll_at = math.inf
        self.final_poll = True

    # ------------------------------------------------------------------ arithmetic

    def tick_index(self, phase_at: float) -> int:
        """The number of the tick ``phase_at`` (a phase clock value) falls in."""
        # (a hair of slack: at an exact boundary, k * tick / tick may come out just under k)
        return math.floor(phase_at / self.tick_s + 1e-9)

    def tick_phase_s(self, phase_at: float) -> float:
        """Seconds from the last boundary to ``phase_at``."""
        return max(0.0, phase_at - self.tick_index(phase_at) * self.tick_s)

    def next_boundary(self, now: float, phase_at: float) -> float:
        """The first boundary after ``now`` (clock time; ``phase_at`` is the phase clock then).

        Never closer than a thousandth of a tick: at a boundary, rounding must not yield the
        same boundary again (a busy loop under a mock clock).
        """
        tick_s = self.tick_s
        boundary = (math.floor(phase_at / tick_s + 1e-9) + 1) * tick_s - (phase_at - now)
        return boundary if boundary - now > tick_s / 1000 else boundary + tick_s

    def interval_start(self, now: float, phase_at: float) -> float:
        """The last boundary at or before ``now`` (clock time)."""
        tick_s = self.tick_s
        return math.floor(phase_at / tick_s + 1e-9) * tick_s - (phase_at - now)

    def quiet_before(self, now: float, phase_at: float, holding: bool) -> float:
        """The leading-edge rule: a room whose last flush is earlier than this is quiet and
        flushes a change at once; a busier one waits for the tick's flush.

        Quiet means no flush since the start of the previous tick interval (not "a tick since
        the last flush": flush times jitter by a few milliseconds from tick to tick, and a
        busy room would then take a late change for a quiet one and flush twice in a tick).
        While the ticker reads paced links (``holding``) nothing is quiet: what they bring is
        flushed right after, one frame per room.
        """
        if holding:
            return -math.inf
        tick_s = self.tick_s
        return (math.floor(phase_at / tick_s + 1e-9) - 1) * tick_s - (phase_at - now)

    def flush_time(self, now: float, phase_at: float, links: LinkBatches | None) -> float:
        """When this tick's changes are flushed: once near peers' batches of the tick are in.

        A peer whose previous batch came within the hold of its boundary is waited for, up to
        ``hold_s`` after this boundary; a paced link whose batch is not read yet, until the
        poll point; with neither (or no peers), at once. (On a loaded machine every batch is
        often in by the end of the boundary's own work: the tick then flushes in that same
        wake-up.)
        """
        if links is None:
            return now
        if links.awaiting_batches():
            return max(now, self.interval_start(now, phase_at) + self.hold_s)
        if links.paced_pending():
            return max(now, self.interval_start(now, phase_at) + self.poll_point_s)
        return now

    # ------------------------------------------------------------------ the ticker's wake-ups

    def want_boundary(self, now: float, phase_at: float) -> bool:
        """Some work needs the next boundary (own changes to send, beats due). True when that
        is news: the caller wakes the ticker at :attr:`boundary_at`."""
        if self.boundary_wanted:
            return False
        self.boundary_wanted = True
        if self.boundary_at <= now:
            self.boundary_at = self.next_boundary(now, phase_at)
        return True

    def flush_by(self, at: float) -> bool:
        """Flush no later than ``at``. True when that is earlier than planned (the caller
        wakes the ticker then)."""
        if at < self.flush_at:
            self.flush_at = at
            return True
        return False

    def next_wake(self, ticking: bool) -> tuple[float, float]:
        """(the boundary the ticker sleeps towards, or inf when nothing needs it; when it
        wakes: the earliest of that boundary, the flush and the read of paced links)."""
        boundary = self.boundary_at if ticking else math.inf
        return boundary, min(boundary, self.flush_at, self.poll_at)

    def pass_boundary(self, now: float, phase_at: float, slept_for: float) -> bool:
        """Whether a boundary came (the one slept for, or the later one a want moved it to
        meanwhile); if so the next boundary is planned."""
        if now >= slept_for or now >= self.boundary_at:
            self.boundary_at = self.next_boundary(now, phase_at)
            return True
        return False

    def start_boundary(self) -> None:
        """The boundary's work begins: what wants a boundary during it gets the next."""
        self.boundary_wanted = False

    def poll_missing(self, poll_at: float) -> None:
        """A paced link's batch is still missing after the boundary's reads: read again at
        ``poll_at`` (the poll point), not for the last time."""
        self.poll_at = poll_at
        self.final_poll = False

    def take_poll(self, now: float) -> bool | None:
        """None if the read of paced links is not due at ``now``; else whether it is the
        tick's last read (the read is then no longer planned)."""
        if now < self.poll_at:
            return None
        self.poll_at = math.inf
        return self.final_poll

    def poll_at_hold(self, now: float, phase_at: float) -> None:
        """A batch missed the poll point: one last read at the hold, when the tick's flush
        waits for it anyway (no wake-up of its own, and the link stays paced)."""
        self.poll_at = max(now, self.interval_start(now, phase_at) + self.hold_s)
        self.final_poll = True

    def take_flush(self, now: float) -> bool:
        """Whether the flush is due at ``now`` (it is then no longer planned)."""
        if now < self.flush_at:
            return False
        self.flush_at = math.inf
        return True
