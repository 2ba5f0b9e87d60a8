"""Storage faults: a full or failing state disk, a full log disk, a write burst, other users.

Real full disks are small tmpfs mounts (root only, as in CI; skipped with a reason elsewhere,
unmounted in teardown). Without root the same failures are injected: SQLite's
``max_page_count`` makes a genuine SQLITE_FULL, ``query_only`` a genuine SQLITE_READONLY.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import sqlite3
import stat
import subprocess
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from daemon.errors import StorageError
from daemon.state import turnlog
from daemon.state.db import Store
from daemon.state.records import StateManager
from daemon.state.turnlog import TurnLog
from tests.helpers import fill, short_tmpdir
from tests.inproc import InProcessDaemon

SET = (
    "INSERT INTO shared(key, value, updated_at) VALUES(?,?,?) "
    "ON CONFLICT(key) DO UPDATE SET value=excluded.value"
)
EVENT = "INSERT INTO events(seq, event_type, timestamp, data) VALUES(?,?,?,?)"
NOBODY = 65534


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def keys(db: Path) -> set[str]:
    """What is really on disk, read by an independent connection."""
    conn = sqlite3.connect(db)
    try:
        return {k for (k,) in conn.execute("SELECT key FROM shared")}
    finally:
        conn.close()


async def write_until_full(log: TurnLog, session_id: str) -> int:
    """Append 50 KB lines until the disk is full; how many went in."""
    for written in range(1000):
        try:
            await log.claude(session_id, {"result": "a" * 50_000}, process_id=str(written))
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            return written
    raise AssertionError("the disk never filled")


def failing(store: Store) -> bool:
    return store.failure is not None


async def park(store: Store) -> tuple[threading.Event, asyncio.Future[Any]]:
    """Hold the store's worker so that the jobs queued next share one batch."""
    gate, running = threading.Event(), threading.Event()

    def hold(conn: sqlite3.Connection) -> bool:
        running.set()
        return gate.wait(10)

    blocker = asyncio.ensure_future(store.call(hold))
    await asyncio.to_thread(running.wait, 10)
    return gate, blocker


async def db_full(store: Store) -> None:
    """No page may be added to the database file any more (a real SQLITE_FULL)."""

    def cap(conn: sqlite3.Connection) -> None:
        (pages,) = conn.execute("PRAGMA page_count").fetchone()
        conn.execute(f"PRAGMA max_page_count={pages}")

    await store.call(cap)


async def db_roomy(store: Store) -> None:
    await store.call(lambda c: c.execute("PRAGMA max_page_count=1073741823"))


@pytest.fixture
async def state(db: Store) -> StateManager:
    manager = StateManager(db)
    await manager.load(idempotency_window_s=600.0)
    return manager


def as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )


# -- a full or failing state database: typed errors, memory follows disk ----------------------


async def test_writes_to_a_full_database_are_storage_full_and_change_nothing(
    state: StateManager,
) -> None:
    await state.set_shared("kept", 1)
    await state.register_agent("a1", "writer", [], {})
    await db_full(state.store)
    big = "x" * 200_000
    with pytest.raises(StorageError) as caught:
        await state.set_shared("new", big)
    assert caught.value.code == "STORAGE_FULL"
    assert caught.value.details == {"sqlite_error": "SQLITE_FULL", "path": str(state.store.path)}
    with pytest.raises(StorageError, match="disk is full"):
        await state.set_shared("kept", big)
    with pytest.raises(StorageError):
        await state.register_agent("a2", "reader", [], {"notes": big})
    with pytest.raises(StorageError):
        await state.register_agent("a1", "editor", [], {"notes": big})
    # Memory took none of it, and neither did the disk.
    assert state.shared["kept"][0] == 1
    assert "new" not in state.shared
    assert sorted(state.agents) == ["a1"]
    assert state.agents["a1"].role == "writer"
    assert keys(state.store.path) == {"kept"}
    rows = await state.store.query("SELECT agent_id, role FROM agents")
    assert [(r["agent_id"], r["role"]) for r in rows] == [("a1", "writer")]
    await db_roomy(state.store)
    await state.set_shared("new", big)  # room again: the same write now goes through
    assert "new" in state.shared
    assert keys(state.store.path) == {"kept", "new"}


