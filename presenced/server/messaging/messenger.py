"""The direct-message shell: client requests and peer messages in, the machine's effects out.

Every decision about a direct message is made by :class:`presenced.core.direct.DirectMessages`
(origin, forwarder and recipient daemon; see that module for the rules). This module gives
it the daemon around it and does what it returns:

* it reads the world for the machine (where a user is, the next hop, which daemons a fetch
  must hear from: :func:`presenced.server.messaging.fetches.cluster_view`);
* it writes frames to client connections, queues routed messages on peer links (a link that
  is gone or full is told back to the machine, which answers the origin), and logs;
* it runs two tasks: the committer, which commits each store batch
  :data:`~presenced.core.direct.COMMIT_INTERVAL_S` after its first write, and the sweeper,
  which sleeps until the machine's next deadline (retransmissions, answer deadlines, the
  expiry pass).

Effects are carried out as soon as the machine returns them, with no await in between, so
a commit never runs between a message reaching the sockets and what the machine decided
next: handlers run on the event loop thread and never wait, like the rest of the node.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import trio

from presenced.core import peer_wire as wire
from presenced.core import protocol
from presenced.core.answers import FAST_ANSWER_S, ClusterView
from presenced.core.client_frames import message_frame
from presenced.core.direct import COMMIT_INTERVAL_S, EXPIRE_INTERVAL_S, DirectMessages
from presenced.core.direct_effects import (
    CommitSoon,
    Effect,
    Forward,
    Reply,
    Show,
    TellSender,
    Wake,
)
from presenced.core.presence import Member
from presenced.server.messaging.fetches import cluster_view
from presenced.server.messaging.server_sender import SERVER_USER, ServerSender
from presenced.server.messaging.store import MessageStore

if TYPE_CHECKING:
    from presenced.server.node import Node

log = logging.getLogger(__name__)


class Messenger:
    """Direct messages of one daemon: the trio side of :class:`DirectMessages`."""

    def __init__(self, node: Node, store: MessageStore) -> None:
        self.node = node
        self.store = store
        self.name = node.replica.node
        self.region = node.region
        self.wall_clock = node.wall_clock
        #: When the daemon started serving (the run loop): see ``cluster_settled``.
        self.started_at = node.clock()
        self.machine: DirectMessages[Member | ServerSender] = DirectMessages(
            self.name,
            self.region,
            f"{self.name}.{_base36(node.replica.incarnation)}",
            store,
            self,
            node.metrics,
            fast_answer_s=FAST_ANSWER_S,
        )
        self._wakeup = trio.Event()
        self._commit_wanted = trio.Event()

    @property
    def pending_users(self) -> set[str]:
        """Recipients with pending messages in the store (a presence join of one wakes us)."""
        return self.machine.pending_users

    # ------------------------------------------------------------------ the world, read

    def user_nodes(self, user: str) -> list[str]:
        return self.node.state.user_nodes(user)

    def next_hop(self, dest: str) -> str | None:
        peers = self.node.gossip
        return peers.routes.next_hop(dest) if peers is not None else None

    def has_sessions(self, user: str) -> bool:
        return user in self.node.users and bool(self.node.users[user])

    def cluster_view(self, now: float) -> ClusterView:
        return cluster_view(self.node, self.name, now - self.started_at)

    # ------------------------------------------------------------------ client requests

    def send(self, conn: Member, message: protocol.Send) -> None:
        """A client's ``send``: store it (reliable) and start delivering every copy."""
        now, wall_s = self._clocks()
        self._do(self.machine.send(conn, conn.user, conn.session, message, now, wall_s))

    def send_as_server(self, sender: ServerSender, message: protocol.Send) -> None:
        """A ``send`` from the server API: the same machine, routing, storage and receipts
        as a client's, from :data:`SERVER_USER`; the answers go to ``sender``."""
        now, wall_s = self._clocks()
        self._do(self.machine.send(sender, SERVER_USER, SERVER_USER, message, now, wall_s))

    def mark_read(self, conn: Member, message: protocol.MarkRead) -> None:
        """The recipient read a message shown here: tell its sender (once per user).
        :class:`~presenced.core.protocol.ProtocolError` if it was not shown to them here."""
        now, wall_s = self._clocks()
        self._do(self.machine.mark_read(conn.user, message, now, wall_s))

    def fetch(self, conn: Member, message: protocol.Fetch) -> None:
        """Pull the user's pending messages from every daemon that may hold some."""
        now, wall_s = self._clocks()
        self._do(self.machine.fetch(conn, conn.user, message, now, wall_s))

    # ------------------------------------------------------------------ presence and routes

    def user_appeared(self, user: str) -> None:
        """A user with pending messages joined a room somewhere: deliver them now."""
        self._do(self.machine.user_appeared(user))

    def routes_changed(self) -> None:
        """Links or routes changed: retry every pending recipient now."""
        self._do(self.machine.routes_changed())

    def on_routed(self, message: wire.Routed, link: str) -> None:
        """A routed message arrived from the peer ``link``."""
        now, wall_s = self._clocks()
        self._do(self.machine.on_routed(message, link, now, wall_s))

    # ------------------------------------------------------------------ effects

    def _clocks(self) -> tuple[float, float]:
        return self.node.clock(), self.wall_clock()

    def _reachable(self, conn: Member | ServerSender) -> bool:
        """Whether the sender behind a handle still listens."""
        if isinstance(conn, ServerSender):
            return conn.open
        return conn in self.node.connections

    def _do(self, effects: list[Effect[Member | ServerSender]]) -> None:
        """Carry out the machine's effects, in order."""
        node = self.node
        for effect in effects:
            if isinstance(effect, Forward):
                peers = node.gossip
                if peers is not None and peers.send_routed(effect.hop, effect.message):
                    if isinstance(effect.message, wire.Direct):
                        node.metrics.messages_routed += 1
                else:
                    now, wall_s = self._clocks()
                    self._do(self.machine.unsendable(effect.message, now, wall_s))
            elif isinstance(effect, Show):
                conns = node.user_connections(effect.user)
                frame = message_frame(effect.frame)
                for conn in conns:
                    conn.push(frame)
                node.metrics.count_frames(len(conns), len(frame))
            elif isinstance(effect, TellSender):
                self._tell_sender(effect)
            elif isinstance(effect, Reply):
                if not effect.if_connected or self._reachable(effect.conn):
                    effect.conn.send(effect.frame)
            elif isinstance(effect, Wake):
                self._wakeup.set()
            elif isinstance(effect, CommitSoon):
                self._commit_wanted.set()
            elif effect.warning:
                log.warning("%s", effect.text)
            else:
                log.debug("%s", effect.text)

    def _tell_sender(self, effect: TellSender[Member | ServerSender]) -> None:
        """To the sending session if it is still here, else (without its ``ref``, which
        means nothing to the other sessions) to every session of its user here."""
        conn = effect.conn
        if conn is not None and self._reachable(conn):
            conn.send(effect.frame)
            return
        frame = effect.frame
        if "ref" in frame:
            frame = {key: value for key, value in frame.items() if key != "ref"}
        for other in self.node.user_connections(effect.user):
            other.send(frame)

    # ------------------------------------------------------------------ background work

    async def run(self) -> None:
        """Group commits, retransmissions, deliveries to users who appeared, fetch and
        fast-send deadlines, expiry.

        When cancelled (shutdown or crash) an open batch is not committed: the store's close
        throws it away, like a ``kill -9``, and nobody was told anything that relied on it. A
        graceful shutdown loses nothing by it: this task commits as usual while the clients
        are being closed, and is cancelled only after that.
        """
        self.started_at = self.node.clock()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._committer)
            expire_at = self.node.clock()
            while True:
                wake_at = self.machine.wake_at(self.node.clock(), expire_at)
                with trio.move_on_after(max(0.0, wake_at - self.node.clock())):
                    await self._wakeup.wait()
                self._wakeup = trio.Event()
                now = self.node.clock()
                self.sweep(now)
                if now >= expire_at:
                    expire_at = now + EXPIRE_INTERVAL_S
                    self.expire()

    async def _committer(self) -> None:
        """Commit each batch :data:`COMMIT_INTERVAL_S` after its first write."""
        while True:
            await self._commit_wanted.wait()
            self._commit_wanted = trio.Event()
            await trio.sleep(COMMIT_INTERVAL_S)
            self.flush()

    def flush(self) -> None:
        """Commit the open batch now, and send what waited for it."""
        now, wall_s = self._clocks()
        self._do(self.machine.flush(now, wall_s))

    def sweep(self, now: float) -> None:
        """One pass: resend what timed out, deliver to who appeared, end late fetches."""
        self._do(self.machine.sweep(now, self.wall_clock()))

    def expire(self) -> None:
        """Drop reliable messages older than the store's max age, telling their senders."""
        now, wall_s = self._clocks()
        self._do(self.machine.expire(now, wall_s))

    def status(self) -> dict[str, Any]:
        """Counts for /status."""
        return self.machine.status()


def _base36(number: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        number, digit = divmod(number, 36)
        out = digits[digit] + out
        if number == 0:
            return out


__all__ = ["Messenger"]
