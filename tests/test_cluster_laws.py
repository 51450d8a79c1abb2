"""Convergence laws of whole clusters: real daemons, simulated network, arbitrary schedules.

The property test draws a *program*: a topology of 3-5 daemons (full mesh, mesh where every
pair dials both ways, line, star with leaves dialing the hub or the hub dialing the leaves)
and a list of steps (client joins/updates/leaves/disconnects, loss, duplication, latency,
partitions, heals, crashes, graceful stops, restarts, and virtual time passing). It runs the
whole program in one ``trio.run`` under a ``MockClock`` (autojump), then a quiet phase (heal,
no loss or duplication, every daemon running again) and a long settle, and checks that

1. every daemon shows exactly the model: every session still connected to a running daemon,
   in every room it is in, with its latest meta (sessions of crashed or stopped daemons are
   gone, explicit leaves are gone for good);
2. every connected client sees exactly that model in every room it is in;
3. so no two daemons disagree.

While the program runs, two safety laws are checked:

* the ghost law, by a watcher every 0.25 s of virtual time: the sessions of a crashed or
  stopped daemon are invisible everywhere (daemons and clients) from ``down_after`` + slack
  after it went away, and never come back;
* the no-rejoin law, on every ``state`` and ``diff`` frame a client receives, as it arrives: no
  frame shows (as a join, an update or a state entry) a session in a room it left (explicitly,
  by disconnecting, or with its daemon) more than ``REJOIN_LAG`` earlier and has not joined
  again. Within that lag a join can be true news that is merely late: a join sent a tick
  before the leave arrives after it, and a relay cut off from a replica still speaks for it
  until the replica is down (``down_after``). A returning replica's stored entries shown
  before its newer state arrives (a heal that resurrects) break the law. Some examples also shrink
every daemon's tombstone limit to 1 or 2, so tombstone GC and full-partition deltas happen.

Every simulated daemon gets a ``peer_listen`` (see ``_listening_config``): without it,
``Cluster.start`` makes daemons that dial unreachable by others.

Runs are reproducible: the network's randomness comes from a drawn seed, trio's scheduler
is seeded by hypothesis, each daemon's redial jitter gets a seeded ``random.Random`` and
session ids restart at 1. (trio still breaks some ties between simultaneous wake-ups by
object identity, so a replay in another process can, rarely, schedule differently.)

``HYPOTHESIS_PROFILE=long`` runs many more programs (profile "cluster-long").
"""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import attrs
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, example, given, note, settings
from hypothesis import strategies as st

import presenced.testing.cluster as cluster_module
from presenced.core import protocol
from presenced.server.peers import PeerLink
from presenced.testing.cluster import Cluster, FakeClient
from presenced.testing.simnet import SimNetwork

