"""What the direct-message machine needs from its store: the row type, two errors, and the
interface it calls.

The machine (:mod:`presenced.core.direct`) makes every decision about reliable messages but
never touches a file: it calls a :class:`Store`, so the daemon hands it the durable SQLite
store (:mod:`presenced.server.messaging.store`) and a unit test hands it a dict. The
contract both keep:

* **sender side** (pending rows): one row per (message, recipient), each with a store-wide
  ``seq`` that only grows and is never reused, so a recipient daemon can order a
  (sender, recipient) pair by it.
* **recipient side** (delivery marks): per (origin, sender, recipient) the largest ``seq``
  this daemon showed, so a retransmission is confirmed again but never shown twice.
* **group commit**: after :meth:`Store.begin`, writes join one batch until
  :meth:`Store.commit`; reads see the batch, nothing in it is durable (and so nothing about
  it may be acknowledged) before ``commit`` returns, and a failed commit throws the whole
  batch away with :class:`StoreError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import attrs

__all__ = ["Store", "StoreError", "StoreFull", "StoredMessage"]


class StoreError(Exception):
    """The store file cannot be used (not a presenced store, corrupt, locked, I/O error)."""


class StoreFull(Exception):
    """A recipient's mailbox (or the whole store) is full; ``str()`` is a one-line reason.

    ``recipient`` names the recipient whose mailbox is full, or is ``""`` when the whole
    store (or its disk) is full. Nothing was written.
    """

    def __init__(self, recipient: str, reason: str) -> None:
        super().__init__(reason)
        self.recipient = recipient


@attrs.frozen
class StoredMessage:
    """One pending copy of a reliable message: one recipient's row."""

    #: Message id (the same for every recipient of a group message).
    id: str
    sender: str
    sender_session: str
    recipient: str
    #: Store-wide, strictly increasing, never reused.
    seq: int
    #: The JSON value as stored (what ``json.loads`` gives back).
    data: Any
    #: Every recipient of a group message, ``()`` for a one-to-one message.
    group: tuple[str, ...]
    #: Wall-clock seconds when the sender's daemon stored it.
    created_at: float


class Store(Protocol):
    """The calls the direct-message machine makes (see the module docstring for the rules)."""

    @property
    def in_batch(self) -> bool: ...

    def begin(self) -> None: ...

    def commit(self) -> bool: ...

    def is_committed(self, message: StoredMessage) -> bool: ...

    def add(
        self,
        id: str,
        sender: str,
        sender_session: str,
        recipients: Sequence[str],
        data: Any,
        created_at: float,
        *,
        group: Sequence[str] | None = None,
    ) -> list[StoredMessage]: ...

    def get(self, id: str, recipient: str) -> StoredMessage | None: ...

    def pending(self, recipient: str, limit: int | None = None) -> list[StoredMessage]: ...

    def pending_count(self, recipient: str) -> int: ...

    def pending_total(self) -> int: ...

    def pending_recipients(self) -> list[str]: ...

    def previous_pending(self, message: StoredMessage) -> int: ...

    def mark_delivered(self, id: str, recipient: str) -> StoredMessage | None: ...

    def expire(self, now: float) -> list[StoredMessage]: ...

    def last_delivered(self, origin: str, sender: str, recipient: str) -> int: ...

    def set_last_delivered(
        self, origin: str, sender: str, recipient: str, seq: int, at: float
    ) -> None: ...

    def prune(self, now: float) -> int: ...
