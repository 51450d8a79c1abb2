"""The server API's pure wire (core/api_wire.py) and disconnect table (core/kicks.py)."""

from __future__ import annotations

import pytest

from presenced.core import api_wire as w
from presenced.core import peer_wire, protocol
from presenced.core.kicks import Kick, Refusals
from presenced.core.limits import Limits

LIMITS = Limits()


def test_bodies() -> None:
    assert w.parse_body(b"") == {} and w.parse_body(b" \n") == {}
    assert w.parse_body(b'{"a": 1}') == {"a": 1}
    for bad in (b"[]", b"{", b'{"a": NaN}', b'{"a": 1e999}', b"\xff", b"[" * 200 + b"]" * 200):
        with pytest.raises(w.ApiError) as refused:
            w.parse_body(bad)
        assert (refused.value.status, refused.value.code) == (400, "bad_request")
    with pytest.raises(w.ApiError) as refused:
        w.parse_body(b" " * (w.MAX_BODY_BYTES + 1))
    assert refused.value.status == 413


def test_requests_follow_the_client_rules() -> None:
    assert w.parse_publish({"room": "r", "data": None}, LIMITS) == w.PublishRequest(
        "r", "message", None
    )
    send = w.parse_send({"to": ["a", "b"], "data": 1, "mode": "reliable"}, LIMITS)
    assert send.message.to == ("a", "b") and send.message.group and send.wait_ms == 1000
    assert w.parse_room({"room": "x"}, LIMITS) == "x"
    assert w.parse_rooms({}) == w.RoomsRequest("", w.DEFAULT_ROOMS_LIMIT)
    assert w.parse_disconnect({"user": "ann", "refuse_s": 2}, LIMITS) == w.DisconnectRequest(
        "ann", "", "", 2.0
    )
    bad = [
        (w.parse_publish, {"room": "r\x00", "data": 1}),
        (w.parse_publish, {"room": "r", "event": "", "data": 1}),
        (w.parse_send, {"to": "a", "data": 1, "extra": 0}),
        (w.parse_send, {"to": ["a", "a"], "data": 1}),
        (w.parse_disconnect, {"user": "ann", "reason": "x" * 200}),
        (w.parse_disconnect, {"user": "ann", "refuse_s": True}),
        (w.parse_disconnect, {"user": "ann", "reason": "line\nbreak"}),
    ]
    for parse, body in bad:
        with pytest.raises(w.ApiError):
            parse(body, LIMITS)  # type: ignore[operator]


def test_documents() -> None:
    entries = [("ann", "s1", {"x": 1}, "eu"), ("ann", "s2", {}, "us"), ("bob", "s3", {}, "eu")]
    assert w.occupancy_document("r", entries) == {
        "room": "r",
        "sessions": 3,
        "users": 2,
        "regions": {"eu": 2, "us": 1},
    }
    presence = w.presence_document("r", entries)
    assert presence["presences"]["ann"][0] == {"session": "s1", "meta": {"x": 1}, "region": "eu"}
    rooms = {"b": {("u", "s"): 1}, "a": {("u", "s"): 1, ("u", "t"): 1, ("v", "s"): 1}, "c": {}}
    assert w.rooms_document(rooms, w.RoomsRequest("", 1)) == {
        "rooms": [{"room": "a", "sessions": 3, "users": 2}],
        "count": 2,
        "truncated": True,
    }


def test_send_outcomes() -> None:
    fast = protocol.Send(None, ("a", "b"), 1, "fast", True)
    frames = [protocol.delivered(None, "m1", "a", "eu")]
    assert w.send_outcome(fast, frames, final=False)[0] is False
    frames.append(protocol.message_error(None, "m1", "b", "unreachable", "no route"))
    done, document = w.send_outcome(fast, frames, final=False)
    assert done and document["recipients"] == {
        "a": {"status": "delivered", "regions": ["eu"]},
        "b": {"status": "unreachable"},
    }
    assert w.send_outcome(fast, [], final=True)[1]["recipients"]["a"] == {"status": "timeout"}
    reliable = protocol.Send(None, ("a",), 1, "reliable", False)
    stored = [protocol.stored(None, "m2")]
    assert w.send_outcome(reliable, stored, final=False) == (
        False,
        {"id": "m2", "mode": "reliable", "recipients": {"a": {"status": "stored"}}},
    )
    full = [protocol.error("store_full", "full")]
    assert w.send_outcome(reliable, full, final=False)[1]["recipients"] == {
        "a": {"status": "store_full"}
    }


def test_server_frames_name_no_user() -> None:
    user = protocol.SERVER_USER
    assert protocol.broadcast_event("r", user, user, "eu", "e", 1)["from"] == {
        "server": True,
        "region": "eu",
    }
    message = protocol.direct_message("m", user, user, "eu", (), 1, "fast", 5)
    assert message["server"] is True and "from" not in message and "session" not in message
    with pytest.raises(protocol.ProtocolError):  # no client can take the name
        protocol.decode_client_frame('{"type": "hello", "user": "\\u007fserver"}', LIMITS)


def test_kick_on_the_peer_wire() -> None:
    kick = Kick("id1", "ann", "", "spam", 30_000)
    assert peer_wire.decode(peer_wire.encode(kick)) == kick
    for bad in ({"refuse_ms": -1}, {"user": ""}, {"reason": 5}, {"session": None}):
        wire = {**peer_wire._to_wire(kick), **bad}
        with pytest.raises(peer_wire.PeerProtocolError):
            peer_wire.decode(__import__("cbor2").dumps(wire))


def test_refusals_expire_and_stay_bounded() -> None:
    table = Refusals(limit=8)
    table.refuse("ann", "", 10.0)
    table.refuse("bob", "s1", 5.0)
    assert table.left_s("ann", "any", 4.0) == 6.0
    assert table.left_s("bob", "s1", 4.0) == 1.0 and table.left_s("bob", "s2", 4.0) is None
    assert table.left_s("ann", "x", 10.0) is None and len(table) == 1
    for n in range(20):
        table.refuse(f"u{n}", "", 100.0 + n)
    assert len(table) <= 8
    assert table.left_s("u19", "", 0.0) == 119.0  # the longest are kept
    table.expire(1000.0)
    assert len(table) == 0
