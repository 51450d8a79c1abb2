"""The presence node: one daemon's presence state, liveness, room feeds and local members.

Every mutation is a plain synchronous method call, made from a connection's task or the
gossip layer; in a cooperative event loop a method that never awaits runs atomically: that
is the "one owner" of the CRDT, with no lock and no channel hop on the hot path.

Fan-out: each room with local members has a :class:`~presenced.core.fanout.RoomFeed`.
Changes are noted there and flushed at most once per tick as one diff frame, encoded once
and pushed to every member. When a tick's changes are flushed, and which change flushes at
once (the leading edge), is the tick plan's rule (:mod:`presenced.core.ticks`).

The node decides; what it wants done around it goes through :class:`Outputs` (encode a
frame, poke the peer links, flood a broadcast, tell messaging a user appeared, wake the
ticker at a time). Those calls are made per flush, per tick or per local change, never per
member, so the daemon's outputs cost what the direct calls they stand for cost. It reads two
clocks it is given: ``clock`` (the daemon's monotonic time) and ``phase_clock`` (the clock
ticks are aligned on).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

from presenced.core import peer_wire, protocol
from presenced.core.crdt import JOIN, UPDATE, Change, Meta, PresenceState, ReplicaId
from presenced.core.fanout import RoomFeed
from presenced.core.liveness import DOWN, PURGED, RETIRED, UP, Liveness, Transition
from presenced.core.occupancy import Watch, Watches
from presenced.core.ticks import TickPlan


class Member(Protocol):
    """A client connection as the node sees it: one session of one user, in some rooms."""

    user: str
    session: str

    @property
    def rooms(self) -> dict[str, None]:
        """The rooms it is in (a dict used as an ordered set; the node adds and removes)."""
        ...

    def push(self, frame: bytes, room: str | None = None) -> None:
        """Queue an encoded frame (``room``: a frame a resync of the room may replace)."""
        ...

    def send(self, message: dict[str, Any], room: str | None = None) -> None:
        """Encode and queue a message for this member only."""
        ...

    def close(self, code: int, reason: str) -> None:
        """Ask the connection to end with a close code."""
        ...


class Counters(Protocol):
    """The counters the node bumps (the daemon's metrics)."""

    updates_in: int
    diffs_flushed: int

    def count_frames(self, count: int, size: int) -> None:
        """``count`` copies of a frame of ``size`` bytes were queued."""
        ...


class Outputs(Protocol):
    """What the node asks of the daemon around it (peer links, messaging, the ticker)."""

    def frame(self, message: dict[str, Any]) -> bytes:
        """Encode a message for clients once (the WebSocket frame every member gets)."""
        ...

    def local_changed(self) -> None:
        """Own entries changed outside a boundary's reads: peer links send them now (the
        leading edge of an idle link)."""
        ...

    def awaiting_batches(self) -> bool:
        """Whether a near peer's batch of this tick is still awaited (see the tick plan)."""
        ...

    def paced_pending(self) -> bool:
        """Whether a paced link's batch of this tick has not been read yet."""
        ...

    def flood(self, room: str, event: str, data: Any, user: str, session: str, region: str) -> None:
        """Send a room broadcast made here to every other daemon (under a fresh id)."""
        ...

    def request_digests(self) -> None:
        """Every peer link exchanges digests now (a replica came back: repair fast)."""
        ...

    def replica_up(self, replica: ReplicaId) -> None:
        """A replica is (back) up: its entries show; dial it again now if its link was
        lost."""
        ...

    def replica_gone(self, replica: ReplicaId, status: str) -> None:
        """A replica is down, purged or retired (``status``): routes through it go."""
        ...

    def user_appeared(self, user: str) -> None:
        """A session of ``user`` joined a room somewhere or came back here: messaging
        delivers what waits for the user, if anything."""
        ...

    def wake_at(self, at: float) -> None:
        """Wake the ticker at clock time ``at`` if it would sleep longer."""
        ...


class Presence:
    """Presence state, liveness, room feeds and members of one daemon incarnation."""

    def __init__(
        self,
        replica: ReplicaId,
        region: str,
        *,
        tick_s: float,
        down_after_s: float,
        purge_after_s: float,
        clock: Callable[[], float],
        phase_clock: Callable[[], float],
        outputs: Outputs,
        metrics: Counters,
    ) -> None:
        self.replica = replica
        self.region = region
        self.plan = TickPlan(tick_s)
        self.clock = clock
        #: The clock tick boundaries are aligned to (wall time, shared by every daemon of a
        #: cluster; a simulation sets its virtual clock here, to stay deterministic).
        self.phase_clock = phase_clock
        self.outputs = outputs
        self.metrics = metrics
        self.state = PresenceState(replica, region)
        self.liveness = Liveness(
            replica, down_after_s=down_after_s, purge_after_s=purge_after_s, now=clock()
        )
        self.feeds: dict[str, RoomFeed] = {}
        #: room -> members on this daemon (a dict used as an ordered set).
        self.members: dict[str, dict[Member, None]] = {}
        self.connections: set[Member] = set()
        #: user -> that user's connections here (a dict used as an ordered set): where direct
        #: messages for the user are written.
        self.users: dict[str, dict[Member, None]] = {}
        self._dirty: dict[str, RoomFeed] = {}
        #: Count-only watchers of rooms (occupancy): see :mod:`presenced.core.occupancy`.
        self.watches: Watches[Member] = Watches()
        #: Whether own entries changed since the last boundary (the tick's gossip sends them).
        self.local_dirty = False
        #: True while the ticker reads paced peer links: what they change is flushed right
        #: after, in one frame per room (no leading-edge flush per link).
        self.holding = False
        #: True while the ticker reads busy clients at a boundary: their changes go out with
        #: the tick's gossip right after, so they wake no link (leading edge) and want no
        #: boundary (a link woken there found nothing left to send).
        self.reading_clients = False

    # ------------------------------------------------------------------ client operations

    def join(self, conn: Member, room: str, meta: Meta, ref: Any) -> None:
        """Add a session to a room: it gets the room's state, then everyone gets its join."""
        self.watches.remove(conn, room)
        feed = self.feeds.get(room)
        if feed is None:
            feed = self.feeds[room] = RoomFeed(room, self.state.room_presences(room))
        self.members.setdefault(room, {})[conn] = None
        conn.send(protocol.state(ref, room, feed.snapshot()), room=room)
        self._local([self.state.put(room, conn.user, conn.session, meta)])

    def update(self, conn: Member, room: str, meta: Meta) -> None:
        """Replace a joined session's meta (the caller has applied the patch)."""
        self.metrics.updates_in += 1
        self._local([self.state.put(room, conn.user, conn.session, meta)])

    def watch(self, conn: Member, room: str, ref: Any) -> None:
        """A session watches a room's counts (not a presence: nobody sees it). It gets them
        now, then whenever one changes, at most once per tick. A member that watches
        instead leaves the room first."""
        if conn in self.members.get(room, ()):
            self.leave(conn, room)
        counts = self.state.room_counts(room)
        self.watches.add(conn, room, counts)
        conn.send(protocol.occupancy(ref, room, *counts))

    def leave(self, conn: Member, room: str) -> None:
        """Remove a session from a room (or stop its watching the room's counts); the others
        see it leave at the next flush."""
        if self.watches.remove(conn, room):
            return
        members = self.members.get(room)
        if members is not None:
            members.pop(conn, None)
        change = self.state.remove(room, conn.user, conn.session)
        if change is not None:
            self._local([change])
        if not members:
            self._forget_room(room)

    def broadcast(self, conn: Member, room: str, event: str, data: Any, echo: bool) -> None:
        """Send an event to every member of the room, here and (through peers) everywhere."""
        self._deliver(room, conn.user, conn.session, self.region, event, data, conn, echo)
        self.outputs.flood(room, event, data, conn.user, conn.session, self.region)

    def publish(self, room: str, event: str, data: Any) -> int:
        """A broadcast from the server API: like a client's, from :data:`SERVER_USER`, to every
        member here and (through peers) everywhere. Returns how many members here got it."""
        user = protocol.SERVER_USER
        count = self._deliver(room, user, user, self.region, event, data, None, True)
        self.outputs.flood(room, event, data, user, user, self.region)
        return count

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
        sender: Member | None,
        echo: bool,
    ) -> int:
        members = self.members.get(room)
        if not members:
            return 0
        frame = self.outputs.frame(
            protocol.broadcast_event(room, user, session, region, event, data)
        )
        count = 0
        for member in members:
            if member is not sender or echo:
                member.push(frame)
                count += 1
        self.metrics.count_frames(count, len(frame))
        return count

    def current_meta(self, conn: Member, room: str) -> Meta | None:
        return self.state.get(room, conn.user, conn.session)

    def identified(self, conn: Member) -> None:
        """A connection said hello: direct messages for its user may now be written to it."""
        self.users.setdefault(conn.user, {})[conn] = None

    def user_connections(self, user: str) -> list[Member]:
        """This daemon's connections of ``user`` (every tab and device)."""
        return list(self.users.get(user, ()))

    def disconnect(self, conn: Member) -> None:
        """A connection ended: it leaves every room it was in."""
        self._forget_connection(conn)
        for room in list(conn.rooms):
            self.leave(conn, room)
        conn.rooms.clear()

    def detach(self, conn: Member) -> list[str]:
        """A connection ended but its session may be resumed: stop writing to it, keep the
        session's entries (everyone still sees it). Returns the rooms it is in."""
        self._forget_connection(conn)
        rooms = list(conn.rooms)
        for room in rooms:
            members = self.members.get(room)
            if members is not None:
                members.pop(conn, None)
                if not members:
                    self._forget_room(room)
        conn.rooms.clear()
        return rooms

    def attach(self, conn: Member) -> None:
        """A resumed session's new connection: it is a member of its rooms again and gets a
        fresh ``state`` of each (without ``ref``), then the diffs that follow; its user's
        waiting reliable messages are delivered now."""
        for room in conn.rooms:
            feed = self.feeds.get(room)
            if feed is None:
                feed = self.feeds[room] = RoomFeed(room, self.state.room_presences(room))
            self.members.setdefault(room, {})[conn] = None
            conn.send(protocol.state(None, room, feed.snapshot()), room=room)
        self.outputs.user_appeared(conn.user)

    def adopt(self, user: str, session: str, entries: Iterable[tuple[str, Meta]]) -> None:
        """A session resumed here from another daemon: write its entries (room, meta) into
        this daemon's partition, newer than the copies elsewhere (see PresenceState.put).
        Everyone keeps seeing it: at most its region changes."""
        changes = [self.state.put(room, user, session, meta) for room, meta in entries]
        if changes:
            self._local(changes)

    def end_session(self, user: str, session: str, rooms: Iterable[str]) -> None:
        """A detached session's grace ran out (or it may not keep a room): it leaves."""
        changes = [self.state.remove(room, user, session) for room in rooms]
        left = [change for change in changes if change is not None]
        if left:
            self._local(left)

    def remove_all_local(self) -> None:
        """Shutdown: every local entry leaves (peers hear it before the links close)."""
        self._local(self.state.remove_all_local())

    def room_snapshot(self, room: str) -> dict[str, Any]:
        """A fresh `state` frame for a member that must resync (slow reader)."""
        feed = self.feeds.get(room)
        presences = feed.snapshot() if feed is not None else {}
        return protocol.state(None, room, presences)

    def _forget_connection(self, conn: Member) -> None:
        self.connections.discard(conn)
        self.watches.remove_watcher(conn)
        sessions = self.users.get(conn.user)
        if sessions is not None:
            sessions.pop(conn, None)
            if not sessions:
                del self.users[conn.user]

    def _forget_room(self, room: str) -> None:
        self.members.pop(room, None)
        self.feeds.pop(room, None)
        self._dirty.pop(room, None)

    # ------------------------------------------------------------------ fan-out

    def _local(self, changes: list[Change]) -> None:
        """Changes of this replica's own entries: show them, and let peers know."""
        self.apply(changes)
        self.local_dirty = True
        if self.reading_clients:
            return
        self.want_tick()
        self.outputs.local_changed()

    def apply(
        self, changes: Iterable[Change], *, immediate: bool = False, from_peer: bool = False
    ) -> None:
        """Note visible changes in the feeds of rooms that have local members.

        A quiet room flushes at once (the leading edge, :meth:`TickPlan.quiet_before`);
        others wait for the tick's flush. ``from_peer`` marks changes a peer already
        coalesced over its own tick: they are flushed at :meth:`flush_time` (at once, unless
        near peers' batches of the tick are still to come), so a cross-region update waits
        one tick, not two. ``immediate`` flushes touched rooms now (liveness transitions:
        rare, and users expect to see them at once).
        """
        now = self.clock()
        touched: dict[str, RoomFeed] = {}
        feeds = self.feeds
        watched = self.watches.rooms
        counted = False
        for change in changes:
            feed = feeds.get(change.room)
            if feed is not None:
                feed.note(change)
                touched[change.room] = feed
            if change.kind != UPDATE:
                if watched and self.watches.note(change.room):
                    counted = True
                if change.kind == JOIN:
                    self.outputs.user_appeared(change.user)
        if counted:
            self._counts_changed(now)
        deferred = False
        quiet_before = self.plan.quiet_before(now, self.phase_clock(), self.holding)
        for room, feed in touched.items():
            if immediate or feed.last_flush < quiet_before:
                self._dirty.pop(room, None)
                self.flush(feed, now)
            else:
                self._dirty[room] = feed
                deferred = True
        if deferred and from_peer:
            self.flush_by(self.flush_time(now))

    def flush_time(self, now: float) -> float:
        """When this tick's changes are flushed (:meth:`TickPlan.flush_time`)."""
        return self.plan.flush_time(now, self.phase_clock(), self.outputs)

    def flush_by(self, at: float) -> None:
        """Make the ticker flush dirty rooms no later than ``at``."""
        if self.plan.flush_by(at):
            self.outputs.wake_at(at)

    def flush(self, feed: RoomFeed, now: float) -> None:
        """Send a room's pending changes to its members as one frame."""
        diff = feed.flush(now)
        if diff is None:
            return
        joins, leaves, updates = diff
        frame = self.outputs.frame(protocol.diff(feed.room, joins, leaves, updates))
        members = self.members.get(feed.room, ())
        for member in members:
            member.push(frame, room=feed.room)
        self.metrics.count_frames(len(members), len(frame))
        self.metrics.diffs_flushed += 1

    def flush_dirty(self) -> None:
        """Flush every room that changed since its last flush (the tick's flush)."""
        if self.watches.dirty:
            self._flush_counts(self.clock())
        if not self._dirty:
            return
        now = self.clock()
        dirty, self._dirty = self._dirty, {}
        for feed in dirty.values():
            self.flush(feed, now)

    @property
    def has_dirty(self) -> bool:
        """Whether some room has changes (or counts) waiting for the tick's flush."""
        return bool(self._dirty) or bool(self.watches.dirty)

    def _counts_changed(self, now: float) -> None:
        """Watched rooms' counts may have changed: like diffs, a room whose watchers heard
        nothing this tick is told at once (unless the ticker is reading clients or paced
        links: what they bring goes out together, at the tick's flush)."""
        if self.holding or self.reading_clients:
            self.flush_by(self.flush_time(now))
        else:
            self._flush_counts(now)

    def _flush_counts(self, now: float) -> None:
        """Send the changed counts of dirty watched rooms that sent none this tick, one
        frame per room for all its watchers; the others go at the next boundary."""
        watches = self.watches
        tick = self.tick_index()
        for watch in watches.due(tick):
            self._send_counts(watch, tick)
        if watches.dirty:
            self.flush_by(self.next_boundary(now))

    def _send_counts(self, watch: Watch[Member], tick: int) -> None:
        room = watch.room
        counts = self.state.room_counts(room)
        if not watch.take(counts, tick):
            return
        frame = self.outputs.frame(protocol.occupancy(None, room, *counts))
        for watcher in watch.watchers:
            watcher.push(frame)
        self.metrics.count_frames(len(watch.watchers), len(frame))

    def on_transitions(self, transitions: Iterable[Transition]) -> None:
        """Liveness changed: show, hide or drop a replica's entries."""
        for transition in transitions:
            replica, status = transition.replica, transition.status
            if status == UP:
                # Its entries show once this copy holds the clock it beat with (now, or at
                # the merge that brings it: the digests asked for here fetch what is missing).
                self.apply(self.state.show(replica, transition.clock), immediate=True)
                self.outputs.request_digests()
                self.outputs.replica_up(replica)
                continue
            if status == DOWN:
                self.apply(self.state.hide(replica), immediate=True)
            elif status == PURGED:
                self.apply(self.state.drop(replica), immediate=True)
            elif status == RETIRED:
                self.apply(self.state.retire(replica), immediate=True)
            self.outputs.replica_gone(replica, status)

    # ------------------------------------------------------------------ ticks

    def tick_index(self) -> int:
        """The current tick's index (aligned phase time / tick)."""
        return self.plan.tick_index(self.phase_clock())

    def tick_phase_s(self) -> float:
        """Seconds since the last aligned tick boundary (now)."""
        return self.plan.tick_phase_s(self.phase_clock())

    def next_boundary(self, now: float) -> float:
        """The first tick boundary after ``now`` (clock time)."""
        return self.plan.next_boundary(now, self.phase_clock())

    def interval_start(self, now: float) -> float:
        """The last tick boundary at or before ``now`` (clock time)."""
        return self.plan.interval_start(now, self.phase_clock())

    def want_tick(self) -> None:
        """Something must happen at the next tick boundary (local changes to send, beats
        due): wake the ticker for it. Without such a reason, paced clients or paced links,
        the ticker sleeps through boundaries, so an idle daemon does not wake every tick."""
        plan = self.plan
        if not plan.boundary_wanted:
            plan.want_boundary(self.clock(), self.phase_clock())
            self.outputs.wake_at(plan.boundary_at)

    def close_all(self, code: int, reason: str) -> None:
        for conn in list(self.connections):
            conn.close(code, reason)


__all__ = ["Counters", "Member", "Outputs", "Presence"]
