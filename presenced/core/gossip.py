"""The gossip policy of one peer link, and the rules of the peer layer: pure, no I/O.

A :class:`PeerView` is what this daemon believes about one peer, and decides what to tell it:

* ``sent``: per replica, the clock the peer is believed to hold (None until its first
  digest). :meth:`PeerView.build` sends, for every replica, the records newer than that; a
  link that is slow or busy calls it less often, so a burst of cursor moves crosses the ocean
  as the latest value per entry.
* what is due: heartbeats, digests and RTT pings (:meth:`PeerView.on_heartbeat` with the time
  passed in), and whether this replica's own changes go out (``own_due``: at the tick
  boundary, at the leading edge of an idle link, or with a repair; relays in between carry
  only other replicas' deltas).
* :meth:`PeerView.on_gossip` merges what the peer sent into the CRDT and says what to do: the
  changes to apply, the replicas whose news other links relay, and whether the writer must
  wake (a gap asks for a digest; a digest resets ``sent`` to the peer's own account, so the
  next message carries exactly what it lacks).

Repair: every ``digest_interval_s`` each side sends its digest; a delta that cannot apply (a
gap) asks for one early. The first digest after the hello is what starts deltas flowing on a
new link.

The rules of the layer, each one function: the hello checks (:func:`hello_problem`), which of
two links between the same nodes survives (:func:`keeps_existing`: the one dialled by the node
whose name sorts first, on both sides), which links pass which replicas on
(:meth:`PeerView.passes_on`), and who may say goodbye for a replica (:func:`bye_accepted`).

The shell (:mod:`presenced.server.peers`) owns the tasks, sockets and clocks; it hands a
view the time, the CRDT state, the liveness table and the route table, and does what the view
says. Liveness news (the heartbeats a gossip message carries) is the node's to apply first,
before the view merges the deltas: a replica's entries show only once the copy holds the clock
it beat with, so the order matters.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Iterable

from presenced.core import peer_wire as wire
from presenced.core.crdt import Change, DeltaError, PresenceState, ReplicaId
from presenced.core.liveness import DOWN, PURGED, RETIRED, Liveness
from presenced.core.routing import LinkState, RouteTable

__all__ = [
    "PeerView",
    "bye_accepted",
    "dialer_of",
    "hello_problem",
    "keeps_existing",
    "live_link_states",
]


class PeerView:
    """This daemon's view of one peer: what it holds, what is due, what to send it next."""

    def __init__(
        self,
        local: ReplicaId,
        remote: ReplicaId,
        now: float,
        *,
        digest_interval_s: float,
        ping_interval_s: float,
        link_timeout_s: float,
    ) -> None:
        self.local = local
        self.remote = remote
        self.digest_interval_s = digest_interval_s
        self.ping_interval_s = ping_interval_s
        self.link_timeout_s = link_timeout_s
        #: Per replica, the clock the peer is believed to hold; None until its first digest.
        self.sent: dict[ReplicaId, int] | None = None
        #: Nodes the peer has direct links to (from its gossip): not relayed to it.
        self.remote_links: frozenset[str] = frozenset()
        #: When the peer was last heard from (the shell sets it on every message).
        self.heard_at = now
        #: The tick index in which the link last sent something.
        self.sent_tick = -2
        self.beat_due = True
        self.digest_due = True
        self.ping_due = True
        #: Whether this replica's own changes go out with the next message built.
        self.own_due = True
        self.next_digest_at = now + digest_interval_s
        self.next_ping_at = now + ping_interval_s
        #: Per advertising node, the (incarnation, seq) of the link state sent to this peer.
        self.states_sent: dict[str, tuple[int, int]] = {}
        #: The ping in flight (id -> when it was sent): at most one.
        self.pings: dict[int, float] = {}
        self._ping_ids = itertools.count(1)
        #: The tick index of the peer's last tick batch (its gossip marked ``batch``), and that
        #: index again if the batch came within the hold of the boundary (see :meth:`awaited`).
        self.batch_tick = -1
        self.early_tick = -1

    # ------------------------------------------------------------------ what is due

    def want_digest(self) -> None:
        """Exchange digests at the next send (a gap, or a replica came back: repair fast)."""
        self.digest_due = self.own_due = True

    def poke(self, tick: int) -> bool:
        """Local state changed in tick index ``tick``: True to send at once (the link sent
        nothing in this tick or the previous one), else it waits for the next boundary. (By
        tick index, not by time since the last send: a stream one tick apart settles into
        tick batches instead of a leading-edge send per change, each a wake-up on both
        sides.)"""
        if self.sent_tick < tick - 1:
            self.own_due = True
            return True
        return False

    def at_boundary(self, local_changed: bool) -> bool:
        """A tick boundary: whether anything goes out (local changes, or something due)."""
        if local_changed:
            self.own_due = True
        return local_changed or self.beat_due or self.digest_due or self.ping_due

    def on_heartbeat(self, now: float) -> bool:
        """Every heartbeat interval: heartbeats, and digests and pings whose time came, ride
        on the next tick's message. True if the peer has been silent past the link timeout
        (the link is to be closed)."""
        if now - self.heard_at > self.link_timeout_s:
            return True
        self.beat_due = True
        if now >= self.next_digest_at:
            self.digest_due = True
            self.next_digest_at = now + self.digest_interval_s
        if now >= self.next_ping_at:
            self.ping_due = True
            self.next_ping_at = now + self.ping_interval_s
        return False

    # ------------------------------------------------------------------ sending

    def due(
        self,
        now: float,
        state: PresenceState,
        liveness: Liveness,
        routes: RouteTable,
        links: Collection[str],
        *,
        batch: bool,
    ) -> list[wire.PeerMessage]:
        """What goes out now besides routed messages: the gossip message, then a due ping if
        this is the tick's send (``batch``: the tick's batch; a ping sent mid-tick waits for
        the peer's next tick read, and its pong for ours: its RTT would read a tick high)."""
        message = self.build(now, state, liveness, routes, links, batch=batch)
        due: list[wire.PeerMessage] = [] if message is None else [message]
        if batch and self.ping_due:
            self.ping_due = False
            due.append(self.new_ping(now))
        return due

    def build(
        self,
        now: float,
        state: PresenceState,
        liveness: Liveness,
        routes: RouteTable,
        links: Collection[str],
        *,
        batch: bool = False,
    ) -> wire.Gossip | None:
        """The gossip message the peer lacks now, or None if it lacks nothing.

        ``links`` names this daemon's live peer links (sent with the heartbeats, so the peer
        relays nothing to us that we hear from its origin). Marks what it sends as sent.
        """
        beat_due, digest_due = self.beat_due, self.digest_due
        beats = liveness.beats(now, state.own.clock) if beat_due else []
        link_names = tuple(links) if beat_due else None
        digest = state.digest() if digest_due else None
        if digest_due:
            self.states_sent = {}  # resend every link state now and then: repairs any loss
        own_due = self.own_due
        self.beat_due = self.digest_due = self.own_due = False
        remote = self.remote
        states = []
        states_sent = self.states_sent
        for link_state in routes.states():
            version = (link_state.incarnation, link_state.seq)
            if link_state.node != remote.node and states_sent.get(link_state.node) != version:
                states.append(link_state)
                states_sent[link_state.node] = version
        deltas = []
        sent = self.sent
        if sent is not None:
            direct = self.remote_links
            own = self.local
            for replica, part in state.partitions.items():
                known = sent.get(replica, 0)
                if replica == own:
                    if not own_due:
                        continue  # goes at the next tick, with whatever else changes by then
                elif replica.node in direct:
                    continue  # the peer hears it from its origin; digests repair any gap
                if part.clock > known and replica != remote:
                    delta = state.extract(replica, known)
                    if delta is not None:
                        deltas.append(delta)
                    sent[replica] = part.clock
        if not (beats or deltas or states or digest is not None):
            return None
        return wire.Gossip(tuple(beats), tuple(deltas), digest, link_names, tuple(states), batch)

    def new_ping(self, now: float) -> wire.PeerPing:
        """An RTT ping to send now (it replaces one still unanswered)."""
        ping_id = next(self._ping_ids)
        self.pings = {ping_id: now}
        return wire.PeerPing(ping_id)

    def on_pong(self, ping_id: int, now: float) -> float | None:
        """The round trip time a pong measures, or None for an unknown or stale one."""
        started = self.pings.pop(ping_id, None)
        return None if started is None else now - started

    # ------------------------------------------------------------------ receiving

    def mark_batch(self, tick: int, phase_s: float, hold_s: float) -> None:
        """The peer's tick message (its batch) arrived in tick index ``tick``, ``phase_s``
        into it. Only that message is its batch: a repair, relay or news sent mid-tick and
        read at the next tick's first read, taken for that tick's batch, made the tick flush
        without the real one."""
        if self.batch_tick != tick:
            self.batch_tick = tick
            self.early_tick = tick if phase_s < hold_s else -1

    def awaited(self, tick: int) -> bool:
        """Whether tick index ``tick``'s flush waits for this peer's batch: its previous
        batch came early in its tick, and this tick's has not come yet."""
        return self.early_tick == tick - 1

    def on_gossip(
        self, message: wire.Gossip, state: PresenceState, liveness: Liveness
    ) -> tuple[list[Change], list[ReplicaId], bool]:
        """Merge a gossip message (its heartbeats already observed by the node).

        Returns the changes to apply, the replicas merged (other links relay them, see
        :meth:`passes_on`), and whether the writer must wake (a gap asked for a digest, or
        the peer's digest says what it lacks). Raises PeerProtocolError for a delta no
        correct peer sends.
        """
        if message.links is not None:
            self.remote_links = frozenset(message.links)
        merged: list[ReplicaId] = []
        changes: list[Change] = []
        wake = False
        sent = self.sent
        for delta in message.deltas:
            if sent is not None:
                sent[delta.replica] = max(sent.get(delta.replica, 0), delta.clock)
            if not liveness.is_up(delta.replica):
                continue
            try:
                result = state.merge(delta)
            except DeltaError as exc:
                raise wire.PeerProtocolError(str(exc)) from None
            changes.extend(result.changes)
            if result.outcome == "applied":
                merged.append(delta.replica)
            elif result.outcome == "gap":
                self.want_digest()
                wake = True
        if message.digest is not None:
            # The peer's own account of what it holds: send exactly what it lacks.
            self.sent = dict(message.digest)
            self.own_due = wake = True
        return changes, merged, wake

    def passes_on(self, replicas: Iterable[ReplicaId]) -> bool:
        """The relay rule: whether this link passes news of one of ``replicas`` on (not to the
        replica itself, nor to a peer that hears it from its origin directly)."""
        direct = self.remote_links
        remote = self.remote
        return any(replica != remote and replica.node not in direct for replica in replicas)


