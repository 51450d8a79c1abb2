"""An in-memory simulated network implementing the peer transport seam.

Whole clusters of real daemon code run against it under ``trio.testing.MockClock`` (autojump),
deterministically and in little real time, with per-link latency, jitter, loss, duplication,
partitions and crashes::

    net = SimNetwork(seed=1)
    net.set_latency("eu", "us", 0.040, jitter=0.005)
    eu = net.transport("eu", "sim://eu")
    us = net.transport("us", "sim://us")
    await nursery.start(us.serve, handler)
    channel = await eu.dial("sim://us")

Delivery is computed lazily: ``send`` stamps each message with its arrival time and
``receive`` sleeps (on trio's clock) until the head of its queue is due, so the network needs
no background task. Each direction of a channel is FIFO, even with jitter: a message's arrival
time is ``max(previous arrival, now + latency + jitter)``. All randomness (loss, duplication,
jitter) comes from the network's own seeded :class:`random.Random`, and time only from
``trio.current_time`` / ``trio.sleep``, so a run is a pure function of the seed and the code.

Failure model:

* loss and duplication act on individual messages (``set_loss`` / ``duplicate``). Real
  WebSocket links never drop inside a connection; the sim does so on purpose, to exercise
  anti-entropy and idempotence. A dropped message still counts in :attr:`SimNetwork.stats`.
* ``partition`` and ``crash`` break channels at once: both ends' ``send`` and ``receive``
  raise :class:`ChannelClosed` immediately and messages in flight are lost. New dials across
  a partition, from a crashed transport or to a crashed node fail with ``OSError``.
* ``aclose`` is an orderly close (like TCP FIN): the closing end's calls raise
  ``ChannelClosed`` at once; the other end still receives what was in flight, then its
  ``receive`` raises, and from the moment the close arrives its ``send`` raises too.
"""

from __future__ import annotations

import enum
import errno
import math
import random
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

import trio

from presenced.server.peers.transport import ChannelClosed, ChannelHandler

__all__ = ["DEFAULT_MAX_IN_FLIGHT", "SimChannel", "SimNetwork", "SimStats", "SimTransport"]

#: Messages one direction of a channel may hold (in flight plus arrived but not yet received)
#: before ``send`` breaks the channel: a runaway-bug tripwire, not flow control.
DEFAULT_MAX_IN_FLIGHT = 100_000


class _Default(enum.Enum):
    NODE = enum.auto()


@dataclass(slots=True)
class SimStats:
    """Traffic sent from one node to another: messages accepted by ``send`` and their bytes.

    Counted when sent, so messages the network then drops (loss, partition) are included and
    duplicates the network adds are not.
    """

    messages: int = 0
    bytes: int = 0


class _StatsTable(dict[tuple[str, str], SimStats]):
    """``stats[(a, b)]`` for a pair that never talked reads as zeros (without inserting)."""

    def __missing__(self, key: tuple[str, str]) -> SimStats:
        return SimStats()


class _Direction:
    """One direction of a link: the receiving end's queue of (arrival time, message)."""

    __slots__ = ("fin_at", "last_at", "queue", "wake")

    def __init__(self) -> None:
        self.queue: deque[tuple[float, bytes]] = deque()
        self.last_at = -math.inf
        self.fin_at: float | None = None
        self.wake = trio.Event()

    def notify(self) -> None:
        self.wake.set()
        self.wake = trio.Event()


class _Link:
    """A connection between two channel ends; registered with the network until it breaks."""

    __slots__ = ("dialer", "listener")

    def __init__(self, dialer: SimChannel, listener: SimChannel) -> None:
        self.dialer = dialer
        self.listener = listener

    def involves(self, node: str) -> bool:
        return node in (self.dialer.local_node, self.listener.local_node)

    def crosses(self, group_a: frozenset[str], group_b: frozenset[str]) -> bool:
        a, b = self.dialer.local_node, self.listener.local_node
        return (a in group_a and b in group_b) or (a in group_b and b in group_a)


