"""The server's frames to a client: builders that return plain dicts, and the one encoding
of a dict into a WebSocket text frame.

Builders return plain dicts so the server can encode once per frame and fan the same bytes out
to every recipient (:func:`message_frame`). A ``ref`` key is present only when the client
sent one.
"""

from __future__ import annotations

from typing import Any

from presenced.core.client_wire import (
    ERROR_CODES,
    PROTOCOL_VERSION,
    SERVER_USER,
    ProtocolError,
    Ref,
    encode_frame,
)
from presenced.core.limits import Limits
from presenced.core.ws_frames import text_frame


def message_frame(message: dict[str, Any]) -> bytes:
    """One server message as a complete text frame: encoded once (by orjson, see
    :func:`~presenced.core.client_wire.encode_frame`) however many members it goes to."""
    return text_frame(encode_frame(message))


def _with_ref(kind: str, ref: Ref) -> dict[str, Any]:
    return {"type": kind} if ref is None else {"type": kind, "ref": ref}


def presence_entry(session: str, meta: dict[str, Any], region: str) -> dict[str, Any]:
    """One session's presence as it appears in ``state`` and ``diff`` lists."""
    return {"session": session, "meta": meta, "region": region}


def welcome(
    ref: Ref,
    session: str,
    user: str,
    region: str,
    node: str,
    tick_ms: int,
    limits: Limits,
    *,
    resume: str | None = None,
    resumed: bool = False,
    resume_grace_ms: int = 0,
    expires_in_ms: int | None = None,
) -> dict[str, Any]:
    """Reply to ``hello``: who the client is and the limits it should respect.

    ``resume`` is the token that gets this session back after a drop (sent again in a later
    ``hello``), ``resumed`` whether this hello got an earlier session back, and
    ``resume_grace_ms`` how long a dropped session waits for its client to come back.
    ``expires_in_ms``: how long the session's token is still valid (None: no expiry), so
    a client knows when to ``refresh`` without trusting its own clock.
    """
    out = _with_ref("welcome", ref)
    out["session"] = session
    out["user"] = user
    out["region"] = region
    out["node"] = node
    out["protocol"] = PROTOCOL_VERSION
    out["tick_ms"] = tick_ms
    out["limits"] = limits.public()
    if resume is not None:
        out["resume"] = resume
        out["resumed"] = resumed
        out["resume_grace_ms"] = resume_grace_ms
    if expires_in_ms is not None:
        out["expires_in_ms"] = expires_in_ms
    return out


def refreshed(ref: Ref, expires_in_ms: int | None) -> dict[str, Any]:
    """Reply to ``refresh``: the session runs on the new token from now on, valid for
    ``expires_in_ms`` more (absent: it does not expire)."""
    out = _with_ref("refreshed", ref)
    if expires_in_ms is not None:
        out["expires_in_ms"] = expires_in_ms
    return out


