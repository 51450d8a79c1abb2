"""The server API over real HTTP against a real daemon, with raw WebSocket clients (written
from docs/protocol.md) on the other side: every call, bad keys, bad bodies, oversize bodies."""

from __future__ import annotations

import contextlib
import json
from contextlib import AsyncExitStack
from typing import Any

import h11
import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from presenced.config import HostPort

KEY = "k" * 40
HTTP = HostPort("127.0.0.1", 0)
WAIT = 5


async def call(
    port: int,
    path: str,
    body: Any = None,
    *,
    key: str | None = KEY,
    method: str = "POST",
    raw_body: bytes | None = None,
    headers: list[tuple[str, str]] | None = None,
) -> tuple[int, dict[str, str], Any]:
    """One HTTP request through an h11 client: (status, headers, decoded JSON body)."""
    data = raw_body if raw_body is not None else b"" if body is None else json.dumps(body).encode()
    head = [("Host", "127.0.0.1"), ("Content-Type", "application/json")]
    if key is not None:
        head.append(("Authorization", f"Bearer {key}"))
    head += headers or []
    if method == "POST":
        head.append(("Content-Length", str(len(data))))
    client = h11.Connection(h11.CLIENT)
    out = client.send(h11.Request(method=method, target=path, headers=head))
    if method == "POST":
        out += client.send(h11.Data(data=data))
    out += client.send(h11.EndOfMessage())
    with trio.fail_after(WAIT):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            with contextlib.suppress(trio.BrokenResourceError):  # answered (413) early
                await stream.send_all(out)
            received = b""
            while chunk := await stream.receive_some(65536):
                received += chunk
    client.receive_data(received)
    client.receive_data(b"")
    status, answer_headers, answer = 0, {}, b""
    while True:
        event = client.next_event()
        if isinstance(event, h11.Response):
            status = event.status_code
            answer_headers = {k.decode(): v.decode() for k, v in event.headers}
        elif isinstance(event, h11.Data):
            answer += event.data
        elif isinstance(event, h11.EndOfMessage):
            break
    if answer_headers.get("content-type") != "application/json":
        return status, answer_headers, answer
    return status, answer_headers, json.loads(answer)


async def member(
    stack: AsyncExitStack, url: str, user: str, room: str | None = "lobby"
) -> WebSocketConnection:
    """A raw client (closed with ``stack``): hello, and join ``room``."""
    ws = await stack.enter_async_context(open_websocket_url(url))
    await ws.send_message(json.dumps({"type": "hello", "user": user}))
    assert (await recv(ws))["type"] == "welcome"
    if room is not None:
        await ws.send_message(json.dumps({"type": "join", "room": room, "meta": {"n": user}}))
        assert (await recv(ws, "state"))["room"] == room
    return ws


async def recv(ws: WebSocketConnection, kind: str | None = None) -> dict[str, Any]:
    """The next frame (of type ``kind``, skipping others)."""
    with trio.fail_after(WAIT):
        while True:
            frame = json.loads(await ws.get_message())
            if kind is None or frame["type"] == kind:
                return frame  # type: ignore[no-any-return]


async def closed_with(ws: WebSocketConnection) -> tuple[int, str, list[dict[str, Any]]]:
    """Frames until the server closes; (close code, reason, frames before it)."""
    frames = []
    with trio.fail_after(WAIT):
        try:
            while True:
                frames.append(json.loads(await ws.get_message()))
        except ConnectionClosed as exc:
            return exc.reason.code, exc.reason.reason or "", frames


@pytest.fixture
async def api(start_daemon: Any, tmp_path: Any) -> Any:
    return await start_daemon(http=HTTP, api_key=KEY.encode())


async def test_publish_reaches_members_tagged_as_the_server(api: Any) -> None:
    async with AsyncExitStack() as stack:
        port = api.daemon.http_port
        ann = await member(stack, api.url, "ann")
        bob = await member(stack, api.url, "bob")
        status, _, answer = await call(
            port, "/api/v1/publish", {"room": "lobby", "event": "news", "data": {"t": 1}}
        )
        assert status == 200
        assert answer == {"room": "lobby", "event": "news", "members_here": 2}
        for ws in (ann, bob):
            frame = await recv(ws, "broadcast")
            assert frame == {
                "type": "broadcast",
                "room": "lobby",
                "from": {"server": True, "region": "test"},
                "event": "news",
                "data": {"t": 1},
            }
        status, _, answer = await call(port, "/api/v1/publish", {"room": "lobby", "data": "x"})
        assert (status, answer["event"]) == (200, "message")  # the default event


