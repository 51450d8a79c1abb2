"""The server API's wire: request bodies in (strictly validated), JSON documents out.

Pure: the shell (:mod:`presenced.server.api`) reads the request, calls these, acts, and
writes what they build. Requests are held to the client protocol's own rules where they
overlap (room and user names, event names, direct-message data and recipients: through
:func:`presenced.core.protocol.parse_request`), so whatever the API accepts every daemon and
client accepts too. Unknown fields are refused, so a misspelt one is an error, not a silent
default. Every error is an :class:`ApiError` with an HTTP status and a stable code.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any, Final

import attrs

from presenced.core import protocol
from presenced.core.kicks import MAX_REASON, MAX_REFUSE_S
from presenced.core.limits import Limits

__all__ = [
    "API_PREFIX",
    "DEFAULT_ROOMS_LIMIT",
    "DEFAULT_WAIT_MS",
    "ERROR_CODES",
    "MAX_BODY_BYTES",
    "MAX_ROOMS_LIMIT",
    "MAX_WAIT_MS",
    "ApiError",
    "DisconnectRequest",
    "PublishRequest",
    "RoomsRequest",
    "SendRequest",
    "error_document",
    "occupancy_document",
    "parse_body",
    "parse_disconnect",
    "parse_publish",
    "parse_room",
    "parse_rooms",
    "parse_send",
    "presence_document",
    "rooms_document",
    "send_outcome",
]

API_PREFIX: Final = "/api/v1/"
#: Largest request body, in bytes (413 ``too_large`` over it).
MAX_BODY_BYTES: Final = 65_536
#: How long a reliable ``send`` waits after ``stored`` for its deliveries, by default and at
#: most (milliseconds). A fast one waits for every recipient's first answer (at most the
#: fast-send bound, 5 s).
DEFAULT_WAIT_MS: Final = 1000
MAX_WAIT_MS: Final = 5000
DEFAULT_ROOMS_LIMIT: Final = 1000
MAX_ROOMS_LIMIT: Final = 100_000
#: The event name of a publish that names none.
DEFAULT_EVENT: Final = "message"

# Stable error codes (with their HTTP status): backends switch on these.
BAD_REQUEST: Final = "bad_request"  # 400
UNAUTHORIZED: Final = "unauthorized"  # 401
NOT_FOUND: Final = "not_found"  # 404 (also every /api/ path while the API is off)
METHOD_NOT_ALLOWED: Final = "method_not_allowed"  # 405
TOO_LARGE: Final = "too_large"  # 413
UNAVAILABLE: Final = "unavailable"  # 503: the daemon is starting or stopping
INTERNAL: Final = "internal"  # 500
ERROR_CODES: Final = frozenset(
    {BAD_REQUEST, UNAUTHORIZED, NOT_FOUND, METHOD_NOT_ALLOWED, TOO_LARGE, UNAVAILABLE, INTERNAL}
)


class ApiError(Exception):
    """A refused request: its HTTP status, stable code and a message for people."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def error_document(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def _bad(message: str) -> ApiError:
    return ApiError(400, BAD_REQUEST, message)


# ---------------------------------------------------------------------------- requests


