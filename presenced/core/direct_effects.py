"""What the direct-message machine asks its shell to do, as data.

:class:`presenced.core.direct.DirectMessages` decides; its methods return a list of these,
in order, and the shell (:mod:`presenced.server.messaging.messenger`) carries them out
before anything else runs. Data rather than callbacks, so a unit test reads a decision as
a plain list, and so the machine never holds a socket, a link or a timer.
"""

from __future__ import annotations

from typing import Any, Generic, Protocol, TypeVar

import attrs

from presenced.core import peer_wire as wire
from presenced.core.direct_store import Store

__all__ = [
    "CommitSoon",
    "Counters",
    "Effect",
    "Forward",
    "Log",
    "Outbox",
    "Reply",
    "Show",
    "TellSender",
    "Wake",
]

H = TypeVar("H")


@attrs.frozen
class Reply(Generic[H]):
    """Send ``frame`` to the session ``conn`` (``if_connected``: only if it still is; a
    fetch's answer goes nowhere else)."""

    conn: H
    frame: dict[str, Any]
    if_connected: bool = False


@attrs.frozen
class TellSender(Generic[H]):
    """A frame about a message for its sender: to the sending session ``conn`` if it is
    still connected, else, without its ``ref``, to every session of ``user`` here (a
    receipt is news for every tab of the sender)."""

    conn: H | None
    user: str
    frame: dict[str, Any]


@attrs.frozen
class Show:
    """Write a direct message (a client ``message`` frame) to every session of ``user``."""

    user: str
    frame: dict[str, Any]


@attrs.frozen
class Forward:
    """Queue ``message`` on the link to the peer ``hop``. A link that is gone or full is
    told back through :meth:`~presenced.core.direct.DirectMessages.unsendable`."""

    hop: str
    message: wire.Routed


@attrs.frozen
class Wake:
    """Ask :meth:`~presenced.core.direct.DirectMessages.wake_at` again now: a sweep became
    due sooner than the shell's loop planned."""


@attrs.frozen
class CommitSoon:
    """A batch was opened: call :meth:`~presenced.core.direct.DirectMessages.flush`
    :data:`~presenced.core.direct.COMMIT_INTERVAL_S` from now."""


@attrs.frozen
class Log:
    """Something an operator may want to read (``warning``: else it is debug detail)."""

    warning: bool
    text: str


Effect = Reply[H] | TellSender[H] | Show | Forward | Wake | CommitSoon | Log


class Counters(Protocol):
    """The daemon's counters the machine bumps (:class:`presenced.server.metrics.Metrics`)."""

    messages_sent: int
    messages_stored: int
    messages_delivered: int

    def count_message_error(self, code: str) -> None: ...


class Outbox(Generic[H]):
    """One call into the machine, shared by its parts: the caller's clocks, the effects so
    far, and whether the shell's loop is sweeping (so a new deadline wakes it only once)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.now = 0.0
        self.wall_s = 0.0
        self.effects: list[Effect[H]] = []
        #: Whether the shell sweeps every SWEEP_INTERVAL_S (else it sleeps until expiry).
        self.sweeping = True

    def start(self, now: float, wall_s: float) -> None:
        self.now = now
        self.wall_s = wall_s

    def add(self, effect: Effect[H]) -> None:
        self.effects.append(effect)

    def take(self) -> list[Effect[H]]:
        out, self.effects = self.effects, []
        return out

    def open_batch(self) -> None:
        """Before a store write: open a batch, if none is, and have it committed soon."""
        if not self.store.in_batch:
            self.store.begin()
            self.effects.append(CommitSoon())

    def sweep_soon(self) -> None:
        """Something the sweep must time out was added: restart the sweeps if they sleep."""
        if not self.sweeping:
            self.sweeping = True
            self.effects.append(Wake())
