"""A peer link: one live channel to one peer daemon, its reader and writer tasks.

One :class:`PeerLink` per connected peer. What to send and how to merge what arrives is the
link's :class:`~presenced.core.gossip.PeerView` (pure); the link does the I/O. Its writer,
whenever it is woken, sends the routed messages queued for the peer, then the gossip message
the view builds: everything the peer lacks, extracted when the writer is free, so a link that
is slow or busy coalesces.

Timing, chosen for latency and for few messages:

* local changes wake links at the leading edge (a link idle for a tick sends at once),
  otherwise at the next tick boundary (aligned across daemons, see :mod:`presenced.server.node`):
  this replica's own deltas, heartbeats and periodic digests go out only then, so a busy link
  carries one gossip message per tick, sent by the ticker itself (``send_nowait``, encoded
  once for every link that gets the same message);
* changes merged from one peer are relayed to the others immediately (two hops cost two
  link delays, not two ticks);
* a daemon flushes rooms touched by a peer's gossip at once, unless other peers' batches of
  the same tick are still to come: a link whose previous batch arrived early in its tick
  (within the tick plan's ``hold_s``, a quarter tick) is waited for, up to the hold, so its batch,
  the local changes and the other near peers' batches reach members as one frame
  (:meth:`PeerManager.awaiting_batches`). A far peer's batches land at a steady phase of the
  tick, past the hold or within it: either way, waiting for them costs no latency.

Paced reading: a near peer's tick batch arrives within the poll point of the boundary it was sent
at. Once a link's gossip has arrived in that window a few times running, its reader task parks
and the node's ticker reads the link with ``receive_nowait`` (:meth:`PeerLink.poll`): right
after the boundary's own work, at the poll point if the batch was not in yet,
and a last time at the tick plan's hold if it still was not: no wake-up per peer message, and the
same flush the message would have joined anyway. Only that last read, finding no batch of
the tick (the peer was quiet, or its batch is late), hands the link back to its reader task,
which waits for data as usual, and the link's next batch on time paces it again. A tick's
batch is the message the peer's tick sent, marked ``batch`` (``tk`` on the wire): repairs,
relays and link-state news go out whenever they come in. A peer whose batches land later in
the tick (a far one, unless its delay is within the poll point of a whole number of ticks:
then pacing changes nothing either) is not paced. While a link is paced, its other
messages (routed messages, pings) wait for that read: at most a tick and a poll point. RTT
pings go out with the next gossip message (normally the tick's); once the ticker has read
the peer's batch of that tick, the link goes back to its reader, which reads the pong as it
arrives and paces the link again (one wake-up per ping). A paced peer answers at its flush
point, and a pong that lands before the batch is read with it, so a near link's RTT reads up
to two poll points high.

Liveness: heartbeats ride on gossip messages every ``heartbeat_interval_s``; a link that hears
nothing for ``link_timeout_s`` is closed and redialled (if this daemon dialled it).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

import trio

from presenced.core import peer_wire as wire
from presenced.core.crdt import ReplicaId
from presenced.core.gossip import PeerView, dialer_of
from presenced.core.routing import LinkState, RouteTable
from presenced.server.peers.transport import ChannelClosed, PeerChannel

if TYPE_CHECKING:
    from presenced.config import Config
    from presenced.server.clients.sessions import Sessions
    from presenced.server.node import Node

log = logging.getLogger(__name__)

#: Gossip messages in a row that arrive within the poll point of their tick before a link is
#: read by the ticker instead of its reader task.
PACE_AFTER = 3
#: Messages one paced read handles at most; a peer sending more than that per tick is handed
#: back to the reader task.
PACED_READ_LIMIT = 256


class LinkOwner(Protocol):
    """What a link uses of the layer that owns it (:class:`~presenced.server.peers.PeerManager`
    is it: it creates the links, so this module names it by what a link calls)."""

    @property
    def node(self) -> Node: ...
    @property
    def config(self) -> Config: ...
    @property
    def sessions(self) -> Sessions: ...
    @property
    def routes(self) -> RouteTable: ...
    @property
    def links(self) -> dict[str, PeerLink]: ...
    @property
    def paced(self) -> dict[PeerLink, None]: ...

    def encode(self, message: wire.PeerMessage) -> bytes: ...
    def advertise(self) -> None: ...
    def learn_link_states(self, states: tuple[LinkState, ...], source: PeerLink) -> None: ...
    def relay(self, replicas: list[ReplicaId], exclude: PeerLink) -> None: ...
    def on_broadcast(self, message: wire.RoomBroadcast, source: PeerLink | None) -> None: ...
    def on_bye(self, replica: ReplicaId, source: PeerLink) -> None: ...
    def on_kick(self, message: wire.Kick, source: PeerLink | None) -> None: ...


class PeerLink:
    """One live link to one peer replica."""

    def __init__(
        self, manager: LinkOwner, channel: PeerChannel, hello: wire.Hello, dialed: bool
    ) -> None:
        self.manager = manager
        self.node = node = manager.node
        self.channel = channel
        self.hello = hello
        self.remote = hello.replica
        self.region = hello.region
        #: True if this daemon dialed the link (the dialer redials when it breaks).
        self.dialed = dialed
        self.dialer_name = dialer_of(node.replica.node, self.remote.node, dialed)
        config = manager.config
        #: What the peer holds and what is due: the gossip policy of this link.
        self.view = PeerView(
            node.replica,
            self.remote,
            node.clock(),
            digest_interval_s=config.digest_interval_s,
            ping_interval_s=config.ping_interval_s,
            link_timeout_s=config.link_timeout_s,
        )
        self._max_queued = config.max_queued_routed
        self.rtt: float | None = None
        self._wakeup = trio.Event()
        #: Whether the ticker reads this link (see "Paced reading" above); the reader task
        #: waits on ``_resume`` meanwhile.
        self.paced = False
        self._resume = trio.Event()
        #: Ticks in a row whose gossip batch arrived within the poll point of the boundary.
        self._in_window = 0
        #: Whether the next late batch leaves ``_in_window`` as it is: a paced link handed
        #: back for one late batch (or for a pong) is still a near peer's.
        self._forgive_late = False
        self.messages_out = 0
        self.messages_in = 0
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

    @property
    def sent(self) -> dict[ReplicaId, int] | None:
        """Per replica, the clock the peer is believed to hold; None until its first digest
        (the link is not in sync yet)."""
        return self.view.sent

    @property
    def remote_links(self) -> frozenset[str]:
        """Nodes the peer has direct links to."""
        return self.view.remote_links

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
        self.view.want_digest()
        self._wakeup.set()

    def build(self, *, batch: bool = False) -> wire.Gossip | None:
        """The gossip message the peer lacks now (see :meth:`PeerView.build`)."""
        node = self.node
        manager = self.manager
        return self.view.build(
            node.clock(), node.state, node.liveness, manager.routes, manager.links, batch=batch
        )

    def relay_now(self) -> None:
        """Build the gossip the peer lacks now, and queue it for the writer (in order after
        what it is sending): for changes that must leave before the state they come from."""
        message = self.build()
        if message is not None:
            self.enqueue(message)

    def enqueue(self, message: wire.PeerMessage) -> bool:
        """Queue a routed message for the writer; False if the queue is full (dropped)."""
        if len(self._queue) >= self._max_queued:
            self.dropped += 1
            return False
        self._queue.append(message)
        self._wakeup.set()
        return True

    def poke(self, tick: int) -> None:
        """Local state changed (in tick index ``tick``): send at once if the view says the
        link is idle (:meth:`PeerView.poke`), else at the next tick."""
        if self.view.poke(tick):
            self._wakeup.set()

    def at_boundary(self, local_changed: bool) -> None:
        """A tick boundary: send local changes, and heartbeats, digests or pings that are due.

        Sent from the ticker itself when the writer task is idle (no task switch per link);
        what the socket does not take at once, the writer finishes. Never raises: what
        breaks the link ends this link alone.
        """
        if not self.view.at_boundary(local_changed):
            return
        if self._writing or self._queue:
            self._tick_deferred = True
            self._wakeup.set()  # the writer sends it after what it has, in order
            return
        try:
            for message in self._due(batch=True):
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
                batch, self._tick_deferred = self._tick_deferred, False
                for message in self._due(batch=batch):
                    await self._send(message)
            finally:
                self._writing = False

    def _due(self, *, batch: bool) -> list[wire.PeerMessage]:
        node = self.node
        manager = self.manager
        return self.view.due(
            node.clock(), node.state, node.liveness, manager.routes, manager.links, batch=batch
        )

    def _encode(self, message: wire.PeerMessage) -> bytes:
        data = self.manager.encode(message)
        self.view.sent_tick = self.node.tick_index()
        self.bytes_out += len(data)
        self.messages_out += 1
        return data

    async def _send(self, message: wire.PeerMessage) -> None:
        await self.channel.send(self._encode(message))

    def _send_now(self, message: wire.PeerMessage) -> None:
        if not self.channel.send_nowait(self._encode(message)):
            self._wakeup.set()  # the socket is full: the writer waits for it

    def on_heartbeat(self, now: float) -> None:
        """Every heartbeat interval (the manager's heartbeat task: one wake-up for every
        link, and their heartbeats go in the same tick's gossip, encoded once): what is due
        rides on the next tick's message; a link that heard nothing for ``link_timeout_s``
        is closed."""
        if self.view.on_heartbeat(now):
            log.warning("peer link to %s timed out; closing it", self.remote)
            self.close()

    # ------------------------------------------------------------------ reading

    async def _reader(self) -> None:
        view = self.view
        while True:
            if self.paced:
                await self._resume.wait()
                continue
            previous_batch = view.batch_tick
            message = self._receive(await self.channel.receive())
            if isinstance(message, wire.Gossip) and view.batch_tick != previous_batch:
                pace = self._count_batch(previous_batch)
            else:
                pace = isinstance(message, wire.PeerPong)  # (a ping's pong paces it again)
            if pace and self._in_window >= PACE_AFTER and not view.pings:
                self._pace()

    def _count_batch(self, previous_batch: int) -> bool:
        """The reader read a tick's batch: count the ticks in a row whose batch came within
        the poll point of the boundary (a busy near peer, which pacing suits; a quiet one's
        heartbeats are not in a row). Returns whether this one did."""
        node = self.node
        if node.tick_phase_s() >= node.plan.poll_point_s:
            if self._forgive_late:
                self._forgive_late = False
            else:
                self._in_window = 0
            return False
        if previous_batch == self.view.batch_tick - 1:
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
        tick = self.node.tick_index()
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
        view = self.view
        if final and view.batch_tick != tick:
            self._unpace(eligible=True)  # no batch this tick: wait for the peer's next message
        elif view.pings and view.batch_tick == tick:
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
        node = self.node
        now = node.clock()
        self.view.heard_at = now
        self.bytes_in += len(data)
        self.messages_in += 1
        message = wire.decode(data)
        if isinstance(message, wire.Gossip):
            self._on_gossip(message, now)
        elif isinstance(message, wire.PeerPing):
            # Through the writer: the reader never blocks on a send, or two daemons
            # both writing a big message could stop reading each other for good.
            self.enqueue(wire.PeerPong(message.id))
        elif isinstance(message, wire.PeerPong):
            rtt = self.view.on_pong(message.id, now)
            if rtt is not None:
                self.rtt = rtt
                self.manager.advertise()
        elif isinstance(message, wire.Direct | wire.Receipt | wire.Pull | wire.Pulled):
            if node.messenger is not None:
                node.messenger.on_routed(message, self.remote.node)
        elif isinstance(message, wire.RoomBroadcast):
            self.manager.on_broadcast(message, self)
        elif isinstance(message, wire.Kick):
            self.manager.on_kick(message, self)
        elif isinstance(message, wire.Bye):
            self.manager.on_bye(message.replica, self)
        elif message == self.hello:
            pass  # the handshake's hello again (a duplicating network): nothing new
        else:
            raise wire.PeerProtocolError("hello sent twice")
        return message

    def awaited(self, tick: int) -> bool:
        """Whether this tick's flush waits for this link's batch (see
        :meth:`PeerView.awaited`)."""
        return self.view.awaited(tick)

    def _on_gossip(self, message: wire.Gossip, now: float) -> None:
        node = self.node
        view = self.view
        if message.batch and view.batch_tick != (tick := node.tick_index()):
            view.mark_batch(tick, node.tick_phase_s(), node.plan.hold_s)
        # Liveness first: the node shows a replica that beat only once its copy holds the
        # clock it beat with, and the deltas below may be what brings it there.
        for beat in message.beats:
            node.on_transitions(node.liveness.observe(beat, now))
        if message.link_states:
            self.manager.learn_link_states(message.link_states, self)
        changes, merged, wake = view.on_gossip(message, node.state, node.liveness)
        if changes:
            node.apply(changes, from_peer=True)
        if node.state.index.taken_over or node.state.index.left_elsewhere:
            self.manager.sessions.contested()  # a session held here was resumed, or left, elsewhere
        if merged:
            self.manager.relay(merged, exclude=self)
        if wake:
            self._wakeup.set()
