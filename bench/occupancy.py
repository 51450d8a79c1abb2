"""Occupancy of a huge room: what count-only watchers cost one daemon.

    python bench/occupancy.py --members 10000 --watchers 100 --churn-per-s 4 --phase-s 10

Starts `presenced run` as a subprocess on 127.0.0.1 and opens, with lean wsproto clients
(as in bench/idle_connections.py), ``--members`` sessions in one room ("big"), plus
``--watchers`` connections that are in no room. The members are held sessions: each joins
and then drops its connection without a close frame, so the daemon keeps it in the room for
``--resume-grace`` (an hour) with no socket. That is how a room looks to a daemon whose
members are connected elsewhere (other regions), and it keeps this one machine from
spending its CPU on 10,000 members' diffs and on the O(n²) joins that build such a room (the
bench stops the daemon with SIGSTOP while all members send their join, so it reads them in
one pass: every joiner's ``state`` is nearly empty, and the whole room is one flush). While
churn clients join and leave the big room at ``--churn-per-s`` changes a second, it runs
phases of ``--phase-s`` seconds alternately without and with the watchers watching the room
(a ``join`` with ``"view": "count"`` at the start of the phase, ``leave`` at its end), and
reports per phase:

* the daemon's CPU (user + system, /proc) per second and per tick (``tick_ms``);
* what one watcher received per second (occupancy frames and their bytes), and what one
  churn client in the room received per second (its diffs and states), for comparison;

and the difference between the phases with and without watchers: what watching costs. The
share is at most one small frame per watcher per tick, whatever the room's size. Each
churn join also gets the room's ``state`` (10,000 entries): that cost is the churn's, in
both phases.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Ping, Request, TextMessage

ROOT = Path(__file__).resolve().parents[1]
TICK_MS = 30


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Lean:
    """A minimal client: handshake, JSON text frames, a reader that answers pings and
    counts what it gets (occupancy frames apart)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.bytes_in = 0
        self.occupancy_frames = 0
        self.occupancy_bytes = 0
        self.last: dict[str, object] = {}

    async def open(self) -> None:
        await self.stream.send_all(self.ws.send(Request(host="127.0.0.1", target="/")))
        while True:
            self.ws.receive_data(await self.stream.receive_some(65536))
            if any(isinstance(e, AcceptConnection) for e in self.ws.events()):
                return

    async def send(self, message: dict[str, object]) -> None:
        await self.stream.send_all(self.ws.send(TextMessage(data=json.dumps(message))))

    async def parse(self) -> None:
        """Read frames, answer pings, count bytes and occupancy frames."""
        text = ""
        while data := await self.stream.receive_some(65536):
            self.bytes_in += len(data)
            self.ws.receive_data(data)
            for event in self.ws.events():
                if isinstance(event, Ping):
                    await self.stream.send_all(self.ws.send(event.response()))
                elif isinstance(event, TextMessage):
                    text += event.data
                    if not event.message_finished:
                        continue
                    if text.startswith('{"type":"occupancy"'):
                        self.occupancy_frames += 1
                        self.occupancy_bytes += len(text) + 2  # + the frame header
                        self.last = json.loads(text)
                    text = ""


