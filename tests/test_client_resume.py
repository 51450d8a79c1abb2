"""The Python client's automatic reconnect with resume (presenced/client.py, client_resume.py).

Most tests talk to a fake daemon written here on wsproto: it speaks just the part of the
client protocol the client's reconnect logic uses (hello/welcome with ``resume``, join/state,
ping/pong), so each test controls exactly what a daemon answers and when the connection
drops. The last test runs the real daemon behind a TCP relay that the test can cut.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import pytest
import trio
from wsproto import ConnectionState, ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Ping,
    Request,
    TextMessage,
)

from presenced.client import PresenceClient, connect
from presenced.client_resume import MAX_RESUME_TOKEN, ResumeBook, backoff_s, meta_patch

#: Upper bound on any single wait: generous, never reached when all is well.
WAIT = 3

Frame = dict[str, Any]


def entry(session: str, meta: Frame | None = None, region: str = "eu") -> Frame:
    return {"session": session, "meta": meta or {}, "region": region}


def state(room: str, presences: dict[str, list[Frame]], ref: int | None = None) -> Frame:
    return {"type": "state", "ref": ref, "room": room, "presences": presences}


def view(client: PresenceClient, room: str) -> dict[str, set[str]]:
    return {user: set(sessions) for user, sessions in client.presences(room).items()}


async def until(condition: Callable[[], bool]) -> None:
    with trio.fail_after(WAIT):
        while not condition():
            await trio.sleep(0.005)


# ------------------------------------------------------------------------------ a fake daemon


class FakeConnection:
    """One client connection to the fake daemon: what it sent, and a way to answer or drop."""

    def __init__(self, stream: trio.SocketStream, daemon: FakeDaemon) -> None:
        self.stream = stream
        self.daemon = daemon
        self.ws = WSConnection(ConnectionType.SERVER)
        self.frames: list[Frame] = []
        self._unread: list[Frame] = []
        self._arrived = trio.Event()
        #: The close code the client sent (1000: a clean close), if it sent one.
        self.closed_with: int | None = None
        self.gone = trio.Event()

    def sent(self, type_: str) -> list[Frame]:
        return [frame for frame in self.frames if frame.get("type") == type_]

    async def expect(self, type_: str) -> Frame:
        """The next frame of this type the client sent (waiting for it)."""
        with trio.fail_after(WAIT):
            while True:
                for frame in self._unread:
                    if frame.get("type") == type_:
                        self._unread.remove(frame)
                        return frame
                self._arrived = trio.Event()
                await self._arrived.wait()

    async def send(self, frame: Frame) -> None:
        await self.stream.send_all(self.ws.send(TextMessage(json.dumps(frame))))

    async def drop(self) -> None:
        """Vanish without a close frame, like a lost network."""
        await self.stream.aclose()

    async def close(self, code: int) -> None:
        await self.stream.send_all(self.ws.send(CloseConnection(code=code)))

    async def serve(self) -> None:
        text = ""
        try:
            while True:
                data = await self.stream.receive_some(65536)
                if not data:
                    return
                self.ws.receive_data(data)
                for event in self.ws.events():
                    if isinstance(event, Request):
                        offered = event.subprotocols[0] if event.subprotocols else None
                        await self.stream.send_all(
                            self.ws.send(AcceptConnection(subprotocol=offered))
                        )
                    elif isinstance(event, TextMessage):
                        text += event.data
                        if event.message_finished:
                            await self._take(json.loads(text))
                            text = ""
                    elif isinstance(event, Ping):
                        await self.stream.send_all(self.ws.send(event.response()))
                    elif isinstance(event, CloseConnection):
                        self.closed_with = event.code
                        if self.ws.state is ConnectionState.REMOTE_CLOSING:
                            await self.stream.send_all(self.ws.send(event.response()))
                        return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.gone.set()
            await self.stream.aclose()

    async def _take(self, frame: Frame) -> None:
        self.frames.append(frame)
        if frame.get("type") == "hello":
            await self.daemon.greet(self, frame)
        elif frame.get("type") == "ping":
            await self.send({"type": "pong", "ref": frame["ref"], "t": frame.get("t")})
        else:
            self._unread.append(frame)
            self._arrived.set()


class FakeDaemon:
    """Answers each ``hello`` with the next planned welcome (and the frames that follow it),
    and every ``ping`` with a ``pong``; the test answers joins and drops connections."""

    def __init__(self) -> None:
        #: (session, resume token, resumed, frames sent right after the welcome)
        self.plan: list[tuple[str, str, bool, list[Frame]]] = []
        self.connections: list[FakeConnection] = []
        #: Cleared to hold the welcomes back (the client stays "reconnecting").
        self.open = trio.Event()
        self.open.set()
        self.port = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    async def greet(self, connection: FakeConnection, hello: Frame) -> None:
        await self.open.wait()
        session, token, resumed, after = self.plan.pop(0)
        welcome = {
            "type": "welcome",
            "ref": hello["ref"],
            "session": session,
            "user": "ann",
            "region": "eu",
            "tick_ms": 20,
            "resume": token,
            "resumed": resumed,
            "resume_grace_ms": 10_000,
        }
        await connection.send(welcome)
        for frame in after:
            await connection.send(frame)

    async def handle(self, stream: trio.SocketStream) -> None:
        connection = FakeConnection(stream, self)
        self.connections.append(connection)
        await connection.serve()

    async def connection(self, index: int) -> FakeConnection:
        await until(lambda: len(self.connections) > index)
        return self.connections[index]


@pytest.fixture
async def daemon(nursery: trio.Nursery) -> FakeDaemon:
    fake = FakeDaemon()
    listeners = await nursery.start(partial(trio.serve_tcp, fake.handle, 0, host="127.0.0.1"))
    fake.port = listeners[0].socket.getsockname()[1]
    return fake


@asynccontextmanager
async def client(url: str) -> AsyncIterator[PresenceClient]:
    async with connect(
        url, user="ann", reconnect=True, backoff_base_s=0.01, backoff_max_s=0.04
    ) as ann:
        yield ann


async def joined(
    ann: PresenceClient,
    connection: FakeConnection,
    room: str,
    meta: Frame,
    presences: dict[str, list[Frame]],
) -> None:
    """``ann.join(room, meta)``, with the fake daemon answering ``presences``."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ann.join, room, meta)
        join = await connection.expect("join")
        await connection.send(state(room, presences, join["ref"]))


