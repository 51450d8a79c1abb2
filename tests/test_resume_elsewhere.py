"""Resuming a session on another daemon, of the same or another region.

Simulated clusters (trio MockClock) run the production daemons; every frame a watcher gets
is checked: the resumed session never leaves nor joins again. One test drives two real
daemons linked over mutual TLS with a raw WebSocket client written from docs/protocol.md.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Ping, Request, TextMessage

from presenced.certs import init_ca, issue_node_cert
from presenced.config import HostPort
from presenced.server.daemon import Daemon
from presenced.testing.cluster import Cluster, FakeClient
from presenced.testing.simnet import SimNetwork

GRACE_S = 10.0


async def mesh(nursery: trio.Nursery, **kwargs: Any) -> Cluster:
    """eu, us and ap, each linked to the other two."""
    cluster = Cluster(nursery, SimNetwork(seed=5, latency=0.04), **kwargs)
    await cluster.start("eu")
    await cluster.start("us", peers=["eu"])
    await cluster.start("ap", peers=["eu", "us"])
    await cluster.settle(3)
    return cluster


def watch(client: FakeClient, session: str, seen: list[str]) -> None:
    """Record every join or leave of ``session`` in any frame ``client`` gets."""

    def check(_: FakeClient, message: dict[str, Any]) -> None:
        if message["type"] == "diff":
            for kind in ("joins", "leaves"):
                for entries in message[kind].values():
                    seen.extend(kind for entry in entries if entry["session"] == session)

    client.on_message = check


async def moved_session(
    cluster: Cluster,
) -> tuple[FakeClient, dict[str, Any], list[FakeClient], list[str]]:
    """ann on eu in lobby with two rooms; watchers on us and ap; ann's connection drops."""
    ann = cluster.client("eu", "ann")
    welcome = ann.hello()
    ann.join("lobby", {"name": "Ann"})
    ann.join("side", {"x": 1})
    watchers = [cluster.client(name, f"w-{name}") for name in ("us", "ap")]
    for watcher in watchers:
        watcher.join("lobby")
    await cluster.settle(1)
    for watcher in watchers:
        assert watcher.sees("lobby")[("ann", welcome["session"])] == {"name": "Ann"}
    seen: list[str] = []
    for watcher in watchers:
        watch(watcher, welcome["session"], seen)
    ann.drop()
    await cluster.settle(1)
    return ann, welcome, watchers, seen


async def test_a_session_resumes_on_another_region_and_nobody_sees_it_leave(
    autojump_clock: object,
) -> None:
    async with trio.open_nursery() as nursery:
        cluster = await mesh(nursery, resume_grace_s=GRACE_S)
        _, welcome, watchers, seen = await moved_session(cluster)
        session = welcome["session"]

        again = cluster.client("us", "ann")
        back = again.hello(resume=welcome["resume"])
        assert back["resumed"] is True and back["session"] == session
        assert list(again.rooms) == ["lobby", "side"]
        assert again.sees("lobby")[("ann", session)] == {"name": "Ann"}
        assert again.sees("side")[("ann", session)] == {"x": 1}
        await cluster.settle(1)
        for watcher in watchers:
            assert watcher.view["lobby"]["ann"][session] == ({"name": "Ann"}, "us")

        # It is a member on us: it updates from there, and everyone sees the update.
        again.update("lobby", {"name": "Ann", "x": 7})
        await cluster.settle(1)
        for watcher in watchers:
            assert watcher.sees("lobby")[("ann", session)] == {"name": "Ann", "x": 7}

        # eu's grace runs out: its copy goes, the session stays everywhere.
        await cluster.settle(GRACE_S + 2)
        assert not cluster.daemons["eu"].daemon.sessions.detached
        assert cluster.node("eu").metrics.sessions_expired == 1
        for name in ("eu", "us", "ap"):
            assert cluster.visible(name)[("lobby", "ann", session)] == {"name": "Ann", "x": 7}
        for watcher in watchers:
            assert watcher.sees("lobby")[("ann", session)] == {"name": "Ann", "x": 7}
        assert seen == []
        assert cluster.node("us").metrics.sessions_resumed_elsewhere == 1

        # A leave on us is a leave everywhere (and the only one).
        again.leave("lobby")
        await cluster.settle(1)
        assert seen == ["leaves", "leaves"]
        for name in ("eu", "us", "ap"):
            assert ("lobby", "ann", session) not in cluster.visible(name)
        nursery.cancel_scope.cancel()


