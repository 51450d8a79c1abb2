"""What the trio client (presenced/client.py) reports back: request errors, and the live
record of a direct message it sent (receipts). Importable from presenced.client too."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio

__all__ = ["RequestError", "Sent"]


class RequestError(Exception):
    """The server answered a request with an error frame."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Sent:
    """A direct message this client sent, and what became of it so far (updated live)."""

    def __init__(self, ref: int, to: tuple[str, ...], mode: str) -> None:
        self.ref = ref
        self.to = to
        self.mode = mode
        #: The message id (from ``stored``, or the first receipt of a fast message).
        self.id: str | None = None
        #: recipient -> regions where it was written to the recipient's sessions
        self.delivered: dict[str, set[str]] = {}
        #: recipients who sent a read receipt
        self.read_by: set[str] = set()
        #: recipient -> error code
        self.errors: dict[str, str] = {}
        self._changed = trio.Event()

    def _note(self, frame: dict[str, Any]) -> None:
        self.id = self.id or frame.get("id")
        kind = frame.get("type")
        if kind == "delivered":
            self.delivered.setdefault(frame["to"], set()).add(frame["region"])
        elif kind == "read":
            self.read_by.add(frame["by"])
        elif kind == "error" and "to" in frame:
            self.errors[frame["to"]] = frame["code"]
        elif kind == "error":
            # The whole request was refused (bad_request, store_full, ...): every recipient.
            for user in self.to:
                self.errors.setdefault(user, str(frame.get("code")))
        self._changed.set()
        self._changed = trio.Event()

    async def wait(self, predicate: Callable[[Sent], bool]) -> None:
        """Wait until ``predicate(self)`` holds (e.g. every recipient delivered or failed)."""
        while not predicate(self):
            await self._changed.wait()

    @property
    def settled(self) -> bool:
        """Every recipient has a delivered mark or an error."""
        return all(user in self.delivered or user in self.errors for user in self.to)