# ------------------------------------------------------------------------------ pure parts


def test_backoff_and_meta_patch() -> None:
    for attempt in range(40):
        ceiling = min(10.0, 0.25 * 2**attempt)
        assert backoff_s(attempt, rand=lambda: 0.0) == ceiling / 2
        assert backoff_s(attempt, rand=lambda: 1.0) == ceiling
    assert meta_patch({"a": 1, "n": {"x": 1}}, {"a": 1, "n": {"x": 1}}) == {}
    assert meta_patch({"a": 1, "b": 2, "t": 1}, {"a": 5, "c": 3, "t": True}) == {
        "a": 5,
        "c": 3,
        "t": True,  # as JSON, true is not 1
        "b": None,
    }


def test_resume_book_trusts_resumed_only_for_the_session_offered() -> None:
    book = ResumeBook()
    first = book.hello({"type": "hello"})
    assert "resume" not in first
    assert not book.welcomed(first, {"session": "S1", "resume": "R1", "resumed": True}, "")
    assert book.hello({"type": "hello"})["resume"] == "R1"
    again = book.hello({"type": "hello"})
    assert book.welcomed(again, {"session": "S1", "resume": "R2", "resumed": True}, "S1")
    assert not book.welcomed(again, {"session": "S9", "resume": "R3", "resumed": True}, "S1")
    assert not book.welcomed(again, {"session": "S1", "resume": "R4", "resumed": False}, "S1")
    book.welcomed(again, {"session": "S1", "resume": "x" * (MAX_RESUME_TOKEN + 1)}, "S1")
    assert "resume" not in book.hello({"type": "hello"}), "an over-long token is not kept"


# ------------------------------------------------------------------------------ the fake daemon


async def test_a_resumed_session_keeps_its_rooms_and_takes_the_fresh_state(
    daemon: FakeDaemon,
) -> None:
    after_resume = [
        state("hq", {"ann": [entry("S1", {"name": "Ann"})], "cat": [entry("c1")]}),
        {"type": "message", "id": "us.m.1", "from": "bob", "data": "hi"},  # shown before
        {"type": "message", "id": "us.m.2", "from": "bob", "data": "again"},
    ]
    daemon.plan = [("S1", "R1", False, []), ("S1", "R2", True, after_resume)]
    async with client(daemon.url) as ann:
        first = await daemon.connection(0)
        assert "resume" not in first.sent("hello")[0]
        hq = {"ann": [entry("S1", {"name": "Ann"})], "bob": [entry("b1")]}
        await joined(ann, first, "hq", {"name": "Ann"}, hq)
        await joined(ann, first, "side", {}, {})
        await first.send({"type": "message", "id": "us.m.1", "from": "bob", "data": "hi"})
        assert (await ann.next_message("message"))["id"] == "us.m.1"

        daemon.open = trio.Event()  # hold the next welcome back
        await first.drop()
        await until(lambda: ann.status == "reconnecting")
        await ann.update("hq", {"x": 1})  # while disconnected: returns at once
        await ann.leave("side")
        assert ann.rooms.keys() == {"hq"}
        daemon.open.set()

        second = await daemon.connection(1)
        await until(lambda: ann.status == "connected")
        assert second.sent("hello")[0]["resume"] == "R1"
        assert (ann.session, ann.reconnects, ann.resumes) == ("S1", 1, 1)
        assert (await ann.next_message("message"))["id"] == "us.m.2"
        assert ann.duplicates == 1, "a message shown before is not shown again"
        assert view(ann, "hq") == {"ann": {"S1"}, "cat": {"c1"}}
        # The daemon's copy of our meta lacked the offline update: sent after its state.
        assert (await second.expect("update")) == {"type": "update", "room": "hq", "meta": {"x": 1}}
        assert (await second.expect("leave"))["room"] == "side"
        await trio.sleep(0.05)
        assert second.sent("join") == [], "a resumed session is still in its rooms"
    with trio.fail_after(WAIT):
        await second.gone.wait()
    assert second.closed_with == 1000, "leaving the client closes cleanly: no grace"


