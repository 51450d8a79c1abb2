"""Client limits (presenced.core.limits): every bound is positive, names fit the peer wire, and
`welcome` tells a client exactly the limits it can respect.

The tests walk the fields instead of naming them, so a new limit is checked the day it is added.
"""

from __future__ import annotations

import attrs
import pytest

from presenced.core.limits import MAX_NAME_LIMIT, Limits

FIELDS = [field.name for field in attrs.fields(Limits)]


def test_the_defaults_are_valid_and_positive() -> None:
    limits = Limits()
    assert all(getattr(limits, name) > 0 for name in FIELDS)


@pytest.mark.parametrize("name", FIELDS)
@pytest.mark.parametrize("bad", [0, -1])
def test_a_limit_that_is_not_positive_is_refused_by_name(name: str, bad: int) -> None:
    with pytest.raises(ValueError, match=f"limit {name} must be positive, got {bad}"):
        Limits(**{name: bad})


def test_nan_is_not_a_positive_limit() -> None:
    float_fields = [name for name in FIELDS if isinstance(getattr(Limits(), name), float)]
    assert float_fields
    for name in float_fields:
        with pytest.raises(ValueError, match=name):
            Limits(**{name: float("nan")})


@pytest.mark.parametrize("name", ["max_room_name", "max_user_id"])
def test_names_may_be_as_long_as_the_peer_wire_allows_and_no_longer(name: str) -> None:
    assert getattr(Limits(**{name: MAX_NAME_LIMIT}), name) == MAX_NAME_LIMIT
    with pytest.raises(ValueError, match=f"limit {name} must be at most {MAX_NAME_LIMIT}"):
        Limits(**{name: MAX_NAME_LIMIT + 1})


def test_welcome_carries_what_a_client_can_respect() -> None:
    """The sizes and rates a client controls, with their configured values; not the daemon's
    own capacity or timeouts (nothing a client could act on)."""
    limits = Limits(max_frame_bytes=1000, max_meta_bytes=100, max_room_name=10, message_burst=7)
    public = limits.public()
    assert public == {
        "max_frame_bytes": 1000,
        "max_meta_bytes": 100,
        "max_room_name": 10,
        "max_rooms_per_connection": limits.max_rooms_per_connection,
        "max_messages_per_second": limits.max_messages_per_second,
        "message_burst": 7,
    }
    assert "max_connections" not in public
    assert set(public) <= set(FIELDS)


def test_limits_are_frozen() -> None:
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        Limits().max_frame_bytes = 1  # type: ignore[misc]
