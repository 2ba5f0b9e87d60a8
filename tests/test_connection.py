"""daemon/server/connection.py in-process: a Connection driven through a fake transport, with
a registry of test commands, no daemon process. Replies to pipelined lines in order,
coalesced writes, oversized lines, back-pressure both ways, and handlers that use
``asyncio.timeout`` (they run in an ordinary task)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import orjson

from daemon.commands.registry import Context, Params, Registry, Result
from daemon.server import Connection, Server
from daemon.settings import Settings


class NParams(Params):
    n: int = 0
    ms: float = 0.0


class NResult(Result):
    n: int
    timed_out: bool = False


class OkResult(Result):
    ok: bool


def _registry() -> Registry:
    reg = Registry()

    @reg.command("CONNECT", params=NParams, result=OkResult)
    async def connect(ctx: Context, p: NParams) -> OkResult:
        """Make the connection persistent."""
        assert ctx.conn is not None
        ctx.conn.make_persistent()
        return OkResult(ok=True)

    @reg.command("ECHO", params=NParams, result=NResult)
    async def echo(ctx: Context, p: NParams) -> NResult:
        """Answer at once."""
        return NResult(n=p.n)

    @reg.command("NOW", params=NParams, result=NResult)
    def now(ctx: Context, p: NParams) -> NResult:
        """A plain function: never waits."""
        return NResult(n=p.n)

    @reg.command("BOOM", params=NParams, result=NResult)
    def boom(ctx: Context, p: NParams) -> NResult:
        """A plain function with a bug."""
        raise RuntimeError("bug")

    @reg.command("WAIT", params=NParams, result=NResult)
    async def wait(ctx: Context, p: NParams) -> NResult:
        """Wait ``ms`` under a deadline that holds; ``n`` < 0: one that expires."""
        try:
            async with asyncio.timeout(0.01 if p.n < 0 else 5.0):
                await asyncio.sleep(p.ms / 1000)
        except TimeoutError:
            return NResult(n=p.n, timed_out=True)
        return NResult(n=p.n)

    return reg


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.reading = True
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default  # no socket: no peer credentials to check

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed
        self.writes.append(bytes(data))

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_write_buffer_size(self) -> int:
        return 0

    def replies(self) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in b"".join(self.writes).splitlines()]


def _open(**settings: Any) -> tuple[Connection, FakeTransport]:
    services = SimpleNamespace(
        settings=Settings(socket=Path("/nonexistent/t.sock"), **settings),
        bus=SimpleNamespace(published=0),
        registry=_registry(),
    )
    server = Server(cast(Any, services))
    conn = Connection(server, 1)
    transport = FakeTransport()
    conn.connection_made(transport)
    return conn, transport


def _line(command: str, rid: object = None, **parameters: Any) -> bytes:
    req: dict[str, Any] = {"command": command, "parameters": parameters}
    if rid is not None:
        req["id"] = rid
    return orjson.dumps(req) + b"\n"


async def _until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    """Let the loop run until ``cond()`` holds (polled: the connection signals nothing)."""
    async with asyncio.timeout(timeout):
        while not cond():  # noqa: ASYNC110
            await asyncio.sleep(0.001)


def _idle(conn: Connection) -> Callable[[], bool]:
    return lambda: not conn.pending_tasks()


async def test_pipelined_replies_come_in_request_order() -> None:
    conn, t = _open()
    lines = [_line("CONNECT", "c")]
    for i in range(30):
        lines.append(_line("WAIT", f"w{i}", n=i, ms=(i % 3)) if i % 2 else _line("ECHO", i, n=i))
    conn.data_received(b"".join(lines))
    await _until(lambda: len(t.replies()) == 31)
    ids = [r["id"] for r in t.replies()]
    assert ids == ["c", *[f"w{i}" if i % 2 else i for i in range(30)]]
    assert all(r["status"] == "success" for r in t.replies())
    assert not t.closed
    assert t.reading


async def test_the_replies_to_one_read_go_out_in_one_write() -> None:
    conn, t = _open()
    conn.data_received(_line("CONNECT") + b"".join(_line("ECHO", i, n=i) for i in range(10)))
    await _until(_idle(conn))
    assert len(t.writes) == 1
    assert [r["id"] for r in t.replies()[1:]] == list(range(10))
    # A handler that has to wait does not hold back the replies queued before it.
    conn.data_received(_line("ECHO", "a") + _line("WAIT", "b", ms=300) + _line("ECHO", "c"))
    await _until(lambda: len(t.replies()) == 12)
    assert t.replies()[-1]["id"] == "a"
    await _until(_idle(conn))
    assert [r["id"] for r in t.replies()[-3:]] == ["a", "b", "c"]


async def test_a_handler_that_never_waits_is_answered_in_the_read_callback() -> None:
    conn, t = _open()
    conn.data_received(_line("NOW", 1, n=1))
    # No loop turn yet: answered, and the one-shot connection closed, inside data_received.
    assert [r["result"] for r in t.replies()] == [{"n": 1, "timed_out": False}]
    assert t.closed


async def test_lines_answered_at_once_keep_their_place_behind_a_waiting_one() -> None:
    conn, t = _open()
    conn.data_received(_line("CONNECT"))
    await _until(_idle(conn))
    conn.data_received(_line("NOW", "a") + _line("WAIT", "b", ms=20) + _line("NOW", "c"))
    assert [r.get("id") for r in t.replies()] == [None, "a"]  # "c" waits behind "b"
    conn.data_received(_line("NOW", "d"))  # arrives while "b" waits: it queues too
    assert [r.get("id") for r in t.replies()] == [None, "a"]
    await _until(_idle(conn))
    assert [r.get("id") for r in t.replies()] == [None, "a", "b", "c", "d"]
    conn.data_received(_line("BOOM", "e") + _line("NOW", "f"))
    assert [r.get("id") for r in t.replies()][-2:] == ["e", "f"]
    assert t.replies()[-2]["error"]["code"] == "INTERNAL_ERROR"
    assert not t.closed


async def test_an_oversized_line_is_refused_and_the_next_one_served() -> None:
    conn, t = _open(max_line_bytes=1024)
    conn.data_received(_line("CONNECT"))
    big = _line("ECHO", 1, pad="x" * 3000)
    for i in range(0, len(big), 500):  # arriving in pieces: refused before its end
        conn.data_received(big[i : i + 500])
        assert conn.server.pending_input <= 1024
    conn.data_received(_line("ECHO", 2, n=2))
    await _until(lambda: len(t.replies()) == 3)
    too_long, echo = t.replies()[1:]
    assert too_long["error"]["code"] == "LINE_TOO_LONG"
    assert too_long["error"]["details"] == {"limit_bytes": 1024}
    assert echo["id"] == 2
    assert conn.server.pending_input == 0


async def test_input_over_the_global_budget_is_refused() -> None:
    conn, t = _open(max_line_bytes=4096, max_pending_input_bytes=1024)
    conn.data_received(_line("CONNECT") + b'{"command":"ECHO","pad":"' + b"x" * 2000)
    conn.data_received(b'"}\n' + _line("ECHO", 3))
    await _until(lambda: len(t.replies()) == 3)
    assert [r.get("id") for r in t.replies()] == [None, None, 3]
    assert t.replies()[1]["error"]["code"] == "INPUT_BUFFERS_FULL"
    assert conn.server.pending_input == 0


async def test_a_peer_that_does_not_read_its_replies_is_not_read_from() -> None:
    conn, t = _open()
    conn.data_received(_line("CONNECT"))
    await _until(_idle(conn))
    conn.pause_writing()  # the transport's buffer is over its high-water mark
    conn.data_received(b"".join(_line("ECHO", i) for i in range(5)))
    await asyncio.sleep(0.01)
    assert len(t.replies()) == 1
    assert not t.reading
    conn.resume_writing()
    await _until(_idle(conn))
    assert [r["id"] for r in t.replies()[1:]] == list(range(5))
    assert t.reading


async def test_lines_that_arrive_while_a_handler_waits_hold_reading() -> None:
    conn, t = _open()
    conn.data_received(_line("CONNECT") + _line("WAIT", "w", ms=50))
    await asyncio.sleep(0.005)
    conn.data_received(_line("ECHO", "e"))
    assert not t.reading
    await _until(_idle(conn))
    assert [r.get("id") for r in t.replies()] == [None, "w", "e"]
    assert t.reading


async def test_handlers_may_use_asyncio_timeout() -> None:
    conn, t = _open()
    conn.data_received(_line("CONNECT") + _line("WAIT", 1, ms=1) + _line("WAIT", -1, n=-1, ms=5000))
    await _until(lambda: len(t.replies()) == 3)
    ok, expired = t.replies()[1:]
    assert ok["result"] == {"n": 0, "timed_out": False}
    assert expired["result"] == {"n": -1, "timed_out": True}


async def test_one_shot_connection_gets_one_reply_then_closes() -> None:
    conn, t = _open()
    conn.data_received(_line("WAIT", 1, n=1, ms=5) + _line("ECHO", 2))
    await _until(lambda: t.closed)
    assert [r["id"] for r in t.replies()] == [1]


async def test_a_last_line_without_newline_is_answered_at_eof() -> None:
    conn, t = _open()
    conn.data_received(_line("CONNECT") + _line("ECHO", 1)[:-1])
    assert conn.eof_received() is True
    await _until(lambda: t.closed)
    assert [r.get("id") for r in t.replies()] == [None, 1]


async def test_an_incomplete_line_that_stalls_is_timed_out() -> None:
    conn, t = _open(partial_line_timeout_s=0.05)
    conn.data_received(b'{"command":"ECH')
    await _until(lambda: t.closed)
    assert [r["error"]["code"] for r in t.replies()] == ["LINE_TIMEOUT"]
    assert conn.server.pending_input == 0
