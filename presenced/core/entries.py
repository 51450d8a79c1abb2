"""The vocabulary of the presence state: keys, metas, replicas, changes and partitions.

Shared by the CRDT (:mod:`presenced.core.crdt`, which re-exports these names) and its room
index (:mod:`presenced.core.room_index`). Pure data: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Final, Literal, NamedTuple

Meta = Mapping[str, Any]
#: (room, user, session): the identity of one presence entry.
Key = tuple[str, str, str]
#: One record on the wire: key, counter of its last write, meta (None = removed).
Record = tuple[Key, int, Meta | None]

JOIN: Final = "join"
UPDATE: Final = "update"
LEAVE: Final = "leave"
ChangeKind = Literal["join", "update", "leave"]


class ReplicaId(NamedTuple):
    """One daemon incarnation: the unit of single-writer ownership.

    A named tuple rather than an attrs class: it keys most of the state (partitions, digests,
    liveness), and tuple hashing and comparison run in C, where attrs' generated ``__hash__``
    and ``__eq__`` were two Python calls per lookup (~70 per tick on a busy daemon).
    """

    node: str
    incarnation: int

    def __str__(self) -> str:
        return f"{self.node}#{self.incarnation}"


class Change(NamedTuple):
    """A change of what is visible: a presence appeared, changed its meta, or went away.

    For a leave, ``meta`` is the last meta that was visible, so a client can still say who left.
    (A named tuple: one is made per write and per merged record, ~15 per busy tick, and a
    tuple is built in C, in half the time of an attrs instance.)
    """

    kind: ChangeKind
    room: str
    user: str
    session: str
    meta: Meta
    region: str


class StoredRecord:
    __slots__ = ("counter", "meta")

    def __init__(self, counter: int, meta: Meta | None) -> None:
        self.counter = counter
        self.meta = meta


class Partition:
    """Everything one replica has written, as known by this replica."""

    __slots__ = ("clock", "floor", "records", "region", "replica", "tombstones", "up")

    def __init__(self, replica: ReplicaId, region: str) -> None:
        self.replica = replica
        self.region = region
        #: Every write with counter <= clock is reflected here.
        self.clock = 0
        #: Tombstones with counter <= floor have been dropped.
        self.floor = 0
        #: key -> record, in increasing counter order (a write moves its key to the end).
        self.records: dict[Key, StoredRecord] = {}
        self.tombstones = 0
        #: False while liveness considers the replica down: its entries are invisible.
        self.up = True

    def live(self) -> Iterator[tuple[Key, Meta]]:
        for key, record in self.records.items():
            if record.meta is not None:
                yield key, record.meta

    def live_count(self) -> int:
        return len(self.records) - self.tombstones

    def since(self, counter: int) -> list[Record]:
        """Records written after ``counter``, oldest first (a walk from the tail)."""
        newer: list[Record] = []
        for key in reversed(self.records):
            record = self.records[key]
            if record.counter <= counter:
                break
            newer.append((key, record.counter, record.meta))
        newer.reverse()
        return newer
