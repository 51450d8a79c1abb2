"""The trio client's connection object, :class:`PresenceClient` (see :mod:`presenced.client`
for how to use it): requests and their replies, the room maps kept in step with the daemon,
direct messages, and the reconnect loop that resumes a dropped session."""

from __future__ import annotations

import contextlib
import itertools
import json
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import trio
from trio_websocket import (
    ConnectionClosed,
    HandshakeError,
    WebSocketConnection,
    open_websocket_url,
)

from presenced.client_resume import FATAL_CLOSE_CODES, ResumeBook, backoff_s
from presenced.client_rooms import Presences, apply_diff, encode, hello_frame, merge
from presenced.client_sent import RequestError, Sent
from presenced.client_tokens import Refresher, TokenProvider, provided_token
from presenced.core.client_wire import SUBPROTOCOL, apply_meta_patch

#: How long :meth:`PresenceClient.aclose` waits for the daemon to answer the close frame.
CLOSE_TIMEOUT_S = 5.0
#: How long one reconnect attempt may take to open its WebSocket (then the next one).
CONNECT_TIMEOUT_S = 10.0


class PresenceClient:
    """A connected, greeted client. Use :func:`connect` to make one."""

    def __init__(
        self,
        ws: WebSocketConnection | None,
        nursery: trio.Nursery,
        *,
        reconnect: bool = False,
        backoff_base_s: float = 0.25,
        backoff_max_s: float = 10.0,
        token_provider: TokenProvider | None = None,
    ) -> None:
        #: The current connection (None until the first one, with ``reconnect``).
        self.ws = ws
        self._token_provider = token_provider
        #: Refreshes the session's token before it expires (with a ``token_provider``).
        self.tokens = Refresher(token_provider, nursery, self.request)
        self._refs = itertools.count(1)
        #: ref -> (event, reply slot, generation of the connection the request went on)
        self._waiting: dict[int, tuple[trio.Event, list[dict[str, Any]], int]] = {}
        self._send_inbox, self._inbox = trio.open_memory_channel[dict[str, Any]](10_000)
        #: room -> user -> session -> {"meta", "region"}
        self.rooms: dict[str, Presences] = {}
        #: Watched rooms (count-only) -> their latest {"sessions", "users"}.
        self.counts: dict[str, dict[str, int]] = {}
        self.welcome: dict[str, Any] = {}
        #: Set when the client is closed for good (with ``reconnect``: not by a drop it
        #: recovers from).
        self.closed: ConnectionClosed | None = None
        #: "connected", "reconnecting" (with ``reconnect``) or "closed".
        self.status = "connected" if ws is not None else "connecting"
        #: Successful reconnects so far, and how many of them resumed the session.
        self.reconnects = 0
        self.resumes = 0
        #: Unsolicited messages dropped because the application did not read them.
        self.dropped = 0
        #: Direct messages sent, by ref, updated by their receipts.
        self.sent: dict[int, Sent] = {}
        #: Ids of direct messages already seen: a retransmission is not shown twice.
        self._seen_ids: dict[str, None] = {}
        #: Direct messages received again and not shown (a daemon crash can cause these).
        self.duplicates = 0
        #: room -> this session's meta there as the application set it (join + updates).
        self._metas: dict[str, dict[str, Any]] = {}
        self._reconnect = reconnect
        self._backoff = (backoff_base_s, backoff_max_s)
        self._generation = 0
        self._last_close: ConnectionClosed | None = None
        #: Set while a greeted connection is up (always set without ``reconnect``).
        self._up = trio.Event()
        self._stopping = False
        self._book = ResumeBook()
        #: The hello being answered (ref, frame), and the frames its welcome calls for.
        self._greeting: tuple[int, dict[str, Any]] = (0, {})
        self._restoring: list[dict[str, Any]] = []
        if ws is not None:
            self._up.set()
            nursery.start_soon(self._read, ws, 0)

    @property
    def session(self) -> str:
        """This session's id (from ``welcome``): kept by a resumed reconnect, new after any
        other reconnect."""
        return str(self.welcome.get("session", ""))

    @property
    def user(self) -> str:
        """The user id the daemon gave this connection (from the token, or as claimed)."""
        return str(self.welcome.get("user", ""))

    # ------------------------------------------------------------------ requests

    async def request(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send a message with a fresh ref and wait for the reply that echoes it."""
        ws, generation = await self._link()
        reply = await self._request_on(ws, generation, message)
        if reply.get("type") == "error":
            raise RequestError(str(reply.get("code")), str(reply.get("message")))
        return reply

    async def _request_on(
        self, ws: WebSocketConnection, generation: int, message: dict[str, Any]
    ) -> dict[str, Any]:
        ref = message["ref"] if isinstance(message.get("ref"), int) else next(self._refs)
        event = trio.Event()
        slot: list[dict[str, Any]] = []
        self._waiting[ref] = (event, slot, generation)
        try:
            await ws.send_message(encode({**message, "ref": ref}))
            await event.wait()
        finally:
            self._waiting.pop(ref, None)
        if not slot:
            raise ConnectionClosed(self._last_close.reason if self._last_close else None)
        return slot[0]

    async def _link(self) -> tuple[WebSocketConnection, int]:
        """The connection to send on: the current one, once greeted (with ``reconnect``,
        this waits through a reconnect)."""
        while not self._up.is_set():
            await self._up.wait()
        if self.ws is None:
            raise ConnectionClosed(None)
        return self.ws, self._generation

    async def send(self, message: Mapping[str, Any]) -> None:
        """Send one message without waiting for any reply (with ``reconnect``: once
        connected, and again on the next connection if this one drops under it)."""
        while True:
            ws, generation = await self._link()
            try:
                await ws.send_message(encode(message))
                return
            except ConnectionClosed:
                if not self._reconnect or self._stopping:
                    raise
                self._lost(generation)  # (before its reader notices) wait for the next one

    async def hello(
        self, *, token: str | None = None, user: str | None = None, client: str | None = None
    ) -> dict[str, Any]:
        """Say hello (done by :func:`connect`); returns the ``welcome`` frame (session, user,
        region, tick_ms, limits). Raises :class:`RequestError` (``unauthorized``) if refused."""
        self.welcome = await self.request(hello_frame(token, user, client))
        self.tokens.schedule(self.welcome.get("expires_in_ms"))
        return self.welcome

    async def join(self, room: str, meta: Mapping[str, Any] | None = None) -> Presences:
        """Join a room; returns the live presence map of the room: user -> session -> info.

        The map keeps changing as diffs arrive; copy it for a snapshot. With ``reconnect`` a
        join cut by a drop is sent again on the next connection.
        """
        previous = self._metas.get(room)
        self._metas[room] = dict(meta or {})
        self._book.patches.pop(room, None)
        self._book.left_offline.discard(room)
        while True:
            try:
                await self.request({"type": "join", "room": room, "meta": self._metas[room]})
            except RequestError:
                if previous is None or room not in self.rooms:
                    self._metas.pop(room, None)
                else:  # refused (too_large): still in the room with the meta it had
                    self._metas[room] = previous
                raise
            except ConnectionClosed:
                if not self._reconnect or self._stopping or room not in self._metas:
                    raise
                continue
            return self.rooms[room]

    async def watch(self, room: str) -> dict[str, int]:
        """Watch a room's counts without being in it (a count-only join: nobody sees this
        session there); returns the live ``{"sessions", "users"}`` of the room (every
        region's), updated at most once per tick. Watched again after any reconnect;
        :meth:`leave` ends it."""
        self.counts.setdefault(room, {})
        try:
            await self.request({"type": "join", "room": room, "view": "count"})
        except RequestError:
            self.counts.pop(room, None)
            raise
        return self.counts[room]

    def occupancy(self, room: str) -> dict[str, int]:
        """The latest counts of a watched room (empty until the first ones came)."""
        return self.counts.get(room, {})

    async def update(self, room: str, patch: Mapping[str, Any]) -> None:
        """Patch this session's meta in a room (keys set; a None value deletes the key).

        Sent at once, not throttled (benchmarks control their own rate); the daemon coalesces
        updates per tick, so others see at most one change per tick. With ``reconnect``,
        a patch made while disconnected is kept and sent after the reconnect.
        """
        patch = dict(patch)
        if room in self._metas:
            self._metas[room] = apply_meta_patch(self._metas[room], patch)
        if self._reconnect and room in self._metas:
            if self._up.is_set() and self.ws is not None:
                generation = self._generation
                try:
                    await self.ws.send_message(
                        encode({"type": "update", "room": room, "meta": patch})
                    )
                    return
                except ConnectionClosed:
                    self._lost(generation)
            self._book.patches[room] = {**self._book.patches.get(room, {}), **patch}
            return
        await self.send({"type": "update", "room": room, "meta": patch})

    async def leave(self, room: str) -> None:
        """Leave a room and forget its presence map (waits for the daemon's answer; with
        ``reconnect``, while disconnected, it takes effect at once and the daemon is told
        after a resume)."""
        if self.counts.pop(room, None) is not None:
            if self._up.is_set():
                with contextlib.suppress(RequestError, ConnectionClosed):
                    await self.request({"type": "leave", "room": room})
            return
        if not self._reconnect:
            await self.request({"type": "leave", "room": room})
            self.rooms.pop(room, None)
            self._metas.pop(room, None)
            return
        self.rooms.pop(room, None)
        self._book.resuming.discard(room)
        if self._metas.pop(room, None) is None:
            return
        self._book.patches.pop(room, None)
        if not self._up.is_set():
            self._book.left_offline.add(room)
            return
        try:
            await self.request({"type": "leave", "room": room})
        except RequestError as exc:
            if exc.code != "not_joined":
                raise
        except ConnectionClosed:
            if room not in self._metas:
                self._book.left_offline.add(room)

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
            ws, generation = await self._link()
            reply = await self._request_on(ws, generation, message)
            if reply.get("type") == "error" and "to" not in reply:
                raise RequestError(str(reply.get("code")), str(reply.get("message")))
            sent._note(reply)
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

    async def wait_connected(self) -> None:
        """Wait until the client is connected and greeted (at once when it is)."""
        await self._link()

    async def aclose(self) -> None:
        """Close for good with a clean close (1000): the daemon removes the session at once
        (no resume grace). Done by :func:`connect` on exit."""
        self._stopping = True
        if self.ws is not None:
            with trio.move_on_after(CLOSE_TIMEOUT_S):
                await self.ws.aclose()

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

    async def _read(self, ws: WebSocketConnection, generation: int) -> None:
        try:
            while True:
                message = json.loads(await ws.get_message())
                for frame in self._dispatch(message):
                    await ws.send_message(encode(frame))
        except ConnectionClosed as exc:
            self._last_close = exc
            if not self._reconnect:
                self.closed = exc
        finally:
            if self._reconnect:
                self._lost(generation)
            else:
                self._finish()

    def _dispatch(self, message: dict[str, Any]) -> list[dict[str, Any]]:
        """Take in one frame; returns the frames to send back (a meta patch after a resume)."""
        replies = self._sync(message)
        ref = message.get("ref")
        background = self._book.background.pop(ref, None) if isinstance(ref, int) else None
        waiter = self._waiting.get(ref) if isinstance(ref, int) else None
        if ref == self._greeting[0] and message.get("type") == "welcome":
            self._welcomed(message)
        if background is not None:
            kind, room = background
            if kind == "leave":
                return replies  # the daemon's answer to a leave made while disconnected
            if message.get("type") == "error":  # a rejoin refused (the token changed?)
                self._metas.pop(room, None)
                self.rooms.pop(room, None)
            self._deliver(message)
        elif waiter is not None:
            waiter[1].append(message)
            waiter[0].set()
        elif isinstance(ref, int) and ref in self.sent:
            self.sent[ref]._note(message)
        elif message.get("type") == "message" and self._seen(message.get("id")):
            self.duplicates += 1  # a retransmission shown before
        else:
            self._deliver(message)
        return replies

    def _deliver(self, message: dict[str, Any]) -> None:
        try:
            self._send_inbox.send_nowait(message)
        except (trio.WouldBlock, trio.ClosedResourceError):
            # The application is not reading messages(); the presence maps stay exact
            # regardless (they are synced before), so drop and count.
            self.dropped += 1

    def _seen(self, message_id: Any) -> bool:
        if message_id in self._seen_ids:
            return True
        self._seen_ids[message_id] = None
        if len(self._seen_ids) > 10_000:
            del self._seen_ids[next(iter(self._seen_ids))]
        return False

    def _sync(self, message: dict[str, Any]) -> list[dict[str, Any]]:
        kind = message.get("type")
        if kind == "state" and message["room"] in self._metas:
            room_name = message["room"]
            room: Presences = {}
            merge(room, message["presences"])
            self.rooms[room_name] = room
            if message.get("ref") is None and room_name in self._book.resuming:
                mine = room.get(self.user, {}).get(self.session)
                meta = mine["meta"] if mine is not None else None
                return self._book.after_resume(room_name, meta, self._metas[room_name])
        elif kind == "occupancy" and message["room"] in self.counts:
            self.counts[message["room"]].update(
                sessions=message["sessions"], users=message["users"]
            )
        elif kind == "diff" and message["room"] in self.rooms:
            apply_diff(self.rooms[message["room"]], message)
        return []

    # ------------------------------------------------------------------ reconnecting

    async def _run(
        self,
        url: str,
        hello: dict[str, Any],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Hold a connection (``reconnect``): dial, greet offering the resume token, restore
        the rooms, read until the connection drops; then wait (backoff with jitter) and dial
        again, until :meth:`aclose` or a refusal that reconnecting cannot cure. A failure of
        the first connection is raised (there is nothing to keep yet)."""
        attempt = 0
        started = False
        try:
            while not self._stopping:
                failure: Exception | None = None
                code: int | None = None
                try:
                    async with open_websocket_url(
                        url, subprotocols=[SUBPROTOCOL], connect_timeout=CONNECT_TIMEOUT_S
                    ) as ws:
                        self._generation += 1
                        self.ws = ws
                        async with trio.open_nursery() as reading:
                            reading.start_soon(self._read, ws, self._generation)
                            try:
                                await self._greet(ws, self._generation, hello)
                            except (ConnectionClosed, RequestError) as exc:
                                failure = exc
                                with trio.move_on_after(CLOSE_TIMEOUT_S):
                                    await ws.aclose()
                            else:
                                attempt = 0
                                if not started:
                                    started = True
                                    task_status.started()
                        code = ws.closed.code if ws.closed else None
                except (HandshakeError, OSError) as exc:
                    failure = exc
                if not started and failure is not None:
                    raise failure
                if isinstance(failure, RequestError) or code in FATAL_CLOSE_CODES:
                    break
                if self._stopping:
                    break
                base_s, max_s = self._backoff
                delay_s = backoff_s(attempt, base_s=base_s, max_s=max_s)
                attempt += 1
                await trio.sleep(delay_s)
        finally:
            self._finish()

    async def _greet(self, ws: WebSocketConnection, generation: int, hello: dict[str, Any]) -> None:
        """Say hello on a new connection and put the session back where the application
        wants it, before anything the application sends goes out on it."""
        ref = next(self._refs)
        if self._token_provider is not None:
            hello = {**hello, "token": await provided_token(self._token_provider)}
        message = {**self._book.hello(hello), "ref": ref}
        self._greeting = (ref, message)
        welcome = await self._request_on(ws, generation, message)
        if welcome.get("type") == "error":
            raise RequestError(str(welcome.get("code")), str(welcome.get("message")))
        for frame in self._restoring:  # decided by the reader as the welcome came
            await ws.send_message(encode(frame))
        for room in list(self.counts):  # watches end with their connection: watch again
            await ws.send_message(encode({"type": "join", "room": room, "view": "count"}))
        while patched := list(self._book.patches.keys() - self._book.resuming):
            # Patched while this was being sent: joins carry the whole meta, rooms resumed
            # and refreshed already need the patch.
            for room in patched:
                patch = self._book.patches.pop(room)
                if room in self.rooms:
                    await ws.send_message(encode({"type": "update", "room": room, "meta": patch}))
        self.status = "connected"
        self._up.set()
        if self._book.resuming:
            # The daemon sends each room's state right after welcome, so the answer to a
            # ping comes after them: a room still without its state is not the session's.
            await self._request_on(ws, generation, {"type": "ping", "t": time.time() * 1000})
            for room in sorted(self._book.resuming):
                self._book.resuming.discard(room)
                frame = self._book.rejoin(room, self._metas, self._refs)
                await ws.send_message(encode(frame))

    def _welcomed(self, welcome: dict[str, Any]) -> None:
        """The welcome of a reconnect, taken in by the reader before any frame after it (the
        resumed rooms' states follow at once)."""
        resumed = self._book.welcomed(self._greeting[1], welcome, self.session)
        if self.welcome:
            self.reconnects += 1
            self.resumes += resumed
        self.welcome = welcome
        self.tokens.schedule(welcome.get("expires_in_ms"))
        self._restoring = self._book.restore(resumed, self.rooms, self._metas, self._refs)

    def _lost(self, generation: int) -> None:
        """A connection ended: fail the requests it carried; wait for the next one."""
        if generation == self._generation:
            if self._up.is_set():
                self._up = trio.Event()
            self._book.lost()
            self.status = "reconnecting"
        for event, _, on in self._waiting.values():
            if on == generation:
                event.set()

    def _finish(self) -> None:
        """Closed for good: end messages(), fail every waiting request."""
        self.status = "closed"
        if self._reconnect and self.closed is None:
            self.closed = self._last_close or ConnectionClosed(None)
        self._stopping = True
        self.tokens.stop()
        self._send_inbox.close()
        for event, _, _ in self._waiting.values():
            event.set()
        self._up.set()