async def test_a_leave_after_a_resume_elsewhere_does_not_wait_for_the_old_grace(
    autojump_clock: object,
) -> None:
    async with trio.open_nursery() as nursery:
        cluster = await mesh(nursery, resume_grace_s=GRACE_S)
        _, welcome, _, seen = await moved_session(cluster)
        session = welcome["session"]
        again = cluster.client("ap", "ann")
        assert again.hello(resume=welcome["resume"])["resumed"] is True
        await cluster.settle(1)
        again.leave("lobby")
        await cluster.settle(1)  # eu still holds its detached copy: it follows the leave
        for name in ("eu", "us", "ap"):
            assert ("lobby", "ann", session) not in cluster.visible(name)
            assert ("side", "ann", session) in cluster.visible(name)
        assert seen.count("joins") == 0 and seen.count("leaves") == 2
        assert cluster.daemons["eu"].daemon.sessions.detached[session].rooms == ["side"]
        nursery.cancel_scope.cancel()


async def test_a_resume_elsewhere_after_the_grace_is_a_new_session(
    autojump_clock: object,
) -> None:
    async with trio.open_nursery() as nursery:
        cluster = await mesh(nursery, resume_grace_s=GRACE_S)
        _, welcome, _, seen = await moved_session(cluster)
        await cluster.settle(GRACE_S + 2)
        assert seen == ["leaves", "leaves"]
        again = cluster.client("us", "ann")
        back = again.hello(resume=welcome["resume"])
        assert back["resumed"] is False and back["session"] != welcome["session"]
        assert again.rooms == {}
        nursery.cancel_scope.cancel()


async def test_with_a_token_secret_the_token_is_checked_everywhere(
    autojump_clock: object,
) -> None:
    async with trio.open_nursery() as nursery:
        cluster = await mesh(nursery, resume_grace_s=GRACE_S, token_secret=b"s" * 32)
        _, welcome, _, seen = await moved_session(cluster)
        session = welcome["session"]
        forged = cluster.client("us", "ann")
        assert forged.hello(resume=f"{session}.AAAAAAAAAAAAAAAAAAAAAA")["resumed"] is False
        other = cluster.client("us", "mallory")
        assert other.hello(resume=welcome["resume"])["resumed"] is False
        again = cluster.client("us", "ann")
        assert again.hello(resume=welcome["resume"])["resumed"] is True
        await cluster.settle(GRACE_S + 2)
        assert seen == []
        nursery.cancel_scope.cancel()


async def test_a_resume_elsewhere_takes_over_a_connection_the_old_daemon_thinks_alive(
    autojump_clock: object,
) -> None:
    """The client saw its link die first and resumed on us; eu closes its stale connection
    when it hears of the resume (with a token secret, the resume was checked) and keeps
    the session for the grace; nobody sees a leave or a join."""
    async with trio.open_nursery() as nursery:
        cluster = await mesh(nursery, resume_grace_s=GRACE_S, token_secret=b"s" * 32)
        ann = cluster.client("eu", "ann")
        welcome = ann.hello()
        ann.join("lobby", {"name": "Ann"})
        watcher = cluster.client("ap", "w")
        watcher.join("lobby")
        await cluster.settle(1)
        seen: list[str] = []
        watch(watcher, welcome["session"], seen)
        again = cluster.client("us", "ann")
        assert again.hello(resume=welcome["resume"])["resumed"] is True
        await cluster.settle(1)
        assert ann.closed == (1001, "session resumed on another daemon")
        assert welcome["session"] in cluster.daemons["eu"].daemon.sessions.detached
        await cluster.settle(GRACE_S + 2)
        assert watcher.sees("lobby")[("ann", welcome["session"])] == {"name": "Ann"}
        assert seen == []
        nursery.cancel_scope.cancel()


# ------------------------------------------------------------------------------ real sockets


