"""Property-based laws of the presence CRDT (presenced.core.crdt).

Every law runs scripts of writes interleaved with gossip on a few replicas, and checks after
every step the invariants the daemon relies on:

* the prefix property: a copy of replica W held anywhere, at clock c, is exactly W's own
  partition as it was right after W's c-th write (so nothing stale can resurrect a leave);
* every extracted delta turns W's state at ``since`` into W's state at ``clock``;
* merge outcomes (applied / stale / gap) are exactly what the clocks say;
* the changes emitted by writes, merges, ``hide``, ``show`` and ``retire``, folded into a
  dict, reproduce ``visible()``, and the room index agrees with ``visible()``;
* a replica shown with a clock stays hidden until its copy holds that clock (a copy older than
  what liveness reported is never shown: it could show a session that has left since).

``HYPOTHESIS_PROFILE=long`` runs 2500 examples per law instead of 200 (about 80 s).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping
from functools import reduce
from typing import Any

from hypothesis import HealthCheck, event, example, given, note, settings
from hypothesis import strategies as st

from presenced.core.crdt import (
    JOIN,
    LEAVE,
    UPDATE,
    Change,
    Delta,
    Key,
    Partition,
    PresenceState,
    ReplicaId,
)

# Profiles for these laws only: loading a profile globally (settings.load_profile) would change
# every other module's hypothesis tests depending on collection order.
settings.register_profile(
    "crdt-default",
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "crdt-long",
    max_examples=2500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
LAWS = settings.get_profile(
    "crdt-long" if os.environ.get("HYPOTHESIS_PROFILE") == "long" else "crdt-default"
)

Entries = dict[Key, Any]
Snapshot = dict[ReplicaId, tuple[int, Entries]]

# A small key space, so that writes hit the same keys again and again. Sessions are
# qualified by the writer's node (session ids are unique to the daemon that accepted the
# connection), so different nodes share rooms and users but never a whole key.
ROOMS = ("r0", "r1")
USERS = ("u0", "u1")
SESSIONS = ("s0", "s1")
KEY_SLOTS = [(r, u, s) for r in ROOMS for u in USERS for s in SESSIONS]

# Small metas, including the empty one.
META_CHOICES = ({}, {"x": 0}, {"x": 1}, {"y": 0}, {"x": 1, "y": 2}, {"x": 0, "y": 0})
# Mostly tiny tombstone limits, so GC and the full-partition fallback happen all the time.
tombstone_limits = st.sampled_from((1, 2, 3, 4, 4096, 4096))


# Scripts are lists of steps. Generating nested one_of/tuples strategies costs hypothesis
# ~4x more than the checks themselves, so each step is drawn as one integer and decoded into
# a readable tuple (every law notes its decoded script, printed for a failing example;
# shrinking an integer towards 0 simplifies the step towards a put of the first key).
class Digits:
    def __init__(self, value: int) -> None:
        self.value = value

    def take(self, n: int) -> int:
        self.value, digit = divmod(self.value, n)
        return digit

    def pick(self, choices: tuple[Any, ...]) -> Any:
        return choices[self.take(len(choices))]


def take_op(d: Digits) -> tuple[str, int, Any]:
    """("put", slot, meta) or ("remove", slot, None); two puts for one remove."""
    kind = d.pick(("put", "put", "remove"))
    slot = d.take(len(KEY_SLOTS))
    meta = d.pick(META_CHOICES)
    return (kind, slot, meta if kind == "put" else None)


def scripts(decode: Any, min_size: int, max_size: int) -> st.SearchStrategy[list[Any]]:
    steps = st.lists(st.integers(0, 2**32 - 1), min_size=min_size, max_size=max_size)
    return steps.map(lambda values: [decode(Digits(v)) for v in values])


def key_of(state: PresenceState, slot: int) -> Key:
    room, user, session = KEY_SLOTS[slot % len(KEY_SLOTS)]
    return room, user, f"{state.local.node}:{session}"


def since_of(raw: int, clock: int) -> int:
    """Any since in [0, clock + 1]: stale ones, the current one, and one from the future."""
    return raw % (clock + 2)


# ---------------------------------------------------------------------- invariants


def copy_of(state: PresenceState, replica: ReplicaId) -> tuple[int, Entries]:
    part = state.partitions.get(replica)
    if part is None:
        return 0, {}
    return part.clock, dict(part.live())


def snapshot(state: PresenceState) -> Snapshot:
    """Every remote partition copy this state holds with a non-zero clock."""
    return {
        replica: (part.clock, dict(part.live()))
        for replica, part in state.partitions.items()
        if replica != state.local and part.clock > 0
    }


def join(a: Snapshot, b: Snapshot) -> Snapshot:
    """The state-level join: per replica, the copy with the higher clock."""
    out = dict(a)
    for replica, (clock, entries) in b.items():
        if replica not in out or out[replica][0] < clock:
            out[replica] = (clock, entries)
    return out


def check_partition(part: Partition, limit: int) -> None:
    counters = [record.counter for record in part.records.values()]
    assert counters == sorted(set(counters)), "records must be in strictly increasing order"
    assert all(0 < c <= part.clock for c in counters)
    tombstones = [r.counter for r in part.records.values() if r.meta is None]
    assert part.tombstones == len(tombstones)
    assert part.tombstones <= limit
    assert all(c > part.floor for c in tombstones), "a kept tombstone is below the floor"
    assert 0 <= part.floor <= part.clock
    assert part.live_count() == len(dict(part.live()))


def check_index(state: PresenceState) -> None:
    """The room index (room_presences) agrees with visible()."""
    indexed = {
        (room, user, session): (meta, region)
        for room in list(state.rooms())
        for user, session, meta, region in state.room_presences(room)
    }
    assert indexed == state.visible()
    assert all(any(True for _ in state.room_presences(room)) for room in state.rooms())
    # The occupancy counters (sessions, distinct users per room) agree with a recount.
    for room in {room for room, _, _ in indexed} | set(state.index.room_users):
        keys = [key for key in indexed if key[0] == room]
        assert state.room_counts(room) == (len(keys), len({user for _, user, _ in keys}))
    # The user index (where a user can be reached) agrees with visible() too.
    expected: dict[str, set[str]] = {}
    for part in state.partitions.values():
        if part.up:
            for (_, user, _), _ in part.live():
                expected.setdefault(user, set()).add(part.replica.node)
    users = {user for (_, user, _) in state.visible()} | set(state.index.users)
    for user in users:
        assert state.user_nodes(user) == sorted(expected.get(user, ()))


def apply_changes(model: dict[Key, tuple[Any, str]], changes: list[Change]) -> None:
    """Fold changes into a dict the way the shell computes client diffs."""
    for change in changes:
        key = (change.room, change.user, change.session)
        if change.kind == JOIN:
            assert key not in model, f"join of an already visible {key}"
            model[key] = (change.meta, change.region)
        elif change.kind == UPDATE:
            assert key in model, f"update of an invisible {key}"
            assert model[key][1] == change.region
            model[key] = (change.meta, change.region)
        else:
            assert change.kind == LEAVE
            assert model.get(key) == (change.meta, change.region), "leave must carry last meta"
            del model[key]


ChangeTuple = tuple[str, Key, Any, str]


def expected_changes(state: PresenceState, delta: Delta, outcome: str) -> list[ChangeTuple]:
    """Exactly the changes a merge must emit, from the receiver's state before the merge:
    leaves of a retired older incarnation, then one change per record that changes what is
    visible (nothing spurious, nothing missing), nothing at all for a partition that is down.
    (A hidden partition that the merge makes current enough to show adds the joins of what it
    then holds: :meth:`Net.merge` appends those, from the state after the merge.)
    """
    replica = delta.replica
    if outcome in ("own", "retired") and replica in state.partitions:
        return []
    part = state.partitions.get(replica)
    out: list[ChangeTuple] = []
    if part is None:
        if outcome == "retired":
            return []
        for other, older in state.partitions.items():
            if other.node == replica.node and older.up:
                out += [(LEAVE, key, meta, older.region) for key, meta in older.live()]
        records: dict[Key, tuple[int, Any]] = {}
        clock, up, region = 0, replica not in state.awaiting, delta.region
    else:
        records = {key: (r.counter, r.meta) for key, r in part.records.items()}
        clock, up, region = part.clock, part.up, part.region
    if outcome != "applied" or not up:
        return out
    if delta.full:
        incoming = {key for key, _, _ in delta.records}
        for key, (_, meta) in records.items():
            if meta is not None and key not in incoming:
                out.append((LEAVE, key, meta, region))
        for key, counter, meta in delta.records:
            old_counter, old_meta = records.get(key, (None, None))
            if old_counter != counter:
                out.append((JOIN if old_meta is None else UPDATE, key, meta, region))
        return out
    for key, counter, meta in delta.records:
        if counter <= clock:
            continue
        old_meta = records.get(key, (None, None))[1]
        if meta is None:
            if old_meta is not None:
                out.append((LEAVE, key, old_meta, region))
        else:
            out.append((JOIN if old_meta is None else UPDATE, key, meta, region))
        records[key] = (counter, meta)
    return out


def refused(state: PresenceState, replica: ReplicaId) -> bool:
    """Whether a delta of ``replica`` must be refused as coming from a dead replica: one that
    was retired, or an older incarnation of a node whose newer incarnation is known (held,
    or retired: a goodbye does not make the incarnations before it alive again), or another
    incarnation of the receiver's own node."""
    if replica in state.retired:
        return True
    if replica in state.partitions:
        return False
    if replica.node == state.local.node:
        return True
    return any(
        other.node == replica.node and other.incarnation > replica.incarnation
        for other in (*state.partitions, *state.retired)
    )


