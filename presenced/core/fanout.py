"""Room feeds: coalesce presence changes per entry and turn them into one diff per tick.

Cursor moves are state, not events: if a session moves five times within a tick, members
only need the last position. A feed keeps, per room with local members, the *published*
view (what every local member has been told so far) and the *pending* latest value of each
entry that changed since. A flush compares the two and yields a single diff: joins, leaves
and updates, where a join followed by a leave within one tick cancels out entirely.

Because the published view is exactly what members have been told, it doubles as the
``state`` a newly joining member receives: the next diff applies on top of it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from presenced.core.crdt import LEAVE, Change, Meta

#: (user, session) inside one room.
Member = tuple[str, str]
#: What members see of one entry: its meta and the region it is connected to.
Shown = tuple[Meta, str]
#: user -> list of {"session", "meta", "region"}: the shape of presences on the wire.
Presences = dict[str, list[dict[str, Any]]]


def _add(target: Presences, user: str, session: str, meta: Meta, region: str) -> None:
    entry = {"session": session, "meta": meta, "region": region}
    sessions = target.get(user)
    if sessions is None:
        target[user] = [entry]
    else:
        sessions.append(entry)


class RoomFeed:
    """Published view and pending changes of one room, for the members on this daemon."""

    __slots__ = ("last_flush", "pending", "published", "room")

    def __init__(self, room: str, current: Iterable[tuple[str, str, Meta, str]] = ()) -> None:
        self.room = room
        self.published: dict[Member, Shown] = {
            (user, session): (meta, region) for user, session, meta, region in current
        }
        #: member -> its latest visible value since the last flush (None: gone).
        self.pending: dict[Member, Shown | None] = {}
        #: When the last flush happened (caller's clock); -inf means never.
        self.last_flush = float("-inf")

    def note(self, change: Change) -> None:
        """Record a change; only its latest value per member will be flushed."""
        member = (change.user, change.session)
        self.pending[member] = None if change.kind == LEAVE else (change.meta, change.region)

    @property
    def dirty(self) -> bool:
        return bool(self.pending)

    def flush(self, now: float) -> tuple[Presences, Presences, Presences] | None:
        """Fold pending changes into the published view; return (joins, leaves, updates).

        Returns None when the pending changes cancel out (e.g. a join and a leave within one
        tick), so no frame needs to be sent.
        """
        self.last_flush = now
        if not self.pending:
            return None
        joins: Presences = {}
        leaves: Presences = {}
        updates: Presences = {}
        published = self.published
        for member, new in self.pending.items():
            old = published.get(member)
            user, session = member
            if new is None:
                if old is not None:
                    del published[member]
                    _add(leaves, user, session, old[0], old[1])
            elif old is None:
                published[member] = new
                _add(joins, user, session, new[0], new[1])
            elif old is not new and old != new:
                published[member] = new
                _add(updates, user, session, new[0], new[1])
        self.pending.clear()
        if not (joins or leaves or updates):
            return None
        return joins, leaves, updates

    def snapshot(self) -> Presences:
        """The published view in wire shape, for a `state` frame."""
        presences: Presences = {}
        for (user, session), (meta, region) in self.published.items():
            _add(presences, user, session, meta, region)
        return presences
