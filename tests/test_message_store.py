"""The durable store for reliable direct messages (presenced.server.messaging.store).

Plain synchronous tests against real SQLite files in ``tmp_path``, one crash test that
SIGKILLs a real writer process, and a hypothesis state machine that runs random
add / deliver / expire / reopen scripts against a dict model.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from store_helpers import deny_commit

import presenced
from presenced.server.messaging import store as message_store
from presenced.server.messaging.store import (
    MessageStore,
    StoredMessage,
    StoreError,
    StoreFull,
)

DAY = 86400.0


@pytest.fixture
def store(tmp_path: Path) -> Any:
    with MessageStore.in_dir(tmp_path / "data") as s:
        yield s


def ids(messages: list[StoredMessage]) -> list[str]:
    return [m.id for m in messages]


# ---------------------------------------------------------------------- sender side


def test_add_pending_deliver(store: MessageStore) -> None:
    [a] = store.add("m1", "ann", "s1", ["bob"], {"text": "hi"}, 100.0)
    assert a == StoredMessage("m1", "ann", "s1", "bob", a.seq, {"text": "hi"}, (), 100.0)
    [b] = store.add("m2", "cid", "s2", ["bob"], [1, "two", None], 101.0)
    [c] = store.add("m3", "ann", "s1", ["dan"], "x", 102.0)
    assert a.seq < b.seq < c.seq
    assert store.pending("bob") == [a, b]
    assert store.pending("bob", limit=1) == [a]
    assert store.pending("bob", limit=0) == []
    assert store.pending("nobody") == []
    assert store.pending_count("bob") == 2
    assert store.pending_total() == 3
    assert store.pending_recipients() == ["bob", "dan"]
    assert store.get("m2", "bob") == b
    assert store.get("m2", "dan") is None

    assert store.mark_delivered("m1", "bob") == a
    assert store.mark_delivered("m1", "bob") is None
    assert store.mark_delivered("m3", "bob") is None
    assert store.pending("bob") == [b]
    assert store.pending_total() == 2
    assert store.mark_delivered("m3", "dan") == c
    assert store.pending_recipients() == ["bob"]


def test_group_message_one_row_per_recipient(store: MessageStore) -> None:
    rows = store.add("g1", "ann", "s1", ["bob", "carol", "dan"], {"t": 1}, 5.0)
    assert [r.recipient for r in rows] == ["bob", "carol", "dan"]
    assert all(r.id == "g1" and r.group == ("bob", "carol", "dan") for r in rows)
    assert [r.seq for r in rows] == sorted({r.seq for r in rows})
    for r in rows:
        assert store.pending(r.recipient) == [r]
    # Delivery to one recipient leaves the others pending.
    store.mark_delivered("g1", "carol")
    assert store.get("g1", "bob") == rows[0] and store.get("g1", "dan") == rows[2]
    assert store.pending_total() == 2
    # An explicit group, e.g. a one-recipient group message.
    [solo] = store.add("g2", "ann", "s1", ["bob"], None, 6.0, group=["bob"])
    assert solo.group == ("bob",) and store.get("g2", "bob") == solo


def test_group_is_atomic_on_bad_input(store: MessageStore) -> None:
    store.add("m1", "ann", "s1", ["carol"], 1, 1.0)
    with pytest.raises(ValueError, match="already pending"):
        store.add("m1", "ann", "s1", ["bob", "carol"], 1, 1.0)
    with pytest.raises(ValueError, match="twice"):
        store.add("m2", "ann", "s1", ["bob", "bob"], 1, 1.0)
    assert store.pending("bob") == [] and store.pending_total() == 1


def test_store_full_per_recipient_writes_nothing(tmp_path: Path) -> None:
    with MessageStore(tmp_path / "s.db", max_pending_per_recipient=2) as store:
        store.add("m1", "ann", "s", ["bob"], 1, 1.0)
        store.add("m2", "cid", "s", ["bob", "carol"], 2, 1.0)
        with pytest.raises(StoreFull) as info:
            store.add("m3", "ann", "s", ["carol", "bob", "dan"], 3, 1.0)
        assert info.value.recipient == "bob"
        assert "bob" in str(info.value) and "\n" not in str(info.value)
        assert store.pending_count("carol") == 1 and store.pending_count("dan") == 0
        assert store.get("m3", "carol") is None
        assert store.pending_total() == 3
        # Room again once one is delivered.
        store.mark_delivered("m1", "bob")
        assert len(store.add("m3", "ann", "s", ["carol", "bob", "dan"], 3, 1.0)) == 3


def test_store_full_total_writes_nothing(tmp_path: Path) -> None:
    with MessageStore(tmp_path / "s.db", max_pending_total=4) as store:
        store.add("m1", "ann", "s", ["a", "b"], 1, 1.0)
        with pytest.raises(StoreFull) as info:
            store.add("m2", "ann", "s", ["c", "d", "e"], 2, 1.0)
        assert info.value.recipient == ""
        assert "full" in str(info.value) and "\n" not in str(info.value)
        assert store.pending_total() == 2
        assert store.pending_recipients() == ["a", "b"]
        store.add("m2", "ann", "s", ["c", "d"], 2, 1.0)
        with pytest.raises(StoreFull):
            store.add("m3", "ann", "s", ["e"], 3, 1.0)
        store.expire(1.0 + 8 * DAY)
        assert store.pending_total() == 0
        store.add("m3", "ann", "s", ["e"], 3, 1.0 + 8 * DAY)


def test_previous_pending(store: MessageStore) -> None:
    def add(mid: str, sender: str, to: list[str]) -> list[StoredMessage]:
        return store.add(mid, sender, "s", to, mid, 1.0)

    [a1] = add("a1", "ann", ["bob"])
    add("x1", "cid", ["bob"])  # another sender, same recipient
    add("x2", "ann", ["dan"])  # same sender, another recipient
    [a2, a2c] = add("a2", "ann", ["bob", "carol"])
    add("x3", "bob", ["ann"])  # the reverse pair
    [a3] = add("a3", "ann", ["bob"])

    assert store.previous_pending(a1) == 0
    assert store.previous_pending(a2) == a1.seq
    assert store.previous_pending(a2c) == 0
    assert store.previous_pending(a3) == a2.seq
    # Delivering the middle one makes the next point past it.
    store.mark_delivered("a2", "bob")
    assert store.previous_pending(a3) == a1.seq
    store.mark_delivered("a1", "bob")
    assert store.previous_pending(a3) == 0
    # A message that is no longer pending still gets an answer (from its own seq down).
    assert store.previous_pending(a2) == 0


def test_expire_by_age(tmp_path: Path) -> None:
    with MessageStore(tmp_path / "s.db", max_age_s=100.0) as store:
        [old] = store.add("old", "ann", "s", ["bob"], 1, 1000.0)
        [mid1, mid2] = store.add("mid", "ann", "s", ["bob", "carol"], 2, 1050.0)
        [new] = store.add("new", "ann", "s", ["bob"], 3, 1100.0)
        assert store.expire(1100.0) == []  # exactly max_age_s old: kept
        assert store.expire(1100.5) == [old]
        assert store.expire(1100.5) == []
        assert store.expire(1200.0) == [mid1, mid2]
        assert store.pending("bob") == [new]
        assert store.pending_total() == 1
        assert store.expire(10_000.0) == [new]
        assert store.pending_recipients() == []


def test_data_round_trips_as_json(store: MessageStore) -> None:
    values: list[Any] = [
        None,
        True,
        0,
        -1.5,
        2**70,
        "",
        "héllo ✓ 🎉",
        "lone \ud800 surrogate",
        "nul\x00byte",
        [],
        {"nested": {"list": [1, {"a": None}]}},
    ]
    for i, value in enumerate(values):
        [row] = store.add(f"m{i}", "ann", "s", ["bob"], value, 1.0)
        assert row.data == value
    assert [m.data for m in store.pending("bob")] == values
    # Tuples come back as lists: what is stored is JSON.
    [row] = store.add("t", "ann", "s", ["carol"], (1, 2), 1.0)
    assert row.data == [1, 2] and store.pending("carol")[0].data == [1, 2]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"data": {1, 2}},
        {"data": float("nan")},
        {"data": object()},
        {"id": 7},
        {"id": "x" * 257},
        {"sender": None},
        {"sender_session": b"bytes"},
        {"recipients": "bob"},
        {"recipients": []},
        {"recipients": ["bob", 3]},
        {"recipients": ["bad \udc80 name"]},
        {"created_at": float("inf")},
        {"created_at": "now"},
        {"group": "bob"},
    ],
)
def test_bad_input_is_a_value_error_and_writes_nothing(
    store: MessageStore, kwargs: dict[str, Any]
) -> None:
    args: dict[str, Any] = {
        "id": "m1",
        "sender": "ann",
        "sender_session": "s",
        "recipients": ["bob"],
        "data": 1,
        "created_at": 1.0,
    }
    args.update(kwargs)
    with pytest.raises(ValueError):
        store.add(**args)
    assert store.pending_total() == 0
    assert store.pending_recipients() == []


def test_deeply_nested_data_is_a_value_error(store: MessageStore) -> None:
    data: Any = []
    for _ in range(100_000):
        data = [data]
    with pytest.raises(ValueError):
        store.add("m1", "ann", "s", ["bob"], data, 1.0)


def test_reads_with_odd_arguments_do_not_crash(store: MessageStore) -> None:
    assert store.pending("x" * 256) == []
    assert store.get("", "") is None
    with pytest.raises(ValueError):
        store.pending(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        store.pending("bob", limit=-1)
    with pytest.raises(ValueError):
        store.get("m", "x" * 1000)
    with pytest.raises(ValueError):
        store.last_delivered("o", "s", 5)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        store.set_last_delivered("o", "s", "r", -1, 1.0)
    with pytest.raises(ValueError):
        store.set_last_delivered("o", "s", "r", 2**63, 1.0)


# ---------------------------------------------------------------------- recipient side


def test_last_delivered_keeps_the_max(store: MessageStore) -> None:
    assert store.last_delivered("eu", "ann", "bob") == 0
    store.set_last_delivered("eu", "ann", "bob", 5, 10.0)
    store.set_last_delivered("eu", "ann", "bob", 3, 11.0)  # a late retransmit
    assert store.last_delivered("eu", "ann", "bob") == 5
    store.set_last_delivered("eu", "ann", "bob", 9, 12.0)
    assert store.last_delivered("eu", "ann", "bob") == 9
    # Keys are independent.
    store.set_last_delivered("us", "ann", "bob", 2, 12.0)
    store.set_last_delivered("eu", "cid", "bob", 1, 12.0)
    store.set_last_delivered("eu", "ann", "carol", 7, 12.0)
    assert store.last_delivered("eu", "ann", "bob") == 9
    assert store.last_delivered("us", "ann", "bob") == 2
    assert store.last_delivered("eu", "cid", "bob") == 1
    assert store.last_delivered("eu", "ann", "carol") == 7
    assert store.last_delivered("eu", "bob", "ann") == 0


def test_prune_forgets_old_marks(tmp_path: Path) -> None:
    with MessageStore(tmp_path / "s.db", max_age_s=100.0) as store:
        store.set_last_delivered("eu", "ann", "bob", 5, 1000.0)
        store.set_last_delivered("eu", "ann", "carol", 6, 1000.0)
        store.set_last_delivered("eu", "ann", "dan", 7, 1050.0)
        # Any update (even one that does not raise seq) counts as recent use.
        store.set_last_delivered("eu", "ann", "carol", 1, 1060.0)
        assert store.prune(1100.0) == 0
        assert store.prune(1101.0) == 1
        assert store.last_delivered("eu", "ann", "bob") == 0
        assert store.last_delivered("eu", "ann", "carol") == 6
        assert store.prune(1200.0) == 2
        assert store.prune(1200.0) == 0
        assert store.last_delivered("eu", "ann", "dan") == 0


# ---------------------------------------------------------------------- the file


def test_reopen_keeps_everything_and_the_seq_counter(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with MessageStore.in_dir(data_dir) as store:
        rows = store.add("g", "ann", "s", ["bob", "carol"], {"k": [1]}, 3.0)
        [solo] = store.add("m", "cid", "t", ["bob"], "x", 4.0)
        store.set_last_delivered("eu", "ann", "bob", 42, 5.0)
    assert (data_dir / "messages.sqlite3").is_file()
    assert data_dir.stat().st_mode & 0o777 == 0o700
    with MessageStore.in_dir(data_dir) as store:
        assert store.pending("bob") == [rows[0], solo]
        assert store.pending("carol") == [rows[1]]
        assert store.pending_total() == 3
        assert store.last_delivered("eu", "ann", "bob") == 42
        high = solo.seq
        for m in [*rows, solo]:
            store.mark_delivered(m.id, m.recipient)
        assert store.pending_total() == 0
    with MessageStore.in_dir(data_dir) as store:
        # Everything deleted, and still the counter goes on from where it was.
        [after] = store.add("n", "ann", "s", ["bob"], 1, 6.0)
        assert after.seq > high


def test_second_opener_is_refused(tmp_path: Path) -> None:
    with MessageStore(tmp_path / "s.db"), pytest.raises(StoreError, match="in use"):
        MessageStore(tmp_path / "s.db")
    MessageStore(tmp_path / "s.db").close()  # free again once closed


def test_not_a_store_file(tmp_path: Path) -> None:
    junk = tmp_path / "junk.sqlite3"
    junk.write_bytes(os.urandom(8192))
    with pytest.raises(StoreError, match="not a presenced message store") as info:
        MessageStore(junk)
    assert str(junk) in str(info.value)

    other = tmp_path / "other.sqlite3"
    db = sqlite3.connect(other)
    db.execute("CREATE TABLE t (x)")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="not a presenced message store") as info:
        MessageStore(other)
    assert str(other) in str(info.value)

    with pytest.raises(StoreError) as info:
        MessageStore(tmp_path)  # a directory
    assert str(tmp_path) in str(info.value)


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    MessageStore(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {message_store.SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="newer") as info:
        MessageStore(path)
    assert str(path) in str(info.value)


def test_corrupt_store(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with MessageStore(path) as store:
        for i in range(300):
            store.add(f"m{i}", "ann", "s", [f"user{i % 7}"], "x" * 200, 1.0)
    size = path.stat().st_size
    assert size > 8 * 4096
    with open(path, "r+b") as f:  # scribble over the middle pages (tables and indexes)
        f.seek(4096)
        f.write(os.urandom(size - 2 * 4096))
    with pytest.raises(StoreError) as info:
        MessageStore(path)
    assert str(path) in str(info.value)


def test_memory_store() -> None:
    with MessageStore(":memory:", max_pending_per_recipient=1) as store:
        [m] = store.add("m1", "ann", "s", ["bob"], 1, 1.0)
        assert store.pending("bob") == [m]
        with pytest.raises(StoreFull):
            store.add("m2", "ann", "s", ["bob"], 1, 1.0)
        store.set_last_delivered("eu", "ann", "bob", 3, 1.0)
        assert store.last_delivered("eu", "ann", "bob") == 3
    with MessageStore(":memory:") as other:  # each :memory: store is its own
        assert other.pending_total() == 0


def test_closed_store_raises_store_error(tmp_path: Path) -> None:
    store = MessageStore(tmp_path / "s.db")
    store.close()
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.pending("bob")
    with pytest.raises(StoreError, match="closed"):
        store.add("m", "ann", "s", ["bob"], 1, 1.0)


def test_settings(tmp_path: Path) -> None:
    with MessageStore(tmp_path / "s.db", synchronous="FULL") as store:
        db = store._conn()
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        store.add("m", "ann", "s", ["bob"], 1, 1.0)
    with MessageStore(tmp_path / "s.db") as store:
        assert store._conn().execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    with pytest.raises(ValueError):
        MessageStore(tmp_path / "t.db", synchronous="OFF")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("sql", "params"),
    [
        (message_store.SQL_PENDING, ("bob", 10)),
        (message_store.SQL_PENDING_COUNT, ("bob",)),
        (message_store.SQL_PREVIOUS, ("ann", "bob", 5)),
        (message_store.SQL_GET, ("m", "bob")),
        (message_store.SQL_EXPIRED, (1.0,)),
        (message_store.SQL_LAST_DELIVERED, ("eu", "ann", "bob")),
    ],
)
def test_hot_queries_use_indexes(store: MessageStore, sql: str, params: tuple[Any, ...]) -> None:
    plan = " | ".join(row[-1] for row in store._conn().execute(f"EXPLAIN QUERY PLAN {sql}", params))
    assert "SEARCH" in plan and "SCAN" not in plan, plan
    assert "TEMP B-TREE" not in plan, plan


# ---------------------------------------------------------------------- group commit


def test_a_batch_is_one_commit_and_reads_see_it(tmp_path: Path) -> None:
    with MessageStore(tmp_path / "s.db") as store:
        [old] = store.add("m0", "ann", "s", ["bob"], 0, 1.0)
        assert store.commits == 1
        store.begin()
        assert store.in_batch
        added = [store.add(f"m{i}", "ann", "s", ["bob", "carol"], i, 1.0) for i in range(1, 51)]
        store.set_last_delivered("eu", "dan", "ann", 7, 1.0)
        assert store.mark_delivered("m0", "bob") == old
        # Reads see the open batch; none of it is committed, nothing older is uncommitted.
        assert store.pending_total() == 100 and store.pending_count("bob") == 50
        assert store.last_delivered("eu", "dan", "ann") == 7
        assert store.commits == 1
        assert store.is_committed(old)
        assert not any(store.is_committed(m) for copies in added for m in copies)
        assert store.commit() is True
        assert store.commits == 2 and not store.in_batch
        assert all(store.is_committed(m) for copies in added for m in copies)
        store.begin()
        assert store.commit() is False  # an empty batch costs no commit
        assert store.commits == 2
    with MessageStore(tmp_path / "s.db") as store:
        assert store.pending_total() == 100 and store.get("m0", "bob") is None
        assert store.last_delivered("eu", "dan", "ann") == 7


def test_limits_are_checked_per_message_inside_a_batch(tmp_path: Path) -> None:
    with MessageStore(tmp_path / "s.db", max_pending_per_recipient=3) as store:
        store.begin()
        for i in range(3):
            store.add(f"m{i}", "ann", "s", ["bob"], i, 1.0)
        with pytest.raises(StoreFull) as info:
            store.add("m3", "ann", "s", ["carol", "bob"], 3, 1.0)
        assert info.value.recipient == "bob" and "3 undelivered" in str(info.value)
        with pytest.raises(ValueError, match="already pending"):
            store.add("m4", "ann", "s", ["carol", "carol2"], 4, 1.0)
            store.add("m4", "ann", "s", ["carol"], 4, 1.0)
        # A refused write undid only itself: the rest of the batch commits.
        store.commit()
        assert [m.id for m in store.pending("bob")] == ["m0", "m1", "m2"]
        assert store.get("m3", "carol") is None
        assert ids(store.pending("carol")) == ["m4"] and store.pending_total() == 5
    with MessageStore(tmp_path / "t.db", max_pending_total=2) as store:
        store.begin()
        store.add("a", "ann", "s", ["x", "y"], 1, 1.0)
        with pytest.raises(StoreFull, match="full"):
            store.add("b", "ann", "s", ["z"], 1, 1.0)
        store.rollback()
        assert store.pending_total() == 0
        store.add("b", "ann", "s", ["z"], 1, 1.0)


def test_a_failed_commit_stores_nothing_of_the_batch(tmp_path: Path) -> None:
    with MessageStore(tmp_path / "s.db") as store:
        [kept] = store.add("m0", "ann", "s", ["bob"], 0, 1.0)
        store.begin()
        store.add("m1", "ann", "s", ["bob"], 1, 1.0)
        store.set_last_delivered("eu", "dan", "ann", 9, 1.0)
        store.mark_delivered("m0", "bob")
        deny_commit(store)
        with pytest.raises(StoreError, match="not authorized"):
            store.commit()
        store._conn().set_authorizer(None)
        assert not store.in_batch
        assert store.pending("bob") == [kept] and store.pending_total() == 1
        assert store.last_delivered("eu", "dan", "ann") == 0
        # The seq the lost row had is taken again: it never left the process.
        [again] = store.add("m2", "ann", "s", ["bob"], 2, 1.0)
        assert again.seq == kept.seq + 1


def test_an_uncommitted_batch_is_gone_after_close(tmp_path: Path) -> None:
    with MessageStore(tmp_path / "s.db") as store:
        store.add("m0", "ann", "s", ["bob"], 0, 1.0)
        store.begin()
        store.add("m1", "ann", "s", ["bob"], 1, 1.0)
        store.set_last_delivered("eu", "dan", "ann", 9, 1.0)
    with MessageStore(tmp_path / "s.db") as store:
        assert ids(store.pending("bob")) == ["m0"]
        assert store.last_delivered("eu", "dan", "ann") == 0
        with pytest.raises(StoreError, match="no batch"):
            store.commit()
        store.begin()
        with pytest.raises(StoreError, match="already open"):
            store.begin()
        store.rollback()


# ---------------------------------------------------------------------- crash durability

_WRITER = textwrap.dedent(
    """
    import sys
    from presenced.server.messaging.store import MessageStore

    store = MessageStore(sys.argv[1], max_pending_per_recipient=10**6)
    batch = int(sys.argv[2])  # 0: every add commits; n: n adds per batch, one commit
    out = sys.stdout
    i = 0
    while True:
        if batch:
            store.begin()
        acks = []
        for _ in range(max(batch, 1)):
            mid = f"m{i}"
            recipients = ["bob", "carol"] if i % 3 == 0 else [f"user{i % 5}"]
            store.add(mid, "ann", "s1", recipients, {"n": i, "pad": "x" * 100}, 1.0)
            acks.append(f"{mid} {','.join(recipients)}\\n")
            i += 1
        if batch:
            store.commit()  # acknowledged only once committed
        out.write("".join(acks))
        out.flush()
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("batch", [0, 7])
def test_acknowledged_messages_survive_sigkill(tmp_path: Path, batch: int) -> None:
    path = tmp_path / "messages.sqlite3"
    env = dict(os.environ)
    root = str(Path(presenced.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path), str(batch)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    watchdog = threading.Timer(20.0, proc.kill)
    watchdog.start()
    assert proc.stdout is not None and proc.stderr is not None
    try:
        lines: list[str] = []
        while len(lines) < 400:
            line = proc.stdout.readline()
            if not line:
                pytest.fail(f"writer stopped early: {proc.stderr.read()}")
            lines.append(line)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        lines.extend(proc.stdout.readlines())  # acknowledged before the kill, still in the pipe
    finally:
        watchdog.cancel()
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    acked = [line.split() for line in lines if line.endswith("\n")]
    with MessageStore(path) as store:
        for mid, recipients in acked:
            for recipient in recipients.split(","):
                row = store.get(mid, recipient)
                assert row is not None, f"{mid} for {recipient} was acknowledged, then lost"
                assert row.data["n"] == int(mid[1:])
        # Nothing half-written: every message is there for all its recipients or none.
        seen: dict[str, int] = {}
        for recipient in store.pending_recipients():
            for row in store.pending(recipient):
                seen[row.id] = seen.get(row.id, 0) + 1
        for mid, count in seen.items():
            assert count == (2 if int(mid[1:]) % 3 == 0 else 1), mid
        assert len(seen) >= len(acked)


# ---------------------------------------------------------------------- state machine

USERS = ["ann", "bob", "carol"]


class StoreMachine(RuleBasedStateMachine):
    """Random add / deliver / expire / reopen / mark scripts against a plain model."""

    MAX_AGE = 50.0

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="msgstore-")
        self.path = os.path.join(self.dir, "s.db")
        self.store = self._open()
        #: seq -> the row the store should hold.
        self.model: dict[int, StoredMessage] = {}
        self.marks: dict[tuple[str, str, str], tuple[int, float]] = {}
        self.high = 0
        self.now = 0.0
        self.next_id = 0

    def _open(self) -> MessageStore:
        return MessageStore(
            self.path, max_pending_per_recipient=4, max_pending_total=9, max_age_s=self.MAX_AGE
        )

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(
        sender=st.sampled_from(USERS),
        recipients=st.lists(st.sampled_from(USERS), min_size=1, max_size=3, unique=True),
        data=st.integers(),
    )
    def add(self, sender: str, recipients: list[str], data: int) -> None:
        mid = f"m{self.next_id}"
        self.next_id += 1
        counts = {r: sum(m.recipient == r for m in self.model.values()) for r in recipients}
        full = len(self.model) + len(recipients) > 9 or max(counts.values()) >= 4
        try:
            rows = self.store.add(mid, sender, "s", recipients, data, self.now)
        except StoreFull:
            assert full
            return
        assert not full
        assert [r.recipient for r in rows] == recipients
        for row in rows:
            assert row.seq > self.high
            self.high = row.seq
            self.model[row.seq] = row

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def deliver(self, data: st.DataObject) -> None:
        seq = data.draw(st.sampled_from(sorted(self.model)))
        row = self.model.pop(seq)
        assert self.store.mark_delivered(row.id, row.recipient) == row
        assert self.store.mark_delivered(row.id, row.recipient) is None

    @rule(dt=st.floats(0, 30))
    def tick_and_expire(self, dt: float) -> None:
        self.now += dt
        gone = sorted(
            (m for m in self.model.values() if m.created_at < self.now - self.MAX_AGE),
            key=lambda m: m.seq,
        )
        assert self.store.expire(self.now) == gone
        for m in gone:
            del self.model[m.seq]

    @rule(
        origin=st.sampled_from(["eu", "us"]),
        sender=st.sampled_from(USERS),
        recipient=st.sampled_from(USERS),
        seq=st.integers(0, 20),
    )
    def mark(self, origin: str, sender: str, recipient: str, seq: int) -> None:
        key = (origin, sender, recipient)
        old_seq, old_at = self.marks.get(key, (0, self.now))
        self.store.set_last_delivered(origin, sender, recipient, seq, self.now)
        self.marks[key] = (max(old_seq, seq), max(old_at, self.now))

    @rule()
    def prune(self) -> None:
        old = [k for k, (_, at) in self.marks.items() if at < self.now - self.MAX_AGE]
        assert self.store.prune(self.now) == len(old)
        for k in old:
            del self.marks[k]

    @rule()
    def reopen(self) -> None:
        self.store.close()
        self.store = self._open()

    @invariant()
    def matches_model(self) -> None:
        rows = sorted(self.model.values(), key=lambda m: m.seq)
        assert self.store.pending_total() == len(rows)
        assert self.store.pending_recipients() == sorted({m.recipient for m in rows})
        for user in USERS:
            mine = [m for m in rows if m.recipient == user]
            assert self.store.pending(user) == mine
            assert self.store.pending_count(user) == len(mine)
        for m in rows:
            earlier = [
                o.seq
                for o in rows
                if o.sender == m.sender and o.recipient == m.recipient and o.seq < m.seq
            ]
            assert self.store.previous_pending(m) == max(earlier, default=0)
        for (origin, sender, recipient), (seq, _) in self.marks.items():
            assert self.store.last_delivered(origin, sender, recipient) == seq


TestStoreMachine = StoreMachine.TestCase
TestStoreMachine.settings = settings(
    max_examples=80,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
