"""The peer manager: accepts and dials links, keeps one per peer node, and runs the layer.

It owns what spans links: the set of live links (one per peer node: on a duplicate both sides
keep the same one, :func:`~presenced.core.gossip.keeps_existing`), redialling with backoff
(:class:`~presenced.core.redial.Redial`), the heartbeat task that drives every link's timers,
the tick's gossip sent by every link from the ticker (encoded once when it is the same for
every peer), relays (:meth:`PeerManager.relay`), routes, room broadcasts and byes.

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
from typing import TYPE_CHECKING

import attrs
import trio

from presenced.config import Config
from presenced.core import peer_wire as wire
from presenced.core.crdt import ReplicaId
from presenced.core.gossip import bye_accepted, hello_problem, keeps_existing, live_link_states
from presenced.core.liveness import RETIRED
from presenced.core.redial import Redial
from presenced.core.routing import LinkState, RouteTable
from presenced.server.alarm import open_alarm
from presenced.server.peers.links import PeerLink
from presenced.server.peers.transport import ChannelClosed, PeerChannel, PeerTransport

if TYPE_CHECKING:
    from presenced.server.clients.sessions import Sessions
    from presenced.server.node import Node

log = logging.getLogger(__name__)


@attrs.define
class _Dialer:
    """One dialled URL: the peer's node once a link told it, and the wake-up that ends its
    backoff wait early."""

    node: str | None = None
    hurry: trio.Event = attrs.field(factory=trio.Event)


class LinkRefused(Exception):
    """The handshake failed: wrong version, wrong certificate, or a link to ourselves."""


class PeerManager:
    """Accepts and dials peer links, and keeps one link per peer node."""

    def __init__(
        self,
        node: Node,
        transport: PeerTransport,
        config: Config,
        sessions: Sessions,
        *,
        accept: bool = True,
        rng: random.Random | None = None,
    ) -> None:
        self.node = node
        #: The clients' sessions: told when a merge shows a session held here was resumed,
        #: or left a room, on another daemon.
        self.sessions = sessions
        #: Whether to accept inbound links (only dial when False: no --peer-listen).
        self.accept = accept
        self.transport = transport
        #: The URLs this daemon dials, and the peer layer's timings (``*_interval_s``...).
        self.peers = config.peers
        self.config = config
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
        config = self.config
        backoff = Redial(config.redial_initial_s, config.redial_max_s)
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
            link.view.beat_due = True  # (rides on the digest request_digests just woke it for)
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
            with trio.fail_after(self.config.handshake_timeout_s):
                await channel.send(
                    wire.encode(
                        wire.Hello(node.replica.node, node.region, node.replica.incarnation)
                    )
                )
                hello = wire.decode(await channel.receive())
            problem = hello_problem(hello, node.replica.node, channel.remote_names)
            if problem is not None:
                raise LinkRefused(problem)
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

    def _admit(self, link: PeerLink) -> bool:
        """Keep one link per peer node; on a duplicate, both sides keep the same one."""
        name = link.remote.node
        current = self.links.get(name)
        if current is not None:
            own = self.node.replica.node
            if keeps_existing(own, name, current.dialer_name, link.dialer_name):
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
        changed = False
        for state in live_link_states(states, self.node.liveness):
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
        tick = self.node.tick_index()
        for link in self.links.values():
            link.poke(tick)

    def at_boundary(self, local_changed: bool) -> None:
        """Called at every tick boundary: links send local changes and what else is due."""
        self._in_tick = True
        try:
            for link in self.links.values():
                link.at_boundary(local_changed)
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
        tick = self.node.tick_index()
        return any(link.awaited(tick) for link in self.links.values())

    def poll_paced(self, final: bool = True) -> None:
        """Read the links that are paced (see :meth:`PeerLink.poll`)."""
        for link in list(self.paced):
            link.poll(final)

    def wait_for_batches(self, timeout_s: float) -> bool:
        """Block the thread (not just the ticker's task) until a paced link whose batch of
        this tick is missing has input, for at most ``timeout_s`` (a fraction of a
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
        return bool(waiting.poll(max(0, math.ceil(timeout_s * 1000))))

    def paced_pending(self) -> bool:
        """Whether a paced link's batch of this tick has not been read yet."""
        return bool(self._missing_batches())

    def _missing_batches(self) -> list[PeerLink]:
        """The paced links whose batch of this tick has not been read yet."""
        tick = self.node.tick_index()
        return [link for link in self.paced if link.view.batch_tick != tick]

    def request_digests(self) -> None:
        """Ask every link to exchange digests now (a replica came back up: repair fast)."""
        for link in self.links.values():
            link.want_digest()

    def relay(self, replicas: list[ReplicaId], exclude: PeerLink) -> None:
        """Other replicas' changes were merged: wake the links that pass them on (not those
        whose peer hears the replica from its origin)."""
        for link in self.links.values():
            if link is not exclude and link.view.passes_on(replicas):
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

    def flood(self, message: wire.RoomBroadcast) -> None:
        """A room broadcast made here: send it to every peer."""
        self.on_broadcast(message, None)

    def on_kick(self, message: wire.Kick, source: PeerLink | None) -> None:
        """A disconnect by the server API: carry it out here once (the daemon asked has
        already), flood it to other peers, de-duplicated by id like a broadcast."""
        if message.id in self._seen_broadcasts:
            return
        self._seen_broadcasts[message.id] = None
        if source is not None:
            self.node.apply_kick(message)
        for link in self.links.values():
            if link is not source and self._nursery is not None:
                self._nursery.start_soon(self._send_quietly, link, message)

    def flood_kick(self, message: wire.Kick) -> None:
        """A disconnect by the server API made here: send it to every peer."""
        self.on_kick(message, None)

    async def _send_quietly(self, link: PeerLink, message: wire.PeerMessage) -> None:
        with contextlib.suppress(ChannelClosed):
            await link._send(message)

    def on_bye(self, replica: ReplicaId, source: PeerLink) -> None:
        """A peer says it is stopping: retire it for good, here only.

        Only the replica at the other end of the link may say goodbye for itself: a bye is
        the one message that retires a replica at once and for ever, so one naming another
        node (a bug, or a peer speaking for others) is ignored, and byes are not relayed.
        Other daemons learn of the stop from the removals it sent before its bye (relayed
        like any delta) and from liveness (down after ``down_after_s``).
        """
        if not bye_accepted(replica, source.remote):
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
                await alarm.sleep_until(now + self.config.heartbeat_interval_s)
        finally:
            alarm.close()

    async def say_goodbye(self) -> None:
        """Graceful shutdown: send our removals and a bye on every link, then close them."""
        for link in list(self.links.values()):
            link.at_boundary(True)
        await trio.sleep(0)
        with trio.move_on_after(1):
            for link in list(self.links.values()):
                with contextlib.suppress(ChannelClosed):
                    link.view.own_due = True
                    message = link.build()
                    if message is not None:
                        await link._send(message)
                    await link._send(wire.Bye(self.node.replica))
        for link in list(self.links.values()):
            link.close()
