"""The redial backoff of peer dialers (presenced/core/redial.py)."""

from __future__ import annotations

import pytest

from presenced.core.redial import Redial


def test_redial_backoff_doubles_to_its_cap_with_jitter_and_resets() -> None:
    backoff = Redial(0.2, 1.0)
    waits = [backoff.next_wait(0.999) for _ in range(6)]
    assert waits == pytest.approx([0.2, 0.4, 0.8, 1.0, 1.0, 1.0], abs=1e-3)
    assert backoff.next_wait(0.0) == pytest.approx(0.5)  # jitter: [delay / 2, delay]
    backoff.reset()
    assert backoff.next_wait(0.0) == pytest.approx(0.1)


def test_a_hurried_redial_keeps_a_minimum_gap() -> None:
    backoff = Redial(0.2, 1.0)
    assert backoff.hurried_wait(0.05) == pytest.approx(0.15)
    assert backoff.hurried_wait(3.0) == 0.0


@pytest.mark.parametrize(("initial", "cap"), [(0, 1), (0.2, -1), (2, 1)])
def test_redial_settings_are_checked(initial: float, cap: float) -> None:
    with pytest.raises(ValueError, match=r"initial_s|max_s"):
        Redial(initial, cap)
