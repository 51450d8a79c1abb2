"""Vanished clients leave, short drops do not flicker: real sockets, a raw client.

The client here is written from docs/protocol.md on wsproto directly (not presenced.client):
it answers WebSocket pings like a browser does, and can be cut off behind a TCP proxy that
blackholes (stops forwarding both ways without closing anything), the way a phone that
loses coverage looks to the daemon.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Ping,
    Request,
    TextMessage,
)

from presenced.server.daemon import Daemon

#: Real sockets and real liveness timeouts of about a second.
pytestmark = pytest.mark.slow

WAIT = 8
#: Short liveness settings: pinged after 0.8 s quiet, dead after 1.2 s, 1 s of grace.
FAST = {"client_timeout_s": 1.2, "resume_grace_s": 1.0}


class Raw:
    """A minimal client of docs/protocol.md: JSON text frames; it answers pings with pongs
    (unless ``deaf``) and keeps every message and ping it got."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.messages: list[dict[str, Any]] = []
        self.pings = 0
        self.closed: int | None = None
        self.deaf = False
        self._changed = trio.Event()

    @classmethod
    async def open(cls, nursery: trio.Nursery, port: int) -> Raw:
        client = cls(await trio.open_tcp_stream("127.0.0.1", port))
        await client.stream.send_all(client.ws.send(Request(host="127.0.0.1", target="/")))
        while True:
            client.ws.receive_data(await client.stream.receive_some(65536))
            if any(isinstance(event, AcceptConnection) for event in client.ws.events()):
                break
        nursery.start_soon(client._read)
        return client

    async def _read(self) -> None:
        try:
            while True:
                data = await self.stream.receive_some(65536)
                self.ws.receive_data(data or None)
                for event in self.ws.events():
                    if isinstance(event, TextMessage):
                        self.messages.append(json.loads(event.data))
                    elif isinstance(event, Ping):
                        self.pings += 1
                        if not self.deaf:
                            await self.stream.send_all(self.ws.send(event.response()))
                    elif isinstance(event, CloseConnection) and self.closed is None:
                        self.closed = event.code
                self._changed.set()
                self._changed = trio.Event()
                if not data:
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.closed = self.closed or 1006
            self._changed.set()

    async def send(self, message: dict[str, Any]) -> None:
        await self.stream.send_all(self.ws.send(TextMessage(data=json.dumps(message))))

    async def hello(self, user: str, **fields: Any) -> dict[str, Any]:
        await self.send({"type": "hello", "user": user, "ref": "h", **fields})
        return await self.next("welcome")

    async def close(self, code: int) -> None:
        await self.stream.send_all(self.ws.send(CloseConnection(code=code)))

    async def drop(self) -> None:
        """End the TCP connection without a WebSocket close frame."""
        await self.stream.aclose()

    async def until(self, condition: Callable[[], Any], wait: float = WAIT) -> Any:
        with trio.fail_after(wait):
            while not (result := condition()):
                await self._changed.wait()
        return result

    async def next(self, kind: str, **fields: Any) -> dict[str, Any]:
        def match() -> dict[str, Any] | None:
            found = self.of(kind, **fields)
            return found[0] if found else None

        message: dict[str, Any] = await self.until(match)
        self.messages.remove(message)
        return message

    def of(self, kind: str, **fields: Any) -> list[dict[str, Any]]:
        return [
            m
            for m in self.messages
            if m["type"] == kind and all(m.get(k) == v for k, v in fields.items())
        ]

    def seen(self, kind: str, user: str) -> list[str]:
        """The sessions of ``user`` in every diff's ``kind`` (joins/leaves) so far."""
        return [
            entry["session"]
            for m in self.messages
            if m["type"] == "diff"
            for entry in m[kind].get(user, [])
        ]