class Raw:
    """A client of docs/protocol.md on wsproto: JSON text frames, every message kept."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.messages: list[dict[str, Any]] = []

    @classmethod
    async def open(cls, nursery: trio.Nursery, port: int) -> Raw:
        client = cls(await trio.open_tcp_stream("127.0.0.1", port))
        await client.stream.send_all(client.ws.send(Request(host="127.0.0.1", target="/")))
        while not any(isinstance(e, AcceptConnection) for e in client.ws.events()):
            client.ws.receive_data(await client.stream.receive_some(65536))
        nursery.start_soon(client._read)
        return client

    async def _read(self) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while data := await self.stream.receive_some(65536):
                self.ws.receive_data(data)
                for event in self.ws.events():
                    if isinstance(event, TextMessage):
                        self.messages.append(json.loads(event.data))
                    elif isinstance(event, Ping):
                        await self.stream.send_all(self.ws.send(event.response()))

    async def send(self, message: dict[str, Any]) -> None:
        await self.stream.send_all(self.ws.send(TextMessage(data=json.dumps(message))))

    async def next(self, kind: str, **fields: Any) -> dict[str, Any]:
        with trio.fail_after(5):
            while True:
                for message in self.messages:
                    if message["type"] == kind and fields.items() <= message.items():
                        self.messages.remove(message)
                        return message
                await trio.sleep(0.01)

    def seen(self, kind: str, session: str) -> int:
        """How many times ``session`` was in a diff's ``kind`` (joins/leaves)."""
        return sum(
            entry["session"] == session
            for m in self.messages
            if m["type"] == "diff"
            for entries in m[kind].values()
            for entry in entries
        )

    def meta_of(self, room: str, session: str) -> Any:
        """The latest meta ``session`` had in ``room``, from state and diffs (None: gone)."""
        meta = None
        for m in self.messages:
            if m.get("room") != room or m["type"] not in ("state", "diff"):
                continue
            groups = [m["presences"]] if m["type"] == "state" else [m["joins"], m["updates"]]
            if m["type"] == "state":
                meta = None
            for group in groups:
                for entries in group.values():
                    for entry in entries:
                        if entry["session"] == session:
                            meta = entry["meta"]
            if m["type"] == "diff" and any(
                e["session"] == session for es in m["leaves"].values() for e in es
            ):
                meta = None
        return meta


@pytest.mark.slow
async def test_over_real_sockets_a_session_resumes_on_the_other_daemon(
    nursery: trio.Nursery, make_config: Any, tmp_path: Path
) -> None:
    """eu and us over mutual TLS, sharing a token secret. ann drops from eu (no close
    frame) and resumes on us: same session, its rooms and meta; the watcher on eu never sees
    it leave or join, and sees its update from us."""
    init_ca(tmp_path)
    daemons: dict[str, Daemon] = {}
    peers: tuple[str, ...] = ()
    for name in ("eu", "us"):
        cert, key = issue_node_cert(tmp_path, name, hosts=("127.0.0.1",))
        config = make_config(
            region=name,
            peer_listen=HostPort("127.0.0.1", 0),
            peers=peers,
            tls_cert=cert,
            tls_key=key,
            tls_ca=tmp_path / "ca.pem",
            token_secret=b"k" * 32,
            resume_grace_s=1.5,
            down_after_s=2.0,
        )
        daemons[name] = Daemon(config)
        await nursery.start(daemons[name].serve)
        peers = (f"wss://127.0.0.1:{daemons[name].peer_port}",)
    eu, us = daemons["eu"].client_port, daemons["us"].client_port
    assert eu is not None and us is not None

    watcher = await Raw.open(nursery, eu)
    await watcher.send({"type": "hello", "user": "obs", "ref": 1})
    await watcher.next("welcome")
    await watcher.send({"type": "join", "room": "lobby", "meta": {}, "ref": 2})
    await watcher.next("state", ref=2)
    ann = await Raw.open(nursery, eu)
    await ann.send({"type": "hello", "user": "ann", "ref": 1})
    welcome = await ann.next("welcome")
    session = welcome["session"]
    await ann.send({"type": "join", "room": "lobby", "meta": {"name": "Ann"}, "ref": 2})
    await ann.next("state", ref=2)
    with trio.fail_after(5):
        while watcher.meta_of("lobby", session) != {"name": "Ann"}:
            await trio.sleep(0.02)
    # us has ann too before she moves (the two daemons are linked)
    with trio.fail_after(5):
        while ("lobby", "ann", session) not in daemons["us"].node.state.visible():
            await trio.sleep(0.02)

    await ann.stream.aclose()  # a drop: no close frame
    again = await Raw.open(nursery, us)
    await again.send({"type": "hello", "resume": welcome["resume"], "ref": 1})
    back = await again.next("welcome")
    assert back["resumed"] is True and back["session"] == session and back["user"] == "ann"
    state = await again.next("state")
    assert state["room"] == "lobby" and "ref" not in state
    assert {e["session"]: e["meta"] for e in state["presences"]["ann"]} == {
        session: {"name": "Ann"}
    }
    await again.send({"type": "update", "room": "lobby", "meta": {"x": 1}})
    with trio.fail_after(5):
        while watcher.meta_of("lobby", session) != {"name": "Ann", "x": 1}:
            await trio.sleep(0.02)
    with trio.fail_after(5):  # eu's grace (1.5 s) runs out: its copy goes
        while daemons["eu"].sessions.detached:
            await trio.sleep(0.05)
    await trio.sleep(0.3)
    assert watcher.meta_of("lobby", session) == {"name": "Ann", "x": 1}
    assert watcher.seen("joins", session) == 1 and watcher.seen("leaves", session) == 0
