"""Tests for the server's frames to a client (`presenced.core.client_frames`): each builder
makes exactly the frame docs/protocol.md shows."""

from __future__ import annotations

import json
from typing import Any

import pytest

from presenced.core import client_frames as f
from presenced.core import client_wire as w
from presenced.core.client_wire import (
    ProtocolError,
)
from presenced.core.limits import Limits

LIMITS = Limits()


def test_welcome() -> None:
    frame = f.welcome("h", "s1", "ann", "eu", "eu-1", 50, LIMITS)
    assert frame == {
        "type": "welcome",
        "ref": "h",
        "session": "s1",
        "user": "ann",
        "region": "eu",
        "node": "eu-1",
        "protocol": 1,
        "tick_ms": 50,
        "limits": LIMITS.public(),
    }
    assert "ref" not in f.welcome(None, "s1", "ann", "eu", "eu-1", 50, LIMITS)
    assert json.loads(w.encode(frame)) == frame
    resumed = f.welcome(
        "h", "s1", "ann", "eu", "eu-1", 50, LIMITS, resume="s1.x", resumed=True,
        resume_grace_ms=10_000,
    )  # fmt: skip
    assert resumed == {**frame, "resume": "s1.x", "resumed": True, "resume_grace_ms": 10_000}


def test_state_diff_left() -> None:
    entry = f.presence_entry("s1", {"x": 1}, "eu")
    assert entry == {"session": "s1", "meta": {"x": 1}, "region": "eu"}
    assert f.state(3, "r", {"ann": [entry]}) == {
        "type": "state",
        "ref": 3,
        "room": "r",
        "presences": {"ann": [entry]},
    }
    assert f.state(None, "r", {}) == {"type": "state", "room": "r", "presences": {}}
    assert f.diff("r", {"ann": [entry]}, {}, {"bob": [entry]}) == {
        "type": "diff",
        "room": "r",
        "joins": {"ann": [entry]},
        "leaves": {},
        "updates": {"bob": [entry]},
    }
    assert f.left("x", "r") == {"type": "left", "ref": "x", "room": "r"}
    assert f.left(None, "r") == {"type": "left", "room": "r"}


def test_broadcast_event() -> None:
    assert f.broadcast_event("r", "ann", "s1", "eu", "cursor", {"x": 1}) == {
        "type": "broadcast",
        "room": "r",
        "from": {"user": "ann", "session": "s1", "region": "eu"},
        "event": "cursor",
        "data": {"x": 1},
    }


def test_pong() -> None:
    assert f.pong(1, 123, 456.5) == {"type": "pong", "ref": 1, "t": 123, "server_time": 456.5}
    assert f.pong(None, None, 1.0) == {"type": "pong", "server_time": 1.0}


def test_error_frames() -> None:
    assert f.error(w.NOT_JOINED, "not in room", 5) == {
        "type": "error",
        "code": "not_joined",
        "message": "not in room",
        "ref": 5,
    }
    assert f.error(w.INTERNAL, "oops") == {"type": "error", "code": "internal", "message": "oops"}
    with pytest.raises(ValueError):
        f.error("made_up", "x")
    e = ProtocolError(w.BAD_REQUEST, "'meta' must be a JSON object", "u")
    assert f.error_from(e) == {
        "type": "error",
        "code": "bad_request",
        "message": e.message,
        "ref": "u",
    }


# Direct-message frames: exactly the examples of docs/protocol.md.


def _doc(text: str) -> dict[str, Any]:
    frame = json.loads(text)
    assert isinstance(frame, dict)
    return frame


def _same_frame(built: dict[str, Any], documented: str) -> None:
    """Equal to the documented example, key order included (it is what goes on the wire)."""
    expected = _doc(documented)
    assert built == expected
    assert list(built) == list(expected)
    assert w.encode(built) == w.encode(expected)


def test_stored_frame() -> None:
    _same_frame(f.stored(8, "eu.k3J9.17"), '{"type": "stored", "ref": 8, "id": "eu.k3J9.17"}')
    assert f.stored(None, "x") == {"type": "stored", "id": "x"}


def test_delivered_frame() -> None:
    _same_frame(
        f.delivered(8, "eu.k3J9.17", "bob", "us"),
        '{"type": "delivered", "ref": 8, "id": "eu.k3J9.17", "to": "bob", "region": "us"}',
    )
    assert f.delivered(None, "x", "bob", "us") == {
        "type": "delivered",
        "id": "x",
        "to": "bob",
        "region": "us",
    }


def test_read_receipt_frame() -> None:
    _same_frame(
        f.read_receipt(8, "eu.k3J9.17", "bob"),
        '{"type": "read", "ref": 8, "id": "eu.k3J9.17", "by": "bob"}',
    )
    assert f.read_receipt("s", "x", "bob") == {"type": "read", "ref": "s", "id": "x", "by": "bob"}
    assert "ref" not in f.read_receipt(None, "x", "bob")


def test_message_error_frame() -> None:
    built = f.message_error(7, "eu.k3J9.16", "bob", w.NOT_ONLINE, "bob is not online")
    assert built == _doc(
        '{"type": "error", "ref": 7, "id": "eu.k3J9.16", "to": "bob", "code": "not_online",'
        ' "message": "bob is not online"}'
    )
    assert f.message_error(None, "x", "bob", w.EXPIRED, "expired") == {
        "type": "error",
        "code": "expired",
        "message": "expired",
        "id": "x",
        "to": "bob",
    }
    for code in (w.NOT_ONLINE, w.UNREACHABLE, w.HOP_LIMIT, w.STORE_FULL, w.EXPIRED):
        assert f.message_error(1, "x", "bob", code, "m")["code"] == code
    with pytest.raises(ValueError):
        f.message_error(1, "x", "bob", "made_up", "m")


def test_direct_message_frame() -> None:
    _same_frame(
        f.direct_message(
            "eu.k3J9.17",
            "ann",
            "hHZKDMArXPmH",
            "eu",
            ("bob", "carol"),
            {"text": "standup?"},
            w.RELIABLE,
            1795425640982,
        ),
        '{"type": "message", "id": "eu.k3J9.17", "from": "ann", "session": "hHZKDMArXPmH",'
        ' "region": "eu", "to": ["bob", "carol"], "data": {"text": "standup?"},'
        ' "mode": "reliable", "sent_at": 1795425640982}',
    )
    # Not a group message: no "to".
    single = f.direct_message("eu.1", "ann", "s", "eu", (), [1, None], w.FAST, 5)
    assert single == {
        "type": "message",
        "id": "eu.1",
        "from": "ann",
        "session": "s",
        "region": "eu",
        "data": [1, None],
        "mode": "fast",
        "sent_at": 5,
    }
    assert "ref" not in single  # pushed, never a reply


def test_fetched_frame() -> None:
    _same_frame(
        f.fetched(3, 12, 0),
        '{"type": "fetched", "ref": 3, "count": 12, "remaining": 0, "complete": true}',
    )
    assert f.fetched(None, 0, 7) == {
        "type": "fetched",
        "count": 0,
        "remaining": 7,
        "complete": True,
    }
    assert f.fetched(4, 2, 0, complete=False, retry_after_ms=1000) == {
        "type": "fetched",
        "ref": 4,
        "count": 2,
        "remaining": 0,
        "complete": False,
        "retry_after_ms": 1000,
    }


def test_message_frame_is_one_text_frame_of_the_encoded_message() -> None:
    message = f.state(None, "r", {"ann": [f.presence_entry("s1", {"x": "é"}, "eu")]})
    payload = w.encode_frame(message)
    assert f.message_frame(message) == bytes((0x81, len(payload))) + payload