def parse_body(body: bytes) -> dict[str, Any]:
    """The request's JSON object (an empty body is ``{}``)."""
    if len(body) > MAX_BODY_BYTES:
        raise ApiError(413, TOO_LARGE, f"the body is over {MAX_BODY_BYTES} bytes")
    if not body.strip():
        return {}
    try:
        value = protocol.parse_json(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise _bad("the body is not UTF-8") from None
    except protocol.ProtocolError as exc:
        raise _bad(f"the body is {exc.message}") from None
    if type(value) is not dict:
        raise _bad("the body must be a JSON object")
    return value


def _fields(obj: dict[str, Any], allowed: tuple[str, ...]) -> None:
    for key in obj:
        if key not in allowed:
            raise _bad(f"unknown field {key!r} (known: {', '.join(allowed)})")


def _validated(kind: str, obj: dict[str, Any], limits: Limits) -> protocol.ClientMessage:
    try:
        return protocol.parse_request(kind, obj, limits)
    except protocol.ProtocolError as exc:
        if exc.code == protocol.TOO_LARGE:
            raise ApiError(413, TOO_LARGE, exc.message) from None
        raise _bad(exc.message) from None


@attrs.frozen
class PublishRequest:
    room: str
    event: str
    data: Any


def parse_publish(obj: dict[str, Any], limits: Limits) -> PublishRequest:
    """``{"room", "data", "event"?}``: a broadcast to the room (``event`` defaults to
    ``"message"``)."""
    _fields(obj, ("room", "event", "data"))
    if "data" not in obj:
        raise _bad("'data' is required")
    fields = {"room": obj.get("room"), "event": obj.get("event", DEFAULT_EVENT)}
    fields["data"] = obj["data"]
    message = _validated("broadcast", fields, limits)
    assert isinstance(message, protocol.Broadcast)
    return PublishRequest(message.room, message.event, message.data)


@attrs.frozen
class SendRequest:
    message: protocol.Send
    wait_ms: int


def parse_send(obj: dict[str, Any], limits: Limits) -> SendRequest:
    """``{"to", "data", "mode"?, "wait_ms"?}``: a direct message, as a client's ``send``."""
    _fields(obj, ("to", "data", "mode", "wait_ms"))
    if "data" not in obj:
        raise _bad("'data' is required")
    wait_ms = obj.get("wait_ms", DEFAULT_WAIT_MS)
    if type(wait_ms) is not int or not 0 <= wait_ms <= MAX_WAIT_MS:
        raise _bad(f"'wait_ms' must be an integer from 0 to {MAX_WAIT_MS}")
    fields: dict[str, Any] = {key: obj[key] for key in ("to", "data", "mode") if key in obj}
    message = _validated("send", fields, limits)
    assert isinstance(message, protocol.Send)
    return SendRequest(message, wait_ms)


def parse_room(obj: dict[str, Any], limits: Limits) -> str:
    """``{"room"}`` (presence, occupancy)."""
    _fields(obj, ("room",))
    message = _validated("leave", {"room": obj.get("room")}, limits)
    assert isinstance(message, protocol.Leave)
    return message.room


@attrs.frozen
class RoomsRequest:
    prefix: str
    limit: int


def parse_rooms(obj: dict[str, Any]) -> RoomsRequest:
    """``{"prefix"?, "limit"?}``: rooms whose name starts with ``prefix``, at most ``limit``."""
    _fields(obj, ("prefix", "limit"))
    prefix = obj.get("prefix", "")
    if type(prefix) is not str or len(prefix) > 256:
        raise _bad("'prefix' must be a string of at most 256 characters")
    limit = obj.get("limit", DEFAULT_ROOMS_LIMIT)
    if type(limit) is not int or not 1 <= limit <= MAX_ROOMS_LIMIT:
        raise _bad(f"'limit' must be an integer from 1 to {MAX_ROOMS_LIMIT}")
    return RoomsRequest(prefix, limit)


@attrs.frozen
class DisconnectRequest:
    user: str
    session: str
    reason: str
    refuse_s: float


def parse_disconnect(obj: dict[str, Any], limits: Limits) -> DisconnectRequest:
    """``{"user", "session"?, "reason"?, "refuse_s"?}``."""
    _fields(obj, ("user", "session", "reason", "refuse_s"))
    user = obj.get("user")
    message = _validated("send", {"to": user, "data": None}, limits)  # a user name's rules
    assert isinstance(message, protocol.Send)
    session = obj.get("session", "")
    if type(session) is not str or len(session) > 256:
        raise _bad("'session' must be a string of at most 256 characters")
    reason = obj.get("reason", "")
    if type(reason) is not str or len(reason) > MAX_REASON or not reason.isprintable():
        raise _bad(f"'reason' must be printable text of at most {MAX_REASON} characters")
    refuse_s = obj.get("refuse_s", 0)
    if type(refuse_s) not in (int, float) or not 0 <= refuse_s <= MAX_REFUSE_S:
        raise _bad(f"'refuse_s' must be a number of seconds from 0 to {MAX_REFUSE_S}")
    return DisconnectRequest(message.to[0], session, reason, float(refuse_s))


# ---------------------------------------------------------------------------- documents

Entry = tuple[str, str, Any, str]  # (user, session, meta, region)


def presence_document(room: str, entries: Iterable[Entry]) -> dict[str, Any]:
    """Who is in ``room``, mesh-wide: user -> sessions (``session``, ``meta``, ``region``),
    the shape of a client's ``state``, with the counts."""
    presences: dict[str, list[dict[str, Any]]] = {}
    regions: Counter[str] = Counter()
    for user, session, meta, region in entries:
        presences.setdefault(user, []).append(protocol.presence_entry(session, meta, region))
        regions[region] += 1
    return {
        "room": room,
        "presences": presences,
        "sessions": sum(regions.values()),
        "users": len(presences),
        "regions": dict(sorted(regions.items())),
    }


def occupancy_document(room: str, entries: Iterable[Entry]) -> dict[str, Any]:
    """How many sessions and distinct users are in ``room``, mesh-wide, and sessions per
    region."""
    users: set[str] = set()
    regions: Counter[str] = Counter()
    for user, _session, _meta, region in entries:
        users.add(user)
        regions[region] += 1
    return {
        "room": room,
        "sessions": sum(regions.values()),
        "users": len(users),
        "regions": dict(sorted(regions.items())),
    }


def rooms_document(
    rooms: Mapping[str, Mapping[tuple[str, str], Any]], request: RoomsRequest
) -> dict[str, Any]:
    """Rooms with at least one visible session (name order), each with its counts.
    ``rooms`` maps a room to its visible (user, session) keys."""
    names = sorted(name for name, keys in rooms.items() if keys and name.startswith(request.prefix))
    listed = [
        {
            "room": name,
            "sessions": len(rooms[name]),
            "users": len({user for user, _ in rooms[name]}),
        }
        for name in names[: request.limit]
    ]
    return {"rooms": listed, "count": len(names), "truncated": len(names) > request.limit}


# ---------------------------------------------------------------------------- send outcomes

DELIVERED: Final = "delivered"
STORED: Final = "stored"
TIMEOUT: Final = "timeout"


def send_outcome(
    message: protocol.Send, frames: Iterable[dict[str, Any]], *, final: bool
) -> tuple[bool, dict[str, Any]]:
    """What became of an API ``send`` from the frames the machine sent its sender:
    ``(done, document)``.

    Each recipient's ``status``: ``delivered`` (with the ``regions`` that confirmed),
    ``stored`` (reliable: held durably, delivered once the user is online), or the error code
    (``not_online``, ``unreachable``, ``hop_limit``, ``store_full``, ``internal``, and
    ``timeout`` when no answer came in time). A fast send is done once every recipient has an
    answer; a reliable one once it is refused or every recipient has a delivery. ``final``:
    the wait is over, so what has no answer yet is ``timeout`` (fast) or stays as it is.
    """
    reliable = message.mode == protocol.RELIABLE
    status: dict[str, str] = {}
    regions: dict[str, list[str]] = {}
    message_id: str | None = None
    stored = False
    for frame in frames:
        kind = frame.get("type")
        message_id = frame.get("id", message_id)
        if kind == "stored":
            stored = True
        elif kind == "delivered":
            to = frame["to"]
            status[to] = DELIVERED
            regions.setdefault(to, []).append(frame["region"])
        elif kind == "error":
            to = frame.get("to")
            for user in message.to if to is None else (to,):
                if status.get(user) != DELIVERED:
                    status[user] = frame["code"]
    if reliable and stored:
        for user in message.to:
            status.setdefault(user, STORED)
    if final:
        for user in message.to:
            status.setdefault(user, TIMEOUT)
    recipients: dict[str, dict[str, Any]] = {}
    for user in message.to:
        if user in status:
            entry: dict[str, Any] = {"status": status[user]}
            if user in regions:
                entry["regions"] = sorted(set(regions[user]))
            recipients[user] = entry
    if reliable:
        refused = any(s not in (STORED, DELIVERED) for s in status.values())
        done = refused or all(status.get(user) == DELIVERED for user in message.to)
    else:
        done = all(user in status for user in message.to)
    document = {"id": message_id, "mode": message.mode, "recipients": recipients}
    return done, document
