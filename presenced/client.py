"""An async (trio) client for presenced: the same operations as the browser client.

    async with connect("ws://127.0.0.1:7400", user="ann") as client:
        state = await client.join("lobby", {"name": "Ann"})
        await client.update("lobby", {"x": 10, "y": 20})
        async for message in client.messages():
            ...

The client keeps a local presence map per joined room, kept in sync from ``state`` and
``diff`` frames the way Phoenix's presence.js does (``syncState`` / ``syncDiff``), so
``client.presences(room)`` is always what the server has told it. Requests that have a reply
(hello, join, leave, ping) carry a ``ref`` and are awaited; errors with that ref raise
:class:`RequestError`.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from presenced.server.websocket import SUBPROTOCOL

Presences = dict[str, dict[str, dict[str, Any]]]


class RequestError(Exception):
    """The server answered a request with an error frame."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class PresenceClient:
    """A connected, greeted client. Use :func:`connect` to make one."""

    def __init__(self, ws: WebSocketConnection, nursery: trio.Nursery) -> None:
        self.ws = ws
        self._refs = itertools.count(1)
        self._waiting: dict[int, tuple[trio.Event, list[dict[str, Any]]]] = {}
        self._send_inbox, self._inbox = trio.open_memory_channel[dict[str, Any]](10_000)
        #: room -> user -> session -> {"meta", "region"}
        self.rooms: dict[str, Presences] = {}
        self.welcome: dict[str, Any] = {}
        self.closed: ConnectionClosed | None = None
        #: Unsolicited messages dropped because the application did not read them.
        self.dropped = 0
        nursery.start_soon(self._read)

    @property
    def session(self) -> str:
        return str(self.welcome.get("session", ""))

    @property
    def user(self) -> str:
        return str(self.welcome.get("user", ""))

    # ------------------------------------------------------------------ requests

    async def request(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send a message with a fresh ref and wait for the reply that echoes it."""
        ref = next(self._refs)
        event = trio.Event()
        slot: list[dict[str, Any]] = []
        self._waiting[ref] = (event, slot)
        try:
            await self.send({**message, "ref": ref})
            await event.wait()
        finally:
            self._waiting.pop(ref, None)
        if not slot:
            raise ConnectionClosed(self.closed.reason if self.closed else None)
        reply = slot[0]
        if reply.get("type") == "error":
            raise RequestError(str(reply.get("code")), str(reply.get("message")))
        return reply

    async def send(self, message: Mapping[str, Any]) -> None:
        """Send one message without waiting for any reply."""
        await self.ws.send_message(json.dumps(message, separators=(",", ":")))

    async def hello(
        self, *, token: str | None = None, user: str | None = None, client: str | None = None
    ) -> dict[str, Any]:
        message: dict[str, Any] = {"type": "hello", "client": client or "presenced-py"}
        if token is not None:
            message["token"] = token
        if user is not None:
            message["user"] = user
        self.welcome = await self.request(message)
        return self.welcome

    async def join(self, room: str, meta: Mapping[str, Any] | None = None) -> Presences:
        """Join a room; returns the live presence map of the room: user -> session -> info.

        The map keeps changing as diffs arrive; copy it for a snapshot.
        """
        await self.request({"type": "join", "room": room, "meta": dict(meta or {})})
        return self.rooms[room]

    async def update(self, room: str, patch: Mapping[str, Any]) -> None:
        """Patch this session's meta in a room (keys set; a None value deletes the key)."""
        await self.send({"type": "update", "room": room, "meta": dict(patch)})

    async def leave(self, room: str) -> None:
        await self.request({"type": "leave", "room": room})
        self.rooms.pop(room, None)

    async def broadcast(self, room: str, event: str, data: Any = None, echo: bool = False) -> None:
        await self.send(
            {"type": "broadcast", "room": room, "event": event, "data": data, "echo": echo}
        )

    async def ping(self) -> float:
        """Round-trip time to the daemon, in seconds."""
        started = time.perf_counter()
        await self.request({"type": "ping", "t": time.time() * 1000})
        return time.perf_counter() - started

    def presences(self, room: str) -> Presences:
        return self.rooms.get(room, {})

    # ------------------------------------------------------------------ receiving

    async def messages(self) -> AsyncIterator[dict[str, Any]]:
        """Every frame that is not a reply to a request (diffs, broadcasts, errors)."""
        async for message in self._inbox:
            yield message

    async def next_message(self, type_: str | None = None) -> dict[str, Any]:
        """The next unsolicited frame (of the given type, skipping others)."""
        async for message in self._inbox:
            if type_ is None or message.get("type") == type_:
                return message
        raise ConnectionClosed(self.closed.reason if self.closed else None)

    async def _read(self) -> None:
        try:
            while True:
                message = json.loads(await self.ws.get_message())
                self._sync(message)
                ref = message.get("ref")
                waiter = self._waiting.get(ref) if isinstance(ref, int) else None
                if waiter is not None:
                    waiter[1].append(message)
                    waiter[0].set()
                else:
                    try:
                        self._send_inbox.send_nowait(message)
                    except trio.WouldBlock:
                        # The application is not reading messages(); the presence maps
                        # stay exact regardless (they are synced above), so drop and count.
                        self.dropped += 1
        except ConnectionClosed as exc:
            self.closed = exc
        finally:
            self._send_inbox.close()
            for event, _ in self._waiting.values():
                event.set()

    def _sync(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "state":
            room: Presences = {}
            _merge(room, message["presences"])
            self.rooms[message["room"]] = room
        elif kind == "diff" and message["room"] in self.rooms:
            room = self.rooms[message["room"]]
            _merge(room, message["joins"])
            _merge(room, message["updates"])
            for user, sessions in message["leaves"].items():
                known = room.get(user, {})
                for entry in sessions:
                    known.pop(entry["session"], None)
                if not known:
                    room.pop(user, None)


def _merge(room: Presences, presences: Mapping[str, list[dict[str, Any]]]) -> None:
    for user, sessions in presences.items():
        known = room.setdefault(user, {})
        for entry in sessions:
            known[entry["session"]] = {"meta": entry["meta"], "region": entry["region"]}


@asynccontextmanager
async def connect(
    url: str,
    *,
    token: str | None = None,
    user: str | None = None,
    client: str | None = None,
) -> AsyncIterator[PresenceClient]:
    """Connect, say hello (token, or anonymous with an optional user id) and yield the client."""
    async with trio.open_nursery() as nursery:
        async with open_websocket_url(url, subprotocols=[SUBPROTOCOL]) as ws:
            presence = PresenceClient(ws, nursery)
            await presence.hello(token=token, user=user, client=client)
            yield presence
        nursery.cancel_scope.cancel()
