"""Occupancy: sessions that watch a room's counts instead of its members.

A huge room's member list is too much for a page that only shows "1,204 here": every join,
leave and cursor move of every member would reach it. A *watcher* (a ``join`` with
``"view": "count"``) is not a presence (no meta, no CRDT entry, nobody sees it) and gets
the room's counts instead: visible sessions and distinct users, every region's (the CRDT
holds every region's entries), at most once per tick and only when a count changed.

What keeps it O(1) per room per tick whatever the room's size: the counts are kept by the
CRDT's room index as keys become visible or invisible (:meth:`RoomIndex.counts`), so a flush
reads two integers; only joins and leaves mark a watched room (cursor moves never change a
count); the frame is encoded once for all of the room's watchers. A watched room needs no
:class:`~presenced.core.fanout.RoomFeed` (whose published view is O(room size)), so a room
with watchers and no local member still gets its counts.

This module keeps the bookkeeping (who watches what, what each room's watchers were last
told and in which tick, which rooms changed); :class:`~presenced.core.presence.Presence`
reads the counts and pushes the frames. Pure: no I/O.
"""

from __future__ import annotations

from typing import Generic, TypeVar

#: A watcher: whatever the node pushes frames to (its client connections).
W = TypeVar("W")

#: (visible sessions, distinct users) of a room.
Counts = tuple[int, int]

#: ``sent_tick`` of a watch that never flushed: any tick may flush it.
NEVER = -(2**62)


class Watch(Generic[W]):
    """The watchers of one room on this daemon, and what they were last told."""

    __slots__ = ("room", "sent", "sent_tick", "watchers")

    def __init__(self, room: str, counts: Counts) -> None:
        self.room = room
        #: The watchers (a dict used as an ordered set).
        self.watchers: dict[W, None] = {}
        #: The counts the watchers were last sent (a new watcher's reply has the current
        #: ones, so an occupancy frame may repeat what one watcher already has).
        self.sent = counts
        #: The tick index of the last occupancy frame: at most one per tick.
        self.sent_tick = NEVER

    def take(self, counts: Counts, tick: int) -> bool:
        """A flush in tick ``tick`` found ``counts``: whether a frame must go (a count
        changed since the last one). Records them as sent."""
        self.sent_tick = tick
        if counts == self.sent:
            return False
        self.sent = counts
        return True


class Watches(Generic[W]):
    """Every watched room of one daemon, who watches it, and which rooms changed."""

    def __init__(self) -> None:
        self.rooms: dict[str, Watch[W]] = {}
        #: watcher -> the rooms it watches: what a closing connection stops watching.
        self.by_watcher: dict[W, dict[str, None]] = {}
        #: Watched rooms whose counts may have changed since their last frame.
        self.dirty: dict[str, Watch[W]] = {}

    def add(self, watcher: W, room: str, counts: Counts) -> None:
        """``watcher`` watches ``room`` (whose counts are ``counts`` now)."""
        watch = self.rooms.get(room)
        if watch is None:
            watch = self.rooms[room] = Watch(room, counts)
        watch.watchers[watcher] = None
        self.by_watcher.setdefault(watcher, {})[room] = None

    def remove(self, watcher: W, room: str) -> bool:
        """``watcher`` stops watching ``room``; returns whether it was watching it."""
        rooms = self.by_watcher.get(watcher)
        if rooms is None or room not in rooms:
            return False
        del rooms[room]
        if not rooms:
            del self.by_watcher[watcher]
        watch = self.rooms[room]
        del watch.watchers[watcher]
        if not watch.watchers:
            del self.rooms[room]
            self.dirty.pop(room, None)
        return True

    def remove_watcher(self, watcher: W) -> None:
        """``watcher`` (a connection that ended) stops watching every room."""
        for room in list(self.by_watcher.get(watcher, ())):
            self.remove(watcher, room)

    def watching(self, watcher: W) -> list[str]:
        """The rooms ``watcher`` watches, in the order it began."""
        return list(self.by_watcher.get(watcher, ()))

    def note(self, room: str) -> bool:
        """A key of ``room`` became visible or invisible: if watched, it is dirty (True)."""
        watch = self.rooms.get(room)
        if watch is None:
            return False
        self.dirty[room] = watch
        return True

    def due(self, tick: int) -> list[Watch[W]]:
        """The dirty rooms that may flush in tick ``tick`` (none flushed in it yet), taken
        out of the dirty set; those that did flush in it wait for a later tick."""
        ready = [watch for watch in self.dirty.values() if watch.sent_tick < tick]
        for watch in ready:
            del self.dirty[watch.room]
        return ready


__all__ = ["NEVER", "Counts", "Watch", "Watches"]
