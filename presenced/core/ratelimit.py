"""Token buckets: the per-connection rate limit, and the rule that closes a flooder.

Pure (the caller passes ``now``), so it is exact under a mock clock and trivially testable.
"""

from __future__ import annotations

import enum

#: Dropped frames a connection may have in reserve, as a multiple of ``message_burst``.
DROP_ALLOWANCE = 2


class TokenBucket:
    """Allows ``rate`` events per second on average and bursts of up to ``burst``."""

    __slots__ = ("burst", "rate", "tokens", "updated")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.updated = now

    def take(self, now: float) -> bool:
        """Spend one token if there is one; False means the event is over the limit."""
        elapsed = now - self.updated
        if elapsed > 0:
            self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
            self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class Verdict(enum.Enum):
    """What to do with one frame a client sent."""

    SERVE = "serve"
    DROP = "drop"
    CLOSE = "close"


class FloodLimit:
    """The rate limit of one client connection, and when its excess becomes a flood.

    Every frame that costs the daemon work (a message, a WebSocket ping or pong) takes a token
    from one bucket (``rate`` per second, ``burst`` at most); a frame that finds it empty is
    dropped. Drops have a bucket of their own: ``DROP_ALLOWANCE * burst`` of them, refilled at
    the same ``rate``. A drop that finds that one empty closes the connection (1008).

    So a client that is over the limit for a moment only loses the excess, and a client that
    keeps sending more than twice the rate is closed within a bounded time, however many of
    its frames are let through in between (those refill only the first bucket; a count of
    consecutive drops would start again at each one). At the default 200/s and a burst of
    400: a client sending 10,000 frames/s is closed after about 1,200 of them (0.12 s), one
    sending 1,000/s after about 1.8 s, and one sending 400/s or less never.
    """

    __slots__ = ("drops", "frames")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.frames = TokenBucket(rate, burst, now)
        self.drops = TokenBucket(rate, DROP_ALLOWANCE * burst, now)

    def take(self, now: float) -> Verdict:
        """The verdict on one more frame arriving at ``now``."""
        if self.frames.take(now):
            return Verdict.SERVE
        if self.drops.take(now):
            return Verdict.DROP
        return Verdict.CLOSE
