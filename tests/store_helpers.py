"""Helpers shared by the message-store tests (kept out of the package: test-only tricks)."""

from __future__ import annotations

import sqlite3

from presenced.server.messaging import MessageStore


def deny_commit(store: MessageStore) -> None:
    """Make SQLite refuse COMMIT on this store's connection (a real failing commit)."""

    def authorize(action: int, arg1: str | None, *rest: object) -> int:
        if action == sqlite3.SQLITE_TRANSACTION and arg1 == "COMMIT":
            return sqlite3.SQLITE_DENY
        return sqlite3.SQLITE_OK

    store._conn().set_authorizer(authorize)
