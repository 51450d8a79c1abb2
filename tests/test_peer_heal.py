"""A heal over real sockets: three daemons in a line, mutual TLS between them on 127.0.0.1,
and clients that speak the client protocol of docs/protocol.md with trio-websocket directly
(not presenced.client), recording every frame they receive."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from presenced.certs import init_ca, issue_node_cert
from presenced.config import Config, HostPort
from presenced.server.daemon import Daemon

#: Three real daemons over TLS, one restarted, and real seconds for the heal.
pytestmark = pytest.mark.slow

LIVENESS = {"down_after_s": 1.0, "purge_after_s": 30.0}


class Client:
    """One raw client connection: hello, join, and every frame it got, in order."""

    def __init__(self, ws: WebSocketConnection, session: str) -> None:
        self.ws = ws
        self.session = session
        self.frames: list[dict[str, Any]] = []

    async def read_forever(self) -> None:
        while True:
            self.frames.append(json.loads(await self.ws.get_message()))

    def shown(self, room: str) -> set[str]:
        """Sessions the client's own view of ``room`` holds now (state, then diffs)."""
        view: set[str] = set()
        for frame in self.frames:
            if frame.get("room") != room:
                continue
            if frame["type"] == "state":
                view = sessions_in(frame["presences"])
            elif frame["type"] == "diff":
                view |= sessions_in(frame["joins"]) | sessions_in(frame["updates"])
                view -= sessions_in(frame["leaves"])
        return view


def sessions_in(presences: dict[str, list[dict[str, Any]]]) -> set[str]:
    return {entry["session"] for entries in presences.values() for entry in entries}


async def connect(nursery: trio.Nursery, daemon: Daemon, user: str) -> Client:
    ws = await nursery.start(_serve_socket, f"ws://127.0.0.1:{daemon.client_port}")
    await ws.send_message(json.dumps({"type": "hello", "user": user, "ref": 1}))
    welcome = json.loads(await ws.get_message())
    assert welcome["type"] == "welcome", welcome
    client = Client(ws, welcome["session"])
    nursery.start_soon(client.read_forever)
    return client


async def _serve_socket(url: str, task_status: trio.TaskStatus[WebSocketConnection]) -> None:
    async with open_websocket_url(url) as ws:
        task_status.started(ws)
        await trio.sleep_forever()


async def join(client: Client, room: str, meta: dict[str, Any]) -> None:
    await client.ws.send_message(json.dumps({"type": "join", "room": room, "meta": meta}))


async def until(condition: Callable[[], bool], timeout: float = 10) -> None:
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.02)


async def test_a_restarted_middle_daemon_never_brings_back_a_session_that_left(
    nursery: trio.Nursery, make_config: Callable[..., Config], tmp_path: Path
) -> None:
    """eu — us — ap (us dials both). us crashes; ap goes down at eu; ann leaves on ap; us
    starts again (a new incarnation). eu's client sees bob (who stayed on ap) come back, and
    never ann: not even for the round trip it took anti-entropy to say she left."""
    init_ca(tmp_path)
    tls: dict[str, dict[str, Path]] = {}
    for name in ("eu", "us", "ap"):
        cert, key = issue_node_cert(tmp_path, name, hosts=("127.0.0.1",))
        tls[name] = {"tls_cert": cert, "tls_key": key, "tls_ca": tmp_path / "ca.pem"}
    listen = HostPort("127.0.0.1", 0)
    ends = {}
    for name in ("eu", "ap"):
        ends[name] = Daemon(make_config(region=name, peer_listen=listen, **LIVENESS, **tls[name]))
        await nursery.start(ends[name].serve)
    eu, ap = ends["eu"], ends["ap"]
    peers = tuple(f"wss://127.0.0.1:{d.peer_port}" for d in (eu, ap))

    async def start_us() -> tuple[Daemon, trio.CancelScope]:
        us = Daemon(make_config(region="us", peers=peers, **LIVENESS, **tls["us"]))
        scope = trio.CancelScope()

        async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with scope:
                await us.serve(task_status=task_status)

        await nursery.start(run)
        return us, scope

    _, us_scope = await start_us()
    watcher = await connect(nursery, eu, "obs")
    ann = await connect(nursery, ap, "ann")
    bob = await connect(nursery, ap, "bob")
    for client in (watcher, ann, bob):
        await join(client, "r0", {})
    await until(lambda: watcher.shown("r0") == {watcher.session, ann.session, bob.session})

    us_scope.cancel()  # a crash: no goodbye, its links just break
    await until(lambda: eu.node.liveness.status(ap.node.replica) == "down")
    await until(lambda: watcher.shown("r0") == {watcher.session})
    await ann.ws.send_message(json.dumps({"type": "leave", "room": "r0", "ref": 9}))
    await until(lambda: any(f.get("ref") == 9 for f in ann.frames))
    left_at = len(watcher.frames)

    await start_us()
    await until(lambda: watcher.shown("r0") == {watcher.session, bob.session})
    await trio.sleep(0.5)  # (the leave that used to follow the join: time for it to land)
    after = watcher.frames[left_at:]
    shown = [f for f in after if ann.session in sessions_in(f.get("joins", {}))]
    assert shown == [], f"eu was shown ann again after she left: {shown}"
    assert watcher.shown("r0") == {watcher.session, bob.session}