async def test_deletes_that_cannot_be_persisted_are_storage_errors_and_keep_the_entry(
    state: StateManager,
) -> None:
    await state.set_shared("k", "v")
    await state.register_agent("a1", "writer", [], {})
    await state.store.call(lambda c: c.execute("PRAGMA query_only=ON"))  # SQLITE_READONLY
    with pytest.raises(StorageError) as caught:
        await state.delete_shared("k")
    assert caught.value.code == "STORAGE_ERROR"
    assert caught.value.details is not None
    assert caught.value.details["sqlite_error"] == "SQLITE_READONLY"
    with pytest.raises(StorageError):
        await state.unregister_agent("a1")
    assert "k" in state.shared
    assert "a1" in state.agents
    await state.store.call(lambda c: c.execute("PRAGMA query_only=OFF"))
    assert keys(state.store.path) == {"k"}
    assert await state.delete_shared("k") is True
    assert await state.unregister_agent("a1") is True


async def test_a_write_sharing_a_transaction_with_a_failed_one_is_not_reported_done(
    db: Store,
) -> None:
    # SQLite rolls the whole transaction back on SQLITE_FULL (measured: also for the writes
    # before the failing one), so a group-committed neighbour must fail too, not "succeed".
    await db_full(db)
    gate, blocker = await park(db)
    small = asyncio.ensure_future(db.write(SET, ("small", b"1", 0.0)))
    big = asyncio.ensure_future(db.write(SET, ("big", b"x" * 300_000, 0.0)))
    await asyncio.sleep(0)  # both queued behind the parked worker
    gate.set()
    await blocker
    results = await asyncio.gather(small, big, return_exceptions=True)
    assert all(isinstance(r, StorageError) and r.code == "STORAGE_FULL" for r in results), results
    assert keys(db.path) == set()


async def test_a_failed_commit_is_rolled_back_not_committed_by_the_next_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fail = threading.Event()

    class FlakyCommit(sqlite3.Connection):
        def commit(self) -> None:
            if fail.is_set():
                fail.clear()
                raise sqlite3.OperationalError("injected commit failure")
            super().commit()

    real_connect = sqlite3.connect
    monkeypatch.setattr(
        sqlite3, "connect", lambda *a, **k: real_connect(*a, **k, factory=FlakyCommit)
    )
    store = Store(tmp_path / "state" / "ksi.sqlite3")
    await store.open()
    try:
        fail.set()
        with pytest.raises(StorageError) as caught:
            await store.write(SET, ("lost", b"1", 0.0))
        assert caught.value.code == "STORAGE_ERROR"
        assert failing(store)
        await store.write(SET, ("next", b"2", 0.0))
        assert not failing(store)  # a successful commit clears it
        # The failed write stayed failed: the next commit did not carry it along.
        assert keys(store.path) == {"next"}
    finally:
        await store.close()


async def test_a_lost_fire_and_forget_write_is_the_health_signal_until_a_commit_succeeds(
    db: Store,
) -> None:
    db.check_writable()
    await db_full(db)
    assert db.write_nowait(EVENT, (1, "T", "t", b"x" * 300_000)) is True  # queued...
    await db.query("SELECT 1")  # ...and failed behind the scenes
    assert db.lost_writes == 1
    assert db.failure is not None
    assert db.failure.code == "STORAGE_FULL"
    health = db.health()
    assert (health["writable"], health["failure"]["code"], health["lost_writes"]) == (
        False,
        "STORAGE_FULL",
        1,
    )
    await db_roomy(db)
    await db.query("SELECT 1")
    assert failing(db)  # room again, but only a commit can tell
    with pytest.raises(StorageError) as caught:
        db.check_writable()  # what SPAWN and PUBLISH call before they report success
    assert caught.value.code == "STORAGE_FULL"
    # Nothing else writes while commands are refused, so the check queued a small probe.
    await db.query("SELECT 1")
    assert not failing(db)
    db.check_writable()
    assert db.health()["writable"] is True


# -- the write queue is bounded in bytes --------------------------------------------------------