class SimChannel:
    """One end of a simulated channel; implements :class:`.transport.PeerChannel`."""

    remote_names: frozenset[str] | None
    remote_label: str

    def __init__(
        self,
        net: SimNetwork,
        local_node: str,
        remote_node: str,
        remote_names: frozenset[str] | None,
        inbound: _Direction,
        outbound: _Direction,
    ) -> None:
        self._net = net
        self.local_node = local_node
        self.remote_node = remote_node
        self.remote_names = remote_names
        self.remote_label = remote_node
        self._inbound = inbound
        self._outbound = outbound
        self._link: _Link | None = None
        self._peer: SimChannel | None = None
        self._closed = False  # closed by this end
        self._broken = False  # broken by the network (partition, crash, overflow)

    @property
    def closed(self) -> bool:
        """Whether this end was closed locally or broken by the network."""
        return self._closed or self._broken

    def _peer_fin_arrived(self, now: float) -> bool:
        fin_at = self._inbound.fin_at
        return fin_at is not None and fin_at <= now

    async def send(self, data: bytes) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        self.send_nowait(data)
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def flush(self) -> None:
        await trio.lowlevel.checkpoint()

    def send_nowait(self, data: bytes) -> bool:
        """Like ``send``: the simulated network takes every message at once."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"SimChannel.send takes bytes, not {type(data).__name__}")
        payload = bytes(data)
        now = trio.current_time()
        if self._closed or self._broken:
            raise ChannelClosed(f"channel to {self.remote_node} is closed")
        if self._peer_fin_arrived(now):
            raise ChannelClosed(f"{self.remote_node} closed the channel")
        peer = self._peer
        assert peer is not None
        net = self._net
        src, dst = self.local_node, self.remote_node
        if len(self._outbound.queue) >= net.max_in_flight:
            net._break(self._link)
            raise ChannelClosed(
                f"more than {net.max_in_flight} messages in flight from {src} to {dst}"
            )
        stats = net.stats.get((src, dst))
        if stats is None:
            stats = net.stats[(src, dst)] = SimStats()
        stats.messages += 1
        stats.bytes += len(payload)
        if not net._roll(net._loss, src, dst) and not peer._closed:
            copies = 2 if net._roll(net._duplicate, src, dst) else 1
            out = self._outbound
            at = max(out.last_at, now + net._delay(src, dst))
            out.last_at = at
            for _ in range(copies):
                out.queue.append((at, payload))
            out.notify()
        return True

    async def receive(self) -> bytes:
        await trio.lowlevel.checkpoint_if_cancelled()
        inbound = self._inbound
        while True:
            if self._closed or self._broken:
                raise ChannelClosed(f"channel to {self.remote_node} is closed")
            now = trio.current_time()
            deadline = math.inf
            if inbound.queue:
                at, data = inbound.queue[0]
                if at <= now:
                    inbound.queue.popleft()
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    return data
                deadline = at
            elif inbound.fin_at is not None:
                if inbound.fin_at <= now:
                    self._net._forget(self._link)
                    raise ChannelClosed(f"{self.remote_node} closed the channel")
                deadline = inbound.fin_at
            wake = inbound.wake
            with trio.move_on_at(deadline):
                await wake.wait()

    def input_fd(self) -> int | None:
        return None  # (in virtual time nothing may block the thread)

    def receive_nowait(self) -> bytes | None:
        if self._closed or self._broken:
            raise ChannelClosed(f"channel to {self.remote_node} is closed")
        inbound = self._inbound
        now = trio.current_time()
        if inbound.queue:
            at, data = inbound.queue[0]
            if at <= now:
                inbound.queue.popleft()
                return data
        elif inbound.fin_at is not None and inbound.fin_at <= now:
            self._net._forget(self._link)
            raise ChannelClosed(f"{self.remote_node} closed the channel")
        return None

    async def aclose(self) -> None:
        if not (self._closed or self._broken):
            self._closed = True
            net = self._net
            self._inbound.queue.clear()
            self._inbound.notify()
            out = self._outbound
            out.fin_at = max(
                out.last_at, trio.current_time() + net._delay(self.local_node, self.remote_node)
            )
            out.last_at = out.fin_at
            out.notify()
            peer = self._peer
            if peer is not None and (peer._closed or peer._broken):
                net._forget(self._link)
        await trio.lowlevel.checkpoint()

    def _break(self) -> None:
        self._broken = True
        self._inbound.queue.clear()
        self._inbound.notify()

    def __repr__(self) -> str:
        state = "broken" if self._broken else "closed" if self._closed else "open"
        return f"<SimChannel {self.local_node}->{self.remote_node} {state}>"


class _Listener:
    __slots__ = ("inbox", "transport")

    def __init__(self, transport: SimTransport, inbox: trio.MemorySendChannel[SimChannel]) -> None:
        self.transport = transport
        self.inbox = inbox


class SimTransport:
    """A daemon's view of the network; implements :class:`.transport.PeerTransport`.

    Created with :meth:`SimNetwork.transport`. It dies when its node crashes: from then on it
    can neither dial nor serve, and a restarted daemon needs a fresh one.
    """

    def __init__(
        self,
        net: SimNetwork,
        node: str,
        address: str,
        names: frozenset[str] | None,
        generation: int,
    ) -> None:
        self._net = net
        self.node = node
        self.address = address
        self.names = names
        self._generation = generation

    @property
    def alive(self) -> bool:
        """False once the node crashed (even if it was restarted since)."""
        return self._net._is_live(self.node, self._generation)

    def _check_alive(self) -> None:
        if not self.alive:
            raise ConnectionRefusedError(
                errno.ECONNREFUSED, f"connection refused: node {self.node} is crashed"
            )

    async def dial(self, url: str) -> SimChannel:
        """Connect to the listener at ``url`` after one round trip of latency.

        Raises ``ConnectionRefusedError`` (an ``OSError``) when nothing listens there, the two
        nodes are partitioned, or either is crashed.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        net = self._net
        listener = net._connectable(self, url)
        rtt = net._latency_of(self.node, listener.transport.node) + net._latency_of(
            listener.transport.node, self.node
        )
        await trio.sleep(rtt)
        listener = net._connectable(self, url)
        return net._connect(self, listener)

    async def serve(self, handler: ChannelHandler, *, task_status: object = None) -> None:
        """Listen at this transport's address, running ``handler`` for each inbound channel.

        Calls ``task_status.started(None)`` once listening. Each handler runs in its own task
        in a nursery inside this call, so cancelling ``serve`` ends them; a handler's channel
        is closed when it returns. ``ChannelClosed`` escaping a handler is ignored; any other
        exception propagates out of ``serve`` (so bugs surface in tests). Raises ``OSError``
        if the address is taken or the node is crashed.
        """
        self._check_alive()
        net = self._net
        if self.address in net._listeners:
            raise OSError(errno.EADDRINUSE, f"address in use: {self.address}")
        inbox, accepted = trio.open_memory_channel[SimChannel](math.inf)
        listener = _Listener(self, inbox)
        net._listeners[self.address] = listener
        try:
            async with trio.open_nursery() as nursery:
                if task_status is not None:
                    cast("trio.TaskStatus[None]", task_status).started(None)
                async for channel in accepted:
                    nursery.start_soon(_run_handler, handler, channel)
        finally:
            if net._listeners.get(self.address) is listener:
                del net._listeners[self.address]
            inbox.close()
            while True:
                try:
                    pending = accepted.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                net._break(pending._link)
            accepted.close()

    def __repr__(self) -> str:
        return f"<SimTransport {self.node} at {self.address}{'' if self.alive else ' (dead)'}>"