def change_tuples(changes: list[Change]) -> list[ChangeTuple]:
    return [(c.kind, (c.room, c.user, c.session), c.meta, c.region) for c in changes]


def apply_records(entries: Mapping[Key, Any], delta: Delta) -> Entries:
    out = {} if delta.full else dict(entries)
    for key, _, meta in delta.records:
        if meta is None:
            out.pop(key, None)
        else:
            out[key] = meta
    return out


class Net:
    """Replicas, the histories of every writer, and checked operations on them."""

    def __init__(self) -> None:
        self.states: list[PresenceState] = []
        self.models: dict[ReplicaId, dict[Key, tuple[Any, str]]] = {}
        #: replica -> its own partition's live entries after each of its counters.
        self.history: dict[ReplicaId, list[Entries]] = {}

    def add(self, node: str, limit: int, incarnation: int = 1) -> PresenceState:
        state = PresenceState(ReplicaId(node, incarnation), f"region-{node}", tombstone_limit=limit)
        self.states.append(state)
        self.models[state.local] = {}
        self.history[state.local] = [{}]
        return state

    def check(self, state: PresenceState) -> None:
        assert self.models[state.local] == state.visible()
        check_index(state)
        # A replica waiting to be shown is hidden, and its copy is older than it must be.
        for replica, clock in state.awaiting.items():
            part = state.partitions.get(replica)
            assert part is None or (not part.up and part.clock < clock)
            assert replica not in state.retired and replica != state.local

    def write(self, state: PresenceState, op: tuple[str, int, Any]) -> None:
        kind, slot, meta = op
        key = key_of(state, slot)
        before = state.own.clock
        change = state.put(*key, meta) if kind == "put" else state.remove(*key)
        if change is not None:
            apply_changes(self.models[state.local], [change])
        history = self.history[state.local]
        if state.own.clock != before:
            assert change is not None and state.own.clock == before + 1
            history.append(dict(state.own.live()))
        assert len(history) == state.own.clock + 1
        check_partition(state.own, state.tombstone_limit)
        self.check(state)

    def check_delta(self, delta: Delta, sender: PresenceState, since: int) -> None:
        part = sender.partitions.get(delta.replica)
        assert part is not None and delta.clock == part.clock and delta.region == part.region
        history = self.history[delta.replica]
        if delta.full:
            assert delta.since == 0
            assert since <= 0 or since < part.floor
            assert all(meta is not None for _, _, meta in delta.records)
        else:
            assert delta.since == since
            counters = [c for _, c, _ in delta.records]
            assert counters == sorted(set(counters))
            assert all(since < c <= delta.clock for c in counters)
            # Every tombstone after ``since`` is still there to be sent.
            assert since >= part.floor
        assert apply_records(history[delta.since], delta) == history[delta.clock]

    def extract(self, sender: PresenceState, replica: ReplicaId, since: int) -> Delta | None:
        delta = sender.extract(replica, since)
        held = sender.partitions[replica].clock if replica in sender.partitions else 0
        assert (delta is None) == (since >= held)
        if delta is not None:
            self.check_delta(delta, sender, since)
        return delta

    def check_every_extract(self, state: PresenceState) -> None:
        """Whatever a peer holds of any partition, what ``state`` sends it is right."""
        for replica, part in list(state.partitions.items()):
            for since in range(part.clock + 1):
                self.extract(state, replica, since)

    def merge(self, state: PresenceState, delta: Delta) -> str:
        replica = delta.replica
        clock, entries = copy_of(state, replica)
        dead = replica != state.local and refused(state, replica)
        part = state.partitions.get(replica)
        down = part is not None and not part.up
        # Computed before merging, for the outcome the merge is about to report.
        expected_for = {
            outcome: expected_changes(state, delta, outcome)
            for outcome in ("applied", "stale", "gap", "retired", "own")
        }
        awaited = state.awaiting.get(replica)
        result = state.merge(delta)
        expected_now = expected_for[result.outcome]
        if result.outcome == "applied" and awaited is not None and delta.clock >= awaited:
            # Current enough at last: shown as it is now (after the merge), and only now.
            event("merge: shows an awaited replica")
            shown = state.partitions[replica]
            expected_now = expected_now + [(JOIN, k, m, shown.region) for k, m in shown.live()]
            assert replica not in state.awaiting
        elif awaited is not None and result.outcome not in ("retired",):
            assert state.awaiting.get(replica) == awaited
            assert replica not in state.partitions or not state.partitions[replica].up
        assert change_tuples(result.changes) == expected_now
        event(
            f"merge: {result.outcome}{' (full)' if delta.full else ''}{' (down)' if down else ''}"
        )
        if replica == state.local:
            assert result.outcome == "own" and result.changes == []
        elif dead:
            assert result.outcome == "retired" and result.changes == []
            assert replica in state.retired and replica not in state.partitions
        else:
            if delta.clock <= clock:
                expected = "stale"
            elif delta.full or delta.since <= clock:
                expected = "applied"
            else:
                expected = "gap"
            assert result.outcome == expected
            new_clock, new_entries = copy_of(state, replica)
            if expected == "applied":
                assert new_clock == delta.clock
                # The prefix property: the copy is the writer's own state at that clock.
                assert new_entries == self.history[replica][new_clock]
            else:
                assert (new_clock, new_entries) == (clock, entries)
            check_partition(state.partitions[replica], state.tombstone_limit)
        apply_changes(self.models[state.local], result.changes)
        self.check(state)
        return result.outcome

    def exchange(self, src: PresenceState, dst: PresenceState) -> None:
        """Anti-entropy: dst sends its digest, src answers with what dst lacks."""
        digest = dst.digest()
        deltas = src.missing(digest)
        assert {d.replica for d in deltas} == {
            replica
            for replica, part in src.partitions.items()
            if digest.get(replica, 0) < part.clock
        }
        for delta in deltas:
            self.check_delta(delta, src, digest.get(delta.replica, 0))
            assert self.merge(dst, delta) in ("applied", "own", "retired")


