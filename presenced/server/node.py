"""The daemon's node: the pure presence node with what a running daemon adds around it.

:class:`~presenced.core.presence.Presence` decides (state, liveness, room feeds, members, the
tick plan); :class:`Node` adds the daemon's configuration, its metrics, its paced clients,
client sessions and the two wings it talks to, and :class:`DaemonOutputs` carries out what
the presence node asks (:class:`~presenced.core.presence.Outputs`): encode frames, poke peer
links, flood broadcasts, tell messaging a user appeared, wake the ticker.

Wiring: the daemon (:mod:`presenced.server.daemon`) builds the node, then the client
sessions, the peer manager and the messenger around it, and hands the last two to
:meth:`Node.wire` in one place. The node types them by what is called through it
(:mod:`presenced.server.roles`) and imports nothing from the wings. The ticker
(:mod:`presenced.server.ticker`) attaches its alarm to the outputs while it runs. Nothing
sets itself on the node.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from presenced.core import peer_wire, protocol
from presenced.core.client_frames import message_frame
from presenced.core.crdt import ReplicaId
from presenced.core.kicks import CLOSE_DISCONNECTED, CLOSE_REFUSED, Kick, Refusals
from presenced.core.liveness import DOWN
from presenced.core.presence import Member, Presence
from presenced.server.metrics import Metrics
from presenced.server.roles import DetachedSessions, DirectMessaging, PeerLayer
from presenced.token_keys import TokenVerifier, load_public_key

if TYPE_CHECKING:
    from presenced.config import Config

log = logging.getLogger(__name__)


def _run_clock() -> Callable[[], float]:
    """trio's time without the two layers around it (the node reads it ~35 times per busy
    tick): the running loop's clock's own method; ``trio.current_time`` outside a run."""
    try:
        return trio.lowlevel.current_clock().current_time
    except RuntimeError:
        return trio.current_time


def _nothing() -> None:
    return None


def _no() -> bool:
    return False


def _not_now(at: float) -> None:
    return None


class DaemonOutputs:
    """:class:`~presenced.core.presence.Outputs` for a daemon.

    The calls the node makes per local change or per tick (``frame``, ``local_changed``,
    ``awaiting_batches``, ``paced_pending``, ``request_digests``, ``wake_at``) are attributes
    bound to the peer manager's, the alarm's or the framing's own functions when those are
    wired: the node's call *is* the call it stands for, with no forwarding layer on the hot
    path. Without peers (or while no ticker runs) they do nothing. The rare calls (a
    broadcast, a liveness transition, a user appearing) are plain methods.
    """

    def __init__(self) -> None:
        self.frame: Callable[[dict[str, Any]], bytes] = message_frame
        self.local_changed: Callable[[], None] = _nothing
        self.awaiting_batches: Callable[[], bool] = _no
        self.paced_pending: Callable[[], bool] = _no
        self.request_digests: Callable[[], None] = _nothing
        self.wake_at: Callable[[float], None] = _not_now
        self._gossip: PeerLayer | None = None
        self._messenger: DirectMessaging | None = None

    def wire(self, gossip: PeerLayer | None, messenger: DirectMessaging | None) -> None:
        self._gossip = gossip
        self._messenger = messenger
        if gossip is not None:
            self.local_changed = gossip.local_changed
            self.awaiting_batches = gossip.awaiting_batches
            self.paced_pending = gossip.paced_pending
            self.request_digests = gossip.request_digests
        else:
            self.local_changed = _nothing
            self.awaiting_batches = self.paced_pending = _no
            self.request_digests = _nothing

    def flood(self, room: str, event: str, data: Any, user: str, session: str, region: str) -> None:
        """Flood a broadcast made here to the peers, under a fresh random id (their dedupe
        key)."""
        if self._gossip is not None:
            message = peer_wire.RoomBroadcast(
                secrets.token_hex(8), room, event, data, user, session, region
            )
            self._gossip.flood(message)

    def replica_up(self, replica: ReplicaId) -> None:
        log.info("replica %s is up", replica)
        if self._gossip is not None:
            self._gossip.replica_up(replica)

    def replica_gone(self, replica: ReplicaId, status: str) -> None:
        if status == DOWN:
            log.warning("replica %s is down: its users leave every room", replica)
        else:
            log.info("replica %s %s", replica, status)
        if self._gossip is not None:
            self._gossip.replica_gone(replica)

    def user_appeared(self, user: str) -> None:
        """Reliable messages waiting for ``user`` are delivered now (the messenger's pump
        wakes only for a user it holds messages for)."""
        messenger = self._messenger
        if messenger is not None and user in messenger.pending_users:
            messenger.user_appeared(user)


def _close_reason(text: str) -> str:
    """``text`` cut to fit a close frame's reason (at most 123 bytes of UTF-8)."""
    data = text.encode()
    if len(data) <= 123:
        return text
    return data[:123].decode(errors="ignore")


