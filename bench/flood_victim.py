"""A victim's update latency with and without a ping flooder beside it, on one daemon.

    python bench/flood_victim.py --seconds 10
    python bench/flood_victim.py --seconds 10 --daemon-tree ../main   # another checkout

Starts `presenced run` (default settings) as a subprocess on 127.0.0.1. A mover updates its
meta every ``--interval-ms`` with the time it sent it; a victim in the same room measures how
long each update took to reach it. That runs for ``--seconds`` alone, then for ``--seconds``
beside a flooder: a connection that says hello and then sends WebSocket pings (20,000 in one
write, then more in writes of 1,000) without ever reading. When the daemon closes it, the
flooder connects again after ``--reconnect-ms`` and floods again. Everything is bounded by
the two phases. Reported: p50, p99 and max of the victim's latency in each phase, how many
flooder connections there were, and the client closes the daemon counted, by code (from its
/metrics).

The clients are written from docs/protocol.md on wsproto (not presenced/client.py), in this
one process; the daemon runs in its own.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Ping, Request, TextMessage

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ping_frame() -> bytes:
    """A masked WebSocket ping with no payload (RFC 6455: opcode 0x9, FIN)."""
    return bytes([0x89, 0x80]) + os.urandom(4)


class Client:
    """Handshake, hello, JSON text frames out; events in."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.pending: list[object] = []

    @classmethod
    async def open(cls, port: int, user: str) -> Client:
        client = cls(await trio.open_tcp_stream("127.0.0.1", port))
        await client.stream.send_all(client.ws.send(Request(host="127.0.0.1", target="/")))
        while not any(isinstance(e, AcceptConnection) for e in await client.events()):
            pass
        await client.send({"type": "hello", "user": user, "ref": 0})
        while not any(isinstance(e, TextMessage) and "welcome" in e.data for e in client.pending):
            await client.events()
        client.pending.clear()
        return client

    async def send(self, message: dict[str, object]) -> None:
        await self.stream.send_all(self.ws.send(TextMessage(data=json.dumps(message))))

    async def events(self) -> list[object]:
        try:
            data = await self.stream.receive_some(1 << 16)
        except trio.BrokenResourceError:
            data = b""
        if not data:
            return [CloseConnection(code=1006)]
        self.ws.receive_data(data)
        events = list(self.ws.events())
        self.pending += events
        return events


class Bench:
    def __init__(self, port: int, interval_s: float) -> None:
        self.port = port
        self.interval_s = interval_s
        self.latencies_ms: list[float] = []
        self.floods = 0

    async def victim(self, client: Client) -> None:
        while True:
            for event in await client.events():
                if isinstance(event, TextMessage):
                    now = time.monotonic()
                    message = json.loads(event.data)
                    if message.get("type") == "diff":
                        for entry in message["updates"].get("mover", []):
                            self.latencies_ms.append((now - entry["meta"]["t"]) * 1000)
                elif isinstance(event, Ping):  # a daemon's liveness probe, answered
                    await client.stream.send_all(client.ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    raise RuntimeError(f"the victim was closed: {event.code}")

    async def mover(self, client: Client) -> None:
        while True:
            await client.send({"type": "update", "room": "r", "meta": {"t": time.monotonic()}})
            await trio.sleep(self.interval_s)

    async def flooder(self, reconnect_s: float) -> None:
        first, more = ping_frame() * 20_000, ping_frame() * 1_000
        while True:
            client = await Client.open(self.port, "flooder")
            self.floods += 1
            try:  # never read, until the daemon has hung up
                await client.stream.send_all(first)
                while True:
                    await client.stream.send_all(more)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            while not any(isinstance(e, CloseConnection) for e in await client.events()):
                pass  # what it said before hanging up
            await client.stream.aclose()
            await trio.sleep(reconnect_s)

    async def phase(self, seconds: float, flood: bool, reconnect_s: float) -> list[float]:
        self.latencies_ms = []
        async with trio.open_nursery() as nursery:
            if flood:
                nursery.start_soon(self.flooder, reconnect_s)
            await trio.sleep(seconds)
            nursery.cancel_scope.cancel()
        return self.latencies_ms


async def client_closes(http_port: int) -> dict[str, int]:
    """``presenced_client_closes_total`` by code, from the daemon's /metrics."""
    stream = await trio.open_tcp_stream("127.0.0.1", http_port)
    await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    body = b""
    while chunk := await stream.receive_some(1 << 16):
        body += chunk
    closes = {}
    for line in body.decode().splitlines():
        if line.startswith("presenced_client_closes_total{"):
            labels, value = line.rsplit(" ", 1)
            closes[labels.split('code="')[1].split('"')[0]] = int(float(value))
    return closes


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    pick = lambda q: round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)  # noqa: E731
    return {
        "samples": len(ordered),
        "p50_ms": round(statistics.median(ordered), 1),
        "p99_ms": pick(0.99),
        "max_ms": round(ordered[-1], 1),
    }


async def main(args: argparse.Namespace) -> dict[str, object]:
    port, http_port = free_port(), free_port()
    tree = Path(args.daemon_tree).resolve()
    daemon = subprocess.Popen(
        [sys.executable, "-m", "presenced", "run", "--allow-anonymous", "--log-level", "error",
         "--listen", f"127.0.0.1:{port}", "--http", f"127.0.0.1:{http_port}"],
        cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)},
    )  # fmt: skip
    try:
        with trio.fail_after(20):
            while True:
                try:
                    (await trio.open_tcp_stream("127.0.0.1", port)).socket.close()
                    break
                except OSError:
                    await trio.sleep(0.1)
        bench = Bench(port, args.interval_ms / 1000)
        victim, mover = await Client.open(port, "victim"), await Client.open(port, "mover")
        await victim.send({"type": "join", "room": "r", "ref": 1})
        await mover.send({"type": "join", "room": "r", "ref": 1, "meta": {"t": 0}})
        result: dict[str, object] = {"daemon_tree": str(tree)}
        with trio.fail_after(2 * args.seconds + 30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(bench.victim, victim)
                nursery.start_soon(bench.mover, mover)
                await trio.sleep(1)  # settle
                result["alone"] = summary(await bench.phase(args.seconds, False, 0))
                flooded = await bench.phase(args.seconds, True, args.reconnect_ms / 1000)
                result["beside_flooder"] = summary(flooded)
                result["flooder_connections"] = bench.floods
                result["client_closes_by_code"] = await client_closes(http_port)
                nursery.cancel_scope.cancel()
        return result
    finally:
        daemon.terminate()
        daemon.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each phase")
    parser.add_argument("--interval-ms", type=float, default=50.0, help="mover's update period")
    parser.add_argument("--reconnect-ms", type=float, default=500.0, help="flooder's pause")
    parser.add_argument("--daemon-tree", default=str(ROOT), help="checkout the daemon runs from")
    print(json.dumps(trio.run(main, parser.parse_args()), indent=2))
