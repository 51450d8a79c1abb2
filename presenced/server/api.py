"""The server API: what a product's backend asks of presenced, over the HTTP side port.

Off unless the daemon has an API key (``--api-key-file``). Every request is ``POST
/api/v1/<call>`` with a JSON object body (at most 64 KiB) and the key as a bearer token
(``Authorization: Bearer KEY``, or ``X-API-Key: KEY``), compared in constant time. Answers
are JSON: the call's document with 200, or ``{"error": {"code", "message"}}`` with the
status of :mod:`presenced.core.api_wire`. docs/api.md has every call, with curl examples.

=================  ======================================================================
``publish``        a broadcast to a room, from the server, to every member in every region
``send``           a direct message from the server (fast or reliable); waits for what
                   became of it per recipient
``presence``       a room's sessions, metas and regions, mesh-wide
``occupancy``      a room's session and distinct-user counts, mesh-wide
``rooms``          every room with members, with its counts
``disconnect``     close a user's (or one session's) connections everywhere, optionally
                   refusing its hellos for a while
=================  ======================================================================

Every daemon holds the whole mesh's presence state, so reads are answered from this one's
copy (visible entries only: what every member is shown). Publish and disconnect reuse the
flooded peer paths of room broadcasts; ``send`` reuses the direct-message machine.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import trio

from presenced.core import api_wire
from presenced.core.answers import FAST_ANSWER_S
from presenced.core.api_wire import ApiError
from presenced.server.messaging.server_sender import ServerSender

if TYPE_CHECKING:
    from presenced.server.exporter import DaemonView

__all__ = ["Api"]

log = logging.getLogger(__name__)

#: Seconds a fast send waits past the fast-send bound (the machine answers ``timeout`` itself
#: at the bound; this only covers a late sweep).
_FAST_SLACK_S = 0.5


class Api:
    """The server API of one daemon: :meth:`answer` maps a request to (status, document,
    extra headers)."""

    def __init__(self, daemon: DaemonView, key: bytes | None) -> None:
        self.daemon = daemon
        self.key = key
        self._calls: dict[str, Callable[[dict[str, Any]], Any]] = {
            "publish": self.publish,
            "send": self.send,
            "presence": self.presence,
            "occupancy": self.occupancy,
            "rooms": self.rooms,
            "disconnect": self.disconnect,
        }

    async def answer(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes
    ) -> tuple[int, dict[str, Any], tuple[tuple[str, str], ...]]:
        """The response to a request under ``/api/``."""
        try:
            return 200, await self._answer(method, path, headers, body), ()
        except ApiError as exc:
            extra: tuple[tuple[str, str], ...] = ()
            if exc.status == 401:
                extra = (("WWW-Authenticate", 'Bearer realm="presenced"'),)
            elif exc.status == 405:
                extra = (("Allow", "POST"),)
            return exc.status, api_wire.error_document(exc.code, exc.message), extra

    async def _answer(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes
    ) -> dict[str, Any]:
        if self.key is None:
            raise ApiError(
                404, api_wire.NOT_FOUND, "the server API is off (start with --api-key-file)"
            )
        self._authorize(headers)
        call = self._calls.get(path.removeprefix(api_wire.API_PREFIX))
        if not path.startswith(api_wire.API_PREFIX) or call is None:
            raise ApiError(404, api_wire.NOT_FOUND, f"no API call {path!r}")
        if method != "POST":
            raise ApiError(405, api_wire.METHOD_NOT_ALLOWED, "API calls are POST requests")
        daemon = self.daemon
        if not daemon.running or daemon.stopping:
            raise ApiError(503, api_wire.UNAVAILABLE, "the daemon is starting or stopping")
        result = call(api_wire.parse_body(body))
        if isinstance(result, dict):
            return result
        document: dict[str, Any] = await result
        return document

    def _authorize(self, headers: Mapping[str, str]) -> None:
        assert self.key is not None
        given = headers.get("x-api-key")
        if given is None:
            scheme, _, token = headers.get("authorization", "").strip().partition(" ")
            given = token.strip() if scheme.lower() == "bearer" else None
        if not given:
            raise ApiError(401, api_wire.UNAUTHORIZED, "an API key is required (Bearer)")
        if not hmac.compare_digest(given.encode("latin-1", "replace"), self.key):
            raise ApiError(401, api_wire.UNAUTHORIZED, "wrong API key")

    # ------------------------------------------------------------------ calls

    def publish(self, body: dict[str, Any]) -> dict[str, Any]:
        node = self.daemon.node
        request = api_wire.parse_publish(body, node.config.limits)
        here = node.publish(request.room, request.event, request.data)
        node.metrics.api_publishes += 1
        return {"room": request.room, "event": request.event, "members_here": here}

    async def send(self, body: dict[str, Any]) -> dict[str, Any]:
        node = self.daemon.node
        request = api_wire.parse_send(body, node.config.limits)
        messenger = self.daemon.messenger
        if node.messenger is None:
            raise ApiError(503, api_wire.UNAVAILABLE, "direct messages are not enabled")
        sender = ServerSender()
        message = request.message
        node.metrics.api_sends += 1
        messenger.send_as_server(sender, message)
        # A reliable send waits for ``stored`` (one group commit), then up to ``wait_ms``.
        deadline = trio.current_time() + FAST_ANSWER_S + _FAST_SLACK_S
        stored_at: float | None = None
        try:
            while True:
                done, document = api_wire.send_outcome(message, sender.frames, final=False)
                if done:
                    return document
                if stored_at is None and any(f.get("type") == "stored" for f in sender.frames):
                    stored_at = trio.current_time()
                    deadline = min(deadline, stored_at + request.wait_ms / 1000)
                with trio.move_on_at(deadline) as waiting:
                    await sender.wait()
                if waiting.cancelled_caught:
                    break
            return api_wire.send_outcome(message, sender.frames, final=True)[1]
        finally:
            sender.close()

    def presence(self, body: dict[str, Any]) -> dict[str, Any]:
        node = self.daemon.node
        room = api_wire.parse_room(body, node.config.limits)
        return api_wire.presence_document(room, node.state.room_presences(room))

    def occupancy(self, body: dict[str, Any]) -> dict[str, Any]:
        node = self.daemon.node
        room = api_wire.parse_room(body, node.config.limits)
        return api_wire.occupancy_document(room, node.state.room_presences(room))

    def rooms(self, body: dict[str, Any]) -> dict[str, Any]:
        request = api_wire.parse_rooms(body)
        return api_wire.rooms_document(self.daemon.node.state.index.rooms, request)

    def disconnect(self, body: dict[str, Any]) -> dict[str, Any]:
        node = self.daemon.node
        request = api_wire.parse_disconnect(body, node.config.limits)
        closed = node.kick_everywhere(
            request.user, request.session, request.reason, request.refuse_s
        )
        node.metrics.api_disconnects += 1
        log.info(
            "server API: disconnect user %r%s (refuse %gs): %d connection(s) here",
            request.user,
            f" session {request.session!r}" if request.session else "",
            request.refuse_s,
            closed,
        )
        return {
            "user": request.user,
            "session": request.session or None,
            "closed_here": closed,
            "refuse_s": request.refuse_s,
        }