async def main(args: argparse.Namespace) -> dict[str, object]:
    port = free_port()
    total = args.members + args.watchers + args.churners
    daemon = subprocess.Popen(
        [sys.executable, "-m", "presenced", "run", "--allow-anonymous", "--log-level", "warning",
         "--listen", f"127.0.0.1:{port}", "--max-connections", str(total + 10),
         "--client-timeout", "3600", "--tick-ms", str(TICK_MS), "--resume-grace", "3600"],
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
        members: list[Lean] = []
        watchers: list[Lean] = []
        churners: list[Lean] = []
        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            limiter = trio.CapacityLimiter(200)

            async def one(i: int) -> None:
                async with limiter:
                    client = Lean(await trio.open_tcp_stream("127.0.0.1", port))
                    await client.open()
                    await client.send({"type": "hello", "user": f"u{i}"})
                    if i < args.members:
                        members.append(client)
                    elif i < args.members + args.watchers:
                        watchers.append(client)
                    else:
                        churners.append(client)
                if i >= args.members:
                    await client.parse()

            for i in range(total):
                nursery.start_soon(one, i)
            while len(members) + len(watchers) + len(churners) < total:
                await trio.sleep(0.2)
            connect_s = time.perf_counter() - started
            # One session stays in the room throughout, so the room's feed lives on: a joiner
            # then gets the published view (what was flushed), not a fresh copy of the room.
            keeper = churners[-1]
            await keeper.send({"type": "join", "room": "big", "meta": {"keeper": True}})
            await trio.sleep(2)  # every welcome sent (the members read none: nothing else)
            daemon.send_signal(signal.SIGSTOP)
            try:
                for i, member in enumerate(members):
                    await member.send({"type": "join", "room": "big", "meta": {"i": i}})
                    await member.stream.aclose()  # no close frame: held for the grace
            finally:
                daemon.send_signal(signal.SIGCONT)
            build = time.perf_counter()
            with trio.fail_after(600):  # the daemon read them all and is quiet again
                while True:
                    cpu0 = cpu_s(daemon.pid)
                    await trio.sleep(2)
                    if cpu_s(daemon.pid) - cpu0 < 0.2:
                        break
            build_s = time.perf_counter() - build

            async def churn() -> None:
                """Churn clients take turns joining and leaving the big room."""
                inside: list[Lean] = []
                gap_s = 1 / args.churn_per_s
                turn = 0
                while True:
                    if len(inside) < (len(churners) - 1) // 2 and turn % 2 == 0:
                        client = churners[len(inside)]
                        await client.send({"type": "join", "room": "big", "meta": {"c": turn}})
                        inside.append(client)
                    elif inside:
                        await inside.pop().send({"type": "leave", "room": "big"})
                    turn += 1
                    await trio.sleep(gap_s)

            nursery.start_soon(churn)
            await trio.sleep(2)
            phases: list[dict[str, object]] = []
            for phase in range(args.phases):
                watching = phase % 2 == 1
                if watching:
                    for watcher in watchers:
                        await watcher.send({"type": "join", "room": "big", "view": "count"})
                    await trio.sleep(1)  # the replies are in
                frames0 = [w.occupancy_frames for w in watchers]
                wbytes0 = [w.occupancy_bytes for w in watchers]
                mbytes0 = sum(c.bytes_in for c in churners)
                cpu0, t0 = cpu_s(daemon.pid), time.perf_counter()
                await trio.sleep(args.phase_s)
                elapsed = time.perf_counter() - t0
                cpu = (cpu_s(daemon.pid) - cpu0) / elapsed
                frames = [
                    (w.occupancy_frames - f) / elapsed
                    for w, f in zip(watchers, frames0, strict=True)
                ]
                wbytes = [
                    (w.occupancy_bytes - b) / elapsed
                    for w, b in zip(watchers, wbytes0, strict=True)
                ]
                phases.append(
                    {
                        "watchers_watching": len(watchers) if watching else 0,
                        "daemon_cpu_cores": round(cpu, 4),
                        "daemon_cpu_ms_per_tick": round(cpu * TICK_MS, 3),
                        "watcher_frames_per_s": round(statistics.mean(frames), 1),
                        "watcher_bytes_per_s": round(statistics.mean(wbytes), 1),
                        "churner_bytes_per_s": round(
                            (sum(c.bytes_in for c in churners) - mbytes0) / elapsed / len(churners)
                        ),
                    }
                )
                if watching:
                    for watcher in watchers:
                        await watcher.send({"type": "leave", "room": "big"})
                    await trio.sleep(1)
            nursery.cancel_scope.cancel()
        off = [p["daemon_cpu_cores"] for p in phases if not p["watchers_watching"]]
        on = [p["daemon_cpu_cores"] for p in phases if p["watchers_watching"]]
        on_frames = [p["watcher_frames_per_s"] for p in phases if p["watchers_watching"]]
        return {
            "members": args.members,
            "watchers": args.watchers,
            "churn_per_s": args.churn_per_s,
            "tick_ms": TICK_MS,
            "connect_all_s": round(connect_s, 1),
            "room_built_s": round(build_s, 1),
            "last_counts": watchers[0].last if watchers else {},
            "phases": phases,
            "watching_cost_cores": round(statistics.mean(on) - statistics.mean(off), 4),
            "watching_cost_us_per_watcher_frame": round(
                (statistics.mean(on) - statistics.mean(off))
                * 1e6
                / max(1e-9, statistics.mean(on_frames) * args.watchers),
                2,
            ),
        }
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--members", type=int, default=10_000)
    parser.add_argument("--watchers", type=int, default=100)
    parser.add_argument("--churners", type=int, default=40)
    parser.add_argument("--churn-per-s", type=float, default=4.0)
    parser.add_argument("--phase-s", type=float, default=10.0)
    parser.add_argument("--phases", type=int, default=4)
    print(json.dumps(trio.run(main, parser.parse_args()), indent=2))
