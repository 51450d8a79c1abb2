"""Replica liveness: gossiped heartbeat counters, down after silence, purge after longer silence.

Every daemon bumps its own heartbeat counter a few times a second and gossips the whole table
(one row per replica, never per presence) to its peers, which relay it. A row carries the
*age* of the newest heartbeat, as seen by the sender: the time since that counter last
advanced there. A receiver dates the heartbeat ``now - age``, so information that took a long
detour through relays is not mistaken for fresh news, and a dead replica goes down on every
daemon at about the same moment instead of a relay-hop later.

* A replica whose heartbeat has not advanced for ``down_after_s`` is **down**: its entries stay
  stored but invisible, so its users leave every room at once (no ghosts).
* Back before ``purge_after_s``: **up** again, and its users return with their state, as it is
  now: a row also carries the replica's CRDT clock when it beat (its single writer knows it
  exactly; relays pass the row on unchanged), and the ``up`` transition carries that clock, so
  the node shows the replica's entries only once its copy has caught up with it (see
  :meth:`presenced.core.crdt.PresenceState.show`). A stored copy is what was true when the
  replica went silent; shown as it is, it brings back sessions that left meanwhile.
* Silent for ``purge_after_s``: **purged**: its partition is dropped. The heartbeat it had is
  remembered, so a stale relay of the same counter does not bring it back, while a real
  comeback (a higher counter) does.
* A newer incarnation of the same node, or a goodbye, **retires** the replica for good.

Pure: the caller passes ``now``; nothing here reads a clock.
"""

from __future__ import annotations

from typing import Final, Literal

import attrs

from presenced.core.crdt import ReplicaId

UP: Final = "up"
DOWN: Final = "down"
PURGED: Final = "purged"
RETIRED: Final = "retired"
Status = Literal["up", "down", "purged", "retired"]


@attrs.frozen
class Transition:
    """A replica changed status; the node makes its entries visible, invisible or gone."""

    replica: ReplicaId
    status: Status
    #: For ``up``: the replica's CRDT clock as of its newest heartbeat known here (0: not
    #: known, a peer that does not gossip clocks): its entries are shown once the local copy
    #: holds that clock.
    clock: int = 0


@attrs.define
class Health:
    heartbeat: int
    #: Local time at which ``heartbeat`` was (estimated to be) issued.
    seen_at: float
    status: Status = UP
    #: The replica's CRDT clock when it issued ``heartbeat`` (or an earlier one; 0: not known).
    clock: int = 0


@attrs.frozen
class Beat:
    """One row of the gossiped heartbeat table."""

    replica: ReplicaId
    heartbeat: int
    #: Seconds since this heartbeat was issued, as far as the sender knows.
    age_s: float
    #: The replica's CRDT clock when it issued this heartbeat (0: the row did not say).
    clock: int = 0


class Liveness:
    """Heartbeat table of every replica this daemon has heard of."""

    def __init__(
        self, local: ReplicaId, *, down_after_s: float, purge_after_s: float, now: float
    ) -> None:
        if not 0 < down_after_s < purge_after_s:
            raise ValueError("need 0 < down_after_s < purge_after_s")
        self.local = local
        self.down_after_s = down_after_s
        self.purge_after_s = purge_after_s
        self.heartbeat = 0
        self.table: dict[ReplicaId, Health] = {}
        #: Replicas no longer tracked, with the heartbeat they had (retired: never back).
        self.gone: dict[ReplicaId, float] = {}
        self._started = now

    def beat(self) -> int:
        """Advance this replica's own heartbeat (call it every heartbeat interval)."""
        self.heartbeat += 1
        return self.heartbeat

    def observe(self, beat: Beat, now: float) -> list[Transition]:
        """Take one gossiped row; returns transitions it caused (up, or retirements)."""
        replica = beat.replica
        if replica == self.local or beat.heartbeat <= self.gone.get(replica, -1):
            return []
        issued = now - max(0.0, beat.age_s)
        clock = beat.clock
        health = self.table.get(replica)
        if health is not None:
            if beat.heartbeat <= health.heartbeat:
                return []
            health.heartbeat = beat.heartbeat
            health.seen_at = max(health.seen_at, issued)
            health.clock = max(health.clock, clock)  # (a single writer's clock only grows)
            if health.status == DOWN and now - health.seen_at < self.down_after_s:
                health.status = UP
                return [Transition(replica, UP, health.clock)]
            return []
        if now - issued >= self.down_after_s:
            return []  # news of a replica that is already silent: nothing to show
        transitions = self._supersede(replica)
        self.gone.pop(replica, None)
        self.table[replica] = Health(beat.heartbeat, issued, clock=clock)
        transitions.append(Transition(replica, UP, clock))
        return transitions

    def _supersede(self, replica: ReplicaId) -> list[Transition]:
        """A replica of a node appeared: older incarnations of that node are retired."""
        older = [
            other
            for other in self.table
            if other.node == replica.node and other.incarnation < replica.incarnation
        ]
        return [self.retire(other) for other in older]

    def retire(self, replica: ReplicaId) -> Transition:
        """Forget a replica for good (goodbye, or a newer incarnation)."""
        self.table.pop(replica, None)
        self.gone[replica] = float("inf")
        return Transition(replica, RETIRED)

    def is_up(self, replica: ReplicaId) -> bool:
        if replica == self.local:
            return True
        health = self.table.get(replica)
        return health is not None and health.status == UP

    def check(self, now: float) -> list[Transition]:
        """Mark silent replicas down, and long-silent ones purged."""
        transitions = []
        for replica, health in list(self.table.items()):
            silent = now - health.seen_at
            if health.status == UP and silent >= self.down_after_s:
                health.status = DOWN
                transitions.append(Transition(replica, DOWN))
            elif health.status == DOWN and silent >= self.purge_after_s:
                del self.table[replica]
                self.gone[replica] = health.heartbeat
                transitions.append(Transition(replica, PURGED))
        return transitions

    def beats(self, now: float, clock: int) -> list[Beat]:
        """The table to gossip: this replica's own heartbeat with its CRDT ``clock`` now, and
        every tracked one with the clock its row came with."""
        rows = [Beat(self.local, self.heartbeat, 0.0, clock)]
        for replica, health in self.table.items():
            age = max(0.0, now - health.seen_at)
            rows.append(Beat(replica, health.heartbeat, age, health.clock))
        return rows

    def status(self, replica: ReplicaId) -> Status | None:
        health = self.table.get(replica)
        if health is not None:
            return health.status
        if replica in self.gone:
            return RETIRED if self.gone[replica] == float("inf") else PURGED
        return None
