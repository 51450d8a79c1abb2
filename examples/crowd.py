#!/usr/bin/env python3
"""Play a crowd of moving cursors against a running presenced daemon.

Each of ``--clients`` connections joins ``--room`` and moves its cursor along its own smooth
Lissajous curve, sending ``--hz`` updates a second with ``x`` and ``y`` as fractions of the
floor (what the Virtual HQ page sends, so open the page on the same room to watch). One more
connection, the observer, counts the crowd's updates that reach it and how late they are,
and a line a second reports what was sent and what was delivered::

    presenced demo &                          # or: presenced run --allow-anonymous
    python examples/crowd.py ws://127.0.0.1:7401/ --clients 50 --hz 20 --duration 30

Delivered can be below sent: a room sends at most one diff per tick with the latest meta of
each session, so above one update per tick and session the extra ones are coalesced (by
design). The latency figures compare wall clocks, so they need the observer and the crowd
on one machine (they are) and mean little across machines without synchronized clocks.

Anonymous by default; for a daemon that requires tokens, give ``--token-secret-file`` and
the script mints one per client.
"""

from __future__ import annotations

import argparse
import colorsys
import math
import random
import statistics
import sys
import time
from pathlib import Path

import attrs
import trio
from trio_websocket import ConnectionClosed, HandshakeError

from presenced.auth import mint_token
from presenced.client import connect
from presenced.config import read_secret_file


@attrs.define
class Stats:
    joined: int = 0
    sent: int = 0
    delivered: int = 0
    failed: int = 0
    latencies_ms: list[float] = attrs.Factory(list)

    def take_latencies(self) -> list[float]:
        taken, self.latencies_ms = self.latencies_ms, []
        return taken


@attrs.frozen
class Path2D:
    """x(t), y(t) on a Lissajous curve inside the floor, with a margin."""

    a: float
    b: float
    phase: float
    period: float

    def at(self, t: float) -> tuple[float, float]:
        w = 2 * math.pi * t / self.period
        x = 0.5 + 0.42 * math.sin(self.a * w + self.phase)
        y = 0.5 + 0.42 * math.sin(self.b * w)
        return round(x, 4), round(y, 4)


def color_of(index: int, count: int) -> str:
    r, g, b = colorsys.hls_to_rgb(index / max(count, 1), 0.38, 0.7)
    return f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}"


def token_for(secret: bytes | None, user: str, room: str) -> str | None:
    if secret is None:
        return None
    return mint_token(secret, user, [room], ttl_s=3600, now=time.time())


async def walker(
    args: argparse.Namespace,
    index: int,
    secret: bytes | None,
    stats: Stats,
    stop_at: float,
    rng: random.Random,
) -> None:
    user = f"{args.prefix}-{index:03d}"
    ratios = [(1, 2), (3, 2), (3, 4), (5, 4), (2, 3), (1, 1)]
    a, b = ratios[index % len(ratios)]
    path = Path2D(a, b, rng.uniform(0, 2 * math.pi), rng.uniform(8, 16))
    period = 1 / args.hz
    try:
        async with connect(
            args.url, user=user, token=token_for(secret, user, args.room), client="crowd.py"
        ) as client:
            x, y = path.at(0)
            await client.join(
                args.room, {"name": user, "color": color_of(index, args.clients), "x": x, "y": y}
            )
            stats.joined += 1
            started = trio.current_time()
            tick = started + rng.uniform(0, period)  # spread the crowd over the period
            while tick < stop_at:
                await trio.sleep_until(tick)
                x, y = path.at(trio.current_time() - started)
                await client.update(args.room, {"x": x, "y": y, "t": round(time.time() * 1000, 1)})
                stats.sent += 1
                tick = max(tick + period, trio.current_time())  # never a burst to catch up
    except (OSError, HandshakeError, ConnectionClosed) as exc:
        stats.failed += 1
        print(f"{user}: {exc}", file=sys.stderr, flush=True)


