"""The durable store behind reliable direct messages: one SQLite file per daemon.

It keeps the contract of :class:`presenced.core.direct_store.Store` (the interface the
direct-message machine calls), where its row type and errors are defined.

Two halves, both in one file so one ``--data-dir`` holds everything:

* **sender side** (``pending``): a reliable message is written here, one row per recipient,
  before the sender hears ``stored``, and stays until a recipient daemon confirms delivery
  (:meth:`MessageStore.mark_delivered`) or it grows older than ``max_age_s``
  (:meth:`MessageStore.expire`). Every row gets a store-wide ``seq`` that only grows and is
  never reused, not even after a restart with every earlier row deleted (``AUTOINCREMENT``
  keeps the high-water mark in ``sqlite_sequence``), so a recipient daemon can order a
  (sender, recipient) pair by it.
* **recipient side** (``delivered``): per (origin node, sender, recipient) the ``seq`` of the
  last message this daemon showed, so a retransmission is not shown twice.

Durability: WAL mode with ``synchronous=NORMAL`` by default. A commit is in the WAL file (in
the OS page cache at least) before it returns, so a crash of the daemon process, ``kill -9``
included, loses nothing committed; only a power loss or a kernel crash can lose the last few
commits (never corrupt the file). ``synchronous="FULL"`` also fsyncs the WAL on every
commit and closes that window, at the price of one fsync per commit.

Group commit: by default every write method is its own transaction, committed before it
returns. After :meth:`MessageStore.begin`, writes join one open transaction instead (each in
a savepoint of its own, so a write that fails, :class:`StoreFull` included, undoes only
itself) until :meth:`MessageStore.commit` or :meth:`MessageStore.rollback`. Reads see the
open transaction's writes, so the per-recipient and total limits count them. Nothing
written in a batch is durable, and nothing about it may be acknowledged to anyone, until
:meth:`~MessageStore.commit` has returned; :meth:`~MessageStore.close` (and a crash) throws
an uncommitted batch away. The direct-message machine opens a batch on its first write and
the messenger commits it 25 ms later (see :mod:`presenced.core.direct`), so a burst costs
one commit instead of one per message.

The daemon owns the file: it is opened with ``locking_mode=EXCLUSIVE``, so a second daemon
pointed at the same ``--data-dir`` gets :class:`StoreError` instead of sharing (the count of
pending rows is kept in memory and would go wrong), and WAL needs no shared-memory file.

All calls are synchronous and short (a few index lookups and at most one commit), made
inline from the trio thread: at this scale a worker thread would cost more than it saves.
The store is not thread-safe; use it from one thread.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, Self

from presenced.core.direct_store import StoredMessage, StoreError, StoreFull
from presenced.server.messaging.store_schema import (
    APPLICATION_ID,
    FILE_NAME,
    MAX_NAME_LENGTH,
    MIGRATIONS,
    SCHEMA,
    SCHEMA_VERSION,
    SQL_EXPIRED,
    SQL_GET,
    SQL_INSERT,
    SQL_LAST_DELIVERED,
    SQL_PENDING,
    SQL_PENDING_COUNT,
    SQL_PREVIOUS,
    SQL_SET_DELIVERED,
    check_name,
    check_seq,
    check_storable_name,
    check_time,
    decode_row,
    encode_data,
)

__all__ = [
    "MAX_NAME_LENGTH",
    "SCHEMA_VERSION",
    "MessageStore",
    "StoreError",
    "StoreFull",
    "StoredMessage",
]


class MessageStore:
    """Pending reliable messages (sender side) and delivery marks (recipient side).

    Bounds: at most ``max_pending_per_recipient`` pending rows per recipient and
    ``max_pending_total`` in all (:class:`StoreFull` beyond either); pending rows older than
    ``max_age_s`` seconds are dropped by :meth:`expire`, and delivery marks not touched for
    ``max_age_s`` are forgotten by :meth:`prune` (by then the sender has expired anything that
    could still be retransmitted to us).

    Every method raises ValueError, with nothing written, for an argument the store cannot
    take, and :class:`StoreError` if SQLite fails (I/O error, corruption found late).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_pending_per_recipient: int = 1000,
        max_pending_total: int = 1_000_000,
        max_age_s: float = 7 * 86400,
        synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
    ) -> None:
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be 'NORMAL' or 'FULL', not {synchronous!r}")
        if max_pending_per_recipient < 1 or max_pending_total < 1:
            raise ValueError("the pending limits must be at least 1")
        self.path = os.fspath(path)
        self.max_pending_per_recipient = max_pending_per_recipient
        self.max_pending_total = max_pending_total
        self.max_age_s = check_time(max_age_s, "max_age_s")
        self.synchronous = synchronous
        self._db: sqlite3.Connection | None = None
        #: True between begin() and commit()/rollback(): writes share one transaction.
        self._batch = False
        #: True once a write in the open batch has succeeded (the batch has something to lose).
        self._batch_dirty = False
        #: Seq of the first row added in the open batch (every committed row's seq is lower).
        self._uncommitted_from: int | None = None
        #: Write transactions committed so far (one per batch, or per write outside one).
        self.commits = 0
        try:
            self._db = self._open()
            #: Pending rows in the store: kept here, the file is ours alone (exclusive lock).
            self._total: int = self._db.execute("SELECT count(*) FROM pending").fetchone()[0]
        except sqlite3.Error as exc:
            self.close()
            raise StoreError(self._describe(exc)) from exc
        except BaseException:
            self.close()
            raise

    @classmethod
    def in_dir(cls, data_dir: Path, **kw: Any) -> MessageStore:
        """The store in ``data_dir/messages.sqlite3``, creating ``data_dir`` (0o700) if needed."""
        data_dir = Path(data_dir)
        try:
            data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"{data_dir}: cannot create the data directory: {exc}") from exc
        return cls(data_dir / FILE_NAME, **kw)

    def _describe(self, exc: sqlite3.Error) -> str:
        code = getattr(exc, "sqlite_errorcode", None)
        if code == sqlite3.SQLITE_NOTADB:
            return f"{self.path}: not a presenced message store (not an SQLite database)"
        if code == sqlite3.SQLITE_CORRUPT:
            return f"{self.path}: message store is corrupt ({exc})"
        if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
            return f"{self.path}: message store is in use by another process ({exc})"
        return f"{self.path}: message store error: {exc}"

    def _open(self) -> sqlite3.Connection:
        memory = self.path == ":memory:"
        db = sqlite3.connect(self.path, isolation_level=None, timeout=0)
        try:
            if not memory:
                # Before anything touches the file: no shared-memory WAL index, and the lock
                # taken below is held until close().
                db.execute("PRAGMA locking_mode = EXCLUSIVE")
            db.execute("BEGIN IMMEDIATE")
            try:
                self._check_or_create(db)
                db.execute("COMMIT")
            except BaseException:
                db.rollback()
                raise
            if not memory:
                mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if mode.lower() != "wal":
                    raise StoreError(f"{self.path}: cannot switch to WAL mode (got {mode!r})")
                problems = [" ".join(r[0].split()) for r in db.execute("PRAGMA quick_check(3)")]
                if problems != ["ok"]:
                    raise StoreError(
                        f"{self.path}: message store is corrupt: {'; '.join(problems)}"
                    )
            db.execute(f"PRAGMA synchronous = {self.synchronous}")
            db.execute("PRAGMA journal_size_limit = 67108864")
        except BaseException:
            db.close()
            raise
        return db

    def _check_or_create(self, db: sqlite3.Connection) -> None:
        app_id = db.execute("PRAGMA application_id").fetchone()[0]
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if app_id == 0 and version == 0:
            tables = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            if tables:
                raise StoreError(f"{self.path}: not a presenced message store (other tables)")
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            return
        if app_id != APPLICATION_ID:
            raise StoreError(f"{self.path}: not a presenced message store")
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path}: message store has schema version {version}, newer than this"
                f" presenced understands ({SCHEMA_VERSION})"
            )
        while version < SCHEMA_VERSION:
            step = MIGRATIONS.get(version)
            if step is None:
                raise StoreError(f"{self.path}: cannot upgrade schema version {version}")
            for statement in step.split(";"):
                if statement.strip():
                    db.execute(statement)
            version += 1
            db.execute(f"PRAGMA user_version = {version}")

    # ------------------------------------------------------------------ plumbing

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError(f"{self.path}: message store is closed")
        return self._db

    @contextlib.contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        """The connection, with SQLite's errors turned into :class:`StoreError`."""
        db = self._conn()
        try:
            yield db
        except sqlite3.Error as exc:
            raise StoreError(self._describe(exc)) from exc

    @contextlib.contextmanager
    def _writing(self, statements: int = 1) -> Iterator[sqlite3.Connection]:
        """One write, all or nothing: its own transaction, committed on a clean exit, or (in
        a batch) part of the batch's transaction. Either is rolled back on any exception.

        In a batch, a write of several statements runs in a savepoint, so that a failure
        undoes only it; a write of one statement (``statements=1``) needs none, as SQLite
        undoes a failed statement by itself.
        """
        db = self._conn()
        if self._batch:
            self._check_batch(db)
            try:
                if not db.in_transaction:
                    db.execute("BEGIN IMMEDIATE")
                if statements > 1:
                    db.execute("SAVEPOINT write")
                try:
                    yield db
                    if statements > 1:
                        db.execute("RELEASE write")
                except BaseException:
                    # After some errors (I/O, disk full) SQLite has already rolled the whole
                    # transaction back: then there is no savepoint left, and the batch is
                    # lost (commit() will say so).
                    if statements > 1 and db.in_transaction:
                        db.execute("ROLLBACK TO write")
                        db.execute("RELEASE write")
                    raise
            except sqlite3.Error as exc:
                raise StoreError(self._describe(exc)) from exc
            self._batch_dirty = True
            return
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.rollback()
                raise
        except sqlite3.Error as exc:
            raise StoreError(self._describe(exc)) from exc
        self.commits += 1

    # ------------------------------------------------------------------ group commit

    @property
    def in_batch(self) -> bool:
        """True between :meth:`begin` and :meth:`commit` or :meth:`rollback`."""
        return self._batch

    def begin(self) -> None:
        """Start a batch: the writes until :meth:`commit` share one transaction (opened by
        the first of them). Nothing in it is durable before :meth:`commit` returns."""
        self._conn()
        if self._batch:
            raise StoreError(f"{self.path}: a batch is already open")
        self._batch = True
        self._batch_dirty = False
        self._uncommitted_from = None

    def _check_batch(self, db: sqlite3.Connection) -> None:
        """StoreError if SQLite rolled the open batch back behind our back (after an I/O or
        disk-full error): its writes are gone and must not be taken for committed."""
        if self._batch_dirty and not db.in_transaction:
            raise StoreError(f"{self.path}: the open batch was rolled back after an error")

    def commit(self) -> bool:
        """Commit the open batch; True if it held any write (one commit), False if none.

        On failure the whole batch is rolled back (as if it never happened) and
        :class:`StoreError` is raised; either way the batch is over.
        """
        db = self._conn()
        if not self._batch:
            raise StoreError(f"{self.path}: no batch is open")
        dirty, self._batch, self._batch_dirty = self._batch_dirty, False, False
        self._uncommitted_from = None
        if not db.in_transaction:
            if dirty:  # SQLite rolled it back after an error: nothing in it is stored
                self._undo()
                raise StoreError(f"{self.path}: the open batch was rolled back after an error")
            return False
        try:
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._undo()
            if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
                raise StoreError(f"{self.path}: the message store's disk is full") from exc
            raise StoreError(self._describe(exc)) from exc
        except BaseException:
            self._undo()
            raise
        self.commits += 1
        return True

    def rollback(self) -> None:
        """Throw the open batch away (nothing in it was ever durable). Safe with none open."""
        self._batch = self._batch_dirty = False
        self._uncommitted_from = None
        if self._db is not None and self._db.in_transaction:
            self._undo()

    def _undo(self) -> None:
        """Roll back the open transaction and recount what it had changed in memory."""
        db = self._conn()
        try:
            if db.in_transaction:
                db.rollback()
            self._total = db.execute("SELECT count(*) FROM pending").fetchone()[0]
        except sqlite3.Error as exc:
            raise StoreError(self._describe(exc)) from exc

    def is_committed(self, message: StoredMessage) -> bool:
        """False for a message added in the open batch (not durable yet: send it nowhere)."""
        return self._uncommitted_from is None or message.seq < self._uncommitted_from

    # ------------------------------------------------------------------ sender side

    def add(
        self,
        id: str,
        sender: str,
        sender_session: str,
        recipients: Sequence[str],
        data: Any,
        created_at: float,
        *,
        group: Sequence[str] | None = None,
    ) -> list[StoredMessage]:
        """Store a message for every recipient (one row each, in order); durable on return,
        or, in a batch, once :meth:`commit` has returned.

        All or nothing (one transaction, or one savepoint of the batch): :class:`StoreFull`
        if any recipient already has ``max_pending_per_recipient`` pending (rows added in the
        open batch count) or the rows would take the store over ``max_pending_total``;
        ValueError for data that is not JSON, a bad name, a
        recipient given twice or an (id, recipient) already pending.

        ``group`` is what each row records as the group; by default every recipient when
        there are several, ``()`` for one (pass it to mark a one-recipient group message).
        """
        id = check_storable_name(id, "message id")
        sender = check_storable_name(sender, "sender")
        sender_session = check_storable_name(sender_session, "sender session")
        if isinstance(recipients, str) or not isinstance(recipients, Sequence):
            raise ValueError("recipients must be a sequence of user names")
        names = [check_storable_name(r, "recipient") for r in recipients]
        if not names:
            raise ValueError("a message needs at least one recipient")
        if len(set(names)) != len(names):
            raise ValueError("a recipient is named twice")
        if group is None:
            members = tuple(names) if len(names) > 1 else ()
        else:
            if isinstance(group, str) or not isinstance(group, Sequence):
                raise ValueError("group must be a sequence of user names")
            members = tuple(check_storable_name(g, "group member") for g in group)
        grp = json.dumps(members, ensure_ascii=False, separators=(",", ":")) if members else ""
        created = check_time(created_at, "created_at")
        text = encode_data(data)
        if self._total + len(names) > self.max_pending_total:
            raise StoreFull(
                "",
                f"the message store is full ({self.max_pending_total} undelivered messages);"
                " try again later",
            )
        value = json.loads(text)
        stored: list[StoredMessage] = []
        try:
            with self._writing(len(names)) as db:
                for name in names:
                    count = db.execute(SQL_PENDING_COUNT, (name,)).fetchone()[0]
                    if count >= self.max_pending_per_recipient:
                        raise StoreFull(
                            name,
                            f"{name!r} already has {count} undelivered messages waiting;"
                            " try again later",
                        )
                for name in names:
                    try:
                        cursor = db.execute(
                            SQL_INSERT, (id, name, sender, sender_session, text, grp, created)
                        )
                    except sqlite3.IntegrityError:
                        raise ValueError(
                            f"message {id!r} is already pending for {name!r}"
                        ) from None
                    seq = cursor.lastrowid
                    assert seq is not None
                    stored.append(
                        StoredMessage(
                            id, sender, sender_session, name, seq, value, members, created
                        )
                    )
        except StoreError as exc:
            cause = exc.__cause__
            if getattr(cause, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
                raise StoreFull("", "the message store's disk is full; try again later") from exc
            raise
        self._total += len(stored)
        if self._batch and self._uncommitted_from is None:
            self._uncommitted_from = stored[0].seq
        return stored

    def pending(self, recipient: str, limit: int | None = None) -> list[StoredMessage]:
        """Pending messages for ``recipient``, oldest (smallest seq) first, at most ``limit``."""
        recipient = check_name(recipient, "recipient")
        if limit is None:
            limit = -1
        elif isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ValueError("limit must be None or a non-negative integer")
        with self._reading() as db:
            return [decode_row(r) for r in db.execute(SQL_PENDING, (recipient, limit))]

    def pending_count(self, recipient: str) -> int:
        """How many messages are pending for ``recipient``."""
        recipient = check_name(recipient, "recipient")
        with self._reading() as db:
            count: int = db.execute(SQL_PENDING_COUNT, (recipient,)).fetchone()[0]
        return count

    def pending_total(self) -> int:
        """How many pending rows (one per message and recipient) the store holds."""
        self._conn()
        return self._total

    def pending_recipients(self) -> list[str]:
        """Every recipient with at least one pending message (sorted)."""
        with self._reading() as db:
            return [r[0] for r in db.execute("SELECT DISTINCT recipient FROM pending ORDER BY 1")]

    def previous_pending(self, message: StoredMessage) -> int:
        """Seq of the latest still-pending message of the same (sender, recipient) with a
        smaller seq, or 0.

        The recipient daemon shows a message only once it has shown this one (or it is 0):
        that keeps each pair in order across retransmits and several recipient daemons,
        without making a delivered or expired message block the ones after it.
        """
        if not isinstance(message, StoredMessage):
            raise ValueError("previous_pending takes a StoredMessage")
        sender = check_name(message.sender, "sender")
        recipient = check_name(message.recipient, "recipient")
        with self._reading() as db:
            prev = db.execute(SQL_PREVIOUS, (sender, recipient, check_seq(message.seq))).fetchone()[
                0
            ]
        return prev or 0

    def get(self, id: str, recipient: str) -> StoredMessage | None:
        """The pending copy of message ``id`` for ``recipient``, if it is still pending."""
        id = check_name(id, "message id")
        recipient = check_name(recipient, "recipient")
        with self._reading() as db:
            row = db.execute(SQL_GET, (id, recipient)).fetchone()
        return None if row is None else decode_row(row)

    def mark_delivered(self, id: str, recipient: str) -> StoredMessage | None:
        """Forget the pending copy for ``recipient`` (delivered); it, or None if not pending."""
        id = check_name(id, "message id")
        recipient = check_name(recipient, "recipient")
        with self._writing() as db:
            row = db.execute(SQL_GET, (id, recipient)).fetchone()
            if row is None:
                return None
            db.execute("DELETE FROM pending WHERE seq = ?", (row[4],))
        self._total -= 1
        return decode_row(row)

    def expire(self, now: float) -> list[StoredMessage]:
        """Delete and return (oldest first) pending messages created before ``now - max_age_s``."""
        cutoff = check_time(now, "now") - self.max_age_s
        with self._writing() as db:
            rows = db.execute(SQL_EXPIRED, (cutoff,)).fetchall()
            if rows:
                db.execute("DELETE FROM pending WHERE created_at < ?", (cutoff,))
        self._total -= len(rows)
        rows.sort(key=lambda r: r[4])  # seq: oldest first
        return [decode_row(r) for r in rows]

    # ------------------------------------------------------------------ recipient side

    def last_delivered(self, origin: str, sender: str, recipient: str) -> int:
        """Seq of the last message from ``origin``'s store this daemon showed for the pair."""
        key = (
            check_name(origin, "origin"),
            check_name(sender, "sender"),
            check_name(recipient, "recipient"),
        )
        with self._reading() as db:
            row = db.execute(SQL_LAST_DELIVERED, key).fetchone()
        return 0 if row is None else int(row[0])

    def set_last_delivered(
        self, origin: str, sender: str, recipient: str, seq: int, at: float
    ) -> None:
        """Record that message ``seq`` was shown (keeps the largest seq); committed on return
        (in a batch: once :meth:`commit` has returned)."""
        row = (
            check_storable_name(origin, "origin"),
            check_storable_name(sender, "sender"),
            check_storable_name(recipient, "recipient"),
            check_seq(seq),
            check_time(at, "at"),
        )
        with self._writing() as db:
            db.execute(SQL_SET_DELIVERED, row)

    def prune(self, now: float) -> int:
        """Forget delivery marks not updated for ``max_age_s``; how many were forgotten."""
        cutoff = check_time(now, "now") - self.max_age_s
        with self._writing() as db:
            count = db.execute("DELETE FROM delivered WHERE updated_at < ?", (cutoff,)).rowcount
        return count

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Close the file (checkpointing the WAL into it). Safe to call twice.

        An open batch is thrown away, not committed, as a crash would: a caller that wants
        it kept commits first."""
        self._batch = self._batch_dirty = False
        self._uncommitted_from = None
        db, self._db = self._db, None
        if db is not None:
            db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
