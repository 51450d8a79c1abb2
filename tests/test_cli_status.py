"""`presenced status URL` against a live daemon's side port, and its error handling."""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest
import trio
from click.testing import CliRunner, Result

from presenced import cli as cli_module
from presenced.cli_status import render, status_url
from presenced.config import HostPort


async def invoke(*args: str) -> Result:
    """Run the CLI in a thread, so the daemon in this trio run can answer it."""
    return await trio.to_thread.run_sync(
        lambda: CliRunner().invoke(cli_module.main, ["status", *args])
    )


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://127.0.0.1:8400", "http://127.0.0.1:8400/status"),
        ("http://127.0.0.1:8400/", "http://127.0.0.1:8400/status"),
        ("127.0.0.1:8400", "http://127.0.0.1:8400/status"),
        ("http://h:1/status", "http://h:1/status"),
        ("https://h/ops/", "https://h/ops/status"),
    ],
)
def test_status_url(url: str, expected: str) -> None:
    assert status_url(url) == expected


async def test_status_of_a_live_daemon(start_daemon: Any) -> None:
    running = await start_daemon(region="eu", http=HostPort("127.0.0.1", 0))
    base = f"http://127.0.0.1:{running.daemon.http_port}"
    result = await invoke(base)
    assert result.exit_code == 0, result.output
    first, listening, counts = result.output.splitlines()[:3]
    assert first.startswith(f"{running.daemon.node.replica}  region eu  version ")
    assert first.endswith("ready")
    assert listening.startswith(f"listening: client 127.0.0.1:{running.daemon.client_port}")
    assert counts == "connections 0  rooms 0  presences 0"
    assert "no peers" in result.output
    assert "(this daemon)" in result.output
    raw = await invoke(base + "/status", "--json")
    assert raw.exit_code == 0
    assert json.loads(raw.output)["region"] == "eu"
    not_status = await invoke(base + "/healthz")  # becomes /healthz/status: 404
    assert not_status.exit_code == 1
    assert not_status.output == f"Error: {base}/healthz/status answered 404 Not Found\n"


async def test_unreachable_daemon_is_one_line_and_exit_1() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        result = await invoke(f"127.0.0.1:{port}")
    assert result.exit_code == 1
    assert result.output == (
        f"Error: cannot reach http://127.0.0.1:{port}/status: Connection refused\n"
    )
    bad = await invoke("ftp://x/")
    assert (bad.exit_code, bad.output) == (1, "Error: not an http:// URL: 'ftp://x/'\n")


def test_render_peers_replicas_and_routes() -> None:
    doc = {
        "node": "eu",
        "replica": "eu#1",
        "region": "eu",
        "version": "1.0",
        "uptime_s": 3725.0,
        "ready": True,
        "listen": {"client": "0.0.0.0:7400", "peer": "0.0.0.0:7443", "http": None},
        "connections": 3,
        "rooms": 2,
        "presences": 5,
        "peers": [
            {
                "node": "us",
                "region": "us-east",
                "state": "up",
                "rtt_ms": 81.25,
                "dialed": True,
                "bytes_in": 2048,
                "bytes_out": 100,
            }
        ],
        "replicas": [
            {"replica": "eu#1", "region": "eu", "status": "up", "local": True, "entries": 2},
            {
                "replica": "us#7",
                "region": "us-east",
                "status": "down",
                "seconds_since_heard": 4.25,
                "entries": 3,
            },
        ],
        "messages": {"sent": 4, "routed": 1, "stored": 0, "delivered": 3, "errors": {"x": 1}},
        "routes": {"us": ["eu", "us"], "ap": ["eu", "us", "ap"]},
    }
    assert render(doc).splitlines() == [
        "eu#1  region eu  version 1.0  up 1h 2m  ready",
        "listening: client 0.0.0.0:7400  peer 0.0.0.0:7443  http -",
        "connections 3  rooms 2  presences 5",
        "direct messages: sent 4  routed 1  stored 0  delivered 3  errors x 1",
        "",
        "PEER  REGION   STATE  RTT      LINK    IN       OUT",
        "us    us-east  up     81.2 ms  dialed  2.0 KiB  100 B",
        "",
        "REPLICA             REGION   STATUS  HEARD  PRESENCES",
        "eu#1 (this daemon)  eu       up      -      2",
        "us#7                us-east  down    4.2s   3",
        "",
        "ROUTES",
        "  ap: eu -> us -> ap",
        "  us: eu -> us",
    ]


def test_render_peers_without_a_direct_link() -> None:
    """Nodes known only through another region, or down, are listed with a "-" link; with no
    link up the configured peers are named."""
    doc = {
        "node": "eu",
        "replica": "eu#1",
        "region": "eu",
        "ready": True,
        "configured_peers": ["wss://us.example:7443"],
        "peers": [
            {"node": "ap", "region": "ap", "state": "relayed", "rtt_ms": None, "dialed": None},
            {"node": "us", "region": "us", "state": "down", "rtt_ms": None, "dialed": None},
        ],
    }
    lines = render(doc).splitlines()
    table = lines[lines.index("PEER  REGION  STATE    RTT  LINK  IN  OUT") :]
    assert table[1:5] == [
        "ap    ap      relayed  -    -     -   -",
        "us    us      down     -    -     -   -",
        "",
        "no peer links up (configured: wss://us.example:7443)",
    ]
    assert render({"node": "eu", "peers": []}).splitlines()[-1] == "no peers"
