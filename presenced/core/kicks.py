"""Disconnects by the server: the peer message that carries one everywhere, the close codes a
client sees, and the table of users and sessions refused for a while afterwards.

A backend removes a user (or one session) through the server API
(:mod:`presenced.server.api`). The daemon asked floods a :class:`Kick` to every peer (like a
room broadcast: de-duplicated by id, so it reaches every daemon once over any mesh); each
daemon closes its matching connections with :data:`CLOSE_DISCONNECTED` and, when the kick
carries ``refuse_ms``, refuses the user's (or the session's) hellos for that long with
:data:`CLOSE_REFUSED`. The refusal is kept by each daemon on its own clock from the moment the
kick arrives (a flood takes a link delay or two: far less than any refusal worth asking for).

The table is bounded (:data:`MAX_REFUSALS`): past it, the refusals that end soonest go first,
so a flood of API calls cannot grow a daemon's memory without end.
"""

from __future__ import annotations

from typing import Any, Final

import attrs

__all__ = [
    "CLOSE_DISCONNECTED",
    "CLOSE_REFUSED",
    "MAX_REASON",
    "MAX_REFUSALS",
    "MAX_REFUSE_S",
    "Kick",
    "Refusals",
    "kick_from_wire",
    "kick_to_wire",
]

#: WebSocket close code (private-use range) of a connection the server API disconnected.
CLOSE_DISCONNECTED: Final = 4001
#: Close code of a hello refused because its user or session is barred for a while.
CLOSE_REFUSED: Final = 4002
#: Longest reason, in characters (a close frame's reason is at most 123 bytes of UTF-8; the
#: reason is cut to fit there, and sent whole in the ``error`` frame before it).
MAX_REASON: Final = 120
#: Longest refusal the API accepts (a day; a longer ban belongs in the token issuer).
MAX_REFUSE_S: Final = 86_400
#: Refusals one daemon keeps at most.
MAX_REFUSALS: Final = 100_000
_MAX_NAME: Final = 256
_MAX_ID: Final = 128


@attrs.frozen
class Kick:
    """Disconnect ``user`` (every session, or only ``session`` when it is not empty) on every
    daemon, telling the client ``reason``; refuse its hellos for ``refuse_ms`` (0: none)."""

    id: str
    user: str
    session: str
    reason: str
    refuse_ms: int


def kick_to_wire(kick: Kick) -> dict[str, Any]:
    return {
        "t": "kick",
        "id": kick.id,
        "user": kick.user,
        "session": kick.session,
        "reason": kick.reason,
        "refuse_ms": kick.refuse_ms,
    }


def kick_from_wire(wire: dict[str, Any]) -> Kick:
    """Validate a ``kick`` peer message; ValueError (the peer layer's protocol error) if bad."""
    session = wire.get("session")
    reason = wire.get("reason")
    refuse_ms = wire.get("refuse_ms")
    if type(session) is not str or len(session) > _MAX_NAME:
        raise ValueError("'session' must be a string of at most 256 characters")
    if type(reason) is not str or len(reason) > MAX_REASON:
        raise ValueError(f"'reason' must be a string of at most {MAX_REASON} characters")
    if type(refuse_ms) is not int or not 0 <= refuse_ms <= MAX_REFUSE_S * 1000:
        raise ValueError("'refuse_ms' must be an integer from 0 to a day")
    return Kick(
        _name(wire.get("id"), "id", _MAX_ID),
        _name(wire.get("user"), "user", _MAX_NAME),
        session,
        reason,
        refuse_ms,
    )


def _name(value: Any, what: str, limit: int) -> str:
    if type(value) is not str or not 0 < len(value) <= limit:
        raise ValueError(f"'{what}' must be a string of 1..{limit} characters")
    return value


class Refusals:
    """Users and sessions whose hellos are refused until some clock time.

    Keyed by ``(user, "")`` for every session of a user, ``(user, session)`` for one session.
    Expired entries are dropped when looked up and by :meth:`expire`.
    """

    def __init__(self, limit: int = MAX_REFUSALS) -> None:
        self.limit = limit
        self._until: dict[tuple[str, str], float] = {}

    def __len__(self) -> int:
        return len(self._until)

    def refuse(self, user: str, session: str, until: float) -> None:
        """Refuse ``user`` (``session`` "": all its sessions) until ``until``; a refusal
        already longer stays."""
        key = (user, session)
        if self._until.get(key, float("-inf")) < until:
            self._until[key] = until
        if len(self._until) > self.limit:
            soonest = sorted(self._until.items(), key=lambda item: item[1])
            for stale, _ in soonest[: len(self._until) - self.limit * 3 // 4]:
                del self._until[stale]

    def left_s(self, user: str, session: str, now: float) -> float | None:
        """Seconds ``user``'s ``session`` is still refused, or None if it is welcome."""
        if not self._until:
            return None
        left = None
        for key in ((user, ""), (user, session)):
            until = self._until.get(key)
            if until is None:
                continue
            if until <= now:
                del self._until[key]
            elif left is None or until - now > left:
                left = until - now
        return left

    def expire(self, now: float) -> None:
        """Drop every refusal that has run out."""
        for key in [key for key, until in self._until.items() if until <= now]:
            del self._until[key]
