"""The pure liveness and resume decisions (presenced.core.resume) and the pong fast path."""

from __future__ import annotations

from presenced.core.resume import (
    Timing,
    resume_token,
    token_session,
    token_valid,
    verdict,
)
from presenced.core.ws_frames import PING_FRAME, binary_frame, whole_control_frames

TIMING = Timing(client_timeout_s=15.0, resume_grace_s=10.0)


def test_default_timing_leaves_within_thirty_seconds() -> None:
    assert TIMING.ping_after_s == 10.0 and TIMING.sweep_s == 1.0
    assert TIMING.worst_leave_s() <= 27.0
    assert abs(Timing(1.2, 1.0).sweep_s - 0.2) < 1e-9


def test_verdicts() -> None:
    never = float("-inf")
    assert verdict(100.0, never, 109.0, TIMING) == "ok"
    assert verdict(100.0, never, 110.0, TIMING) == "ping"
    assert verdict(100.0, 110.0, 111.0, TIMING) == "ok"  # pinged since its last input
    assert verdict(100.0, 90.0, 111.0, TIMING) == "ping"  # that ping was before the input
    assert verdict(100.0, 110.0, 115.0, TIMING) == "dead"


def test_tokens_name_their_session_and_bind_the_user() -> None:
    key = b"k" * 32
    token = resume_token(key, "ann", "s1")
    assert token.startswith("s1.") and len(token) <= 128
    assert token_session(token) == "s1"
    assert token_valid(key, "ann", token)
    assert not token_valid(key, "bob", token)
    assert not token_valid(b"o" * 32, "ann", token)
    assert not token_valid(key, "ann", "s2" + token[2:])
    for bad in ("", "s1", ".mac", "s1."):
        assert token_session(bad) is None and not token_valid(key, "ann", bad)


def test_whole_control_frames() -> None:
    pong = b"\x8a\x80" + b"abcd"  # a masked, empty pong
    assert whole_control_frames(pong) and whole_control_frames(pong + pong)
    assert whole_control_frames(PING_FRAME)
    assert not whole_control_frames(b"")
    assert not whole_control_frames(pong[:3])  # a partial frame: wsproto keeps the rest
    assert not whole_control_frames(pong + binary_frame(b"x", b"abcd"))
