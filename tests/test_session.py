"""Tests for the client session rules (`presenced.core.session`): a session fed messages,
with no socket, node or clock (the caller passes ``now``)."""

from __future__ import annotations

import pytest

from presenced.auth import Grant, anonymous_grant
from presenced.core import client_wire as w
from presenced.core.limits import Limits
from presenced.core.session import HelloRoute, Refusal, SessionRules
from presenced.core.ws_frames import CloseCode

LIMITS = Limits(max_rooms_per_connection=2, max_meta_bytes=64)


def greeted(grant: Grant | None = None, limits: Limits = LIMITS) -> SessionRules:
    rules = SessionRules(limits, now=0.0)
    rules.greeted(grant or anonymous_grant("ann"))
    return rules


def refused(call, *args) -> w.ProtocolError:  # type: ignore[no-untyped-def]
    with pytest.raises(w.ProtocolError) as info:
        call(*args)
    return info.value


def test_every_message_but_hello_needs_a_session_first() -> None:
    rules = SessionRules(LIMITS, now=0.0)
    rules.check_greeted(w.Hello(1))
    error = refused(rules.check_greeted, w.Join(2, "r"))
    assert isinstance(error, Refusal)
    assert (error.code, error.ref, error.close, error.tell) == (
        w.HELLO_REQUIRED,
        2,
        CloseCode.POLICY,
        True,
    )
    rules.greeted(anonymous_grant("ann"))
    rules.check_greeted(w.Join(3, "r"))


def test_hello_routes_to_a_token_or_an_anonymous_grant_or_is_refused() -> None:
    rules = SessionRules(LIMITS, now=0.0)
    assert rules.hello_route(w.Hello(1, token="t"), True, False) is HelloRoute.TOKEN
    assert rules.hello_route(w.Hello(1, user="ann"), False, True) is HelloRoute.ANONYMOUS
    for hello, tokens, anonymous, why in [
        (w.Hello(1, token="t"), False, True, "this daemon does not accept tokens"),
        (w.Hello(1), True, False, "a token is required"),
    ]:
        error = refused(rules.hello_route, hello, tokens, anonymous)
        assert isinstance(error, Refusal)
        assert (error.code, error.message, error.close) == (w.UNAUTHORIZED, why, CloseCode.POLICY)
    assert rules.greeted(Grant("bob", ("a*",), None)) == "bob"
    again = refused(rules.hello_route, w.Hello(5, user="x"), True, True)
    assert not isinstance(again, Refusal)  # an error, and the connection stays
    assert (again.code, again.ref) == (w.BAD_REQUEST, 5)


def test_join_only_rooms_the_grant_allows_and_at_most_the_limit() -> None:
    rules = greeted(Grant("ann", ("doc-*",), None))
    assert refused(rules.join, w.Join(1, "secret")).code == w.FORBIDDEN
    rules.join(w.Join(2, "doc-1"))
    rules.join(w.Join(3, "doc-2"))
    rules.join(w.Join(4, "doc-2"))  # joining again is no new room
    error = refused(rules.join, w.Join(5, "doc-3"))
    assert (error.code, error.ref) == (w.TOO_MANY_ROOMS, 5)
    assert list(rules.rooms) == ["doc-1", "doc-2"]


def test_update_patches_the_current_meta_of_a_joined_room() -> None:
    rules = greeted()
    assert refused(rules.update, w.Update(1, "r", {"x": 1}), None).code == w.NOT_JOINED
    rules.join(w.Join(2, "r"))
    current = {"x": 1, "name": "ann"}
    meta = rules.update(w.Update(3, "r", {"x": 2, "name": None}), current)
    assert meta == {"x": 2}
    assert current == {"x": 1, "name": "ann"}  # the stored meta is never changed in place
    # A room it is not in, even with a meta there (e.g. left on another connection).
    assert refused(rules.update, w.Update(4, "q", {"x": 1}), current).code == w.NOT_JOINED


def test_an_update_that_makes_meta_too_large_is_refused() -> None:
    rules = greeted()
    rules.join(w.Join(1, "r"))
    error = refused(rules.update, w.Update(2, "r", {"big": "x" * 64}), {"x": 1})
    assert (error.code, error.ref) == (w.TOO_LARGE, 2)


def test_leave_and_broadcast_need_the_room() -> None:
    rules = greeted()
    assert refused(rules.leave, w.Leave(1, "r")).code == w.NOT_JOINED
    assert refused(rules.broadcast, w.Broadcast(2, "r", "e")).code == w.NOT_JOINED
    rules.join(w.Join(3, "r"))
    rules.broadcast(w.Broadcast(4, "r", "e"))
    assert rules.leave(w.Leave(5, "r")) == {"type": "left", "ref": 5, "room": "r"}
    assert rules.rooms == {}


def test_direct_messages_without_messaging() -> None:
    rules = greeted()
    send = w.Send(1, ("bob",), "hi")
    assert refused(rules.direct, send, False).code == w.INTERNAL
    assert rules.direct(w.Fetch(2), False) == {
        "type": "fetched",
        "ref": 2,
        "count": 0,
        "remaining": 0,
        "complete": True,
    }
    assert rules.direct(w.MarkRead(3, "m"), False) is None  # ignored
    assert rules.direct(send, True) is None  # the messenger's


def test_a_flood_is_dropped_told_once_a_second_then_closed_with_1008() -> None:
    limits = Limits(max_messages_per_second=10, message_burst=5)
    rules = SessionRules(limits, now=0.0)
    assert [rules.admit(0.0) for _ in range(5)] == [None] * 5
    first = rules.admit(0.0)
    assert first is not None
    assert (first.code, first.tell, first.close) == (w.RATE_LIMITED, True, None)
    answers = [rules.admit(0.0) for _ in range(9)]  # the drop allowance: 2 bursts
    assert all(a is not None and not a.tell and a.close is None for a in answers)
    closing = rules.admit(0.0)  # over the allowance: closed (told less than a second ago)
    assert closing is not None and not closing.tell
    assert (closing.close, closing.reason) == (CloseCode.POLICY, "message rate limit exceeded")
    # A second later the rate is back: served, and the next excess is told again.
    assert [rules.admit(1.0) for _ in range(5)] == [None] * 5
    told = rules.admit(1.0)
    assert told is not None and told.tell and told.close is None


def test_a_resumed_session_keeps_the_rooms_its_grant_allows_up_to_the_limit() -> None:
    rules = greeted(Grant("ann", ("doc-*",), None))
    dropped = rules.resumed(["doc-1", "secret", "doc-2", "doc-3"])
    assert list(rules.rooms) == ["doc-1", "doc-2"]
    assert dropped == ["secret", "doc-3"]