async def test_send_fast_and_reliable_say_what_happened(api: Any) -> None:
    async with AsyncExitStack() as stack:
        port = api.daemon.http_port
        bob = await member(stack, api.url, "bob")
        status, _, answer = await call(
            port, "/api/v1/send", {"to": ["bob", "nobody"], "data": {"hi": 1}}
        )
        assert status == 200
        assert answer["mode"] == "fast" and answer["id"]
        assert answer["recipients"] == {
            "bob": {"status": "delivered", "regions": ["test"]},
            "nobody": {"status": "not_online"},
        }
        frame = await recv(bob, "message")
        assert frame["server"] is True and "from" not in frame and "session" not in frame
        assert frame["data"] == {"hi": 1} and frame["to"] == ["bob", "nobody"]
        status, _, answer = await call(
            port, "/api/v1/send", {"to": "bob", "data": 2, "mode": "reliable"}
        )
        assert status == 200 and answer["mode"] == "reliable"
        assert answer["recipients"] == {"bob": {"status": "delivered", "regions": ["test"]}}
        assert (await recv(bob, "message"))["mode"] == "reliable"
        status, _, answer = await call(
            port, "/api/v1/send", {"to": "carol", "data": 3, "mode": "reliable", "wait_ms": 0}
        )
        assert answer["recipients"] == {"carol": {"status": "stored"}}


async def test_presence_occupancy_and_rooms(api: Any) -> None:
    async with AsyncExitStack() as stack:
        port = api.daemon.http_port
        await member(stack, api.url, "ann")
        await member(stack, api.url, "ann")
        await member(stack, api.url, "bob", "other")
        status, _, answer = await call(port, "/api/v1/presence", {"room": "lobby"})
        assert status == 200
        assert answer["users"] == 1 and answer["sessions"] == 2
        assert answer["regions"] == {"test": 2}
        assert [entry["meta"] for entry in answer["presences"]["ann"]] == [{"n": "ann"}] * 2
        status, _, answer = await call(port, "/api/v1/occupancy", {"room": "lobby"})
        assert answer == {"room": "lobby", "sessions": 2, "users": 1, "regions": {"test": 2}}
        status, _, answer = await call(port, "/api/v1/rooms")
        assert answer == {
            "rooms": [
                {"room": "lobby", "sessions": 2, "users": 1},
                {"room": "other", "sessions": 1, "users": 1},
            ],
            "count": 2,
            "truncated": False,
        }
        status, _, answer = await call(port, "/api/v1/rooms", {"prefix": "oth", "limit": 1})
        assert [room["room"] for room in answer["rooms"]] == ["other"]
        status, _, answer = await call(port, "/api/v1/occupancy", {"room": "empty"})
        assert answer == {"room": "empty", "sessions": 0, "users": 0, "regions": {}}


async def test_disconnect_closes_with_4001_and_refuses_hellos(api: Any) -> None:
    async with AsyncExitStack() as stack:
        port = api.daemon.http_port
        ann = await member(stack, api.url, "ann")
        watcher = await member(stack, api.url, "bob")
        status, _, answer = await call(
            port, "/api/v1/disconnect", {"user": "ann", "reason": "banned for spam", "refuse_s": 30}
        )
        assert status == 200
        assert answer == {"user": "ann", "session": None, "closed_here": 1, "refuse_s": 30.0}
        code, reason, frames = await closed_with(ann)
        assert (code, reason) == (4001, "banned for spam")
        assert frames[-1]["type"] == "error" and frames[-1]["code"] == "disconnected"
        # The session left at once (no resume grace): the others see the leave.
        diff = await recv(watcher, "diff")
        while "ann" not in diff["leaves"]:
            diff = await recv(watcher, "diff")
        # Hellos of ann are refused for the rest of refuse_s (4002, with retry_after_ms).
        async with open_websocket_url(api.url) as again:
            await again.send_message(json.dumps({"type": "hello", "user": "ann"}))
            code, _, frames = await closed_with(again)
            assert code == 4002
            assert frames[0]["code"] == "refused" and 0 < frames[0]["retry_after_ms"] <= 30_000
        await member(stack, api.url, "carl")  # others are welcome


async def test_disconnect_one_session_only(api: Any) -> None:
    async with AsyncExitStack() as stack:
        port = api.daemon.http_port
        tabs, sessions = [], []
        for _ in range(2):
            ws = await stack.enter_async_context(open_websocket_url(api.url))
            await ws.send_message(json.dumps({"type": "hello", "user": "ann"}))
            sessions.append((await recv(ws, "welcome"))["session"])
            await ws.send_message(json.dumps({"type": "join", "room": "lobby"}))
            await recv(ws, "state")
            tabs.append(ws)
        _, _, answer = await call(
            port, "/api/v1/disconnect", {"user": "ann", "session": sessions[0]}
        )
        assert answer["closed_here"] == 1 and answer["session"] == sessions[0]
        assert (await closed_with(tabs[0]))[0] == 4001
        diff = await recv(tabs[1], "diff")  # the other tab stays, and sees the leave
        while sessions[0] not in str(diff["leaves"]):
            diff = await recv(tabs[1], "diff")
        _, _, answer = await call(port, "/api/v1/presence", {"room": "lobby"})
        assert [entry["session"] for entry in answer["presences"]["ann"]] == sessions[1:]