@pytest.fixture
async def small_queue(tmp_path: Path) -> AsyncIterator[Store]:
    store = Store(tmp_path / "state" / "ksi.sqlite3", queue_bytes=1 << 20)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def test_the_write_queue_is_bounded_in_bytes(small_queue: Store) -> None:
    store = small_queue
    gate, blocker = await park(store)
    blob = b"e" * 65536
    accepted = [store.write_nowait(EVENT, (i, "T", "t", blob)) for i in range(1, 101)]
    # Fire-and-forget: refused, not queued, once twice the budget (2 MiB) is queued.
    assert 30 <= accepted.count(True) <= 34
    assert store.lost_writes == accepted.count(False)
    assert store.queued_bytes <= 2 * store.queue_bytes + len(blob) + 1024
    with pytest.raises(StorageError) as caught:
        store.check_writable()
    assert caught.value.code == "STORAGE_BUSY"
    # Awaited writes and wait_writable() wait for room instead (nothing more is queued).
    queued = store.queued_bytes
    awaited = asyncio.ensure_future(store.write(SET, ("k", b"v", 0.0)))
    room = asyncio.ensure_future(store.wait_writable())
    for _ in range(5):
        await asyncio.sleep(0)
    assert not awaited.done()
    assert not room.done()
    assert store.queued_bytes == queued
    gate.set()
    await blocker
    await asyncio.wait_for(asyncio.gather(awaited, room), 10)
    await store.query("SELECT 1")
    assert store.queued_bytes == 0
    store.check_writable()
    (count,) = (await store.query("SELECT COUNT(*) FROM events"))[0]
    assert count == accepted.count(True)


async def test_a_publisher_that_waits_for_room_loses_nothing(small_queue: Store) -> None:
    store = small_queue
    blob = b"p" * 65536
    peak = 0
    for i in range(1, 201):  # 12.5 MiB through a 1 MiB budget, as PUBLISH does
        await store.wait_writable()
        assert store.write_nowait(EVENT, (i, "T", "t", blob)) is True
        peak = max(peak, store.queued_bytes)
    await store.query("SELECT 1")
    assert store.lost_writes == 0
    assert peak <= store.queue_bytes + len(blob) + 1024
    (count,) = (await store.query("SELECT COUNT(*) FROM events"))[0]
    assert count == 200


# -- a real full state disk (tmpfs) -------------------------------------------------------------


async def test_a_real_full_disk_fails_the_whole_group_and_recovers(
    tmpfs: Callable[[str], Path],
) -> None:
    disk = tmpfs("2m")
    store = Store(disk / "state" / "ksi.sqlite3")
    await store.open()
    try:
        filler = fill(disk)
        gate, blocker = await park(store)
        small = asyncio.ensure_future(store.write(SET, ("small", b"1", 0.0)))
        store.write_nowait(EVENT, (1, "T", "t", b"x" * 300_000))
        await asyncio.sleep(0)
        gate.set()
        await blocker
        with pytest.raises(StorageError) as caught:
            await small
        assert caught.value.code == "STORAGE_FULL"
        assert store.lost_writes == 1
        with pytest.raises(StorageError):
            store.check_writable()  # queues a probe, which may run before the unlink
        await store.query("SELECT 1")
        filler.unlink()
        # If that probe ran out of space too, the store is still failing: this queues one
        # more, which finds the room.
        with contextlib.suppress(StorageError):
            store.check_writable()
        await store.query("SELECT 1")
        store.check_writable()
        await store.write(SET, ("after", b"2", 0.0))
        assert keys(store.path) == {"after"}
    finally:
        await store.close()


def test_set_shared_and_register_agent_on_a_full_disk_are_typed_over_the_wire(
    tmpfs: Callable[[str], Path],
) -> None:
    disk = tmpfs("4m")
    dp = InProcessDaemon()
    dp.state_dir = disk / "state"
    try:
        dp.start()
        assert dp.result("SET_SHARED", {"key": "before", "value": 1})["status"] == "set"
        filler = fill(disk)
        big = "v" * 1_000_000
        cases: list[tuple[str, dict[str, Any]]] = [
            ("SET_SHARED", {"key": "full", "value": big}),
            ("REGISTER_AGENT", {"agent_id": "a1", "role": "r", "metadata": {"notes": big}}),
        ]
        for command, params in cases:
            reply = dp.call(command, params)
            assert reply["status"] == "error", reply
            assert reply["error"]["code"] == "STORAGE_FULL", reply
            assert reply["error"]["details"]["sqlite_error"] == "SQLITE_FULL"
        assert dp.result("GET_SHARED", {"key": "full"})["found"] is False
        assert dp.result("GET_AGENTS")["total"] == 0
        filler.unlink()
        assert dp.result("SET_SHARED", {"key": "full", "value": big})["status"] == "set"
        dp.stop()
        dp.start()  # what memory said is what the disk kept
        assert dp.result("GET_SHARED", {"key": "full"})["value"] == big
        assert dp.result("GET_SHARED", {"key": "before"})["value"] == 1
        assert dp.result("GET_AGENTS")["total"] == 0
    finally:
        dp.cleanup()


