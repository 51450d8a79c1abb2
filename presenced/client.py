"""An async (trio) client for presenced: the same operations as the browser client.

    async with connect("ws://127.0.0.1:7400", user="ann") as client:
        state = await client.join("lobby", {"name": "Ann"})
        await client.update("lobby", {"x": 10, "y": 20})
        async for message in client.messages():
            ...

Direct messages::

    sent = await client.send_direct("bob", {"text": "hi"}, mode="reliable")  # after `stored`
    await sent.wait(lambda s: "bob" in s.delivered)
    message = await client.next_message("message")  # on bob's side
    await bob.mark_read(message["id"])

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
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
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


class Sent:
    """A direct message this client sent, and what became of it so far (updated live)."""

    def __init__(self, ref: int, to: tuple[str, ...], mode: str) -> None:
        self.ref = ref
        self.to = to
        self.mode = mode
        #: The message id (from ``stored``, or the first receipt of a fast message).
        self.id: str | None = None
        #: recipient -> regions where it was written to the recipient's sessions
        self.delivered: dict[str, set[str]] = {}
        #: recipients who sent a read receipt
        self.read_by: set[str] = set()
        #: recipient -> error code
        self.errors: dict[str, str] = {}
        self._changed = trio.Event()

    def _note(self, frame: dict[str, Any]) -> None:
        self.id = self.id or frame.get("id")
        kind = frame.get("type")
        if kind == "delivered":
            self.delivered.setdefault(frame["to"], set()).add(frame["region"])
        elif kind == "read":
            self.read_by.add(frame["by"])
        elif kind == "error" and "to" in frame:
            self.errors[frame["to"]] = frame["code"]
        elif kind == "error":
            # The whole request was refused (bad_request, store_full, ...): every recipient.
            for user in self.to:
                self.errors.setdefault(user, str(frame.get("code")))
        self._changed.set()
        self._changed = trio.Event()

    async def wait(self, predicate: Callable[[Sent], bool]) -> None:
        """Wait until ``predicate(self)`` holds (e.g. every recipient delivered or failed)."""
        while not predicate(self):
            await self._changed.wait()

    @property
    def settled(self) -> bool:
        """Every recipient has a delivered mark or an error."""
        return all(user in self.delivered or user in self.errors for user in self.to)


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
        #: Direct messages sent, by ref, updated by their receipts.
        self.sent: dict[int, Sent] = {}
        #: Ids of direct messages already seen: a retransmission is not shown twice.
        self._seen_ids: dict[str, None] = {}
        #: Direct messages received again and not shown (a daemon crash can cause these).
        self.duplicates = 0
        nursery.start_soon(self._read)

    @property
    def session(self) -> str:
        """This connection's session id (from the ``welcome`` frame)."""
        return str(self.welcome.get("session", ""))

    @property
    def user(self) -> str:
        """The user id the daemon gave this connection (from the token, or as claimed)."""
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
        """Say hello (done by :func:`connect`); returns the ``welcome`` frame (session, user,
        region, tick_ms, limits). Raises :class:`RequestError` (``unauthorized``) if refused."""
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
        """Patch this session's meta in a room (keys set; a None value deletes the key).

        Sent at once, not throttled (benchmarks control their own rate); the daemon coalesces
        updates per tick, so others see at most one change per tick.
        """
        await self.send({"type": "update", "room": room, "meta": dict(patch)})

    async def leave(self, room: str) -> None:
        """Leave a room and forget its presence map (waits for the daemon's answer)."""
        await self.request({"type": "leave", "room": room})
        self.rooms.pop(room, None)

    async def broadcast(self, room: str, event: str, data: Any = None, echo: bool = False) -> None:
        """Send ``event`` with ``data`` to every member of ``room`` in every region (this
        session too if ``echo``); they get a ``broadcast`` frame with the sender in ``from``."""
        await self.send(
            {"type": "broadcast", "room": room, "event": event, "data": data, "echo": echo}
        )

    async def ping(self) -> float:
        """Round-trip time to the daemon, in seconds."""
        started = time.perf_counter()
        await self.request({"type": "ping", "t": time.time() * 1000})
        return time.perf_counter() - started

    async def send_direct(self, to: str | Sequence[str], data: Any, *, mode: str = "fast") -> Sent:
        """Send a direct message to a user or (a list) a group.

        ``reliable`` returns once the daemon has stored it (raises :class:`RequestError`
        otherwise, e.g. ``store_full``); ``fast`` returns once it is sent. Receipts
        (delivered, read, per-recipient errors) keep updating the returned :class:`Sent`.
        """
        recipients = (to,) if isinstance(to, str) else tuple(to)
        ref = next(self._refs)
        sent = self.sent[ref] = Sent(ref, recipients, mode)
        message: dict[str, Any] = {
            "type": "send",
            "to": to if isinstance(to, str) else list(to),
            "data": data,
            "mode": mode,
            "ref": ref,
        }
        if mode == "reliable":
            event = trio.Event()
            slot: list[dict[str, Any]] = []
            self._waiting[ref] = (event, slot)
            try:
                await self.send(message)
                await event.wait()
            finally:
                self._waiting.pop(ref, None)
            if not slot:
                raise ConnectionClosed(self.closed.reason if self.closed else None)
            if slot[0].get("type") == "error" and "to" not in slot[0]:
                raise RequestError(str(slot[0].get("code")), str(slot[0].get("message")))
            sent._note(slot[0])
        else:
            await self.send(message)
        return sent

    async def mark_read(self, message_id: str) -> None:
        """Tell the sender of a direct message that it was read."""
        await self.send({"type": "read", "id": message_id})

    async def fetch(self, limit: int = 100) -> dict[str, Any]:
        """Pull pending reliable messages (they arrive as ``message`` frames before this
        returns the ``fetched`` frame with ``count`` and ``remaining``)."""
        return await self.request({"type": "fetch", "limit": limit})

    def presences(self, room: str) -> Presences:
        """The room's presence map as this client knows it: user -> session -> {"meta",
        "region"}; empty if not joined."""
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
                elif isinstance(ref, int) and ref in self.sent:
                    self.sent[ref]._note(message)
                elif message.get("type") == "message" and self._seen(message.get("id")):
                    self.duplicates += 1  # a retransmission shown before
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

    def _seen(self, message_id: Any) -> bool:
        if message_id in self._seen_ids:
            return True
        self._seen_ids[message_id] = None
        if len(self._seen_ids) > 10_000:
            del self._seen_ids[next(iter(self._seen_ids))]
        return False

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