# ---------------------------------------------------------------------- 1. prefix property


def prefix_step(d: Digits) -> tuple[Any, ...]:
    kind = d.pick(("write", "write", "write", "direct", "relay", "deliver", "deliver", "sync"))
    if kind == "write":
        return ("write", take_op(d))
    if kind in ("direct", "relay"):
        # direct: W extracts its own partition: into the network.
        # relay: Q extracts its copy of W: into the network.
        # Since is R's or Q's clock of W at that moment (an eager push, delivered later or
        # never), or anything at all.
        return (kind, d.pick(("R", "Q", "any")), d.take(256))
    if kind == "deliver":
        # A queued message reaches R or the relay Q (kept for a duplicate, or consumed).
        return ("deliver", d.pick(("R", "Q")), d.take(256), d.pick(("consume", "keep")))
    # Anti-entropy: the second one sends its digest, the first answers.
    return ("sync", d.pick(("WR", "WQ", "QR", "RQ")))


@LAWS
@given(
    limits=st.tuples(tombstone_limits, tombstone_limits, tombstone_limits),
    script=scripts(prefix_step, 10, 80),
)
def test_prefix_property_no_resurrection(
    limits: tuple[int, int, int], script: list[tuple[Any, ...]]
) -> None:
    note(f"limits={limits} script={script}")
    net = Net()
    w, q, r = (net.add(name, limit) for name, limit in zip("wqr", limits, strict=True))
    by_name = {"W": w, "Q": q, "R": r}
    network: list[Delta] = []
    for step in script:
        if step[0] == "write":
            net.write(w, step[1])
        elif step[0] in ("direct", "relay"):
            _, mode, raw = step
            sender = w if step[0] == "direct" else q
            held = copy_of(sender, w.local)[0]
            since = since_of(raw, held) if mode == "any" else copy_of(by_name[mode], w.local)[0]
            delta = net.extract(sender, w.local, since)
            if delta is not None:
                network.append(delta)
        elif step[0] == "deliver":
            _, to, index, keep = step
            if network:
                index %= len(network)
                delta = network[index] if keep == "keep" else network.pop(index)
                net.merge(by_name[to], delta)
        else:
            src, dst = step[1]
            net.exchange(by_name[src], by_name[dst])
    for state in (w, q, r):
        net.check_every_extract(state)
    # Whatever happened, one anti-entropy round brings R up to date with W.
    net.exchange(w, r)
    assert copy_of(r, w.local) == (w.own.clock, dict(w.own.live()))


