"""The pure parts of the Python client: frames it sends, and a room's presence map kept in
step with the daemon's ``state`` and ``diff`` frames."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

#: A room's presence map as the client keeps it: user -> session -> {"meta", "region"}.
Presences = dict[str, dict[str, dict[str, Any]]]


def encode(message: Mapping[str, Any]) -> str:
    """A frame's JSON text, compact."""
    return json.dumps(message, separators=(",", ":"))


def hello_frame(token: str | None, user: str | None, client: str | None) -> dict[str, Any]:
    """The ``hello`` a connection opens with (a token, or an anonymous user id)."""
    message: dict[str, Any] = {"type": "hello", "client": client or "presenced-py"}
    if token is not None:
        message["token"] = token
    if user is not None:
        message["user"] = user
    return message


def merge(room: Presences, presences: Mapping[str, list[dict[str, Any]]]) -> None:
    """Add or replace the sessions of a ``state``'s presences or a diff's joins or updates."""
    for user, sessions in presences.items():
        known = room.setdefault(user, {})
        for entry in sessions:
            known[entry["session"]] = {"meta": entry["meta"], "region": entry["region"]}


def apply_diff(room: Presences, diff: Mapping[str, Any]) -> None:
    """Apply one ``diff`` frame: joins and updates in, leaves out (a user with no session
    left goes)."""
    merge(room, diff["joins"])
    merge(room, diff["updates"])
    for user, sessions in diff["leaves"].items():
        known = room.get(user, {})
        for entry in sessions:
            known.pop(entry["session"], None)
        if not known:
            room.pop(user, None)