class Blackhole:
    """A TCP proxy to the daemon; :meth:`cut` makes it stop forwarding both ways while
    every socket stays open (no FIN, no RST), like a peer that vanished."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.cut_off = False
        self.port = 0

    async def start(self, nursery: trio.Nursery) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        nursery.start_soon(trio.serve_listeners, self._handle, listeners)

    def cut(self) -> None:
        self.cut_off = True

    async def _handle(self, down: trio.SocketStream) -> None:
        up = await trio.open_tcp_stream("127.0.0.1", self.target)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, down, up)
            nursery.start_soon(self._pump, up, down)

    async def _pump(self, source: trio.SocketStream, sink: trio.SocketStream) -> None:
        while True:
            data = await source.receive_some(65536)
            if self.cut_off:
                await trio.sleep_forever()
            if not data:
                return
            await sink.send_all(data)


async def _daemon(nursery: trio.Nursery, make_config: Any, **overrides: Any) -> Daemon:
    daemon = Daemon(make_config(**{**FAST, **overrides}))
    await nursery.start(daemon.serve)
    return daemon


async def _member(
    nursery: trio.Nursery, port: int, user: str, meta: dict[str, Any] | None = None
) -> tuple[Raw, dict[str, Any]]:
    """A client that said hello and joined ``lobby``; returns it and its welcome."""
    client = await Raw.open(nursery, port)
    welcome = await client.hello(user)
    await client.send({"type": "join", "room": "lobby", "meta": meta or {}, "ref": "j"})
    await client.next("state", ref="j")
    return client, welcome


async def _watched(
    nursery: trio.Nursery, port: int, ann_port: int, meta: dict[str, Any] | None = None
) -> tuple[Raw, Raw, dict[str, Any]]:
    """bob in ``lobby`` on ``port``, then ann on ``ann_port`` (directly or through a proxy),
    once bob has seen ann join; returns bob, ann and ann's welcome."""
    bob, _ = await _member(nursery, port, "bob")
    ann, welcome = await _member(nursery, ann_port, "ann", meta)
    await bob.until(lambda: welcome["session"] in bob.seen("joins", "ann"))
    return bob, ann, welcome


# ------------------------------------------------------------------------------ liveness


async def test_a_client_that_vanished_behind_a_blackhole_leaves(
    nursery: trio.Nursery, make_config: Any
) -> None:
    daemon = await _daemon(nursery, make_config)
    port = daemon.client_port
    assert port is not None
    proxy = Blackhole(port)
    await proxy.start(nursery)
    bob, _ann, welcome = await _watched(nursery, port, proxy.port, {"name": "Ann"})
    proxy.cut()
    cut_at = trio.current_time()
    # Dead after 1.2 s of silence, then 1 s of grace: well within WAIT, and never earlier
    # than the timeout (nothing removes a session that may still be alive).
    await bob.until(lambda: welcome["session"] in bob.seen("leaves", "ann"))
    assert trio.current_time() - cut_at >= 1.0
    assert daemon.node.metrics.clients_timed_out == 1
    assert daemon.node.metrics.sessions_expired == 1
    assert not daemon.sessions.live.get(welcome["session"])


async def test_an_idle_client_that_answers_pings_stays(
    nursery: trio.Nursery, make_config: Any
) -> None:
    daemon = await _daemon(nursery, make_config)
    port = daemon.client_port
    assert port is not None
    bob, ann, welcome = await _watched(nursery, port, port)
    await trio.sleep(3)  # two and a half timeouts of saying nothing but pongs
    assert ann.pings >= 2
    assert ann.closed is None
    assert welcome["session"] not in bob.seen("leaves", "ann")
    assert daemon.node.metrics.clients_timed_out == 0
    # The pongs left the text fast path on (wsproto read them whole).
    conn = daemon.sessions.live[welcome["session"]]
    assert conn._fast_frames


