"""Tokens over real sockets, with a raw WebSocket client written from docs/protocol.md: a
daemon checking RS256 tokens with a public key and EdDSA tokens from a JWKS file, a
``refresh`` before and after expiry, the 4003 close past the grace, capabilities, and an
empty token."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
PEM = RSA.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
)
WAIT = 5


def rs256(user: str = "ann", ttl_s: float = 60, **claims: Any) -> str:
    body = {"sub": user, "rooms": ["doc-*", "chat-*"], "exp": time.time() + ttl_s, **claims}
    return jwt.encode(body, RSA, algorithm="RS256")


async def send(ws: WebSocketConnection, message: dict[str, Any]) -> None:
    await ws.send_message(json.dumps(message))


async def recv(ws: WebSocketConnection, kind: str | None = None) -> dict[str, Any]:
    """The next frame (of type ``kind``, skipping others such as diffs)."""
    with trio.fail_after(WAIT):
        while True:
            frame = json.loads(await ws.get_message())
            if kind is None or frame["type"] == kind or frame["type"] == "error":
                return dict(frame)


async def close_code(ws: WebSocketConnection) -> int:
    with trio.fail_after(WAIT), pytest.raises(ConnectionClosed) as closed:
        while True:
            await ws.get_message()
    return int(closed.value.reason.code)


async def hello(ws: WebSocketConnection, token: str) -> dict[str, Any]:
    await send(ws, {"type": "hello", "ref": 1, "token": token})
    return await recv(ws)


async def test_rs256_hello_refresh_before_and_after_expiry_and_close_past_grace(
    start_daemon: Any,
) -> None:
    server = await start_daemon(
        token_public_key=PEM, allow_anonymous=False, token_expiry_grace_s=1.5
    )
    async with open_websocket_url(server.url) as ws:
        welcome = await hello(ws, rs256(ttl_s=1.2))
        assert welcome["type"] == "welcome" and welcome["user"] == "ann"
        assert 0 < welcome["expires_in_ms"] <= 1200
        await send(ws, {"type": "join", "ref": 2, "room": "doc-1"})
        assert (await recv(ws, "state"))["ref"] == 2

        # Before expiry: a fresh token of the same user.
        await send(ws, {"type": "refresh", "ref": 3, "token": rs256(ttl_s=1.0)})
        refreshed = await recv(ws, "refreshed")
        assert refreshed["ref"] == 3 and 0 < refreshed["expires_in_ms"] <= 1000
        # Another user's token is refused; the session stays (its token is still valid).
        await send(ws, {"type": "refresh", "ref": 4, "token": rs256(user="bob")})
        refused = await recv(ws)
        assert refused["code"] == "unauthorized" and refused["ref"] == 4

        # After expiry, within the grace: the refresh still saves the session.
        await trio.sleep(1.3)
        await send(ws, {"type": "refresh", "ref": 5, "token": rs256(ttl_s=0.5)})
        assert (await recv(ws, "refreshed"))["ref"] == 5
        await send(ws, {"type": "ping", "ref": 6})
        assert (await recv(ws, "pong"))["ref"] == 6

        # No refresh: closed once the token is past the grace, after a token_expired error.
        error = await recv(ws, "never")
        assert error["code"] == "token_expired"
        assert await close_code(ws) == 4003
    with trio.fail_after(WAIT):
        while server.daemon.node.connections:
            await trio.sleep(0.01)
    assert server.daemon.node.room_snapshot("doc-1")["presences"] == {}


async def test_a_refused_refresh_after_expiry_closes_with_4003(start_daemon: Any) -> None:
    server = await start_daemon(token_public_key=PEM, allow_anonymous=False)
    async with open_websocket_url(server.url) as ws:
        assert (await hello(ws, rs256(ttl_s=0.3)))["type"] == "welcome"
        await trio.sleep(0.4)
        await send(ws, {"type": "refresh", "ref": 2, "token": "not.a.token"})
        assert (await recv(ws))["code"] == "unauthorized"
        assert await close_code(ws) == 4003


async def test_eddsa_tokens_from_a_jwks_file_and_capabilities(
    start_daemon: Any, tmp_path: Path
) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    jwk = json.loads(jwt.get_algorithm_by_name("EdDSA").to_jwk(key.public_key()))
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [{**jwk, "kid": "ed-1"}]}))
    server = await start_daemon(token_jwks=str(path), allow_anonymous=False)
    caps = {"rooms": {"doc-*": ["presence"], "chat-*": ["presence", "broadcast"]}, "send": False}
    claims = {"sub": "ann", "rooms": ["doc-*", "chat-*"], "caps": caps}
    token = jwt.encode(claims, key, algorithm="EdDSA", headers={"kid": "ed-1"})
    async with open_websocket_url(server.url) as ws:
        welcome = await hello(ws, token)
        assert welcome["type"] == "welcome" and "expires_in_ms" not in welcome
        for ref, room in ((2, "doc-1"), (3, "chat-1")):
            await send(ws, {"type": "join", "ref": ref, "room": room})
            assert (await recv(ws, "state"))["ref"] == ref
        await send(ws, {"type": "broadcast", "ref": 4, "room": "doc-1", "event": "e"})
        assert (await recv(ws, "never")) == {
            "type": "error",
            "code": "forbidden",
            "message": "not allowed to broadcast in 'doc-1'",
            "ref": 4,
        }
        await send(ws, {"type": "broadcast", "room": "chat-1", "event": "e", "echo": True})
        assert (await recv(ws, "broadcast"))["room"] == "chat-1"
        await send(ws, {"type": "send", "ref": 5, "to": "bob", "data": 1})
        assert (await recv(ws, "never"))["code"] == "forbidden"
        # A token for an unknown kid: unauthorized, 1008 (the session had none to keep).
    async with open_websocket_url(server.url) as ws:
        other = jwt.encode(claims, key, algorithm="EdDSA", headers={"kid": "ed-2"})
        assert (await hello(ws, other))["code"] == "unauthorized"
        assert await close_code(ws) == 1008


@pytest.mark.parametrize("token", ["", "u" * 129])
async def test_an_empty_token_or_a_long_user_is_unauthorized_and_closed(
    start_daemon: Any, token: str
) -> None:
    secret = b"s" * 64
    server = await start_daemon(token_secret=secret, allow_anonymous=False)
    if token:
        token = jwt.encode({"sub": token, "rooms": ["*"]}, secret, algorithm="HS256")
    async with open_websocket_url(server.url) as ws:
        error = await hello(ws, token)
        assert error["type"] == "error" and error["code"] == "unauthorized"
        assert await close_code(ws) == 1008
