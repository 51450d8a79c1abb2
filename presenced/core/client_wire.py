"""The client wire protocol: JSON text frames over WebSocket, each an object with a ``type``.

This module holds its vocabulary: the protocol version, the stable error codes, the limits
every frame obeys, the typed client messages, :class:`ProtocolError`, and the one JSON
encoding the size limits are defined against. Decoding and validating what a client sends is
:mod:`presenced.core.client_decode`; the server's frames are built by
:mod:`presenced.core.client_frames`. docs/protocol.md describes the same protocol in prose.

Unknown extra fields are ignored, so newer clients can talk to older servers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, ClassVar, Final, TypeAlias

import attrs
import orjson

#: The subprotocol a client may offer in its upgrade request to pin the protocol version.
SUBPROTOCOL: Final = "presenced.v1"
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
TOKEN_EXPIRED: Final = "token_expired"

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
        TOKEN_EXPIRED,
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


#: A join's views: be a presence and see the members (the default), or only watch the
#: room's counts (occupancy: not a presence, see :mod:`presenced.core.occupancy`).
VIEW_MEMBERS: Final = "members"
VIEW_COUNT: Final = "count"
VIEWS: Final = (VIEW_MEMBERS, VIEW_COUNT)


@attrs.frozen
class Refresh:
    """A fresh token for the session, sent before the current one expires (same user)."""

    TYPE: ClassVar[str] = "refresh"

    ref: Ref
    token: str


@attrs.frozen
class Join:
    """Enter ``room`` with initial presence ``meta`` (``view`` ``count``: watch its counts)."""

    TYPE: ClassVar[str] = "join"

    ref: Ref
    room: str
    meta: dict[str, Any] = attrs.field(factory=dict)
    view: str = VIEW_MEMBERS


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
    Hello | Join | Update | Leave | Broadcast | Ping | Send | MarkRead | Fetch | Refresh
)


# --------------------------------------------------------------------------------------------
# Meta helpers
# --------------------------------------------------------------------------------------------

# One pre-built encoder: ``json.dumps`` with keyword arguments builds a new encoder per call.
# ``encode`` is the single serialisation the size limits are defined against.
_ENCODER: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def encode(msg: Any) -> str:
    """Serialise a server frame (or any JSON value): compact, non-ASCII kept as is
    (smaller on the wire)."""
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


def apply_meta_patch(meta: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
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
    elif isinstance(msg, Refresh):
        out["token"] = msg.token
    elif isinstance(msg, Join) and msg.view != VIEW_MEMBERS:
        out["room"] = msg.room
        out["view"] = msg.view
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
