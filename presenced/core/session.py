"""The rules of one client session, given an already verified grant: what a client may do,
decided from what it sent, with the answers as data.

The connection (:mod:`presenced.server.clients`) reads frames, verifies tokens (the secret
and the clock are the shell's), decodes each message and asks :class:`SessionRules` about
it; it then carries out the answer. The answers are:

* a return value: what to ask the node to do (the meta an ``update`` writes, the ``left``
  frame a ``leave`` sends, the rooms a resumed session may keep);
* :class:`~presenced.core.client_wire.ProtocolError`, raised: answer with an ``error`` frame,
  the connection stays;
* :class:`Refusal` (a ProtocolError), raised or returned: answer with its error when it says
  so, then close the connection with its :class:`~presenced.core.ws_frames.CloseCode`.

A cursor ``update`` is the hot path (thousands a second): it costs one call here, and the
merged meta it returns is the one dict the node stores anyway.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any, Protocol

from presenced.core.client_frames import fetched, left, refreshed
from presenced.core.client_wire import (
    BAD_REQUEST,
    FORBIDDEN,
    HELLO_REQUIRED,
    INTERNAL,
    NOT_JOINED,
    RATE_LIMITED,
    TOKEN_EXPIRED,
    TOO_LARGE,
    TOO_MANY_ROOMS,
    UNAUTHORIZED,
    VIEW_COUNT,
    Broadcast,
    Fetch,
    Hello,
    Join,
    Leave,
    MarkRead,
    ProtocolError,
    Ref,
    Refresh,
    Send,
    Update,
    apply_meta_patch,
    meta_size,
)
from presenced.core.limits import Limits
from presenced.core.ratelimit import FloodLimit, Verdict
from presenced.core.ws_frames import CloseCode

Meta = dict[str, Any]
#: A meta as the presence state holds it (read-only here).
StoredMeta = Mapping[str, Any]

#: A rate-limited client is told so at most once per this many seconds (the rest of its
#: excess is dropped silently: an error per dropped frame would feed the flood).
RATE_ERROR_INTERVAL_S = 1.0


class Grant(Protocol):
    """What a verified token (or an anonymous hello) allows: see :class:`presenced.auth.Grant`."""

    @property
    def user(self) -> str: ...

    #: Unix time the grant's token stops being valid (None: never).
    @property
    def expires_at(self) -> float | None: ...

    #: Whether it may send direct messages.
    @property
    def may_send(self) -> bool: ...

    def may_join(self, room: str) -> bool: ...

    def may_broadcast(self, room: str) -> bool: ...


class HelloRoute(enum.Enum):
    """How the shell gets the grant of a ``hello``: verify its token, or grant an anonymous
    user (the one it names, the one its resume token names, or a fresh name)."""

    TOKEN = "token"
    ANONYMOUS = "anonymous"


class Refusal(ProtocolError):
    """An answer that ends the connection (or drops a message): the ``error`` to send first
    unless ``tell`` is False, then a close with ``close`` (None: the connection stays) and
    ``reason``."""

    close: CloseCode | None
    reason: str
    tell: bool

    def __init__(
        self,
        code: str,
        message: str,
        ref: Ref,
        close: CloseCode | None,
        reason: str = "",
        *,
        tell: bool = True,
    ) -> None:
        super().__init__(code, message, ref)
        self.close = close
        self.reason = reason
        self.tell = tell


def unauthorized(ref: Ref, why: str) -> Refusal:
    """A hello whose token is refused (or that brings none where one is needed)."""
    return Refusal(UNAUTHORIZED, why, ref, CloseCode.POLICY, "unauthorized")


_RATE_MESSAGE = "too many messages; slow down"
_FLOOD_REASON = "message rate limit exceeded"
# The four answers to a rate-limited frame, built once (returned, never raised).
_DROP = Refusal(RATE_LIMITED, _RATE_MESSAGE, None, None, tell=False)
_DROP_AND_TELL = Refusal(RATE_LIMITED, _RATE_MESSAGE, None, None)
_FLOOD = Refusal(RATE_LIMITED, _RATE_MESSAGE, None, CloseCode.POLICY, _FLOOD_REASON, tell=False)
_FLOOD_AND_TELL = Refusal(RATE_LIMITED, _RATE_MESSAGE, None, CloseCode.POLICY, _FLOOD_REASON)


class SessionRules:
    """One client session's rooms, grant and rate limit, and the rules for its requests.

    ``rooms`` is the session's rooms (a dict used as an ordered set); the node reads it
    through the connection, and only these rules and the node's own bookkeeping of a
    connection that ends change it.
    """

    __slots__ = (
        "_flood",
        "_rate_error_at",
        "by_token",
        "expires_at",
        "grant",
        "limits",
        "rooms",
        "user",
        "watching",
    )

    def __init__(self, limits: Limits, now: float) -> None:
        self.limits = limits
        self.grant: Grant | None = None
        self.user = ""
        #: Whether the session's grant came from a token (it may then ``refresh`` it), and
        #: the Unix time that token expires (None: never). Read by the liveness sweep.
        self.by_token = False
        self.expires_at: float | None = None
        self.rooms: dict[str, None] = {}
        #: Rooms it watches the counts of (a count-only join; never also in ``rooms``).
        self.watching: dict[str, None] = {}
        self._flood = FloodLimit(limits.max_messages_per_second, limits.message_burst, now)
        self._rate_error_at = float("-inf")

    # ------------------------------------------------------------------ admission

    def admit(self, now: float) -> Refusal | None:
        """Whether one more message or control frame arriving at ``now`` is served (None)
        or dropped: see :class:`~presenced.core.ratelimit.FloodLimit` (a client far over
        the rate for long is closed with 1008)."""
        verdict = self._flood.take(now)
        if verdict is Verdict.SERVE:
            return None
        tell = now - self._rate_error_at >= RATE_ERROR_INTERVAL_S
        if tell:
            self._rate_error_at = now
        if verdict is Verdict.CLOSE:
            return _FLOOD_AND_TELL if tell else _FLOOD
        return _DROP_AND_TELL if tell else _DROP

    def check_greeted(self, message: Any) -> None:
        """Every message but ``hello`` needs a session: before one, the connection closes."""
        if self.grant is None and not isinstance(message, Hello):
            raise Refusal(
                HELLO_REQUIRED, "send hello first", message.ref, CloseCode.POLICY, "hello required"
            )

    # ------------------------------------------------------------------ hello

    def hello_route(
        self, hello: Hello, tokens_accepted: bool, anonymous_allowed: bool
    ) -> HelloRoute:
        """How this ``hello`` gets its grant; raises when it gets none."""
        if self.grant is not None:
            raise ProtocolError(BAD_REQUEST, "hello was already sent", hello.ref)
        if hello.token is not None:
            if not tokens_accepted:
                raise unauthorized(hello.ref, "this daemon does not accept tokens")
            return HelloRoute.TOKEN
        if anonymous_allowed:
            return HelloRoute.ANONYMOUS
        raise unauthorized(hello.ref, "a token is required")

    def greeted(self, grant: Grant, *, by_token: bool = False) -> str:
        """The hello's grant is verified: the session is ``grant.user``'s from now on."""
        self.grant = grant
        self.user = grant.user
        self.by_token = by_token
        self.expires_at = grant.expires_at
        return self.user

    # ------------------------------------------------------------------ token expiry

    def expires_in_ms(self, now: float) -> int | None:
        """How long the session's token is still valid at Unix time ``now`` (None: no
        expiry; 0 once expired): sent in ``welcome`` and ``refreshed``."""
        if self.expires_at is None:
            return None
        return max(0, round((self.expires_at - now) * 1000))

    def check_refresh(self, message: Refresh) -> None:
        """Whether this session may ``refresh``: only one greeted with a token (an anonymous
        session has no token to renew)."""
        if not self.by_token:
            raise ProtocolError(
                BAD_REQUEST, "this session was not opened with a token", message.ref
            )

    def refreshed(
        self, grant: Grant, message: Refresh, now: float
    ) -> tuple[dict[str, Any], list[str]]:
        """The ``refresh`` token is verified: the session runs on ``grant`` from now on.
        Returns the ``refreshed`` frame and the rooms the new grant no longer allows (the
        session leaves them). A token for another user is refused like a bad one."""
        if grant.user != self.user:
            raise self.refresh_refused(message, "the token is for another user", now)
        self.grant = grant
        self.expires_at = grant.expires_at
        dropped = [room for room in self.rooms if not grant.may_join(room)]
        for room in dropped:
            del self.rooms[room]
        return refreshed(message.ref, self.expires_in_ms(now)), dropped

    def refresh_refused(self, message: Refresh, why: str, now: float) -> Refusal:
        """A ``refresh`` whose token is refused: ``unauthorized``; the session keeps its
        current token while that one is valid, and is closed (4003) once it has expired."""
        if self.expires_at is not None and self.expires_at <= now:
            return Refusal(UNAUTHORIZED, why, message.ref, CloseCode.TOKEN_EXPIRED, "token expired")
        return Refusal(UNAUTHORIZED, why, message.ref, None)

    def expired(self, now: float, grace_s: float) -> Refusal | None:
        """At Unix time ``now``: whether the session's token expired more than ``grace_s``
        ago without a refresh (then ``token_expired`` and close 4003). The grace lets a
        refresh sent just before ``exp`` arrive late without the session being cut."""
        expires_at = self.expires_at
        if expires_at is None or now < expires_at + grace_s:
            return None
        return Refusal(
            TOKEN_EXPIRED,
            "the session's token expired; reconnect with a fresh one",
            None,
            CloseCode.TOKEN_EXPIRED,
            "token expired",
        )

    def resumed(self, rooms: list[str]) -> list[str]:
        """A resumed session was in ``rooms``: it keeps those its grant allows, up to the
        rooms limit. Returns the rooms it must leave (a new token with fewer rooms)."""
        grant = self.grant
        allowed = [room for room in rooms if grant is None or grant.may_join(room)]
        allowed = allowed[: self.limits.max_rooms_per_connection]
        self.rooms.clear()  # (in place: the connection's view of its rooms is this dict)
        self.rooms.update(dict.fromkeys(allowed))
        return [room for room in rooms if room not in self.rooms]

    # ------------------------------------------------------------------ rooms

    def join(self, message: Join) -> None:
        """``message.room`` is joined (the node sends its state and the others the join),
        or watched (``view`` ``count``); either replaces the other. Watched rooms count
        towards the rooms limit too: each costs a frame per tick."""
        room = message.room
        assert self.grant is not None
        if not self.grant.may_join(room):
            raise ProtocolError(FORBIDDEN, f"not allowed to join {room!r}", message.ref)
        limit = self.limits.max_rooms_per_connection
        held = room in self.rooms or room in self.watching
        if not held and len(self.rooms) + len(self.watching) >= limit:
            raise ProtocolError(
                TOO_MANY_ROOMS, f"at most {limit} rooms per connection", message.ref
            )
        if message.view == VIEW_COUNT:
            self.rooms.pop(room, None)
            self.watching[room] = None
        else:
            self.watching.pop(room, None)
            self.rooms[room] = None

    def update(self, message: Update, current: StoredMeta | None) -> Meta:
        """The session's new meta in ``message.room``, given its ``current`` one there
        (None: it has none)."""
        if current is None or message.room not in self.rooms:
            raise ProtocolError(NOT_JOINED, f"not in room {message.room!r}", message.ref)
        meta = apply_meta_patch(current, message.meta)
        if meta_size(meta) > self.limits.max_meta_bytes:
            raise ProtocolError(TOO_LARGE, "meta would be too large", message.ref)
        return meta

    def leave(self, message: Leave) -> dict[str, Any]:
        """``message.room`` is left (or no longer watched); returns the ``left`` frame that
        confirms it."""
        if message.room in self.watching:
            del self.watching[message.room]
        elif message.room in self.rooms:
            del self.rooms[message.room]
        else:
            raise ProtocolError(NOT_JOINED, f"not in room {message.room!r}", message.ref)
        return left(message.ref, message.room)

    def broadcast(self, message: Broadcast) -> None:
        """A broadcast goes only to a room the session is in, and whose capabilities in the
        grant include ``broadcast``."""
        if message.room not in self.rooms:
            raise ProtocolError(NOT_JOINED, f"not in room {message.room!r}", message.ref)
        assert self.grant is not None
        if not self.grant.may_broadcast(message.room):
            raise ProtocolError(
                FORBIDDEN, f"not allowed to broadcast in {message.room!r}", message.ref
            )

    # ------------------------------------------------------------------ direct messages

    def direct(self, message: Send | MarkRead | Fetch, enabled: bool) -> dict[str, Any] | None:
        """A direct-message request: None hands it to the messenger (when ``enabled``), a
        frame is the whole answer. Without messaging a ``send`` is an error, a ``read`` is
        ignored and a ``fetch`` finds nothing. A ``send`` needs a grant that may send."""
        if isinstance(message, Send) and self.grant is not None and not self.grant.may_send:
            raise ProtocolError(FORBIDDEN, "not allowed to send direct messages", message.ref)
        if enabled:
            return None
        if isinstance(message, Send):
            raise ProtocolError(INTERNAL, "direct messages are not enabled", message.ref)
        if isinstance(message, Fetch):
            return fetched(message.ref, 0, 0)
        return None
