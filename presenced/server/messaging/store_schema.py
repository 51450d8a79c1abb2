"""The message store's file format, and the checks on every value before it is written.

The schema and its version (with the migrations from older ones), the hot queries (named so
a test can check their plans are index lookups), and the conversions between a row and a
:class:`~presenced.core.direct_store.StoredMessage`. Kept apart from
:mod:`presenced.server.messaging.store`, which owns the connection and the transactions.
"""

from __future__ import annotations

import json
import math
from typing import Any

from presenced.core.direct_store import StoredMessage, StoreError

#: ``PRAGMA user_version`` of the schema this code writes. Bump it and add a step to
#: ``MIGRATIONS`` when the schema changes.
SCHEMA_VERSION = 1

#: ``PRAGMA application_id`` of a presenced message store ("PMSG"), so that any other SQLite
#: file is refused instead of being written into.
APPLICATION_ID = 0x504D5347

#: Longest message id, user name or session id the store takes (callers validate first; the
#: store only refuses to go further than that).
MAX_NAME_LENGTH = 256

#: Largest seq ``set_last_delivered`` takes (SQLite integers are signed 64-bit).
MAX_SEQ = 2**63 - 1

FILE_NAME = "messages.sqlite3"

SCHEMA = """
CREATE TABLE pending (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL,
    recipient TEXT NOT NULL,
    sender TEXT NOT NULL,
    sender_session TEXT NOT NULL,
    data TEXT NOT NULL,          -- JSON text
    grp TEXT NOT NULL,           -- JSON array of every recipient, '' for a one-to-one message
    created_at REAL NOT NULL,    -- wall-clock seconds
    UNIQUE (id, recipient)       -- get() and mark_delivered()
);
CREATE INDEX pending_by_recipient ON pending (recipient, seq);
CREATE INDEX pending_by_pair ON pending (sender, recipient, seq);
CREATE INDEX pending_by_age ON pending (created_at);

CREATE TABLE delivered (
    origin TEXT NOT NULL,
    sender TEXT NOT NULL,
    recipient TEXT NOT NULL,
    seq INTEGER NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (origin, sender, recipient)
) WITHOUT ROWID;
CREATE INDEX delivered_by_age ON delivered (updated_at);
"""

#: user_version -> statements that bring a store at that version to the next one.
MIGRATIONS: dict[int, str] = {}

COLUMNS = "id, sender, sender_session, recipient, seq, data, grp, created_at"

# The hot queries, named so a test can check their plans are index lookups.
SQL_PENDING = f"SELECT {COLUMNS} FROM pending WHERE recipient = ? ORDER BY seq LIMIT ?"
SQL_PENDING_COUNT = "SELECT count(*) FROM pending WHERE recipient = ?"
SQL_PREVIOUS = "SELECT max(seq) FROM pending WHERE sender = ? AND recipient = ? AND seq < ?"
SQL_GET = f"SELECT {COLUMNS} FROM pending WHERE id = ? AND recipient = ?"
# No ORDER BY: SQLite would rather walk the whole table in seq order than sort; we sort.
SQL_EXPIRED = f"SELECT {COLUMNS} FROM pending WHERE created_at < ?"
SQL_LAST_DELIVERED = "SELECT seq FROM delivered WHERE origin = ? AND sender = ? AND recipient = ?"
SQL_INSERT = (
    "INSERT INTO pending (id, recipient, sender, sender_session, data, grp, created_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
)
SQL_SET_DELIVERED = (
    "INSERT INTO delivered (origin, sender, recipient, seq, updated_at) VALUES (?, ?, ?, ?, ?)"
    " ON CONFLICT (origin, sender, recipient) DO UPDATE SET"
    " seq = max(seq, excluded.seq), updated_at = max(updated_at, excluded.updated_at)"
)


def check_name(value: object, what: str) -> str:
    """``value`` if it is a string the store can hold, else ValueError (never a crash later)."""
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, not {type(value).__name__}")
    if len(value) > MAX_NAME_LENGTH:
        raise ValueError(f"{what} is longer than {MAX_NAME_LENGTH} characters")
    return value


def check_storable_name(value: object, what: str) -> str:
    """Like :func:`_name`, and also encodable as UTF-8 (no lone surrogates), for writes."""
    text = check_name(value, what)
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{what} is not valid Unicode text") from None
    return text


def check_time(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number of seconds")
    return float(value)


def check_seq(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEQ:
        raise ValueError("seq must be an integer between 0 and 2**63-1")
    return value


def encode_data(data: Any) -> str:
    """Compact JSON text for ``data``, or ValueError (before anything is written)."""
    try:
        text = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError) as exc:
        raise ValueError(f"message data is not a JSON value: {exc}") from None
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            # Lone surrogates: escaped JSON still round-trips them exactly.
            text = json.dumps(data, allow_nan=False, separators=(",", ":"))
    return text


def decode_row(row: tuple[Any, ...]) -> StoredMessage:
    id_, sender, session, recipient, seq, data, grp, created_at = row
    try:
        return StoredMessage(
            id_,
            sender,
            session,
            recipient,
            seq,
            json.loads(data),
            tuple(json.loads(grp)) if grp else (),
            created_at,
        )
    except (TypeError, ValueError) as exc:
        raise StoreError(f"corrupt message row (seq {seq}): {exc}") from exc