# ---------------------------------------------------------------------- the rules of the layer


def hello_problem(
    hello: wire.PeerMessage, own_node: str, remote_names: frozenset[str] | None
) -> str | None:
    """Why a link whose first message is ``hello`` is refused, or None to accept it.

    ``remote_names`` are the names the transport proved for the other end (its verified
    certificate), or None where the transport proves nothing (the simulation).
    """
    if not isinstance(hello, wire.Hello):
        return "the first message was not a hello"
    if hello.version != wire.PEER_PROTOCOL_VERSION:
        return f"peer protocol version {hello.version} is not supported"
    if hello.node == own_node:
        return "that is this node itself"
    if remote_names is not None and hello.node not in remote_names:
        return f"claims node {hello.node!r} but its certificate names {sorted(remote_names)}"
    return None


def dialer_of(own_node: str, remote_node: str, dialed: bool) -> str:
    """The node that dialled a link (``dialed``: this one did)."""
    return own_node if dialed else remote_node


def keeps_existing(own_node: str, remote_node: str, existing_dialer: str, new_dialer: str) -> bool:
    """The duplicate-link rule: when both nodes dial each other, the link dialled by the node
    whose name sorts first survives. True to keep the existing link and drop the new one;
    False to replace it. Both sides compute the same answer, so both keep the same link."""
    preferred = min(own_node, remote_node)
    return existing_dialer == preferred and new_dialer != preferred


def bye_accepted(replica: ReplicaId, remote: ReplicaId) -> bool:
    """The bye rule: only the replica at the other end of a link may say goodbye, for itself.

    A bye retires a replica at once and for ever, so one naming another node (a bug, or a
    peer speaking for others) is refused, and byes are not relayed: other daemons learn of
    the stop from the removals sent before it and from liveness."""
    return replica == remote


def live_link_states(states: Iterable[LinkState], liveness: Liveness) -> list[LinkState]:
    """The link states worth learning: not those of a replica known to be down, purged or
    retired (a dead replica's links are stale news)."""
    return [
        state
        for state in states
        if liveness.status(ReplicaId(state.node, state.incarnation)) not in (DOWN, PURGED, RETIRED)
    ]
