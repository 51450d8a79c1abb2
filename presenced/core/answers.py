"""Rules that make every direct-message request answered: send deadlines, fetch completeness.

*Send.* A ``fast`` copy handed to a link that silently stopped carrying anything (a
blackholed path: writes succeed into the socket buffer, nothing comes back) is lost without
an error from anyone. So the origin keeps each fast (message, recipient) in a
:class:`Deadlines` table until the first ``delivered`` or ``error`` for it; one that is still
there after :data:`FAST_ANSWER_S` is answered with ``error`` ``timeout``. One fixed timeout
means the table's insertion order is its deadline order: the sweep pops from the front, one
timer for every message and O(1) work per message.

*Receipts.* :class:`Senders` remembers, per message this daemon originated, the session
that sent it and which answers it already got: one ``delivered`` per recipient and region,
and no error for a recipient already answered ``delivered`` or ``timeout``.

*Fetch.* A fetch asks every daemon it can reach for the user's pending messages. It may
answer "complete" only when every daemon that could hold some was asked and answered, and
when this daemon's picture of the cluster is current at all (right after a start it knows
nobody: an empty answer then would be false). :class:`FetchProgress` tracks one fetch and
:func:`fetch_reply` turns its outcome into the client's answer; :class:`Fetches` holds the
fetches in progress on one daemon.

Pure: the caller passes ``now`` and the cluster as it sees it.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Iterable
from typing import Any, Final, Generic, TypeVar

import attrs

from presenced.core import protocol

#: Seconds the origin waits for a fast message's first ``delivered`` or ``error`` per
#: recipient before it answers ``timeout`` itself (docs/protocol.md promises at most this).
FAST_ANSWER_S: Final = 5.0
#: Seconds a fetch waits for routes and answers before it answers with what it has.
FETCH_ANSWER_S: Final = 3.0
#: Seconds after start during which a daemon with no synchronised peer link does not know
#: who else exists (its dialers, or the daemons that dial it, are still on their way).
CLUSTER_GRACE_S: Final = 2.0
#: The retry hint of an incomplete fetch.
RETRY_AFTER_MS: Final = 1000

#: Seconds the origin remembers who sent a message, to route its receipts to that session.
SENDER_MEMORY_S: Final = 600.0
#: Most senders remembered (beyond it the oldest are forgotten: receipts then go to the
#: sending user's sessions, without the ``ref``).
MAX_SENDERS: Final = 100_000

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
H = TypeVar("H")


class Deadlines(Generic[K, V]):
    """Requests waiting for an answer, each with the same timeout, oldest first.

    At most ``limit`` are held: beyond it the oldest are handed back as due at once (they
    are answered early rather than never, and memory stays bounded).
    """

    def __init__(self, timeout_s: float, limit: int) -> None:
        self.timeout_s = timeout_s
        self.limit = limit
        self._waiting: dict[K, tuple[float, V]] = {}

    def add(self, key: K, value: V, now: float) -> list[tuple[K, V]]:
        """Start waiting for ``key``; returns entries pushed out by the limit (due now)."""
        self._waiting[key] = (now + self.timeout_s, value)
        overflow = []
        while len(self._waiting) > self.limit:
            oldest = next(iter(self._waiting))
            overflow.append((oldest, self._waiting.pop(oldest)[1]))
        return overflow

    def answered(self, key: K) -> bool:
        """``key`` got its answer; True if it was still waiting."""
        return self._waiting.pop(key, None) is not None

    def due(self, now: float) -> list[tuple[K, V]]:
        """Remove and return the entries whose deadline has passed."""
        out = []
        waiting = self._waiting
        while waiting:
            key = next(iter(waiting))
            deadline, value = waiting[key]
            if deadline > now:
                break
            del waiting[key]
            out.append((key, value))
        return out

    def next_deadline(self) -> float | None:
        """When the oldest entry is due; None if nothing waits."""
        for deadline, _value in self._waiting.values():
            return deadline
        return None

    def __len__(self) -> int:
        return len(self._waiting)

    def __contains__(self, key: object) -> bool:
        return key in self._waiting


@attrs.define
class Sender(Generic[H]):
    """Who sent a message (at its origin): where its receipts go."""

    conn: H
    ref: protocol.Ref
    expires: float
    #: (recipient, region) pairs already confirmed: one ``delivered`` each.
    confirmed: set[tuple[str, str]] = attrs.field(factory=set)
    #: Fast recipients already answered ``timeout``: a later error is not sent too.
    timed_out: set[str] = attrs.field(factory=set)


class Senders(Generic[H]):
    """The senders of the messages this daemon originated, oldest first, each kept
    :data:`SENDER_MEMORY_S` and at most :data:`MAX_SENDERS` (then the oldest quarter goes).

    Forgetting one only costs its ``ref``: its answers then go to the user's sessions.
    """

    def __init__(self, memory_s: float = SENDER_MEMORY_S, limit: int = MAX_SENDERS) -> None:
        self.memory_s = memory_s
        self.limit = limit
        self._senders: dict[str, Sender[H]] = {}

    def __len__(self) -> int:
        return len(self._senders)

    def remember(self, message_id: str, conn: H, ref: protocol.Ref, now: float) -> None:
        self._senders[message_id] = Sender(conn, ref, now + self.memory_s)
        if len(self._senders) > self.limit:
            excess = len(self._senders) - self.limit * 3 // 4
            for key in list(itertools.islice(self._senders, excess)):
                del self._senders[key]

    def get(self, message_id: str) -> Sender[H] | None:
        return self._senders.get(message_id)

    def forget(self, message_id: str) -> None:
        self._senders.pop(message_id, None)

    def forget_expired(self, now: float) -> None:
        """Forget the senders remembered for longer than ``memory_s``."""
        for message_id, sender in list(self._senders.items()):
            if sender.expires > now:
                break
            del self._senders[message_id]

    def first_confirmation(self, message_id: str, to: str, region: str) -> bool:
        """A ``delivered`` from ``to`` in ``region``: False if that pair confirmed already
        (a retransmission confirmed again is not news)."""
        sender = self._senders.get(message_id)
        if sender is None:
            return True
        if (to, region) in sender.confirmed:
            return False
        sender.confirmed.add((to, region))
        return True

    def answered(self, message_id: str, to: str) -> bool:
        """Whether ``to`` already has its answer (delivered somewhere, or ``timeout``): a
        later error for it is not sent."""
        sender = self._senders.get(message_id)
        return sender is not None and (
            to in sender.timed_out or any(recipient == to for recipient, _ in sender.confirmed)
        )

    def time_out(self, message_id: str, to: str) -> bool:
        """A fast message's deadline for ``to`` passed: whether to answer ``timeout`` (not
        when a ``delivered`` came first)."""
        sender = self._senders.get(message_id)
        if sender is None:
            return True
        if any(recipient == to for recipient, _ in sender.confirmed):
            return False
        sender.timed_out.add(to)
        return True


@attrs.frozen
class ClusterView:
    """What a daemon knows of the other daemons when a fetch looks at it."""

    #: Whether the picture is current: a peer link has synchronised (its first gossip, which
    #: carries every replica and route that peer knows), the daemon has no peers at all, or
    #: it has been running for :data:`CLUSTER_GRACE_S`.
    settled: bool
    #: Daemons that could hold pending messages: every node with a replica up or down (not
    #: yet purged), a route advertisement, or a link; this daemon excluded.
    known: frozenset[str]
    #: Known daemons with a live route.
    reachable: frozenset[str]
    #: Known daemons whose every replica is down: not worth waiting for.
    down: frozenset[str] = frozenset()


def cluster_settled(*, peered: bool, synced_link: bool, uptime_s: float) -> bool:
    """Whether a daemon's picture of the cluster is current (see :class:`ClusterView`)."""
    return not peered or synced_link or uptime_s >= CLUSTER_GRACE_S