async def test_a_deaf_client_is_closed_as_dead(nursery: trio.Nursery, make_config: Any) -> None:
    daemon = await _daemon(nursery, make_config, resume_grace_s=0.0)
    port = daemon.client_port
    assert port is not None
    bob, ann, welcome = await _watched(nursery, port, port)
    ann.deaf = True
    assert await ann.until(lambda: ann.closed) == 1001
    assert ann.pings >= 1
    # No grace: it leaves as soon as it is found dead.
    await bob.until(lambda: welcome["session"] in bob.seen("leaves", "ann"))


# ------------------------------------------------------------------------------ closes


async def test_a_clean_close_leaves_at_once(nursery: trio.Nursery, make_config: Any) -> None:
    daemon = await _daemon(nursery, make_config, resume_grace_s=60.0)
    port = daemon.client_port
    assert port is not None
    bob, ann, welcome = await _watched(nursery, port, port)
    await ann.close(1000)
    await bob.until(lambda: welcome["session"] in bob.seen("leaves", "ann"), wait=3)
    assert not daemon.sessions.detached


async def test_a_close_with_another_code_keeps_the_session_for_the_grace(
    nursery: trio.Nursery, make_config: Any
) -> None:
    daemon = await _daemon(nursery, make_config, resume_grace_s=60.0)
    port = daemon.client_port
    assert port is not None
    ann, welcome = await _member(nursery, port, "ann")
    await ann.close(4000)  # "I am reconnecting"
    await trio.sleep(0.3)
    assert list(daemon.sessions.detached) == [welcome["session"]]


# ------------------------------------------------------------------------------ resume


async def test_resume_after_a_drop_gets_the_session_back_without_a_flicker(
    nursery: trio.Nursery, make_config: Any
) -> None:
    daemon = await _daemon(nursery, make_config, resume_grace_s=30.0)
    port = daemon.client_port
    assert port is not None
    bob, ann, welcome = await _watched(nursery, port, port, {"name": "Ann"})
    session = welcome["session"]
    assert welcome["resumed"] is False and welcome["resume_grace_ms"] == 30_000
    assert isinstance(welcome["resume"], str) and len(welcome["resume"]) <= 128
    await bob.until(lambda: session in bob.seen("joins", "ann"))
    await ann.drop()
    await trio.sleep(0.5)  # the daemon has seen the drop; the session is detached
    assert list(daemon.sessions.detached) == [session]

    again = await Raw.open(nursery, port)
    back = await again.hello("ann", resume=welcome["resume"])
    assert back["resumed"] is True and back["session"] == session
    state = await again.next("state")
    assert "ref" not in state and state["room"] == "lobby"
    assert state["presences"]["ann"] == [
        {"session": session, "meta": {"name": "Ann"}, "region": "test"}
    ]
    # Still a member: an update needs no join, and everyone sees it as an update.
    await again.send({"type": "update", "room": "lobby", "meta": {"x": 1}})
    await bob.until(lambda: any(m["type"] == "diff" and m["updates"] for m in bob.messages))
    assert bob.seen("leaves", "ann") == [] and bob.seen("joins", "ann") == [session]


async def test_resume_takes_over_a_connection_the_daemon_still_thinks_alive(
    nursery: trio.Nursery, make_config: Any
) -> None:
    """The usual short drop: the client's link died (blackholed) and it reconnects before
    the daemon could notice; its resume closes the old connection."""
    daemon = await _daemon(nursery, make_config, client_timeout_s=60.0, resume_grace_s=30.0)
    port = daemon.client_port
    assert port is not None
    proxy = Blackhole(port)
    await proxy.start(nursery)
    bob, _ann, welcome = await _watched(nursery, port, proxy.port, {"name": "Ann"})
    proxy.cut()
    again = await Raw.open(nursery, port)
    back = await again.hello("ann", resume=welcome["resume"])
    assert back["resumed"] is True and back["session"] == welcome["session"]
    assert (await again.next("state"))["room"] == "lobby"
    await trio.sleep(0.3)
    assert bob.seen("leaves", "ann") == []
    assert len(daemon.node.connections) == 2  # bob and the new one: the old one is closed


