"""A lean blocking client for newline-delimited JSON over a Unix socket.

Deliberately not :mod:`daemon.client`: the benchmark client must cost as little as
possible per request so that the server, not the client, is what is measured. Replies
are counted and split as raw bytes; only what a benchmark needs is parsed.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import orjson

RECV = 1 << 20


def request_line(command: str, params: dict[str, Any] | None = None, **envelope: Any) -> bytes:
    obj: dict[str, Any] = {"command": command, "parameters": params or {}}
    obj.update(envelope)
    return orjson.dumps(obj, option=orjson.OPT_APPEND_NEWLINE)


def connect(path: Path | str, timeout: float | None = 60.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(str(path))
    return s


class LineConn:
    """One connection; ``request`` sends a line and returns the next reply line."""

    def __init__(self, path: Path | str, timeout: float | None = 60.0) -> None:
        self.sock = connect(path, timeout)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_line(self) -> bytes:
        buf = self.buf
        nl = buf.find(b"\n")
        while nl < 0:
            chunk = self.sock.recv(RECV)
            if not chunk:
                raise ConnectionError("server closed the connection")
            start = len(buf)
            buf += chunk
            nl = buf.find(b"\n", start)
        self.buf = buf[nl + 1 :]
        return buf[: nl + 1]

    def request(self, line: bytes) -> bytes:
        self.sock.sendall(line)
        return self.read_line()

    def call(self, command: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        reply: dict[str, Any] = orjson.loads(self.request(request_line(command, params)))
        if reply.get("status") == "error":
            raise RuntimeError(f"{command} failed: {reply['error']}")
        return reply

    def read_count(self, n: int) -> None:
        """Consume exactly ``n`` more lines without parsing them."""
        buf = self.buf
        have = buf.count(b"\n")
        while have < n:
            chunk = self.sock.recv(RECV)
            if not chunk:
                raise ConnectionError("server closed the connection")
            have += chunk.count(b"\n")
            buf += chunk
        if have == n and buf.endswith(b"\n"):
            self.buf = b""
            return
        # More than n lines arrived: keep what follows the n-th.
        pos = -1
        for _ in range(n):
            pos = buf.find(b"\n", pos + 1)
        self.buf = buf[pos + 1 :]

    def close(self) -> None:
        self.sock.close()


def one_shot(path: Path | str, line: bytes, timeout: float = 30.0) -> bytes:
    """Connect, send one line, read until the server closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(line)
        chunks = []
        while chunk := s.recv(RECV):
            chunks.append(chunk)
    return b"".join(chunks)


def wait_accepting(
    path: Path | str, timeout: float, probe: bytes, interval: float = 0.001
) -> float:
    """Poll until ``probe`` gets a reply line; return the perf_counter time it did."""
    deadline = time.perf_counter() + timeout
    while True:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(5.0)
                s.connect(str(path))
                s.sendall(probe)
                data = b""
                while not data.endswith(b"\n"):
                    chunk = s.recv(RECV)
                    if not chunk:
                        break
                    data += chunk
                if data.endswith(b"\n"):
                    return time.perf_counter()
        except OSError:
            pass
        if time.perf_counter() > deadline:
            raise TimeoutError(f"{path} did not answer within {timeout}s")
        time.sleep(interval)
