"""The client wire protocol: JSON text frames over WebSocket, each an object with a ``type``.

This module is the only place that knows the wire shape. `decode_client_frame` turns one raw
frame into a typed, validated message or raises `ProtocolError`; the builders (`welcome`,
`state`, `diff`, ...) make the server's frames as plain dicts and `encode` serialises them.

Why it looks the way it does:

* It is on the hot path (cursor ``update`` frames arrive thousands of times per second), so
  decoding parses JSON exactly once with a pre-built decoder, dispatches on ``type`` through a
  dict and validates with direct type checks. No schema library, no per-field reflection.
* A frame comes from an untrusted client, and whatever the client stores (``meta``) or sends
  to others (``data``) is later encoded into frames for *other* clients. So decoding rejects
  everything that would make those later encodes fail or produce invalid JSON: NaN/Infinity
  and overflowing floats, unpaired surrogates (not encodable as UTF-8) and absurd nesting
  (which would blow the recursion limit in the encoder). One abusive client must never be
  able to break the frames another client receives.
* Whatever the input, the only exception `decode_client_frame` raises is `ProtocolError`, so
  the connection loop needs exactly one ``except`` to answer with an ``error`` frame.
* Unknown extra fields are ignored, so newer clients can talk to older servers.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any, ClassVar, Final, TypeAlias

import attrs
import orjson

from presenced.core.limits import Limits

__all__ = [
    "BAD_REQUEST",
    "DEFAULT_FETCH",
    "DISCONNECTED",
    "ERROR_CODES",
    "EXPIRED",
    "FAST",
    "FORBIDDEN",
    "HELLO_REQUIRED",
    "HOP_LIMIT",
    "INTERNAL",
    "MAX_CLIENT_LENGTH",
    "MAX_EVENT_LENGTH",
    "MAX_FETCH",
    "MAX_JSON_DEPTH",
    "MAX_MESSAGE_BYTES",
    "MAX_MESSAGE_ID",
    "MAX_RECIPIENTS",
    "MAX_REF",
    "MAX_REF_LENGTH",
    "MAX_RESUME_TOKEN",
    "NOT_JOINED",
    "NOT_ONLINE",
    "PROTOCOL_VERSION",
    "RATE_LIMITED",
    "REFUSED",
    "RELIABLE",
    "SERVER_BUSY",
    "SERVER_USER",
    "STORE_FULL",
    "TIMEOUT",
    "TOO_LARGE",
    "TOO_MANY_ROOMS",
    "UNAUTHORIZED",
    "UNAVAILABLE",
    "UNREACHABLE",
    "UNSUPPORTED_VERSION",
    "Broadcast",
    "ClientMessage",
    "Fetch",
    "Hello",
    "Join",
    "Leave",
    "MarkRead",
    "Ping",
    "ProtocolError",
    "Ref",
    "Send",
    "Update",
    "apply_meta_patch",
    "broadcast_event",
    "decode_client_frame",
    "delivered",
    "diff",
    "direct_message",
    "encode",
    "error",
    "error_from",
    "fetched",
    "left",
    "message_error",
    "meta_size",
    "parse_json",
    "parse_request",
    "pong",
    "presence_entry",
    "read_receipt",
    "state",
    "stored",
    "to_wire",
    "welcome",
]

#: The only protocol version this server speaks; sent in ``welcome`` and checked in ``hello``.
PROTOCOL_VERSION: Final = 1

# Stable error codes: clients switch on these, so they never change meaning.
BAD_REQUEST: Final = "bad_request"
UNSUPPORTED_VERSION: Final = "unsupported_version"
HELLO_REQUIRED: Final = "hello_required"
UNAUTHORIZED: Final = "unauthorized"
FORBIDDEN: Final = "forbidden"
TOO_LARGE: Final = "too_large"
RATE_LIMITED: Final = "rate_limited"
NOT_JOINED: Final = "not_joined"
TOO_MANY_ROOMS: Final = "too_many_rooms"
SERVER_BUSY: Final = "server_busy"
INTERNAL: Final = "internal"
NOT_ONLINE: Final = "not_online"
UNREACHABLE: Final = "unreachable"
HOP_LIMIT: Final = "hop_limit"
STORE_FULL: Final = "store_full"
EXPIRED: Final = "expired"
TIMEOUT: Final = "timeout"
UNAVAILABLE: Final = "unavailable"
DISCONNECTED: Final = "disconnected"
REFUSED: Final = "refused"

ERROR_CODES: Final = frozenset(
    {
        BAD_REQUEST,
        UNSUPPORTED_VERSION,
        HELLO_REQUIRED,
        UNAUTHORIZED,
        FORBIDDEN,
        TOO_LARGE,
        RATE_LIMITED,
        NOT_JOINED,
        TOO_MANY_ROOMS,
        SERVER_BUSY,
        INTERNAL,
        NOT_ONLINE,
        UNREACHABLE,
        HOP_LIMIT,
        STORE_FULL,
        EXPIRED,
        TIMEOUT,
        UNAVAILABLE,
        DISCONNECTED,
        REFUSED,
    }
)

#: The sender name of broadcasts and direct messages made by the server API. It holds a
#: control character, which no client's user name may (``hello`` refuses it, and so does
#: token verification), so it never collides with a user: in receipts, in the stores'
#: (origin, sender, recipient) order, in frames. Clients never see it: frames from the
#: server say ``"server": true`` instead of naming a sender.
SERVER_USER: Final = "\x7fserver"

#: Longest string ``ref``: a correlation id, not a place to store data.
MAX_REF_LENGTH: Final = 64
#: Largest integer ``ref`` magnitude: JavaScript's safe-integer range, so the echo is exact.
MAX_REF: Final = 2**53 - 1
#: Longest ``client`` identification string in ``hello``.
MAX_CLIENT_LENGTH: Final = 64
#: Longest resume token (``hello``'s ``resume``, ``welcome``'s ``resume``).
MAX_RESUME_TOKEN: Final = 128
#: Longest broadcast ``event`` name.
MAX_EVENT_LENGTH: Final = 64
#: Most recipients of one group message.
MAX_RECIPIENTS: Final = 32
#: Largest encoded ``data`` of a direct message, in bytes.
MAX_MESSAGE_BYTES: Final = 8192
#: Longest message id a client may name in ``read``.
MAX_MESSAGE_ID: Final = 128
#: Largest ``limit`` of a ``fetch``.
MAX_FETCH: Final = 500
DEFAULT_FETCH: Final = 100
FAST: Final = "fast"
RELIABLE: Final = "reliable"

#: Deepest nesting of objects/arrays in a frame (the frame object itself is level 1). Stored
#: meta is re-nested a few levels deeper in ``state``/``diff`` frames, so an unbounded depth
#: could make the server's own encoder hit the recursion limit on another client's frame.
MAX_JSON_DEPTH: Final = 32

#: A client correlation id, echoed in the reply to the frame that carried it.
Ref: TypeAlias = str | int | None


class ProtocolError(Exception):
    """A frame the server refuses, with a stable ``code`` to put in the ``error`` frame.

    ``ref`` is the offending frame's ``ref`` when it could be read, so the client can match
    the error to its request.
    """

    code: str
    message: str
    ref: Ref

    def __init__(self, code: str, message: str, ref: Ref = None) -> None:
        # All three in args so the exception pickles and reprs faithfully.
        super().__init__(code, message, ref)
        self.code = code
        self.message = message
        self.ref = ref

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


# --------------------------------------------------------------------------------------------
# Client -> server messages
# --------------------------------------------------------------------------------------------


@attrs.frozen
class Hello:
    """First frame of a session: authenticate with ``token`` or pick an anonymous ``user``."""

    TYPE: ClassVar[str] = "hello"

    ref: Ref
    token: str | None = None
    user: str | None = None
    client: str | None = None
    version: int = PROTOCOL_VERSION
    #: A resume token from an earlier ``welcome``: get that session back (see docs/protocol.md).
    resume: str | None = None


@attrs.frozen
class Join:
    """Enter ``room`` with initial presence ``meta``."""

    TYPE: ClassVar[str] = "join"

    ref: Ref
    room: str
    meta: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class Update:
    """Patch this session's meta in ``room``: keys are set, a key whose value is null is deleted."""

    TYPE: ClassVar[str] = "update"

    ref: Ref
    room: str
    meta: dict[str, Any]


