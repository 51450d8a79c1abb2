"""An async (trio) client for presenced: the same operations as the browser client.

    async with connect("ws://127.0.0.1:7400", user="ann") as client:
        state = await client.join("lobby", {"name": "Ann"})
        await client.update("lobby", {"x": 10, "y": 20})
        async for message in client.messages():
            ...

Direct messages::

    sent = await client.send_direct("bob", {"text": "hi"}, mode="reliable")  # after `stored`
    await sent.wait(lambda s: "bob" in s.delivered)
    message = await client.next_message("message")  # on bob's side
    await bob.mark_read(message["id"])

The client keeps a local presence map per joined room, kept in sync from ``state`` and
``diff`` frames the way Phoenix's presence.js does (``syncState`` / ``syncDiff``), so
``client.presences(room)`` is always what the server has told it. Requests that have a reply
(hello, join, leave, ping) carry a ``ref`` and are awaited; errors with that ref raise
:class:`RequestError`.

Reconnecting (``connect(..., reconnect=True)``): after a drop the client dials again, with
exponential backoff and jitter like the browser client, and offers the ``resume`` token of
its last ``welcome``. A resumed session keeps its id and its rooms (the client sends no
join): each room's fresh ``state`` replaces its presence map, meta changes made while
disconnected are sent as one update, and direct messages already shown are not shown again.
A session the daemon did not resume is a new one: the client joins every room again with its
latest meta. Meanwhile ``send``/``broadcast``/``join`` wait for the connection, ``update``
and ``leave`` take effect at once locally, and a request in flight when the connection
dropped raises :class:`ConnectionClosed` (whether the daemon did it is unknown). It is off
by default: tests, benchmarks and scripts want to see a drop and its close code rather than
have it hidden. Policy closes (1008, ``unauthorized``) and :meth:`PresenceClient.aclose`
(a clean close: the daemon removes the session at once) end it for good.

Expiring tokens: ``connect(..., token_provider=f)``, see :mod:`presenced.client_tokens`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
from trio_websocket import open_websocket_url

from presenced.client_connection import PresenceClient
from presenced.client_rooms import Presences, hello_frame
from presenced.client_sent import RequestError, Sent
from presenced.client_tokens import TokenProvider, provided_token
from presenced.core.client_wire import SUBPROTOCOL

__all__ = ["PresenceClient", "Presences", "RequestError", "Sent", "connect"]


@asynccontextmanager
async def connect(
    url: str,
    *,
    token: str | None = None,
    user: str | None = None,
    client: str | None = None,
    reconnect: bool = False,
    backoff_base_s: float = 0.25,
    backoff_max_s: float = 10.0,
    token_provider: TokenProvider | None = None,
) -> AsyncIterator[PresenceClient]:
    """Connect, say hello (token, or anonymous with an optional user id) and yield the client.

    ``reconnect``: reconnect after a drop, resuming the session when the daemon still holds
    it (see the module docstring); ``backoff_base_s``/``backoff_max_s`` shape the delays.
    The first connection's failure is raised either way. ``token_provider`` gives the
    token of every hello and refreshes it (:mod:`presenced.client_tokens`).
    """
    async with trio.open_nursery() as nursery:
        if reconnect:
            presence = PresenceClient(
                None,
                nursery,
                reconnect=True,
                backoff_base_s=backoff_base_s,
                backoff_max_s=backoff_max_s,
                token_provider=token_provider,
            )
            await nursery.start(presence._run, url, hello_frame(token, user, client))
            try:
                yield presence
            finally:
                await presence.aclose()
                nursery.cancel_scope.cancel()
            return
        async with open_websocket_url(url, subprotocols=[SUBPROTOCOL]) as ws:
            presence = PresenceClient(ws, nursery, token_provider=token_provider)
            if token_provider is not None:
                token = await provided_token(token_provider)
            await presence.hello(token=token, user=user, client=client)
            yield presence
        nursery.cancel_scope.cancel()