# ---------------------------------------------------------------------- 2./3. gossip schedules


def gossip_step(d: Digits) -> tuple[Any, ...]:
    kind = d.pick(("write", "write", "write", "push", "push", "deliver", "deliver", "exchange"))
    if kind == "write":
        return ("write", d.take(8), take_op(d))
    if kind == "push":
        # Eager push of a partition (own or relayed) from src to dst, for dst's current clock
        # of it (None) or any since: queued, may be delivered late, twice, or never.
        src, dst, part = d.take(8), d.take(8), d.take(8)
        return ("push", src, dst, part, None if d.take(2) else d.take(256))
    if kind == "deliver":
        return ("deliver", d.take(256), d.pick(("consume", "keep")))
    return ("exchange", d.take(8), d.take(8))


def run_gossip(
    net: Net, script: list[tuple[Any, ...]], network: list[tuple[PresenceState, Delta]]
) -> None:
    states = net.states
    n = len(states)
    for step in script:
        if step[0] == "write":
            net.write(states[step[1] % n], step[2])
        elif step[0] == "push":
            _, i, j, p, raw = step
            src, dst = states[i % n], states[j % n]
            replicas = sorted(src.partitions)
            replica = replicas[p % len(replicas)]
            held = src.partitions[replica].clock
            since = dst.digest().get(replica, 0) if raw is None else since_of(raw, held)
            delta = net.extract(src, replica, since)
            if delta is not None:
                network.append((dst, delta))
        elif step[0] == "deliver":
            if network:
                index = step[1] % len(network)
                dst, delta = network[index] if step[2] == "keep" else network.pop(index)
                net.merge(dst, delta)
        else:
            net.exchange(states[step[1] % n], states[step[2] % n])


