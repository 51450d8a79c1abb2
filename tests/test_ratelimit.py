"""The per-connection rate limit and the rule that closes a flooder (pure, exact times)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from presenced.core.ratelimit import DROP_ALLOWANCE, FloodLimit, TokenBucket, Verdict

RATE, BURST = 200.0, 400


def send(limit: FloodLimit, per_second: float, seconds: float, start: float = 0.0) -> list:
    """The verdicts on frames sent evenly at ``per_second`` from ``start``."""
    count = round(per_second * seconds)
    return [limit.take(start + i / per_second) for i in range(count)]


def test_a_burst_is_served_then_dropped_and_refills() -> None:
    bucket = TokenBucket(10.0, 3, now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert not bucket.take(0.05) and bucket.take(0.1)


def test_within_the_rate_everything_is_served() -> None:
    assert set(send(FloodLimit(RATE, BURST, 0.0), RATE, 60.0)) == {Verdict.SERVE}


def test_a_moment_over_the_limit_only_drops_the_excess() -> None:
    limit = FloodLimit(RATE, BURST, 0.0)
    verdicts = [limit.take(0.0) for _ in range(2 * BURST)]  # twice the burst at once
    assert verdicts.count(Verdict.SERVE) == BURST
    assert verdicts.count(Verdict.DROP) == BURST
    assert limit.take(1.0) is Verdict.SERVE


def test_a_flood_is_closed_although_a_trickle_is_let_through() -> None:
    # 20 times the rate: one frame in 20 is served (the count of drops does not start again).
    verdicts = send(FloodLimit(RATE, BURST, 0.0), 20 * RATE, 1.0)
    closed = verdicts.index(Verdict.CLOSE)
    served = verdicts[:closed].count(Verdict.SERVE)
    assert served > BURST  # frames kept being let through on the way
    assert closed < BURST + DROP_ALLOWANCE * BURST + served + 1
    assert closed / (20 * RATE) < BURST / (19 * RATE) + DROP_ALLOWANCE * BURST / (18 * RATE)


@given(st.floats(min_value=2.2, max_value=100.0))
def test_sending_over_twice_the_rate_is_closed_in_bounded_time(times_the_rate: float) -> None:
    per_second = times_the_rate * RATE
    # The frame bucket empties, then drops exceed their refill by (per_second - 2 * rate).
    bound_s = BURST / (per_second - RATE) + DROP_ALLOWANCE * BURST / (per_second - 2 * RATE)
    verdicts = send(FloodLimit(RATE, BURST, 0.0), per_second, bound_s + 0.1)
    assert Verdict.CLOSE in verdicts


@given(st.floats(min_value=1.0, max_value=2.0))
def test_up_to_twice_the_rate_is_never_closed(times_the_rate: float) -> None:
    verdicts = send(FloodLimit(RATE, BURST, 0.0), times_the_rate * RATE, 30.0)
    assert Verdict.CLOSE not in verdicts