@attrs.frozen
class Leave:
    """Leave ``room``."""

    TYPE: ClassVar[str] = "leave"

    ref: Ref
    room: str


@attrs.frozen
class Broadcast:
    """Send an ephemeral ``event`` with ``data`` to everyone in ``room`` (self too if ``echo``)."""

    TYPE: ClassVar[str] = "broadcast"

    ref: Ref
    room: str
    event: str
    data: Any = None
    echo: bool = False


@attrs.frozen
class Ping:
    """Liveness/latency probe; ``t`` is an opaque client timestamp echoed in the ``pong``."""

    TYPE: ClassVar[str] = "ping"

    ref: Ref
    t: float | int | None = None


@attrs.frozen
class Send:
    """A direct message to one user or (``group``) several; ``mode`` is fast or reliable."""

    TYPE: ClassVar[str] = "send"

    ref: Ref
    to: tuple[str, ...]
    data: Any
    mode: str = FAST
    group: bool = False


@attrs.frozen
class MarkRead:
    """The recipient read message ``id``: its sender gets a ``read`` receipt."""

    TYPE: ClassVar[str] = "read"

    ref: Ref
    id: str


@attrs.frozen
class Fetch:
    """Pull up to ``limit`` of this user's pending reliable messages from every region."""

    TYPE: ClassVar[str] = "fetch"

    ref: Ref
    limit: int = DEFAULT_FETCH


