"""Direct messages: accept them from clients, route them hop by hop, deliver and confirm them.

Every daemon plays three roles, often for the same message:

* **origin** (the sender's daemon): gives the message its id; a *reliable* one is written to
  the durable store first (the sender then gets ``stored``). For each recipient it sends one
  copy to every node where the recipient has a presence (the gossiped presence map says
  where), and it relays the receipts that come back to the sender.
* **forwarder**: a copy not addressed to this node goes to the next hop of the shortest live
  route (:class:`presenced.core.routing.RouteTable`, fed by link-state gossip). A copy seen
  twice from different links is a routing loop, and one out of hops is stopped: both become
  an ``error`` receipt back to the origin, never a storm.
* **recipient daemon**: writes the message to every local session of the recipient and
  answers with a ``delivered`` receipt.

Reliable messages stay pending in the origin's store until a recipient daemon confirms one
copy. Until then the origin retransmits: when the recipient appears (a presence join), when
routes change, and after :data:`ACK_TIMEOUT` without a receipt. Order per sender and
recipient is kept by ``prev`` (the previous message of the pair still pending at the
origin): a recipient daemon shows a message only once it has itself shown ``prev``, else it
answers ``deferred`` and the origin sends it again after ``prev`` is confirmed. The
recipient daemon stores the last sequence number it showed per (origin, sender, recipient),
so a retransmission is confirmed again but never shown twice.

Group commit. Store writes are not committed one by one: the first write of a batch opens
one SQLite transaction (:meth:`MessageStore.begin`), every write until the commit joins it,
and :meth:`Messenger.flush` commits it :data:`COMMIT_INTERVAL` (25 ms, about a node tick)
later. Under load every commit holds what arrived in those 25 ms (about 20 messages at 800
per second) instead of one; the price is up to 25 ms more before ``stored``, before a
reliable message's first copy leaves, and before a recipient daemon's ``delivered``. What
depends on a write waits for that commit:

* ``stored`` goes to the sender, and the message's copies go out, only after the commit that
  holds its rows. If that commit fails, the senders of the batch get an ``internal`` error
  instead, and nothing of the batch was written (the seqs it had taken are used again, which
  is safe because no copy carrying them ever left this daemon). A crash before the commit
  loses only messages whose sender never heard ``stored``.
* A recipient daemon writes a message to its sessions, then records its seq as shown (in the
  batch), and sends the ``delivered`` receipt only after that record has committed; while a
  batch is open, every ``delivered`` it sends (a retransmission confirmed again included)
  waits for the commit, because the record it relies on may be in the batch. So the origin
  drops a message only once the recipient daemon durably knows it showed it: a
  retransmission after any crash is confirmed, not shown again. The other order cannot be
  made safe: recording first and crashing before the socket write would confirm, later, a
  message that was never shown. Showing first means a recipient daemon that dies between the
  socket write and the commit shows the message again when the origin retransmits (same
  ``id``), to sessions that lost their connection to it in that crash; a client that
  remembers the ids it has shown (docs/protocol.md) still sees it once. That window existed
  before batching too; the batch widens it from one commit to :data:`COMMIT_INTERVAL`, and a
  failed commit, like that crash, drops the held receipts so the origin retransmits.
* The origin's deletions of confirmed messages (and ``deferred`` bookkeeping) need no wait:
  the receipt that caused them is already durable at the recipient daemon, so if the
  deletion is lost the retransmission is confirmed without being shown. The sender's
  ``delivered`` goes out at once.
* Expiry, pruning and sweeps commit the open batch first, so nothing is ever sent from a
  row that is not durable; :meth:`MessageStore.is_committed` guards :meth:`_push` too.

Every ``send`` is answered: a fast copy is never retransmitted, so one lost on a link that
silently stopped carrying traffic would leave its sender with nothing. The origin keeps each
fast (message, recipient) until its first ``delivered`` or error, and answers ``timeout``
itself after :data:`~presenced.core.answers.FAST_ANSWER_S` (one table, swept by the run
loop at the oldest deadline: no task or timer per message). The asking side of ``fetch``
lives in :mod:`presenced.server.fetches`.

Everything here is synchronous except :meth:`Messenger.run` (group commits, retransmissions,
expiry, fetch and fast-send deadlines): handlers run on the event loop thread and never
wait, like the rest of the node.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
import trio

from presenced.core import peer_wire as wire
from presenced.core import protocol
from presenced.core.answers import FAST_ANSWER_S, Deadlines
from presenced.server.fetches import Fetches
from presenced.server.message_store import MessageStore, StoredMessage, StoreError, StoreFull
from presenced.server.websocket import message_frame

if TYPE_CHECKING:
    from presenced.server.clients import ClientConnection
    from presenced.server.node import Node

log = logging.getLogger(__name__)

#: Hops a routed message may take (more than any sane region graph's diameter).
HOP_LIMIT = 16
#: Seconds between retransmission sweeps.
SWEEP_INTERVAL = 0.5
#: Seconds a reliable copy may stay unconfirmed before it is sent again.
ACK_TIMEOUT = 3.0
#: Seconds the origin remembers who sent a message, to route receipts back to that session.
SENDER_MEMORY = 600.0
#: Most senders remembered (beyond it the oldest are forgotten: receipts then go to the
#: sending user's sessions, without the ``ref``).
MAX_SENDERS = 100_000
#: Delivered message ids remembered for read receipts.
MAX_RECENT = 100_000
#: Routed-message keys remembered to drop duplicates and detect loops.
MAX_SEEN = 200_000
#: Reliable copies in flight per recipient (the rest follow as these are confirmed).
WINDOW = 256
#: Seconds between expiry passes over the store.
EXPIRE_INTERVAL = 60.0
#: Seconds from the first store write of a batch to its commit (one node tick): everything
#: written meanwhile joins the batch. Measured better than committing after one scheduler
#: pass (docs/benchmarks.md): bigger batches, and the copies and receipts that wait for the
#: commit then leave in bursts that share peer frames and TLS records.
COMMIT_INTERVAL = 0.025


@attrs.define
class _Sender:
    """Who sent a message (at its origin): where its receipts go."""

    conn: ClientConnection | None
    ref: protocol.Ref
    user: str
    expires: float
    #: (recipient, region) pairs already confirmed: one ``delivered`` each.
    confirmed: set[tuple[str, str]] = attrs.field(factory=set)
    #: Fast recipients already answered ``timeout``: a later error is not sent too.
    timed_out: set[str] = attrs.field(factory=set)


@attrs.define
class _Accepted:
    """A reliable message written in the open batch: ``stored`` and its copies wait for the
    commit."""

    conn: ClientConnection
    ref: protocol.Ref
    id: str
    copies: list[StoredMessage]


@attrs.define
class _Delivered:
    """A message shown here: where a read receipt goes."""

    origin: str
    sender: str
    recipients: set[str]
    read_by: set[str] = attrs.field(factory=set)


def _evict_oldest(table: dict[Any, Any], limit: int) -> None:
    if len(table) > limit:
        for key in list(itertools.islice(table, len(table) - limit * 3 // 4)):
            del table[key]


class Messenger:
    """Direct messages of one daemon: origin, forwarder and recipient daemon at once."""

    def __init__(
        self,
        node: Node,
        store: MessageStore,
        *,
        wall_clock: Callable[[], float] | None = None,
    ) -> None:
        self.node = node
        self.store = store
        self.name = node.replica.node
        self.region = node.region
        self.wall_clock = wall_clock or node.wall_clock
        self._ids = itertools.count(1)
        self._id_prefix = f"{self.name}.{_base36(node.replica.incarnation)}"
        self._senders: dict[str, _Sender] = {}
        #: (message id, recipient) -> when to send again if still unconfirmed.
        self._inflight: dict[tuple[str, str], float] = {}
        self._attempts: dict[tuple[str, str], int] = {}
        self._seen: dict[tuple[Any, ...], str] = {}
        self._recent: dict[str, _Delivered] = {}
        self.fetches = Fetches(self)
        #: Fast (message id, recipient) -> sending user, until the first delivered or error
        #: (else ``timeout``, see :mod:`presenced.core.answers`).
        self._fast: Deadlines[tuple[str, str], str] = Deadlines(FAST_ANSWER_S, MAX_SENDERS)
        #: Recipients with pending messages in the store (mirrors it; checked per presence join).
        self.pending_users: set[str] = set(store.pending_recipients())
        self._to_pump: set[str] = set(self.pending_users)
        self._wakeup = trio.Event()
        #: Whether the run loop sweeps every SWEEP_INTERVAL (else it sleeps until expiry).
        self._sweeping = True
        #: Reliable messages in the open batch, and the receipts waiting for its commit.
        self._accepted: list[_Accepted] = []
        self._held: list[wire.Receipt] = []
        self._commit_wanted = trio.Event()
        node.messenger = self

    # ------------------------------------------------------------------ client requests

    def send(self, conn: ClientConnection, message: protocol.Send) -> None:
        """A client's ``send``: store it (reliable) and start delivering every copy."""
        node = self.node
        message_id = f"{self._id_prefix}.{next(self._ids)}"
        now = node.clock()
        node.metrics.messages_sent += 1
        group = message.to if message.group else ()
        if message.mode == protocol.RELIABLE:
            self._batch()
            try:
                stored = self.store.add(
                    message_id,
                    conn.user,
                    conn.session,
                    message.to,
                    message.data,
                    self.wall_clock(),
                    group=group,
                )
            except StoreFull as exc:
                node.metrics.count_message_error(protocol.STORE_FULL)
                conn.send(protocol.error(protocol.STORE_FULL, str(exc), message.ref))
                return
            self._remember_sender(message_id, conn, message.ref, now)
            self._accepted.append(_Accepted(conn, message.ref, message_id, stored))
            return
        self._remember_sender(message_id, conn, message.ref, now)
        sent_at = round(self.wall_clock() * 1000)
        for user in message.to:
            nodes = node.state.user_nodes(user)
            if not nodes:
                self._tell_sender_error(
                    message_id, conn.user, user, protocol.NOT_ONLINE, f"{user} is not online"
                )
                continue
            # Before the copies leave: a copy for this daemon is answered at once.
            self._time_out_fast(self._fast.add((message_id, user), conn.user, now))
            self._sweep_soon()
            for dest in nodes:
                self._route(
                    wire.Direct(
                        message_id,
                        self.name,
                        dest,
                        HOP_LIMIT,
                        conn.user,
                        conn.session,
                        self.region,
                        user,
                        group,
                        message.data,
                        False,
                        sent_at=sent_at,
                    ),
                    None,
                )

    def mark_read(self, conn: ClientConnection, message: protocol.MarkRead) -> None:
        """The recipient read a message shown here: tell its sender (once per user)."""
        shown = self._recent.get(message.id)
        if shown is None or conn.user not in shown.recipients:
            raise protocol.ProtocolError(
                protocol.BAD_REQUEST,
                f"no message {message.id!r} was delivered to you on this daemon",
                message.ref,
            )
        if conn.user in shown.read_by:
            return  # another tab read it already: one receipt per user
        shown.read_by.add(conn.user)
        self._route(
            wire.Receipt(
                message.id,
                self.name,
                shown.origin,
                HOP_LIMIT,
                wire.READ,
                conn.user,
                self.region,
                sender=shown.sender,
            ),
            None,
        )

    def fetch(self, conn: ClientConnection, message: protocol.Fetch) -> None:
        """Ask every daemon that may hold this user's pending messages (this one too); see
        :mod:`presenced.server.fetches` for when it answers, and what."""
        self.fetches.start(f"{self._id_prefix}.f{next(self._ids)}", conn, message)
        self._sweep_soon()

    def pull(self, request: str, dest: str, user: str, limit: int) -> None:
        """Send one fetch's ``pull`` to ``dest`` (this daemon's own is handled at once)."""
        self._route(wire.Pull(request, self.name, dest, HOP_LIMIT, user, limit), None)

    # ------------------------------------------------------------------ presence and routes

    def user_appeared(self, user: str) -> None:
        """A user with pending messages joined a room somewhere: deliver them now."""
        self._to_pump.add(user)
        self._wakeup.set()

    def routes_changed(self) -> None:
        """Links or routes changed: retry every pending recipient now."""
        self._to_pump.update(self.pending_users)
        self._wakeup.set()

    # ------------------------------------------------------------------ routing

    def on_routed(self, message: wire.Routed, link: str) -> None:
        """A routed message arrived from the peer ``link``."""
        key = _dedupe_key(message)
        first_link = self._seen.get(key)
        if first_link is not None:
            if first_link != link and isinstance(message, wire.Direct):
                log.warning("routing loop: message %s came back through %s", message.id, link)
                self._undeliverable(message, protocol.HOP_LIMIT)
            return  # a duplicate (the same link twice): already handled
        self._seen[key] = link
        _evict_oldest(self._seen, MAX_SEEN)
        if message.dest != self.name and message.hops <= 1:
            self._undeliverable(message, protocol.HOP_LIMIT)
            return
        self._route(message, link)

    def _route(self, message: wire.Routed, came_from: str | None) -> None:
        if message.dest == self.name:
            self._handle(message)
            return
        peers = self.node.gossip
        hop = peers.routes.next_hop(message.dest) if peers is not None else None
        if came_from is not None:
            message = attrs.evolve(message, hops=message.hops - 1)
        if hop is None or peers is None or not peers.send_routed(hop, message):
            self._undeliverable(message, protocol.UNREACHABLE)
            return
        if isinstance(message, wire.Direct):
            self.node.metrics.messages_routed += 1

    def _undeliverable(self, message: wire.Routed, code: str) -> None:
        """A message cannot go on: a direct message's origin hears why; the rest is dropped
        (receipts and fetch answers are repaired by retransmission and timeouts)."""
        if isinstance(message, wire.Direct):
            self._route(self._receipt(message, wire.ERROR, code), None)
        else:
            log.debug(
                "dropping %s %s for %s: %s", type(message).__name__, message.id, message.dest, code
            )

    def _handle(self, message: wire.Routed) -> None:
        if isinstance(message, wire.Direct):
            self._deliver(message)
        elif isinstance(message, wire.Receipt):
            self._on_receipt(message)
        elif isinstance(message, wire.Pull):
            self._on_pull(message)
        else:
            self.fetches.on_pulled(message)

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
        node = self.node
        conns = node.user_connections(message.to)
        if not conns:
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
        frame = message_frame(
            protocol.direct_message(
                message.id,
                message.sender,
                message.session,
                message.region,
                message.group,
                message.data,
                mode,
                message.sent_at,
            )
        )
        for conn in conns:
            conn.push(frame)
        node.metrics.count_frames(len(conns), len(frame))
        node.metrics.messages_delivered += 1
        if message.reliable:
            self._batch()
            self.store.set_last_delivered(
                message.origin, message.sender, message.to, message.seq, self.wall_clock()
            )
        if fetch is not None:
            fetch.count += 1
        shown = self._recent.get(message.id)
        if shown is None:
            shown = self._recent[message.id] = _Delivered(message.origin, message.sender, set())
            _evict_oldest(self._recent, MAX_RECENT)
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

    # ------------------------------------------------------------------ origin

    def _remember_sender(
        self, message_id: str, conn: ClientConnection, ref: protocol.Ref, now: float
    ) -> None:
        self._senders[message_id] = _Sender(conn, ref, conn.user, now + SENDER_MEMORY)
        _evict_oldest(self._senders, MAX_SENDERS)

    def _tell_sender(
        self, message_id: str, user: str, build: Callable[[protocol.Ref], dict[str, Any]]
    ) -> None:
        """A receipt for the sending session if it is still here, else its user's sessions."""
        sender = self._senders.get(message_id)
        if sender is not None and sender.conn in self.node.connections:
            assert sender.conn is not None
            sender.conn.send(build(sender.ref))
            return
        for conn in self.node.user_connections(user):
            conn.send(build(None))

    def _tell_sender_error(
        self, message_id: str, sender: str, to: str, code: str, text: str
    ) -> None:
        self.node.metrics.count_message_error(code)
        self._tell_sender(
            message_id, sender, lambda ref: protocol.message_error(ref, message_id, to, code, text)
        )

    def _on_receipt(self, receipt: wire.Receipt) -> None:
        key = (receipt.id, receipt.to)
        pending = self.store.get(receipt.id, receipt.to)
        kind = receipt.kind
        if kind != wire.READ:
            self._fast.answered(key)
        if kind == wire.DELIVERED:
            if pending is not None:
                self._batch()
                self.store.mark_delivered(receipt.id, receipt.to)
                self._inflight.pop(key, None)
                self._attempts.pop(key, None)
                if self.store.pending_count(receipt.to) == 0:
                    self.pending_users.discard(receipt.to)
                else:
                    # Sends go out as they are stored; the next sweep tops the window up
                    # (one query per recipient per sweep, not one per receipt).
                    self._to_pump.add(receipt.to)
                    self._sweep_soon()
            sender = self._senders.get(receipt.id)
            if sender is not None:
                if (receipt.to, receipt.region) in sender.confirmed:
                    return  # a retransmission confirmed again
                sender.confirmed.add((receipt.to, receipt.region))
            self._tell_sender(
                receipt.id,
                receipt.sender,
                lambda ref: protocol.delivered(ref, receipt.id, receipt.to, receipt.region),
            )
        elif kind == wire.READ:
            self._tell_sender(
                receipt.id,
                receipt.sender,
                lambda ref: protocol.read_receipt(ref, receipt.id, receipt.to),
            )
        elif pending is not None:
            # Deferred, or an error for a reliable message: it stays pending and is sent
            # again (after its predecessor is confirmed, or when the recipient is back).
            if self._attempts.get(key) == receipt.attempt:
                self._inflight.pop(key, None)
                # Retried at the next sweep: the recipient may have appeared elsewhere while
                # this copy was travelling (its join found the message still in flight).
                self._to_pump.add(receipt.to)
                self._sweep_soon()
            if kind == wire.ERROR:
                log.debug("reliable message %s to %s: %s", receipt.id, receipt.to, receipt.code)
        elif kind == wire.ERROR:
            sender = self._senders.get(receipt.id)
            if sender is not None and (
                receipt.to in sender.timed_out
                or any(to == receipt.to for to, _ in sender.confirmed)
            ):
                return  # delivered elsewhere already, or answered by its timeout
            code = receipt.code if receipt.code in protocol.ERROR_CODES else protocol.INTERNAL
            self._tell_sender_error(
                receipt.id, receipt.sender, receipt.to, code, _ERROR_TEXT.get(code, code)
            )

    def _push(self, item: StoredMessage, *, pull: str = "", dest: str | None = None) -> bool:
        """Send one pending reliable message towards its recipient (False: nowhere to send)."""
        key = (item.id, item.recipient)
        if not pull and key in self._inflight:
            return True
        if not self.store.is_committed(item):
            return True  # in the open batch: it goes out after the commit
        nodes = [dest] if dest is not None else self.node.state.user_nodes(item.recipient)
        if not nodes:
            return False
        attempt = self._attempts[key] = self._attempts.get(key, -1) + 1
        self._inflight[key] = self.node.clock() + ACK_TIMEOUT
        self._sweep_soon()
        prev = self.store.previous_pending(item)
        for node in nodes:
            self._route(
                wire.Direct(
                    item.id,
                    self.name,
                    node,
                    HOP_LIMIT,
                    item.sender,
                    item.sender_session,
                    self.region,
                    item.recipient,
                    item.group,
                    item.data,
                    True,
                    item.seq,
                    prev,
                    round(item.created_at * 1000),
                    attempt,
                    pull,
                ),
                None,
            )
        return True

    def _pump(self, user: str) -> None:
        """Keep up to WINDOW of a recipient's pending messages in flight, oldest first."""
        if not self.node.state.user_nodes(user):
            return
        in_flight = 0
        for item in self.store.pending(user, limit=WINDOW):
            if (item.id, user) in self._inflight:
                in_flight += 1
                continue
            if in_flight >= WINDOW or not self._push(item):
                return
            in_flight += 1

    # ------------------------------------------------------------------ fetch

    def _on_pull(self, pull: wire.Pull) -> None:
        self.flush()  # copies go out from committed rows only
        items = self.store.pending(pull.user, limit=pull.limit)
        for item in items:
            self._push(item, pull=pull.id, dest=pull.origin)
        remaining = self.store.pending_count(pull.user) - len(items)
        self._route(
            wire.Pulled(pull.id, self.name, pull.origin, HOP_LIMIT, len(items), max(0, remaining)),
            None,
        )

    # ------------------------------------------------------------------ background work

    async def run(self) -> None:
        """Group commits, retransmissions, deliveries to users who appeared, fetch and
        fast-send deadlines, expiry.

        When cancelled (shutdown or crash) an open batch is not committed: the store's close
        throws it away, like a ``kill -9``, and nobody was told anything that relied on it. A
        graceful shutdown loses nothing by it: this task commits as usual while the clients
        are being closed, and is cancelled only after that.
        """
        self.fetches.started_at = self.node.clock()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._committer)
            next_expiry = self.node.clock()
            while True:
                # Nothing that times out: sleep until the expiry pass (or a wake-up), not
                # twice a second (each a wake-up of the whole daemon). Answer deadlines
                # (fast sends, fetches) are kept to the moment, not to the next sweep.
                self._sweeping = self._sweep_due()
                timeout = SWEEP_INTERVAL if self._sweeping else next_expiry - self.node.clock()
                for deadline in (self._fast.next_deadline(), self.fetches.next_deadline()):
                    if deadline is not None:
                        timeout = min(timeout, deadline - self.node.clock())
                with trio.move_on_after(max(0.0, timeout)):
                    await self._wakeup.wait()
                self._wakeup = trio.Event()
                now = self.node.clock()
                self.sweep(now)
                if now >= next_expiry:
                    next_expiry = now + EXPIRE_INTERVAL
                    self.expire()

    async def _committer(self) -> None:
        """Commit each batch :data:`COMMIT_INTERVAL` after its first write."""
        while True:
            await self._commit_wanted.wait()
            self._commit_wanted = trio.Event()
            await trio.sleep(COMMIT_INTERVAL)
            self.flush()

    def _batch(self) -> None:
        """Before a store write: open a batch, if none is, and have it committed soon."""
        if not self.store.in_batch:
            self.store.begin()
            self._commit_wanted.set()

    def flush(self) -> None:
        """Commit the open batch, then do what waited for it: ``stored`` to the senders and
        the first copies of their messages, and the held ``delivered`` receipts. If the
        commit fails, nothing of the batch was stored: its senders get an error instead, and
        the held receipts are dropped (the origins retransmit)."""
        if not self.store.in_batch:
            return
        accepted, self._accepted = self._accepted, []
        held, self._held = self._held, []
        try:
            self.store.commit()
        except StoreError as exc:
            self._commit_failed(exc, accepted, held)
            return
        node = self.node
        for item in accepted:
            node.metrics.messages_stored += len(item.copies)
            item.conn.send(protocol.stored(item.ref, item.id))
            for copy in item.copies:
                self.pending_users.add(copy.recipient)
                self._push(copy)
        for receipt in held:
            self._route(receipt, None)

    def _commit_failed(
        self, exc: StoreError, accepted: list[_Accepted], held: list[wire.Receipt]
    ) -> None:
        log.error(
            "message store commit failed (%d messages refused, %d receipts dropped): %s",
            len(accepted),
            len(held),
            exc,
        )
        for item in accepted:
            self._senders.pop(item.id, None)
            self.node.metrics.count_message_error(protocol.INTERNAL)
            item.conn.send(
                protocol.error(
                    protocol.INTERNAL,
                    f"the message store failed, message not stored; try again later ({exc})",
                    item.ref,
                )
            )
        # Confirmed messages whose deletion was rolled back are pending again: resend them
        # (their recipient daemons confirm without showing them again).
        try:
            self.pending_users = set(self.store.pending_recipients())
        except StoreError:
            log.exception("cannot re-read the pending recipients")
            return
        self._to_pump.update(self.pending_users)
        self._wakeup.set()

    def _sweep_due(self) -> bool:
        """Whether anything waits on the sweep: a retransmission, a recipient to pump, a
        fetch's deadline. (Senders to forget can wait for the expiry pass: they are kept
        600 s anyway, and their number is bounded.)"""
        return bool(self._inflight or self._to_pump or self.fetches or self._fast)

    def _sweep_soon(self) -> None:
        """Something the sweep must time out was added: restart the sweeps if they sleep."""
        if not self._sweeping:
            self._sweeping = True
            self._wakeup.set()

    def sweep(self, now: float) -> None:
        """One pass: resend what timed out, deliver to who appeared, end late fetches."""
        self.flush()
        for key, deadline in list(self._inflight.items()):
            if deadline <= now:
                del self._inflight[key]
                self._to_pump.add(key[1])
        to_pump, self._to_pump = self._to_pump, set()
        for user in sorted(to_pump & self.pending_users):
            self._pump(user)
        self.fetches.sweep(now)
        self._time_out_fast(self._fast.due(now))
        for message_id, sender in list(self._senders.items()):
            if sender.expires > now:
                break
            del self._senders[message_id]

    def _time_out_fast(self, due: list[tuple[tuple[str, str], str]]) -> None:
        """Fast messages with no answer for a recipient in time: tell the sender ``timeout``
        (a copy may still arrive: a late ``delivered`` is passed on, a late error is not)."""
        for (message_id, to), user in due:
            sender = self._senders.get(message_id)
            if sender is not None:
                if any(recipient == to for recipient, _ in sender.confirmed):
                    continue
                sender.timed_out.add(to)
            self._tell_sender_error(
                message_id,
                user,
                to,
                protocol.TIMEOUT,
                f"no answer from {to}'s daemon within {self._fast.timeout_s:g} s; "
                "the message may or may not have arrived",
            )

    def expire(self) -> None:
        """Drop reliable messages older than the store's max age, telling their senders."""
        self.flush()  # expiry and pruning commit on their own, before anyone is told
        wall = self.wall_clock()
        for item in self.store.expire(wall):
            self._inflight.pop((item.id, item.recipient), None)
            self._attempts.pop((item.id, item.recipient), None)
            self._tell_sender_error(
                item.id,
                item.sender,
                item.recipient,
                protocol.EXPIRED,
                f"not delivered to {item.recipient} before it expired",
            )
        self.pending_users = set(self.store.pending_recipients())
        self.store.prune(wall)

    def status(self) -> dict[str, Any]:
        """Counts for /status."""
        return {
            "pending_recipients": len(self.pending_users),
            "pending_messages": self.store.pending_total(),
            "in_flight": len(self._inflight),
            "fetches": len(self.fetches),
            "fast_unanswered": len(self._fast),
        }


_ERROR_TEXT = {
    protocol.NOT_ONLINE: "the recipient is not online",
    protocol.UNREACHABLE: "no live route to the recipient's daemon",
    protocol.HOP_LIMIT: "the message hit its hop limit (a routing loop?)",
}


def _dedupe_key(message: wire.Routed) -> tuple[Any, ...]:
    if isinstance(message, wire.Direct):
        return ("dm", message.id, message.to, message.dest, message.attempt, message.pull)
    if isinstance(message, wire.Receipt):
        return ("rcpt", message.id, message.to, message.origin, message.kind, message.attempt)
    if isinstance(message, wire.Pull):
        return ("pull", message.id, message.dest)
    return ("pulled", message.id, message.origin)


def _base36(number: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        number, digit = divmod(number, 36)
        out = digits[digit] + out
        if number == 0:
            return out


__all__ = ["COMMIT_INTERVAL", "HOP_LIMIT", "Messenger"]