class Node(Presence):
    """The presence node of one daemon incarnation, with its configuration, metrics and the
    wings it talks to (see the module docstring)."""

    outputs: DaemonOutputs
    metrics: Metrics

    def __init__(
        self,
        config: Config,
        replica: ReplicaId,
        *,
        clock: Callable[[], float] = trio.current_time,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if clock is trio.current_time:
            clock = _run_clock()
        super().__init__(
            replica,
            config.region,
            tick_s=config.tick_ms / 1000.0,
            down_after_s=config.down_after_s,
            purge_after_s=config.purge_after_s,
            clock=clock,
            phase_clock=wall_clock,
            outputs=DaemonOutputs(),
            metrics=Metrics(),
        )
        self.config = config
        self.wall_clock = wall_clock
        #: The tick's length (the tick plan's).
        self.tick_s = self.plan.tick_s
        #: The peer layer (None: no peers) and direct messages (None: a bare node in unit
        #: tests); set by :meth:`wire`.
        self.gossip: PeerLayer | None = None
        self.messenger: DirectMessaging | None = None
        #: Sessions waiting to be resumed (set by :meth:`wire`): a disconnect ends them.
        self.sessions: DetachedSessions | None = None
        #: Users and sessions the server API disconnected with a refusal (hellos refused).
        self.refusals = Refusals()
        #: The keys and checks client tokens pass (the daemon runs its JWKS loader).
        pem = config.token_public_key
        self.tokens = TokenVerifier(
            secret=config.token_secret,
            public_key=None if pem is None else load_public_key(pem),
            jwks=config.token_jwks,
            issuer=config.token_issuer,
            audience=config.token_audience,
            max_user_id=config.limits.max_user_id,
            clock=clock,
        )

    # ------------------------------------------------------------------ the server API

    def kick_everywhere(self, user: str, session: str, reason: str, refuse_s: float) -> int:
        """Disconnect ``user`` (``session`` "": every session) on every daemon of the mesh:
        here now, elsewhere through a flooded :class:`Kick`. Returns the connections closed
        here."""
        kick = Kick(secrets.token_hex(8), user, session, reason, round(refuse_s * 1000))
        closed = self.apply_kick(kick)
        if self.gossip is not None:
            self.gossip.flood_kick(kick)
        return closed

    def apply_kick(self, kick: Kick) -> int:
        """Close this daemon's connections of the kicked user or session (4001, the reason in
        an ``error`` frame and the close frame), end its detached sessions at once (no resume
        grace), and refuse its hellos for ``refuse_ms``. Returns the connections closed."""
        if kick.refuse_ms:
            self.refusals.refuse(kick.user, kick.session, self.clock() + kick.refuse_ms / 1000)
        message = kick.reason or "disconnected by the server"
        closed = 0
        for conn in self.user_connections(kick.user):
            if not kick.session or conn.session == kick.session:
                conn.send(protocol.error(protocol.DISCONNECTED, message))
                conn.close(CLOSE_DISCONNECTED, _close_reason(message))
                closed += 1
        if self.sessions is not None:
            self.sessions.end_detached(kick.user, kick.session)
        return closed

    def identified(self, conn: Member) -> None:
        """A connection said hello: refused (4002) while its user or session is barred by a
        disconnect, else direct messages for its user may now be written to it."""
        left_s = self.refusals.left_s(conn.user, conn.session, self.clock())
        if left_s is not None:
            retry_ms = max(1, round(left_s * 1000))
            frame = protocol.error(protocol.REFUSED, "disconnected by the server; retry later")
            frame["retry_after_ms"] = retry_ms
            conn.send(frame)
            conn.close(CLOSE_REFUSED, "refused by the server")
            return
        super().identified(conn)

    def wire(
        self,
        *,
        gossip: PeerLayer | None,
        messenger: DirectMessaging | None,
        sessions: DetachedSessions | None = None,
    ) -> None:
        """Connect the wings the node talks to (the daemon does, once they all exist)."""
        self.gossip = gossip
        self.messenger = messenger
        self.sessions = sessions
        self.outputs.wire(gossip, messenger)
