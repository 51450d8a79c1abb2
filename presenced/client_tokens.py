"""Token refresh for the Python client (:mod:`presenced.client`): the application gives a
``token_provider``, a function (plain or async) that returns a fresh token; the client
calls it for every hello (the first connection and each reconnect) and, while a session's
token expires (``welcome``'s and ``refreshed``'s ``expires_in_ms``), again before it does,
sending the result in a ``refresh`` (docs/protocol.md, *refresh*). A refused refresh ends
the refreshing (the daemon closes the session once its token expires, 4003, and a client
with ``reconnect`` then says hello again with a fresh token); a drop leaves it to the hello
of the next connection.

The delay is a share of the time left as the daemon reckons it, so the client's own clock
(often off on phones and laptops) does not matter.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from trio_websocket import ConnectionClosed

from presenced.client_sent import RequestError

__all__ = ["REFRESH_AT", "Refresher", "TokenProvider", "provided_token", "refresh_delay_s"]

#: A function returning a fresh token (a JWT), or an awaitable of one.
TokenProvider = Callable[[], str | Awaitable[str]]

#: A token is refreshed once this share of its remaining life has passed (then 20 % of it,
#: and the daemon's 30 s grace, are left for the provider and the round trip).
REFRESH_AT = 0.8


async def provided_token(provider: TokenProvider) -> str:
    """Call the application's provider and check what it gave."""
    token = provider()
    if inspect.isawaitable(token):
        token = await token
    if not isinstance(token, str) or not token:
        raise TypeError(f"token_provider must return a non-empty string, got {token!r}")
    return token


def refresh_delay_s(expires_in_ms: object) -> float | None:
    """Seconds from now until a refresh is due, for a token with ``expires_in_ms`` left
    (None: it does not expire, or the frame said nothing)."""
    if isinstance(expires_in_ms, bool) or not isinstance(expires_in_ms, int | float):
        return None
    return max(0.0, expires_in_ms / 1000 * REFRESH_AT)


class Refresher:
    """The refresh schedule of one client: at most one pending refresh, replaced by each
    ``welcome`` and ``refreshed``; nothing without a provider."""

    def __init__(
        self,
        provider: TokenProvider | None,
        nursery: trio.Nursery,
        request: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]],
    ) -> None:
        self.provider = provider
        self._nursery = nursery
        self._request = request
        self._scope = trio.CancelScope()
        self._stopped = False
        #: Refreshes answered ``refreshed``, and refused.
        self.refreshes = 0
        self.refused = 0

    def schedule(self, expires_in_ms: object) -> None:
        """A frame said the token has ``expires_in_ms`` left: refresh it in time."""
        self._scope.cancel()
        delay_s = refresh_delay_s(expires_in_ms)
        if self.provider is not None and delay_s is not None and not self._stopped:
            self._scope = trio.CancelScope()
            self._nursery.start_soon(self._after, delay_s, self._scope)

    def stop(self) -> None:
        self._stopped = True
        self._scope.cancel()

    async def _after(self, delay_s: float, scope: trio.CancelScope) -> None:
        assert self.provider is not None
        with scope:
            await trio.sleep(delay_s)
            token = await provided_token(self.provider)
            try:
                reply = await self._request({"type": "refresh", "token": token})
            except RequestError:
                self.refused += 1
                return
            except ConnectionClosed:
                return
            self.refreshes += 1
            self.schedule(reply.get("expires_in_ms"))