def state(ref: Ref, room: str, presences: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Full presence of ``room`` (reply to ``join``, or a resync): user -> presence entries."""
    out = _with_ref("state", ref)
    out["room"] = room
    out["presences"] = presences
    return out


def diff(
    room: str,
    joins: dict[str, list[dict[str, Any]]],
    leaves: dict[str, list[dict[str, Any]]],
    updates: dict[str, list[dict[str, Any]]],
) -> dict[str, Any]:
    """Changes to ``room`` since the last tick, each user -> presence entries."""
    return {"type": "diff", "room": room, "joins": joins, "leaves": leaves, "updates": updates}


def occupancy(ref: Ref, room: str, sessions: int, users: int) -> dict[str, Any]:
    """A watched room's counts (reply to a count-only ``join``, then when one changes):
    visible sessions and distinct users, every region's."""
    out = _with_ref("occupancy", ref)
    out["room"] = room
    out["sessions"] = sessions
    out["users"] = users
    return out


def left(ref: Ref, room: str) -> dict[str, Any]:
    """Acknowledge ``leave``."""
    out = _with_ref("left", ref)
    out["room"] = room
    return out


def broadcast_event(
    room: str,
    from_user: str,
    from_session: str,
    from_region: str,
    event: str,
    data: Any,
) -> dict[str, Any]:
    """A client's ``broadcast`` as delivered to the room, stamped with its sender (the
    server API's: ``{"server": true, "region": ...}``, no user or session)."""
    if from_user == SERVER_USER:
        return {
            "type": "broadcast",
            "room": room,
            "from": {"server": True, "region": from_region},
            "event": event,
            "data": data,
        }
    return {
        "type": "broadcast",
        "room": room,
        "from": {"user": from_user, "session": from_session, "region": from_region},
        "event": event,
        "data": data,
    }


def pong(ref: Ref, t: float | int | None, server_time_ms: float) -> dict[str, Any]:
    """Reply to ``ping``, echoing the client's ``t`` so it can measure round trips."""
    out = _with_ref("pong", ref)
    if t is not None:
        out["t"] = t
    out["server_time"] = server_time_ms
    return out


def error(code: str, message: str, ref: Ref = None) -> dict[str, Any]:
    """An ``error`` frame. ``code`` must be one of `ERROR_CODES` (clients switch on it)."""
    if code not in ERROR_CODES:
        raise ValueError(f"unknown error code {code!r}")
    out: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if ref is not None:
        out["ref"] = ref
    return out


def error_from(exc: ProtocolError) -> dict[str, Any]:
    """The ``error`` frame answering a rejected frame."""
    return error(exc.code, exc.message, exc.ref)


def stored(ref: Ref, message_id: str) -> dict[str, Any]:
    """A reliable message is in the durable store: the daemon is now responsible for it."""
    out = _with_ref("stored", ref)
    out["id"] = message_id
    return out


def delivered(ref: Ref, message_id: str, to: str, region: str) -> dict[str, Any]:
    """A recipient's daemon wrote the message to the recipient's socket(s)."""
    out = _with_ref("delivered", ref)
    out["id"] = message_id
    out["to"] = to
    out["region"] = region
    return out


def read_receipt(ref: Ref, message_id: str, by: str) -> dict[str, Any]:
    """The recipient ``by`` read the message."""
    out = _with_ref("read", ref)
    out["id"] = message_id
    out["by"] = by
    return out


def message_error(ref: Ref, message_id: str, to: str, code: str, message: str) -> dict[str, Any]:
    """A direct message could not reach recipient ``to``."""
    out = error(code, message, ref)
    out["id"] = message_id
    out["to"] = to
    return out


def direct_message(
    message_id: str,
    from_user: str,
    from_session: str,
    from_region: str,
    group: tuple[str, ...],
    data: Any,
    mode: str,
    sent_at_ms: int,
) -> dict[str, Any]:
    """A direct message as its recipient sees it (from the server API: ``"server": true``
    instead of ``from`` and ``session``)."""
    out: dict[str, Any] = {"type": "message", "id": message_id}
    if from_user == SERVER_USER:
        out["server"] = True
    else:
        out["from"] = from_user
        out["session"] = from_session
    out["region"] = from_region
    if group:
        out["to"] = list(group)
    out["data"] = data
    out["mode"] = mode
    out["sent_at"] = sent_at_ms
    return out


def fetched(
    ref: Ref,
    count: int,
    remaining: int,
    *,
    complete: bool = True,
    retry_after_ms: int | None = None,
) -> dict[str, Any]:
    """The end of a ``fetch``: how many messages it delivered, how many are still pending,
    and whether every daemon that could hold some answered (else: when to try again)."""
    out = _with_ref("fetched", ref)
    out["count"] = count
    out["remaining"] = remaining
    out["complete"] = complete
    if retry_after_ms is not None:
        out["retry_after_ms"] = retry_after_ms
    return out
