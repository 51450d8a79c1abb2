"""The node: owner of this daemon's presence state, its room feeds and its local members.

Every mutation of the presence state is a plain synchronous method call made from a
connection's task (or the gossip layer). trio is cooperative, so a method that never awaits
runs atomically: that is the "one owner" of the CRDT, with no lock and no channel hop on
the hot path.

Fan-out: each room with local members has a :class:`RoomFeed`. Changes are noted there and
flushed at most once per tick as one diff frame, encoded once and queued on every member's
outbox. A change in a room that has not flushed for a whole tick is flushed at once
(leading edge), so light traffic sees no tick delay.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import trio

from presenced.core import peer_wire, protocol
from presenced.core.crdt import Change, Meta, PresenceState, ReplicaId
from presenced.core.fanout import RoomFeed
from presenced.core.liveness import DOWN, PURGED, RETIRED, UP, Liveness, Transition
from presenced.server.metrics import Metrics
from presenced.server.websocket import text_frame

if TYPE_CHECKING:
    from presenced.config import Config
    from presenced.server.clients import ClientConnection
    from presenced.server.messaging import Messenger
    from presenced.server.peer_links import PeerManager

log = logging.getLogger(__name__)


class Node:
    """Presence state, room feeds and members of one daemon incarnation."""

    def __init__(
        self,
        config: Config,
        replica: ReplicaId,
        *,
        clock: Callable[[], float] = trio.current_time,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.replica = replica
        self.region = config.region
        self.tick = config.tick_ms / 1000.0
        self.clock = clock
        self.wall_clock = wall_clock
        self.state = PresenceState(replica, config.region)
        self.feeds: dict[str, RoomFeed] = {}
        #: room -> members on this daemon (a dict used as an ordered set).
        self.members: dict[str, dict[ClientConnection, None]] = {}
        self.connections: set[ClientConnection] = set()
        #: user -> that user's connections here (a dict used as an ordered set): where direct
        #: messages for the user are written.
        self.users: dict[str, dict[ClientConnection, None]] = {}
        self._dirty: dict[str, RoomFeed] = {}
        self.metrics = Metrics()
        self.liveness = Liveness(
            replica,
            down_after=config.down_after,
            purge_after=config.purge_after,
            now=clock(),
        )
        #: The peer layer, if this daemon has peers (it sets itself here).
        self.gossip: PeerManager | None = None
        #: Direct messages (the daemon sets it; a bare node in unit tests has none).
        self.messenger: Messenger | None = None
        self._local_dirty = False

    # ------------------------------------------------------------------ client operations

    def join(self, conn: ClientConnection, room: str, meta: Meta, ref: Any) -> None:
        """Add a session to a room: it gets the room's state, then everyone gets its join."""
        feed = self.feeds.get(room)
        if feed is None:
            feed = self.feeds[room] = RoomFeed(room, self.state.room_presences(room))
        self.members.setdefault(room, {})[conn] = None
        conn.send(protocol.state(ref, room, feed.snapshot()), room=room)
        self._local([self.state.put(room, conn.user, conn.session, meta)])

    def update(self, conn: ClientConnection, room: str, meta: Meta) -> None:
        """Replace a joined session's meta (the caller has applied the patch)."""
        self.metrics.updates_in += 1
        self._local([self.state.put(room, conn.user, conn.session, meta)])

    def leave(self, conn: ClientConnection, room: str) -> None:
        """Remove a session from a room; the others see it leave at the next flush."""
        members = self.members.get(room)
        if members is not None:
            members.pop(conn, None)
        change = self.state.remove(room, conn.user, conn.session)
        if change is not None:
            self._local([change])
        if not members:
            self.members.pop(room, None)
            self.feeds.pop(room, None)
            self._dirty.pop(room, None)

    def broadcast(
        self, conn: ClientConnection, room: str, event: str, data: Any, echo: bool
    ) -> None:
        """Send an event to every member of the room, here and (through peers) everywhere."""
        self._deliver(room, conn.user, conn.session, self.region, event, data, conn, echo)
        if self.gossip is not None:
            message = peer_wire.RoomBroadcast(
                secrets.token_hex(8), room, event, data, conn.user, conn.session, self.region
            )
            self.gossip.on_broadcast(message, None)

    def deliver_broadcast(self, message: peer_wire.RoomBroadcast) -> None:
        """A room broadcast that came from another daemon."""
        self._deliver(
            message.room,
            message.user,
            message.session,
            message.region,
            message.event,
            message.data,
            None,
            True,
        )

    def _deliver(
        self,
        room: str,
        user: str,
        session: str,
        region: str,
        event: str,
        data: Any,
        sender: ClientConnection | None,
        echo: bool,
    ) -> None:
        members = self.members.get(room)
        if not members:
            return
        message = protocol.broadcast_event(room, user, session, region, event, data)
        frame = text_frame(protocol.encode(message))
        count = 0
        for member in members:
            if member is not sender or echo:
                member.push(frame)
                count += 1
        self.metrics.count_frames(count, len(frame))

    def current_meta(self, conn: ClientConnection, room: str) -> Meta | None:
        return self.state.get(room, conn.user, conn.session)

    def identified(self, conn: ClientConnection) -> None:
        """A connection said hello: direct messages for its user may now be written to it."""
        self.users.setdefault(conn.user, {})[conn] = None

    def user_connections(self, user: str) -> list[ClientConnection]:
        """This daemon's connections of ``user`` (every tab and device)."""
        return list(self.users.get(user, ()))

    def disconnect(self, conn: ClientConnection) -> None:
        """A connection ended: it leaves every room it was in."""
        self.connections.discard(conn)
        sessions = self.users.get(conn.user)
        if sessions is not None:
            sessions.pop(conn, None)
            if not sessions:
                del self.users[conn.user]
        for room in list(conn.rooms):
            self.leave(conn, room)
        conn.rooms.clear()

    # ------------------------------------------------------------------ fan-out

    def _local(self, changes: list[Change]) -> None:
        """Changes of this replica's own entries: show them, and let peers know."""
        self.apply(changes)
        self._local_dirty = True
        if self.gossip is not None:
            self.gossip.local_changed()

    def apply(self, changes: Iterable[Change], *, immediate: bool = False) -> None:
        """Note visible changes in the feeds of rooms that have local members.

        A room that has not flushed for a tick flushes at once (leading edge); others wait
        for the tick. ``immediate`` flushes touched rooms now: used for changes that a peer
        already coalesced over its own tick, so a cross-region update waits one tick, not two.
        """
        now = self.clock()
        touched: dict[str, RoomFeed] = {}
        waiting = self.messenger.pending_users if self.messenger is not None else None
        for change in changes:
            feed = self.feeds.get(change.room)
            if feed is not None:
                feed.note(change)
                touched[change.room] = feed
            if waiting and change.kind == "join" and change.user in waiting:
                assert self.messenger is not None
                self.messenger.user_appeared(change.user)
        for room, feed in touched.items():
            if immediate or now - feed.last_flush >= self.tick:
                self._dirty.pop(room, None)
                self.flush(feed, now)
            else:
                self._dirty[room] = feed

    def on_transitions(self, transitions: Iterable[Transition]) -> None:
        """Liveness changed: show, hide or drop a replica's entries."""
        for transition in transitions:
            replica, status = transition.replica, transition.status
            if status == UP:
                log.info("replica %s is up", replica)
                self.apply(self.state.set_up(replica, True), immediate=True)
                if self.gossip is not None:
                    self.gossip.request_digests()
            elif status == DOWN:
                log.warning("replica %s is down: its users leave every room", replica)
                self.apply(self.state.set_up(replica, False), immediate=True)
            elif status == PURGED:
                log.info("replica %s purged", replica)
                self.apply(self.state.drop(replica), immediate=True)
            elif status == RETIRED:
                log.info("replica %s retired", replica)
                self.apply(self.state.retire(replica), immediate=True)
            if status != UP and self.gossip is not None:
                self.gossip.replica_gone(replica)

    def flush(self, feed: RoomFeed, now: float) -> None:
        """Send a room's pending changes to its members as one frame."""
        diff = feed.flush(now)
        if diff is None:
            return
        joins, leaves, updates = diff
        frame = text_frame(protocol.encode(protocol.diff(feed.room, joins, leaves, updates)))
        members = self.members.get(feed.room, ())
        for member in members:
            member.push(frame, room=feed.room)
        self.metrics.count_frames(len(members), len(frame))
        self.metrics.diffs_flushed += 1

    def flush_dirty(self) -> None:
        """Flush every room that changed since its last flush (the tick)."""
        if not self._dirty:
            return
        now = self.clock()
        dirty, self._dirty = self._dirty, {}
        for feed in dirty.values():
            self.flush(feed, now)

    async def run_ticker(self) -> None:
        """Flush dirty rooms once per tick, on a fixed schedule."""
        deadline = self.clock()
        while True:
            deadline = max(deadline + self.tick, self.clock())
            await trio.sleep_until(deadline)
            started = time.perf_counter()
            self.flush_dirty()
            if self._local_dirty and self.gossip is not None:
                self._local_dirty = False
                self.gossip.tick()
            self.metrics.flush_seconds += time.perf_counter() - started

    def room_snapshot(self, room: str) -> dict[str, Any]:
        """A fresh `state` frame for a member that must resync (slow reader)."""
        feed = self.feeds.get(room)
        presences = feed.snapshot() if feed is not None else {}
        return protocol.state(None, room, presences)

    # ------------------------------------------------------------------ shutdown

    def remove_all_local(self) -> None:
        """Shutdown: every local entry leaves (peers hear it before the links close)."""
        self._local(self.state.remove_all_local())

    def close_all(self, code: int, reason: str) -> None:
        for conn in list(self.connections):
            conn.close(code, reason)
