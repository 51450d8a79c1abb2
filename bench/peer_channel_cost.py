"""CPU cost of one peer-link message, end to end, on this machine.

Two peer transports in one process (a dialler and an acceptor on 127.0.0.1, mutual TLS with
a throwaway CA) exchange gossip-sized messages one at a time: A sends, B receives and answers,
A receives. Each message therefore arrives on its own and wakes its reader, as a peer's
per-tick gossip does. The figure is process CPU (user + system) per message (both ends' work:
encode-free framing, TLS, WebSocket, task switches, the loopback syscalls).

    python bench/peer_channel_cost.py --messages 5000 --size 600

``--plain`` runs the same over plain WebSocket (no TLS) to show TLS's share.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import trio

from presenced.certs import init_ca, issue_node_cert
from presenced.server.peers.tls import TlsWebSocketTransport
from presenced.server.peers.tls_contexts import client_context, server_context
from presenced.server.peers.transport import PeerChannel


def transports(folder: Path, plain: bool) -> tuple[TlsWebSocketTransport, TlsWebSocketTransport]:
    if plain:
        return (
            TlsWebSocketTransport(allow_plain=True),
            TlsWebSocketTransport(allow_plain=True),
        )
    init_ca(folder)
    made = []
    for node in ("a", "b"):
        cert, key = issue_node_cert(folder, node, hosts=("127.0.0.1",))
        ca = folder / "ca.pem"
        made.append(
            TlsWebSocketTransport(
                server_ctx=server_context(cert, key, ca), client_ctx=client_context(cert, key, ca)
            )
        )
    return made[0], made[1]


async def measure(messages: int, size: int, plain: bool) -> None:
    payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    with tempfile.TemporaryDirectory() as tmp:
        dialler, acceptor = transports(Path(tmp), plain)

        async def echo(channel: PeerChannel) -> None:
            while True:
                await channel.send(await channel.receive())

        async with trio.open_nursery() as nursery, dialler.running():
            port = await nursery.start(acceptor.serve, echo)
            scheme = "ws" if plain else "wss"
            channel = await dialler.dial(f"{scheme}://127.0.0.1:{port}/")
            for _ in range(200):  # warm up
                await channel.send(payload)
                await channel.receive()
            cpu, wall = time.process_time(), time.perf_counter()
            for _ in range(messages):
                await channel.send(payload)
                await channel.receive()
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            await channel.aclose()
            nursery.cancel_scope.cancel()
    count = 2 * messages
    print(
        f"{'plain' if plain else 'tls'}: {count} messages of {size} B: "
        f"{cpu / count * 1e6:.1f} us CPU per message (send + receive), "
        f"{wall / count * 1e6:.1f} us wall"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--size", type=int, default=600)
    parser.add_argument("--plain", action="store_true")
    args = parser.parse_args()
    trio.run(measure, args.messages, args.size, args.plain)


if __name__ == "__main__":
    main()
