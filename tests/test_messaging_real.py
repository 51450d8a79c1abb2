"""Send and fetch answers seen from outside: real daemons, real client sockets, and a raw
WebSocket client that speaks docs/protocol.md (not presenced/client.py).

The two-daemon test links its daemons over the simulated peer network (in real time), the
only way to blackhole a link (writes succeed, nothing arrives) without root.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from presenced.config import Config, HostPort
from presenced.server.daemon import Daemon
from presenced.server.messaging import messenger
from presenced.testing.simnet import SimNetwork

WAIT_S = 5


async def send(ws: WebSocketConnection, message: dict[str, Any]) -> None:
    await ws.send_message(json.dumps(message))


async def receive(ws: WebSocketConnection, kind: str | None = None) -> dict[str, Any]:
    """The next frame (of type ``kind``, skipping others)."""
    with trio.fail_after(WAIT_S):
        while True:
            frame = json.loads(await ws.get_message())
            if kind is None or frame["type"] == kind:
                return dict(frame)


async def hello(ws: WebSocketConnection, user: str) -> None:
    await send(ws, {"type": "hello", "user": user, "ref": 0})
    assert (await receive(ws))["type"] == "welcome"


def config(region: str, tmp_path: Path, **more: Any) -> Config:
    return Config(
        region=region,
        listen=HostPort("127.0.0.1", 0),
        allow_anonymous=True,
        data_dir=tmp_path / region,
        **more,
    )


async def test_a_fetch_answers_complete_over_a_real_socket(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    daemon = Daemon(config("solo", tmp_path))
    await nursery.start(daemon.serve)
    url = f"ws://127.0.0.1:{daemon.client_port}"
    async with open_websocket_url(url) as ann, open_websocket_url(url) as bob:
        await hello(ann, "ann")
        await hello(bob, "bob")
        await send(ann, {"type": "send", "ref": 1, "to": "carl", "data": "hi", "mode": "reliable"})
        assert (await receive(ann))["type"] == "stored"
        await send(ann, {"type": "send", "ref": 2, "to": "bob", "data": 1, "mode": "reliable"})
        assert (await receive(ann))["type"] == "stored"
        await send(bob, {"type": "fetch", "ref": 7})  # bob is in no room: nothing was pushed
        assert (await receive(bob))["data"] == 1
        assert await receive(bob) == {
            "type": "fetched",
            "ref": 7,
            "count": 1,
            "remaining": 0,
            "complete": True,
        }


@pytest.mark.slow
async def test_a_fast_send_into_a_blackholed_link_is_answered_timeout(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The mechanism, not the 5 s bound (tests/test_messaging_sim.py checks that in
    # virtual time): a shorter deadline keeps this test short.
    monkeypatch.setattr(messenger, "FAST_ANSWER_S", 1.0)
    net = SimNetwork(seed=1, latency=0.002)
    daemons = {}
    for name, peers in (("eu", ()), ("us", ("sim://eu",))):
        daemon = Daemon(
            config(name, tmp_path, peers=peers, peer_listen=HostPort("127.0.0.1", 0)),
            transport=net.transport(name, f"sim://{name}"),
        )
        await nursery.start(daemon.serve)
        daemons[name] = f"ws://127.0.0.1:{daemon.client_port}"
    async with open_websocket_url(daemons["eu"]) as ann, open_websocket_url(daemons["us"]) as bob:
        await hello(ann, "ann")
        await hello(bob, "bob")
        await send(bob, {"type": "join", "room": "r", "ref": 1})
        await send(ann, {"type": "join", "room": "r", "ref": 1})
        with trio.fail_after(WAIT_S):  # until ann's daemon knows where bob is
            while "bob" not in (await receive(ann, "diff"))["joins"]:
                pass
        await send(ann, {"type": "send", "ref": 2, "to": "bob", "data": "before"})
        assert (await receive(ann, "delivered"))["ref"] == 2
        net.set_loss("eu", "us", 1.0)  # the link stays open; nothing arrives any more
        started = trio.current_time()
        await send(ann, {"type": "send", "ref": 3, "to": "bob", "data": "into the hole"})
        error = await receive(ann, "error")
        assert error["ref"] == 3 and error["code"] == "timeout" and error["to"] == "bob"
        assert error["id"].startswith("eu.")
        assert 0.9 <= trio.current_time() - started < 2.5
