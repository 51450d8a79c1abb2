"""The daemon with real sockets: rooms, presence diffs, broadcasts, auth and shutdown."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import jwt
import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from presenced.auth import mint_token
from presenced.client import PresenceClient, RequestError, connect
from presenced.core.limits import Limits

SECRET = b"s" * 64
#: Upper bound on any single wait for a frame: generous, and never reached when all is well.
WAIT = 5


# ------------------------------------------------------------------------------ helpers


async def wait_until(client: PresenceClient, condition: Callable[[], bool]) -> None:
    """Consume unsolicited frames until ``condition()`` holds (it is checked first)."""
    with trio.fail_after(WAIT):
        while not condition():
            await client.next_message()


async def next_of(client: PresenceClient, type_: str) -> dict[str, Any]:
    with trio.fail_after(WAIT):
        return await client.next_message(type_)


async def close_code(client: PresenceClient) -> int:
    """Drain the client until the server closes it; the close code it sent."""
    with trio.fail_after(WAIT):
        try:
            while True:
                await client.next_message()
        except ConnectionClosed:
            pass
    assert client.closed is not None
    return client.closed.reason.code


def sessions(client: PresenceClient, room: str, user: str) -> dict[str, dict[str, Any]]:
    return client.presences(room).get(user, {})


async def raw_send(ws: WebSocketConnection, message: dict[str, Any]) -> None:
    await ws.send_message(json.dumps(message))


async def raw_recv(ws: WebSocketConnection) -> dict[str, Any]:
    with trio.fail_after(WAIT):
        message = json.loads(await ws.get_message())
    assert isinstance(message, dict)
    return message


async def raw_close_code(ws: WebSocketConnection) -> int:
    """The close code the server ends a raw connection with (no frames may come before it)."""
    with trio.fail_after(WAIT), pytest.raises(ConnectionClosed) as closed:
        frame = await ws.get_message()
        pytest.fail(f"expected the connection to close, got {frame!r}")
    return closed.value.reason.code


# ------------------------------------------------------------------------------ rooms


async def test_two_users_see_each_other_join(url: str) -> None:
    async with connect(url, user="ann") as ann, connect(url, user="bob") as bob:
        assert ann.user == "ann" and ann.session
        assert bob.user == "bob" and bob.session != ann.session
        await ann.join("lobby", {"name": "Ann"})
        # The state reply holds the room as it was; Ann's own join follows as a diff.
        diff = await next_of(ann, "diff")
        assert diff["joins"] == {
            "ann": [{"session": ann.session, "meta": {"name": "Ann"}, "region": "test"}]
        }

        state = await bob.join("lobby", {"name": "Bob"})
        assert state["ann"] == {ann.session: {"meta": {"name": "Ann"}, "region": "test"}}

        diff = await next_of(ann, "diff")
        assert diff["room"] == "lobby"
        assert diff["joins"] == {
            "bob": [{"session": bob.session, "meta": {"name": "Bob"}, "region": "test"}]
        }
        assert diff["leaves"] == {} and diff["updates"] == {}
        await wait_until(bob, lambda: bool(sessions(bob, "lobby", "bob")))
        assert set(ann.presences("lobby")) == set(bob.presences("lobby")) == {"ann", "bob"}


async def test_cursor_updates_are_coalesced_in_order_latest_wins(start_daemon) -> None:
    # A long tick makes "coalesced" independent of how fast this machine sends.
    server = await start_daemon(tick_ms=100)
    async with connect(server.url, user="ann") as ann, connect(server.url, user="bob") as bob:
        await ann.join("doc", {"x": -1})
        await bob.join("doc")
        await wait_until(ann, lambda: bool(sessions(ann, "doc", "bob")))
        for x in range(50):
            await ann.update("doc", {"x": x})

        seen: list[int] = []
        with trio.fail_after(WAIT):
            while not seen or seen[-1] != 49:
                diff = await bob.next_message("diff")
                for entry in diff["updates"].get("ann", []):
                    assert entry["session"] == ann.session
                    seen.append(entry["meta"]["x"])
        assert seen == sorted(set(seen)), f"x went backwards or repeated: {seen}"
        assert seen[-1] == 49
        assert len(seen) <= 10, f"{len(seen)} update frames for 50 updates: not coalesced"
        assert sessions(bob, "doc", "ann")[ann.session]["meta"] == {"x": 49}


async def test_quiet_room_flushes_first_change_at_once(start_daemon) -> None:
    # With a one-second tick, a diff that waited for the ticker would take up to a second.
    server = await start_daemon(tick_ms=1000)
    async with connect(server.url, user="ann") as ann:
        started = trio.current_time()
        await ann.join("doc", {"x": 1})
        with trio.fail_after(WAIT):
            diff = await ann.next_message("diff")
        assert diff["joins"] == {
            "ann": [{"session": ann.session, "meta": {"x": 1}, "region": "test"}]
        }
        assert trio.current_time() - started < 0.5


async def test_broadcast_reaches_others_and_echo_is_opt_in(url: str) -> None:
    async with connect(url, user="ann") as ann, connect(url, user="bob") as bob:
        await ann.join("room")
        await bob.join("room")
        await ann.broadcast("room", "wave", {"k": [1, "two"]})
        message = await next_of(bob, "broadcast")
        assert message == {
            "type": "broadcast",
            "room": "room",
            "from": {"user": "ann", "session": ann.session, "region": "test"},
            "event": "wave",
            "data": {"k": [1, "two"]},
        }
        # Frames to one connection keep their order: if "wave" had been echoed to Ann it
        # would arrive before "echoed".
        await ann.broadcast("room", "echoed", None, echo=True)
        message = await next_of(ann, "broadcast")
        assert message["event"] == "echoed" and message["from"]["session"] == ann.session
        assert (await next_of(bob, "broadcast"))["event"] == "echoed"


async def test_leave_tells_others_and_acknowledges(url: str) -> None:
    async with connect(url, user="ann") as ann, connect(url, user="bob") as bob:
        await ann.join("room", {"x": 1})
        await bob.join("room")
        await wait_until(bob, lambda: bool(sessions(bob, "room", "ann")))
        await ann.leave("room")  # returns once `left` (with our ref) arrives
        assert ann.presences("room") == {}
        diff = await next_of(bob, "diff")
        while not diff["leaves"]:  # Bob's own join may come first
            diff = await next_of(bob, "diff")
        assert diff["leaves"] == {
            "ann": [{"session": ann.session, "meta": {"x": 1}, "region": "test"}]
        }
        assert "ann" not in bob.presences("room")


async def test_left_echoes_ref_and_room(url: str) -> None:
    async with connect(url, user="ann") as ann:
        await ann.join("room")
        reply = await ann.request({"type": "leave", "room": "room"})
        assert reply["type"] == "left" and reply["room"] == "room"


async def test_disconnect_is_a_leave(url: str) -> None:
    async with connect(url, user="bob") as bob:
        await bob.join("room")
        async with connect(url, user="ann") as ann:
            await ann.join("room")
            await wait_until(bob, lambda: bool(sessions(bob, "room", "ann")))
        # Leaving the block closes Ann's socket.
        await wait_until(bob, lambda: "ann" not in bob.presences("room"))
        assert list(bob.presences("room")) == ["bob"]


async def test_one_user_two_tabs_is_two_sessions(url: str) -> None:
    async with (
        connect(url, user="ann") as tab1,
        connect(url, user="ann") as tab2,
        connect(url, user="bob") as bob,
    ):
        assert tab1.session != tab2.session
        await bob.join("doc")
        await tab1.join("doc", {"tab": 1})
        await tab2.join("doc", {"tab": 2})
        await tab2.update("doc", {"x": 5})
        expected = {
            tab1.session: {"meta": {"tab": 1}, "region": "test"},
            tab2.session: {"meta": {"tab": 2, "x": 5}, "region": "test"},
        }
        await wait_until(bob, lambda: sessions(bob, "doc", "ann") == expected)
        await wait_until(tab1, lambda: sessions(tab1, "doc", "ann") == expected)
        assert set(bob.presences("doc")) == {"ann", "bob"}

        # One tab leaving leaves the user present through the other.
        await tab1.leave("doc")
        await wait_until(bob, lambda: set(sessions(bob, "doc", "ann")) == {tab2.session})


# ------------------------------------------------------------------------------ meta


async def test_update_patch_sets_and_null_deletes(url: str) -> None:
    async with connect(url, user="ann") as ann, connect(url, user="bob") as bob:
        await ann.join("doc", {"a": 1, "b": 2, "nested": {"k": 1}})
        await bob.join("doc")
        await ann.update("doc", {"b": None, "c": 3, "nested": {"j": 2}, "absent": None})
        want = {"a": 1, "c": 3, "nested": {"j": 2}}  # shallow merge: nested is replaced
        await wait_until(
            bob, lambda: sessions(bob, "doc", "ann").get(ann.session, {}).get("meta") == want
        )


async def test_meta_too_large_is_refused_with_ref(start_daemon) -> None:
    server = await start_daemon(limits={"max_meta_bytes": 200})
    async with connect(server.url, user="ann") as ann, connect(server.url, user="bob") as bob:
        big = "x" * 300
        with pytest.raises(RequestError) as refused:
            await ann.join("doc", {"blob": big})
        assert refused.value.code == "too_large"

        await ann.join("doc", {"a": "y" * 120})
        await bob.join("doc")
        # Each patch alone fits; merged into the current meta it would not.
        with pytest.raises(RequestError) as refused:  # `request` matches the error by its ref
            await ann.request({"type": "update", "room": "doc", "meta": {"b": "z" * 120}})
        assert refused.value.code == "too_large"
        with pytest.raises(RequestError) as refused:
            await ann.request({"type": "update", "room": "doc", "meta": {"blob": big}})
        assert refused.value.code == "too_large"

        # The refused patches changed nothing; a fitting one still works.
        await ann.update("doc", {"a": None, "b": 1})
        await wait_until(
            bob, lambda: sessions(bob, "doc", "ann").get(ann.session, {}).get("meta") == {"b": 1}
        )


async def test_raw_error_frame_shape(url: str) -> None:
    async with open_websocket_url(url) as ws:
        await raw_send(ws, {"type": "hello", "ref": "h"})
        assert (await raw_recv(ws))["type"] == "welcome"
        await raw_send(ws, {"type": "update", "ref": "u1", "room": "nowhere", "meta": {}})
        error = await raw_recv(ws)
        assert error["type"] == "error" and error["code"] == "not_joined"
        assert error["ref"] == "u1" and isinstance(error["message"], str)


# ------------------------------------------------------------------------------ ping


async def test_ping_pong_echoes_t_and_gives_server_time(url: str) -> None:
    async with connect(url, user="ann") as ann:
        reply = await ann.request({"type": "ping", "t": 12345.5})
        assert reply["type"] == "pong"
        assert reply["t"] == 12345.5
        assert abs(reply["server_time"] - time.time() * 1000) < 60_000
        reply = await ann.request({"type": "ping"})
        assert "t" not in reply and isinstance(reply["server_time"], float)
        assert await ann.ping() >= 0


# ------------------------------------------------------------------------------ auth


async def test_token_joins_allowed_rooms_only(start_daemon) -> None:
    server = await start_daemon(token_secret=SECRET, allow_anonymous=False)
    token = mint_token(SECRET, "ann", ["doc-*"], ttl_s=60, now=time.time())
    async with connect(server.url, token=token, user="mallory") as ann:
        assert ann.user == "ann"  # the token's subject, not the claimed user
        await ann.join("doc-1", {"x": 1})
        await wait_until(ann, lambda: bool(sessions(ann, "doc-1", "ann")))
        assert sessions(ann, "doc-1", "ann")[ann.session]["meta"] == {"x": 1}
        with pytest.raises(RequestError) as refused:
            await ann.join("secret")
        assert refused.value.code == "forbidden"
        # Forbidden is not fatal: the connection is still usable.
        assert await ann.ping() >= 0
        assert ann.closed is None


BAD_TOKENS: dict[str, Callable[[float], str | None]] = {
    "expired": lambda now: mint_token(SECRET, "ann", ["*"], ttl_s=10, now=now - 3600),
    "wrong-secret": lambda now: mint_token(b"w" * 64, "ann", ["*"], ttl_s=600, now=now),
    "not-yet-valid": lambda now: jwt.encode(
        {"sub": "ann", "rooms": ["*"], "nbf": now + 3600}, SECRET, algorithm="HS256"
    ),
    "alg-none": lambda now: jwt.encode({"sub": "ann", "rooms": ["*"]}, None, algorithm="none"),
    "garbage": lambda now: "not.a.jwt",
    "no-token": lambda now: None,
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", BAD_TOKENS)
async def test_bad_token_is_unauthorized_and_closed(start_daemon, kind: str) -> None:
    server = await start_daemon(token_secret=SECRET, allow_anonymous=False)
    token = BAD_TOKENS[kind](time.time())
    async with open_websocket_url(server.url) as ws:
        hello: dict[str, Any] = {"type": "hello", "ref": 1, "user": "ann"}
        if token is not None:
            hello["token"] = token
        await raw_send(ws, hello)
        error = await raw_recv(ws)
        assert error["type"] == "error" and error["code"] == "unauthorized"
        assert error["ref"] == 1
        assert await raw_close_code(ws) == 1008
    assert server.daemon.node.connections == set()


@pytest.mark.slow
async def test_token_refused_when_daemon_has_no_secret(url: str) -> None:
    token = mint_token(SECRET, "ann", ["*"], ttl_s=60, now=time.time())
    async with open_websocket_url(url) as ws:
        await raw_send(ws, {"type": "hello", "ref": 1, "token": token})
        assert (await raw_recv(ws))["code"] == "unauthorized"
        assert await raw_close_code(ws) == 1008


@pytest.mark.slow
@pytest.mark.parametrize(
    "first",
    [
        {"type": "ping", "ref": 7},
        {"type": "join", "ref": 7, "room": "r"},
        {"type": "update", "ref": 7, "room": "r", "meta": {}},
    ],
    ids=["ping", "join", "update"],
)
async def test_messages_before_hello_are_refused_and_closed(url: str, first: dict) -> None:
    async with open_websocket_url(url) as ws:
        await raw_send(ws, first)
        error = await raw_recv(ws)
        assert error == {
            "type": "error",
            "code": "hello_required",
            "message": error["message"],
            "ref": 7,
        }
        assert await raw_close_code(ws) == 1008


async def test_second_hello_is_a_bad_request(url: str) -> None:
    async with connect(url, user="ann") as ann:
        with pytest.raises(RequestError) as refused:
            await ann.hello(user="bob")
        assert refused.value.code == "bad_request"
        assert await ann.ping() >= 0


# ------------------------------------------------------------------------------ shutdown


async def test_graceful_shutdown_closes_clients_with_1001(server) -> None:
    async with connect(server.url, user="ann") as ann, connect(server.url, user="bob") as bob:
        await ann.join("room")
        await bob.join("room")
        server.daemon.shutdown()
        with trio.fail_after(2):  # well inside the daemon's own grace period
            assert await close_code(ann) == 1001
            assert await close_code(bob) == 1001
    # It stopped listening too.
    with trio.fail_after(WAIT):
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", server.daemon.client_port)
            except OSError:
                break
            await stream.aclose()
            await trio.sleep(0.01)


# ------------------------------------------------------------------------------ limits


async def test_rooms_per_connection_limit(start_daemon) -> None:
    server = await start_daemon(limits=Limits(max_rooms_per_connection=2))
    async with connect(server.url, user="ann") as ann:
        await ann.join("a")
        await ann.join("b")
        with pytest.raises(RequestError) as refused:
            await ann.join("c")
        assert refused.value.code == "too_many_rooms"
        await ann.join("a", {"again": True})  # re-joining a room it is in is fine
        await ann.leave("b")
        await ann.join("c")
        assert set(ann.rooms) == {"a", "c"}


@pytest.mark.parametrize(
    "request_",
    [
        {"type": "update", "room": "elsewhere", "meta": {"x": 1}},
        {"type": "leave", "room": "elsewhere"},
        {"type": "broadcast", "room": "elsewhere", "event": "e", "data": 1},
    ],
    ids=["update", "leave", "broadcast"],
)
async def test_not_joined(url: str, request_: dict) -> None:
    async with connect(url, user="ann") as ann:
        await ann.join("here")
        with pytest.raises(RequestError) as refused:
            await ann.request(request_)
        assert refused.value.code == "not_joined"
        assert await ann.ping() >= 0


# ------------------------------------------------------------------------------ paced input


async def test_a_client_streaming_updates_is_read_once_per_tick(start_daemon) -> None:
    """While a client streams updates the ticker reads its socket at tick boundaries: the
    updates still arrive in order, other requests are still answered, and after a quiet spell
    the connection is read as data arrives again."""
    from presenced.server.clients import PACED_IDLE_TICKS

    server = await start_daemon(tick_ms=20)
    async with connect(server.url, user="ann") as ann, connect(server.url, user="bob") as bob:
        await ann.join("doc", {"x": -1})
        await bob.join("doc")
        await wait_until(ann, lambda: bool(sessions(ann, "doc", "bob")))
        assert not server.daemon.paced
        for x in range(20):
            await ann.update("doc", {"x": x})
            await trio.sleep(0.005)
        assert [conn.user for conn in server.daemon.paced] == ["ann"]
        await wait_until(
            bob, lambda: sessions(bob, "doc", "ann").get(ann.session, {}).get("meta") == {"x": 19}
        )
        # A request from the paced client is answered (at the next tick at the latest).
        started = trio.current_time()
        pong = await ann.request({"type": "ping", "t": 1})
        assert pong["type"] == "pong"
        assert trio.current_time() - started < 1
        # Quiet for more than PACED_IDLE_TICKS ticks: back to reading as data arrives.
        await trio.sleep((PACED_IDLE_TICKS + 3) * 0.02)
        assert not server.daemon.paced
        await ann.update("doc", {"x": 100})
        await wait_until(
            bob,
            lambda: sessions(bob, "doc", "ann").get(ann.session, {}).get("meta") == {"x": 100},
        )


@pytest.mark.slow
async def test_a_paced_client_that_disconnects_or_misbehaves_is_dropped_alone(
    start_daemon,
) -> None:
    server = await start_daemon(tick_ms=20)
    node = server.daemon.node
    async with connect(server.url, user="bob") as bob:
        await bob.join("doc")
        async with open_websocket_url(server.url) as raw:
            await raw_send(raw, {"type": "hello", "user": "mal"})
            await raw_recv(raw)
            await raw_send(raw, {"type": "join", "room": "doc", "ref": 1})
            await raw_recv(raw)
            await raw_send(raw, {"type": "update", "room": "doc", "meta": {"x": 1}})
            await trio.sleep(0.05)
            assert [conn.user for conn in server.daemon.paced] == ["mal"]
            # Read by the ticker: a text frame that is not JSON is an error frame...
            await raw.send_message("{not json")
            error = await raw_recv(raw)
            while error["type"] != "error":
                error = await raw_recv(raw)
            assert error["code"] == "bad_request"
            # ...and a frame over the limit closes this connection alone.
            await raw.send_message("x" * (node.config.limits.max_frame_bytes + 1))
            assert (await raw_recv(raw))["code"] == "too_large"
            assert await raw_close_code(raw) == 1009
        await wait_until(bob, lambda: not sessions(bob, "doc", "mal"))
        assert not server.daemon.paced
        pong = await bob.request({"type": "ping", "t": 1})
        assert pong["type"] == "pong"


def test_paced_clients_read_only_those_with_input() -> None:
    """One epoll_wait picks the paced connections that sent something; the rest get a quiet
    tick (no failed read), and the epoll descriptor lives only while someone is paced."""
    import socket

    from presenced.server.clients import PacedClients

    class Conn:
        def __init__(self) -> None:
            self.calls: list[str] = []

        def poll_input(self) -> None:
            self.calls.append("read")

        def quiet_tick(self) -> None:
            self.calls.append("quiet")

    pairs = [socket.socketpair() for _ in range(2)]
    try:
        paced = PacedClients()
        busy, quiet = Conn(), Conn()
        paced.add(busy, pairs[0][0].fileno())
        paced.add(quiet, pairs[1][0].fileno())
        paced.add(busy, pairs[0][0].fileno())  # (already in)
        pairs[0][1].send(b"x")
        paced.read()
        assert (busy.calls, quiet.calls) == (["read"], ["quiet"])
        assert list(paced) == [busy, quiet] and paced
        paced.discard(busy)  # type: ignore[arg-type]
        paced.discard(busy)  # type: ignore[arg-type]  # (idempotent)
        paced.read()
        assert (busy.calls, quiet.calls) == (["read"], ["quiet", "quiet"])
        paced.discard(quiet)  # type: ignore[arg-type]
        assert not paced and paced._epoll is None
        paced.read()  # nothing paced: nothing to do
    finally:
        for a, b in pairs:
            a.close()
            b.close()
