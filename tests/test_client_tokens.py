"""The Python client's token refresh (presenced/client_tokens.py) against the real daemon:
a ``token_provider`` (plain or async) gives every hello's token and refreshes it before it
expires; a refused refresh lets the session close (4003), and a reconnecting client comes
back with a fresh token."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest
import trio

from presenced.client import connect
from presenced.client_tokens import provided_token, refresh_delay_s

SECRET = b"s" * 64


def test_refresh_delay_is_a_share_of_the_time_left() -> None:
    assert refresh_delay_s(10_000) == pytest.approx(8.0)
    assert refresh_delay_s(0) == 0.0
    for nothing in (None, "10", True):
        assert refresh_delay_s(nothing) is None


async def test_provided_token_takes_plain_and_async_providers() -> None:
    async def later() -> str:
        return "b"

    assert await provided_token(lambda: "a") == "a"
    assert await provided_token(later) == "b"
    with pytest.raises(TypeError):
        await provided_token(lambda: "")


def _exp(ttl_s: float) -> str:
    claims = {"sub": "ann", "rooms": ["*"], "exp": time.time() + ttl_s}
    return jwt.encode(claims, SECRET, algorithm="HS256")


@pytest.mark.parametrize("kind", ["plain", "async"])
async def test_the_client_refreshes_its_token_before_it_expires(
    start_daemon: Any, kind: str
) -> None:
    server = await start_daemon(
        token_secret=SECRET, allow_anonymous=False, token_expiry_grace_s=0.2
    )
    calls = 0

    def plain() -> str:
        nonlocal calls
        calls += 1
        return _exp(0.8)

    async def asynchronous() -> str:
        await trio.sleep(0)
        return plain()

    provider: Any = plain if kind == "plain" else asynchronous
    async with connect(server.url, token_provider=provider) as client:
        assert 0 < client.welcome["expires_in_ms"] <= 800
        await client.join("lobby", {"x": 1})
        # Three token lifetimes, far past the first token's expiry and the grace.
        await trio.sleep(2.4)
        assert client.tokens.refreshes >= 2 and calls >= 3
        assert client.closed is None
        assert await client.ping() >= 0


async def test_a_refused_refresh_ends_in_4003_and_a_reconnect_with_a_fresh_token(
    start_daemon: Any,
) -> None:
    server = await start_daemon(
        token_secret=SECRET, allow_anonymous=False, token_expiry_grace_s=0.2
    )
    tokens = iter([_exp(0.5), "not.a.token"])

    def provider() -> str:
        return next(tokens, None) or _exp(60)

    async with connect(server.url, token_provider=provider, reconnect=True) as client:
        first = client.session
        with trio.fail_after(5):
            while client.reconnects == 0 or client.status != "connected":
                await trio.sleep(0.05)
        assert client.tokens.refused == 1
        assert client.session != first  # closed for good by 4003: a new session
        assert client.welcome["expires_in_ms"] > 50_000
        assert await client.ping() >= 0
