"""Which presences are visible, and which copy of each is shown: the CRDT's room index.

A key ``(room, user, session)`` is visible while at least one up partition holds a live copy
of it. Usually exactly one does. Several do while a session that resumed on another daemon
is still held by the old one, for the rest of its grace: the old daemon keeps its copy
until then, because removing it at once could reach a third daemon before the new copy
does, and that daemon would show a leave and then a join. So:

* a **join** is reported when the first copy becomes visible, a **leave** only when the
  last one goes, and an **update** when the shown (meta, region) changes;
* the copy **shown** is the one with the highest counter (then the greatest replica): a
  function of the copies alone, so replicas that hold the same copies show the same one.
  A daemon that writes a key another replica also holds takes its counter past theirs (see
  :meth:`PresenceState.put`), so the shown copy is the one written last: the new daemon
  writes every key of the session when it resumes it, and all the session's later writes
  come from there, while the old daemon's copy no longer changes;

At quiescence the old daemon's copy is gone (its grace ran out): one copy remains, and
every replica shows it.

Two notices tell the shell what the index learns about the local partition's copies: a key
it holds that another replica **wrote** (the session was resumed there: a connection that
still holds it here is stale), and a key whose shown copy another replica **removed**
while the local copy remains (the session left that room where it lives now: the local
copy must follow, or it would keep the session in the room for the rest of the grace).

Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterator

from presenced.core.entries import (
    JOIN,
    LEAVE,
    UPDATE,
    Change,
    Key,
    Meta,
    Partition,
    ReplicaId,
)


class RoomIndex:
    """Visible keys by room, session and user, with the shown copy of each."""

    def __init__(self, local: ReplicaId, partitions: dict[ReplicaId, Partition]) -> None:
        self.local = local
        #: The state's partitions (shared, not copied): where shown metas are read.
        self.partitions = partitions
        #: room -> (user, session) -> the replica whose copy is shown, visible keys only.
        self.rooms: dict[str, dict[tuple[str, str], ReplicaId]] = {}
        #: Keys with a visible copy in more than one partition -> every replica holding one,
        #: the shown one included. Empty in the common case: the hot paths pay one test.
        self.held: dict[Key, dict[ReplicaId, None]] = {}
        #: session -> (room, user) of its visible keys: what a resume finds.
        self.sessions: dict[str, dict[tuple[str, str], None]] = {}
        #: user -> replica -> number of shown entries: where a user can be reached.
        self.users: dict[str, dict[ReplicaId, int]] = {}
        #: room -> user -> number of the user's visible sessions there: a room's distinct
        #: users in O(1) (occupancy), kept as keys become visible and invisible.
        self.room_users: dict[str, dict[str, int]] = {}
        #: Notices for the shell (see the module docstring), drained by :meth:`take_notices`.
        self.taken_over: list[Key] = []
        self.left_elsewhere: list[Key] = []

    # ------------------------------------------------------------------ reading

    def shown(self, key: Key) -> tuple[Meta, str] | None:
        """The shown copy of a key: (meta, region), or None if it is not visible."""
        room, user, session = key
        replica = self.rooms.get(room, {}).get((user, session))
        return None if replica is None else self._copy(replica, key)

    def room_presences(self, room: str) -> Iterator[tuple[str, str, Meta, str]]:
        """Visible entries of a room as (user, session, meta, region)."""
        for (user, session), replica in self.rooms.get(room, {}).items():
            meta, region = self._copy(replica, (room, user, session))
            yield user, session, meta, region

    def counts(self, room: str) -> tuple[int, int]:
        """(visible sessions, distinct users) of a room, in O(1): what occupancy shows."""
        members = self.rooms.get(room)
        if members is None:
            return 0, 0
        return len(members), len(self.room_users[room])

    def session_rooms(self, user: str, session: str) -> list[tuple[str, Meta, ReplicaId]]:
        """Where ``user``'s ``session`` is visible: (room, shown meta, replica shown), in
        the order its keys became visible."""
        found = []
        for room, owner in self.sessions.get(session, ()):
            if owner == user:
                replica = self.rooms[room][(user, session)]
                found.append((room, self._copy(replica, (room, user, session))[0], replica))
        return found

    def session_user(self, session: str) -> str | None:
        """The user whose ``session`` is visible somewhere (None: none, or several)."""
        users = {user for _, user in self.sessions.get(session, ())}
        return users.pop() if len(users) == 1 else None

    def user_nodes(self, user: str) -> list[str]:
        """The nodes where ``user`` has a shown presence (in any room), sorted."""
        return sorted({replica.node for replica in self.users.get(user, ())})

    def visible(self) -> dict[Key, tuple[Meta, str]]:
        """Every visible key -> its shown (meta, region)."""
        return {
            (room, user, session): self._copy(replica, (room, user, session))
            for room, members in self.rooms.items()
            for (user, session), replica in members.items()
        }

    def take_notices(self) -> tuple[list[Key], list[Key]]:
        """(keys taken over, keys left elsewhere) since the last call, cleared."""
        notices = self.taken_over, self.left_elsewhere
        self.taken_over, self.left_elsewhere = [], []
        return notices

    def top_counter(self, key: Key) -> int:
        """The highest counter of a visible copy of ``key`` (0: not visible)."""
        room, user, session = key
        shown = self.rooms.get(room, {}).get((user, session))
        return 0 if shown is None else self.counter(shown, key)

    def counter(self, replica: ReplicaId, key: Key) -> int:
        return self.partitions[replica].records[key].counter

    def _copy(self, replica: ReplicaId, key: Key) -> tuple[Meta, str]:
        part = self.partitions[replica]
        meta = part.records[key].meta
        assert meta is not None
        return meta, part.region

    # ------------------------------------------------------------------ changes

    def gain(
        self, part: Partition, key: Key, counter: int, meta: Meta, changes: list[Change]
    ) -> None:
        """A copy of ``key`` in ``part`` (written at ``counter``) became visible."""
        room, user, session = key
        members = self.rooms.get(room)
        if members is None:
            members = self.rooms[room] = {}
        replica = part.replica
        shown = members.get((user, session))
        if shown is None:
            members[(user, session)] = replica
            self._count(user, replica, 1)
            users = self.room_users.setdefault(room, {})
            users[user] = users.get(user, 0) + 1
            self.sessions.setdefault(session, {})[(room, user)] = None
            changes.append(Change(JOIN, room, user, session, meta, part.region))
            return
        holders = self.held.get(key)
        if holders is None:
            holders = self.held[key] = {shown: None}
        holders[replica] = None
        if (counter, replica) > (self.counter(shown, key), shown):
            self._promote(part, key, meta, shown, changes)

    def changed(
        self, part: Partition, key: Key, counter: int, meta: Meta, changes: list[Change]
    ) -> None:
        """``part``'s visible copy of ``key`` was written a new meta at ``counter``."""
        if self.held and key in self.held:
            shown = self.rooms[key[0]][(key[1], key[2])]
            if shown != part.replica:
                if (counter, part.replica) > (self.counter(shown, key), shown):
                    self._promote(part, key, meta, shown, changes)
                return
        room, user, session = key
        changes.append(Change(UPDATE, room, user, session, meta, part.region))

    def lose(
        self, part: Partition, key: Key, meta: Meta, changes: list[Change], *, write: bool
    ) -> None:
        """``part``'s visible copy of ``key`` (with ``meta``) is gone (``write``: removed
        by its replica; not: hidden or dropped)."""
        room, user, session = key
        members = self.rooms.get(room)
        shown = None if members is None else members.get((user, session))
        if members is None or shown is None:
            return
        replica = part.replica
        holders = self.held.get(key)
        if holders is None:
            if shown != replica:
                return
            del members[(user, session)]
            users = self.room_users[room]
            if users[user] > 1:
                users[user] -= 1
            else:
                del users[user]
            if not members:
                del self.rooms[room]
                del self.room_users[room]
            self._count(user, replica, -1)
            keys = self.sessions[session]
            del keys[(room, user)]
            if not keys:
                del self.sessions[session]
            changes.append(Change(LEAVE, room, user, session, meta, part.region))
            return
        if replica not in holders:
            return
        del holders[replica]
        if len(holders) == 1:
            del self.held[key]
        if shown != replica:
            return
        successor = max(holders, key=lambda holder: (self.counter(holder, key), holder))
        members[(user, session)] = successor
        self._count(user, replica, -1)
        self._count(user, successor, 1)
        if write and replica != self.local and self.local in holders:
            self.left_elsewhere.append(key)
        after_meta, after_region = self._copy(successor, key)
        if after_meta != meta or after_region != part.region:
            changes.append(Change(UPDATE, room, user, session, after_meta, after_region))

    def _promote(
        self, part: Partition, key: Key, meta: Meta, shown: ReplicaId, changes: list[Change]
    ) -> None:
        """``part``'s copy of ``key`` is the newest: it becomes the shown one."""
        room, user, session = key
        replica = part.replica
        if shown != replica:
            before_meta, before_region = self._copy(shown, key)
            self.rooms[room][(user, session)] = replica
            self._count(user, shown, -1)
            self._count(user, replica, 1)
            if replica != self.local and self.local in self.held[key]:
                self.taken_over.append(key)
            if before_meta == meta and before_region == part.region:
                return
        changes.append(Change(UPDATE, room, user, session, meta, part.region))

    def _count(self, user: str, replica: ReplicaId, delta: int) -> None:
        where = self.users.setdefault(user, {})
        count = where.get(replica, 0) + delta
        if count > 0:
            where[replica] = count
        else:
            where.pop(replica, None)
            if not where:
                del self.users[user]
