"""Peer links: persistent channels to other daemons, and the gossip that runs over them.

One :class:`PeerLink` per connected peer. Each link has a reader (merges what the peer sends)
and a writer that, whenever it is woken, builds one gossip message with everything the peer
lacks: for every replica, the records newer than what the peer is believed to hold
(``sent``). Extraction happens when the writer is free, so a link that is slow or busy
coalesces: a burst of cursor moves crosses the ocean as the latest value per entry.

Timing, chosen for latency and for few messages:

* local changes wake links at the leading edge (a link idle for a tick sends at once),
  otherwise at the next tick boundary (aligned across daemons, see :mod:`presenced.server.node`):
  this replica's own deltas, heartbeats and periodic digests go out only then, so a busy link
  carries one gossip message per tick;
* changes merged from one peer are relayed to the others immediately (two hops cost two
  link delays, not two ticks);
* a daemon flushes rooms touched by a peer's gossip at once, unless other peers' batches of
  the same tick are still to come: a link whose previous batch arrived early in its tick
  (within the node's ``hold``, a quarter tick) is waited for, up to the hold, so its batch,
  the local changes and the other near peers' batches reach members as one frame
  (:meth:`PeerManager.awaiting_batches`). A far peer's batches land at a steady phase of the
  tick, past the hold or within it: either way, waiting for them costs no latency.

Paced reading: a near peer's tick batch arrives within the flush lag of the boundary it was sent
at. Once a link's gossip has arrived in that window a few times running, its reader task parks
and the node's ticker reads the link with ``receive_nowait`` (:meth:`PeerLink.poll`): right
after the boundary's own work, at the poll point (the flush lag) if the batch was not in yet,
and a last time at the node's hold if it still was not: no wake-up per peer message, and the
same flush the message would have joined anyway. Only that last read, finding no batch of
the tick (the peer was quiet, or its batch is late), hands the link back to its reader task,
which waits for data as usual, and the link's next batch on time paces it again. A tick's
batch is the message the peer's tick sent, marked ``tick`` on the wire: repairs, relays and
link-state news go out whenever they come in. A peer whose batches land later in the tick (a
far one, unless its delay is within the flush lag of a whole number of ticks: then pacing
changes nothing either) is not paced. While a link is paced, its other
messages (routed messages, pings) wait for that read: at most a tick and a flush lag. RTT
pings go out with the next gossip message (normally the tick's); once the ticker has read
the peer's batch of that tick, the link goes back to its reader, which reads the pong as it
arrives and paces the link again (one wake-up per ping). A paced peer answers at its flush
point, and a pong that lands before the batch is read with it, so a near link's RTT reads up
to two flush lags high.

Repair: every ``digest_interval`` each side sends its digest; the other side resets ``sent``
to it and wakes its writer, which then sends exactly what is missing (a whole partition if
the peer is behind the tombstone floor). A delta that cannot apply (a gap) triggers an early
digest. The first digest after the hello is what starts deltas flowing on a new link.

Liveness: heartbeats ride on gossip messages every ``heartbeat_interval``; a link that hears
nothing for ``link_timeout`` is closed and redialed (if we dialed it).

Duplicates: if both sides dial each other, the link dialed by the node whose name sorts
first survives, on both sides.

Routing: each daemon advertises its live links and their RTT (link-state, see
:mod:`presenced.core.routing`); advertisements ride on gossip messages, each link sending the
ones its peer may lack, and are flooded on as soon as they are learned. Routed messages
(direct messages, receipts, fetches) are queued on the next hop's link and sent ahead of the
gossip.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import random
import select
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import attrs
import trio

from presenced.core import peer_wire as wire
from presenced.core.crdt import DeltaError, ReplicaId
from presenced.core.liveness import DOWN, PURGED, RETIRED
from presenced.core.redial import Redial
from presenced.core.routing import LinkState, RouteTable
from presenced.server.alarm import open_alarm
from presenced.server.transport import ChannelClosed, PeerChannel, PeerTransport

if TYPE_CHECKING:
    from presenced.server.node import Node

log = logging.getLogger(__name__)

#: Gossip messages in a row that arrive within the flush lag of their tick before a link is
#: read by the ticker instead of its reader task.
PACE_AFTER = 3
#: Messages one paced read handles at most; a peer sending more than that per tick is handed
#: back to the reader task.
PACED_READ_LIMIT = 256


@attrs.frozen
class GossipSettings:
    """Timings of the peer layer (seconds)."""

    heartbeat_interval: float = 0.5
    digest_interval: float = 2.0
    #: Seconds between RTT pings (for routes; liveness rides on the heartbeats). Each ping
    #: and its pong is a message that wakes the other daemon, so not every heartbeat.
    ping_interval: float = 2.0
    link_timeout: float = 2.5
    handshake_timeout: float = 5.0
    #: Redial backoff (:class:`presenced.core.redial.Redial`): from 0.2 s, doubling, at most
    #: 1 s between attempts, so a listener that restarts is redialled within a second (one
    #: TCP connect a second to a dead peer is no storm).
    backoff_initial: float = 0.2
    backoff_max: float = 1.0
    #: Routed messages queued on one link before more are dropped (retransmission repairs).
    max_queued: int = 10_000


@attrs.define
class _Dialer:
    """One dialled URL: the peer's node once a link told it, and the wake-up that ends its
    backoff wait early."""

    node: str | None = None
    hurry: trio.Event = attrs.field(factory=trio.Event)


class LinkRefused(Exception):
    """The handshake failed: wrong version, wrong certificate, or a link to ourselves."""


class PeerLink:
    """One live link to one peer replica."""

    def __init__(
        self, manager: PeerManager, channel: PeerChannel, hello: wire.Hello, dialed: bool
    ) -> None:
        self.manager = manager
        self.node = manager.node
        self.channel = channel
        self.hello = hello
        self.remote = hello.replica
        self.region = hello.region
        #: True if this daemon dialed the link (the dialer redials when it breaks).
        self.dialed = dialed
        #: Per replica, the clock the peer is believed to hold; None until its first digest.
        self.sent: dict[ReplicaId, int] | None = None
        self.rtt: float | None = None
        #: Nodes the peer has direct links to (from its gossip): not relayed to it.
        self.remote_links: frozenset[str] = frozenset()
        self.last_received = self.node.clock()
        #: The tick in which the link last sent something.
        self.sent_tick = -2
        self._wakeup = trio.Event()
        self._beat_due = True
        self._digest_due = True
        self._ping_due = True
        self._next_digest = self.last_received + manager.settings.digest_interval
        self._next_ping = self.last_received + manager.settings.ping_interval
        #: Whether the ticker reads this link (see "Paced reading" above); the reader task
        #: waits on ``_resume`` meanwhile.
        self.paced = False
        self._resume = trio.Event()
        #: Ticks in a row whose gossip batch arrived within the flush lag of the boundary.
        self._in_window = 0
        #: Whether the next late batch leaves ``_in_window`` as it is: a paced link handed
        #: back for one late batch (or for a pong) is still a near peer's.
        self._forgive_late = False
        #: The tick of the last gossip batch (the peer's tick message), and that tick
        #: again if the batch came within the node's ``hold`` of the boundary: see
        #: :meth:`awaited` and :meth:`PeerManager.paced_pending`.
        self.batch_tick = -1
        self._early_tick = -1
        #: Whether this replica's own changes go out at the next wake-up (the tick, the
        #: leading edge, or a repair); relays in between carry only other replicas' deltas.
        self._own_due = True
        self.messages_out = 0
        self.messages_in = 0
        self._pings: dict[int, float] = {}
        self._ping_ids = itertools.count(1)
        self._cancel = trio.CancelScope()
        #: True while the writer task is sending (the ticker then leaves the tick's gossip
        #: to it, to keep the order of messages), and whether it has a tick's message to send.
        self._writing = False
        self._tick_deferred = False
        self.bytes_out = 0
        self.bytes_in = 0
        self.error: ChannelClosed | wire.PeerProtocolError | None = None
        #: Routed messages waiting for the writer.
        self._queue: deque[wire.PeerMessage] = deque()
        self.dropped = 0
        #: Per advertising node, the (incarnation, seq) of the link state sent on this link.
        self._states_sent: dict[str, tuple[int, int]] = {}

    @property
    def dialer_name(self) -> str:
        return self.node.replica.node if self.dialed else self.remote.node

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Run the link until it breaks; re-raises what broke it (ChannelClosed, a protocol
        error), unwrapped, so the manager can log it in one line."""
        self.node.want_tick()  # the first digest and beats go at the next boundary
        try:
            with self._cancel:
                async with trio.open_nursery() as nursery:
                    for part in (self._reader, self._writer):
                        nursery.start_soon(self._until_broken, part, nursery.cancel_scope)
        finally:
            self._unpace()
        if self.error is not None:
            raise self.error

    async def _until_broken(
        self, part: Callable[[], Awaitable[None]], scope: trio.CancelScope
    ) -> None:
        try:
            await part()
        except (ChannelClosed, wire.PeerProtocolError, ValueError) as exc:
            self._record(exc)
        finally:
            scope.cancel()

    def close(self) -> None:
        self._cancel.cancel()

    def wake(self) -> None:
        self._wakeup.set()

    def want_digest(self) -> None:
        self._digest_due = self._own_due = True
        self._wakeup.set()

    def relay_now(self) -> None:
        """Build the gossip the peer lacks now, and queue it for the writer (in order after
        what it is sending): for changes that must leave before the state they come from."""
        message = self._build()
        if message is not None:
            self.enqueue(message)

    def enqueue(self, message: wire.PeerMessage) -> bool:
        """Queue a routed message for the writer; False if the queue is full (dropped)."""
        if len(self._queue) >= self.manager.settings.max_queued:
            self.dropped += 1
            return False
        self._queue.append(message)
        self._wakeup.set()
        return True

    def poke(self, tick: int) -> None:
        """Local state changed (in tick number ``tick``): send at once if the link sent
        nothing in this tick or the previous one, else at the next tick. (By tick number, not
        by time since the last send: a stream one tick apart then settles into tick batches,
        instead of a leading-edge send per change, each a wake-up on both sides.)"""
        if self.sent_tick < tick - 1:
            self._own_due = True
            self._wakeup.set()

    def tick(self, local_changed: bool) -> None:
        """A tick boundary: send local changes, and heartbeats, digests or pings that are due.

        Sent from the ticker itself when the writer task is idle (no task switch per link);
        what the socket does not take at once, the writer finishes. Never raises: what
        breaks the link ends this link alone.
        """
        if local_changed:
            self._own_due = True
        if not (local_changed or self._beat_due or self._digest_due or self._ping_due):
            return
        if self._writing or self._queue:
            self._tick_deferred = True
            self._wakeup.set()  # the writer sends it after what it has, in order
            return
        try:
            for message in self._due(at_tick=True):
                self._send_now(message)
        except Exception as exc:  # recorded: the link ends, the ticker goes on
            self._give_up(exc)

    # ------------------------------------------------------------------ writing

    async def _writer(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            self._writing = True
            try:
                await self.channel.flush()  # what the ticker's sends left
                queue = self._queue
                sent = 0
                while queue:
                    await self._send(queue.popleft())
                    sent += 1
                    if sent % 64 == 0:
                        await trio.lowlevel.checkpoint()  # (sends the socket takes never yield)
                at_tick, self._tick_deferred = self._tick_deferred, False
                for message in self._due(at_tick=at_tick):
                    await self._send(message)
            finally:
                self._writing = False

    def _due(self, *, at_tick: bool) -> list[wire.PeerMessage]:
        """What goes out now besides routed messages: the gossip message, then a due ping if
        this is the tick's send (a ping sent mid-tick, with a pong or a relay, waits for the
        peer's next tick read, and its pong for ours: its RTT read a tick high)."""
        message = self._build(at_tick)
        due: list[wire.PeerMessage] = [] if message is None else [message]
        if at_tick and self._ping_due:
            self._ping_due = False
            due.append(self._new_ping())
        return due

    def _encode(self, message: wire.PeerMessage) -> bytes:
        data = self.manager.encode(message)
        self.sent_tick = self.node.tick_number()
        self.bytes_out += len(data)
        self.messages_out += 1
        return data

    async def _send(self, message: wire.PeerMessage) -> None:
        await self.channel.send(self._encode(message))

    def _send_now(self, message: wire.PeerMessage) -> None:
        if not self.channel.send_nowait(self._encode(message)):
            self._wakeup.set()  # the socket is full: the writer waits for it

    def _build(self, at_tick: bool = False) -> wire.Gossip | None:
        node = self.node
        now = node.clock()
        beats = node.liveness.beats(now, node.state.own.clock) if self._beat_due else []
        links = tuple(self.manager.links) if self._beat_due else None
        digest = node.state.digest() if self._digest_due else None
        if self._digest_due:
            self._states_sent = {}  # resend every link state now and then: repairs any loss
        own_due = self._own_due
        self._beat_due = self._digest_due = self._own_due = False
        states = []
        for state in self.manager.routes.states():
            version = (state.incarnation, state.seq)
            if state.node != self.remote.node and self._states_sent.get(state.node) != version:
                states.append(state)
                self._states_sent[state.node] = version
        deltas = []
        if self.sent is not None:
            sent = self.sent
            direct = self.remote_links
            own = node.replica
            for replica, part in node.state.partitions.items():
                known = sent.get(replica, 0)
                if replica == own:
                    if not own_due:
                        continue  # goes at the next tick, with whatever else changes by then
                elif replica.node in direct:
                    continue  # the peer hears it from its origin; digests repair any gap
                if part.clock > known and replica != self.remote:
                    delta = node.state.extract(replica, known)
                    if delta is not None:
                        deltas.append(delta)
                    sent[replica] = part.clock
        if not (beats or deltas or states or digest is not None):
            return None
        return wire.Gossip(tuple(beats), tuple(deltas), digest, links, tuple(states), at_tick)

    def on_heartbeat(self, now: float) -> None:
        """Every heartbeat interval (the manager's heartbeat task: one wake-up for every
        link, and their heartbeats go in the same tick's gossip, encoded once): heartbeats,
        due digests and RTT pings ride on the next tick's message; a link that heard nothing
        for ``link_timeout`` is closed."""
        settings = self.manager.settings
        if now - self.last_received > settings.link_timeout:
            log.warning("peer link to %s timed out; closing it", self.remote)
            self.close()
            return
        self._beat_due = True
        if now >= self._next_digest:
            self._digest_due = True
            self._next_digest = now + settings.digest_interval
        if now >= self._next_ping:
            self._ping_due = True  # goes with the next tick's gossip (see the docstring)
            self._next_ping = now + settings.ping_interval

    def _new_ping(self) -> wire.PeerPing:
        """An RTT ping to send now. Its pong is read as it arrives: a paced link goes back to
        its reader once the ticker has read the tick's batch (:meth:`poll`), and the pong
        paces it again (:meth:`_reader`)."""
        ping_id = next(self._ping_ids)
        self._pings = {ping_id: self.node.clock()}
        return wire.PeerPing(ping_id)

    # ------------------------------------------------------------------ reading

    async def _reader(self) -> None:
        while True:
            if self.paced:
                await self._resume.wait()
                continue
            previous_batch = self.batch_tick
            message = self._receive(await self.channel.receive())
            if isinstance(message, wire.Gossip) and self.batch_tick != previous_batch:
                pace = self._count_batch(previous_batch)
            else:
                pace = isinstance(message, wire.PeerPong)  # (see _new_ping)
            if pace and self._in_window >= PACE_AFTER and not self._pings:
                self._pace()

    def _count_batch(self, previous_batch: int) -> bool:
        """The reader read a tick's batch: count the ticks in a row whose batch came within
        the flush lag of the boundary (a busy near peer, which pacing suits; a quiet one's
        heartbeats are not in a row). Returns whether this one did."""
        node = self.node
        if node.tick_phase() >= node.flush_lag:
            if self._forgive_late:
                self._forgive_late = False
            else:
                self._in_window = 0
            return False
        if previous_batch == self.batch_tick - 1:
            self._in_window += 1
        else:
            self._in_window = 1
        return True

    def poll(self, final: bool = True) -> None:
        """Read what a paced link's peer sent. The ticker calls this right after the
        boundary's own work (a batch may be in by then), at its poll point, and, for a batch
        still missing, a last time (``final``) at the hold: a link with nothing then goes back
        to its reader task.

        Never raises: what breaks the link (the channel closing, a protocol breach, a bug) is
        recorded and ends this link alone.
        """
        tick = self.node.tick_number()
        read = 0
        try:
            while read < PACED_READ_LIMIT:
                data = self.channel.receive_nowait()
                if data is None:
                    break
                self._receive(data)
                read += 1
            else:
                self._unpace()  # a flood: the reader task takes it at its own pace
                return
        except Exception as exc:  # recorded: the link ends, the ticker goes on
            self._give_up(exc)
            return
        if final and self.batch_tick != tick:
            self._unpace(eligible=True)  # no batch this tick: wait for the peer's next message
        elif self._pings and self.batch_tick == tick:
            self._unpace(eligible=True)  # the pong is read as it arrives

    def _give_up(self, exc: Exception) -> None:
        """The ticker met what breaks this link (in a send or a paced read): end the link."""
        self._record(exc)
        self.close()  # first: the parked reader gets Cancelled, not another message
        self._unpace()

    def _record(self, exc: Exception) -> None:
        """Keep the first reason the link broke, as ChannelClosed or PeerProtocolError."""
        if isinstance(exc, ChannelClosed | wire.PeerProtocolError):
            error: ChannelClosed | wire.PeerProtocolError = exc
        elif isinstance(exc, ValueError):  # e.g. a message over the transport's size limit
            log.error("peer link to %s: %s; closing it", self.remote, exc)
            error = ChannelClosed(str(exc))
        else:
            log.error("peer link to %s: unexpected error; closing it", self.remote, exc_info=exc)
            error = ChannelClosed("internal error")
        self.error = self.error or error

    def _pace(self) -> None:
        if not self.paced:
            self.paced = True
            self._resume = trio.Event()
            self.manager.paced[self] = None
            self.node.want_tick()  # (an idle ticker sleeps through boundaries)

    def _unpace(self, *, eligible: bool = False) -> None:
        """Hand the link back to its reader task. An ``eligible`` link (a near peer that
        missed one tick, or a ping's pong to read on arrival) is paced again by its next
        batch on time, or by the pong: one reader wake-up, not ``PACE_AFTER``."""
        self._in_window = PACE_AFTER if eligible else 0
        self._forgive_late = eligible
        if self.paced:
            self.paced = False
            self.manager.paced.pop(self, None)
            self._resume.set()

    def _receive(self, data: bytes) -> wire.PeerMessage:
        """Handle one message from the peer."""
        self.last_received = self.node.clock()
        self.bytes_in += len(data)
        self.messages_in += 1
        message = wire.decode(data)
        if isinstance(message, wire.Gossip):
            self._on_gossip(message)
        elif isinstance(message, wire.PeerPing):
            # Through the writer: the reader never blocks on a send, or two daemons
            # both writing a big message could stop reading each other for good.
            self.enqueue(wire.PeerPong(message.id))
        elif isinstance(message, wire.PeerPong):
            started = self._pings.pop(message.id, None)
            if started is not None:
                self.rtt = self.node.clock() - started
                self.manager.advertise()
        elif isinstance(message, wire.Direct | wire.Receipt | wire.Pull | wire.Pulled):
            if self.node.messenger is not None:
                self.node.messenger.on_routed(message, self.remote.node)
        elif isinstance(message, wire.RoomBroadcast):
            self.manager.on_broadcast(message, self)
        elif isinstance(message, wire.Bye):
            self.manager.on_bye(message.replica, self)
        elif message == self.hello:
            pass  # the handshake's hello again (a duplicating network): nothing new
        else:
            raise wire.PeerProtocolError("hello sent twice")
        return message

    def awaited(self, tick: int) -> bool:
        """Whether this tick's flush waits for this link's batch: the previous tick's came
        early in that tick, and this tick's has not come yet."""
        return self._early_tick == tick - 1

    def _on_gossip(self, message: wire.Gossip) -> None:
        node = self.node
        now = node.clock()
        # Only the sender's tick message is its batch: a repair, relay or news sent mid-tick
        # and read at the next tick's first read, taken for that tick's batch, made the
        # tick flush without the real one.
        if message.tick and self.batch_tick != (tick := node.tick_number()):
            self.batch_tick = tick
            self._early_tick = tick if node.tick_phase() < node.hold else -1
        for beat in message.beats:
            node.on_transitions(node.liveness.observe(beat, now))
        if message.links is not None:
            self.remote_links = frozenset(message.links)
        if message.link_states:
            self.manager.learn_link_states(message.link_states, self)
        merged: list[ReplicaId] = []
        gap = False
        changes = []
        for delta in message.deltas:
            if self.sent is not None:
                self.sent[delta.replica] = max(self.sent.get(delta.replica, 0), delta.clock)
            if not node.liveness.is_up(delta.replica):
                continue
            try:
                result = node.state.merge(delta)
            except DeltaError as exc:
                raise wire.PeerProtocolError(str(exc)) from None
            changes.extend(result.changes)
            if result.outcome == "applied":
                merged.append(delta.replica)
            elif result.outcome == "gap":
                gap = True
        if changes:
            node.apply(changes, from_peer=True)
        if node.state.index.taken_over or node.state.index.left_elsewhere:
            node.sessions.contested()  # a session held here was resumed, or left, elsewhere
        if merged:
            self.manager.relay(merged, exclude=self)
        if gap:
            self.want_digest()
        if message.digest is not None:
            # The peer's own account of what it holds: send exactly what it lacks.
            self.sent = dict(message.digest)
            self._own_due = True
            self.wake()


class PeerManager:
    """Accepts and dials peer links, and keeps one link per peer node."""

    def __init__(
        self,
        node: Node,
        transport: PeerTransport,
        peers: tuple[str, ...],
        settings: GossipSettings | None = None,
        *,
        accept: bool = True,
        rng: random.Random | None = None,
    ) -> None:
        self.node = node
        #: Whether to accept inbound links (only dial when False: no --peer-listen).
        self.accept = accept
        self.transport = transport
        self.peers = peers
        self.settings = settings or GossipSettings()
        self.links: dict[str, PeerLink] = {}
        #: Links the node's ticker reads at its flush point (an ordered set).
        self.paced: dict[PeerLink, None] = {}
        #: While links send the tick's gossip: the last message encoded, and its bytes.
        self._in_tick = False
        self._tick_encoded: tuple[wire.PeerMessage, bytes] | None = None
        self._rng = rng or random.Random()
        self._seen_broadcasts: dict[str, None] = {}
        self._link_gone: dict[str, trio.Event] = {}
        #: Per dialled URL: the peer's node name once known, and the event that ends its
        #: backoff wait early (:meth:`replica_up`).
        self._dialers: dict[str, _Dialer] = {}
        self._nursery: trio.Nursery | None = None
        self.routes = RouteTable(node.replica.node, node.replica.incarnation)
        node.gossip = self

    async def run(
        self, *, task_status: trio.TaskStatus[int | None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Accept and dial links until cancelled; started() gets the bound peer port."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            port = None
            if self.accept:
                port = await nursery.start(self.transport.serve, self._accept)
            for url in self.peers:
                nursery.start_soon(self._dial_forever, url)
            nursery.start_soon(self._heartbeat)
            task_status.started(port)

    # ------------------------------------------------------------------ link set-up

    async def _accept(self, channel: PeerChannel) -> None:
        await self._run_link(channel, dialed=False)

    async def _dial_forever(self, url: str) -> None:
        """Keep a link to ``url``: dial, run the link, and after it ends (or a dial fails)
        dial again after the backoff (:class:`Redial`), or sooner when :meth:`replica_up`
        hears that the peer is alive."""
        settings = self.settings
        backoff = Redial(settings.backoff_initial, settings.backoff_max)
        dialer = self._dialers[url] = _Dialer()
        failures = 0
        while True:
            remote_node = dialer.node
            if remote_node is not None and remote_node in self.links:
                # Already linked (the peer dialed us): wait until that link ends.
                await self._link_gone.setdefault(remote_node, trio.Event()).wait()
                continue
            attempted_at = self.node.clock()
            try:
                channel = await self.transport.dial(url)
            except ValueError as exc:
                log.error("cannot dial peer %s: %s; not trying it again", url, exc)
                return
            except (OSError, ChannelClosed, trio.TooSlowError) as exc:
                # Once per outage at info: with attempts every second, more is noise.
                failures += 1
                log.log(
                    logging.INFO if failures == 1 else logging.DEBUG,
                    "cannot reach peer %s: %s%s",
                    url,
                    exc or type(exc).__name__,
                    "; trying again every second or so" if failures == 1 else "",
                )
            else:
                name = await self._run_link(channel, dialed=True)
                if name is not None:
                    dialer.node = name
                    failures = 0
                    backoff.reset()  # it worked: redial quickly
            dialer.hurry = trio.Event()
            with trio.move_on_after(backoff.next_wait(self._rng.random())):
                await dialer.hurry.wait()
            if dialer.hurry.is_set():
                since = self.node.clock() - attempted_at
                await trio.sleep(backoff.hurried_wait(since))

    def replica_up(self, replica: ReplicaId) -> None:
        """A replica came up (news through gossip): a dialer of that node (or of a URL whose
        node is not known yet) with no link to it ends its backoff wait and dials now. This
        is what brings a restarted listener's dialers back at once once one of them, or a
        third daemon, has reached it. The heartbeat table goes out on every link with the
        digests the transition asked for, not at the next heartbeat: a peer merges a
        replica's records only once it knows that replica is up, so this is how far the
        news of a restart travels in one link delay per hop."""
        for link in self.links.values():
            link._beat_due = True  # (rides on the digest request_digests just woke it for)
        if replica.node in self.links or replica.node == self.node.replica.node:
            return
        for dialer in self._dialers.values():
            if dialer.node in (None, replica.node):
                dialer.hurry.set()

    async def _run_link(self, channel: PeerChannel, *, dialed: bool) -> str | None:
        """Handshake and run one link until it ends; returns the peer's node name."""
        node = self.node
        link: PeerLink | None = None
        try:
            with trio.fail_after(self.settings.handshake_timeout):
                await channel.send(
                    wire.encode(
                        wire.Hello(node.replica.node, node.region, node.replica.incarnation)
                    )
                )
                hello = wire.decode(await channel.receive())
            self._check_hello(hello, channel)
            assert isinstance(hello, wire.Hello)
            link = PeerLink(self, channel, hello, dialed)
            if not self._admit(link):
                return hello.node
            log.info(
                "peer link up: %s (%s) via %s", hello.replica, hello.region, channel.remote_label
            )
            await link.run()
            return hello.node
        except LinkRefused as exc:
            log.warning("refused peer link %s: %s", channel.remote_label, exc)
        except wire.PeerProtocolError as exc:
            log.warning(
                "peer %s broke the protocol: %s; closing the link", channel.remote_label, exc
            )
        except (ChannelClosed, trio.TooSlowError):
            pass
        finally:
            if link is not None and self.links.get(link.remote.node) is link:
                del self.links[link.remote.node]
                log.info("peer link down: %s", link.remote)
                self.advertise()
                gone = self._link_gone.pop(link.remote.node, None)
                if gone is not None:
                    gone.set()
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await channel.aclose()
        return None if link is None else link.remote.node

    def _check_hello(self, hello: wire.PeerMessage, channel: PeerChannel) -> None:
        if not isinstance(hello, wire.Hello):
            raise LinkRefused("the first message was not a hello")
        if hello.version != wire.PEER_PROTOCOL_VERSION:
            raise LinkRefused(f"peer protocol version {hello.version} is not supported")
        if hello.node == self.node.replica.node:
            raise LinkRefused("that is this node itself")
        names = channel.remote_names
        if names is not None and hello.node not in names:
            raise LinkRefused(
                f"claims node {hello.node!r} but its certificate names {sorted(names)}"
            )

    def _admit(self, link: PeerLink) -> bool:
        """Keep one link per peer node; on a duplicate, both sides keep the same one."""
        name = link.remote.node
        current = self.links.get(name)
        if current is not None:
            preferred = min(self.node.replica.node, name)
            if current.dialer_name == preferred and link.dialer_name != preferred:
                log.info("duplicate link to %s: keeping the existing one", name)
                return False
            current.close()
        self.links[name] = link
        self.advertise()
        return True

    # ------------------------------------------------------------------ routing

    def advertise(self) -> None:
        """Links or their RTTs changed: advertise anew if it matters for routes."""
        state = self.routes.advertise({name: link.rtt for name, link in self.links.items()})
        if state is not None:
            self._routes_changed(None)

    def learn_link_states(self, states: tuple[LinkState, ...], source: PeerLink) -> None:
        """Link states from a peer: keep the newer ones and flood them on."""
        liveness = self.node.liveness
        changed = False
        for state in states:
            status = liveness.status(ReplicaId(state.node, state.incarnation))
            if status in (DOWN, PURGED, RETIRED):
                continue  # a dead replica's links: stale news
            changed |= self.routes.learn(state)
        if changed:
            self._routes_changed(source)

    def replica_gone(self, replica: ReplicaId) -> None:
        """A replica is down, purged or retired: routes no longer go through it."""
        state = self.routes.get(replica.node)
        if state is not None and state.incarnation <= replica.incarnation:
            self.routes.forget(replica.node)
            self._routes_changed(None)

    def _routes_changed(self, source: PeerLink | None) -> None:
        for link in self.links.values():
            if link is not source:
                link.wake()
        if self.node.messenger is not None:
            self.node.messenger.routes_changed()

    def send_routed(self, hop: str, message: wire.PeerMessage) -> bool:
        """Queue a routed message on the link to ``hop``; False if there is none or it is full."""
        link = self.links.get(hop)
        return link is not None and link.enqueue(message)

    # ------------------------------------------------------------------ gossip

    def local_changed(self) -> None:
        tick = self.node.tick_number()
        for link in self.links.values():
            link.poke(tick)

    def tick(self, local_changed: bool) -> None:
        """Called at every tick boundary: links send local changes and what else is due."""
        self._in_tick = True
        try:
            for link in self.links.values():
                link.tick(local_changed)
        finally:
            self._in_tick = False
            self._tick_encoded = None

    def encode(self, message: wire.PeerMessage) -> bytes:
        """Encode a message; at a tick boundary, a message equal to the one just sent to
        another link is not encoded again (a tick's gossip is usually the same own changes
        for every peer, and encoding it costs more than the test)."""
        last = self._tick_encoded
        if last is not None and last[0] == message:
            return last[1]
        data = wire.encode(message)
        if self._in_tick:
            self._tick_encoded = (message, data)
        return data

    def awaiting_batches(self) -> bool:
        """Whether a link whose batches come early in each tick has not sent this tick's yet
        (the node holds the tick's flush for it, see :meth:`Node.flush_time`)."""
        tick = self.node.tick_number()
        return any(link.awaited(tick) for link in self.links.values())

    def poll_paced(self, final: bool = True) -> None:
        """Read the links that are paced (see :meth:`PeerLink.poll`)."""
        for link in list(self.paced):
            link.poll(final)

    def wait_for_batches(self, timeout: float) -> bool:
        """Block the thread (not just the ticker's task) until a paced link whose batch of
        this tick is missing has input, for at most ``timeout`` seconds (a fraction of a
        tick: the poll point). True if some input came; False on timeout, or at once when a
        link's transport has no descriptor to wait on (the simulation), which leaves the
        batch to the poll point.

        Why block: a wake-up through trio's scheduler costs ~200 µs of CPU here against
        ~50 µs for one in the kernel alone, and in most busy ticks some near peer's batch
        lands a millisecond or two after this daemon's own boundary work. Nothing else is
        held up for longer than the poll point, and only while that batch is on its way.
        """
        waiting = select.poll()
        for link in self._missing_batches():
            fd = link.channel.input_fd()
            if fd is None:
                return False
            waiting.register(fd, select.POLLIN)
        return bool(waiting.poll(max(0, math.ceil(timeout * 1000))))

    def paced_pending(self) -> bool:
        """Whether a paced link's batch of this tick has not been read yet."""
        return bool(self._missing_batches())

    def _missing_batches(self) -> list[PeerLink]:
        """The paced links whose batch of this tick has not been read yet."""
        tick = self.node.tick_number()
        return [link for link in self.paced if link.batch_tick != tick]

    def request_digests(self) -> None:
        """Ask every link to exchange digests now (a replica came back up: repair fast)."""
        for link in self.links.values():
            link.want_digest()

    def relay(self, replicas: list[ReplicaId], exclude: PeerLink) -> None:
        """Other replicas' changes were merged: wake the links that pass them on (not those
        whose peer hears the replica from its origin)."""
        for link in self.links.values():
            if link is not exclude and any(
                replica != link.remote and replica.node not in link.remote_links
                for replica in replicas
            ):
                link.wake()

    def on_broadcast(self, message: wire.RoomBroadcast, source: PeerLink | None) -> None:
        """A room broadcast: deliver it to local members once, flood it to other peers."""
        if message.id in self._seen_broadcasts:
            return
        self._seen_broadcasts[message.id] = None
        if len(self._seen_broadcasts) > 100_000:
            for stale in list(itertools.islice(self._seen_broadcasts, 50_000)):
                del self._seen_broadcasts[stale]
        if source is not None:
            self.node.deliver_broadcast(message)
        for link in self.links.values():
            if link is not source and self._nursery is not None:
                self._nursery.start_soon(self._send_quietly, link, message)

    async def _send_quietly(self, link: PeerLink, message: wire.PeerMessage) -> None:
        with contextlib.suppress(ChannelClosed):
            await link._send(message)

    def on_bye(self, replica: ReplicaId, source: PeerLink) -> None:
        """A peer says it is stopping: retire it for good, here only.

        Only the replica at the other end of the link may say goodbye for itself: a bye is
        the one message that retires a replica at once and for ever, so one naming another
        node (a bug, or a peer speaking for others) is ignored, and byes are not relayed.
        Other daemons learn of the stop from the removals it sent before its bye (relayed
        like any delta) and from liveness (down after ``down_after``).
        """
        if replica != source.remote:
            log.warning(
                "peer %s sent a bye for %s: only a replica's own link may retire it; ignored",
                source.remote,
                replica,
            )
            return
        node = self.node
        if node.liveness.status(replica) == RETIRED:
            return
        # Its removals came just before: merging them woke the links that relay them, but
        # once it is retired its partition is gone and they would find nothing to send.
        for link in self.links.values():
            if link is not source:
                link.relay_now()
        node.on_transitions([node.liveness.retire(replica)])

    async def _heartbeat(self) -> None:
        """This replica's heartbeat and liveness checks, and every link's timers. (It sleeps
        on the same kind of alarm as the ticker: a kernel timer costs half the CPU of a trio
        deadline per wake-up.)"""
        node = self.node
        alarm = open_alarm(node.clock)
        try:
            while True:
                node.liveness.beat()
                now = node.clock()
                node.on_transitions(node.liveness.check(now))
                for link in list(self.links.values()):
                    link.on_heartbeat(now)
                if self.links:
                    node.want_tick()
                await alarm.sleep_until(now + self.settings.heartbeat_interval)
        finally:
            alarm.close()

    async def say_goodbye(self) -> None:
        """Graceful shutdown: send our removals and a bye on every link, then close them."""
        for link in list(self.links.values()):
            link.tick(True)
        await trio.sleep(0)
        with trio.move_on_after(1):
            for link in list(self.links.values()):
                with contextlib.suppress(ChannelClosed):
                    link._own_due = True
                    message = link._build()
                    if message is not None:
                        await link._send(message)
                    await link._send(wire.Bye(self.node.replica))
        for link in list(self.links.values()):
            link.close()
