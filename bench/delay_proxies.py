"""WAN delay proxies in a process of their own, for the benchmarks.

    python bench/delay_proxies.py --delay-ms 40 PORT [PORT ...]

For each PORT, listens on an ephemeral port of 127.0.0.1 and relays every connection to
127.0.0.1:PORT with ``--delay-ms`` each way (:func:`presenced.wan_delay.serve_delay_proxy`:
FIFO per direction, at most 64 chunks of 64 KiB in flight per direction). Once all are
listening it prints one line, the JSON list of their ports in the order given, and runs until
its standard input closes (the parent exited or closed the pipe), SIGTERM or SIGINT.

Running them here rather than in the bench process keeps their work off the event loop that
timestamps the messages: the bench then measures the daemons and the links, not itself.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from presenced.wan_delay import serve_delay_proxy


async def _until_stdin_closes() -> None:
    stdin = trio.lowlevel.FdStream(sys.stdin.fileno())
    while await stdin.receive_some(4096):
        pass


async def _until_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            return


async def main(ports: list[int], delay: float) -> None:
    async with trio.open_nursery() as nursery:
        listening = [
            await nursery.start(serve_delay_proxy, "127.0.0.1", port, delay) for port in ports
        ]
        print(json.dumps(listening), flush=True)
        for watch in (_until_stdin_closes, _until_signal):
            nursery.start_soon(_then_stop, watch, nursery.cancel_scope)


async def _then_stop(watch: Callable[[], Awaitable[None]], scope: trio.CancelScope) -> None:
    await watch()
    scope.cancel()


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--delay-ms", type=float, required=True, help="one-way delay")
    parser.add_argument("ports", type=int, nargs="+", help="upstream ports on 127.0.0.1")
    args = parser.parse_args()
    if args.delay_ms < 0:
        parser.error("--delay-ms must not be negative")
    trio.run(main, args.ports, args.delay_ms / 1000)


if __name__ == "__main__":
    cli()
