"""Client liveness and sessions that outlive their connection (resume), for one daemon.

Liveness. A phone that loses coverage or a laptop that sleeps sends no FIN or RST: without
a probe its connection, and its presence in every room, would stay until the room's next
write fails. So each connection keeps one number, the clock time of its last input (set
where bytes are read: the reader task and the paced tick-boundary read), and **one sweeper
task per daemon** looks at every connection once a second (:class:`Timing`'s ``sweep_s``):

* quiet for ``ping_after_s`` (10 s by default) and not pinged since: one WebSocket ping
  frame, written directly like any frame (browsers and libraries answer pong by themselves);
* silent for ``client_timeout_s`` (15 s): closed as dead (1001), its session detached.

Nothing is scheduled per connection and nothing runs per tick: an idle connection costs one
comparison a second, plus one ping and one pong (a reader wake-up) per ``ping_after_s``.
TCP keepalive and ``TCP_USER_TIMEOUT`` on every accepted socket are the kernel's backstop
(:func:`configure_keepalive`).

Resume. A session whose connection ends without a clean close (see
:data:`presenced.core.resume.CLEAN_CLOSE_CODES`) is **detached**: its presence entries stay
(nobody sees a leave), its connection is forgotten, and it waits ``resume_grace_s`` for a
``hello`` carrying its resume token. That hello gets the same session back, in the same
rooms with the same metas, and a fresh ``state`` of each room. A token that names a session
whose connection still looks alive here (the client saw its link die before we did: the
usual case of a short drop) takes the session over: the old connection is closed. When the
grace runs out the session leaves every room, as a clean close would have.

A token can also name a session another daemon holds (the client reconnected elsewhere):
the session is found in the presence state and written into this daemon's partition (see
:meth:`Sessions.resume` and :mod:`presenced.core.room_index`); the old daemon lets its copy
go when its own grace runs out, and nobody sees a leave.

Detached sessions are kept in a dict in insertion order, which is deadline order (the grace
is the same for all): the sweep expires them from the front.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import socket
from typing import TYPE_CHECKING, Any, Protocol

import attrs
import trio

from presenced.core.client_frames import error_from, welcome
from presenced.core.client_wire import Hello
from presenced.core.limits import Limits
from presenced.core.presence import Member
from presenced.core.resume import Timing, resume_token, token_session, token_valid, verdict
from presenced.core.session import SessionRules
from presenced.core.ws_frames import CloseCode

if TYPE_CHECKING:
    from presenced.server.node import Node

log = logging.getLogger(__name__)


class Attendee(Member, Protocol):
    """A client connection as the sessions see it
    (:class:`~presenced.server.clients.ClientConnection` is one; so are the test cluster's
    fake clients): a member of the node with its rules, its limits and its liveness."""

    peer: str
    limits: Limits
    rules: SessionRules
    #: The session leaves with this connection (no resume).
    session_ends: bool
    #: Clock time of its last input, and of the last ping sent to it.
    last_input: float
    pinged_at: float

    def ping(self, now: float) -> None:
        """Send a WebSocket ping (the sweep found it quiet)."""
        ...


@attrs.define
class Detached:
    """A session whose connection dropped: it keeps its entries until ``deadline``."""

    user: str
    session: str
    rooms: list[str]
    deadline: float


class Sessions:
    """The sweeper and the sessions of one daemon (its live ones and its detached ones)."""

    def __init__(self, node: Node) -> None:
        config = node.config
        self.node = node
        self.timing = Timing(config.client_timeout_s, config.resume_grace_s)
        #: Resume tokens are MACs under this key: the cluster's token secret when there is
        #: one (any daemon can check them), else a key of this process.
        self.key = config.token_secret or secrets.token_bytes(32)
        #: session id -> its connection, for every connection that said hello.
        self.live: dict[str, Attendee] = {}
        #: session id -> detached session, oldest (soonest to expire) first.
        self.detached: dict[str, Detached] = {}
        self.closing = False

    # ------------------------------------------------------------------ hello

    def user_of(self, token: str) -> str | None:
        """The user of the session ``token`` names, here or (visible in the presence state)
        on another daemon: an anonymous hello without ``user`` resumes as that user (the
        token itself is checked by :meth:`resume`)."""
        session = token_session(token)
        if session is None:
            return None
        held: Detached | Attendee | None = self.detached.get(session)
        if held is None:
            held = self.live.get(session)
        if held is not None:
            return held.user
        return self.node.state.session_user(session)

    def welcome(self, conn: Attendee, hello: Hello) -> None:
        """``conn`` is authenticated: get its session back (``hello.resume``) or start one,
        and welcome it. A resumed session then gets a ``state`` of each of its rooms."""
        node = self.node
        resumed = hello.resume is not None and self.resume(conn, hello.resume)
        if not resumed:
            conn.session = secrets.token_urlsafe(9)
        node.identified(conn)
        conn.send(
            welcome(
                hello.ref,
                conn.session,
                conn.user,
                node.region,
                node.replica.node,
                node.config.tick_ms,
                conn.limits,
                resume=self.started(conn),
                resumed=resumed,
                resume_grace_ms=round(self.timing.resume_grace_s * 1000),
                expires_in_ms=conn.rules.expires_in_ms(node.wall_clock()),
            )
        )
        if resumed:
            node.attach(conn)

    def trusted(self, user: str, token: str, session: str) -> bool:
        """Whether ``token`` lets ``user`` resume ``session``.

        Its MAC is checked whenever this daemon can: always for a session held here, and
        for one held elsewhere when the key is the cluster's token secret (every daemon has
        it). Without a token secret each daemon's key is its own, so a token from another
        daemon cannot be checked; such a daemon only takes anonymous hellos, which may name
        any user anyway, and a token of a session visible for that user is enough.
        """
        if session in self.detached or session in self.live:
            return token_valid(self.key, user, token)
        if self.node.config.token_secret is not None:
            return token_valid(self.key, user, token)
        return True

    def resume(self, conn: Attendee, token: str) -> bool:
        """Give ``conn`` (authenticated, no session yet) the session ``token`` names, if it
        is this user's and still here (detached, or on a connection we took for alive) or
        visible in the presence state (held by another daemon, resumed here).
        Sets ``conn.session`` and its rules' rooms (:meth:`welcome` does the rest)."""
        if self.closing or self.timing.resume_grace_s <= 0:
            return False
        session = token_session(token)
        if session is None or not self.trusted(conn.user, token, session):
            return False
        node = self.node
        visible = node.state.session_rooms(conn.user, session)
        held = self.detached.pop(session, None)
        old = None
        if held is None:
            old = self.live.get(session)
            if old is not None:
                if old is conn or old.user != conn.user:
                    return False
                node.detach(old)
                old.close(CloseCode.GOING_AWAY, "session resumed on another connection")
            elif not visible:
                return False  # not here, and nowhere (its grace ran out, or never was)
        conn.session = session
        self.live[session] = conn
        # The rules keep the rooms its grant allows, up to the limit (a new token with
        # fewer rooms: it leaves the others).
        dropped = conn.rules.resumed([room for room, _, _ in visible])
        if dropped:
            node.end_session(conn.user, session, dropped)
        # The session's copies here become the newest (a copy another daemon holds is
        # shown until then): its writes from now on come from this daemon.
        keep = conn.rooms
        adopt = [(room, meta) for room, meta, at in visible if room in keep and at != node.replica]
        node.adopt(conn.user, session, adopt)
        node.metrics.sessions_resumed += 1
        if held is None and old is None:
            node.metrics.sessions_resumed_elsewhere += 1
        return True

    def started(self, conn: Attendee) -> str:
        """``conn``'s session is live on it; returns its resume token."""
        self.live[conn.session] = conn
        return resume_token(self.key, conn.user, conn.session)

    # ------------------------------------------------------------------ endings

    def connection_ended(self, conn: Attendee) -> None:
        """A connection's task is ending: its session leaves now (clean close, a policy
        close, no resume, shutdown) or is detached for the grace."""
        node = self.node
        session = conn.session
        if not session or self.live.get(session) is not conn:
            node.disconnect(conn)  # no hello yet, or its session moved to a new connection
            return
        del self.live[session]
        if conn.session_ends or self.closing or self.timing.resume_grace_s <= 0:
            node.disconnect(conn)
            return
        rooms = node.detach(conn)
        deadline = node.clock() + self.timing.resume_grace_s
        self.detached[session] = Detached(conn.user, session, rooms, deadline)
        node.metrics.sessions_detached += 1

    def contested(self) -> None:
        """Act on what merges learnt about sessions held here (see
        :mod:`presenced.core.room_index`):

        * a key another daemon wrote newer than ours: the session was resumed there. A
          connection that still holds it here is stale (the client left it for the other
          daemon): with a token secret, the resume there was checked, and the connection is
          closed (1001) and its session detached, as a resume on this daemon would. (Without
          one, a resume elsewhere proves nothing: the connection stays.)
        * a key whose newest copy another daemon removed while ours remains: the session
          left that room where it lives now; a detached session here follows at once
          (otherwise our copy would keep it in the room for the rest of its grace).
        """
        taken, left = self.node.state.take_notices()
        node = self.node
        if node.config.token_secret is not None:
            for _room, user, session in taken:
                conn = self.live.get(session)
                if conn is not None and conn.user == user:
                    del self.live[session]
                    rooms = node.detach(conn)
                    deadline = node.clock() + self.timing.resume_grace_s
                    self.detached[session] = Detached(user, session, rooms, deadline)
                    node.metrics.sessions_detached += 1
                    conn.close(CloseCode.GOING_AWAY, "session resumed on another daemon")
        for room, user, session in left:
            held = self.detached.get(session)
            if held is not None and held.user == user and room in held.rooms:
                held.rooms.remove(room)
                node.end_session(user, session, [room])

    def end_detached(self, user: str, session: str) -> None:
        """End ``user``'s detached sessions (``session`` "": all of them) at once, with no
        grace: the server API disconnected them."""
        for held_session, held in list(self.detached.items()):
            if held.user == user and (not session or held_session == session):
                del self.detached[held_session]
                self.node.end_session(held.user, held_session, held.rooms)

    def shutdown(self) -> None:
        """Graceful shutdown: every session leaves now (the caller removes the entries)."""
        self.closing = True
        self.detached.clear()

    # ------------------------------------------------------------------ the sweeper

    async def run(self) -> None:
        """Sweep every ``sweep_s`` until cancelled."""
        while True:
            await trio.sleep(self.timing.sweep_s)
            self.sweep(self.node.clock())

    def sweep(self, now: float) -> None:
        """Ping quiet connections, close dead ones and those whose token expired past the
        grace (4003), end sessions whose grace ran out."""
        timing = self.timing
        metrics = self.node.metrics
        quiet_since = now - timing.ping_after_s
        wall = self.node.wall_clock()
        token_grace_s = self.node.config.token_expiry_grace_s
        for conn in self.live.values():  # (nothing here changes ``live`` synchronously)
            if conn.rules.expires_at is not None and self._expired(conn, wall, token_grace_s):
                continue
            if conn.last_input > quiet_since:
                continue
            what = verdict(conn.last_input, conn.pinged_at, now, timing)
            if what == "ping":
                conn.ping(now)
                metrics.pings_sent += 1
            elif what == "dead":
                log.info("client %s: no sign of life for %gs", conn.peer, now - conn.last_input)
                metrics.clients_timed_out += 1
                conn.close(CloseCode.GOING_AWAY, "no sign of life")
        expired: list[Detached] = []
        for held in self.detached.values():
            if held.deadline > now:
                break
            expired.append(held)
        for held in expired:
            del self.detached[held.session]
            metrics.sessions_expired += 1
            self.node.end_session(held.user, held.session, held.rooms)

    def _expired(self, conn: Attendee, wall: float, grace_s: float) -> bool:
        """Close ``conn`` (``token_expired``, 4003) if its token expired over ``grace_s``
        ago at Unix time ``wall`` without a refresh; whether it did."""
        refusal = conn.rules.expired(wall, grace_s)
        if refusal is None or refusal.close is None:
            return False
        log.info("client %s: token expired %gs ago", conn.peer, wall - (conn.rules.expires_at or 0))
        self.node.metrics.count_error(refusal.code)
        conn.send(error_from(refusal))
        conn.close(refusal.close, refusal.reason)
        return True

    def status(self) -> dict[str, Any]:
        return {"live": len(self.live), "detached": len(self.detached)}


def configure_keepalive(sock: trio.socket.SocketType, timeout_s: float) -> None:
    """The kernel's backstop for a peer that vanished: TCP keepalive probes after
    ``timeout_s`` of idleness (3 unanswered probes a third of it apart close the socket),
    and ``TCP_USER_TIMEOUT``: data unacknowledged for twice the timeout closes it too (a
    dead peer's unanswered ping, where keepalive does not probe). Options the platform
    lacks are skipped."""
    idle = max(1, round(timeout_s))
    options = [
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPIDLE", None), idle),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPINTVL", None), max(1, idle // 3)),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPCNT", None), 3),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_USER_TIMEOUT", None), 2000 * idle),
    ]
    for level, option, value in options:
        if option is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(level, option, value)
