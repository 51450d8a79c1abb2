"""The sender of a direct message made by the server API.

The direct-message machine answers a sender through a handle it keeps and hands back in its
effects (``delivered``, ``stored``, errors): for a client, its connection. For the server
API it is a :class:`ServerSender`, one per API request, which collects those frames while
the HTTP request waits for them (:mod:`presenced.server.api`). Once the response is sent the
handle is closed: later receipts (a read, a late delivery) go nowhere, as the machine's
fallback to "the sender's other sessions" finds none for :data:`SERVER_USER`.
"""

from __future__ import annotations

from typing import Any

import trio

from presenced.core.protocol import SERVER_USER

__all__ = ["SERVER_USER", "ServerSender"]


class ServerSender:
    """Collects what the machine tells the sender of one API ``send``."""

    def __init__(self) -> None:
        self.open = True
        self.frames: list[dict[str, Any]] = []
        self.changed = trio.Event()

    def send(self, message: dict[str, Any], room: str | None = None) -> None:
        """A frame for the sender (the machine's ``Reply`` or ``TellSender``)."""
        if self.open:
            self.frames.append(message)
            self.changed.set()

    async def wait(self) -> None:
        """Until the next frame arrives."""
        await self.changed.wait()
        self.changed = trio.Event()

    def close(self) -> None:
        """The API answered: nothing more is collected."""
        self.open = False
