"""daemon.state.db: the SQLite worker thread, group commit, ordering, migrations."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest

from daemon.state import db as store_mod
from daemon.state.db import MIGRATIONS, SCHEMA_VERSION, Store, migrate


async def test_open_creates_schema_and_wal(db: Store) -> None:
    assert db.path.exists()
    (version,) = (await db.query("PRAGMA user_version"))[0]
    assert version == SCHEMA_VERSION == MIGRATIONS[-1][0]
    (mode,) = (await db.query("PRAGMA journal_mode"))[0]
    assert mode == "wal"
    tables = {
        r["name"] for r in await db.query("SELECT name FROM sqlite_master WHERE type='table'")
    }
    assert {"shared", "agents", "sessions", "processes", "events"} <= tables


async def test_write_is_committed_when_awaited(db: Store) -> None:
    await db.write("INSERT INTO shared(key, value, updated_at) VALUES(?,?,?)", ("k", b"1", 1.0))
    # A second, independent connection sees it: the write was committed, not just executed.
    other = sqlite3.connect(db.path)
    try:
        assert other.execute("SELECT value FROM shared WHERE key='k'").fetchone() == (b"1",)
    finally:
        other.close()


async def test_runs_on_one_thread_that_is_not_the_loop(db: Store) -> None:
    idents = {await db.call(lambda c: threading.get_ident()) for _ in range(5)}
    assert len(idents) == 1
    assert threading.get_ident() not in idents


async def test_write_nowait_keeps_order_with_awaited_writes(db: Store) -> None:
    sql = (
        "INSERT INTO shared(key, value, updated_at) VALUES(?,?,?) "
        "ON CONFLICT(key) DO UPDATE SET value=excluded.value"
    )
    for i in range(500):
        db.write_nowait(sql, ("k", str(i).encode(), float(i)))
    db.write_nowait("DELETE FROM shared WHERE key=?", ("gone",))
    db.write_nowait(sql, ("gone", b"x", 0.0))
    await db.write(sql, ("last", b"L", 0.0))
    db.write_nowait("DELETE FROM shared WHERE key=?", ("last",))
    # A query queued behind fire-and-forget writes sees all of them, in order.
    rows = {r["key"]: r["value"] for r in await db.query("SELECT key, value FROM shared")}
    assert rows == {"k": b"499", "gone": b"x"}


async def test_event_inserts_keep_seq_order(db: Store) -> None:
    for seq in range(1, 301):
        db.write_nowait(
            "INSERT INTO events(seq, event_type, timestamp, data) VALUES(?,?,?,?)",
            (seq, f"T{seq}", "t", b"{}"),
        )
    rows = await db.query("SELECT seq, event_type FROM events ORDER BY rowid")
    assert [r["seq"] for r in rows] == list(range(1, 301))
    assert all(r["event_type"] == f"T{r['seq']}" for r in rows)


async def test_group_commit_shares_one_commit(db: Store) -> None:
    statements: list[str] = []
    await db.call(lambda c: c.set_trace_callback(statements.append))
    gate = threading.Event()
    # Park the worker so that everything below queues up behind it.
    blocker = asyncio.ensure_future(db.call(lambda c: gate.wait(5)))
    await asyncio.sleep(0.05)
    sql = "INSERT INTO shared(key, value, updated_at) VALUES(?,?,?)"
    for i in range(50):
        db.write_nowait(sql, (f"n{i}", b"1", 0.0))
    waiters = [asyncio.ensure_future(db.write(sql, (f"w{i}", b"1", 0.0))) for i in range(10)]
    await asyncio.sleep(0.05)
    gate.set()
    assert await blocker is True
    await asyncio.gather(*waiters)
    await db.call(lambda c: c.set_trace_callback(None))
    commits = [s for s in statements if s.strip().upper() == "COMMIT"]
    assert len(commits) == 1, statements[-5:]
    (count,) = (await db.query("SELECT COUNT(*) FROM shared"))[0]
    assert count == 60


async def test_failed_write_reports_to_its_waiter_only(db: Store) -> None:
    await db.write("INSERT INTO shared(key, value, updated_at) VALUES(?,?,?)", ("a", b"1", 0.0))
    with pytest.raises(sqlite3.IntegrityError):
        await db.write("INSERT INTO shared(key, value, updated_at) VALUES(?,?,?)", ("a", b"2", 0.0))
    db.write_nowait("INSERT INTO no_such_table VALUES(1)")  # logged, not raised
    await db.write("INSERT INTO shared(key, value, updated_at) VALUES(?,?,?)", ("b", b"3", 0.0))
    rows = {r["key"]: r["value"] for r in await db.query("SELECT key, value FROM shared")}
    assert rows == {"a": b"1", "b": b"3"}


async def test_close_flushes_pending_writes(tmp_path: Path) -> None:
    path = tmp_path / "x.sqlite3"
    s = Store(path)
    await s.open()
    for i in range(200):
        s.write_nowait(
            "INSERT INTO events(seq, event_type, timestamp, data) VALUES(?,?,?,?)",
            (i + 1, "T", "t", b"{}"),
        )
    await s.close()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT COUNT(*) FROM events").fetchone() == (200,)
    finally:
        conn.close()


async def test_reopen_does_not_migrate_again(tmp_path: Path) -> None:
    path = tmp_path / "x.sqlite3"
    s = Store(path)
    await s.open()
    await s.write("INSERT INTO shared(key, value, updated_at) VALUES(?,?,?)", ("k", b"v", 0.0))
    await s.close()
    s2 = Store(path)
    await s2.open()
    try:
        rows = await s2.query("SELECT value FROM shared WHERE key='k'")
        assert rows[0]["value"] == b"v"
    finally:
        await s2.close()


def test_migrate_applies_pending_steps_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conn = sqlite3.connect(tmp_path / "m.sqlite3")
    try:
        assert migrate(conn) == SCHEMA_VERSION
        conn.execute("INSERT INTO shared(key, value, updated_at) VALUES('k', x'01', 0)")
        conn.commit()
        # A later release appends steps; an existing database gets exactly those.
        extra = [
            (
                SCHEMA_VERSION + 1,
                ["ALTER TABLE shared ADD COLUMN note TEXT", "UPDATE shared SET note='migrated'"],
            ),
            (SCHEMA_VERSION + 2, ["CREATE TABLE extra (x INTEGER)"]),
        ]
        monkeypatch.setattr(store_mod, "MIGRATIONS", [*MIGRATIONS, *extra])
        monkeypatch.setattr(store_mod, "SCHEMA_VERSION", SCHEMA_VERSION + 2)
        assert store_mod.migrate(conn) == SCHEMA_VERSION + 2
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION + 2,)
        assert conn.execute("SELECT note FROM shared").fetchone() == ("migrated",)
        # Idempotent: a second run applies nothing (the ALTER would fail if re-run).
        assert store_mod.migrate(conn) == SCHEMA_VERSION + 2
    finally:
        conn.close()


def test_failed_migration_step_rolls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conn = sqlite3.connect(tmp_path / "m.sqlite3")
    try:
        migrate(conn)
        bad = (SCHEMA_VERSION + 1, ["CREATE TABLE half (x INTEGER)", "THIS IS NOT SQL"])
        monkeypatch.setattr(store_mod, "MIGRATIONS", [*MIGRATIONS, bad])
        monkeypatch.setattr(store_mod, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
        with pytest.raises(sqlite3.OperationalError):
            store_mod.migrate(conn)
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    finally:
        conn.close()


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "new.sqlite3"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    s = Store(path)
    with pytest.raises(RuntimeError, match="newer than this daemon"):
        await s.open()
    # The database was not touched.
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION + 1,)
        assert conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone() == (0,)
    finally:
        conn.close()
