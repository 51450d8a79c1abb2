"""Bad input on one connection never harms another client.

Every test runs an `Arena`: a daemon, a "victim" client in room ``r`` and a "mover" client
that keeps updating its cursor there. After each attack (on a connection of its own) the
attacker must have got the right error or close code, the victim must still be receiving
the mover's diffs, and the daemon must still accept new connections.
"""

from __future__ import annotations

import itertools
import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    open_websocket_url,
)
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    RejectConnection,
    Request,
    TextMessage,
)

from presenced.client import PresenceClient, connect
from presenced.server.daemon import Daemon

WAIT = 5
#: Limits of the arena's daemon unless a test says otherwise. The mover sends about 50
#: messages a second, comfortably inside the rate limit.
ARENA_LIMITS: dict[str, Any] = {
    "max_frame_bytes": 4096,
    "max_messages_per_second": 100.0,
    "message_burst": 20,
}
#: Every frame type the server may send a client.
SERVER_TYPES = {"welcome", "state", "diff", "left", "broadcast", "pong", "error"}


# ------------------------------------------------------------------------------ arena


@attrs.define
class Arena:
    url: str
    daemon: Any
    victim: PresenceClient
    mover: PresenceClient
    mover_interval: float = 0.02
    #: The mover's x values as the victim saw them, in order.
    seen: list[int] = attrs.field(factory=list)
    #: Frames the victim got that it should not have (errors, foreign rooms, ...).
    unexpected: list[dict[str, Any]] = attrs.field(factory=list)
    progress: trio.Event = attrs.field(factory=trio.Event)

    async def victim_keeps_receiving(self, diffs: int = 3) -> None:
        """Wait until the victim has seen ``diffs`` more of the mover's updates."""
        with trio.fail_after(WAIT):
            target = len(self.seen) + diffs
            while len(self.seen) < target:
                self.progress = trio.Event()
                await self.progress.wait()
        assert all(a < b for a, b in itertools.pairwise(self.seen)), "cursor went back"
        assert self.unexpected == []
        assert self.victim.closed is None

    async def accepts_new_connections(self) -> None:
        with trio.fail_after(WAIT):
            async with connect(self.url, user="newcomer") as client:
                await client.join("r")
                assert await client.ping() >= 0

    async def unharmed(self) -> None:
        await self.victim_keeps_receiving()
        await self.accepts_new_connections()

    # The arena's own tasks.

    async def _watch(self) -> None:
        async for message in self.victim.messages():
            if message["type"] == "diff" and message["room"] == "r":
                for entry in message["updates"].get("mover", []):
                    self.seen.append(entry["meta"]["x"])
                    self.progress.set()
            elif message["type"] not in ("diff", "state"):
                self.unexpected.append(message)

    async def _move(self) -> None:
        x = 0
        while True:
            await self.mover.update("r", {"x": x})
            x += 1
            await trio.sleep(self.mover_interval)


@asynccontextmanager
async def arena(
    start_daemon, *, mover_interval: float = 0.02, **limits: Any
) -> AsyncIterator[Arena]:
    server = await start_daemon(limits={**ARENA_LIMITS, **limits})
    async with (
        connect(server.url, user="victim") as victim,
        connect(server.url, user="mover") as mover,
        trio.open_nursery() as nursery,
    ):
        await victim.join("r")
        await mover.join("r", {"x": -1})
        state = Arena(server.url, server.daemon, victim, mover, mover_interval)
        nursery.start_soon(state._watch)
        nursery.start_soon(state._move)
        await state.victim_keeps_receiving(1)
        yield state
        await state.unharmed()
        nursery.cancel_scope.cancel()


# ------------------------------------------------------------------------------ raw helpers


@asynccontextmanager
async def attacker(url: str, *, hello: bool = True) -> AsyncIterator[WebSocketConnection]:
    """A raw WebSocket connection, greeted anonymously unless ``hello`` is false."""
    async with open_websocket_url(url, message_queue_size=1000) as ws:
        if hello:
            await ws.send_message(json.dumps({"type": "hello", "ref": 0, "user": "mallory"}))
            assert (await recv(ws))["type"] == "welcome"
        yield ws


