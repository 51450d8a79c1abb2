"""The direct-message machine: every decision about a direct message, and no I/O.

Every daemon plays three roles, often for the same message:

* **origin** (the sender's daemon): gives the message its id; a *reliable* one is written to
  the store first (the sender then gets ``stored``). For each recipient it sends one copy to
  every node where the recipient has a presence, and it relays the receipts that come back.
* **forwarder**: a copy not addressed to this node goes to the next hop of the shortest live
  route. A copy seen twice from different links is a routing loop, and one out of hops is
  stopped: both become an ``error`` receipt back to the origin, never a storm.
* **recipient daemon**: shows the message to every local session of the recipient and
  answers with a ``delivered`` receipt.

Reliable messages stay pending in the origin's store until a recipient daemon confirms one
copy. Until then the origin retransmits: when the recipient appears, when routes change, and
after :data:`ACK_TIMEOUT_S` without a receipt. Order per sender and recipient is kept by
``prev`` (the previous message of the pair still pending at the origin): a recipient daemon
shows a message only once it has itself shown ``prev``, else it answers ``deferred`` and the
origin sends it again after ``prev`` is confirmed. The recipient daemon stores the last seq
it showed per (origin, sender, recipient), so a retransmission is confirmed again but never
shown twice.

Group commit: store writes join one batch, which the shell commits :data:`COMMIT_INTERVAL_S`
after its first write (:class:`CommitSoon`) by calling :meth:`DirectMessages.flush`. What
relies on a write waits for that commit: ``stored`` and a message's first copies at the
origin, and a recipient daemon's ``delivered`` (its seq record may be in the batch). A
failed commit refuses the batch's messages with ``internal`` and drops the held receipts
(the origins retransmit). The origin's deletions of confirmed messages wait for nothing:
the receipt is already durable at the recipient daemon. Expiry, pulls and sweeps commit the
open batch first, so nothing is ever sent from a row that is not durable.

Every ``send`` is answered: a fast copy is never retransmitted, so the origin keeps each
fast (message, recipient) until its first answer and answers ``timeout`` itself after
:data:`~presenced.core.answers.FAST_ANSWER_S` (one :class:`~presenced.core.answers.Deadlines`
table). A fetch pulls from every daemon that may hold messages and answers by the rules of
:mod:`presenced.core.answers`.

The origin's half lives in :mod:`presenced.core.direct_origin`; this module routes, plays
the recipient daemon, runs fetches and commits. The machine reads the world through
:class:`World` (where users are, next hops, the cluster), writes through a
:class:`~presenced.core.direct_store.Store`, takes ``now`` and ``wall_s`` from its caller,
and returns what to do as a list of effects (:mod:`presenced.core.direct_effects`). The
shell (:mod:`presenced.server.messaging.messenger`) carries them out, with no commit in
between, so a message is on the sockets before the batch that records it as shown can
commit.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection
from typing import Any, Generic, Protocol, TypeVar

import attrs

from presenced.core import peer_wire as wire
from presenced.core import protocol
from presenced.core.answers import FAST_ANSWER_S, ClusterView, Fetches
from presenced.core.direct_effects import Counters, Effect, Forward, Log, Outbox, Reply, Show, Wake
from presenced.core.direct_origin import ACK_TIMEOUT_S, HOP_LIMIT, WINDOW, Origin
from presenced.core.direct_store import Store, StoreError

__all__ = [
    "ACK_TIMEOUT_S",
    "COMMIT_INTERVAL_S",
    "EXPIRE_INTERVAL_S",
    "HOP_LIMIT",
    "SWEEP_INTERVAL_S",
    "WINDOW",
    "DirectMessages",
    "SeenRouted",
    "World",
    "dedupe_key",
    "evict_oldest",
]

#: Seconds between retransmission sweeps, while anything can time out.
SWEEP_INTERVAL_S = 0.5
#: Seconds between expiry passes over the store.
EXPIRE_INTERVAL_S = 60.0
#: Seconds from the first store write of a batch to its commit (one node tick): everything
#: written meanwhile joins the batch. Measured better than committing after one scheduler
#: pass (docs/benchmarks.md): bigger batches, and the copies and receipts that wait for the
#: commit then leave in bursts that share peer frames and TLS records.
COMMIT_INTERVAL_S = 0.025
#: Delivered message ids remembered for read receipts.
MAX_RECENT = 100_000
#: Routed-message keys remembered to drop duplicates and detect loops.
MAX_SEEN = 200_000

H = TypeVar("H")


def evict_oldest(table: dict[Any, Any], limit: int) -> None:
    """Keep a table bounded: past ``limit`` entries, the oldest quarter goes at once (one
    pass per quarter of the limit, not one per insert)."""
    if len(table) > limit:
        for key in list(itertools.islice(table, len(table) - limit * 3 // 4)):
            del table[key]


def dedupe_key(message: wire.Routed) -> tuple[Any, ...]:
    """What makes a routed message the same message: a retransmission (a new ``attempt``)
    or the copy of a pull is not a duplicate, the same copy over another link is."""
    if isinstance(message, wire.Direct):
        return ("dm", message.id, message.to, message.dest, message.attempt, message.pull)
    if isinstance(message, wire.Receipt):
        return ("rcpt", message.id, message.to, message.origin, message.kind, message.attempt)
    if isinstance(message, wire.Pull):
        return ("pull", message.id, message.dest)
    return ("pulled", message.id, message.origin)


class SeenRouted:
    """The routed messages that passed this daemon, and the link each first came from."""

    def __init__(self, limit: int = MAX_SEEN) -> None:
        self.limit = limit
        self._first_link: dict[tuple[Any, ...], str] = {}

    def first_link(self, message: wire.Routed, link: str) -> str | None:
        """The link ``message`` first came from, or None (then it is news, from ``link``)."""
        key = dedupe_key(message)
        first = self._first_link.get(key)
        if first is None:
            self._first_link[key] = link
            evict_oldest(self._first_link, self.limit)
        return first


class World(Protocol):
    """What the machine reads of the daemon around it (all of it gossiped state)."""

    def user_nodes(self, user: str) -> Collection[str]:
        """The nodes where ``user`` has a presence (this one included)."""
        ...

    def next_hop(self, dest: str) -> str | None:
        """The link to send a message for ``dest`` on, or None without a live route."""
        ...

    def has_sessions(self, user: str) -> bool:
        """Whether ``user`` has a session on this daemon that direct messages may reach."""
        ...

    def cluster_view(self, now: float) -> ClusterView:
        """The other daemons as a fetch sees them now."""
        ...


@attrs.define
class _Shown:
    """A message shown here: where a read receipt goes."""

    origin: str
    sender: str
    recipients: set[str]
    read_by: set[str] = attrs.field(factory=set)


class DirectMessages(Generic[H]):
    """Direct messages of one daemon: origin, forwarder and recipient daemon at once.

    ``H`` is the shell's handle of a client session: the machine only keeps it and hands it
    back in effects. Each public method takes the caller's clocks and returns the effects.
    """

    def __init__(
        self,
        name: str,
        region: str,
        id_prefix: str,
        store: Store,
        world: World,
        counters: Counters,
        *,
        fast_answer_s: float = FAST_ANSWER_S,
    ) -> None:
        self.name = name
        self.region = region
        self.store = store
        self.world = world
        self.counters = counters
        self._id_prefix = id_prefix
        self._ids = itertools.count(1)
        self.out: Outbox[H] = Outbox(store)
        self.origin: Origin[H] = Origin(
            name,
            region,
            store,
            self.out,
            counters,
            world.user_nodes,
            lambda message: self._route(message, None),
            fast_answer_s=fast_answer_s,
        )
        self._seen = SeenRouted()
        self._recent: dict[str, _Shown] = {}
        self.fetches: Fetches[H] = Fetches(name)
        #: Receipts waiting for the commit of the open batch.
        self._held: list[wire.Receipt] = []

    @property
    def pending_users(self) -> set[str]:
        """Recipients with pending messages here (a presence join of one is worth a wake)."""
        return self.origin.pending_users

    def _done(self) -> list[Effect[H]]:
        return self.out.take()

    # ------------------------------------------------------------------ client requests

    def send(
        self, conn: H, user: str, session: str, message: protocol.Send, now: float, wall_s: float
    ) -> list[Effect[H]]:
        """A client's ``send``: store it (reliable) and start delivering every copy."""
        self.out.start(now, wall_s)
        self.origin.send(f"{self._id_prefix}.{next(self._ids)}", conn, user, session, message)
        return self._done()

    def mark_read(
        self, user: str, message: protocol.MarkRead, now: float, wall_s: float
    ) -> list[Effect[H]]:
        """The recipient read a message shown here: tell its sender (once per user)."""
        self.out.start(now, wall_s)
        shown = self._recent.get(message.id)
        if shown is None or user not in shown.recipients:
            raise protocol.ProtocolError(
                protocol.BAD_REQUEST,
                f"no message {message.id!r} was delivered to you on this daemon",
                message.ref,
            )
        if user not in shown.read_by:  # else another tab read it already: one per user
            shown.read_by.add(user)
            receipt = wire.Receipt(
                message.id,
                self.name,
                shown.origin,
                HOP_LIMIT,
                wire.READ,
                user,
                self.region,
                sender=shown.sender,
            )
            self._route(receipt, None)
        return self._done()

    def fetch(
        self, conn: H, user: str, message: protocol.Fetch, now: float, wall_s: float
    ) -> list[Effect[H]]:
        """Ask every daemon that may hold this user's pending messages (this one too)."""
        self.out.start(now, wall_s)
        request = f"{self._id_prefix}.f{next(self._ids)}"
        self.fetches.start(request, conn, message.ref, user, message.limit, now)
        self._fetch_advance(request, self.world.cluster_view(now))
        self.out.sweep_soon()
        return self._done()

    # ------------------------------------------------------------------ presence and routes

    def user_appeared(self, user: str) -> list[Effect[H]]:
        """A user with pending messages joined a room somewhere: deliver them now."""
        self.origin.to_pump.add(user)
        return [Wake()]

    def routes_changed(self) -> list[Effect[H]]:
        """Links or routes changed: retry every pending recipient now."""
        self.origin.to_pump.update(self.origin.pending_users)
        return [Wake()]

    # ------------------------------------------------------------------ routing

    def on_routed(
        self, message: wire.Routed, link: str, now: float, wall_s: float
    ) -> list[Effect[H]]:
        """A routed message arrived from the peer ``link``."""
        self.out.start(now, wall_s)
        first_link = self._seen.first_link(message, link)
        if first_link is not None:
            if first_link != link and isinstance(message, wire.Direct):
                text = f"routing loop: message {message.id} came back through {link}"
                self.out.add(Log(True, text))
                self._undeliverable(message, protocol.HOP_LIMIT)
            # else a duplicate (the same link twice): already handled
        elif message.dest != self.name and message.hops <= 1:
            self._undeliverable(message, protocol.HOP_LIMIT)
        else:
            self._route(message, link)
        return self._done()

    def unsendable(self, message: wire.Routed, now: float, wall_s: float) -> list[Effect[H]]:
        """A :class:`Forward` found no link to queue ``message`` on (gone, or full)."""
        self.out.start(now, wall_s)
        self._undeliverable(message, protocol.UNREACHABLE)
        return self._done()

    def _route(self, message: wire.Routed, came_from: str | None) -> None:
        if message.dest == self.name:
            self._handle(message)
            return
        hop = self.world.next_hop(message.dest)
        if came_from is not None:
            message = attrs.evolve(message, hops=message.hops - 1)
        if hop is None:
            self._undeliverable(message, protocol.UNREACHABLE)
        else:
            self.out.add(Forward(hop, message))

    def _undeliverable(self, message: wire.Routed, code: str) -> None:
        """A message cannot go on: a direct message's origin hears why; the rest is dropped
        (receipts and fetch answers are repaired by retransmission and timeouts)."""
        if isinstance(message, wire.Direct):
            self._route(self._receipt(message, wire.ERROR, code), None)
        else:
            kind = type(message).__name__
            self.out.add(Log(False, f"dropping {kind} {message.id} for {message.dest}: {code}"))

    def _handle(self, message: wire.Routed) -> None:
        if isinstance(message, wire.Direct):
            self._deliver(message)
        elif isinstance(message, wire.Receipt):
            self.origin.on_receipt(message)
        elif isinstance(message, wire.Pull):
            self._on_pull(message)
        elif self.fetches.on_pulled(message.id, message.origin, message.remaining):
            self._fetch_finish_if_done(message.id, self.world.cluster_view(self.out.now))

    def _receipt(self, message: wire.Direct, kind: str, code: str = "") -> wire.Receipt:
        return wire.Receipt(
            message.id,
            self.name,
            message.origin,
            HOP_LIMIT,
            kind,
            message.to,
            self.region,
            code,
            sender=message.sender,
            attempt=message.attempt,
        )

    # ------------------------------------------------------------------ recipient daemon

    def _deliver(self, message: wire.Direct) -> None:
        """Show a copy to the recipient's sessions here, at most once and in order."""
        if not self.world.has_sessions(message.to):
            self._route(self._receipt(message, wire.ERROR, protocol.NOT_ONLINE), None)
            return
        fetch = self.fetches.get(message.pull) if message.pull else None
        if message.reliable:
            last = self.store.last_delivered(message.origin, message.sender, message.to)
            if message.seq <= last:  # shown before: confirm again, do not show twice
                self._confirm(self._receipt(message, wire.DELIVERED))
                return
            if message.prev > last:  # the pair's previous message must be shown first
                self._route(self._receipt(message, wire.DEFERRED), None)
                return
            if fetch is not None and fetch.count >= fetch.limit:
                fetch.remaining += 1
                self._route(self._receipt(message, wire.DEFERRED), None)
                return
        mode = protocol.RELIABLE if message.reliable else protocol.FAST
        frame = protocol.direct_message(
            message.id,
            message.sender,
            message.session,
            message.region,
            message.group,
            message.data,
            mode,
            message.sent_at,
        )
        self.out.add(Show(message.to, frame))
        self.counters.messages_delivered += 1
        if message.reliable:
            self.out.open_batch()
            self.store.set_last_delivered(
                message.origin, message.sender, message.to, message.seq, self.out.wall_s
            )
        if fetch is not None:
            fetch.count += 1
        shown = self._recent.get(message.id)
        if shown is None:
            shown = self._recent[message.id] = _Shown(message.origin, message.sender, set())
            evict_oldest(self._recent, MAX_RECENT)
        shown.recipients.add(message.to)
        if message.reliable:
            self._confirm(self._receipt(message, wire.DELIVERED))
        else:
            self._route(self._receipt(message, wire.DELIVERED), None)

    def _confirm(self, receipt: wire.Receipt) -> None:
        """A reliable ``delivered``: sent once nothing it may rely on is uncommitted."""
        if self.store.in_batch:
            self._held.append(receipt)
        else:
            self._route(receipt, None)

    # ------------------------------------------------------------------ fetch

    def _on_pull(self, pull: wire.Pull) -> None:
        """Another daemon's fetch: send it up to ``limit`` pending copies, then the count."""
        self._flush()  # copies go out from committed rows only
        items = self.store.pending(pull.user, limit=pull.limit)
        for item in items:
            self.origin.push(item, pull=pull.id, dest=pull.origin)
        remaining = max(0, self.store.pending_count(pull.user) - len(items))
        self._route(
            wire.Pulled(pull.id, self.name, pull.origin, HOP_LIMIT, len(items), remaining), None
        )

    def _fetch_advance(self, request: str, view: ClusterView) -> None:
        """Send pulls to the daemons the fetch may ask now; answer it if it is done."""
        progress = self.fetches.get(request)
        if progress is None:
            return
        user = self.fetches.user(request)
        for dest in progress.to_ask(view):
            self._route(wire.Pull(request, self.name, dest, HOP_LIMIT, user, progress.limit), None)
            if self.fetches.get(request) is None:
                return  # answered already (this daemon's own pull completed it)
        self._fetch_finish_if_done(request, view)

    def _fetch_finish_if_done(self, request: str, view: ClusterView) -> None:
        answer = self.fetches.finish_if_done(request, view, self.out.now)
        if answer is not None:
            conn, frame = answer
            self.out.add(Reply(conn, frame, if_connected=True))

    # ------------------------------------------------------------------ group commit

    def flush(self, now: float, wall_s: float) -> list[Effect[H]]:
        """Commit the open batch, then do what waited for it: ``stored`` to the senders and
        the first copies of their messages, and the held ``delivered`` receipts. If the
        commit fails, nothing of the batch was stored: its senders get an error instead, and
        the held receipts are dropped (the origins retransmit)."""
        self.out.start(now, wall_s)
        self._flush()
        return self._done()

    def _flush(self) -> None:
        if not self.store.in_batch:
            return
        accepted, self.origin.accepted = self.origin.accepted, []
        held, self._held = self._held, []
        try:
            self.store.commit()
        except StoreError as exc:
            text = (
                f"message store commit failed ({len(accepted)} messages refused,"
                f" {len(held)} receipts dropped): {exc}"
            )
            self.out.add(Log(True, text))
            self.origin.commit_failed(exc, accepted)
            return
        self.origin.committed(accepted)
        for receipt in held:
            self._route(receipt, None)

    # ------------------------------------------------------------------ timers

    def wake_at(self, now: float, expire_at: float) -> float:
        """When the shell's loop should next call :meth:`sweep`: every SWEEP_INTERVAL_S
        while anything can time out, else at the expiry pass (``expire_at``), and never
        after an answer deadline (fast sends and fetches are answered to the moment)."""
        self.out.sweeping = self.origin.sweep_due() or bool(self.fetches)
        at = now + SWEEP_INTERVAL_S if self.out.sweeping else expire_at
        for deadline in (self.origin.fast.next_deadline(), self.fetches.next_deadline()):
            if deadline is not None:
                at = min(at, deadline)
        return at

    def sweep(self, now: float, wall_s: float) -> list[Effect[H]]:
        """One pass: commit, resend what timed out, deliver to who appeared, ask the daemons
        that became reachable for the fetches in progress, answer what is due."""
        self.out.start(now, wall_s)
        self._flush()
        self.origin.sweep_retransmits(now)
        if self.fetches:
            view = self.world.cluster_view(now)
            for request in self.fetches.requests():
                self._fetch_advance(request, view)
        self.origin.sweep_answers(now)
        return self._done()

    def expire(self, now: float, wall_s: float) -> list[Effect[H]]:
        """Drop reliable messages older than the store's max age, telling their senders;
        forget delivery marks as old."""
        self.out.start(now, wall_s)
        self._flush()  # expiry and pruning commit on their own, before anyone is told
        self.origin.expire(wall_s)
        self.store.prune(wall_s)
        return self._done()

    def status(self) -> dict[str, Any]:
        """Counts for /status."""
        return {
            "pending_recipients": len(self.origin.pending_users),
            "pending_messages": self.store.pending_total(),
            "in_flight": len(self.origin.inflight),
            "fetches": len(self.fetches),
            "fast_unanswered": len(self.origin.fast),
        }