ClientMessage: TypeAlias = (
    Hello | Join | Update | Leave | Broadcast | Ping | Send | MarkRead | Fetch
)


# --------------------------------------------------------------------------------------------
# Meta helpers
# --------------------------------------------------------------------------------------------

# One pre-built encoder: ``json.dumps`` with keyword arguments builds a new encoder per call.
# ``encode`` is the single serialisation the size limits are defined against.
_ENCODER: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def encode(msg: dict[str, Any]) -> str:
    """Serialise a server frame: compact, non-ASCII kept as is (smaller on the wire)."""
    return _ENCODER.encode(msg)


def encode_frame(msg: dict[str, Any]) -> bytes:
    """A server frame as UTF-8 JSON bytes, for the wire: :func:`encode`'s JSON up to number
    formatting (``1e16`` for ``1e+16``), made by orjson, in C: a busy tick's diff of 15
    cursors takes 3 µs instead of the standard library's 50. What orjson refuses (integers
    over 64 bits, which clients may send) goes through the standard encoder."""
    try:
        return orjson.dumps(msg)
    except orjson.JSONEncodeError:
        return _ENCODER.encode(msg).encode("utf-8")


def meta_size(meta: dict[str, Any]) -> int:
    """Size of ``meta`` in UTF-8 bytes of its compact JSON encoding: what ``max_meta_bytes`` caps.

    Defined on the canonical encoding rather than the client's bytes, so the limit does not
    depend on how the client formatted its JSON, and the server can check merged meta too.
    Raises ``UnicodeEncodeError`` for strings with unpaired surrogates (never in decoded meta).
    It is the size of the frame encoding (:func:`encode_frame`: the busy path, one per
    update), which is never larger than :func:`encode`'s (``1e16`` for ``1e+16``).
    """
    return len(encode_frame(meta))