async def recv(ws: WebSocketConnection) -> dict[str, Any]:
    with trio.fail_after(WAIT):
        message = json.loads(await ws.get_message())
    assert isinstance(message, dict) and message.get("type") in SERVER_TYPES, message
    return message


async def closed_with(ws: WebSocketConnection) -> int:
    """Wait for the server to close; its close code. Fails on any frame before the close."""
    with trio.fail_after(WAIT), pytest.raises(ConnectionClosed) as closed:
        frame = await ws.get_message()
        pytest.fail(f"expected a close, got {frame!r}")
    return closed.value.reason.code


async def still_open(ws: WebSocketConnection) -> None:
    await ws.send_message(json.dumps({"type": "ping", "ref": "alive"}))
    reply = await recv(ws)
    assert reply["type"] == "pong" and reply["ref"] == "alive", reply


def nested(depth: int) -> str:
    return '{"type":"ping","t":1,"x":' + "[" * depth + "]" * depth + "}"


# ------------------------------------------------------------------------------ bad frames

# (frame, expected error code, whether the error echoes ref 9)
BAD_FRAMES = [
    pytest.param('{"type": "ping", "ref": 9', "bad_request", False, id="invalid-json"),
    pytest.param("", "bad_request", False, id="empty"),
    pytest.param("[1, 2, 3]", "bad_request", False, id="json-array"),
    pytest.param('"hello"', "bad_request", False, id="json-string"),
    pytest.param("null", "bad_request", False, id="json-null"),
    pytest.param('{"ref": 9}', "bad_request", True, id="no-type"),
    pytest.param('{"type": "explode", "ref": 9}', "bad_request", True, id="unknown-type"),
    pytest.param('{"type": 5, "ref": 9}', "bad_request", True, id="type-not-string"),
    pytest.param('{"type": "join", "ref": 9, "room": 5}', "bad_request", True, id="room-int"),
    pytest.param('{"type": "join", "ref": 9, "room": ""}', "bad_request", True, id="room-empty"),
    pytest.param(
        '{"type": "join", "ref": 9, "room": "a\\u0000b"}', "bad_request", True, id="room-ctrl"
    ),
    pytest.param(
        '{"type": "join", "ref": 9, "room": "r", "meta": [1]}', "bad_request", True, id="meta-list"
    ),
    pytest.param(
        '{"type": "update", "ref": 9, "room": "r", "meta": "x"}', "bad_request", True, id="meta-str"
    ),
    pytest.param('{"type": "ping", "ref": 9, "t": "now"}', "bad_request", True, id="t-string"),
    pytest.param('{"type": "ping", "ref": 9, "t": true}', "bad_request", True, id="t-bool"),
    pytest.param(
        '{"type": "broadcast", "ref": 9, "room": "r", "event": "e", "echo": 1}',
        "bad_request",
        True,
        id="echo-int",
    ),
    pytest.param('{"type": "ping", "ref": [9]}', "bad_request", False, id="ref-list"),
    pytest.param('{"type": "ping", "ref": 1e400}', "bad_request", False, id="ref-huge-float"),
    pytest.param(
        '{"type": "update", "ref": 9, "room": "r", "meta": {"x": NaN}}',
        "bad_request",
        False,
        id="nan",
    ),
    pytest.param(
        '{"type": "update", "ref": 9, "room": "r", "meta": {"x": -Infinity}}',
        "bad_request",
        False,
        id="infinity",
    ),
    pytest.param(
        '{"type": "update", "ref": 9, "room": "r", "meta": {"x": 1e999}}',
        "bad_request",
        False,
        id="float-overflow",
    ),
    pytest.param(
        '{"type": "broadcast", "ref": 9, "room": "r", "event": "e", "data": "\\ud800"}',
        "bad_request",
        True,
        id="lone-surrogate",
    ),
    pytest.param(nested(40), "bad_request", False, id="nesting-40"),
    pytest.param(nested(2000), "bad_request", False, id="nesting-2000"),
    pytest.param('{"type": "hello", "ref": 9}', "bad_request", True, id="second-hello"),
    pytest.param('{"type": "leave", "ref": 9, "room": "r"}', "not_joined", True, id="not-joined"),
]