async def test_a_session_not_resumed_joins_its_rooms_again(daemon: FakeDaemon) -> None:
    daemon.plan = [("S1", "R1", False, []), ("S2", "R2", False, [])]
    async with client(daemon.url) as ann:
        first = await daemon.connection(0)
        await joined(ann, first, "hq", {"name": "Ann"}, {"bob": [entry("b1")]})
        await ann.update("hq", {"x": 2})
        await first.drop()
        second = await daemon.connection(1)
        rejoin = await second.expect("join")
        assert (rejoin["room"], rejoin["meta"]) == ("hq", {"name": "Ann", "x": 2})
        assert second.sent("hello")[0]["resume"] == "R1"
        fresh = {"ann": [entry("S2", {"name": "Ann", "x": 2})], "dan": [entry("d1")]}
        await second.send(state("hq", fresh, rejoin["ref"]))
        await until(lambda: view(ann, "hq") == {"ann": {"S2"}, "dan": {"d1"}})
        assert (ann.session, ann.reconnects, ann.resumes) == ("S2", 1, 0)
        # A policy close is final: no third connection.
        await second.close(1008)
        await until(lambda: ann.status == "closed")
        await trio.sleep(0.1)
        assert len(daemon.connections) == 2
        assert ann.closed is not None and ann.closed.reason.code == 1008


async def test_a_resumed_room_whose_state_does_not_come_is_joined_again(
    daemon: FakeDaemon,
) -> None:
    daemon.plan = [("S1", "R1", False, []), ("S1", "R2", True, [])]
    async with client(daemon.url) as ann:
        first = await daemon.connection(0)
        await joined(ann, first, "hq", {"name": "Ann"}, {})
        await first.drop()
        second = await daemon.connection(1)
        rejoin = await second.expect("join")  # after the pong that followed no state
        assert second.sent("ping"), "the rejoin waited for the ping's answer"
        assert (rejoin["room"], rejoin["meta"]) == ("hq", {"name": "Ann"})
        assert ann.session == "S1"


# ------------------------------------------------------------------------------ the real daemon


class Relay:
    """A TCP relay in front of a daemon whose connections the test can cut, as a network
    outage would (the daemon sees them end without a WebSocket close)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.streams: list[trio.SocketStream] = []

    async def handle(self, inbound: trio.SocketStream) -> None:
        outbound = await trio.open_tcp_stream("127.0.0.1", self.target_port)
        self.streams += [inbound, outbound]

        async def pump(source: trio.SocketStream, sink: trio.SocketStream) -> None:
            try:
                while data := await source.receive_some(65536):
                    await sink.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            await sink.aclose()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, inbound, outbound)
            nursery.start_soon(pump, outbound, inbound)

    async def cut(self) -> None:
        for stream in self.streams:
            await stream.aclose()
        self.streams.clear()


async def test_after_a_cut_the_client_is_back_in_its_room_on_a_real_daemon(
    start_daemon: Any, nursery: trio.Nursery
) -> None:
    server = await start_daemon()
    relay = Relay(server.daemon.client_port)
    listeners = await nursery.start(partial(trio.serve_tcp, relay.handle, 0, host="127.0.0.1"))
    relay.port = listeners[0].socket.getsockname()[1]
    async with (
        client(f"ws://127.0.0.1:{relay.port}/") as ann,
        connect(server.url, user="bob") as bob,
    ):
        await ann.join("hq", {"name": "Ann"})
        await bob.join("hq", {"name": "Bob"})
        await until(lambda: view(ann, "hq").keys() == {"ann", "bob"})
        first_session = ann.session
        await relay.cut()
        await until(lambda: ann.reconnects == 1 and ann.status == "connected")
        await ann.update("hq", {"x": 1})
        # The daemon kept the session through the cut: resumed, same session.
        assert (ann.resumes, ann.session) == (1, first_session)
        mine = {"name": "Ann", "x": 1}

        def agreed() -> bool:
            ann_seen = bob.presences("hq").get("ann", {})
            return (
                view(ann, "hq") == {"ann": {ann.session}, "bob": {bob.session}}
                and set(ann_seen) == {ann.session}
                and ann_seen[ann.session]["meta"] == mine
            )

        await until(agreed)  # (both readers keep the maps in sync by themselves)
