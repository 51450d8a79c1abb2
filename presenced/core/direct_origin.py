"""The origin's half of the direct-message machine: the sender's daemon, which owns each
message until it is answered.

It gives every message its id, writes a reliable one to the store (``stored`` and the first
copies wait for the commit), sends one copy per recipient to every node where that
recipient has a presence, keeps up to :data:`WINDOW` reliable copies per recipient in
flight, sends one again after :data:`ACK_TIMEOUT_S` without a receipt (or at once when the
recipient appears or routes change), and turns the receipts that come back into answers
for the sender. Each copy carries ``prev``, the pair's previous message still pending here,
so the recipient daemon can keep the order. A fast message is never retransmitted, so it is
answered ``timeout`` here when no answer came in time.

Part of :class:`presenced.core.direct.DirectMessages`, which routes what this decides.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

import attrs

from presenced.core import peer_wire as wire
from presenced.core import protocol
from presenced.core.answers import FAST_ANSWER_S, MAX_SENDERS, Deadlines, Senders
from presenced.core.direct_effects import Counters, Log, Outbox, Reply, TellSender, Wake
from presenced.core.direct_store import Store, StoredMessage, StoreError, StoreFull

__all__ = ["ACK_TIMEOUT_S", "HOP_LIMIT", "WINDOW", "Origin"]

#: Hops a routed message may take (more than any sane region graph's diameter).
HOP_LIMIT = 16
#: Seconds a reliable copy may stay unconfirmed before it is sent again.
ACK_TIMEOUT_S = 3.0
#: Reliable copies in flight per recipient (the rest follow as these are confirmed).
WINDOW = 256

H = TypeVar("H")

_ERROR_TEXT = {
    protocol.NOT_ONLINE: "the recipient is not online",
    protocol.UNREACHABLE: "no live route to the recipient's daemon",
    protocol.HOP_LIMIT: "the message hit its hop limit (a routing loop?)",
}


@attrs.define
class Accepted(Generic[H]):
    """A reliable message written in the open batch: ``stored`` and its copies wait for the
    commit."""

    conn: H
    ref: protocol.Ref
    id: str
    copies: list[StoredMessage]


class Origin(Generic[H]):
    """The messages this daemon originated, until each is answered for every recipient.

    ``user_nodes`` says where a user has a presence; ``route`` hands a routed message to the
    machine (which forwards it, or handles it here when it is for this node).
    """

    def __init__(
        self,
        name: str,
        region: str,
        store: Store,
        out: Outbox[H],
        counters: Counters,
        user_nodes: Callable[[str], Any],
        route: Callable[[wire.Routed], None],
        *,
        fast_answer_s: float = FAST_ANSWER_S,
    ) -> None:
        self.name = name
        self.region = region
        self.store = store
        self.out = out
        self.counters = counters
        self.user_nodes = user_nodes
        self.route = route
        self.senders: Senders[H] = Senders()
        #: (message id, recipient) -> when to send again if still unconfirmed.
        self.inflight: dict[tuple[str, str], float] = {}
        self.attempts: dict[tuple[str, str], int] = {}
        #: Fast (message id, recipient) -> sending user, until the first delivered or error.
        self.fast: Deadlines[tuple[str, str], str] = Deadlines(fast_answer_s, MAX_SENDERS)
        #: Recipients with pending messages in the store (mirrors it; checked per presence join).
        self.pending_users: set[str] = set(store.pending_recipients())
        self.to_pump: set[str] = set(self.pending_users)
        #: Reliable messages in the open batch.
        self.accepted: list[Accepted[H]] = []

    # ------------------------------------------------------------------ sending

    def send(
        self, message_id: str, conn: H, user: str, session: str, message: protocol.Send
    ) -> None:
        """A client's ``send``: store it (reliable) and start delivering every copy."""
        out = self.out
        self.counters.messages_sent += 1
        group = message.to if message.group else ()
        if message.mode == protocol.RELIABLE:
            out.open_batch()
            try:
                stored = self.store.add(
                    message_id, user, session, message.to, message.data, out.wall_s, group=group
                )
            except StoreFull as exc:
                self.counters.count_message_error(protocol.STORE_FULL)
                out.add(Reply(conn, protocol.error(protocol.STORE_FULL, str(exc), message.ref)))
                return
            self.senders.remember(message_id, conn, message.ref, out.now)
            self.accepted.append(Accepted(conn, message.ref, message_id, stored))
            return
        self.senders.remember(message_id, conn, message.ref, out.now)
        sent_at_ms = round(out.wall_s * 1000)
        for to in message.to:
            nodes = self.user_nodes(to)
            if not nodes:
                self.tell_error(message_id, user, to, protocol.NOT_ONLINE, f"{to} is not online")
                continue
            # Before the copies leave: a copy for this daemon is answered at once.
            self._time_out_fast(self.fast.add((message_id, to), user, out.now))
            out.sweep_soon()
            for dest in nodes:
                self.route(
                    wire.Direct(
                        message_id,
                        self.name,
                        dest,
                        HOP_LIMIT,
                        user,
                        session,
                        self.region,
                        to,
                        group,
                        message.data,
                        False,
                        sent_at=sent_at_ms,
                    )
                )

    def push(self, item: StoredMessage, *, pull: str = "", dest: str | None = None) -> bool:
        """Send one pending reliable message towards its recipient (False: nowhere to send)."""
        key = (item.id, item.recipient)
        if not pull and key in self.inflight:
            return True
        if not self.store.is_committed(item):
            return True  # in the open batch: it goes out after the commit
        nodes = [dest] if dest is not None else self.user_nodes(item.recipient)
        if not nodes:
            return False
        attempt = self.attempts[key] = self.attempts.get(key, -1) + 1
        self.inflight[key] = self.out.now + ACK_TIMEOUT_S
        self.out.sweep_soon()
        prev = self.store.previous_pending(item)
        for node in nodes:
            self.route(
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
                )
            )
        return True

    def pump(self, user: str) -> None:
        """Keep up to WINDOW of a recipient's pending messages in flight, oldest first."""
        if not self.user_nodes(user):
            return
        in_flight = 0
        for item in self.store.pending(user, limit=WINDOW):
            if (item.id, user) in self.inflight:
                in_flight += 1
                continue
            if in_flight >= WINDOW or not self.push(item):
                return
            in_flight += 1

    # ------------------------------------------------------------------ answers

    def tell_sender(
        self, message_id: str, user: str, build: Callable[[protocol.Ref], dict[str, Any]]
    ) -> None:
        """A frame for the sending session (with its ``ref``) if this daemon remembers it;
        the shell falls back to the user's sessions (without it) if that one is gone."""
        sender = self.senders.get(message_id)
        if sender is None:
            self.out.add(TellSender(None, user, build(None)))
        else:
            self.out.add(TellSender(sender.conn, user, build(sender.ref)))

    def tell_error(self, message_id: str, sender: str, to: str, code: str, text: str) -> None:
        self.counters.count_message_error(code)
        self.tell_sender(
            message_id, sender, lambda ref: protocol.message_error(ref, message_id, to, code, text)
        )

    def on_receipt(self, receipt: wire.Receipt) -> None:
        """What became of a copy, from the recipient daemon (or a forwarder, for an error)."""
        key = (receipt.id, receipt.to)
        pending = self.store.get(receipt.id, receipt.to)
        kind = receipt.kind
        if kind != wire.READ:
            self.fast.answered(key)
        if kind == wire.DELIVERED:
            if pending is not None:
                self.out.open_batch()
                self.store.mark_delivered(receipt.id, receipt.to)
                self.inflight.pop(key, None)
                self.attempts.pop(key, None)
                if self.store.pending_count(receipt.to) == 0:
                    self.pending_users.discard(receipt.to)
                else:
                    # Sends go out as they are stored; the next sweep tops the window up
                    # (one query per recipient per sweep, not one per receipt).
                    self.to_pump.add(receipt.to)
                    self.out.sweep_soon()
            if not self.senders.first_confirmation(receipt.id, receipt.to, receipt.region):
                return  # a retransmission confirmed again
            self.tell_sender(
                receipt.id,
                receipt.sender,
                lambda ref: protocol.delivered(ref, receipt.id, receipt.to, receipt.region),
            )
        elif kind == wire.READ:
            self.tell_sender(
                receipt.id,
                receipt.sender,
                lambda ref: protocol.read_receipt(ref, receipt.id, receipt.to),
            )
        elif pending is not None:
            # Deferred, or an error for a reliable message: it stays pending and is sent
            # again (after its predecessor is confirmed, or when the recipient is back).
            if self.attempts.get(key) == receipt.attempt:
                self.inflight.pop(key, None)
                # Retried at the next sweep: the recipient may have appeared elsewhere while
                # this copy was travelling (its join found the message still in flight).
                self.to_pump.add(receipt.to)
                self.out.sweep_soon()
            if kind == wire.ERROR:
                text = f"reliable message {receipt.id} to {receipt.to}: {receipt.code}"
                self.out.add(Log(False, text))
        elif kind == wire.ERROR:
            if self.senders.answered(receipt.id, receipt.to):
                return  # delivered elsewhere already, or answered by its timeout
            code = receipt.code if receipt.code in protocol.ERROR_CODES else protocol.INTERNAL
            self.tell_error(
                receipt.id, receipt.sender, receipt.to, code, _ERROR_TEXT.get(code, code)
            )

    # ------------------------------------------------------------------ commits and timers

    def committed(self, accepted: list[Accepted[H]]) -> None:
        """The batch that held these messages committed: ``stored``, then the first copies."""
        for item in accepted:
            self.counters.messages_stored += len(item.copies)
            self.out.add(Reply(item.conn, protocol.stored(item.ref, item.id)))
            for copy in item.copies:
                self.pending_users.add(copy.recipient)
                self.push(copy)

    def commit_failed(self, exc: StoreError, accepted: list[Accepted[H]]) -> None:
        """The batch is lost: refuse its messages, and resend whatever is pending again."""
        for item in accepted:
            self.senders.forget(item.id)
            self.counters.count_message_error(protocol.INTERNAL)
            text = f"the message store failed, message not stored; try again later ({exc})"
            self.out.add(Reply(item.conn, protocol.error(protocol.INTERNAL, text, item.ref)))
        # Confirmed messages whose deletion was rolled back are pending again: resend them
        # (their recipient daemons confirm without showing them again).
        try:
            self.pending_users = set(self.store.pending_recipients())
        except StoreError as again:
            self.out.add(Log(True, f"cannot re-read the pending recipients: {again}"))
            return
        self.to_pump.update(self.pending_users)
        self.out.add(Wake())

    def sweep_due(self) -> bool:
        """Whether anything here waits on the sweep: a retransmission, a recipient to pump,
        a fast message's deadline. (Senders to forget can wait for the expiry pass: they are
        kept 600 s anyway, and their number is bounded.)"""
        return bool(self.inflight or self.to_pump or self.fast)

    def sweep_retransmits(self, now: float) -> None:
        """Resend what timed out, and deliver to the recipients who appeared."""
        for key, deadline in list(self.inflight.items()):
            if deadline <= now:
                del self.inflight[key]
                self.to_pump.add(key[1])
        to_pump, self.to_pump = self.to_pump, set()
        for user in sorted(to_pump & self.pending_users):
            self.pump(user)

    def sweep_answers(self, now: float) -> None:
        """Answer the fast messages whose deadline passed; forget old senders."""
        self._time_out_fast(self.fast.due(now))
        self.senders.forget_expired(now)

    def _time_out_fast(self, due: list[tuple[tuple[str, str], str]]) -> None:
        """Fast messages with no answer for a recipient in time: tell the sender ``timeout``
        (a copy may still arrive: a late ``delivered`` is passed on, a late error is not)."""
        for (message_id, to), user in due:
            if not self.senders.time_out(message_id, to):
                continue
            self.tell_error(
                message_id,
                user,
                to,
                protocol.TIMEOUT,
                f"no answer from {to}'s daemon within {self.fast.timeout_s:g} s; "
                "the message may or may not have arrived",
            )

    def expire(self, wall_s: float) -> None:
        """Drop reliable messages older than the store's max age, telling their senders."""
        for item in self.store.expire(wall_s):
            self.inflight.pop((item.id, item.recipient), None)
            self.attempts.pop((item.id, item.recipient), None)
            self.tell_error(
                item.id,
                item.sender,
                item.recipient,
                protocol.EXPIRED,
                f"not delivered to {item.recipient} before it expired",
            )
        self.pending_users = set(self.store.pending_recipients())
