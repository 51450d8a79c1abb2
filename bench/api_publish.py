"""The server API's publish: requests per second on one daemon, and the time from the call
to delivery to a member in each of three regions.

    python bench/api_publish.py                        # no link delay: the daemons' own cost
    python bench/api_publish.py --delay-ms 40 --json out.json

Topology: a line eu — us — ap of `presenced run` processes with mutual TLS (every peer link
through bench/delay_proxies.py, each direction delayed by --delay-ms); eu serves the API on
its --http port. Members: one client per region in room "bench" (the trio client, in this
process, so one clock times the call and every delivery).

1. Throughput: --workers concurrent HTTP clients publish to "bench" on eu for --duration
   seconds, one request per connection (the side port answers ``Connection: close``).
   Reported: requests/s, the HTTP round trip p50/p99, and eu's CPU seconds per request.
2. Latency at light load: --count publishes at --rate per second; for each, the time from
   sending the request to the HTTP answer, and to the broadcast reaching the member in eu
   (the daemon called), us (one hop) and ap (two hops). Reported: p50/p99 of each.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from direct_messages import DelayProxies, cpu_seconds, free_port, percentile, wait_listening

from presenced.certs import init_ca, issue_node_cert
from presenced.client import PresenceClient, connect

KEY = "bench-api-key-" + "k" * 40


class Region:
    def __init__(self, name: str, root: Path, *, api: bool = False) -> None:
        self.name = name
        self.root = root
        self.client_port = free_port()
        self.peer_port = free_port()
        self.http_port = free_port() if api else None
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
            "--allow-anonymous",
            "--log-level", "warning",
        ]  # fmt: skip
        if self.http_port is not None:
            key = self.root / "api.key"
            key.write_text(KEY)
            key.chmod(0o600)
            args += ["--http", f"127.0.0.1:{self.http_port}", "--api-key-file", str(key)]
        if peers:
            args += ["--peers", ",".join(f"wss://127.0.0.1:{port}" for port in peers)]
        log = open(self.root / f"{self.name}.log", "ab")  # noqa: SIM115 - kept for the process
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.client_port}"

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


async def publish(port: int, body: dict[str, Any]) -> dict[str, Any]:
    """One POST /api/v1/publish over a fresh connection; the decoded answer."""
    data = json.dumps(body).encode()
    request = (
        b"POST /api/v1/publish HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Authorization: Bearer " + KEY.encode() + b"\r\n"
        b"Content-Type: application/json\r\nContent-Length: " + str(len(data)).encode()
        + b"\r\n\r\n" + data
    )  # fmt: skip
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        answer = b""
        while chunk := await stream.receive_some(65536):
            answer += chunk
    head, _, payload = answer.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"publish refused: {answer[:300]!r}")
    return json.loads(payload)  # type: ignore[no-any-return]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(percentile(values, 0.5) * 1000, 2),
        "p99_ms": round(percentile(values, 0.99) * 1000, 2),
        "n": len(values),
    }


async def throughput(port: int, pid: int, workers: int, duration_s: float) -> dict[str, Any]:
    times: list[float] = []
    deadline = time.perf_counter() + duration_s
    cpu_before = cpu_seconds(pid)

    async def worker() -> None:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            await publish(port, {"room": "bench", "event": "load", "data": {"n": len(times)}})
            times.append(time.perf_counter() - started)

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(workers):
            nursery.start_soon(worker)
    elapsed = time.perf_counter() - started
    cpu = cpu_seconds(pid) - cpu_before
    return {
        "workers": workers,
        "requests": len(times),
        "requests_per_s": round(len(times) / elapsed, 1),
        "http_round_trip": summary(times),
        "daemon_cpu_us_per_request": round(cpu / max(1, len(times)) * 1e6, 1),
    }


async def latency(
    port: int, members: dict[str, PresenceClient], rate: float, count: int
) -> dict[str, Any]:
    sent_at: dict[int, float] = {}
    answered: list[float] = []
    arrived: dict[str, list[float]] = {name: [] for name in members}

    async def receive(name: str, client: PresenceClient) -> None:
        while len(arrived[name]) < count:
            frame = await client.next_message("broadcast")
            if frame["event"] == "probe":
                arrived[name].append(time.perf_counter() - sent_at[frame["data"]["seq"]])

    async with trio.open_nursery() as nursery:
        for name, client in members.items():
            nursery.start_soon(receive, name, client)
        for seq in range(count):
            sent_at[seq] = started = time.perf_counter()
            await publish(port, {"room": "bench", "event": "probe", "data": {"seq": seq}})
            answered.append(time.perf_counter() - started)
            await trio.sleep(max(0.0, 1 / rate - (time.perf_counter() - started)))
        with trio.fail_after(30):
            while any(len(values) < count for values in arrived.values()):
                await trio.sleep(0.05)
    return {
        "http_answer": summary(answered),
        **{f"delivered_{name}": summary(values) for name, values in arrived.items()},
    }


async def drain(client: PresenceClient) -> None:
    """Read the load phase's broadcasts away (a member that reads nothing is closed)."""
    while True:
        await client.next_message()


async def main(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="presenced-api-") as tmp:
        root = Path(tmp)
        init_ca(root / "certs")
        for name in ("eu", "us", "ap"):
            issue_node_cert(root / "certs", name, hosts=("127.0.0.1",))
        eu, us, ap = Region("eu", root, api=True), Region("us", root), Region("ap", root)
        regions = [eu, us, ap]
        proxies: DelayProxies | None = None
        try:
            us.start([])
            proxies = DelayProxies([us.peer_port, us.peer_port], args.delay_ms)
            eu.start([proxies.ports[0]])
            ap.start([proxies.ports[1]])
            assert eu.http_port is not None and eu.process is not None
            for port in (eu.client_port, us.client_port, ap.client_port, eu.http_port):
                await wait_listening(port)
            async with (
                connect(eu.url, user="m-eu") as m_eu,
                connect(us.url, user="m-us") as m_us,
                connect(ap.url, user="m-ap") as m_ap,
            ):
                members = {"eu": m_eu, "us": m_us, "ap": m_ap}
                for client in members.values():
                    await client.join("bench")
                with trio.fail_after(30):  # until eu sees the other regions' members
                    while True:
                        answer = await publish(eu.http_port, {"room": "bench", "data": 0})
                        if answer["members_here"] == 1 and len(m_ap.presences("bench")) == 3:
                            break
                        await trio.sleep(0.2)
                await trio.sleep(1)
                results: dict[str, Any] = {"delay_ms_one_way_per_link": args.delay_ms}
                results["latency"] = await latency(eu.http_port, members, args.rate, args.count)
                async with trio.open_nursery() as nursery:
                    for client in members.values():
                        nursery.start_soon(drain, client)
                    results["throughput"] = await throughput(
                        eu.http_port, eu.process.pid, args.workers, args.duration
                    )
                    nursery.cancel_scope.cancel()
        finally:
            for region in regions:
                region.stop()
            if proxies is not None:
                proxies.stop()
    return results


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay per link")
    parser.add_argument("--rate", type=float, default=20.0, help="latency phase publishes/s")
    parser.add_argument("--count", type=int, default=200, help="latency phase publishes")
    parser.add_argument("--workers", type=int, default=8, help="concurrent HTTP clients")
    parser.add_argument("--duration", type=float, default=5.0, help="throughput phase seconds")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    results = trio.run(main, args)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    cli()