@attrs.define
class FetchProgress:
    """One fetch at the daemon that asks: whom it asked, who answered, what it delivered."""

    #: This daemon's node name (it asks itself too).
    me: str
    limit: int
    deadline: float
    asked: set[str] = attrs.field(factory=set)
    answered: set[str] = attrs.field(factory=set)
    #: Messages delivered to the user by this fetch, and messages still pending out there.
    count: int = 0
    remaining: int = 0

    def to_ask(self, view: ClusterView) -> list[str]:
        """Daemons to send a pull to now (reachable, not asked yet), this one first."""
        new = [self.me] if self.me not in self.asked else []
        new += sorted(view.reachable - self.asked - {self.me})
        self.asked.update(new)
        return new

    def on_answer(self, node: str, remaining: int) -> bool:
        """A daemon answered (``pulled``); False if it was not asked or answered already."""
        if node not in self.asked or node in self.answered:
            return False
        self.answered.add(node)
        self.remaining += remaining
        return True

    def complete(self, view: ClusterView) -> bool:
        """Every daemon that could hold messages was asked and answered."""
        return view.settled and self.me in self.answered and view.known <= self.answered

    def finished(self, view: ClusterView, now: float) -> bool:
        """Whether to answer now: complete, past the deadline, or nothing more can come (every
        daemon still unanswered is down)."""
        if now >= self.deadline or self.complete(view):
            return True
        waiting_for = (view.known | self.asked | {self.me}) - self.answered - view.down
        return view.settled and not waiting_for

    def reply(self, ref: protocol.Ref, view: ClusterView) -> dict[str, Any]:
        return fetch_reply(ref, self.count, self.remaining, complete=self.complete(view))


