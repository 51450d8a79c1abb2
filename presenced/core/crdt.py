"""The presence CRDT: (room, user, session) -> meta, one single-writer partition per replica.

Modelled on Phoenix.Tracker's state, adapted to gossip over a partial mesh with
Scuttlebutt-style reconciliation:

* A **replica** is one daemon incarnation, ``(node, incarnation)``. The incarnation is new at
  every start, so entries written by a previous run of the same node are recognised as dead
  the moment the new run is heard of.
* Each replica is the **only writer** of its partition. Every write (join, update, leave)
  takes the partition's next counter, so a partition's history is a single totally ordered
  log and "I have replica R up to counter N" (a *digest* entry) says exactly which state of R
  a peer holds.
* An entry's latest write is all that matters (cursor moves are state, not events), so a
  partition keeps one record per key: its meta and the counter of its last write. A leave
  is kept as a *tombstone* (meta ``None``) so a peer that is behind learns about it; records
  are kept in counter order, which makes "everything newer than N" a walk from the tail.
* A **delta** carries the records of one partition with counters in ``(since, clock]``; it
  applies to any copy whose clock is in ``[since, clock)`` and moves it to ``clock``. Records
  at or below the receiver's clock are ignored, which is why a stale add can never resurrect
  a leave: the leave's counter is higher, and the receiver's clock only moves forward.
* Tombstones are garbage-collected once a partition holds too many; the partition's *floor*
  remembers the newest dropped one. A peer whose digest is below the floor gets the whole
  partition (``full`` delta), which replaces its copy and removes whatever it lacks.

Merging returns :class:`Change` values (joins, leaves, updates of visible presences), so the
shell can compute diffs for its local clients without rescanning anything. Partitions can be
hidden (liveness: the replica is down): their entries stay stored but become invisible.

A hidden partition is shown again only once it is known to be current (:meth:`PresenceState.show`):
liveness says the replica is up and what its clock was at that heartbeat, and the entries stay
hidden until this copy holds at least that clock. Showing the stored copy at once would show
whatever changed while the replica was cut off as if it had not: a session that left during the
cut would join again, and leave a round trip later when anti-entropy brings the newer state.

Nothing here does I/O, reads a clock or draws random numbers.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Literal

import attrs

from presenced.core.entries import JOIN as JOIN
from presenced.core.entries import LEAVE as LEAVE
from presenced.core.entries import UPDATE as UPDATE
from presenced.core.entries import Change as Change
from presenced.core.entries import ChangeKind as ChangeKind
from presenced.core.entries import Key as Key
from presenced.core.entries import Meta as Meta
from presenced.core.entries import Partition as Partition
from presenced.core.entries import Record as Record
from presenced.core.entries import ReplicaId as ReplicaId
from presenced.core.entries import StoredRecord
from presenced.core.room_index import RoomIndex


class DeltaError(ValueError):
    """A delta that no correct replica could have produced (bad counters, wrong shape)."""


@attrs.frozen
class Delta:
    """The records of one partition with counters in ``(since, clock]``.

    A ``full`` delta carries every live record and replaces the receiver's copy whatever its
    clock (as long as it is older); it is what a peer gets when it is too far behind for the
    tombstones that would be needed.
    """

    replica: ReplicaId
    region: str
    since: int
    clock: int
    records: tuple[Record, ...]
    full: bool = False


MergeOutcome = Literal["applied", "stale", "gap", "retired", "own"]


@attrs.frozen
class MergeResult:
    """What merging a delta did: visible changes, and whether it applied.

    ``gap`` means the receiver is behind ``delta.since``: the delta cannot be applied and the
    sender should be told our digest so it sends what we lack.
    """

    outcome: MergeOutcome
    changes: list[Change]


class PresenceState:
    """The whole presence map as one replica knows it, and the only place it changes.

    ``local`` is this daemon's replica; only :meth:`put` and :meth:`remove` write to it.
    Everything about other replicas arrives through :meth:`merge`.
    """

    def __init__(self, local: ReplicaId, region: str, *, tombstone_limit: int = 4096) -> None:
        if tombstone_limit < 1:
            raise ValueError("tombstone_limit must be positive")
        self.local = local
        self.region = region
        self.tombstone_limit = tombstone_limit
        self.partitions: dict[ReplicaId, Partition] = {local: Partition(local, region)}
        #: Replicas known to be dead (an older incarnation, or purged): never resurrected.
        self.retired: set[ReplicaId] = set()
        #: Replicas liveness says are up whose copy here is older than their clock at that
        #: heartbeat: hidden until a merge brings the copy to that clock (see :meth:`show`).
        self.awaiting: dict[ReplicaId, int] = {}
        #: What is visible and which copy of each key is shown (see its module).
        self.index = RoomIndex(local, self.partitions)

    # ------------------------------------------------------------------ local writes

    @property
    def own(self) -> Partition:
        return self.partitions[self.local]

    def put(self, room: str, user: str, session: str, meta: Meta) -> Change:
        """Write a local entry (join or update) and return the visible change.

        The local copy is then the shown one: when another replica holds a copy of the key
        too, the write takes a counter past that copy's (the partition's clock skips ahead),
        so it is the newest everywhere. When another
        replica's copy showed the same meta from the same region, nothing visible changed:
        the returned update repeats what is shown (feeds drop it).
        """
        part = self.own
        key = (room, user, session)
        old = part.records.get(key)
        held = self.index.held
        if old is not None and old.meta is not None and not (held and key in held):
            del part.records[key]  # (the hot path: an update of a key no other replica holds)
            part.clock += 1
            part.records[key] = StoredRecord(part.clock, meta)
            return Change(UPDATE, room, user, session, meta, self.region)
        # Past every other copy's counter: this write is the newest, so it is shown.
        part.clock = max(part.clock, self.index.top_counter(key)) + 1
        if old is not None:
            del part.records[key]
        part.records[key] = StoredRecord(part.clock, meta)
        changes: list[Change] = []
        if old is not None and old.meta is not None:
            self.index.changed(part, key, part.clock, meta, changes)
        else:
            if old is not None:
                part.tombstones -= 1
            self.index.gain(part, key, part.clock, meta, changes)
        return changes[0] if changes else Change(UPDATE, room, user, session, meta, self.region)

    def remove(self, room: str, user: str, session: str) -> Change | None:
        """Remove a local entry; returns None if it was not there, else the visible change:
        the leave, or (another replica still holds a copy) an update to that copy (which
        repeats what is shown when the local copy was not the shown one)."""
        part = self.own
        key = (room, user, session)
        old = part.records.get(key)
        if old is None or old.meta is None:
            return None
        del part.records[key]
        part.clock += 1
        part.records[key] = StoredRecord(part.clock, None)
        part.tombstones += 1
        changes: list[Change] = []
        self.index.lose(part, key, old.meta, changes, write=True)
        self._collect_tombstones(part)
        if changes:
            return changes[0]
        shown = self.index.shown(key)
        assert shown is not None
        return Change(UPDATE, room, user, session, shown[0], shown[1])

    def remove_all_local(self) -> list[Change]:
        """Remove every local entry (graceful shutdown)."""
        keys = [key for key, _ in self.own.live()]
        changes = [self.remove(*key) for key in keys]
        return [c for c in changes if c is not None]

    # ------------------------------------------------------------------ reading

    def get(self, room: str, user: str, session: str) -> Meta | None:
        """The meta of a local entry, or None."""
        record = self.own.records.get((room, user, session))
        return None if record is None else record.meta

    def room_presences(self, room: str) -> Iterator[tuple[str, str, Meta, str]]:
        """Visible entries of a room as (user, session, meta, region)."""
        return self.index.room_presences(room)

    def room_counts(self, room: str) -> tuple[int, int]:
        """(visible sessions, distinct users) of a room, every region's, in O(1)."""
        return self.index.counts(room)

    def session_rooms(self, user: str, session: str) -> list[tuple[str, Meta, ReplicaId]]:
        """Where ``user``'s ``session`` is visible: (room, shown meta, replica shown)."""
        return self.index.session_rooms(user, session)

    def session_user(self, session: str) -> str | None:
        """The user whose ``session`` is visible somewhere (None: none, or several)."""
        return self.index.session_user(session)

    def take_notices(self) -> tuple[list[Key], list[Key]]:
        """Keys of the local partition another replica wrote (taken over), and keys whose
        shown copy another replica removed while the local one remains (left elsewhere),
        since the last call (see :mod:`presenced.core.room_index`)."""
        return self.index.take_notices()

    def user_nodes(self, user: str) -> list[str]:
        """The nodes where ``user`` has a visible presence (in any room), sorted."""
        return self.index.user_nodes(user)

    def rooms(self) -> Iterable[str]:
        return self.index.rooms.keys()

    def visible(self) -> dict[Key, tuple[Meta, str]]:
        """Every visible entry: key -> its shown (meta, region). For tests and diagnostics."""
        return self.index.visible()

    def digest(self) -> dict[ReplicaId, int]:
        """Per replica, the highest counter this replica holds (Scuttlebutt digest)."""
        return {replica: part.clock for replica, part in self.partitions.items()}

    # ------------------------------------------------------------------ extraction

    def extract(self, replica: ReplicaId, since: int) -> Delta | None:
        """What a peer holding ``replica`` up to ``since`` lacks, or None if nothing.

        Falls back to the full partition when the tombstones needed were collected, or when
        the peer has nothing of it (tombstones are useless to a peer with no entries).
        """
        part = self.partitions.get(replica)
        if part is None or since >= part.clock:
            return None
        if since <= 0 or since < part.floor:
            records = tuple(
                (key, r.counter, r.meta) for key, r in part.records.items() if r.meta is not None
            )
            return Delta(replica, part.region, 0, part.clock, records, full=True)
        return Delta(replica, part.region, since, part.clock, tuple(part.since(since)))

    def missing(self, digest: Mapping[ReplicaId, int]) -> list[Delta]:
        """Deltas for everything a peer with ``digest`` lacks (the anti-entropy answer)."""
        deltas = []
        for replica in self.partitions:
            delta = self.extract(replica, digest.get(replica, 0))
            if delta is not None:
                deltas.append(delta)
        return deltas

    # ------------------------------------------------------------------ merging

    def merge(self, delta: Delta) -> MergeResult:
        """Apply a delta from a peer; return what became visible or invisible."""
        replica = delta.replica
        if replica == self.local:
            return MergeResult("own", [])
        if replica in self.retired:
            return MergeResult("retired", [])
        _check_delta(delta)
        changes: list[Change] = []
        part = self.partitions.get(replica)
        if part is None:
            if not self._admit(replica, changes):
                return MergeResult("retired", changes)
            part = self.partitions[replica] = Partition(replica, delta.region)
            # (a replica first heard of by its heartbeat waits for the clock it announced)
            part.up = replica not in self.awaiting
        if delta.clock <= part.clock:
            return MergeResult("stale", changes)
        if delta.full:
            self._replace(part, delta, changes)
        elif delta.since > part.clock:
            return MergeResult("gap", changes)
        else:
            self._apply(part, delta, changes)
        part.clock = delta.clock
        self._collect_tombstones(part)
        awaited = self.awaiting.get(replica)
        if awaited is not None and part.clock >= awaited:
            del self.awaiting[replica]
            self._reveal(part, changes)
        return MergeResult("applied", changes)

    def _admit(self, replica: ReplicaId, changes: list[Change]) -> bool:
        """A new replica: retire older incarnations of its node, or refuse it if it is older."""
        if any(
            other.node == replica.node and other.incarnation > replica.incarnation
            for other in self.retired
        ):
            # A newer incarnation of its node said goodbye or replaced it: this one is dead.
            self.retired.add(replica)
            return False
        for other in list(self.partitions):
            if other.node != replica.node:
                continue
            if other.incarnation > replica.incarnation or other == self.local:
                self.retired.add(replica)
                return False
            changes.extend(self.retire(other))
        return True

    def _apply(self, part: Partition, delta: Delta, changes: list[Change]) -> None:
        for key, counter, meta in delta.records:
            if counter <= part.clock:
                continue
            self._write(part, key, counter, meta, changes)

    def _replace(self, part: Partition, delta: Delta, changes: list[Change]) -> None:
        incoming = {key: meta for key, _, meta in delta.records}
        for key, record in part.records.items():
            if record.meta is not None and key not in incoming:
                self._forget(part, key, record.meta, changes)
        for key, counter, meta in delta.records:
            old = part.records.get(key)
            if old is None or old.counter != counter:
                assert meta is not None
                self._show(part, key, counter, None if old is None else old.meta, meta, changes)
        ordered = sorted(delta.records, key=lambda record: record[1])
        part.records = {key: StoredRecord(counter, meta) for key, counter, meta in ordered}
        part.tombstones = 0
        part.floor = delta.clock

    def _write(
        self, part: Partition, key: Key, counter: int, meta: Meta | None, changes: list[Change]
    ) -> None:
        old = part.records.pop(key, None)
        part.records[key] = StoredRecord(counter, meta)
        old_meta = None if old is None else old.meta
        if old is not None and old_meta is None:
            part.tombstones -= 1
        if meta is None:
            part.tombstones += 1
            if old_meta is not None:
                self._forget(part, key, old_meta, changes)
        else:
            self._show(part, key, counter, old_meta, meta, changes)

    def _show(
        self,
        part: Partition,
        key: Key,
        counter: int,
        old_meta: Meta | None,
        meta: Meta,
        changes: list[Change],
    ) -> None:
        """``part`` wrote ``key`` (a merged write)."""
        if not part.up:
            return
        if old_meta is None:
            self.index.gain(part, key, counter, meta, changes)
        elif self.index.held and key in self.index.held:
            self.index.changed(part, key, counter, meta, changes)
        else:  # (the hot path: a key held by one replica)
            changes.append(Change(UPDATE, key[0], key[1], key[2], meta, part.region))

    def _forget(self, part: Partition, key: Key, meta: Meta, changes: list[Change]) -> None:
        """``part``'s live copy of ``key`` is removed by its replica (a merged leave)."""
        if part.up:
            self.index.lose(part, key, meta, changes, write=True)

    def _collect_tombstones(self, part: Partition) -> None:
        """Drop the oldest tombstones once there are too many, raising the floor."""
        if part.tombstones <= self.tombstone_limit:
            return
        keep = self.tombstone_limit // 2
        for key, record in list(part.records.items()):
            if part.tombstones <= keep:
                break
            if record.meta is None:
                del part.records[key]
                part.tombstones -= 1
                part.floor = max(part.floor, record.counter)

    # ------------------------------------------------------------------ liveness hooks

    def hide(self, replica: ReplicaId) -> list[Change]:
        """Make a replica's entries invisible without losing them (liveness: it is down).

        Merges keep its copy up to date meanwhile, silently; only :meth:`show` shows it again.
        """
        self.awaiting.pop(replica, None)
        part = self.partitions.get(replica)
        if part is None or not part.up or replica == self.local:
            return []
        changes: list[Change] = []
        for key, meta in part.live():
            self.index.lose(part, key, meta, changes, write=False)
        part.up = False
        return changes

    def show(self, replica: ReplicaId, clock: int) -> list[Change]:
        """Liveness says ``replica`` is up, and its own clock was ``clock`` when it said so:
        show its entries once this copy is that current, not before.

        Returns the joins if the copy already holds ``clock`` (for every entry live in it:
        what is true, not what was true when it was hidden); otherwise the replica waits in
        :attr:`awaiting` and the merge that brings the copy to ``clock`` returns them. A copy
        shown already stays shown (it is being kept current). ``clock`` 0 (not known: a peer
        that does not gossip clocks) shows what is stored at once.
        """
        if replica == self.local or replica in self.retired:
            return []
        part = self.partitions.get(replica)
        if part is None:
            if clock > 0:
                self.awaiting[replica] = clock
            return []
        if part.up:
            return []
        if part.clock < clock:
            self.awaiting[replica] = max(clock, self.awaiting.get(replica, 0))
            return []
        self.awaiting.pop(replica, None)
        changes: list[Change] = []
        self._reveal(part, changes)
        return changes

    def _reveal(self, part: Partition, changes: list[Change]) -> None:
        if part.up:
            return
        part.up = True
        for key, record in part.records.items():
            if record.meta is not None:
                self.index.gain(part, key, record.counter, record.meta, changes)

    def retire(self, replica: ReplicaId) -> list[Change]:
        """Drop a replica for good (it said goodbye, or a newer incarnation replaced it)."""
        changes = self.drop(replica)
        self.retired.add(replica)
        return changes

    def drop(self, replica: ReplicaId) -> list[Change]:
        """Drop a replica's partition but not its identity: it may come back (purged).

        Liveness decides whether a later delta of it is a real comeback or a stale relay.
        """
        if replica == self.local:
            raise ValueError("a replica cannot drop itself")
        self.awaiting.pop(replica, None)
        part = self.partitions.pop(replica, None)
        if part is None:
            return []
        changes: list[Change] = []
        if part.up:
            for key, meta in part.live():
                self.index.lose(part, key, meta, changes, write=False)
        return changes


def _check_delta(delta: Delta) -> None:
    if not (0 <= delta.since < delta.clock):
        raise DeltaError(f"delta of {delta.replica} has since={delta.since} clock={delta.clock}")
    low = 0 if delta.full else delta.since
    previous = low
    for record in delta.records:
        counter = record[1]
        if not (low < counter <= delta.clock) or (not delta.full and counter <= previous):
            raise DeltaError(
                f"delta of {delta.replica}: record at {counter} is outside "
                f"({low}, {delta.clock}] or out of order"
            )
        previous = counter
        if delta.full and record[2] is None:
            raise DeltaError(f"full delta of {delta.replica} carries a tombstone")