@LAWS
@given(
    limits=st.lists(tombstone_limits, min_size=3, max_size=4),
    script=scripts(gossip_step, 10, 60),
    pair=st.tuples(st.integers(0, 3), st.integers(0, 3)),
)
def test_missing_then_merge_equals_full_state(
    limits: list[int], script: list[tuple[Any, ...]], pair: tuple[int, int]
) -> None:
    note(f"limits={limits} script={script}")
    net = Net()
    for i, limit in enumerate(limits):
        net.add(f"n{i}", limit)
    run_gossip(net, script, [])
    a, b = net.states[pair[0] % len(limits)], net.states[pair[1] % len(limits)]
    before = {replica: copy_of(b, replica) for replica in net.history}
    net.exchange(a, b)
    for replica in net.history:
        if replica == b.local:
            continue
        if copy_of(a, replica)[0] > before[replica][0]:
            assert copy_of(b, replica) == copy_of(a, replica)
        else:
            assert copy_of(b, replica) == before[replica]
    assert net.models[b.local] == b.visible()


@LAWS
@given(
    limits=st.lists(tombstone_limits, min_size=2, max_size=4),
    script=scripts(gossip_step, 10, 80),
)
def test_convergence_under_arbitrary_schedules(
    limits: list[int], script: list[tuple[Any, ...]]
) -> None:
    note(f"limits={limits} script={script}")
    net = Net()
    for i, limit in enumerate(limits):
        net.add(f"n{i}", limit)
    network: list[tuple[PresenceState, Delta]] = []
    run_gossip(net, script, network)
    for state in net.states:
        net.check_every_extract(state)
    # Some queued pushes land after the schedule, in reverse order.
    for dst, delta in reversed(network):
        net.merge(dst, delta)
    # Final anti-entropy over a line n0 - n1 - ... - nk: one pass each way, relaying.
    states = net.states
    for left, right in itertools.pairwise(states):
        net.exchange(left, right)
    for left, right in reversed(list(itertools.pairwise(states))):
        net.exchange(right, left)
    expected = {key: (meta, s.region) for s in states for key, meta in s.own.live()}
    # Every replica holds every partition that has been written to, at its writer's clock.
    digests = {s.local: s.own.clock for s in states if s.own.clock}
    for s in states:
        assert s.visible() == expected
        assert {r: c for r, c in s.digest().items() if c} == digests
        assert all(s.missing(t.digest()) == [] for t in states)