@attrs.define
class _Fetch(Generic[H]):
    """A fetch in progress: its progress, and the session that waits for its answer."""

    conn: H
    ref: protocol.Ref
    user: str
    progress: FetchProgress


class Fetches(Generic[H]):
    """The fetches in progress on one daemon, by request id, each answered exactly once."""

    def __init__(self, me: str) -> None:
        self.me = me
        self._active: dict[str, _Fetch[H]] = {}

    def __len__(self) -> int:
        return len(self._active)

    def start(
        self, request: str, conn: H, ref: protocol.Ref, user: str, limit: int, now: float
    ) -> FetchProgress:
        progress = FetchProgress(self.me, limit, now + FETCH_ANSWER_S)
        self._active[request] = _Fetch(conn, ref, user, progress)
        return progress

    def get(self, request: str) -> FetchProgress | None:
        fetch = self._active.get(request)
        return None if fetch is None else fetch.progress

    def user(self, request: str) -> str:
        return self._active[request].user

    def requests(self) -> list[str]:
        """The requests in progress, oldest first (a copy: answering one removes it)."""
        return list(self._active)

    def on_pulled(self, request: str, node: str, remaining: int) -> bool:
        """A daemon answered a pull; True if that is news for a fetch in progress."""
        fetch = self._active.get(request)
        return fetch is not None and fetch.progress.on_answer(node, remaining)

    def finish_if_done(
        self, request: str, view: ClusterView, now: float
    ) -> tuple[H, dict[str, Any]] | None:
        """If the fetch is finished (:meth:`FetchProgress.finished`), end it: the session
        to answer and the answer."""
        fetch = self._active.get(request)
        if fetch is None or not fetch.progress.finished(view, now):
            return None
        del self._active[request]
        return fetch.conn, fetch.progress.reply(fetch.ref, view)

    def next_deadline(self) -> float | None:
        return min((fetch.progress.deadline for fetch in self._active.values()), default=None)


def fetch_reply(ref: protocol.Ref, count: int, remaining: int, *, complete: bool) -> dict[str, Any]:
    """The answer to a fetch.

    Complete: ``fetched`` with ``complete: true``. Not complete: if it found nothing at all,
    ``error`` ``unavailable`` (a ``fetched`` with count 0 would read as "nothing waits" to a
    client that ignores ``complete``); otherwise ``fetched`` with ``complete: false``. Both
    carry ``retry_after_ms``.
    """
    if complete:
        return protocol.fetched(ref, count, remaining)
    if count == 0 and remaining == 0:
        out = protocol.error(
            protocol.UNAVAILABLE,
            "some daemons that may hold your messages could not be asked yet; fetch again",
            ref,
        )
        out["retry_after_ms"] = RETRY_AFTER_MS
        return out
    return protocol.fetched(ref, count, remaining, complete=False, retry_after_ms=RETRY_AFTER_MS)


def known_nodes(
    me: str, statuses: Iterable[tuple[str, bool]], routed: Iterable[str], linked: Iterable[str]
) -> tuple[frozenset[str], frozenset[str]]:
    """The daemons a fetch must hear from, and those of them that are down.

    ``statuses`` is (node, up) per replica tracked by liveness (up or down, not purged): a
    node is down when none of its replicas is up. ``routed`` are the nodes with a route
    advertisement, ``linked`` those with a live link (both up by definition).
    """
    up: set[str] = set(routed) | set(linked)
    seen: set[str] = set(up)
    for node, is_up in statuses:
        seen.add(node)
        if is_up:
            up.add(node)
    seen.discard(me)
    return frozenset(seen), frozenset(seen - up)


__all__ = [
    "CLUSTER_GRACE_S",
    "FAST_ANSWER_S",
    "FETCH_ANSWER_S",
    "MAX_SENDERS",
    "RETRY_AFTER_MS",
    "SENDER_MEMORY_S",
    "ClusterView",
    "Deadlines",
    "FetchProgress",
    "Fetches",
    "Sender",
    "Senders",
    "cluster_settled",
    "fetch_reply",
    "known_nodes",
]
