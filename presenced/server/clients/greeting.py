"""A client's token, at ``hello`` and at each ``refresh``: verified by the daemon's
:class:`~presenced.token_keys.TokenVerifier` (never blocking: it reads cached keys) against
the daemon's wall clock, then handed to the session rules, which decide what it changes.

Kept apart from the connection so that the connection carries out answers and this module
owns how a grant is obtained (token, anonymous, resumed anonymous).
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Protocol

from presenced.auth import AuthError, Grant, anonymous_grant
from presenced.core import client_wire as wire
from presenced.core.client_frames import left
from presenced.core.presence import Member
from presenced.core.session import HelloRoute, SessionRules, unauthorized

if TYPE_CHECKING:
    from presenced.server.clients.sessions import Sessions
    from presenced.server.node import Node


class Greeted(Member, Protocol):
    """A client connection as seen here (:class:`~presenced.server.clients.ClientConnection`)."""

    node: Node
    sessions: Sessions
    rules: SessionRules


def hello_grant(conn: Greeted, message: wire.Hello) -> Grant:
    """The grant of a ``hello``: its token's, or an anonymous user's (the one it names, the
    one its resume token names, or a fresh name); raises a Refusal when it gets none."""
    node = conn.node
    tokens = node.tokens
    route = conn.rules.hello_route(message, tokens.enabled, node.config.allow_anonymous)
    if route is HelloRoute.TOKEN:
        assert message.token is not None
        try:
            return tokens.verify(message.token, node.wall_clock())
        except AuthError as exc:
            raise unauthorized(message.ref, exc.message) from None
    user = message.user
    if user is None and message.resume is not None:
        user = conn.sessions.user_of(message.resume)
    return anonymous_grant(user or f"anon-{secrets.token_hex(4)}")


def refresh(conn: Greeted, message: wire.Refresh) -> None:
    """A ``refresh``: the session runs on the new token (``refreshed``), leaving the rooms
    it no longer allows (a ``left`` without ``ref`` for each); a refused token gets
    ``unauthorized``, and closes the session (4003) if its current token has expired."""
    rules, node = conn.rules, conn.node
    rules.check_refresh(message)
    now = node.wall_clock()
    try:
        grant = node.tokens.verify(message.token, now)
    except AuthError as exc:
        raise rules.refresh_refused(message, exc.message, now) from None
    frame, dropped = rules.refreshed(grant, message, now)
    for room in dropped:
        node.leave(conn, room)
        conn.send(left(None, room))
    conn.send(frame)