@pytest.mark.parametrize(("frame", "code", "has_ref"), BAD_FRAMES)
async def test_bad_frame_gets_an_error_and_harms_nobody(
    start_daemon, frame: str, code: str, has_ref: bool
) -> None:
    async with arena(start_daemon) as state, attacker(state.url) as ws:
        await ws.send_message(frame)
        error = await recv(ws)
        assert error["type"] == "error" and error["code"] == code, error
        assert ("ref" in error) is has_ref and error.get("ref", 9) == 9
        await still_open(ws)  # a bad request is not fatal


@pytest.mark.slow
async def test_bad_frame_before_hello_is_answered(start_daemon) -> None:
    async with arena(start_daemon) as state, attacker(state.url, hello=False) as ws:
        await ws.send_message("{{{")
        assert (await recv(ws))["code"] == "bad_request"
        await ws.send_message(json.dumps({"type": "ping", "ref": 3}))
        assert (await recv(ws))["code"] == "hello_required"
        assert await closed_with(ws) == 1008


@pytest.mark.parametrize(
    "data",
    [b"\xff\xfe\x00\x81garbage", b"\x00" * 100, b"[1,2"],
    ids=["not-utf8", "nuls", "bad-json"],
)
async def test_binary_garbage(start_daemon, data: bytes) -> None:
    async with arena(start_daemon) as state, attacker(state.url) as ws:
        await ws.send_message(data)
        assert (await recv(ws))["code"] == "bad_request"
        await still_open(ws)


async def test_binary_json_frame_is_accepted(start_daemon) -> None:
    async with arena(start_daemon) as state, attacker(state.url) as ws:
        await ws.send_message(b'{"type":"ping","ref":4,"t":1}')
        pong = await recv(ws)
        assert pong["type"] == "pong" and pong["ref"] == 4 and pong["t"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["text", "binary"])
async def test_oversize_frame_closes_1009(start_daemon, kind: str) -> None:
    async with arena(start_daemon) as state, attacker(state.url) as ws:
        payload = json.dumps({"type": "ping", "ref": 1, "pad": "x" * 5000})
        await ws.send_message(payload if kind == "text" else payload.encode())
        error = await recv(ws)
        assert error["type"] == "error" and error["code"] == "too_large"
        assert await closed_with(ws) == 1009


async def test_message_flood_is_rate_limited_then_closed(start_daemon) -> None:
    # A slow refill (one token per 100 ms) so that "keeps going" is unmistakable.
    limits = {"max_messages_per_second": 10.0, "message_burst": 10}
    async with (
        arena(start_daemon, mover_interval=0.2, **limits) as state,
        attacker(state.url) as ws,
    ):
        received: list[dict[str, Any]] = []
        code = None
        frame = json.dumps({"type": "ping"})

        async def flood() -> None:
            try:
                while True:
                    await ws.send_message(frame)
            except ConnectionClosed:
                pass

        with trio.fail_after(WAIT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(flood)
                try:
                    while True:
                        received.append(json.loads(await ws.get_message()))
                except ConnectionClosed as exc:
                    code = exc.reason.code
                nursery.cancel_scope.cancel()
        errors = [m for m in received if m["type"] == "error"]
        assert errors, "no rate_limited error before the close"
        assert {e["code"] for e in errors} == {"rate_limited"}
        # The error is not repeated for every dropped message.
        assert len(errors) <= 2
        assert {m["type"] for m in received} <= {"pong", "error"}
        assert code == 1008


async def test_over_the_rate_gets_rate_limited_but_stays_open(start_daemon) -> None:
    rate, burst = 10.0, 20  # a slow refill: sending the burst twice over cannot outpace it
    limits = {"max_messages_per_second": rate, "message_burst": burst}
    async with (
        arena(start_daemon, mover_interval=0.2, **limits) as state,
        attacker(state.url) as ws,
    ):
        for i in range(2 * burst):
            await ws.send_message(json.dumps({"type": "ping", "ref": i}))
        pongs = 0
        while (reply := await recv(ws))["type"] == "pong":
            pongs += 1
        assert reply["code"] == "rate_limited" and "ref" not in reply
        assert burst - 1 <= pongs < 2 * burst  # the hello took one token
        # Dropped messages get no reply (and the error is not repeated within a second), but
        # once a token has come back, requests are served again.
        await trio.sleep(1.5 / rate)
        await ws.send_message(json.dumps({"type": "ping", "ref": "later"}))
        while (reply := await recv(ws)).get("ref") != "later":
            assert reply["type"] == "pong"  # late answers to the burst
        assert reply["type"] == "pong"


@pytest.mark.slow
async def test_no_hello_in_time_closes_1008(start_daemon) -> None:
    async with (
        arena(start_daemon, hello_timeout_s=0.3) as state,
        attacker(state.url, hello=False) as ws,
    ):
        assert await closed_with(ws) == 1008


async def test_no_handshake_in_time_is_dropped(start_daemon) -> None:
    async with arena(start_daemon, hello_timeout_s=0.3) as state:
        port = state.daemon.client_port
        with trio.fail_after(WAIT):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"GET / HTTP/1.1\r\n")  # and never finish the request
            assert await stream.receive_some(1024) == b""
            await stream.aclose()


