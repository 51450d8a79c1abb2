"""The node: owner of this daemon's presence state, its room feeds and its local members.

Every mutation of the presence state is a plain synchronous method call made from a
connection's task (or the gossip layer). trio is cooperative, so a method that never awaits
runs atomically: that is the "one owner" of the CRDT, with no lock and no channel hop on
the hot path.

Fan-out: each room with local members has a :class:`RoomFeed`. Changes are noted there and
flushed at most once per tick as one diff frame, encoded once and queued on every member's
outbox. A change in a room that has not flushed since the previous tick began is flushed at
once (leading edge), so light traffic sees no tick delay.

Aligned ticks: tick boundaries are multiples of the tick in wall-clock time, so every daemon of
a cluster ticks at the same moment (NTP keeps real regions within a millisecond or so). At a
boundary a daemon reads its busy clients and sends its local changes to its peers. It flushes
its rooms once the near peers' batches of the same tick are in (:meth:`Node.flush_time`): a
member gets one frame per tick with every region's changes in it, instead of one per region:
fewer frames, writes and wake-ups on both ends, for a few milliseconds of latency. Near peers
are not even waited for one by one: the ticker reads paced links itself ``flush_lag`` after
the boundary (see :mod:`presenced.server.peer_links`), and a link whose last batch came
within ``hold`` of its boundary is waited for up to ``hold``. A batch that arrives at any
other time (a distant region) is flushed at once: waiting would add latency and fold nothing
in. So a tick costs a busy daemon one wake-up through trio (the boundary; the ticker sleeps
on a kernel timer, :mod:`presenced.server.alarm`) however many regions it hears from: a near
batch not in by the end of the boundary's work is waited for on its socket, blocking the
thread up to the poll point (:meth:`PeerManager.wait_for_batches`), and only a batch later
than that costs a second one (the hold).
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import trio

from presenced.core import peer_wire, protocol
from presenced.core.client_frames import message_frame
from presenced.core.crdt import Change, Meta, PresenceState, ReplicaId
from presenced.core.fanout import RoomFeed
from presenced.core.liveness import DOWN, PURGED, RETIRED, UP, Liveness, Transition
from presenced.server.alarm import Alarm, open_alarm
from presenced.server.clients import PacedClients, Sessions
from presenced.server.metrics import Metrics

if TYPE_CHECKING:
    from presenced.config import Config
    from presenced.server.clients import ClientConnection
    from presenced.server.messaging import Messenger
    from presenced.server.peer_links import PeerManager

log = logging.getLogger(__name__)


#: The latest poll point (seconds after a tick boundary), for long ticks.
FLUSH_LAG_MAX = 0.002


def _run_clock() -> Callable[[], float]:
    """trio's time without the two layers around it (the node reads it ~35 times per busy
    tick): the running loop's clock's own method; ``trio.current_time`` outside a run."""
    try:
        return trio.lowlevel.current_clock().current_time
    except RuntimeError:
        return trio.current_time


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
        if clock is trio.current_time:
            clock = _run_clock()
        self.region = config.region
        self.tick = config.tick_ms / 1000.0
        #: When, after a tick boundary, the ticker reads paced peer links (and flushes what
        #: they bring; see the module docstring). Near batches that miss the boundary's own
        #: work land within ~2 ms on a loaded 2-core VM, whatever the tick (it is the time
        #: their daemon waits for a core); later ones get the hold's read.
        self.flush_lag = min(self.tick / 12, FLUSH_LAG_MAX)
        #: How long after a tick boundary a tick's flush may wait for near peers' batches.
        self.hold = self.tick / 4
        self.clock = clock
        self.wall_clock = wall_clock
        #: The clock tick boundaries are aligned to: wall time, shared by every daemon of a
        #: cluster (a simulation sets its virtual clock here, to stay deterministic).
        self.phase_clock = wall_clock
        self.state = PresenceState(replica, config.region)
        self.feeds: dict[str, RoomFeed] = {}
        #: room -> members on this daemon (a dict used as an ordered set).
        self.members: dict[str, dict[ClientConnection, None]] = {}
        self.connections: set[ClientConnection] = set()
        #: user -> that user's connections here (a dict used as an ordered set): where direct
        #: messages for the user are written.
        self.users: dict[str, dict[ClientConnection, None]] = {}
        #: Connections whose input the ticker reads at tick boundaries (they stream updates).
        self.paced = PacedClients()
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
        #: Client liveness (pings, dead connections) and sessions waiting to be resumed.
        self.sessions = Sessions(self)
        self._local_dirty = False
        #: When the ticker flushes dirty rooms next (clock time; inf: not scheduled).
        self._flush_at = math.inf
        #: When the ticker reads paced peer links next (this tick's poll point or hold, or inf).
        self._poll_at = math.inf
        #: Whether that read is the tick's last for a paced link's batch (see PeerLink.poll).
        self._final_poll = True
        #: True while the ticker reads paced peer links: what they change is flushed right
        #: after, in one frame per room (no leading-edge flush per link).
        self._holding = False
        #: True while the ticker reads busy clients at a boundary: their changes go out with
        #: the tick's gossip right after, so they wake no link (leading edge) and ask for no
        #: tick (a link woken there found nothing left to send, ~10 times a second).
        self._reading_clients = False
        #: The next tick boundary (clock time), and whether the ticker must wake for it
        #: (besides paced clients and links, which keep it ticking): an idle daemon sleeps.
        self._next_boundary = -math.inf
        self._tick_wanted = False
        #: What the ticker sleeps on (set when it starts): moved earlier when a flush or a
        #: tick is requested.
        self._alarm: Alarm | None = None

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
        frame = message_frame(message)
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
        self.paced.discard(conn)
        sessions = self.users.get(conn.user)
        if sessions is not None:
            sessions.pop(conn, None)
            if not sessions:
                del self.users[conn.user]
        for room in list(conn.rooms):
            self.leave(conn, room)
        conn.rooms.clear()

    def detach(self, conn: ClientConnection) -> list[str]:
        """A connection ended but its session may be resumed: stop writing to it, keep the
        session's entries (everyone still sees it). Returns the rooms it is in."""
        self.connections.discard(conn)
        self.paced.discard(conn)
        sessions = self.users.get(conn.user)
        if sessions is not None:
            sessions.pop(conn, None)
            if not sessions:
                del self.users[conn.user]
        rooms = list(conn.rooms)
        for room in rooms:
            members = self.members.get(room)
            if members is not None:
                members.pop(conn, None)
                if not members:
                    del self.members[room]
                    self.feeds.pop(room, None)
                    self._dirty.pop(room, None)
        conn.rooms.clear()
        return rooms

    def attach(self, conn: ClientConnection) -> None:
        """A resumed session's new connection: it is a member of its rooms again and gets a
        fresh ``state`` of each (without ``ref``), then the diffs that follow; its user's
        waiting reliable messages are pumped now."""
        for room in conn.rooms:
            feed = self.feeds.get(room)
            if feed is None:
                feed = self.feeds[room] = RoomFeed(room, self.state.room_presences(room))
            self.members.setdefault(room, {})[conn] = None
            conn.send(protocol.state(None, room, feed.snapshot()), room=room)
        messenger = self.messenger
        if messenger is not None and conn.user in messenger.pending_users:
            messenger.user_appeared(conn.user)

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

    # ------------------------------------------------------------------ fan-out

    def _local(self, changes: list[Change]) -> None:
        """Changes of this replica's own entries: show them, and let peers know."""
        self.apply(changes)
        self._local_dirty = True
        if self._reading_clients:
            return
        self.want_tick()
        if self.gossip is not None:
            self.gossip.local_changed()

    def apply(
        self, changes: Iterable[Change], *, immediate: bool = False, from_peer: bool = False
    ) -> None:
        """Note visible changes in the feeds of rooms that have local members.

        A room that has not flushed since the start of the previous tick interval flushes at
        once (leading edge); others wait for the tick's flush. ``from_peer`` marks changes a
        peer already coalesced over its own tick: they are flushed at :meth:`flush_time` (at
        once, unless near peers' batches of the tick are still to come), so a cross-region
        update waits one tick, not two. ``immediate`` flushes touched rooms now (liveness
        transitions: rare, and users expect to see them at once).
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
        deferred = False
        # Quiet: no flush since the start of the previous tick interval. (Not "a tick since the
        # last flush": flush times jitter by a few milliseconds from tick to tick, and a busy
        # room would then take a late change for a quiet one and flush twice in a tick.)
        interval = self.interval_start(now)
        quiet_before = -math.inf if self._holding else interval - self.tick
        for room, feed in touched.items():
            if immediate or feed.last_flush < quiet_before:
                self._dirty.pop(room, None)
                self.flush(feed, now)
            else:
                self._dirty[room] = feed
                deferred = True
        if deferred and from_peer:
            self._flush_by(self.flush_time(now))

    def flush_time(self, now: float) -> float:
        """When this tick's changes are flushed: once near peers' batches of the tick are in,
        so a member gets them all in one frame. A peer whose previous batch came within
        ``hold`` of its boundary is waited for, up to ``hold`` after this boundary; a paced
        link whose batch is not read yet, until the poll point (``flush_lag``); with neither,
        at once. (On a loaded machine every batch is often in by the end of the boundary's
        own work: the tick then flushes in that same wake-up.)"""
        gossip = self.gossip
        if gossip is None:
            return now
        if gossip.awaiting_batches():
            return max(now, self.interval_start(now) + self.hold)
        if gossip.paced_pending():
            return max(now, self.interval_start(now) + self.flush_lag)
        return now

    def _flush_by(self, when: float) -> None:
        """Make the ticker flush dirty rooms no later than ``when``."""
        if when < self._flush_at:
            self._flush_at = when
            if self._alarm is not None:
                self._alarm.move(when)

    def on_transitions(self, transitions: Iterable[Transition]) -> None:
        """Liveness changed: show, hide or drop a replica's entries."""
        for transition in transitions:
            replica, status = transition.replica, transition.status
            if status == UP:
                # Its entries show once this copy holds the clock it beat with (now, or at
                # the merge that brings it: the digests asked for here fetch what is missing).
                log.info("replica %s is up", replica)
                self.apply(self.state.show(replica, transition.clock), immediate=True)
                if self.gossip is not None:
                    self.gossip.request_digests()
                    self.gossip.replica_up(replica)
            elif status == DOWN:
                log.warning("replica %s is down: its users leave every room", replica)
                self.apply(self.state.hide(replica), immediate=True)
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
        frame = message_frame(protocol.diff(feed.room, joins, leaves, updates))
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

    def next_boundary(self, now: float) -> float:
        """The first tick boundary after ``now`` (clock time), aligned on ``phase_clock``.

        Never closer than a thousandth of a tick: at a boundary, rounding must not yield the
        same boundary again (a busy loop under a mock clock).
        """
        offset = self.phase_clock() - now
        boundary = (self._tick_of(now + offset) + 1) * self.tick - offset
        return boundary if boundary - now > self.tick / 1000 else boundary + self.tick

    def interval_start(self, now: float) -> float:
        """The last aligned tick boundary at or before ``now`` (clock time)."""
        offset = self.phase_clock() - now
        return self._tick_of(now + offset) * self.tick - offset

    def tick_phase(self) -> float:
        """Seconds since the last aligned tick boundary (now)."""
        wall = self.phase_clock()
        return max(0.0, wall - self._tick_of(wall) * self.tick)

    def tick_number(self) -> int:
        """The current tick's number (aligned wall time / tick)."""
        return self._tick_of(self.phase_clock())

    def _tick_of(self, wall: float) -> int:
        # (a hair of slack: at an exact boundary, k * tick / tick may come out just under k)
        return math.floor(wall / self.tick + 1e-9)

    def want_tick(self) -> None:
        """Something must happen at the next tick boundary (local changes to send, beats
        due): wake the ticker for it. Without such a reason, paced clients or paced links, the
        ticker sleeps through boundaries, so an idle daemon does not wake every tick."""
        if not self._tick_wanted:
            self._tick_wanted = True
            now = self.clock()
            if self._next_boundary <= now:
                self._next_boundary = self.next_boundary(now)
            if self._alarm is not None:
                self._alarm.move(self._next_boundary)

    def _ticking(self) -> bool:
        gossip = self.gossip
        return self._tick_wanted or bool(self.paced) or (gossip is not None and bool(gossip.paced))

    async def run_ticker(self) -> None:
        """At each aligned tick boundary that has work (see :meth:`want_tick`) read busy
        clients and send local changes to peers; read paced links ``flush_lag`` later; flush
        rooms at :meth:`flush_time`."""
        self._alarm = open_alarm(self.clock)
        try:
            await self._tick_forever(self._alarm)
        finally:
            self._alarm.close()
            self._alarm = None

    async def _tick_forever(self, alarm: Alarm) -> None:
        self._next_boundary = self.next_boundary(self.clock())
        while True:
            boundary = self._next_boundary if self._ticking() else math.inf
            await alarm.sleep_until(min(boundary, self._flush_at, self._poll_at))
            gossip = self.gossip
            now = self.clock()
            started = time.perf_counter()
            # (want_tick may have moved _next_boundary on between the deadline and now: the
            # boundary slept for is still this one's to handle)
            if now >= boundary or now >= self._next_boundary:
                self._next_boundary = self.next_boundary(now)
                if self._ticking():
                    now = self._boundary_work(now, gossip)
            if now >= self._poll_at:
                self._poll_at = math.inf
                if gossip is not None:
                    final = self._final_poll
                    now = self._read_paced(gossip, final=final)
                    if not final and gossip.paced_pending():
                        # A late batch gets a last read at the hold, when the tick's flush
                        # waits for it anyway: no wake-up of its own, and the link stays paced.
                        self._poll_at = max(now, self.interval_start(now) + self.hold)
                        self._final_poll = True
            if now >= self._flush_at:
                self._flush_at = math.inf
                self.flush_dirty()
            self.metrics.observe_flush(time.perf_counter() - started)

    def _boundary_work(self, woke: float, gossip: PeerManager | None) -> float:
        """Read busy clients, send the tick's gossip, read the near batches that are in (or
        land before the poll point), and schedule the flush. Returns the time after it."""
        # Cleared before the work: what asks for a tick during it gets the next.
        self._tick_wanted = False
        self._reading_clients = True
        try:
            self.paced.read()  # busy clients' updates make this tick's gossip
        finally:
            self._reading_clients = False
        now = woke
        if gossip is not None:
            gossip.tick(self._local_dirty)
            if gossip.paced:
                now = self._await_paced(gossip, woke + self.flush_lag)
        self._local_dirty = False
        if self._dirty:
            self._flush_by(self.flush_time(now))
        return now

    def _await_paced(self, gossip: PeerManager, poll_point: float) -> float:
        """Read the near batches already in (the boundary's work takes a while), then wait
        on their sockets for those still missing, up to the poll point; a batch later than
        that is read at the poll point's own wake-up. Returns the time after the reads."""
        now = self._read_paced(gossip, final=False)
        while (
            gossip.paced_pending()
            and now < poll_point
            and gossip.wait_for_batches(poll_point - now)
        ):
            now = self._read_paced(gossip, final=False)
        if gossip.paced_pending():
            self._poll_at = poll_point
            self._final_poll = False
        return now

    def _read_paced(self, gossip: PeerManager, *, final: bool) -> float:
        """Read paced peer links; what they change is flushed in one frame per room (no
        leading-edge flush per link). Returns the time after the reads."""
        self._holding = True
        try:
            gossip.poll_paced(final=final)
        finally:
            self._holding = False
        return self.clock()

    def room_snapshot(self, room: str) -> dict[str, Any]:
        """A fresh `state` frame for a member that must resync (slow reader)."""
        feed = self.feeds.get(room)
        presences = feed.snapshot() if feed is not None else {}
        return protocol.state(None, room, presences)

    # ------------------------------------------------------------------ shutdown

    def remove_all_local(self) -> None:
        """Shutdown: every local entry leaves (peers hear it before the links close), the
        detached sessions' too, and no session waits to be resumed any more."""
        self.sessions.shutdown()
        self._local(self.state.remove_all_local())

    def close_all(self, code: int, reason: str) -> None:
        for conn in list(self.connections):
            conn.close(code, reason)