def apply_meta_patch(meta: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """Shallow-merge ``patch`` into a copy of ``meta``: keys are set, a null value deletes the key.

    Returns a new dict, because presence state is shared with whatever already holds the old
    meta (queued diffs, snapshots) and must not change under them.
    """
    merged = dict(meta)
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    return merged


# --------------------------------------------------------------------------------------------
# Decode
# --------------------------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    """``parse_constant`` hook: NaN/Infinity are not JSON and would poison re-encoded frames."""
    raise ProtocolError(BAD_REQUEST, f"frame contains {name}, which is not valid JSON")


def _parse_finite_float(literal: str) -> float:
    """``parse_float`` hook: a literal like ``1e999`` parses to inf; refuse it like Infinity."""
    value = float(literal)
    if not math.isfinite(value):
        raise ProtocolError(BAD_REQUEST, "frame contains a number too large for a double")
    return value


# Pre-built for the same reason as _ENCODER; strict=True (the default) also rejects raw
# control characters inside strings, as JSON requires.
_DECODE: Final = json.JSONDecoder(
    parse_float=_parse_finite_float, parse_constant=_reject_constant
).decode

# Characters never allowed in names: category Cc (C0, DEL, C1), plus unpaired surrogates, which
# only survive JSON decoding when unpaired (a valid pair becomes one astral character) and
# cannot be encoded as UTF-8.
_BAD_NAME_CHAR: Final = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_SURROGATE: Final = re.compile("[\ud800-\udfff]")


def _bad(message: str, ref: Ref) -> ProtocolError:
    return ProtocolError(BAD_REQUEST, message, ref)


def _too_deep(value: Any, limit: int) -> bool:
    """Whether ``value`` nests objects/arrays deeper than ``limit`` (iterative: cannot recurse)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        kind = type(item)
        if kind is dict:
            children = item.values()
        elif kind is list:
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def _name(value: Any, field: str, max_length: int, ref: Ref) -> str:
    """Validate a required identifier-like string (room, user, event)."""
    if type(value) is not str:
        if value is None:
            raise _bad(f"'{field}' is required", ref)
        raise _bad(f"'{field}' must be a string", ref)
    if not 0 < len(value) <= max_length:
        raise _bad(f"'{field}' must be 1 to {max_length} characters long", ref)
    # isprintable() is a fast C scan that is True for nearly every real name and implies no
    # Cc/Cs characters; only names it flags (e.g. with a no-break space) pay for the regex.
    if not value.isprintable() and _BAD_NAME_CHAR.search(value) is not None:
        raise _bad(f"'{field}' must not contain control characters", ref)
    return value


def _meta(value: Any, field: str, limits: Limits, ref: Ref, careful: bool) -> dict[str, Any]:
    """Validate a meta object (full meta or patch) and, if ``careful``, its encoded size."""
    if type(value) is not dict:
        if value is None:
            raise _bad(f"'{field}' is required", ref)
        raise _bad(f"'{field}' must be a JSON object", ref)
    if not careful:
        return value
    try:
        size = meta_size(value)
    except UnicodeEncodeError:
        raise _bad(f"'{field}' contains an unpaired surrogate", ref) from None
    except (ValueError, RecursionError):  # pragma: no cover - excluded by earlier checks
        raise _bad(f"'{field}' cannot be encoded", ref) from None
    if size > limits.max_meta_bytes:
        raise ProtocolError(
            TOO_LARGE,
            f"'{field}' is {size} bytes, over the limit of {limits.max_meta_bytes}",
            ref,
        )
    return value


def _check_relayable(value: Any, field: str, ref: Ref) -> None:
    """Make sure an arbitrary JSON value can be re-encoded as UTF-8 for other clients."""
    kind = type(value)
    if kind is str:
        if _SURROGATE.search(value) is not None:
            raise _bad(f"'{field}' contains an unpaired surrogate", ref)
    elif kind is dict or kind is list:
        try:
            _ENCODER.encode(value).encode("utf-8")
        except UnicodeEncodeError:
            raise _bad(f"'{field}' contains an unpaired surrogate", ref) from None
        except (ValueError, RecursionError):  # pragma: no cover - excluded by earlier checks
            raise _bad(f"'{field}' cannot be encoded", ref) from None


def _parse_hello(obj: dict[str, Any], ref: Ref, limits: Limits, careful: bool) -> Hello:
    token = obj.get("token")
    if token is not None and (type(token) is not str or not token or not token.isascii()):
        # A JWT's compact form is always ASCII; anything else cannot be a token.
        raise _bad("'token' must be a non-empty ASCII string", ref)
    user = obj.get("user")
    if user is not None:
        _name(user, "user", limits.max_user_id, ref)
    client = obj.get("client")
    if client is not None:
        if type(client) is not str:
            raise _bad("'client' must be a string", ref)
        if len(client) > MAX_CLIENT_LENGTH:
            raise _bad(f"'client' must be at most {MAX_CLIENT_LENGTH} characters long", ref)
        if _BAD_NAME_CHAR.search(client) is not None:
            # It ends up in logs; control characters there are a log-injection vector.
            raise _bad("'client' must not contain control characters", ref)
    version = obj.get("v")
    if version is None:
        version = PROTOCOL_VERSION
    elif type(version) is not int:
        raise _bad("'v' must be an integer", ref)
    elif version != PROTOCOL_VERSION:
        raise ProtocolError(
            UNSUPPORTED_VERSION,
            f"'v' must be {PROTOCOL_VERSION}, the only protocol version this server speaks",
            ref,
        )
    resume = obj.get("resume")
    if resume is not None and (
        type(resume) is not str
        or not 0 < len(resume) <= MAX_RESUME_TOKEN
        or not resume.isascii()
        or not resume.isprintable()
    ):
        raise _bad(
            f"'resume' must be a printable ASCII string of 1 to {MAX_RESUME_TOKEN} characters",
            ref,
        )
    return Hello(ref, token, user, client, version, resume)


def _parse_join(obj: dict[str, Any], ref: Ref, limits: Limits, careful: bool) -> Join:
    room = _name(obj.get("room"), "room", limits.max_room_name, ref)
    meta = obj.get("meta")
    if meta is None:
        return Join(ref, room, {})
    return Join(ref, room, _meta(meta, "meta", limits, ref, careful))


def _parse_update(obj: dict[str, Any], ref: Ref, limits: Limits, careful: bool) -> Update:
    room = _name(obj.get("room"), "room", limits.max_room_name, ref)
    return Update(ref, room, _meta(obj.get("meta"), "meta", limits, ref, careful))


def _parse_leave(obj: dict[str, Any], ref: Ref, limits: Limits, careful: bool) -> Leave:
    return Leave(ref, _name(obj.get("room"), "room", limits.max_room_name, ref))


def _parse_broadcast(obj: dict[str, Any], ref: Ref, limits: Limits, careful: bool) -> Broadcast:
    room = _name(obj.get("room"), "room", limits.max_room_name, ref)
    event = _name(obj.get("event"), "event", MAX_EVENT_LENGTH, ref)
    data = obj.get("data")
    if careful:
        _check_relayable(data, "data", ref)
    echo = obj.get("echo")
    if echo is None:
        echo = False
    elif type(echo) is not bool:
        raise _bad("'echo' must be a boolean", ref)
    return Broadcast(ref, room, event, data, echo)


def _parse_ping(obj: dict[str, Any], ref: Ref, limits: Limits, careful: bool) -> Ping:
    t = obj.get("t")
    # type() rather than isinstance(): bool is an int subclass and is not a timestamp.
    if t is not None and type(t) is not float and type(t) is not int:
        raise _bad("'t' must be a number", ref)
    return Ping(ref, t)


def _parse_send(obj: dict[str, Any], ref: Ref, limits: Limits, careful: bool) -> Send:
    to = obj.get("to")
    group = type(to) is list
    recipients: list[Any] = to if type(to) is list else [to]
    if group and not 0 < len(recipients) <= MAX_RECIPIENTS:
        raise _bad(f"'to' must name 1 to {MAX_RECIPIENTS} users", ref)
    names = tuple(_name(user, "to", limits.max_user_id, ref) for user in recipients)
    if len(set(names)) != len(names):
        raise _bad("'to' names a user twice", ref)
    mode = obj.get("mode")
    if mode is None:
        mode = FAST
    elif mode != FAST and mode != RELIABLE:
        raise _bad("'mode' must be 'fast' or 'reliable'", ref)
    data = obj.get("data")
    try:
        size = len(_ENCODER.encode(data).encode("utf-8"))
    except UnicodeEncodeError:
        raise _bad("'data' contains an unpaired surrogate", ref) from None
    except (ValueError, RecursionError):  # pragma: no cover - excluded by earlier checks
        raise _bad("'data' cannot be encoded", ref) from None
    if size > MAX_MESSAGE_BYTES:
        raise ProtocolError(
            TOO_LARGE, f"'data' is {size} bytes, over the limit of {MAX_MESSAGE_BYTES}", ref
        )
    return Send(ref, names, data, mode, group)


def _parse_read(obj: dict[str, Any], ref: Ref, limits: Limits, careful: bool) -> MarkRead:
    return MarkRead(ref, _name(obj.get("id"), "id", MAX_MESSAGE_ID, ref))


def _parse_fetch(obj: dict[str, Any], ref: Ref, limits: Limits, careful: bool) -> Fetch:
    limit = obj.get("limit")
    if limit is None:
        return Fetch(ref)
    if type(limit) is not int or not 0 < limit <= MAX_FETCH:
        raise _bad(f"'limit' must be an integer from 1 to {MAX_FETCH}", ref)
    return Fetch(ref, limit)


_Parser: TypeAlias = Callable[[dict[str, Any], Ref, Limits, bool], ClientMessage]
_PARSERS: Final[dict[str, _Parser]] = {
    Update.TYPE: _parse_update,
    Ping.TYPE: _parse_ping,
    Broadcast.TYPE: _parse_broadcast,
    Join.TYPE: _parse_join,
    Leave.TYPE: _parse_leave,
    Hello.TYPE: _parse_hello,
    Send.TYPE: _parse_send,
    MarkRead.TYPE: _parse_read,
    Fetch.TYPE: _parse_fetch,
}


#: Upper bound on how much compact re-encoding can grow any JSON value relative to its source
#: text. Strings never grow (escapes only shrink or stay), whitespace vanishes, ints keep their
#: digits; only float literals grow, at worst 4.5x ("1e15" -> "1000000000000000.0").
_MAX_REENCODE_GROWTH: Final = 5


def _too_large_frame(size: int, limits: Limits) -> ProtocolError:
    return ProtocolError(
        TOO_LARGE, f"frame is {size} bytes, over the limit of {limits.max_frame_bytes}"
    )


def decode_client_frame(data: str | bytes, limits: Limits) -> ClientMessage:
    """Parse and validate one client frame (text, or binary holding UTF-8 JSON).

    Raises `ProtocolError` and nothing else, whatever ``data`` is; the error carries the
    frame's ``ref`` whenever the frame was an object with a valid ``ref``.
    """
    max_bytes = limits.max_frame_bytes
    if isinstance(data, str):
        size = len(data)
        if size > max_bytes:  # every character is at least one byte
            raise _too_large_frame(size, limits)
        if not data.isascii():  # O(1) in CPython; for ASCII, size is already in bytes
            # A surrogate character cannot come from a UTF-8 text frame; refusing it here
            # means later the only possible source of one is a JSON \u escape.
            if _SURROGATE.search(data) is not None:
                raise _bad("frame is not valid UTF-8 text", None)
            # A character is at most 4 bytes: only encode when the limit could be exceeded.
            if size * 4 > max_bytes:
                size = len(data.encode("utf-8"))
                if size > max_bytes:
                    raise _too_large_frame(size, limits)
            else:
                size *= 4  # from here on, size is an upper bound in bytes
        text = data
    elif isinstance(data, bytes | bytearray):
        size = len(data)
        if size > max_bytes:
            raise _too_large_frame(size, limits)
        try:
            # Explicitly UTF-8: json.loads(bytes) would also guess UTF-16/32.
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise _bad("binary frame is not valid UTF-8", None) from None
    else:
        raise _bad("frame must be text or bytes", None)

    try:
        obj = _DECODE(text)
    except (ValueError, RecursionError):
        # ValueError covers JSONDecodeError and ints over Python's digit limit; RecursionError
        # absurdly deep nesting.
        raise _bad("frame is not valid JSON", None) from None
    if type(obj) is not dict:
        raise _bad("frame must be a JSON object", None)

    ref = obj.get("ref")
    if ref is not None:
        kind = type(ref)
        if kind is str:
            if len(ref) > MAX_REF_LENGTH or _SURROGATE.search(ref) is not None:
                raise _bad(f"'ref' must be a string of at most {MAX_REF_LENGTH} characters", None)
        elif kind is not int or not -MAX_REF <= ref <= MAX_REF:
            raise _bad("'ref' must be a string or an integer within 53 bits", None)

    # Counting brackets is a cheap C-speed upper bound on depth (brackets inside strings
    # count too), so the exact walk only runs for frames that could be too deep.
    if text.count("{") + text.count("[") > MAX_JSON_DEPTH and _too_deep(obj, MAX_JSON_DEPTH):
        raise _bad(f"frame is nested more than {MAX_JSON_DEPTH} levels deep", ref)

    kind_name = obj.get("type")
    if type(kind_name) is not str:
        if kind_name is None:
            raise _bad("'type' is required", ref)
        raise _bad("'type' must be a string", ref)
    parser = _PARSERS.get(kind_name)
    if parser is None:
        raise _bad("'type' is not a known message type", ref)
    # Encoding meta (to measure it) or data (to prove it encodes) costs as much as parsing
    # the frame, so skip it when it cannot fail: unpaired surrogates can only come from a
    # \u escape, and re-encoding grows a frame at most _MAX_REENCODE_GROWTH times.
    careful = "\\u" in text or size * _MAX_REENCODE_GROWTH > limits.max_meta_bytes
    return parser(obj, ref, limits, careful)


def parse_json(text: str) -> Any:
    """Decode JSON text as client frames are decoded (no NaN, infinities or absurd depth);
    :class:`ProtocolError` if it is not. The server API reads request bodies with it."""
    try:
        value = _DECODE(text)
    except (ValueError, RecursionError):
        raise _bad("not valid JSON", None) from None
    if (text.count("{") + text.count("[") > MAX_JSON_DEPTH) and _too_deep(value, MAX_JSON_DEPTH):
        raise _bad(f"nested more than {MAX_JSON_DEPTH} levels deep", None)
    return value


def parse_request(kind: str, obj: dict[str, Any], limits: Limits) -> ClientMessage:
    """Validate ``obj`` as the fields of a client request of type ``kind`` (``send``,
    ``broadcast``...): the server API holds its requests to the same rules."""
    return _PARSERS[kind](obj, None, limits, True)


def to_wire(msg: ClientMessage) -> dict[str, Any]:
    """The frame object a client would send for ``msg`` (for test clients and tools).

    Inverse of `decode_client_frame` up to defaults: optional fields equal to their default
    are omitted, as a minimal client would.
    """
    out: dict[str, Any] = {"type": msg.TYPE}
    if msg.ref is not None:
        out["ref"] = msg.ref
    if isinstance(msg, Hello):
        if msg.token is not None:
            out["token"] = msg.token
        if msg.user is not None:
            out["user"] = msg.user
        if msg.client is not None:
            out["client"] = msg.client
        out["v"] = msg.version
    elif isinstance(msg, Join | Update):
        out["room"] = msg.room
        out["meta"] = msg.meta
    elif isinstance(msg, Leave):
        out["room"] = msg.room
    elif isinstance(msg, Broadcast):
        out["room"] = msg.room
        out["event"] = msg.event
        out["data"] = msg.data
        if msg.echo:
            out["echo"] = True
    elif isinstance(msg, Send):
        out["to"] = list(msg.to) if msg.group else msg.to[0]
        out["data"] = msg.data
        if msg.mode != FAST:
            out["mode"] = msg.mode
    elif isinstance(msg, MarkRead):
        out["id"] = msg.id
    elif isinstance(msg, Fetch):
        if msg.limit != DEFAULT_FETCH:
            out["limit"] = msg.limit
    elif msg.t is not None:
        out["t"] = msg.t
    return out


# --------------------------------------------------------------------------------------------
# Server -> client frames
# --------------------------------------------------------------------------------------------
# Builders return plain dicts so the server can encode once per frame and fan the same string
# out to every recipient. A ``ref`` key is present only when the client sent one.


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
) -> dict[str, Any]:
    """Reply to ``hello``: who the client is and the limits it should respect.

    ``resume`` is the token that gets this session back after a drop (sent again in a later
    ``hello``), ``resumed`` whether this hello got an earlier session back, and
    ``resume_grace_ms`` how long a dropped session waits for its client to come back.
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