@pytest.mark.parametrize(
    "request_",
    [
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        b"POST /x HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 3\r\n\r\nabc",
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03garbage\r\n\r\n",
        b"X" * 100_000,
    ],
    ids=["plain-get", "post", "no-websocket-key", "tls-hello", "endless-line"],
)
async def test_non_websocket_request_gets_400(start_daemon, request_: bytes) -> None:
    async with arena(start_daemon) as state:
        with trio.fail_after(WAIT):
            stream = await trio.open_tcp_stream("127.0.0.1", state.daemon.client_port)
            response = b""
            try:
                await stream.send_all(request_)
                while chunk := await stream.receive_some(4096):
                    response += chunk
            except trio.BrokenResourceError:
                pass  # the server may hang up before reading all of a long request
            await stream.aclose()
        assert response.startswith(b"HTTP/1.1 400 "), response


async def test_connection_limit_answers_503(start_daemon) -> None:
    async with arena(start_daemon, max_connections=3) as state:  # victim, mover and one more
        node = state.daemon.node
        async with attacker(state.url):
            assert len(node.connections) == 3
            with trio.fail_after(WAIT), pytest.raises(ConnectionRejected) as rejected:
                async with open_websocket_url(state.url):
                    pass
            assert rejected.value.status_code == 503
            assert node.metrics.connections_refused == 1
            await state.victim_keeps_receiving()
        # Its slot frees up once the daemon has seen it go; `unharmed` then connects anew.
        with trio.fail_after(WAIT):
            while len(node.connections) > 2:
                await trio.sleep(0.01)


# ------------------------------------------------------------------------------ raw sockets