# ---------------------------------------------------------------------- 4. join laws


def capture_step(d: Digits) -> tuple[Any, ...]:
    if d.pick(("write", "write", "capture")) == "write":
        return ("write", d.take(8), take_op(d))
    # A delta of a writer's partition: full (the writer's whole state), or for some since.
    return ("capture", d.take(8), d.take(256), d.pick(("full", "since")))


def merge_until_fixpoint(receiver: PresenceState, deltas: list[Delta]) -> None:
    progress = True
    while progress:
        progress = False
        for delta in deltas:
            if receiver.merge(delta).outcome == "applied":
                progress = True


@LAWS
@given(
    limits=st.lists(tombstone_limits, min_size=2, max_size=3),
    script=scripts(capture_step, 5, 50),
    data=st.data(),
)
def test_merge_is_commutative_associative_idempotent(
    limits: list[int], script: list[tuple[Any, ...]], data: st.DataObject
) -> None:
    note(f"limits={limits} script={script}")
    net = Net()
    writers = [net.add(f"w{i}", limit) for i, limit in enumerate(limits)]
    deltas: list[Delta] = []
    for step in script:
        writer = writers[step[1] % len(writers)]
        if step[0] == "write":
            net.write(writer, step[2])
        else:
            since = 0 if step[3] == "full" else since_of(step[2], writer.own.clock)
            delta = net.extract(writer, writer.local, since)
            if delta is not None:
                deltas.append(delta)
    fulls = [d for d in deltas if d.full]
    snaps = [{d.replica: (d.clock, {k: m for k, _, m in d.records})} for d in fulls]

    # The join itself is a semilattice on the snapshots the writers produced.
    if snaps:
        x, y, z = (data.draw(st.sampled_from(snaps)) for _ in range(3))
        assert join(x, y) == join(y, x)
        assert join(join(x, y), z) == join(x, join(y, z))
        assert join(x, x) == x
    expected = reduce(join, snaps, {})

    # Any order: merging the full deltas gives the join of their snapshots.
    order = data.draw(st.permutations(fulls))
    receiver = net.add("recv", data.draw(tombstone_limits))
    for delta in order:
        net.merge(receiver, delta)
    assert snapshot(receiver) == expected

    # Any grouping: two replicas merge a part each, then one answers the other's digest.
    cut = data.draw(st.integers(0, len(order)))
    left, right = net.add("left", 4096), net.add("right", 2)
    for delta in order[:cut]:
        net.merge(left, delta)
    for delta in order[cut:]:
        net.merge(right, delta)
    net.exchange(left, right)
    assert {r: v for r, v in snapshot(right).items() if r != left.local} == expected
    net.exchange(right, left)
    assert {r: v for r, v in snapshot(left).items() if r != right.local} == expected

    # Idempotent: merging the same deltas again changes nothing.
    for delta in order:
        result = receiver.merge(delta)
        assert result.outcome == "stale" and result.changes == []
    assert snapshot(receiver) == expected

    # With incremental deltas too, any order (retrying gaps until nothing applies) reaches
    # the same state: per writer, the highest clock a chain of deltas from 0 reaches.
    reach: Snapshot = {}
    for writer in writers:
        clock = 0
        for delta in sorted(deltas, key=lambda d: d.clock):
            if delta.replica == writer.local and (delta.full or delta.since <= clock):
                clock = max(clock, delta.clock)
        if clock:
            reach[writer.local] = (clock, net.history[writer.local][clock])
    for attempt in range(2):
        mixed = net.add(f"mixed{attempt}", data.draw(tombstone_limits))
        merge_until_fixpoint(mixed, data.draw(st.permutations(deltas)))
        assert snapshot(mixed) == reach
        for delta in deltas:
            result = mixed.merge(delta)
            assert result.outcome in ("stale", "gap") and result.changes == []