async def _run_handler(handler: ChannelHandler, channel: SimChannel) -> None:
    try:
        await handler(channel)
    except ChannelClosed:
        pass
    finally:
        await channel.aclose()


class SimNetwork:
    """A simulated network of named nodes; see the module docstring.

    ``latency`` / ``jitter`` are the one-way defaults for links with no :meth:`set_latency`.
    """

    def __init__(
        self,
        *,
        seed: int = 0,
        latency: float = 0.0,
        jitter: float = 0.0,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    ) -> None:
        _check_delay(latency, jitter)
        self.random = random.Random(seed)
        self.default_latency = latency
        self.default_jitter = jitter
        self.max_in_flight = max_in_flight
        #: Traffic per (from node, to node); see :class:`SimStats`.
        self.stats: dict[tuple[str, str], SimStats] = _StatsTable()
        self._latency: dict[tuple[str, str], tuple[float, float]] = {}
        self._loss: dict[frozenset[str], float] = {}
        self._duplicate: dict[frozenset[str], float] = {}
        self._partitions: list[tuple[frozenset[str], frozenset[str]]] = []
        self._crashed: set[str] = set()
        self._generation: dict[str, int] = {}
        self._listeners: dict[str, _Listener] = {}
        self._links: set[_Link] = set()

    # -- nodes -------------------------------------------------------------------------------

    def transport(
        self,
        node: str,
        address: str,
        names: Iterable[str] | _Default | None = _Default.NODE,
    ) -> SimTransport:
        """The transport of daemon ``node``, listening (once served) at URL ``address``.

        ``names`` is what the remote end of its channels sees as ``remote_names`` (the
        simulated certificate identity): ``frozenset({node})`` by default, ``None`` for an
        unauthenticated transport. Creating a transport for a crashed node restarts it.
        """
        self.restart(node)
        ident = frozenset({node}) if names is _Default.NODE else _names(names)
        return SimTransport(self, node, address, ident, self._generation.get(node, 0))

    def crash(self, node: str) -> None:
        """Crash ``node``: break all its channels, stop its listener, kill its transports.

        Dials to and from it fail until :meth:`restart` or a new :meth:`transport` for it.
        """
        self._crashed.add(node)
        self._generation[node] = self._generation.get(node, 0) + 1
        for address, listener in list(self._listeners.items()):
            if listener.transport.node == node:
                del self._listeners[address]
        for link in [link for link in self._links if link.involves(node)]:
            self._break(link)

    def restart(self, node: str) -> None:
        """Let ``node`` take part again (its pre-crash transports stay dead)."""
        self._crashed.discard(node)

    def is_crashed(self, node: str) -> bool:
        return node in self._crashed

    # -- link conditions ---------------------------------------------------------------------

    def set_latency(
        self, a: str, b: str, seconds: float, jitter: float = 0.0, *, both_ways: bool = True
    ) -> None:
        """One-way latency from ``a`` to ``b`` plus uniform ``[0, jitter)`` extra per message;
        also from ``b`` to ``a`` unless ``both_ways=False``."""
        _check_delay(seconds, jitter)
        self._latency[(a, b)] = (seconds, jitter)
        if both_ways:
            self._latency[(b, a)] = (seconds, jitter)

    def set_loss(self, a: str, b: str, probability: float) -> None:
        """Drop each message between ``a`` and ``b`` (either way) with ``probability``."""
        self._loss[frozenset((a, b))] = _check_probability(probability)

    def duplicate(self, a: str, b: str, probability: float) -> None:
        """Deliver each message between ``a`` and ``b`` twice (in order) with ``probability``."""
        self._duplicate[frozenset((a, b))] = _check_probability(probability)

    def partition(self, group_a: Iterable[str], group_b: Iterable[str]) -> None:
        """Cut every link between nodes of ``group_a`` and of ``group_b`` until :meth:`heal`."""
        ga, gb = frozenset(group_a), frozenset(group_b)
        if ga & gb:
            raise ValueError(f"nodes on both sides of a partition: {sorted(ga & gb)}")
        self._partitions.append((ga, gb))
        for link in [link for link in self._links if link.crosses(ga, gb)]:
            self._break(link)

    def heal(self) -> None:
        """Remove all partitions (broken channels stay broken; peers must redial)."""
        self._partitions.clear()

    def is_partitioned(self, a: str, b: str) -> bool:
        return any((a in ga and b in gb) or (a in gb and b in ga) for ga, gb in self._partitions)

    # -- observation -------------------------------------------------------------------------

    def reset_stats(self) -> None:
        self.stats.clear()

    def total_stats(self) -> SimStats:
        """All traffic, summed over every pair."""
        return SimStats(
            sum(s.messages for s in self.stats.values()), sum(s.bytes for s in self.stats.values())
        )

    def open_channels(self, node: str | None = None) -> int:
        """How many connections (involving ``node``, if given) are not yet fully closed."""
        return sum(1 for link in self._links if node is None or link.involves(node))

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Optional: the network needs no background task; this exists so that
        ``await nursery.start(net.run)`` works. Returns only when cancelled."""
        task_status.started()
        await trio.sleep_forever()

    # -- internals ---------------------------------------------------------------------------

    def _is_live(self, node: str, generation: int) -> bool:
        return node not in self._crashed and self._generation.get(node, 0) == generation

    def _latency_of(self, src: str, dst: str) -> float:
        return self._latency.get((src, dst), (self.default_latency, self.default_jitter))[0]

    def _delay(self, src: str, dst: str) -> float:
        seconds, jitter = self._latency.get((src, dst), (self.default_latency, self.default_jitter))
        return seconds + jitter * self.random.random() if jitter > 0 else seconds

    def _roll(self, table: dict[frozenset[str], float], src: str, dst: str) -> bool:
        p = table.get(frozenset((src, dst)), 0.0)
        return p > 0 and (p >= 1 or self.random.random() < p)

    def _connectable(self, dialer: SimTransport, url: str) -> _Listener:
        dialer._check_alive()
        listener = self._listeners.get(url)
        if listener is None:
            raise ConnectionRefusedError(
                errno.ECONNREFUSED, f"connection refused: nothing listens at {url}"
            )
        there = listener.transport.node
        if not listener.transport.alive:
            raise ConnectionRefusedError(
                errno.ECONNREFUSED, f"connection refused: node {there} is crashed"
            )
        if self.is_partitioned(dialer.node, there):
            raise ConnectionRefusedError(
                errno.ECONNREFUSED,
                f"connection refused: {dialer.node} and {there} are partitioned",
            )
        return listener

    def _connect(self, dialer: SimTransport, listener: _Listener) -> SimChannel:
        there = listener.transport
        to_listener, to_dialer = _Direction(), _Direction()
        near = SimChannel(self, dialer.node, there.node, there.names, to_dialer, to_listener)
        far = SimChannel(self, there.node, dialer.node, dialer.names, to_listener, to_dialer)
        near._peer, far._peer = far, near
        link = _Link(near, far)
        near._link = far._link = link
        self._links.add(link)
        listener.inbox.send_nowait(far)
        return near

    def _break(self, link: _Link | None) -> None:
        if link is None:
            return
        self._links.discard(link)
        link.dialer._break()
        link.listener._break()

    def _forget(self, link: _Link | None) -> None:
        if link is not None:
            self._links.discard(link)


def _names(names: Iterable[str] | None) -> frozenset[str] | None:
    return None if names is None else frozenset(names)


def _check_delay(seconds: float, jitter: float) -> None:
    if not (seconds >= 0 and jitter >= 0 and math.isfinite(seconds) and math.isfinite(jitter)):
        raise ValueError(f"latency and jitter must be finite and >= 0, not {seconds}, {jitter}")


def _check_probability(p: float) -> float:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"probability must be within [0, 1], not {p}")
    return p
