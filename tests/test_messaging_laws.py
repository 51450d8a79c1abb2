"""Laws of direct messages over whole simulated clusters, under arbitrary schedules.

Hypothesis draws a topology (line, ring, star of 4 daemons) and a program: reliable and fast
sends between users placed on daemons, recipients going offline and coming back on another
daemon, partitions and heals, loss and duplication on links, crashes and restarts (the
message store lives in a directory, so it survives, as on a real disk), and time passing.
After a quiet phase (healed, every daemon running, every user online) it checks:

1. **Nothing acknowledged is lost:** every reliable message that got ``stored`` was shown
   to at least one session of its recipient.
2. **Nothing is doubled:** no session is shown the same message id twice.
3. **Order per pair:** within one session, the reliable messages of one sender arrive in
   the order they were sent.
4. The origin stores are empty: every stored message was confirmed.
5. **Every send is answered in time:** every ``send`` whose session stayed connected got its
   first answer (``delivered``, ``stored`` or an ``error``) within ``FAST_ANSWER_S``, whatever
   the network did meanwhile.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from pathlib import Path
from typing import Any

import attrs
import trio
import trio.testing
from hypothesis import HealthCheck, example, given, note, settings
from hypothesis import strategies as st

import presenced.testing.cluster as cluster_module
from presenced.core.answers import FAST_ANSWER_S
from presenced.testing.cluster import Cluster, FakeClient
from presenced.testing.simnet import SimNetwork

NAMES = ("a", "b", "c", "d")
USERS = ("ann", "bob", "cat")
TOPOLOGIES = {
    "line": [("b", "a"), ("c", "b"), ("d", "c")],
    "ring": [("b", "a"), ("c", "b"), ("d", "c"), ("a", "d")],
    "star": [("b", "a"), ("c", "a"), ("d", "a")],
}

settings.register_profile(
    "messaging-default",
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "messaging-long",
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROFILE = settings.get_profile(
    "messaging-long" if os.environ.get("HYPOTHESIS_PROFILE") == "long" else "messaging-default"
)

daemon_ix = st.integers(0, len(NAMES) - 1)
user_ix = st.integers(0, len(USERS) - 1)
steps = st.one_of(
    st.tuples(st.just("send"), user_ix, user_ix, st.booleans()),
    st.tuples(st.just("move"), user_ix, daemon_ix),
    st.tuples(st.just("offline"), user_ix),
    st.tuples(st.just("partition"), st.sets(daemon_ix, min_size=1, max_size=2)),
    st.tuples(st.just("heal")),
    st.tuples(st.just("crash"), daemon_ix),
    st.tuples(st.just("restart")),
    st.tuples(st.just("lossy"), st.floats(0, 0.3), st.floats(0, 0.3)),
    st.tuples(st.just("sleep"), st.sampled_from((0.01, 0.1, 0.5, 2.0, 5.0))),
)
programs = st.lists(steps, min_size=1, max_size=20)


@attrs.define
class World:
    cluster: Cluster
    net: SimNetwork
    topology: str
    #: user -> (daemon, client) while online
    online: dict[str, tuple[str, FakeClient]] = attrs.field(factory=dict)
    #: every client ever, to collect what each session was shown
    clients: list[FakeClient] = attrs.field(factory=list)
    counters: dict[tuple[str, str], int] = attrs.field(factory=dict)
    #: (sending client, ref, recipient) of reliable sends, to find their `stored` replies
    reliable: list[tuple[FakeClient, int, str]] = attrs.field(factory=list)
    #: (sending client, ref, virtual time) of every send
    sends: list[tuple[FakeClient, int, float]] = attrs.field(factory=list)
    #: client -> virtual time of its first answer per ref
    answers: dict[FakeClient, dict[int, float]] = attrs.field(factory=dict)
    #: client -> virtual time it was disconnected (or its daemon crashed)
    gone: dict[FakeClient, float] = attrs.field(factory=dict)

    def peers_of(self, name: str) -> list[str]:
        return [b for a, b in TOPOLOGIES[self.topology] if a == name]

    async def start(self, name: str) -> None:
        await self.cluster.start(name, peers=self.peers_of(name))

    def running(self, name: str) -> bool:
        return name in self.cluster.daemons

    def go_online(self, user: str, name: str) -> None:
        self.go_offline(user)
        client = self.cluster.client(name, user)
        self.answers[client] = first = {}
        receive = client._receive

        def timed(message: dict[str, Any]) -> None:
            if message["type"] in ("delivered", "stored", "error") and "ref" in message:
                first.setdefault(message["ref"], trio.current_time())
            receive(message)

        client._receive = timed  # type: ignore[method-assign]
        client.join("hq")
        self.online[user] = (name, client)
        self.clients.append(client)

    def go_offline(self, user: str) -> None:
        where = self.online.pop(user, None)
        if where is not None and self.running(where[0]):
            where[1].disconnect()
        if where is not None:
            self.gone.setdefault(where[1], trio.current_time())

    def crash(self, name: str) -> None:
        self.cluster.crash(name)
        for user, (where, client) in list(self.online.items()):
            if where == name:
                del self.online[user]
                self.gone.setdefault(client, trio.current_time())


async def run_step(world: World, step: tuple[Any, ...]) -> None:
    kind = step[0]
    if kind == "send":
        sender, recipient = USERS[step[1]], USERS[step[2]]
        where = world.online.get(sender)
        if where is None:
            return
        count = world.counters[(sender, recipient)] = world.counters.get((sender, recipient), 0) + 1
        mode = "reliable" if step[3] else "fast"
        ref = where[1].send_to(recipient, {"from": sender, "n": count}, mode)
        world.sends.append((where[1], ref, trio.current_time()))
        if mode == "reliable":
            world.reliable.append((where[1], ref, recipient))
    elif kind == "move":
        name = NAMES[step[2]]
        if world.running(name):
            world.go_online(USERS[step[1]], name)
    elif kind == "offline":
        world.go_offline(USERS[step[1]])
    elif kind == "partition":
        side = [NAMES[i] for i in step[1]]
        world.net.partition(side, [n for n in NAMES if n not in side])
    elif kind == "heal":
        world.net.heal()
    elif kind == "crash":
        name = NAMES[step[1]]
        if world.running(name) and len(world.cluster.daemons) > 1:
            world.crash(name)
    elif kind == "restart":
        for name in NAMES:
            if not world.running(name):
                await world.start(name)
    elif kind == "lossy":
        for a, b in TOPOLOGIES[world.topology]:
            world.net.set_loss(a, b, step[1])
            world.net.duplicate(a, b, step[2])
    elif kind == "sleep":
        await trio.sleep(step[1])


@attrs.frozen
class Observed:
    #: (recipient, message id) of every `stored` reliable message
    stored: list[tuple[str, str]]
    #: per session: (user, [message frames in arrival order])
    shown: list[tuple[str, list[dict[str, Any]]]]
    pending_left: dict[str, int]
    #: sends of sessions still connected FAST_ANSWER_S later, with no answer by then
    unanswered: list[tuple[str, int]]


def run(topology: str, seed: int, program: list[tuple[Any, ...]], data_root: Path) -> Observed:
    cluster_module._sessions = itertools.count(1)

    async def main() -> Observed:
        async with trio.open_nursery() as nursery:
            net = SimNetwork(seed=seed, latency=0.02)
            world = World(Cluster(nursery, net, data_root=data_root), net, topology)
            for name in NAMES:
                await world.start(name)
            await trio.sleep(3)
            for i, user in enumerate(USERS):
                world.go_online(user, NAMES[i % len(NAMES)])
            await trio.sleep(1)
            for step in program:
                await run_step(world, step)
            # Quiet phase: heal, clean links, everyone running and online.
            world.net.heal()
            for a, b in TOPOLOGIES[topology]:
                world.net.set_loss(a, b, 0)
                world.net.duplicate(a, b, 0)
            await run_step(world, ("restart",))
            for i, user in enumerate(USERS):
                if user not in world.online:
                    world.go_online(user, NAMES[-1 - i])
            await trio.sleep(15)
            observed = Observed(
                [
                    (recipient, reply["id"])
                    for client, ref, recipient in world.reliable
                    for reply in client.received("stored", ref=ref)
                ],
                [(c.user, c.received("message")) for c in world.clients],
                {
                    name: world.cluster.node(name).messenger.store.pending_total()  # type: ignore[union-attr]
                    for name in NAMES
                },
                [
                    (client.user, ref)
                    for client, ref, at in world.sends
                    if world.gone.get(client, float("inf")) > at + FAST_ANSWER_S
                    and world.answers[client].get(ref, float("inf")) > at + FAST_ANSWER_S
                ],
            )
            nursery.cancel_scope.cancel()
        return observed

    return trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def check(observed: Observed) -> None:
    shown_ids: dict[str, set[str]] = {}
    for user, frames in observed.shown:
        ids = [m["id"] for m in frames]
        assert len(ids) == len(set(ids)), f"a session of {user} was shown a message twice: {ids}"
        shown_ids.setdefault(user, set()).update(ids)
        last: dict[tuple[str, str], int] = {}
        for frame in frames:
            if frame["mode"] != "reliable":
                continue
            pair = (frame["region"], frame["data"]["from"])  # order holds per origin daemon
            n = frame["data"]["n"]
            assert n > last.get(pair, 0), f"{user} got {pair}'s #{n} after #{last[pair]}"
            last[pair] = n
    for recipient, message_id in observed.stored:
        assert message_id in shown_ids.get(recipient, set()), (
            f"stored message {message_id} for {recipient} was never shown"
        )
    assert observed.pending_left == dict.fromkeys(NAMES, 0)
    assert not observed.unanswered, f"sends never answered in time: {observed.unanswered}"


@settings(PROFILE)
# A fast copy in flight when a partition cuts its path: answered only by its deadline.
@example(topology="line", seed=0, program=[("send", 2, 0, False), ("partition", {0, 1})])
@given(
    topology=st.sampled_from(sorted(TOPOLOGIES)), seed=st.integers(0, 2**32 - 1), program=programs
)
def test_reliable_messages_arrive_once_in_order_whatever_happens(
    topology: str, seed: int, program: list[tuple[Any, ...]]
) -> None:
    note(f"{topology} {program}")
    with tempfile.TemporaryDirectory() as root:
        check(run(topology, seed, program, Path(root)))
