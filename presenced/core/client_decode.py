"""Strict decoding of a client's frames: one raw frame in, a typed, validated message out.

:func:`decode_client_frame` turns one raw frame into a message of
:mod:`presenced.core.client_wire` or raises :class:`ProtocolError`.

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
* Whatever the input, the only exception :func:`decode_client_frame` raises is
  :class:`ProtocolError`, so the connection loop needs exactly one ``except`` to answer with
  an ``error`` frame.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any, Final, TypeAlias

from presenced.core.client_wire import (
    BAD_REQUEST,
    FAST,
    MAX_CLIENT_LENGTH,
    MAX_EVENT_LENGTH,
    MAX_FETCH,
    MAX_JSON_DEPTH,
    MAX_MESSAGE_BYTES,
    MAX_MESSAGE_ID,
    MAX_RECIPIENTS,
    MAX_REF,
    MAX_REF_LENGTH,
    MAX_RESUME_TOKEN,
    PROTOCOL_VERSION,
    RELIABLE,
    TOO_LARGE,
    UNSUPPORTED_VERSION,
    VIEW_COUNT,
    VIEW_MEMBERS,
    VIEWS,
    Broadcast,
    ClientMessage,
    Fetch,
    Hello,
    Join,
    Leave,
    MarkRead,
    Ping,
    ProtocolError,
    Ref,
    Refresh,
    Send,
    Update,
    encode,
    meta_size,
)
from presenced.core.limits import Limits


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
            encode(value).encode("utf-8")
        except UnicodeEncodeError:
            raise _bad(f"'{field}' contains an unpaired surrogate", ref) from None
        except (ValueError, RecursionError):  # pragma: no cover - excluded by earlier checks
            raise _bad(f"'{field}' cannot be encoded", ref) from None


def _parse_hello(obj: dict[str, Any], ref: Ref, limits: Limits, careful: bool) -> Hello:
    token = obj.get("token")
    if token is not None and (type(token) is not str or not token.isascii()):
        # A JWT's compact form is always ASCII; anything else cannot be a token. An empty
        # string is a token too, a bad one: the session rules refuse it (unauthorized).
        raise _bad("'token' must be an ASCII string", ref)
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


def _parse_refresh(obj: dict[str, Any], ref: Ref, limits: Limits, careful: bool) -> Refresh:
    token = obj.get("token")
    if type(token) is not str or not token.isascii():
        raise _bad("'token' must be an ASCII string", ref)
    return Refresh(ref, token)


def _parse_join(obj: dict[str, Any], ref: Ref, limits: Limits, careful: bool) -> Join:
    room = _name(obj.get("room"), "room", limits.max_room_name, ref)
    meta = obj.get("meta")
    view = obj.get("view")
    if view is not None and view != VIEW_MEMBERS:
        if view != VIEW_COUNT:
            raise _bad(f"'view' must be one of {', '.join(VIEWS)}", ref)
        if meta is not None:
            raise _bad("a count-only join takes no 'meta' (a watcher is not a presence)", ref)
        return Join(ref, room, {}, VIEW_COUNT)
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
        size = len(encode(data).encode("utf-8"))
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
    Refresh.TYPE: _parse_refresh,
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