# ---------------------------------------------------------------------- 5. changes model

CHANGE_KINDS = (
    *("write",) * 8,
    *("push", "deliver") * 4,
    *("exchange", "liveness") * 3,
    "retire",
    "drop",
    # A node restarts: a new incarnation; the old one lingers as a source of stale deltas.
    "restart",
)


def change_step(d: Digits) -> tuple[Any, ...]:
    kind = d.pick(CHANGE_KINDS)
    if kind == "write":
        return ("write", d.take(8), take_op(d))
    if kind == "push":
        # From a live replica (usually) or from any incarnation ever started.
        return ("push", d.pick(("live", "live", "live", "any")), d.take(64), d.take(8), d.take(256))
    if kind == "deliver":
        return ("deliver", d.take(256), d.pick(("consume", "keep")))
    if kind == "exchange":
        return ("exchange", d.take(8), d.take(8))
    if kind == "liveness":
        # (the clock liveness reports: the copy's own, or the writer's current one)
        return ("liveness", d.take(8), d.take(8), d.pick(("held", "writer")))
    if kind in ("retire", "drop"):
        return (kind, d.take(8), d.take(8))
    return ("restart", d.take(8))


@LAWS
@given(
    limits=st.lists(tombstone_limits, min_size=2, max_size=3),
    script=scripts(change_step, 20, 100),
)
# Found by the long profile: n1 restarts, the observer hears of n1#2 only, n1#2 says goodbye
# (retire), then a stale relay of n1#1 arrives: it must be refused, not admitted.
@example(
    limits=[1, 1],
    script=[
        ("write", 3, ("put", 0, {})),
        ("restart", 1),
        ("write", 3, ("put", 2, {"y": 0})),
        ("push", "any", 52, 2, 0),
        ("exchange", 4, 5),
        ("retire", 2, 1),
        ("deliver", 6, "consume"),
    ],
)
def test_changes_reproduce_visible(limits: list[int], script: list[tuple[Any, ...]]) -> None:
    note(f"limits={limits} script={script}")
    net = Net()
    nodes = [net.add(f"n{i}", limit) for i, limit in enumerate(limits)]
    observer = net.add("obs", 2)  # writes nothing, only merges and toggles liveness
    everyone = [*nodes]  # every incarnation ever started: all can still send deltas
    network: list[tuple[PresenceState, Delta]] = []

    def receivers() -> list[PresenceState]:
        return [*nodes, observer]

    for step in script:
        kind = step[0]
        if kind == "write":
            net.write(nodes[step[1] % len(nodes)], step[2])
        elif kind == "push":
            sources = receivers() if step[1] == "live" else everyone
            src = sources[step[2] % len(sources)]
            dst = receivers()[step[3] % len(receivers())]
            replicas = sorted(src.partitions)
            replica = replicas[step[4] % len(replicas)]
            since = dst.digest().get(replica, 0)
            delta = net.extract(src, replica, since)
            if delta is not None:
                network.append((dst, delta))
        elif kind == "deliver":
            if network:
                index = step[1] % len(network)
                dst, delta = network[index] if step[2] == "keep" else network.pop(index)
                if dst in receivers():
                    net.merge(dst, delta)
        elif kind == "exchange":
            src = receivers()[step[1] % len(receivers())]
            dst = receivers()[step[2] % len(receivers())]
            net.exchange(src, dst)
        elif kind in ("liveness", "retire", "drop"):
            state = receivers()[step[1] % len(receivers())]
            remote = sorted(r for r in state.partitions if r != state.local)
            if not remote:
                continue
            replica = remote[step[2] % len(remote)]
            part = state.partitions[replica]
            if kind == "liveness" and part.up:
                event("hide")
                changes = state.hide(replica)
                assert not part.up and replica not in state.awaiting
                expected = [(LEAVE, k, m, part.region) for k, m in part.live()]
                assert change_tuples(changes) == expected
            elif kind == "liveness":
                # Up again, with the clock of its heartbeat: what the copy holds, or (the
                # writer wrote on meanwhile) more: then it stays hidden until merges catch up.
                clock = part.clock if step[3] == "held" else len(net.history[replica]) - 1
                shown = clock <= part.clock
                event(f"show {'now' if shown else 'later'}")
                changes = state.show(replica, clock)
                assert part.up == shown and (replica in state.awaiting) != shown
                expected = [(JOIN, k, m, part.region) for k, m in part.live()] if shown else []
                assert change_tuples(changes) == expected
            else:
                # retire: goodbye, or replaced (for good); drop: purged (it may come back).
                event(kind)
                part = state.partitions[replica]
                expected = [(LEAVE, k, m, part.region) for k, m in part.live()] if part.up else []
                changes = state.retire(replica) if kind == "retire" else state.drop(replica)
                assert change_tuples(changes) == expected
                assert replica not in state.partitions
                assert (replica in state.retired) == (kind == "retire")
            apply_changes(net.models[state.local], changes)
            net.check(state)
        else:
            event("restart")
            index = step[1] % len(nodes)
            old = nodes[index]
            new = net.add(old.local.node, old.tombstone_limit, old.local.incarnation + 1)
            nodes[index] = new
            everyone.append(new)
        for state in receivers():
            net.check(state)
            # No state holds two incarnations of one node.
            held = [r.node for r in state.partitions]
            assert len(held) == len(set(held))
    for state in [*everyone, observer]:
        net.check_every_extract(state)
