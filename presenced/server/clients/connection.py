"""One client WebSocket connection: handshake, hello/auth, requests, and its bounded outbox.

Two tasks per connection:

* the **reader** (the connection's own task) feeds socket bytes to wsproto and handles every
  complete message inline, draining all frames already buffered before it reads again;
* while a client streams updates its connection is **paced**: the reader task parks, and the
  node's ticker reads the socket once per tick boundary (:meth:`poll_input`), just before the
  tick's gossip and flush. Its updates would wait for that tick anyway, so they lose no
  latency, and the daemon wakes once per tick for all its busy clients instead of once per
  message (a wake-up costs more CPU than the message). Other requests from a paced client
  wait at most one tick. After ``PACED_IDLE_TICKS`` empty reads it goes back to being read
  as data arrives;
* the **writer** waits until frames are queued and writes everything queued in one
  ``send_all``, so a tick's worth of frames costs one syscall.

The outbox is bounded. Room diffs are state, so when a client cannot keep up its queued
diffs are thrown away and replaced by one fresh ``state`` per room: it gets the newest state
when it can take it. A client that stays unable to drain its queue for
``slow_client_timeout_s`` is closed with 1013. Nothing one connection does can raise into
another: handlers only touch the node through synchronous calls, and any unexpected error
closes this connection alone (1011) and is logged.

What a client may do (hello, join, update, leave, broadcast, direct messages, its rate
limit) is decided by its :class:`~presenced.core.session.SessionRules`; this module reads,
verifies tokens, and carries out what the rules answer.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import deque
from typing import TYPE_CHECKING, Any

import trio
from wsproto import WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage

from presenced.core import client_wire as wire
from presenced.core.client_decode import decode_client_frame
from presenced.core.client_frames import error, error_from, message_frame, pong
from presenced.core.frame_guard import FrameGuard
from presenced.core.resume import CLEAN_CLOSE_CODES
from presenced.core.session import Refusal, SessionRules
from presenced.core.ws_frames import (
    PING_FRAME,
    CloseCode,
    close_frame,
    complete_text_messages,
    joined,
    pong_frame,
    whole_control_frames,
)
from presenced.server.clients.greeting import hello_grant, refresh
from presenced.server.clients.handshake import (
    RECEIVE_BYTES,
    HandshakeFailed,
    accept_websocket,
    drain_input,
)
from presenced.server.clients.sessions import configure_keepalive

if TYPE_CHECKING:
    from presenced.server.clients.paced import PacedClients
    from presenced.server.clients.sessions import Sessions
    from presenced.server.node import Node

log = logging.getLogger(__name__)

#: Closes by the daemon after which the session may still be resumed (silence, a shutdown,
#: a client too slow to read): any other (policy, too big, internal) ends it at once.
_RESUMABLE_CLOSES = frozenset({CloseCode.GOING_AWAY, CloseCode.TRY_AGAIN_LATER})

#: Most frames one message may be split into (each is held until the message is complete).
MAX_FRAGMENTS = 64
#: Pieces of a message held before they are joined (a frame may arrive a few bytes a read).
_JOIN_PIECES = 64
#: Closes for what a client sent (it may still be sending), and how much more is read then.
_CLIENT_FAULTS = frozenset(
    {CloseCode.PROTOCOL_ERROR, CloseCode.INVALID_DATA, CloseCode.POLICY, CloseCode.TOO_BIG}
)
_DRAIN_BYTES = 1 << 20
#: Empty tick-boundary reads after which a paced connection is read as data arrives again.
PACED_IDLE_TICKS = 8

#: What a stream raises once the peer is gone or we closed it.
_GONE = (trio.BrokenResourceError, trio.ClosedResourceError)


class ClientConnection:
    """State and tasks of one connected client (one browser tab or app instance)."""

    def __init__(
        self,
        node: Node,
        stream: trio.abc.Stream,
        peer: str,
        *,
        sessions: Sessions,
        paced: PacedClients,
    ) -> None:
        self.node = node
        #: The daemon's sessions (hello, resume, endings) and its paced clients.
        self.sessions = sessions
        self.paced = paced
        self.limits = node.config.limits
        self.stream = stream
        self.peer = peer
        self.ws: WSConnection | None = None
        #: The session's user once it said hello (the rules decide it), and its id.
        self.user = ""
        self.session = ""
        #: What this client may do (rooms, grant, rate limit): see presenced.core.session.
        self.rules = SessionRules(self.limits, node.clock())
        self._outbox: deque[tuple[str | None, bytes]] = deque()
        self._queued_bytes = 0
        self._wakeup = trio.Event()
        self._sending = False
        #: The socket's file descriptor while it is open and plain TCP (write-through path).
        self._fd: int | None = None
        self._stalled_since: float | None = None
        #: Checks frame headers before wsproto reads them (off the fast path).
        self._guard = FrameGuard(self.limits.max_frame_bytes, MAX_FRAGMENTS)
        self._fragments: list[str | bytes] = []
        self._fragment_bytes = 0
        #: The last pong queued, while it may still be replaced by a newer one.
        self._queued_pong: tuple[str | None, bytes] | None = None
        #: What the client sent right behind its upgrade request (read first).
        self._pipelined = b""
        self._close: tuple[int, str] | None = None
        self._scope = trio.CancelScope()
        self._hello_scope = trio.CancelScope()
        #: Paced: the ticker reads this connection at tick boundaries (see the module doc).
        self._paced = False
        self._resume = trio.Event()
        self._idle_polls = 0
        self._stop_reading = False
        #: Whether reads still take the whole-text-frames fast path (see _handle_data).
        self._fast_frames = True
        #: Liveness (see presenced.server.clients.sessions): when input last came, when we pinged.
        self.last_input = node.clock()
        self.pinged_at = float("-inf")
        #: The session must leave with this connection (a clean close, a policy close), not
        #: wait for a resume.
        self.session_ends = False

    @property
    def rooms(self) -> dict[str, None]:
        """Rooms this session has joined (a dict used as an ordered set; the rules own it)."""
        return self.rules.rooms

    # ------------------------------------------------------------------ lifecycle

    async def serve(self) -> None:
        """Run the connection to its end; never raises (one client cannot hurt another)."""
        node = self.node
        try:
            with self._scope:
                with trio.move_on_after(self.limits.hello_timeout_s):
                    self.ws, _request, self._pipelined = await accept_websocket(
                        self.stream, admit=self._admit
                    )
                if self.ws is None:
                    log.info("client %s: no WebSocket handshake in time", self.peer)
                    return
                if isinstance(self.stream, trio.SocketStream):
                    self._fd = self.stream.socket.fileno()
                    configure_keepalive(self.stream.socket, node.config.client_timeout_s)
                node.connections.add(self)
                node.metrics.connections_opened += 1
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._writer)
                    await self._reader()
                    nursery.cancel_scope.cancel()
        except HandshakeFailed as exc:
            node.metrics.connections_refused += 1
            log.info("client %s refused: %s", self.peer, exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:
            log.exception("client %s: unexpected error; closing this connection", self.peer)
            self._close = self._close or (CloseCode.INTERNAL, "internal error")
        finally:
            self._unpace()  # the ticker reads it no more, before its socket closes
            self._fd = None  # never write to a descriptor number the kernel may reuse
            self.sessions.connection_ended(self)
            await self._close_transport()

    def _admit(self) -> bool:
        """Claim a connection slot, at the moment the upgrade request is answered."""
        if len(self.node.connections) >= self.limits.max_connections:
            return False
        self.node.connections.add(self)
        return True

    def close(self, code: int, reason: str) -> None:
        """Ask the connection to end with a close code (takes effect at its next checkpoint)."""
        if self._close is None:
            self._close = (code, reason)
            if code not in _RESUMABLE_CLOSES:
                self.session_ends = True
            self.node.metrics.count_close(code)
            if code == CloseCode.TRY_AGAIN_LATER:
                self._outbox.clear()  # it could not take these; the close frame must go first
        self._scope.cancel()

    async def _close_transport(self) -> None:
        """Write what is still queued (e.g. the last error) and a close frame, then close.

        Skipped when the writer was cancelled in the middle of a write: the stream may hold
        half a frame, and anything more would be garbage to the client.
        """
        with trio.CancelScope(shield=True):
            if self.ws is not None and not self._sending:
                data = b"".join(frame for _, frame in self._outbox)
                self._outbox.clear()
                if self._close is not None and self.ws.state is ConnectionState.OPEN:
                    data += close_frame(*self._close)
                if data:
                    with trio.move_on_after(1), contextlib.suppress(*_GONE):
                        await self.stream.send_all(data)
                        if self._close is not None and self._close[0] in _CLIENT_FAULTS:
                            # Closing with unread input would reset the connection, and a
                            # reset can lose the close frame before the client reads it.
                            await drain_input(self.stream, _DRAIN_BYTES)
            with trio.move_on_after(1):
                await self.stream.aclose()

    # ------------------------------------------------------------------ reading

    async def _reader(self) -> None:
        assert self.ws is not None
        ws = self.ws
        self._hello_scope.deadline = trio.current_time() + self.limits.hello_timeout_s
        with self._hello_scope:
            try:
                await self._read_loop(ws)
            except _GONE:
                return
        if self._hello_scope.cancelled_caught:
            self.close(CloseCode.POLICY, "no hello in time")

    async def _read_loop(self, ws: WSConnection) -> None:
        # Frames the client sent right behind its upgrade request.
        if self._pipelined and not self._handle_data(ws, self._pipelined):
            return
        self._pipelined = b""
        while True:
            if self._paced:
                await self._resume.wait()
                if self._stop_reading:
                    return
            data = await self.stream.receive_some(RECEIVE_BYTES)
            self.last_input = self.node.clock()
            if not data:
                return
            self.node.metrics.bytes_in += len(data)
            if not self._handle_data(ws, bytes(data)):
                return

    def _pace(self) -> None:
        """The client streams updates: read it at tick boundaries from now on."""
        if not self._paced and self._fd is not None:
            self._paced = True
            self._idle_polls = 0
            self._resume = trio.Event()
            self.paced.add(self, self._fd)
            self.node.want_tick()  # (an idle ticker sleeps through boundaries)

    def _unpace(self) -> None:
        """Back to reading as data arrives (the reader task resumes)."""
        if self._paced:
            self._paced = False
            self.paced.discard(self)
            self._resume.set()

    def quiet_tick(self) -> None:
        """A tick boundary found nothing from this paced client."""
        self._idle_polls += 1
        if self._idle_polls >= PACED_IDLE_TICKS or self._close is not None:
            self._unpace()

    def poll_input(self) -> None:
        """Read and handle what a paced client sent since the last tick (called by the ticker
        when the socket has input; never raises: an error ends this connection alone)."""
        fd, ws = self._fd, self.ws
        if fd is None or ws is None or self._close is not None:
            self._unpace()
            return
        try:
            data = os.read(fd, RECEIVE_BYTES)
        except (BlockingIOError, InterruptedError):
            self.quiet_tick()
            return
        except OSError:
            data = b""
        if not data:
            self._unpace()  # end of stream or an error: the reader task meets it itself
            return
        self._idle_polls = 0
        self.last_input = self.node.clock()
        self.node.metrics.bytes_in += len(data)
        try:
            keep = self._handle_data(ws, data)
        except Exception:
            log.exception("client %s: unexpected error; closing this connection", self.peer)
            self.close(CloseCode.INTERNAL, "internal error")
            keep = False
        if not keep:
            self._stop_reading = True
            self._unpace()

    def _handle_data(self, ws: WSConnection, data: bytes) -> bool:
        """Handle what one read brought; False once the connection should end. Whole text
        frames take the fast path until the first read that is anything else; from then on
        wsproto reads everything (see :mod:`presenced.core.ws_frames`), each read checked by
        the frame guard first, so a frame over the limits is refused at its header."""
        if self._fast_frames:
            messages = complete_text_messages(data)
            if messages is not None:
                for message in messages:
                    if not self._on_fragment(message, True) or self._close is not None:
                        return False
                return True
            # Whole control frames (the pong to our liveness ping) leave wsproto holding
            # nothing: the next read may take the fast path again (not inside a fragmented
            # message, whose frames the guard is still counting).
            self._fast_frames = whole_control_frames(data) and not self._guard.in_message
        cut = self._guard.scan(data)
        if cut is not None:
            # Everything before that frame's header is read as usual; then refuse it.
            ws.receive_data(data[:cut])
            if self._handle_events(ws):
                self._too_large(self._guard.reason)
            return False
        ws.receive_data(data)
        return self._handle_events(ws)

    def _handle_events(self, ws: WSConnection) -> bool:
        """Handle every buffered event; False once the connection should end. Pings and pongs
        take a token like messages do: each costs the daemon work, and a ping an answer."""
        for event in ws.events():
            if isinstance(event, TextMessage | BytesMessage):
                if not self._on_fragment(
                    bytes(event.data) if isinstance(event.data, bytearray) else event.data,
                    event.message_finished,
                ):
                    return False
            elif isinstance(event, Ping):
                if self._take_token():
                    self._pong(bytes(event.payload))
            elif isinstance(event, Pong):
                self._take_token()
            elif isinstance(event, CloseConnection):
                if ws.state is ConnectionState.REMOTE_CLOSING:
                    self.session_ends = event.code in CLEAN_CLOSE_CODES
                    self.push(ws.send(event.response()))
                elif ws.state is ConnectionState.OPEN:
                    # wsproto reports a framing error (bad UTF-8, unmasked or unknown frame)
                    # as a CloseConnection it did not receive: fail the connection with its code.
                    self.close(event.code, event.reason or "protocol error")
                return False
            if self._close is not None:
                return False
        return True

    def _pong(self, payload: bytes) -> None:
        """Answer a ping. A pong still queued last (the client is not reading) is replaced:
        RFC 6455 allows answering only the latest ping, and a ping flood then queues one pong
        instead of one per ping."""
        frame = pong_frame(payload)
        queued = self._queued_pong
        if queued is not None and self._outbox and self._outbox[-1] is queued:
            self._queued_pong = (None, frame)
            self._outbox[-1] = self._queued_pong
            self._queued_bytes += len(frame) - len(queued[1])
            return
        self.push(frame)
        last = self._outbox[-1] if self._outbox else None
        self._queued_pong = last if last is not None and last[1] is frame else None

    def _on_fragment(self, data: str | bytes, finished: bool) -> bool:
        """One piece of a message: a whole frame, or what one read brought of one (the frame
        guard bounds how many frames a message has; the bytes are bounded here too, for the
        fast path's frames)."""
        self.node.metrics.frames_in += 1
        size = len(data) if isinstance(data, bytes) or data.isascii() else len(data.encode())
        self._fragment_bytes += size
        if self._fragment_bytes > self.limits.max_frame_bytes:
            self._too_large("frame is too large")
            return False
        if not finished:
            self._fragments.append(data)
            if len(self._fragments) >= _JOIN_PIECES:  # a frame trickling in a few bytes a read
                self._fragments = [joined(self._fragments)]
            return True
        if self._fragments:
            self._fragments.append(data)
            data = joined(self._fragments)
            self._fragments.clear()
        self._fragment_bytes = 0
        self._on_message(data)
        return self._close is None

    def _too_large(self, reason: str) -> None:
        self.send(error(wire.TOO_LARGE, reason, None))
        self.close(CloseCode.TOO_BIG, reason)

    # ------------------------------------------------------------------ requests

    def _on_message(self, data: str | bytes) -> None:
        node = self.node
        node.metrics.messages_in += 1
        rules = self.rules
        refusal = rules.admit(node.clock())
        if refusal is not None:
            self._refused(refusal)
            return
        ref: Any = None
        try:
            message = decode_client_frame(data, self.limits)
            ref = message.ref
            if rules.grant is None:  # (the rule is asked only until the session has begun)
                rules.check_greeted(message)
            self._handlers[type(message)](self, message)
        except Refusal as refused:
            self._refused(refused)
        except wire.ProtocolError as exc:
            node.metrics.count_error(exc.code)
            self.send(error_from(exc))
        except Exception:
            log.exception("client %s: error handling a request", self.peer)
            self.send(error(wire.INTERNAL, "internal error", ref))
            self.close(CloseCode.INTERNAL, "internal error")

    def _take_token(self) -> bool:
        """Take a token for one message or control frame; False when it is dropped."""
        refusal = self.rules.admit(self.node.clock())
        if refusal is None:
            return True
        self._refused(refusal)
        return False

    def _refused(self, refusal: Refusal) -> None:
        """Carry out a refusal: its error (when it says so), then its close."""
        if refusal.tell:
            self.node.metrics.count_error(refusal.code)
            self.send(error_from(refusal))
        if refusal.close is not None:
            log.info("client %s closed (%s): %s", self.peer, refusal.reason, refusal.message)
            self.close(refusal.close, refusal.reason)

    def _on_hello(self, message: wire.Hello) -> None:
        grant = hello_grant(self, message)
        self.user = self.rules.greeted(grant, by_token=message.token is not None)
        self._hello_scope.deadline = float("inf")
        self.sessions.welcome(self, message)

    def _on_refresh(self, message: wire.Refresh) -> None:
        refresh(self, message)

    def _on_join(self, message: wire.Join) -> None:
        self.rules.join(message)
        if message.view == wire.VIEW_COUNT:
            self.node.watch(self, message.room, message.ref)
        else:
            self.node.join(self, message.room, message.meta, message.ref)

    def _on_update(self, message: wire.Update) -> None:
        node = self.node
        room = message.room
        node.update(self, room, self.rules.update(message, node.current_meta(self, room)))
        self._pace()

    def _on_leave(self, message: wire.Leave) -> None:
        frame = self.rules.leave(message)
        self.node.leave(self, message.room)
        self.send(frame)

    def _on_broadcast(self, message: wire.Broadcast) -> None:
        self.rules.broadcast(message)
        self.node.broadcast(self, message.room, message.event, message.data, message.echo)

    def _on_send(self, message: wire.Send) -> None:
        messenger = self.node.messenger
        self.rules.direct(message, messenger is not None)
        if messenger is not None:
            messenger.send(self, message)

    def _on_read(self, message: wire.MarkRead) -> None:
        messenger = self.node.messenger
        self.rules.direct(message, messenger is not None)
        if messenger is not None:
            messenger.mark_read(self, message)

    def _on_fetch(self, message: wire.Fetch) -> None:
        messenger = self.node.messenger
        reply = self.rules.direct(message, messenger is not None)
        if reply is not None:
            self.send(reply)
        elif messenger is not None:
            messenger.fetch(self, message)

    def _on_ping(self, message: wire.Ping) -> None:
        self.send(pong(message.ref, message.t, self.node.wall_clock() * 1000.0))

    _handlers: dict[type, Any] = {
        wire.Hello: _on_hello,
        wire.Join: _on_join,
        wire.Update: _on_update,
        wire.Leave: _on_leave,
        wire.Broadcast: _on_broadcast,
        wire.Ping: _on_ping,
        wire.Send: _on_send,
        wire.MarkRead: _on_read,
        wire.Fetch: _on_fetch,
        wire.Refresh: _on_refresh,
    }

    # ------------------------------------------------------------------ writing

    def send(self, message: dict[str, Any], room: str | None = None) -> None:
        """Queue one message for this client only."""
        frame = message_frame(message)
        self.node.metrics.count_frames(1, len(frame))
        self.push(frame, room=room)

    def ping(self, now: float) -> None:
        """A WebSocket ping: the client's pong (or anything else) is its sign of life."""
        self.pinged_at = now
        self.push(PING_FRAME)

    def push(self, frame: bytes, room: str | None = None) -> None:
        """Send or queue an encoded frame. ``room`` marks frames a later resync may replace.

        Write-through: when nothing is queued and the writer is idle, the frame goes straight
        to the socket with one non-blocking write, so a tick's flush to every member costs a
        syscall each and no task switch. Whatever the kernel does not take is queued for the
        writer task (a partial frame is never replaced by a resync).
        """
        if self._close is not None:
            return
        if self._fd is not None and not self._outbox and not self._sending:
            try:
                written = os.write(self._fd, frame)
            except (BlockingIOError, InterruptedError):
                written = 0
            except OSError:
                written = 0  # the writer task will meet the same error and end the connection
            if written == len(frame):
                return
            if written:
                frame, room = frame[written:], None
        self._outbox.append((room, frame))
        self._queued_bytes += len(frame)
        if self._queued_bytes > self.limits.outbox_max_bytes:
            self._overflow()
        self._wakeup.set()

    def _overflow(self) -> None:
        """The client is not keeping up: replace queued room frames by one state per room."""
        now = self.node.clock()
        if self._stalled_since is None:
            self._stalled_since = now
        elif now - self._stalled_since > self.limits.slow_client_timeout_s:
            log.info("client %s closed: too slow to read its updates", self.peer)
            self.close(CloseCode.TRY_AGAIN_LATER, "too slow")
            return
        self.node.metrics.resyncs += 1
        stale = {room for room, _ in self._outbox if room is not None}
        kept = deque(item for item in self._outbox if item[0] is None)
        for room in stale:
            if room in self.rooms:
                kept.append((room, message_frame(self.node.room_snapshot(room))))
        self._outbox = kept
        self._queued_bytes = sum(len(frame) for _, frame in kept)
        if self._queued_bytes > 2 * self.limits.outbox_max_bytes:
            log.info("client %s closed: outbox full", self.peer)
            self.close(CloseCode.TRY_AGAIN_LATER, "too slow")

    async def _writer(self) -> None:
        while True:
            if not self._outbox:
                self._wakeup = trio.Event()
                await self._wakeup.wait()
                continue
            data = b"".join(frame for _, frame in self._outbox)
            self._outbox.clear()
            self._queued_bytes = 0
            self._sending = True
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._scope.cancel()
                return
            self._sending = False
            self._stalled_since = None
