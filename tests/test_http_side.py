"""The HTTP side port over real sockets: endpoints, metrics, status, static files, abuse."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import h11
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from presenced.certs import init_ca, issue_node_cert
from presenced.client import connect
from presenced.config import HostPort
from presenced.server.daemon import Daemon
from presenced.server.http_side import HttpSide, websocket_host

HTTP = HostPort("127.0.0.1", 0)


async def raw(port: int, data: bytes, *, timeout: float = 5) -> bytes:
    """Send ``data`` as is and read until the server closes."""
    with trio.fail_after(timeout):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            if data:
                await stream.send_all(data)
            received = b""
            while chunk := await stream.receive_some(65536):
                received += chunk
            return received


async def get(
    port: int, target: str, *, method: str = "GET", host: str = "127.0.0.1"
) -> tuple[int, dict[str, str], bytes]:
    """One request through an h11 client: (status, headers, body)."""
    client = h11.Connection(h11.CLIENT)
    request = h11.Request(method=method, target=target, headers=[("Host", host)])
    data = client.send(request) + client.send(h11.EndOfMessage())
    client.receive_data(await raw(port, data))
    client.receive_data(b"")
    status, headers, body = 0, {}, b""
    while True:
        event = client.next_event()
        if isinstance(event, h11.Response):
            status = event.status_code
            headers = {k.decode(): v.decode() for k, v in event.headers}
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return status, headers, body


async def get_json(port: int, target: str) -> Any:
    status, headers, body = await get(port, target)
    assert status == 200 and headers["content-type"] == "application/json"
    return json.loads(body)


def metric_values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_health_ready_and_client_json(start_daemon: Any) -> None:
    running = await start_daemon(http=HTTP, region="eu")
    port = running.daemon.http_port
    assert port is not None
    status, headers, body = await get(port, "/healthz")
    assert (status, body) == (200, b"ok\n")
    assert headers["connection"] == "close"
    assert headers["content-type"] == "text/plain; charset=utf-8"
    assert (await get(port, "/readyz"))[::2] == (200, b"ready\n")
    client = await get_json(port, "/client.json")
    websocket = f"ws://127.0.0.1:{running.daemon.client_port}/"
    assert client == {"region": "eu", "node": "eu", "websocket": websocket}
    named = await get(port, "/client.json", host="presence.example.com:8400")
    assert json.loads(named[2])["websocket"].startswith("ws://presence.example.com:")
    status, headers, body = await get(port, "/status", method="HEAD")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 10


def test_websocket_host_from_the_host_header() -> None:
    assert websocket_host("example.com:8401", "127.0.0.1") == "example.com"
    assert websocket_host("example.com", "127.0.0.1") == "example.com"
    assert websocket_host("[::1]:8401", "127.0.0.1") == "[::1]"
    assert websocket_host("10.0.0.5:80", "127.0.0.1") == "10.0.0.5"
    for bad in (None, "", "a b:80", "evil.com/x:1", "::1:80", '"x"'):
        assert websocket_host(bad, "127.0.0.1") == "127.0.0.1"
    assert websocket_host(None, "0.0.0.0") == "127.0.0.1"
    assert websocket_host(None, "::1") == "[::1]"


async def test_ready_only_while_serving(start_daemon: Any, make_config: Any) -> None:
    daemon = Daemon(make_config(http=HTTP))
    side = HttpSide(daemon)
    starting = await side.respond("GET", "/readyz", {})
    assert (starting.status, starting.body) == (503, b"not ready: starting\n")
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.serve)
        assert (await side.respond("GET", "/readyz", {})).status == 200
        daemon.shutdown()
        stopping = await side.respond("GET", "/readyz", {})
        assert (stopping.status, stopping.body) == (503, b"not ready: shutting down\n")
    assert daemon.http_port is not None
    with pytest.raises(OSError):  # the side port closed with the daemon
        await trio.open_tcp_stream("127.0.0.1", daemon.http_port)


async def test_metrics_read_the_live_daemon(start_daemon: Any) -> None:
    running = await start_daemon(http=HTTP)
    port = running.daemon.http_port
    assert port is not None
    async with connect(running.url, user="ann") as ann:
        await ann.join("lobby", {"name": "Ann"})
        await ann.update("lobby", {"x": 1})
        await ann.ping()
        status, headers, body = await get(port, "/metrics")
        assert status == 200
        assert headers["content-type"].startswith("text/plain; version=0.0.4")
        values = metric_values(body.decode())
    assert all(name.startswith("presenced_") for name, _ in values)
    assert values[("presenced_connections", ())] == 1
    assert values[("presenced_rooms", ())] == 1
    assert values[("presenced_presences", ())] == 1
    assert values[("presenced_node_presences", (("node", "test"), ("region", "test")))] == 1
    assert values[("presenced_updates_in_total", ())] == 1
    assert values[("presenced_client_frames_in_total", ())] >= 4  # hello, join, update, ping
    assert values[("presenced_client_bytes_in_total", ())] > 100
    assert values[("presenced_client_frames_out_total", ())] >= 3
    assert values[("presenced_ready", ())] == 1
    assert values[("presenced_replicas", (("status", "up"),))] == 0
    assert values[("presenced_peer_links", ())] == 0
    for name in (
        "presenced_messages_sent_total",
        "presenced_messages_routed_total",
        "presenced_messages_stored_total",
        "presenced_messages_delivered_total",
        "presenced_diffs_flushed_total",
        "presenced_flush_duration_seconds_sum",
        "presenced_resyncs_total",
        "presenced_connections_opened_total",
    ):
        assert (name, ()) in values
    # The ticker has run (20 ms ticks): its wake-ups are in the histogram, +Inf counts all.
    ticks = values[("presenced_flush_duration_seconds_count", ())]
    assert ticks >= 1
    assert values[("presenced_flush_duration_seconds_bucket", (("le", "+Inf"),))] == ticks
    assert values[("presenced_flush_duration_seconds_bucket", (("le", "0.1"),))] <= ticks
    # A second scrape sees the connection gone: values are read at scrape time.
    with trio.fail_after(5):
        while True:
            values = metric_values((await get(port, "/metrics"))[2].decode())
            if values[("presenced_connections", ())] == 0:
                break
            await trio.sleep(0.01)
    assert values[("presenced_presences", ())] == 0


async def test_two_linked_daemons_report_peers_replicas_and_lag(
    start_daemon: Any, tmp_path: Path
) -> None:
    init_ca(tmp_path)
    tls: dict[str, dict[str, Path]] = {}
    for name in ("eu", "us"):
        cert, key = issue_node_cert(tmp_path, name, hosts=("127.0.0.1",))
        tls[name] = {"tls_cert": cert, "tls_key": key, "tls_ca": tmp_path / "ca.pem"}
    listen = HostPort("127.0.0.1", 0)
    us = await start_daemon(region="us", http=HTTP, peer_listen=listen, **tls["us"])
    peer = f"wss://127.0.0.1:{us.daemon.peer_port}"
    eu = await start_daemon(region="eu", http=HTTP, peers=(peer,), **tls["eu"])
    assert eu.daemon.http_port is not None and us.daemon.http_port is not None
    async with connect(us.url, user="bob") as bob:
        await bob.join("hq")
        with trio.fail_after(10):
            while True:
                status = await get_json(eu.daemon.http_port, "/status")
                replicas = {r["node"]: r for r in status["replicas"]}
                peers = status["peers"]
                if replicas.get("us", {}).get("entries") == 1 and peers and peers[0]["rtt_ms"]:
                    break
                await trio.sleep(0.05)
    [link] = status["peers"]
    assert link["node"] == "us" and link["region"] == "us" and link["state"] == "up"
    assert link["dialed"] is True and link["bytes_in"] > 0 and link["bytes_out"] > 0
    assert replicas["us"]["status"] == "up" and replicas["us"]["region"] == "us"
    assert replicas["us"]["seconds_since_heard"] < 2
    assert replicas["eu"]["local"] is True
    assert status["node"] == "eu" and status["region"] == "eu" and status["ready"] is True
    assert status["incarnation"] == eu.daemon.node.replica.incarnation
    assert status["listen"]["client"] == f"127.0.0.1:{eu.daemon.client_port}"
    assert status["listen"]["http"] == f"127.0.0.1:{eu.daemon.http_port}"
    assert status["listen"]["peer"] is None  # eu only dials
    assert status["configured_peers"] == [peer]
    assert status["routes"]["us"] == ["eu", "us"]
    assert 0 <= status["uptime_s"] < 60
    values = metric_values((await get(eu.daemon.http_port, "/metrics"))[2].decode())
    assert values[
        ("presenced_peer_link_up", (("dialed", "true"), ("peer", "us"), ("region", "us")))
    ]
    assert values[("presenced_peer_rtt_seconds", (("peer", "us"),))] > 0
    assert values[("presenced_peer_bytes_in_total", (("peer", "us"),))] > 0
    assert values[("presenced_replicas", (("status", "up"),))] == 1
    assert 0 <= values[("presenced_gossip_lag_seconds", (("node", "us"), ("region", "us")))] < 2
    us_status = await get_json(us.daemon.http_port, "/status")
    assert us_status["peers"][0]["dialed"] is False


@pytest.fixture
def web_root(tmp_path: Path) -> Path:
    root = tmp_path / "web"
    (root / "sub").mkdir(parents=True)
    (root / "index.html").write_text("<!doctype html><title>presenced</title>")
    (root / "app.js").write_text("console.log('hi')")
    (root / "style.css").write_text("body{}")
    (root / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (root / "logo.svg").write_text("<svg/>")
    (root / "data.json").write_text("{}")
    (root / ".hidden").write_text("no")
    (root / "sub" / "note.txt").write_text("note")
    (tmp_path / "secret.txt").write_text("SECRET")
    (root / "link.txt").symlink_to(tmp_path / "secret.txt")
    return root


async def test_static_files_with_content_types_and_no_traversal(
    start_daemon: Any, web_root: Path, nursery: trio.Nursery
) -> None:
    running = await start_daemon()
    side = HttpSide(running.daemon, web_root=web_root)
    port = await nursery.start(side.serve, HTTP)
    for target, content_type in [
        ("/", "text/html; charset=utf-8"),
        ("/index.html", "text/html; charset=utf-8"),
        ("/app.js", "text/javascript; charset=utf-8"),
        ("/style.css", "text/css; charset=utf-8"),
        ("/logo.png", "image/png"),
        ("/logo.svg", "image/svg+xml"),
        ("/data.json", "application/json"),
        ("/sub/note.txt", "text/plain; charset=utf-8"),
        ("/app.js?v=2", "text/javascript; charset=utf-8"),
    ]:
        status, headers, _ = await get(port, target)
        assert (status, headers["content-type"]) == (200, content_type), target
        assert headers["x-content-type-options"] == "nosniff"
    assert (await get(port, "/logo.png"))[2] == b"\x89PNG\r\n\x1a\n"
    for target in [
        "/../secret.txt",
        "/%2e%2e/secret.txt",
        "/..%2fsecret.txt",
        "/sub/../../secret.txt",
        "/sub/%2e%2e/%2e%2e/secret.txt",
        "//etc/passwd",
        "/%2fetc/passwd",
        "/sub/..%5c..%5csecret.txt",
        "/.hidden",
        "/link.txt",
        "/missing.html",
        "/sub/",
        "/sub",
        "/index.html%00.js",
        "/%ff",
    ]:
        request = f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        answer = await raw(port, request)
        status_line = answer.split(b"\r\n")[0]
        assert status_line in (b"HTTP/1.1 404 Not Found", b"HTTP/1.1 400 Bad Request"), target
        assert b"SECRET" not in answer and b"root:" not in answer, target


async def test_bad_requests_get_errors_and_do_not_disturb_others(
    start_daemon: Any, nursery: trio.Nursery
) -> None:
    running = await start_daemon()
    side = HttpSide(running.daemon, request_timeout=0.5, max_connections=8)
    port = await nursery.start(side.serve, HTTP)
    post = b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
    answer = await raw(port, post)
    assert answer.startswith(b"HTTP/1.1 405 Method Not Allowed\r\n")
    assert b"\r\nAllow: GET, HEAD\r\n" in answer
    assert (await raw(port, b"\x16\x03\x01garbage\r\n\r\n")).startswith(b"HTTP/1.1 400 Bad Request")
    huge = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n"
    assert (await raw(port, huge)).startswith(b"HTTP/1.1 431 ")
    body = b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"x" * 100000
    assert (await raw(port, body)).startswith(b"HTTP/1.1 413 ")
    # A client that connects and says nothing is dropped after the request timeout, and one
    # that sends half a request gets 408; meanwhile others are served at once.
    silent = await trio.open_tcp_stream("127.0.0.1", port)
    half = await trio.open_tcp_stream("127.0.0.1", port)
    await half.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
    with trio.fail_after(0.4):
        assert (await get(port, "/healthz"))[0] == 200
    with trio.fail_after(3):
        assert await silent.receive_some(100) == b""
        assert (await half.receive_some(1000)).startswith(b"HTTP/1.1 408 ")
    await silent.aclose()
    await half.aclose()
    # Past max_connections, new connections are closed at once; the server recovers after.
    hogs = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(8)]
    await trio.sleep(0.05)
    assert await raw(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n") == b""
    for hog in hogs:
        await hog.aclose()
    with trio.fail_after(2):
        while True:
            try:
                if (await get(port, "/healthz"))[0] == 200:
                    break
            except h11.RemoteProtocolError:
                await trio.sleep(0.02)


async def test_unknown_path_is_404_and_http_1_0_works(start_daemon: Any) -> None:
    running = await start_daemon(http=HTTP)
    port = running.daemon.http_port
    assert port is not None
    assert (await get(port, "/nope"))[0] == 404
    answer = await raw(port, b"GET /healthz HTTP/1.0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"\r\n\r\nok\n")


@pytest.mark.slow
async def test_peers_without_a_direct_link_are_relayed_then_down(
    start_daemon: Any, make_config: Any, tmp_path: Path
) -> None:
    """A line eu - us - ap: eu lists ap as relayed (heard through us, no link of its own);
    when ap dies without a goodbye, eu lists it as down. Metrics say the same."""
    init_ca(tmp_path)
    tls: dict[str, dict[str, Path]] = {}
    for name in ("eu", "us", "ap"):
        cert, key = issue_node_cert(tmp_path, name, hosts=("127.0.0.1",))
        tls[name] = {"tls_cert": cert, "tls_key": key, "tls_ca": tmp_path / "ca.pem"}
    liveness = {"down_after_s": 1.0, "purge_after_s": 30.0}
    listen = HostPort("127.0.0.1", 0)
    us = await start_daemon(region="us", peer_listen=listen, **liveness, **tls["us"])
    peer = (f"wss://127.0.0.1:{us.daemon.peer_port}",)
    eu = await start_daemon(region="eu", http=HTTP, peers=peer, **liveness, **tls["eu"])
    port = eu.daemon.http_port
    assert port is not None

    async def peers_of_eu() -> dict[str, dict[str, Any]]:
        return {p["node"]: p for p in (await get_json(port, "/status"))["peers"]}

    async def wait_for(node: str, state: str) -> dict[str, dict[str, Any]]:
        with trio.fail_after(10):
            while (peers := await peers_of_eu()).get(node, {}).get("state") != state:
                await trio.sleep(0.05)
        return peers

    async with trio.open_nursery() as ap_nursery:
        ap = Daemon(make_config(region="ap", peers=peer, **liveness, **tls["ap"]))
        await ap_nursery.start(ap.serve)
        # A region is learnt with the node's first presence delta.
        async with connect(f"ws://127.0.0.1:{ap.client_port}", user="cho") as cho:
            await cho.join("hq")
            with trio.fail_after(10):
                while (await peers_of_eu()).get("ap", {}).get("region") != "ap":
                    await trio.sleep(0.05)
        peers = await wait_for("ap", "relayed")
        assert peers["us"]["state"] == "up" and peers["us"]["dialed"] is True
        assert peers["ap"] == {
            "node": "ap",
            "region": "ap",
            "replica": str(ap.node.replica),
            "state": "relayed",
            "rtt_ms": None,
            "dialed": None,
            "bytes_in": None,
            "bytes_out": None,
        }
        values = metric_values((await get(port, "/metrics"))[2].decode())
        ap_link = (
            "presenced_peer_link_up",
            (("dialed", "false"), ("peer", "ap"), ("region", "ap")),
        )
        assert values[ap_link] == 0
        assert values[("presenced_peer_links", ())] == 1
        ap_nursery.cancel_scope.cancel()  # a crash: no goodbye, its links just break
    peers = await wait_for("ap", "down")
    assert peers["us"]["state"] == "up"
    values = metric_values((await get(port, "/metrics"))[2].decode())
    assert values[ap_link] == 0
    assert values[("presenced_replicas", (("status", "down"),))] == 1
