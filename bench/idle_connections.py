"""Scale of one daemon: many idle connections, then one change to a very large room.

    python bench/idle_connections.py --connections 10000 --rooms 100 --big-room 1000 --idle-s 45

Starts `presenced run` as a subprocess on 127.0.0.1, opens N WebSocket connections (a lean
wsproto client, many per trio task tree in this one process), each saying hello and joining
one of R rooms; the first B of them also join one big room. Then it reports:

* the daemon's RSS growth per connection (VmRSS from /proc, after a GC settle);
* the daemon's CPU use while everyone is connected and idle (``--idle-s``, 45 s by
  default: long enough for every connection to be pinged about four times, since an idle
  connection is pinged after two thirds of ``--client-timeout`` quiet and each pong wakes
  its reader; the clients answer pings as browsers do), user and system time apart, and
  how many pings they answered; the window opens ``--settle-s`` after the last connect
  (5 s; 15 s or more: every connection has been pinged once before it);
* the time from one update in the big room until every one of its B members has received it
  (an upper bound: it includes this client process reading B sockets);
* the time from SIGTERM until the daemon has exited, everyone still connected (a graceful
  stop: a close frame to every client).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Ping, Request, TextMessage

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def cpu_s(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


class Lean:
    """A minimal client: handshake, JSON text frames, a reader that watches for a marker and
    answers pings (the daemon's liveness probe) as a browser does."""

    pongs = 0

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)

    async def open(self) -> None:
        await self.stream.send_all(self.ws.send(Request(host="127.0.0.1", target="/")))
        while True:
            self.ws.receive_data(await self.stream.receive_some(65536))
            if any(isinstance(e, AcceptConnection) for e in self.ws.events()):
                return

    async def send(self, message: dict[str, object]) -> None:
        await self.stream.send_all(self.ws.send(TextMessage(data=json.dumps(message))))

    async def read_until(self, marker: str, seen: trio.Event | None = None) -> None:
        buffer = ""
        while True:
            data = await self.stream.receive_some(65536)
            if not data:
                return
            self.ws.receive_data(data)
            for event in self.ws.events():
                if isinstance(event, Ping):
                    Lean.pongs += 1
                    await self.stream.send_all(self.ws.send(event.response()))
                elif isinstance(event, TextMessage):
                    buffer = (buffer + event.data)[-4096:]
                    if marker in buffer:
                        if seen is not None:
                            seen.set()
                        return


async def main(args: argparse.Namespace) -> dict[str, object]:
    port = free_port()
    daemon = subprocess.Popen(
        [sys.executable, "-m", "presenced", "run", "--allow-anonymous", "--log-level", "warning",
         "--listen", f"127.0.0.1:{port}", "--max-connections", str(args.connections + 10),
         "--client-timeout", str(args.client_timeout)],
        cwd=ROOT,
    )  # fmt: skip
    try:
        with trio.fail_after(20):
            while True:
                try:
                    (await trio.open_tcp_stream("127.0.0.1", port)).socket.close()
                    break
                except OSError:
                    await trio.sleep(0.1)
        await trio.sleep(1)
        base_rss = rss_kb(daemon.pid)
        received = [trio.Event() for _ in range(args.big_room)]
        clients: list[Lean] = []
        big: list[Lean] = []
        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            limiter = trio.CapacityLimiter(200)

            async def one(i: int) -> None:
                async with limiter:
                    client = Lean(await trio.open_tcp_stream("127.0.0.1", port))
                    await client.open()
                    await client.send({"type": "hello", "user": f"u{i}"})
                    await client.send({"type": "join", "room": f"room-{i % args.rooms}"})
                    if i < args.big_room:
                        await client.send({"type": "join", "room": "big", "meta": {"i": i}})
                    clients.append(client)
                    if i < args.big_room:
                        big.append(client)
                # Read from the start, as a browser does (a client that reads nothing, and so
                # answers no ping, is closed as dead after --client-timeout): the big room's
                # members until the marker, the others for good.
                if i < args.big_room:
                    await client.read_until('"marker":1', received[i])
                else:
                    await client.read_until("never appears")

            for i in range(args.connections):
                nursery.start_soon(one, i)
            while len(clients) < args.connections:
                await trio.sleep(0.2)
            connect_s = time.perf_counter() - started
            await trio.sleep(args.settle_s)  # join diffs delivered, daemon quiet
            rss = rss_kb(daemon.pid)
            cpu0 = cpu_s(daemon.pid)
            pongs0 = Lean.pongs
            await trio.sleep(args.idle_s)
            cpu1 = cpu_s(daemon.pid)
            idle_user, idle_sys = ((b - a) / args.idle_s for a, b in zip(cpu0, cpu1, strict=True))
            pongs = Lean.pongs - pongs0
            mover = big[0]  # writing while its own task reads is fine
            sent = time.perf_counter()
            await mover.send({"type": "update", "room": "big", "meta": {"marker": 1}})
            with trio.fail_after(30):
                for event in received:
                    await event.wait()
            fanout_ms = (time.perf_counter() - sent) * 1000
            # Graceful stop with everyone still connected: close frames to every client.
            stop = time.perf_counter()
            daemon.terminate()
            while daemon.poll() is None:
                if time.perf_counter() - stop > 60:
                    raise TimeoutError("the daemon did not stop within 60 s of SIGTERM")
                await trio.sleep(0.05)
            shutdown_s = time.perf_counter() - stop
            nursery.cancel_scope.cancel()
        return {
            "connections": args.connections,
            "rooms": args.rooms,
            "big_room": args.big_room,
            "connect_all_s": round(connect_s, 1),
            "daemon_rss_mb": round(rss / 1024, 1),
            "daemon_rss_per_connection_kb": round((rss - base_rss) / args.connections, 1),
            "idle_s": args.idle_s,
            "client_timeout_s": args.client_timeout,
            "daemon_idle_cpu_cores": round(idle_user + idle_sys, 4),
            "daemon_idle_cpu_user_sys_cores": [round(idle_user, 4), round(idle_sys, 4)],
            "pings_answered_per_s": round(pongs / args.idle_s, 1),
            "big_room_update_to_all_members_ms": round(fanout_ms, 1),
            "sigterm_to_exit_s": round(shutdown_s, 1),
        }
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--rooms", type=int, default=100)
    parser.add_argument("--big-room", type=int, default=1_000)
    parser.add_argument("--idle-s", type=float, default=45.0)
    parser.add_argument("--client-timeout", type=float, default=15.0)
    parser.add_argument(
        "--settle-s", type=float, default=5.0,
        help="wait after the last connect before measuring (longer: every connection has"
        " been pinged once before the idle window)",
    )  # fmt: skip
    print(json.dumps(trio.run(main, parser.parse_args()), indent=2))
