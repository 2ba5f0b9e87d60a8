"""Newline-delimited framing, shared by the socket server and the CLI readers.

The daemon speaks one JSON object per line on its socket, and the Claude CLI prints one
stream-json object per line on stdout; both are read in chunks as they arrive.
"""

from __future__ import annotations


class LineSplitter:
    """Split a byte stream read in chunks into lines (without the trailing newline).

    Used instead of ``StreamReader.readline``, whose 64 KiB limit a single
    stream-json line (a big tool result, a huge answer) easily exceeds. Only
    the new bytes are searched, so a 3 MB line arriving in ~50 chunks costs
    one pass.
    """

    def __init__(self) -> None:
        self._pending = bytearray()

    @property
    def pending_bytes(self) -> int:
        """Bytes of the unfinished last line (callers cap it)."""
        return len(self._pending)

    def feed(self, chunk: bytes) -> list[bytes]:
        scan_from = len(self._pending)
        self._pending += chunk
        out: list[bytes] = []
        start = 0
        nl = self._pending.find(b"\n", scan_from)
        while nl != -1:
            out.append(bytes(self._pending[start:nl]))
            start = nl + 1
            nl = self._pending.find(b"\n", start)
        del self._pending[:start]
        return out

    def flush(self) -> bytes | None:
        """The unterminated rest at EOF, if any."""
        if not self._pending:
            return None
        rest = bytes(self._pending)
        self._pending.clear()
        return rest