@pytest.mark.parametrize(
    ("key", "headers"),
    [
        (None, []),
        ("wrong" * 8, []),
        (None, [("Authorization", "Basic " + KEY)]),
        (None, [("X-API-Key", "nope")]),
    ],
)
async def test_bad_or_missing_key_is_401(api: Any, key: str | None, headers: Any) -> None:
    for path in ("/api/v1/publish", "/api/v1/rooms", "/api/v1/nothing"):
        status, answer_headers, answer = await call(
            api.daemon.http_port, path, {"room": "lobby", "data": 1}, key=key, headers=headers
        )
        assert status == 401
        assert answer_headers["www-authenticate"] == 'Bearer realm="presenced"'
        assert answer["error"]["code"] == "unauthorized"


async def test_x_api_key_header_is_accepted(api: Any) -> None:
    status, _, _ = await call(
        api.daemon.http_port, "/api/v1/rooms", key=None, headers=[("X-API-Key", KEY)]
    )
    assert status == 200


@pytest.mark.parametrize(
    ("path", "body", "code"),
    [
        ("/api/v1/publish", b"{not json", "bad_request"),
        ("/api/v1/publish", b"[1, 2]", "bad_request"),
        ("/api/v1/publish", b'{"room": "r", "data": NaN}', "bad_request"),
        ("/api/v1/publish", b'{"room": "", "data": 1}', "bad_request"),
        ("/api/v1/publish", b'{"room": "r"}', "bad_request"),
        ("/api/v1/publish", b'{"room": "r", "data": 1, "colour": 2}', "bad_request"),
        ("/api/v1/publish", b"\xff\xfe", "bad_request"),
        ("/api/v1/send", b'{"to": [], "data": 1}', "bad_request"),
        ("/api/v1/send", b'{"to": "bob", "data": 1, "mode": "slow"}', "bad_request"),
        ("/api/v1/send", b'{"to": "bob", "data": 1, "wait_ms": -1}', "bad_request"),
        ("/api/v1/presence", b"{}", "bad_request"),
        ("/api/v1/rooms", b'{"limit": 0}', "bad_request"),
        ("/api/v1/disconnect", b'{"user": "ann", "refuse_s": -5}', "bad_request"),
        ("/api/v1/disconnect", b'{"session": "x"}', "bad_request"),
    ],
)
async def test_bad_bodies_are_400(api: Any, path: str, body: bytes, code: str) -> None:
    status, _, answer = await call(api.daemon.http_port, path, raw_body=body)
    assert (status, answer["error"]["code"]) == (400, code), answer


async def test_oversize_bodies_are_413(api: Any) -> None:
    port = api.daemon.http_port
    big = json.dumps({"room": "r", "data": "x" * 70_000}).encode()
    status, _, answer = await call(port, "/api/v1/publish", raw_body=big)
    assert (status, answer["error"]["code"]) == (413, "too_large")
    # A direct message's data is held to the client limit (8 KiB).
    status, _, answer = await call(port, "/api/v1/send", {"to": "bob", "data": "x" * 9000})
    assert (status, answer["error"]["code"]) == (413, "too_large")


async def test_unknown_routes_and_methods(api: Any) -> None:
    port = api.daemon.http_port
    status, _, answer = await call(port, "/api/v1/nothing", {})
    assert (status, answer["error"]["code"]) == (404, "not_found")
    status, headers, answer = await call(port, "/api/v1/rooms", method="GET")
    assert (status, answer["error"]["code"], headers["allow"]) == (
        405,
        "method_not_allowed",
        "POST",
    )
    status, _, _ = await call(port, "/healthz", method="GET")
    assert status == 200  # the side port's own pages are unchanged


async def test_api_is_404_when_off(start_daemon: Any) -> None:
    running = await start_daemon(http=HTTP)
    status, _, answer = await call(running.daemon.http_port, "/api/v1/rooms", {})
    assert (status, answer["error"]["code"]) == (404, "not_found")
    assert "--api-key-file" in answer["error"]["message"]


def test_api_key_file_flag(tmp_path: Any) -> None:
    from presenced.config import ConfigError, build_config
    from presenced.server.startup import secret_file_warning

    key = tmp_path / "api.key"
    key.write_text(KEY + "\n")
    key.chmod(0o600)
    base = {"allow_anonymous": True, "http": "127.0.0.1:0"}
    assert build_config({**base, "api_key_file": str(key)}).api_key == KEY.encode()
    assert secret_file_warning(key, "API key") is None
    with pytest.raises(ConfigError, match="give --http"):
        build_config({"allow_anonymous": True, "api_key_file": str(key)})
    with pytest.raises(ConfigError, match="cannot read"):
        build_config({**base, "api_key_file": str(tmp_path / "missing")})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        build_config({**base, "api_key_file": str(tmp_path / "empty")})
    key.chmod(0o644)
    assert "other users can read it" in (secret_file_warning(key, "API key") or "")