async def test_resume_after_the_grace_is_a_new_session(
    nursery: trio.Nursery, make_config: Any
) -> None:
    daemon = await _daemon(nursery, make_config, resume_grace_s=0.5)
    port = daemon.client_port
    assert port is not None
    bob, ann, welcome = await _watched(nursery, port, port)
    await ann.drop()
    await bob.until(lambda: welcome["session"] in bob.seen("leaves", "ann"))
    again = await Raw.open(nursery, port)
    back = await again.hello("ann", resume=welcome["resume"])
    assert back["resumed"] is False and back["session"] != welcome["session"]
    await trio.sleep(0.2)
    assert again.of("state") == []  # in no room: it joins again, as after any connect


async def test_a_token_of_another_user_resumes_nothing(
    nursery: trio.Nursery, make_config: Any
) -> None:
    daemon = await _daemon(nursery, make_config, resume_grace_s=30.0)
    port = daemon.client_port
    assert port is not None
    ann, welcome = await _member(nursery, port, "ann")
    await ann.drop()
    mallory = await Raw.open(nursery, port)
    back = await mallory.hello("mallory", resume=welcome["resume"])
    assert back["resumed"] is False and back["session"] != welcome["session"]
    forged = await Raw.open(nursery, port)
    back = await forged.hello("ann", resume=welcome["session"] + ".AAAAAAAAAAAAAAAAAAAAAA")
    assert back["resumed"] is False
    assert list(daemon.sessions.detached) == [welcome["session"]]  # left alone


async def test_reliable_messages_sent_while_detached_arrive_after_resume(
    nursery: trio.Nursery, make_config: Any
) -> None:
    daemon = await _daemon(nursery, make_config, resume_grace_s=30.0)
    port = daemon.client_port
    assert port is not None
    bob, ann, welcome = await _watched(nursery, port, port)
    await ann.drop()
    await trio.sleep(0.3)
    await bob.send(
        {"type": "send", "to": "ann", "data": {"text": "hi"}, "mode": "reliable", "ref": 5}
    )
    await bob.next("stored", ref=5)
    again = await Raw.open(nursery, port)
    back = await again.hello("ann", resume=welcome["resume"])
    assert back["resumed"] is True
    message = await again.next("message")
    assert message["data"] == {"text": "hi"} and message["from"] == "bob"


async def test_resume_on_another_daemon_is_a_clean_fresh_start(
    nursery: trio.Nursery, make_config: Any
) -> None:
    """A daemon that cannot see the session (not linked to the one holding it) cannot
    resume it: a new session, and the old one leaves when its grace runs out where it was.
    (Linked daemons resume each other's sessions: tests/test_resume_elsewhere.py.)"""
    first = await _daemon(nursery, make_config, resume_grace_s=0.5)
    second = await _daemon(nursery, make_config, resume_grace_s=0.5)
    assert first.client_port is not None and second.client_port is not None
    bob, _ = await _member(nursery, first.client_port, "bob")
    ann, welcome = await _member(nursery, first.client_port, "ann")
    await bob.until(lambda: welcome["session"] in bob.seen("joins", "ann"))
    await ann.drop()
    elsewhere = await Raw.open(nursery, second.client_port)
    back = await elsewhere.hello("ann", resume=welcome["resume"])
    assert back["resumed"] is False and back["session"] != welcome["session"]
    await bob.until(lambda: welcome["session"] in bob.seen("leaves", "ann"))


async def test_shutdown_ends_detached_sessions(nursery: trio.Nursery, make_config: Any) -> None:
    daemon = await _daemon(nursery, make_config, resume_grace_s=60.0)
    port = daemon.client_port
    assert port is not None
    ann, _ = await _member(nursery, port, "ann")
    await ann.drop()
    await trio.sleep(0.3)
    assert daemon.sessions.detached
    daemon.shutdown()
    with trio.fail_after(WAIT):
        while daemon.running:
            await trio.sleep(0.05)
    assert not daemon.sessions.detached
    assert not list(daemon.node.state.own.live())