class RawClient:
    """A hand-made WebSocket client on a plain TCP socket, for what no polite client does."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)

    @classmethod
    async def open(cls, port: int, *, receive_buffer: int | None = None) -> RawClient:
        """Connect (no handshake yet)."""
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if receive_buffer is not None:
            # Set before connecting, so that the advertised window is small from the start.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        await sock.connect(("127.0.0.1", port))
        return cls(trio.SocketStream(sock))

    async def handshake(self) -> AcceptConnection | RejectConnection:
        await self.stream.send_all(self.ws.send(Request(host="127.0.0.1", target="/")))
        with trio.fail_after(WAIT):
            while True:
                self.ws.receive_data(await self.stream.receive_some(4096))
                for event in self.ws.events():
                    if isinstance(event, AcceptConnection | RejectConnection):
                        return event

    async def send(self, message: dict[str, Any]) -> None:
        await self.stream.send_all(self.ws.send(TextMessage(json.dumps(message))))

    async def next_events(self) -> list[Any]:
        """The WebSocket events in what the server sends next ([] once it has hung up)."""
        with trio.fail_after(WAIT):
            while True:
                try:
                    data = await self.stream.receive_some(1 << 20)
                except trio.BrokenResourceError:
                    data = b""
                if not data:
                    return []
                self.ws.receive_data(data)
                if events := list(self.ws.events()):
                    return events

    async def events_until_closed(self) -> list[Any]:
        """Read until the server closes the socket; every WebSocket event it sent."""
        events: list[Any] = []
        while more := await self.next_events():
            events += more
        return events

    async def aclose(self) -> None:
        await self.stream.aclose()


def masked_frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """One client frame, by hand (a zero mask, so the payload goes as is)."""
    assert len(payload) < 126
    return bytes([(0x80 if fin else 0) | opcode, 0x80 | len(payload), 0, 0, 0, 0]) + payload


FRAMING_GARBAGE = [
    pytest.param(b"\x00\x01not a websocket frame\xff\xff", 1002, id="garbage"),
    pytest.param(bytes([0x81, 0x02]) + b"{}", 1002, id="unmasked"),
    pytest.param(masked_frame(0x0, b"{}"), 1002, id="orphan-continuation"),
    pytest.param(masked_frame(0x3, b"x"), 1002, id="reserved-opcode"),
    pytest.param(masked_frame(0x1, b'{"x":"\xff\xfe"}'), 1007, id="text-not-utf8"),
]


@pytest.mark.parametrize(("data", "_code"), FRAMING_GARBAGE)
async def test_framing_garbage_drops_only_that_connection(
    start_daemon, data: bytes, _code: int
) -> None:
    async with arena(start_daemon) as state:
        raw = await RawClient.open(state.daemon.client_port)
        assert isinstance(await raw.handshake(), AcceptConnection)
        await raw.send({"type": "hello", "user": "mallory"})
        await raw.stream.send_all(data)
        await raw.events_until_closed()  # the server hangs up
        await raw.aclose()


@pytest.mark.parametrize(("data", "code"), FRAMING_GARBAGE)
async def test_framing_garbage_is_answered_with_a_close_code(
    start_daemon, data: bytes, code: int
) -> None:
    server = await start_daemon()
    raw = await RawClient.open(server.daemon.client_port)
    assert isinstance(await raw.handshake(), AcceptConnection)
    await raw.stream.send_all(data)
    events = await raw.events_until_closed()
    assert [e.code for e in events if isinstance(e, CloseConnection)] == [code]


async def test_message_of_many_empty_fragments_is_too_large(start_daemon) -> None:
    async with arena(start_daemon) as state:
        limit = ARENA_LIMITS["max_frame_bytes"]
        raw = await RawClient.open(state.daemon.client_port)
        assert isinstance(await raw.handshake(), AcceptConnection)
        await raw.send({"type": "hello", "ref": 0})
        # One ping split into more (empty) fragments than the frame limit has bytes.
        data = masked_frame(0x1, b"", fin=False) + masked_frame(0x0, b"", fin=False) * limit
        await raw.stream.send_all(data + masked_frame(0x0, b'{"type":"ping","ref":1}'))
        events: list[Any] = []
        while more := await raw.next_events():
            events += more
            if any(isinstance(e, TextMessage) and '"pong"' in e.data for e in more):
                break  # it was served: no need to wait for a close that will not come
        replies = [json.loads(e.data) for e in events if isinstance(e, TextMessage)]
        assert replies[0]["type"] == "welcome"
        assert [r.get("code") for r in replies[1:]] == ["too_large"]
        assert [e.code for e in events if isinstance(e, CloseConnection)] == [1009]


async def test_connection_limit_holds_for_concurrent_handshakes(start_daemon) -> None:
    async with arena(start_daemon, max_connections=3) as state:  # victim, mover and one more
        first = await RawClient.open(state.daemon.client_port)
        second = await RawClient.open(state.daemon.client_port)
        # Both are accepted (and waiting for their upgrade requests) before either sends one.
        await trio.testing.wait_all_tasks_blocked()
        answers = [await first.handshake(), await second.handshake()]
        statuses = [101 if isinstance(a, AcceptConnection) else a.status_code for a in answers]
        assert statuses == [101, 503]
        assert len(state.daemon.node.connections) <= 3
        await first.aclose()
        await second.aclose()
        with trio.fail_after(WAIT):
            while len(state.daemon.node.connections) > 2:
                await trio.sleep(0.01)


async def test_slow_reader_is_disconnected_and_others_are_unaffected(start_daemon) -> None:
    async with arena(
        start_daemon,
        max_frame_bytes=65_536,
        max_messages_per_second=2000.0,
        message_burst=2000,
        outbox_max_bytes=65_536,
        slow_client_timeout_s=0.2,
    ) as state:
        node = state.daemon.node
        # Joins a room and never reads another byte, with a small receive buffer.
        slow = await RawClient.open(state.daemon.client_port, receive_buffer=4096)
        assert isinstance(await slow.handshake(), AcceptConnection)
        await slow.send({"type": "hello", "user": "sloth"})
        await slow.send({"type": "join", "ref": 1, "room": "heavy"})
        with trio.fail_after(WAIT):  # without reading: watch the daemon
            while "heavy" not in node.members:
                await trio.sleep(0.005)

        async with connect(state.url, user="blaster") as blaster:
            await blaster.join("heavy")
            blob = "x" * 60_000
            # Blast until the daemon gives up on the slow reader (bounded: it must, soon).
            with trio.fail_after(10):
                sent = 0
                while node.metrics.closes.get(1013, 0) == 0:
                    await blaster.broadcast("heavy", "blob", blob)
                    sent += 1
                    if sent % 20 == 0:
                        await trio.sleep(0.01)  # let the victim's frames through too
            with trio.fail_after(WAIT):  # closed; gone once its task has finished
                while "sloth" in {c.user for c in node.connections}:
                    await trio.sleep(0.005)
            assert node.metrics.closes == {1013: 1}
            assert [c.user for c in node.members["heavy"]] == ["blaster"]
            # Meanwhile the victim got its diffs, in order, and the blaster is fine too.
            await state.victim_keeps_receiving()
            assert await blaster.ping() >= 0
        await slow.events_until_closed()  # the server closed the socket
        await slow.aclose()


# ------------------------------------------------------------------------------ fuzz


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()  # NaN and infinities included: json.dumps writes them as NaN / Infinity
    | st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
client_frames = st.one_of(
    st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=200),
    st.fixed_dictionaries(
        {"type": st.sampled_from(["hello", "join", "update", "leave", "broadcast", "ping"])},
        optional={
            "ref": json_values,
            "room": st.sampled_from(["r", "elsewhere", ""]) | json_values,
            "meta": json_values,
            "event": json_values,
            "data": json_values,
            "echo": json_values,
            "t": json_values,
            "v": json_values,
            "user": json_values,
            "token": json_values,
        },
    ).map(json.dumps),
    json_values.map(json.dumps),
)


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(frames=st.lists(client_frames, min_size=1, max_size=4), greet=st.booleans())
async def test_arbitrary_frames_never_break_the_daemon(
    make_config, frames: list[str], greet: bool
) -> None:
    """Each example is a trio run of its own (pytest-trio + Hypothesis): a fresh daemon."""
    async with trio.open_nursery() as nursery:
        daemon = await nursery.start(Daemon(make_config(limits=ARENA_LIMITS)).serve)
        await _fuzz(f"ws://127.0.0.1:{daemon.client_port}", frames, greet)
        nursery.cancel_scope.cancel()


async def _fuzz(url: str, frames: list[str], greet: bool) -> None:
    async with connect(url, user="control") as control:
        await control.join("r", {"x": 0})
        async with attacker(url, hello=greet) as ws:
            for index, frame in enumerate(frames):
                try:
                    await ws.send_message(frame)
                    # A ping after each frame: everything before its pong answers the frame.
                    await ws.send_message(json.dumps({"type": "ping", "ref": f"probe-{index}"}))
                    while True:
                        reply = await recv(ws)
                        if reply.get("ref") == f"probe-{index}" and reply["type"] == "pong":
                            break
                        if reply["type"] == "error":
                            assert reply["code"] in {
                                "bad_request",
                                "unsupported_version",
                                "hello_required",
                                "unauthorized",
                                "forbidden",
                                "too_large",
                                "not_joined",
                                "too_many_rooms",
                                "rate_limited",
                            }, reply
                            assert isinstance(reply["message"], str)
                except ConnectionClosed as closed:
                    # Only a policy close (e.g. no hello) or a too-big frame may end it.
                    assert closed.reason.code in (1008, 1009), closed.reason
                    break
        assert await control.ping() >= 0
        await control.update("r", {"x": 1})
        assert control.closed is None
