"""Whole clusters of real daemons on a simulated network, for tests and benchmarks.

    async with trio.open_nursery() as nursery:
        cluster = Cluster(nursery, SimNetwork(seed=1))
        await cluster.start("eu", peers=["us"])
        await cluster.start("us")
        ann = cluster.client("eu", "ann")
        ann.join("lobby", {"x": 1})

Each daemon is the production :class:`~presenced.server.daemon.Daemon` with the simulated
transport injected and no client listener; clients are :class:`FakeClient` objects that
call the node exactly as a WebSocket connection does and decode every frame the node
pushes to them, keeping a presence map from ``state`` and ``diff`` frames. Comparing those
maps with a model checks the CRDT, gossip and fan-out end to end.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs
import trio

from presenced.config import (
    DEFAULT_DOWN_AFTER_S,
    DEFAULT_PURGE_AFTER_S,
    DEFAULT_RESUME_GRACE_S,
    DEFAULT_TICK_MS,
    Config,
    HostPort,
)
from presenced.core import protocol
from presenced.core.crdt import Meta
from presenced.core.limits import Limits
from presenced.core.session import SessionRules
from presenced.server.clients import Sessions
from presenced.server.daemon import Daemon
from presenced.server.node import Node
from presenced.testing.simnet import SimNetwork

#: room -> user -> session -> (meta, region), as a client sees it.
View = dict[str, dict[str, dict[str, tuple[Any, str]]]]

_sessions = itertools.count(1)


def decode_frame(frame: bytes) -> dict[str, Any]:
    """The JSON message inside one unmasked server text frame."""
    length = frame[1] & 0x7F
    offset = 2
    if length == 126:
        offset = 4
    elif length == 127:
        offset = 10
    return dict(json.loads(frame[offset:].decode()))


class FakeClient:
    """A client session attached directly to a node (no socket), seeing what a socket would."""

    def __init__(self, node: Node, user: str, sessions: Sessions | None = None) -> None:
        self.node = node
        #: The daemon's sessions, for :meth:`hello` and :meth:`drop` (a bare node has none).
        self.sessions = sessions
        self.user = user
        self.peer = f"fake:{user}"
        self.session = f"{node.replica.node}-s{next(_sessions)}"
        self.rooms: dict[str, None] = {}
        self.messages: list[dict[str, Any]] = []
        self.view: View = {}
        self.closed: tuple[int, str] | None = None
        self._refs = itertools.count(1)
        #: Called with every message this client receives, as it arrives (tests check
        #: safety laws on each frame, not only on the final view).
        self.on_message: Callable[[FakeClient, dict[str, Any]], None] | None = None
        #: What the daemon's sessions read of a connection (rules with no grant: any room;
        #: never quiet, so the liveness sweep leaves it alone).
        self.limits = Limits()
        self.rules = SessionRules(self.limits, 0.0)
        self.rules.rooms = self.rooms
        self.session_ends = False
        self.last_input = math.inf
        self.pinged_at = 0.0
        node.connections.add(self)
        node.identified(self)

    # What the node calls on a connection:
    def push(self, frame: bytes, room: str | None = None) -> None:
        self._receive(decode_frame(frame))

    def send(self, message: dict[str, Any], room: str | None = None) -> None:
        self._receive(json.loads(protocol.encode_frame(message)))

    def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)
        self.disconnect()

    def ping(self, now: float) -> None:
        self.pinged_at = now

    # What a client does:
    def hello(self, resume: str | None = None) -> dict[str, Any]:
        """Say hello as a socket connection would (optionally resuming): the session is
        then the daemon's (see :class:`~presenced.server.clients.Sessions`); returns the
        ``welcome``."""
        hello = protocol.Hello("hello", user=self.user, resume=resume)
        assert self.sessions is not None, "a client of a bare node has no sessions"
        self.sessions.welcome(self, hello)
        return self.received("welcome")[-1]

    def drop(self) -> None:
        """The connection ends without a clean close: the session waits for its grace."""
        assert self.sessions is not None, "a client of a bare node has no sessions"
        self.sessions.connection_ended(self)
        self.view.clear()

    def join(self, room: str, meta: Meta | None = None) -> None:
        self.rooms[room] = None
        self.node.join(self, room, dict(meta or {}), None)

    def update(self, room: str, patch: Meta) -> None:
        current = self.node.current_meta(self, room)
        assert current is not None, f"{self.user} is not in {room}"
        self.node.update(self, room, protocol.apply_meta_patch(dict(current), dict(patch)))

    def leave(self, room: str) -> None:
        del self.rooms[room]
        self.node.leave(self, room)
        self.view.pop(room, None)

    def broadcast(self, room: str, event: str, data: Any = None) -> None:
        self.node.broadcast(self, room, event, data, False)

    def send_to(self, to: str | list[str], data: Any, mode: str = "fast") -> int:
        """Send a direct message; returns the ``ref`` its confirmations will carry."""
        ref = next(self._refs)
        group = isinstance(to, list)
        recipients = tuple(to) if isinstance(to, list) else (to,)
        message = protocol.Send(ref, recipients, data, mode, group)
        assert self.node.messenger is not None
        self.node.messenger.send(self, message)
        return ref

    def mark_read(self, message_id: str) -> None:
        assert self.node.messenger is not None
        self.node.messenger.mark_read(self, protocol.MarkRead(None, message_id))

    def fetch(self, limit: int = 100) -> int:
        ref = next(self._refs)
        assert self.node.messenger is not None
        self.node.messenger.fetch(self, protocol.Fetch(ref, limit))
        return ref

    def received(self, kind: str, **fields: Any) -> list[dict[str, Any]]:
        """Frames of one type this client got, optionally matching some fields."""
        return [
            m
            for m in self.messages
            if m["type"] == kind and all(m.get(k) == v for k, v in fields.items())
        ]

    def disconnect(self) -> None:
        self.node.disconnect(self)
        self.view.clear()

    def _receive(self, message: dict[str, Any]) -> None:
        self.messages.append(message)
        if self.on_message is not None:
            self.on_message(self, message)
        kind = message["type"]
        if kind == "state":
            self.view[message["room"]] = {}
            self._merge(message["room"], message["presences"])
        elif kind == "diff" and message["room"] in self.view:
            room = self.view[message["room"]]
            self._merge(message["room"], message["joins"])
            self._merge(message["room"], message["updates"])
            for user, sessions in message["leaves"].items():
                for entry in sessions:
                    room.get(user, {}).pop(entry["session"], None)
                if user in room and not room[user]:
                    del room[user]

    def _merge(self, room: str, presences: dict[str, list[dict[str, Any]]]) -> None:
        target = self.view.setdefault(room, {})
        for user, sessions in presences.items():
            for entry in sessions:
                target.setdefault(user, {})[entry["session"]] = (entry["meta"], entry["region"])

    def sees(self, room: str) -> dict[tuple[str, str], Any]:
        """(user, session) -> meta of everyone this client sees in a room."""
        return {
            (user, session): meta
            for user, sessions in self.view.get(room, {}).items()
            for session, (meta, _region) in sessions.items()
        }


@attrs.define
class SimDaemon:
    name: str
    daemon: Daemon
    scope: trio.CancelScope
    #: Set when the daemon's task has ended (its message store is closed).
    done: trio.Event = attrs.field(factory=trio.Event)

    @property
    def node(self) -> Node:
        return self.daemon.node


class Cluster:
    """Daemons on a :class:`SimNetwork`, started and crashed at will."""

    def __init__(
        self,
        nursery: trio.Nursery,
        net: SimNetwork,
        *,
        tick_ms: int = DEFAULT_TICK_MS,
        down_after_s: float = DEFAULT_DOWN_AFTER_S,
        purge_after_s: float = DEFAULT_PURGE_AFTER_S,
        timings: Mapping[str, float] | None = None,
        data_root: Path | None = None,
        token_secret: bytes | None = None,
        resume_grace_s: float = DEFAULT_RESUME_GRACE_S,
    ) -> None:
        self.nursery = nursery
        #: Given to every daemon (a cluster shares its token secret).
        self.token_secret = token_secret
        self.resume_grace_s = resume_grace_s
        self.net = net
        self.tick_ms = tick_ms
        self.down_after_s = down_after_s
        self.purge_after_s = purge_after_s
        #: Config fields of the peer layer's timings (like ``heartbeat_interval_s``).
        self.timings: dict[str, Any] = dict(timings or {})
        #: If set, each daemon keeps its message store in data_root/<name> (survives crashes).
        self.data_root = data_root
        self.daemons: dict[str, SimDaemon] = {}
        self._incarnations = itertools.count(1)
        #: Daemons crashed or stopped whose task has not ended yet.
        self._ending: dict[str, SimDaemon] = {}

    @staticmethod
    def address(name: str) -> str:
        return f"sim://{name}"

    async def start(self, name: str, peers: Iterable[str] = ()) -> SimDaemon:
        """Start (or restart, with a new incarnation) the daemon ``name``."""
        ending = self._ending.pop(name, None)
        if ending is not None:
            await ending.done.wait()  # like a process exit: its files are released first
        config = Config(
            region=name,
            listen=HostPort("127.0.0.1", 0),
            allow_anonymous=True,
            tick_ms=self.tick_ms,
            down_after_s=self.down_after_s,
            purge_after_s=self.purge_after_s,
            peers=tuple(self.address(p) for p in peers),
            # The simulated transport ignores the address, but a daemon with peers and no
            # peer_listen only dials, and simulated links must be dialable both ways.
            peer_listen=HostPort("127.0.0.1", 0),
            data_dir=None if self.data_root is None else self.data_root / name,
            token_secret=self.token_secret,
            resume_grace_s=self.resume_grace_s,
            **self.timings,
        )
        if self.net.is_crashed(name):
            self.net.restart(name)
        transport = self.net.transport(name, self.address(name))
        daemon = Daemon(
            config,
            incarnation=next(self._incarnations),
            transport=transport,
            rng=random.Random(self.net.random.random()),  # deterministic under the seed
        )
        daemon.node.phase_clock = trio.current_time  # tick boundaries in virtual time
        sim = SimDaemon(name, daemon, trio.CancelScope())

        async def run(task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                with sim.scope:
                    await daemon.serve(listen_clients=False, task_status=task_status)
            finally:
                sim.done.set()

        await self.nursery.start(run)
        self.daemons[name] = sim
        return sim

    def crash(self, name: str) -> None:
        """Kill a daemon abruptly: no goodbye, its channels break."""
        sim = self.daemons.pop(name)
        self._ending[name] = sim
        self.net.crash(name)
        sim.scope.cancel()

    async def stop(self, name: str) -> None:
        """Graceful shutdown (SIGTERM): entries removed and peers told before links close."""
        sim = self.daemons.pop(name)
        self._ending[name] = sim
        sim.daemon.shutdown()
        with trio.move_on_after(5):
            while not sim.scope.cancel_called and sim.daemon.running:
                await trio.sleep(0.01)
        sim.scope.cancel()

    def client(self, name: str, user: str) -> FakeClient:
        daemon = self.daemons[name].daemon
        return FakeClient(daemon.node, user, daemon.sessions)

    def visible(self, name: str) -> dict[tuple[str, str, str], Any]:
        """(room, user, session) -> meta of everything daemon ``name`` shows."""
        return {key: meta for key, (meta, _region) in self.node(name).state.visible().items()}

    def node(self, name: str) -> Node:
        return self.daemons[name].node

    async def settle(self, seconds: float = 5.0) -> None:
        """Let virtual time pass (gossip ticks, digests, heartbeats)."""
        await trio.sleep(seconds)