async def observe(
    args: argparse.Namespace,
    secret: bytes | None,
    stats: Stats,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    user = f"{args.prefix}-observer"
    prefix = f"{args.prefix}-"
    async with connect(
        args.url, user=user, token=token_for(secret, user, args.room), client="crowd.py"
    ) as client:
        await client.join(args.room, {"name": user})
        task_status.started()
        async for message in client.messages():
            if message.get("type") != "diff" or message.get("room") != args.room:
                continue
            now_ms = time.time() * 1000
            for name, sessions in message["updates"].items():
                if not name.startswith(prefix):
                    continue
                stats.delivered += len(sessions)
                for entry in sessions:
                    sent_ms = entry["meta"].get("t")
                    if isinstance(sent_ms, int | float):
                        stats.latencies_ms.append(now_ms - sent_ms)


def latency_text(samples: list[float]) -> str:
    if len(samples) < 2:
        return ""
    samples.sort()
    p99 = samples[min(len(samples) - 1, math.ceil(0.99 * len(samples)) - 1)]
    return f"  latency p50 {statistics.median(samples):.1f} ms, p99 {p99:.1f} ms"


async def report(stats: Stats, started: float) -> None:
    last_sent = last_delivered = 0
    last = started
    while True:
        await trio.sleep(1)
        now = trio.current_time()
        span = now - last
        sent, delivered = stats.sent - last_sent, stats.delivered - last_delivered
        print(
            f"{now - started:6.1f} s  {stats.joined} clients  sent {sent / span:7.1f}/s"
            f"  delivered {delivered / span:7.1f} updates/s{latency_text(stats.take_latencies())}",
            flush=True,
        )
        last, last_sent, last_delivered = now, stats.sent, stats.delivered


async def run(args: argparse.Namespace, stats: Stats) -> None:
    secret = read_secret_file(args.token_secret_file) if args.token_secret_file else None
    rng = random.Random(args.seed)
    started = trio.current_time()
    stop_at = started + args.duration if args.duration > 0 else math.inf
    async with trio.open_nursery() as nursery:
        await nursery.start(observe, args, secret, stats)
        nursery.start_soon(report, stats, started)
        async with trio.open_nursery() as crowd:
            for index in range(args.clients):
                crowd.start_soon(walker, args, index, secret, stats, stop_at, rng)
                await trio.sleep(0.002)  # a gentle ramp: no thundering herd of handshakes
        await trio.sleep(0.2)  # the last diffs in flight
        nursery.cancel_scope.cancel()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Play a crowd of moving cursors against a presenced daemon.",
    )
    parser.add_argument(
        "url", nargs="?", default="ws://127.0.0.1:7400/", help="the daemon's WebSocket URL"
    )
    parser.add_argument("--clients", type=int, default=20, help="moving cursors (20)")
    parser.add_argument("--room", default="hq", help="room to join (hq, the page's default)")
    parser.add_argument("--hz", type=float, default=10.0, help="updates a second per cursor (10)")
    parser.add_argument(
        "--duration", type=float, default=30.0, help="seconds to run; 0: until Ctrl-C (30)"
    )
    parser.add_argument("--prefix", default="crowd", help="user ids are PREFIX-000, ... (crowd)")
    parser.add_argument("--seed", type=int, default=None, help="random seed for the paths")
    parser.add_argument(
        "--token-secret-file",
        type=Path,
        default=None,
        help="mint a token per client with this secret (for daemons without anonymous access)",
    )
    args = parser.parse_args(argv)
    if args.clients < 1:
        parser.error("--clients must be at least 1")
    if not 0 < args.hz <= 200:
        parser.error("--hz must be in (0, 200] (the daemon's default rate limit is 200/s)")
    if args.duration < 0:
        parser.error("--duration must be 0 (forever) or positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    stats = Stats()
    refused: BaseException | None = None
    try:
        trio.run(run, args, stats)
    except* KeyboardInterrupt:
        pass  # Ctrl-C: report what happened so far
    except* (OSError, HandshakeError) as group:
        refused = group.exceptions[0]
    while isinstance(refused, BaseExceptionGroup):
        refused = refused.exceptions[0]
    if refused is not None:
        reason = refused.__cause__ or refused.__context__ or refused
        print(f"crowd.py: cannot connect to {args.url}: {reason}", file=sys.stderr)
        return 1
    elapsed = time.monotonic() - started
    print(
        f"crowd: {stats.joined} clients, {elapsed:.1f} s: sent {stats.sent} updates"
        f" ({stats.sent / elapsed:.1f}/s), observer saw {stats.delivered}"
        f" ({stats.delivered / elapsed:.1f}/s), {stats.failed} clients failed",
        flush=True,
    )
    return 0 if stats.joined == args.clients and stats.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
