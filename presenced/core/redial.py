"""When a dialer tries its peer again: capped exponential backoff with jitter, and a hurry.

A daemon that only listens is back, after a restart, when its dialers next try; how long that
takes is set here. Two rules keep it short without hammering a dead peer:

* the wait doubles from ``initial_s`` after each failed attempt but never exceeds ``max_s``
  (1 s by default: one TCP connect a second to a dead peer is no storm, and a peer that comes
  back is found within a second). Each wait is drawn from ``[delay / 2, delay]``, so dialers
  that lost the same peer at the same moment spread out instead of arriving together;
* news that the peer is alive (a replica of its node coming up, heard through another peer's
  gossip while this daemon has no link to it) ends the wait at once, though never sooner than
  ``initial_s`` after the previous attempt: liveness transitions are rare events, so this
  cannot turn into a loop of dials.

Pure: the caller draws the random number and measures time.
"""

from __future__ import annotations

import attrs


def _positive(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be > 0, not {value}")


@attrs.define
class Redial:
    """The backoff of one dialer."""

    initial_s: float = attrs.field(validator=_positive)
    max_s: float = attrs.field(validator=_positive)
    #: The delay the next wait is drawn from (it doubles after each failure, up to max_s).
    delay_s: float = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        if self.max_s < self.initial_s:
            raise ValueError(f"max_s {self.max_s} is below initial_s {self.initial_s}")
        self.delay_s = self.initial_s

    def next_wait(self, draw: float) -> float:
        """Seconds to wait before the next attempt; ``draw`` is uniform in [0, 1).

        Grows the delay for the attempt after (call :meth:`reset` when a link worked)."""
        wait = self.delay_s * (0.5 + 0.5 * draw)
        self.delay_s = min(self.delay_s * 2, self.max_s)
        return min(wait, self.max_s)

    def reset(self) -> None:
        """A link came up: the next break is retried quickly again."""
        self.delay_s = self.initial_s

    def hurried_wait(self, since_attempt_s: float) -> float:
        """Seconds still to wait after news that the peer is alive, given the time since the
        previous attempt: none, unless that attempt was less than ``initial_s`` ago."""
        return max(0.0, self.initial_s - since_attempt_s)


__all__ = ["Redial"]