# -- the turn log: whole lines on a full disk, deleted logs let go ------------------------------


async def test_a_short_write_is_taken_back_so_no_line_is_broken_or_glued(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = TurnLog(tmp_path)
    await log.human("s", "first", process_id="p1", agent_id=None, model=None)
    target = log._fds["s"][0]
    real_write = os.write
    writes: list[int] = []

    def filling_disk(fd: int, data: Any) -> int:
        if fd != target:
            return real_write(fd, data)
        writes.append(len(data))
        if len(writes) == 1:  # what a filling disk does: part of the line, then ENOSPC
            return real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", filling_disk)
    with pytest.raises(OSError, match="No space left") as caught:
        await log.claude("s", {"result": "r" * 10_000}, process_id="p1")
    assert caught.value.errno == errno.ENOSPC
    assert len(writes) == 2
    monkeypatch.setattr(os, "write", real_write)  # space is back
    await log.human("s", "second", process_id="p2", agent_id=None, model=None)
    got = [orjson.loads(x) for x in (tmp_path / "s.jsonl").read_bytes().splitlines()]
    assert [x["content"] for x in got] == ["first", "second"]
    log.close()


async def test_a_deleted_log_is_reopened_instead_of_written_into_the_void(tmp_path: Path) -> None:
    log = TurnLog(tmp_path)
    await log.human("s", "one", process_id="p1", agent_id=None, model=None)
    (tmp_path / "s.jsonl").unlink()  # an operator cleaning up
    await log.human("s", "two", process_id="p2", agent_id=None, model=None)
    got = [orjson.loads(x) for x in (tmp_path / "s.jsonl").read_bytes().splitlines()]
    assert [x["content"] for x in got] == ["two"]
    log.close()


async def test_idle_log_descriptors_are_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(turnlog, "IDLE_CLOSE_S", 0.05)
    swept = asyncio.Event()
    real_swept = TurnLog._swept

    def spy(self: TurnLog, fut: asyncio.Future[bool]) -> None:
        real_swept(self, fut)
        swept.set()

    monkeypatch.setattr(TurnLog, "_swept", spy)
    log = TurnLog(tmp_path)
    await log.human("s", "x", process_id="p", agent_id=None, model=None)
    path = str(tmp_path / "s.jsonl")

    def held() -> bool:
        return any(
            os.path.realpath(f"/proc/self/fd/{fd}") == path for fd in os.listdir("/proc/self/fd")
        )

    assert held()
    await asyncio.wait_for(swept.wait(), 5)  # one sweep, IDLE_CLOSE_S after the line
    assert not held()
    await log.human("s", "y", process_id="p", agent_id=None, model=None)  # reopened
    assert len((tmp_path / "s.jsonl").read_bytes().splitlines()) == 2
    log.close()


async def test_a_real_full_log_disk_keeps_every_line_whole(tmpfs: Callable[[str], Path]) -> None:
    disk = tmpfs("1m")
    log = TurnLog(disk / "logs")
    try:
        written = await write_until_full(log, "s")
        filler = fill(disk)
        with pytest.raises(OSError, match="No space left"):
            await log.claude("s", {"result": "a" * 50_000}, process_id="late")
        filler.unlink()
        await log.human("s", "space is back", process_id="next", agent_id=None, model=None)
        got = [orjson.loads(x) for x in (disk / "logs" / "s.jsonl").read_bytes().splitlines()]
        assert [x["process_id"] for x in got] == [*map(str, range(written)), "next"]
    finally:
        log.close()  # before the unmount


async def test_deleting_a_log_frees_its_space_on_a_full_disk(tmpfs: Callable[[str], Path]) -> None:
    disk = tmpfs("1m")
    log = TurnLog(disk / "logs")
    try:
        assert await write_until_full(log, "old") > 10
        (disk / "logs" / "old.jsonl").unlink()  # the operator frees space...
        # ...and a new session's line goes in, though the daemon had the old log open.
        await log.claude("new", {"result": "a" * 50_000}, process_id="n")
        assert len((disk / "logs" / "new.jsonl").read_bytes().splitlines()) == 1
        assert os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize > 500_000
    finally:
        log.close()  # before the unmount


# -- who can read it -----------------------------------------------------------------------------


async def test_state_and_logs_are_private_from_birth_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        store = Store(tmp_path / "state" / "ksi.sqlite3")
        await store.open()
        await store.write(SET, ("k", b"v", 0.0))
        log = TurnLog(tmp_path / "logs")
        await log.human("s", "secret prompt", process_id="p", agent_id=None, model=None)
        log.close()
        db = store.path
        assert mode(db.parent) == 0o700
        assert {p.name: mode(p) for p in db.parent.iterdir()} == {
            "ksi.sqlite3": 0o600,
            "ksi.sqlite3-wal": 0o600,
            "ksi.sqlite3-shm": 0o600,
        }
        await store.close()
        assert mode(tmp_path / "logs") == 0o700
        assert mode(tmp_path / "logs" / "s.jsonl") == 0o600
        assert os.readlink(tmp_path / "logs" / "latest.jsonl") == "s.jsonl"
        assert mode(tmp_path / "logs" / "latest.jsonl") == 0o600  # its target
    finally:
        os.umask(old)


async def test_state_and_logs_of_an_older_release_are_made_private(tmp_path: Path) -> None:
    state_dir, logs = tmp_path / "state", tmp_path / "logs"
    state_dir.mkdir(mode=0o755)
    logs.mkdir(mode=0o755)
    old = os.umask(0o022)
    try:  # as a release before this one left them: 0755 directories, 0644 files
        conn = sqlite3.connect(state_dir / "ksi.sqlite3")
        conn.execute("CREATE TABLE x (y)")
        conn.commit()
        conn.close()
        (logs / "s.jsonl").write_text('{"type":"human"}\n')
    finally:
        os.umask(old)
    assert mode(state_dir / "ksi.sqlite3") == 0o644
    store = Store(state_dir / "ksi.sqlite3")
    await store.open()
    try:
        await store.write(SET, ("k", b"v", 0.0))
        assert mode(state_dir) == 0o700
        assert {mode(p) for p in state_dir.iterdir()} == {0o600}
    finally:
        await store.close()
    log = TurnLog(logs)
    await log.human("s", "again", process_id="p", agent_id=None, model=None)
    log.close()
    assert mode(logs) == 0o700
    assert mode(logs / "s.jsonl") == 0o600


async def test_a_shared_directory_is_not_chmodded(tmp_path: Path) -> None:
    sticky = tmp_path / "sticky"  # like /tmp
    sticky.mkdir()
    sticky.chmod(0o1777)
    mixed = tmp_path / "mixed"  # someone's directory with other things in it
    mixed.mkdir()
    mixed.chmod(0o755)
    (mixed / "notes.txt").write_text("not ours")
    for directory in (sticky, mixed):
        store = Store(directory / "ksi.sqlite3")
        await store.open()
        await store.write(SET, ("k", b"v", 0.0))
        assert mode(directory / "ksi.sqlite3") == 0o600  # the files are private anyway
        await store.close()
        log = TurnLog(directory)
        log.close()
    assert mode(sticky) == 0o1777
    assert mode(mixed) == 0o755


async def test_another_user_can_read_no_state_and_no_log(tmp_path: Path) -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to try as another uid (CI runs as root)")
    base = short_tmpdir("ksi-modes")
    try:
        base.chmod(0o755)  # others may enter the base; what they meet inside is the test
        public = base / "public.txt"
        public.write_text("anyone")
        public.chmod(0o644)
        shared = base / "shared"  # a sticky, world-listable state dir: not chmodded
        shared.mkdir()
        shared.chmod(0o1777)
        store = Store(base / "state" / "ksi.sqlite3")
        await store.open()
        await store.write(SET, ("k", b"secret", 0.0))
        other = Store(shared / "ksi.sqlite3")
        await other.open()
        await other.write(SET, ("k", b"secret", 0.0))
        log = TurnLog(base / "logs")
        await log.human("s", "secret prompt", process_id="p", agent_id=None, model=None)
        log.close()
        assert as_nobody("cat", str(public)).stdout == "anyone"  # the probe itself works
        for argv in (
            ["ls", str(base / "state")],
            ["cat", str(store.path)],
            ["cat", f"{store.path}-wal"],
            ["ls", str(base / "logs")],
            ["cat", str(base / "logs" / "s.jsonl")],
            ["cat", str(base / "logs" / "latest.jsonl")],
            ["cat", str(other.path)],
            ["cat", f"{other.path}-wal"],
        ):
            done = as_nobody(*argv)
            assert done.returncode != 0, (argv, done.stdout)
            assert "Permission denied" in done.stderr, (argv, done.stderr)
        await store.close()
        await other.close()
    finally:
        shutil.rmtree(base)
