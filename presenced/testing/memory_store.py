"""A dict-backed :class:`presenced.core.direct_store.Store`, for unit tests of the
direct-message machine without SQLite.

It keeps the store's contract (seqs that only grow, per-recipient and total limits that
count the open batch, a batch that commits whole or not at all), not its validation of
names and sizes: the daemon's callers validate first. ``fail_commits`` makes the next
commits fail, as a full disk would.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from presenced.core.direct_store import StoredMessage, StoreError, StoreFull

__all__ = ["MemoryStore"]


class MemoryStore:
    """Pending messages and delivery marks in dicts; see the module docstring."""

    def __init__(
        self,
        *,
        max_pending_per_recipient: int = 1000,
        max_pending_total: int = 1_000_000,
        max_age_s: float = 7 * 86400,
    ) -> None:
        self.max_pending_per_recipient = max_pending_per_recipient
        self.max_pending_total = max_pending_total
        self.max_age_s = max_age_s
        self._pending: dict[tuple[str, str], StoredMessage] = {}
        self._marks: dict[tuple[str, str, str], tuple[int, float]] = {}
        self._seq = 0
        self._snapshot: tuple[dict[Any, Any], dict[Any, Any], int] | None = None
        self._uncommitted_from: int | None = None
        #: Write transactions committed (one per batch, or per write outside one).
        self.commits = 0
        #: How many of the next commits fail (the batch is then thrown away).
        self.fail_commits = 0

    # ------------------------------------------------------------------ group commit

    @property
    def in_batch(self) -> bool:
        return self._snapshot is not None

    def begin(self) -> None:
        if self._snapshot is not None:
            raise StoreError("a batch is already open")
        self._snapshot = (dict(self._pending), dict(self._marks), self._seq)
        self._uncommitted_from = None

    def commit(self) -> bool:
        if self._snapshot is None:
            raise StoreError("no batch is open")
        snapshot, self._snapshot = self._snapshot, None
        self._uncommitted_from = None
        if self.fail_commits:
            self.fail_commits -= 1
            self._pending, self._marks, self._seq = snapshot
            raise StoreError("commit failed (fail_commits)")
        self.commits += 1
        return True

    def is_committed(self, message: StoredMessage) -> bool:
        return self._uncommitted_from is None or message.seq < self._uncommitted_from

    def _wrote(self) -> None:
        if self._snapshot is None:
            self.commits += 1

    # ------------------------------------------------------------------ sender side

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
    ) -> list[StoredMessage]:
        names = list(recipients)
        if not names or len(set(names)) != len(names):
            raise ValueError("recipients must be distinct and at least one")
        if any((id, name) in self._pending for name in names):
            raise ValueError(f"message {id!r} is already pending")
        if len(self._pending) + len(names) > self.max_pending_total:
            raise StoreFull("", "the message store is full")
        for name in names:
            if self.pending_count(name) >= self.max_pending_per_recipient:
                raise StoreFull(name, f"{name!r} has too many undelivered messages")
        members = tuple(group) if group is not None else (tuple(names) if len(names) > 1 else ())
        stored = []
        for name in names:
            self._seq += 1
            row = StoredMessage(
                id, sender, sender_session, name, self._seq, data, members, created_at
            )
            self._pending[(id, name)] = row
            stored.append(row)
        if self._snapshot is not None and self._uncommitted_from is None:
            self._uncommitted_from = stored[0].seq
        self._wrote()
        return stored

    def get(self, id: str, recipient: str) -> StoredMessage | None:
        return self._pending.get((id, recipient))

    def pending(self, recipient: str, limit: int | None = None) -> list[StoredMessage]:
        rows = sorted(
            (row for row in self._pending.values() if row.recipient == recipient),
            key=lambda row: row.seq,
        )
        return rows if limit is None else rows[:limit]

    def pending_count(self, recipient: str) -> int:
        return sum(1 for row in self._pending.values() if row.recipient == recipient)

    def pending_total(self) -> int:
        return len(self._pending)

    def pending_recipients(self) -> list[str]:
        return sorted({row.recipient for row in self._pending.values()})

    def previous_pending(self, message: StoredMessage) -> int:
        return max(
            (
                row.seq
                for row in self._pending.values()
                if row.sender == message.sender
                and row.recipient == message.recipient
                and row.seq < message.seq
            ),
            default=0,
        )

    def mark_delivered(self, id: str, recipient: str) -> StoredMessage | None:
        row = self._pending.pop((id, recipient), None)
        self._wrote()
        return row

    def expire(self, now: float) -> list[StoredMessage]:
        cutoff = now - self.max_age_s
        old = sorted(
            (row for row in self._pending.values() if row.created_at < cutoff),
            key=lambda row: row.seq,
        )
        for row in old:
            del self._pending[(row.id, row.recipient)]
        self._wrote()
        return old

    # ------------------------------------------------------------------ recipient side

    def last_delivered(self, origin: str, sender: str, recipient: str) -> int:
        return self._marks.get((origin, sender, recipient), (0, 0.0))[0]

    def set_last_delivered(
        self, origin: str, sender: str, recipient: str, seq: int, at: float
    ) -> None:
        key = (origin, sender, recipient)
        old_seq, old_at = self._marks.get(key, (0, at))
        self._marks[key] = (max(old_seq, seq), max(old_at, at))
        self._wrote()

    def prune(self, now: float) -> int:
        cutoff = now - self.max_age_s
        old = [key for key, (_seq, at) in self._marks.items() if at < cutoff]
        for key in old:
            del self._marks[key]
        self._wrote()
        return len(old)
