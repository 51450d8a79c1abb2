"""Direct messages between three real daemon processes: latency over 1 and 2 hops, and
reliable messages per second to a recipient in another region.

    python bench/direct_messages.py                       # 40 ms one-way on each link
    python bench/direct_messages.py --delay-ms 0 --json out.json

Topology: a line eu — us — ap of `presenced run` processes with mutual TLS, every peer link
through a delay proxy (each direction delayed by --delay-ms) in a process of its own
(bench/delay_proxies.py, on 127.0.0.1, stopped with the bench), so the proxies' work does
not run on the bench's event loop. Clients: ann on eu, cat on us, bob on ap (the trio client
in presenced.client), all in this process, so one clock times both ends of every message.

1. Latency at light load: ann sends fast messages alternately to cat (1 hop) and bob
   (2 hops) at --rate per second; latency is send -> the recipient's `message` frame, and
   send -> ann's `delivered` receipt.
2. Reliable throughput: ann sends --count reliable messages to bob (2 hops), pipelined with
   at most --window not yet confirmed to ann; every daemon keeps its store in a data dir.
   Reported: messages per second end to end, and the CPU seconds of the three daemons per
   message. Every message must arrive exactly once, in order.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from presenced.certs import init_ca, issue_node_cert
from presenced.client import PresenceClient, connect

PROXIES = Path(__file__).resolve().with_name("delay_proxies.py")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Region:
    def __init__(self, name: str, root: Path) -> None:
        self.name = name
        self.root = root
        self.client_port = free_port()
        self.peer_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, peers: list[int]) -> None:
        certs = self.root / "certs"
        args = [
            sys.executable, "-m", "presenced", "run",
            "--region", self.name,
            "--listen", f"127.0.0.1:{self.client_port}",
            "--peer-listen", f"127.0.0.1:{self.peer_port}",
            "--tls-cert", str(certs / f"{self.name}.pem"),
            "--tls-key", str(certs / f"{self.name}.key"),
            "--tls-ca", str(certs / "ca.pem"),
            "--data-dir", str(self.root / f"data-{self.name}"),
            "--allow-anonymous",
            "--log-level", "warning",
            # One client sends the whole load: lift the per-connection rate limit (200/s).
            "--max-msg-rate", "1000000", "--msg-burst", "1000000",
        ]  # fmt: skip
        if peers:
            args += ["--peers", ",".join(f"wss://127.0.0.1:{port}" for port in peers)]
        log = open(self.root / f"{self.name}.log", "ab")  # noqa: SIM115 - kept for the process
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.client_port}"

    def cpu(self) -> float:
        assert self.process is not None
        return cpu_seconds(self.process.pid)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


class DelayProxies:
    """bench/delay_proxies.py as a child process: one proxy per upstream port."""

    def __init__(self, ports: list[int], delay_ms: float) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(PROXIES), "--delay-ms", str(delay_ms), *map(str, ports)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            self.stop()
            raise RuntimeError("the delay proxies did not start")
        self.ports: list[int] = json.loads(line)

    def cpu(self) -> float:
        return cpu_seconds(self.process.pid)

    def stop(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()  # it exits when its stdin closes
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


async def wait_listening(port: int) -> None:
    with trio.fail_after(20):
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.05)
            else:
                await stream.aclose()
                return


async def reachable(sender: PresenceClient, user: str) -> None:
    """Until a fast message to ``user`` is confirmed delivered (routes have converged)."""
    with trio.fail_after(30):
        while True:
            sent = await sender.send_direct(user, {"probe": True})
            with trio.move_on_after(1):
                await sent.wait(lambda s: s.settled)
            if user in sent.delivered:
                return
            await trio.sleep(0.2)


async def latency_phase(
    ann: PresenceClient, cat: PresenceClient, bob: PresenceClient, rate: float, count: int
) -> dict[str, Any]:
    arrivals: dict[str, list[float]] = {"cat": [], "bob": []}
    receipts: dict[str, list[float]] = {"cat": [], "bob": []}

    async def receive(client: PresenceClient, name: str, expected: int) -> None:
        while len(arrivals[name]) < expected:
            message = await client.next_message("message")
            data = message["data"]
            if isinstance(data, dict) and "t" in data:
                arrivals[name].append(time.perf_counter() - data["t"])

    async def confirm(sent: Any, name: str, started: float) -> None:
        await sent.wait(lambda s: s.settled)
        if name in sent.delivered:
            receipts[name].append(time.perf_counter() - started)

    with trio.fail_after(count / rate + 30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive, cat, "cat", count // 2)
            nursery.start_soon(receive, bob, "bob", count - count // 2)
            for i in range(count):
                name = "cat" if i % 2 == 0 else "bob"
                started = time.perf_counter()
                sent = await ann.send_direct(name, {"i": i, "t": started})
                nursery.start_soon(confirm, sent, name, started)
                await trio.sleep(1 / rate)

    def summary(values: list[float]) -> dict[str, float]:
        return {
            "n": len(values),
            "p50_ms": round(statistics.median(values) * 1000, 1),
            "p99_ms": round(percentile(values, 0.99) * 1000, 1),
            "max_ms": round(max(values) * 1000, 1),
        }

    return {
        "one_hop_message": summary(arrivals["cat"]),
        "two_hops_message": summary(arrivals["bob"]),
        "one_hop_delivered_receipt": summary(receipts["cat"]),
        "two_hops_delivered_receipt": summary(receipts["bob"]),
    }


async def throughput_phase(
    ann: PresenceClient,
    bob: PresenceClient,
    regions: list[Region],
    proxies: DelayProxies,
    count: int,
    window: int,
) -> dict[str, Any]:
    """Pipelined reliable sends, at most ``window`` not yet confirmed to the sender (the
    origin keeps each one pending until then, and refuses more than 1000 per recipient)."""
    received: list[int] = []
    confirmed = 0
    refused = 0
    progress = trio.Event()

    def step() -> None:
        nonlocal progress
        progress.set()
        progress = trio.Event()

    async def receive() -> None:
        while len(received) < count:
            message = await bob.next_message("message")
            data = message["data"]
            if isinstance(data, dict) and "n" in data:
                received.append(data["n"])

    async def confirmations() -> None:
        nonlocal confirmed, refused
        while confirmed + refused < count:
            frame = await ann.next_message()
            if frame["type"] == "delivered":
                confirmed += 1
            elif frame["type"] == "error":
                refused += 1
            step()

    cpu_before = [region.cpu() for region in regions]
    proxies_before = proxies.cpu()
    bench_before = time.process_time()
    started = time.perf_counter()
    with trio.fail_after(300):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            nursery.start_soon(confirmations)
            for n in range(count):
                while n - confirmed - refused >= window:
                    await progress.wait()
                await ann.send({"type": "send", "to": "bob", "data": {"n": n}, "mode": "reliable"})
    elapsed = time.perf_counter() - started
    cpu = [region.cpu() - before for region, before in zip(regions, cpu_before, strict=True)]
    return {
        "messages": count,
        "window": window,
        "seconds": round(elapsed, 2),
        "messages_per_second": round(count / elapsed),
        "daemon_cpu_us_per_message": round(sum(cpu) / count * 1e6, 1),
        "daemon_cpu_us_per_message_each": {
            region.name: round(seconds / count * 1e6, 1)
            for region, seconds in zip(regions, cpu, strict=True)
        },
        "daemon_cpu_share_of_wall": {
            region.name: round(seconds / elapsed, 2)
            for region, seconds in zip(regions, cpu, strict=True)
        },
        "proxies_cpu_us_per_message": round((proxies.cpu() - proxies_before) / count * 1e6, 1),
        "bench_cpu_us_per_message": round((time.process_time() - bench_before) / count * 1e6, 1),
        "refused": refused,
        "in_order_exactly_once": received == list(range(count)),
        "duplicates_dropped_by_client": bob.duplicates,
    }


async def main(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="presenced-dm-") as tmp:
        root = Path(tmp)
        init_ca(root / "certs")
        for name in ("eu", "us", "ap"):
            issue_node_cert(root / "certs", name, hosts=("127.0.0.1",))
        eu, us, ap = (Region(name, root) for name in ("eu", "us", "ap"))
        regions = [eu, us, ap]
        proxies: DelayProxies | None = None
        try:
            us.start([])
            # Both links go to us's peer port: eu dials through one proxy, ap the other.
            proxies = DelayProxies([us.peer_port, us.peer_port], args.delay_ms)
            eu.start([proxies.ports[0]])
            ap.start([proxies.ports[1]])
            for region in regions:
                await wait_listening(region.client_port)
            async with (
                connect(eu.url, user="ann") as ann,
                connect(us.url, user="cat") as cat,
                connect(ap.url, user="bob") as bob,
            ):
                for client in (ann, cat, bob):
                    await client.join("bench", {"name": client.user})
                await reachable(ann, "cat")
                await reachable(ann, "bob")
                results = {
                    "delay_ms_one_way_per_link": args.delay_ms,
                    "latency": await latency_phase(ann, cat, bob, args.rate, args.messages),
                    "reliable": await throughput_phase(
                        ann, bob, regions, proxies, args.count, args.window
                    ),
                }
        finally:
            for region in regions:
                region.stop()
            if proxies is not None:
                proxies.stop()
    return results


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--delay-ms", type=float, default=40.0, help="one-way delay per link")
    parser.add_argument("--rate", type=float, default=20.0, help="latency phase messages/s")
    parser.add_argument("--messages", type=int, default=400, help="latency phase messages")
    parser.add_argument("--count", type=int, default=5000, help="reliable messages to send")
    parser.add_argument("--window", type=int, default=500, help="reliable messages in flight")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    results = trio.run(main, args)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    cli()