settings.register_profile(
    "cluster-default",
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "cluster-long",
    max_examples=1000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROFILE = settings.get_profile(
    "cluster-long" if os.environ.get("HYPOTHESIS_PROFILE") == "long" else "cluster-default"
)

NAMES = ("eu", "us", "ap", "sa", "af")
ROOMS = ("r0", "r1")
USERS = ("ann", "bob", "cat")
DOWN_AFTER = 3.0
PURGE_AFTER = 20.0
#: Quiet-phase settle: redial backoff (up to 15 s with jitter) + link set-up + digests +
#: down_after for replicas that died, with margin.
SETTLE = 30.0
#: A crashed or stopped daemon's sessions must be invisible everywhere by
#: ``down_after + GHOST_SLACK`` after it went away: one heartbeat interval before the check
#: runs, plus up to 0.4 s of link delay per relay hop (a relayed heartbeat looks that much
#: fresher than it is), with margin.
GHOST_SLACK = 3.0
#: How late a join may reach a client after the session left (see the module docstring): the
#: same bound as the ghost law's, for the same reason (a replica's information is at most
#: ``down_after`` old while it is up, plus relay delays).
REJOIN_LAG = DOWN_AFTER + GHOST_SLACK

TOPOLOGIES = ("mesh", "mesh-both", "line", "star", "star-out")

T = TypeVar("T")

#: (room, user, session) -> meta
Model = dict[tuple[str, str, str], Any]


def peers_of(topology: str, names: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """Who dials whom (links are bidirectional once up)."""
    if topology == "mesh":  # each later node dials every earlier one
        return {n: names[:i] for i, n in enumerate(names)}
    if topology == "mesh-both":  # every pair dials both ways: duplicate-link resolution
        return {n: tuple(p for p in names if p != n) for n in names}
    if topology == "line":
        return {n: names[i - 1 : i] if i else () for i, n in enumerate(names)}
    hub, leaves = names[0], names[1:]
    if topology == "star":  # leaves dial the hub
        return {hub: (), **{leaf: (hub,) for leaf in leaves}}
    if topology == "star-out":  # the hub dials the leaves
        return {hub: leaves, **{leaf: () for leaf in leaves}}
    raise AssertionError(topology)


# ------------------------------------------------------------------------------------------
# A cluster, its clients, and the model of what everyone should see


@attrs.define(eq=False)
class Session:
    client: FakeClient
    daemon: str
    #: room -> meta this session has there (the model).
    rooms: dict[str, dict[str, Any]] = attrs.Factory(dict)


class World:
    """A Cluster plus the model: which sessions are connected where, with which meta."""

    def __init__(
        self,
        nursery: trio.Nursery,
        names: tuple[str, ...],
        topology: str,
        seed: int,
        *,
        tombstone_limit: int | None = None,
        rejoin_lag: float = REJOIN_LAG,
    ) -> None:
        self.names = names
        self.tombstone_limit = tombstone_limit
        self.seed = seed
        self.net = SimNetwork(seed=seed)
        self.cluster = Cluster(
            nursery, self.net, tick_ms=25, down_after_s=DOWN_AFTER, purge_after_s=PURGE_AFTER
        )
        self.peers = peers_of(topology, names)
        self.sessions: list[Session] = []
        self.starts = itertools.count()
        #: session id -> virtual time after which it must be invisible everywhere.
        self.ghost_deadlines: dict[str, float] = {}
        self.ghosts: list[str] = []
        #: (room, session id) -> when that session left that room (and has not joined again).
        self.left: dict[tuple[str, str], float] = {}
        #: Frames that showed a session in a room it had left (the no-rejoin law).
        self.rejoins: list[str] = []
        self.rejoin_lag = rejoin_lag

    def running(self, name: str) -> bool:
        return name in self.cluster.daemons

    async def start(self, name: str) -> None:
        sim = await self.cluster.start(name, self.peers[name])
        # The peer manager's redial jitter defaults to an unseeded Random: seed it, so a
        # failing example replays exactly.
        assert sim.daemon.peers is not None
        sim.daemon.peers._rng = random.Random(f"{self.seed}:{name}:{next(self.starts)}")
        if self.tombstone_limit is not None:
            # Tiny limits make tombstone GC, floors and full-partition deltas happen all the
            # time (the daemon has no setting for it).
            sim.node.state.tombstone_limit = self.tombstone_limit

    def crash(self, name: str) -> None:
        self.cluster.crash(name)
        self._forget_sessions_of(name)

    async def stop(self, name: str) -> None:
        deadline = trio.current_time() + DOWN_AFTER + GHOST_SLACK
        await self.cluster.stop(name)
        for session in self.sessions:
            if session.daemon == name:
                assert session.client.closed is not None, "stop did not close a client"
        self._forget_sessions_of(name, deadline)

    def _forget_sessions_of(self, name: str, deadline: float | None = None) -> None:
        went = trio.current_time()
        if deadline is None:
            deadline = went + DOWN_AFTER + GHOST_SLACK
        else:
            went = deadline - DOWN_AFTER - GHOST_SLACK
        for session in self.sessions:
            if session.daemon == name:
                self.ghost_deadlines[session.client.session] = deadline
                self._left_all(session, went)
        self.sessions = [s for s in self.sessions if s.daemon != name]

    def _left_all(self, session: Session, when: float) -> None:
        for room in session.rooms:
            self.left[(room, session.client.session)] = when

    def check_frame(self, observer: FakeClient, message: dict[str, Any]) -> None:
        """The no-rejoin law, on one frame as a client receives it."""
        kind = message.get("type")
        if kind == "state":
            shown = [message["presences"]]
        elif kind == "diff":
            shown = [message["joins"], message["updates"]]
        else:
            return
        room = message["room"]
        now = trio.current_time()
        for presences in shown:
            for user, entries in presences.items():
                for entry in entries:
                    left = self.left.get((room, entry["session"]))
                    if left is not None and now - left > self.rejoin_lag:
                        self.rejoins.append(
                            f"t={now:.3f}: client {observer.session} got a {kind} showing "
                            f"{user}/{entry['session']} in {room}, which left at t={left:.3f}"
                        )

    async def watch_ghosts(self, interval: float = 0.25) -> None:
        """Safety while the program runs: sessions of a crashed or stopped daemon vanish
        everywhere within down_after (+ slack) and never come back. Records violations
        (raising here would only come out wrapped in an exception group)."""
        while True:
            await trio.sleep(interval)
            now = trio.current_time()
            overdue = {s for s, deadline in self.ghost_deadlines.items() if now >= deadline}
            if not overdue:
                continue
            for name in self.cluster.daemons:
                for room, user, session in self.cluster.visible(name):
                    if session in overdue:
                        self.ghosts.append(
                            f"t={now:.2f}: daemon {name} shows {user}/{session} in {room}"
                        )
            for observer in self.sessions:
                for room in observer.client.view:
                    for user, session in observer.client.sees(room):
                        if session in overdue:
                            self.ghosts.append(
                                f"t={now:.2f}: client {observer.client.session}@{observer.daemon} "
                                f"sees {user}/{session} in {room}"
                            )

    def new_session(self, name: str, user: str) -> Session:
        session = Session(self.cluster.client(name, user), name)
        session.client.on_message = self.check_frame
        self.sessions.append(session)
        return session

    def join(self, session: Session, room: str, meta: dict[str, Any]) -> None:
        self.left.pop((room, session.client.session), None)
        session.client.join(room, meta)
        session.rooms[room] = dict(meta)

    def update(self, session: Session, room: str, patch: dict[str, Any]) -> None:
        session.client.update(room, patch)
        session.rooms[room] = protocol.apply_meta_patch(session.rooms[room], patch)

    def leave(self, session: Session, room: str) -> None:
        session.client.leave(room)
        del session.rooms[room]
        self.left[(room, session.client.session)] = trio.current_time()

    def disconnect(self, session: Session) -> None:
        session.client.disconnect()
        self.sessions.remove(session)
        self._left_all(session, trio.current_time())

    def links(self) -> dict[str, dict[str, PeerLink]]:
        """Per running daemon, its current peer link objects by peer name."""
        links: dict[str, dict[str, PeerLink]] = {}
        for name, sim in self.cluster.daemons.items():
            assert sim.daemon.peers is not None
            links[name] = dict(sim.daemon.peers.links)
        return links

    def model(self) -> Model:
        return {
            (room, s.client.user, s.client.session): meta
            for s in self.sessions
            for room, meta in s.rooms.items()
        }

    def observe(self) -> Observed:
        return Observed(
            model=self.model(),
            visible={name: self.cluster.visible(name) for name in self.cluster.daemons},
            clients=[
                ClientView(
                    s.client.user,
                    s.client.session,
                    s.daemon,
                    set(s.rooms),
                    set(s.client.view),
                    {room: s.client.sees(room) for room in s.client.view},
                )
                for s in self.sessions
            ],
            ghosts=list(self.ghosts),
            rejoins=list(self.rejoins),
        )


@attrs.frozen
class ClientView:
    user: str
    session: str
    daemon: str
    rooms: set[str]
    view_rooms: set[str]
    sees: dict[str, dict[tuple[str, str], Any]]


@attrs.frozen
class Observed:
    model: Model
    visible: dict[str, Model]
    clients: list[ClientView]
    ghosts: list[str] = attrs.Factory(list)
    rejoins: list[str] = attrs.Factory(list)


def in_room(model: Model, room: str) -> dict[tuple[str, str], Any]:
    return {(user, session): meta for (r, user, session), meta in model.items() if r == room}


def check_converged(observed: Observed, names: tuple[str, ...]) -> None:
    model = observed.model
    assert not observed.ghosts, "sessions of a dead daemon outlived down_after:\n" + "\n".join(
        observed.ghosts[:10]
    )
    assert not observed.rejoins, "a client was shown a session that had left:\n" + "\n".join(
        observed.rejoins[:10]
    )
    assert set(observed.visible) == set(names), "a daemon is not running after the quiet phase"
    for name, visible in observed.visible.items():
        if visible != model:
            extra = {k: v for k, v in visible.items() if model.get(k, object()) != v}
            missing = {k: v for k, v in model.items() if visible.get(k, object()) != v}
            raise AssertionError(
                f"daemon {name} disagrees with the model:\n"
                f"  shows but should not (or wrong meta): {extra}\n"
                f"  should show but does not: {missing}"
            )
    for view in observed.clients:
        assert view.view_rooms == view.rooms, (
            f"client {view.session} ({view.user}@{view.daemon}) is in {sorted(view.rooms)} "
            f"but has views of {sorted(view.view_rooms)}"
        )
        for room in view.rooms:
            expected = in_room(model, room)
            assert view.sees[room] == expected, (
                f"client {view.session} ({view.user}@{view.daemon}) sees in {room}:\n"
                f"  {view.sees[room]}\nexpected\n  {expected}"
            )


def run_cluster(program: Callable[[trio.Nursery], Awaitable[T]]) -> T:
    """Run ``program`` in a fresh trio run under an autojumping MockClock; return what it saw.

    Assertions happen outside the run, so failures are not wrapped in exception groups.
    """
    # Session ids are "<node>-s<n>" from a process-wide counter: start it afresh so that a
    # replayed example is identical byte for byte.
    cluster_module._sessions = itertools.count(1)

    async def main() -> T:
        async with trio.open_nursery() as nursery:
            observed = await program(nursery)
            nursery.cancel_scope.cancel()
        return observed

    return trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


# ------------------------------------------------------------------------------------------
# Programs

node_ix = st.integers(0, len(NAMES) - 1)
client_ix = st.integers(0, 15)
small = st.integers(0, 9)
#: (1.0: a blackholed link, which stays up, carrying nothing, until its link timeout)
probabilities = st.sampled_from((0.0, 0.05, 0.1, 0.2, 0.3, 1.0))
delays = st.sampled_from((0.0, 0.01, 0.05, 0.1, 0.2))

sleeps = st.tuples(st.just("sleep"), st.sampled_from((0.0, 0.01, 0.1, 0.3, 1.0, 2.0, 3.5, 5.0)))
joins = st.tuples(
    st.just("join"), node_ix, st.integers(0, len(USERS) - 1), st.integers(0, 1), small
)
updates = st.tuples(st.just("update"), client_ix, st.integers(0, 1), st.sampled_from("xy"), small)

#: One strategy per kind of step.
STEPS: dict[str, st.SearchStrategy[tuple[Any, ...]]] = {
    "sleep": sleeps,
    "join": joins,
    "update": updates,
    "join_more": st.tuples(st.just("join_more"), client_ix, st.integers(0, 1), small),
    "leave": st.tuples(st.just("leave"), client_ix, st.integers(0, 1)),
    "disconnect": st.tuples(st.just("disconnect"), client_ix),
    "heal": st.tuples(st.just("heal")),
    "partition": st.tuples(st.just("partition"), st.integers(1, 2 ** len(NAMES) - 2)),
    "loss": st.tuples(st.just("loss"), node_ix, node_ix, probabilities),
    "duplicate": st.tuples(st.just("duplicate"), node_ix, node_ix, probabilities),
    "latency": st.tuples(st.just("latency"), node_ix, node_ix, delays, delays),
    "crash": st.tuples(st.just("crash"), node_ix),
    "stop": st.tuples(st.just("stop"), node_ix),
    "restart": st.tuples(st.just("restart"), node_ix),
    "long_sleep": st.tuples(st.just("sleep"), st.just(PURGE_AFTER + 2.0)),
}
# The kind of each step is drawn from this list, so a kind listed k times has weight k
# (one_of would drop repeated branches). Time passing is what makes liveness happen (down
# after 3 s, purge after 20 s) and sessions are what there is to converge on, so sleeps and
# joins weigh most; a rare long sleep lets replicas be purged and come back. Kinds shrink
# towards the front of the list: a sleep.
KINDS = (
    ("sleep",) * 4
    + ("join",) * 3
    + ("update",) * 3
    + ("join_more", "leave", "disconnect", "heal", "heal", "partition", "partition")
    + ("loss", "duplicate", "latency", "crash", "crash", "stop", "restart", "restart")
    + ("long_sleep",)
)
steps = st.sampled_from(KINDS).flatmap(STEPS.__getitem__)
# Every program starts with a few sessions, so there is something to converge on.
programs = st.builds(
    lambda first, rest: first + rest,
    st.lists(joins, min_size=1, max_size=6),
    st.lists(steps, min_size=5, max_size=40),
)


async def run_step(world: World, step: tuple[Any, ...]) -> None:
    """Apply one step; steps that make no sense right now (no such client, daemon already
    down, ...) are no-ops, so every list of steps is a valid program."""
    kind, *args = step
    names = world.names
    n = len(names)

    def pick_session(ix: int, *, in_a_room: bool = False) -> Session | None:
        candidates = [s for s in world.sessions if s.rooms or not in_a_room]
        return candidates[ix % len(candidates)] if candidates else None

    def pair(a: int, b: int) -> tuple[str, str] | None:
        a, b = a % n, b % n
        return None if a == b else (names[a], names[b])

    if kind == "sleep":
        await trio.sleep(args[0])
    elif kind == "join":
        name, user, room, x = names[args[0] % n], USERS[args[1]], ROOMS[args[2]], args[3]
        if world.running(name):
            world.join(world.new_session(name, user), room, {"x": x})
    elif kind == "join_more":  # an existing session joins (or re-joins) a room
        session = pick_session(args[0])
        if session is not None:
            world.join(session, ROOMS[args[1]], {"x": args[2]})
    elif kind == "update":
        session = pick_session(args[0], in_a_room=True)
        if session is not None:
            rooms = sorted(session.rooms)
            world.update(session, rooms[args[1] % len(rooms)], {args[2]: args[3]})
    elif kind == "leave":
        session = pick_session(args[0], in_a_room=True)
        if session is not None:
            rooms = sorted(session.rooms)
            world.leave(session, rooms[args[1] % len(rooms)])
    elif kind == "disconnect":
        session = pick_session(args[0])
        if session is not None:
            world.disconnect(session)
    elif kind == "heal":
        world.net.heal()
    elif kind == "partition":
        side = frozenset(name for i, name in enumerate(names) if args[0] >> i & 1)
        other = frozenset(names) - side
        if side and other:
            world.net.partition(side, other)
    elif kind in ("loss", "duplicate", "latency"):
        link = pair(args[0], args[1])
        if link is not None:
            if kind == "loss":
                world.net.set_loss(*link, args[2])
            elif kind == "duplicate":
                world.net.duplicate(*link, args[2])
            else:
                world.net.set_latency(*link, args[2], jitter=args[3])
    elif kind in ("crash", "stop", "restart"):
        name = names[args[0] % n]
        if kind == "restart":
            if not world.running(name):
                await world.start(name)
        elif world.running(name):
            if kind == "crash":
                world.crash(name)
            else:
                await world.stop(name)
    else:
        raise AssertionError(step)


async def quiet_phase(world: World) -> None:
    """Heal, make every link reliable, bring every daemon back, and let it all settle."""
    net = world.net
    net.heal()
    for a, b in itertools.combinations(world.names, 2):
        net.set_loss(a, b, 0.0)
        net.duplicate(a, b, 0.0)
    for name in world.names:
        if not world.running(name):
            await world.start(name)
    await trio.sleep(SETTLE)


def run_program(
    n: int,
    topology: str,
    seed: int,
    program: list[tuple[Any, ...]],
    tombstone_limit: int | None = None,
) -> tuple[Observed, tuple[str, ...]]:
    names = NAMES[:n]

    async def main(nursery: trio.Nursery) -> Observed:
        world = World(nursery, names, topology, seed, tombstone_limit=tombstone_limit)
        for name in names:
            await world.start(name)
        nursery.start_soon(world.watch_ghosts)
        for step in program:
            await run_step(world, step)
        await quiet_phase(world)
        return world.observe()

    return run_cluster(main), names


@settings(PROFILE)
@given(
    n=st.integers(3, len(NAMES)),
    topology=st.sampled_from(TOPOLOGIES),
    seed=st.integers(0, 2**32 - 1),
    program=programs,
    tombstone_limit=st.sampled_from((None, 1, 2)),
)
@example(
    n=3,
    topology="star",
    seed=0,
    program=[
        ("join", 1, 0, 0, 1),
        ("join", 2, 1, 0, 2),
        ("sleep", 1.0),
        ("crash", 0),
        ("update", 0, 0, "x", 5),
        ("sleep", 5.0),
        ("restart", 0),
        ("sleep", 1.0),
    ],
    tombstone_limit=None,
)
# The heal that resurrects (no-rejoin law): ap is cut off from eu (a partition, or the middle
# daemon of the line crashes), ann leaves on ap during the cut, and when eu hears of ap again
# it must not show its stored copy of ap, where ann is still in r0. Random programs seldom
# line this up (none in 300 tried on the code that had the bug), hence these two.
@example(
    n=3,
    topology="line",
    seed=0,
    program=[
        ("join", 2, 0, 0, 1),
        ("join", 0, 1, 0, 2),
        ("sleep", 2.0),
        ("partition", 4),
        ("sleep", 3.5),
        ("leave", 0, 0),
        ("sleep", 5.0),
    ],
    tombstone_limit=None,
)
@example(
    n=3,
    topology="line",
    seed=0,
    program=[
        ("join", 2, 0, 0, 1),
        ("join", 0, 1, 0, 2),
        ("sleep", 2.0),
        ("crash", 1),
        ("sleep", 3.5),
        ("leave", 0, 0),
        ("sleep", 5.0),
    ],
    tombstone_limit=None,
)
def test_cluster_converges_to_the_model(
    n: int,
    topology: str,
    seed: int,
    program: list[tuple[Any, ...]],
    tombstone_limit: int | None,
) -> None:
    observed, names = run_program(n, topology, seed, program, tombstone_limit)
    note(f"model: {observed.model}")
    check_converged(observed, names)


# ------------------------------------------------------------------------------------------
# Deterministic scenarios the random programs rarely hit


def test_star_hub_crash_and_restart_while_a_leaf_moves() -> None:
    """Leaves only meet through the hub; the hub crashes and comes back (new incarnation)
    while a leaf's user keeps moving its cursor. The leaves converge on the last position,
    and the crashed hub's own user is gone everywhere."""
    names = ("hub", "l1", "l2", "l3")

    async def main(nursery: trio.Nursery) -> Observed:
        world = World(nursery, names, "star", seed=11)
        for a, b in itertools.combinations(names, 2):
            world.net.set_latency(a, b, 0.04, jitter=0.01)
        for name in names:
            await world.start(name)
        await trio.sleep(2)
        hub_user = world.new_session("hub", "ann")
        world.join(hub_user, "r0", {"x": 0})
        mover = world.new_session("l1", "bob")
        world.join(mover, "r0", {"x": 0})
        watchers = [world.new_session(leaf, "cat") for leaf in ("l2", "l3")]
        for watcher in watchers:
            world.join(watcher, "r0", {})
        await trio.sleep(2)
        assert ("ann", hub_user.client.session) in watchers[0].client.sees("r0")

        x = 0

        async def move(steps: int) -> None:
            nonlocal x
            for _ in range(steps):
                x += 1
                world.update(mover, "r0", {"x": x})
                await trio.sleep(0.1)

        await move(10)
        world.crash("hub")
        await move(40)  # longer than down_after
        # The leaves are cut off from each other: no ghosts of the hub's user.
        for watcher in watchers:
            assert ("ann", hub_user.client.session) not in watcher.client.sees("r0")
        await world.start("hub")
        await move(30)
        await trio.sleep(SETTLE)
        return world.observe()

    observed = run_cluster(main)
    check_converged(observed, names)
    mover_meta = [m for (_, user, _), m in observed.model.items() if user == "bob"]
    assert mover_meta == [{"x": 80}]


def test_replica_partitioned_past_purge_comes_back() -> None:
    """A replica cut off for longer than purge_after (same incarnation, it never restarted)
    is purged everywhere, then reappears with its users once the partition heals, including
    what changed during the partition; and it sees the others again too."""
    names = ("eu", "us", "ap")

    async def main(nursery: trio.Nursery) -> Observed:
        world = World(nursery, names, "mesh", seed=12)
        for name in names:
            await world.start(name)
        await trio.sleep(2)
        incarnation = world.cluster.node("ap").replica
        sessions = {name: world.new_session(name, "ann") for name in names}
        for name, session in sessions.items():
            world.join(session, "r0", {"from": name})
        await trio.sleep(2)
        assert len(world.cluster.visible("eu")) == 3

        world.net.partition(["ap"], ["eu", "us"])
        await trio.sleep(PURGE_AFTER + 5)
        for name in ("eu", "us"):
            assert world.cluster.node(name).liveness.status(incarnation) == "purged"
            assert incarnation not in world.cluster.node(name).state.partitions
        world.update(sessions["ap"], "r0", {"during": 1})
        late = world.new_session("ap", "bob")
        world.join(late, "r1", {"late": True})
        world.update(sessions["eu"], "r0", {"during": 2})
        await trio.sleep(1)

        world.net.heal()
        await trio.sleep(SETTLE)
        assert world.cluster.node("ap").replica == incarnation
        for name in ("eu", "us"):
            assert world.cluster.node(name).liveness.status(incarnation) == "up"
        return world.observe()

    observed = run_cluster(main)
    check_converged(observed, names)
    assert len(observed.model) == 4


def presence_history(client: FakeClient, room: str) -> dict[tuple[str, str], list[str]]:
    """Replays a client's frames for one room: per (user, session), the sequence of
    "in"/"out" transitions the client saw (a state frame counts as a fresh view)."""
    present: set[tuple[str, str]] = set()
    history: dict[tuple[str, str], list[str]] = {}

    def show(member: tuple[str, str]) -> None:
        if member not in present:
            present.add(member)
            history.setdefault(member, []).append("in")

    def hide(member: tuple[str, str]) -> None:
        if member in present:
            present.discard(member)
            history.setdefault(member, []).append("out")

    def members(presences: Mapping[str, list[dict[str, Any]]]) -> set[tuple[str, str]]:
        return {(user, e["session"]) for user, entries in presences.items() for e in entries}

    for message in client.messages:
        if message.get("room") != room:
            continue
        if message["type"] == "state":
            fresh = members(message["presences"])
            for member in present - fresh:
                hide(member)
            for member in fresh:
                show(member)
        elif message["type"] == "diff":
            for member in members(message["joins"]) | members(message["updates"]):
                show(member)
            for member in members(message["leaves"]):
                hide(member)
    return history


@pytest.mark.parametrize("seed", [13, 14, 15])
def test_duplicates_and_jitter_never_resurrect_a_leave(seed: int) -> None:
    """Heavy duplication and jitter on every link (mesh where every pair dials both ways).

    Duplication starts once the links are up (a duplicated hello kills a link, see
    ``test_regression_duplicated_hello_does_not_kill_the_link``), and no link breaks after
    that (no loss, jitter far below the link timeout: checked), so no replica ever goes down.
    Sessions join once, some update, some leave explicitly, some disconnect; every observer
    must see each session appear at most once and, once it left, never again: the history of
    every (observer, room, session) is "in" or "in, out", never "in, out, in". And
    everything converges.
    """
    names = ("eu", "us", "ap", "sa")

    async def main(nursery: trio.Nursery) -> tuple[Observed, list[Any], bool]:
        world = World(nursery, names, "mesh-both", seed=seed)
        rng = random.Random(seed)
        for a, b in itertools.combinations(names, 2):
            world.net.set_latency(a, b, 0.05, jitter=0.3)
        for name in names:
            await world.start(name)
        await trio.sleep(3)
        links = world.links()
        assert all(len(peers) == len(names) - 1 for peers in links.values()), links
        for a, b in itertools.combinations(names, 2):
            world.net.duplicate(a, b, 0.5)
        observers = [world.new_session(name, "obs") for name in names]
        for observer in observers:
            for room in ROOMS:
                world.join(observer, room, {})
        actors = []
        for i in range(12):
            actor = world.new_session(names[i % len(names)], USERS[i % len(USERS)])
            world.join(actor, ROOMS[i % 2], {"x": 0})
            actors.append(actor)
            await trio.sleep(rng.choice((0.0, 0.01, 0.1)))
        for step in range(60):
            actor = rng.choice(actors)
            if actor not in world.sessions or not actor.rooms:
                continue
            (room,) = actor.rooms
            roll = rng.random()
            if roll < 0.7:
                world.update(actor, room, {"x": step})
            elif roll < 0.85:
                world.leave(actor, room)
            else:
                world.disconnect(actor)
            await trio.sleep(rng.choice((0.0, 0.02, 0.05, 0.2)))
        await trio.sleep(SETTLE)
        histories = [
            (observer.client.session, room, presence_history(observer.client, room))
            for observer in observers
            for room in ROOMS
        ]
        stable = all(
            world.links()[name][peer] is link
            for name, peers in links.items()
            for peer, link in peers.items()
        )
        return world.observe(), histories, stable

    observed, histories, stable = run_cluster(main)
    assert stable, "a link broke or was replaced: the scenario's premise does not hold"
    check_converged(observed, names)
    for observer, room, history in histories:
        for member, transitions in history.items():
            assert transitions in (["in"], ["in", "out"]), (
                f"{observer} saw {member} in {room}: {transitions}"
            )


def test_regression_dialing_sim_daemons_accept_links() -> None:
    """eu <- us <- ap (each dials the previous one): a daemon that dials also accepts links
    in the simulation, so eu and ap meet through us."""
    names = ("eu", "us", "ap")

    async def main(nursery: trio.Nursery) -> Observed:
        world = World(nursery, names, "line", seed=16)
        for name in names:
            await world.start(name)
        for name in names:
            world.join(world.new_session(name, "ann"), "r0", {"from": name})
        await trio.sleep(SETTLE)
        return world.observe()

    observed = run_cluster(main)
    check_converged(observed, names)


def test_regression_duplicated_hello_does_not_kill_the_link() -> None:
    """Two daemons on a link that duplicates every message. Every other message kind is
    idempotent (a stale delta, a second digest, ping, pong or bye change nothing), but the
    second copy of the Hello reaches ``PeerLink._reader`` as a regular message and raises
    ``PeerProtocolError("hello sent twice")``: every link dies right after its handshake, so
    the two regions never see each other. (With p = 0.5 a link survives its handshake with
    probability 1/4; the redial backoff then grows to 10 s and is only reset after a link
    that lived 100 s, so clusters flap and can stay split far longer than down_after.)"""
    names = ("eu", "us")

    async def main(nursery: trio.Nursery) -> Observed:
        world = World(nursery, names, "mesh", seed=17)
        world.net.duplicate("eu", "us", 1.0)
        for name in names:
            await world.start(name)
        for name in names:
            world.join(world.new_session(name, "ann"), "r0", {"from": name})
        await trio.sleep(SETTLE)
        return world.observe()

    observed = run_cluster(main)
    check_converged(observed, names)


@pytest.mark.parametrize("cut", ["middle-restarts", "link-blackholed"])
def test_regression_a_heal_never_resurrects_a_leave(cut: str) -> None:
    """Line eu—us—ap, 20 ms links. ap is cut off from eu for ~10 s (longer than down_after):
    either the middle daemon is killed and restarted (a new incarnation, knowing nothing), or
    the us—ap link drops everything. During the cut a user on ap leaves. At the heal, eu used
    to show ap's stored entries the moment ap's heartbeat came back, before anti-entropy
    brought ap's newer state: its clients got a join for the session that had left, and its
    leave a round trip later. Now no client on eu is ever shown that session after it left
    (no lag allowed here: nothing about it can be in flight), and the session that stayed
    comes back."""
    names = ("eu", "us", "ap")

    async def main(nursery: trio.Nursery) -> tuple[Observed, str, str]:
        world = World(nursery, names, "line", seed=18, rejoin_lag=0.0)
        for a, b in itertools.combinations(names, 2):
            world.net.set_latency(a, b, 0.02)
        for name in names:
            await world.start(name)
        await trio.sleep(2)
        watcher = world.new_session("eu", "obs")
        world.join(watcher, "r0", {})
        leaver = world.new_session("ap", "ann")
        world.join(leaver, "r0", {"x": 1})
        stayer = world.new_session("ap", "bob")
        world.join(stayer, "r0", {"x": 2})
        await trio.sleep(2)
        assert set(watcher.client.sees("r0")) == {
            ("obs", watcher.client.session),
            ("ann", leaver.client.session),
            ("bob", stayer.client.session),
        }
        ap = world.cluster.node("ap").replica
        if cut == "middle-restarts":
            world.crash("us")
        else:
            world.net.set_loss("us", "ap", 1.0)
        await trio.sleep(DOWN_AFTER + 1)
        assert world.cluster.node("eu").liveness.status(ap) == "down"
        world.leave(leaver, "r0")
        await trio.sleep(10 - DOWN_AFTER - 1)
        if cut == "middle-restarts":
            await world.start("us")
        else:
            world.net.set_loss("us", "ap", 0.0)
        await trio.sleep(SETTLE)
        assert world.cluster.node("eu").liveness.status(ap) == "up"
        # The new watcher joins after the heal: its state frame is checked too.
        late = world.new_session("eu", "cat")
        world.join(late, "r0", {})
        await trio.sleep(1)
        return world.observe(), leaver.client.session, stayer.client.session

    observed, left, stayed = run_cluster(main)
    check_converged(observed, names)
    assert ("r0", "bob", stayed) in observed.visible["eu"]
    assert not any(key[2] == left for key in observed.visible["eu"])
