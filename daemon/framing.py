"""Newline-delimited framing, shared by the socket server and the CLI readers.

The daemon speaks one JSON object per line on its socket (read by
``daemon/server/connection.py``), and the Claude CLI prints one stream-json object per
line on stdout (read by ``daemon/claude/runner.py`` and ``daemon/claude/warm_process.py``);
both are read in chunks as they arrive, with one :class:`LineSplitter` per stream.

The CLI readers use it unbounded (:meth:`LineSplitter.feed`, :meth:`LineSplitter.flush`).
The server bounds it (:meth:`LineSplitter.take`, :meth:`LineSplitter.finish`): a line
longer than ``max_line_bytes`` is skipped to its end and stands as :attr:`Refused.TOO_LONG`
in the output, and a line that would grow past the ``room`` its caller gives it (the budget
of all connections' incomplete lines) is skipped the same way, :attr:`Refused.BUFFERS_FULL`.
"""

from __future__ import annotations

import enum
from typing import TypeAlias, cast


class Refused(enum.Enum):
    """A line that was skipped, not kept, and why."""

    TOO_LONG = "too_long"  # longer than max_line_bytes
    BUFFERS_FULL = "buffers_full"  # incomplete, it would have taken more than its room


Line: TypeAlias = bytes | Refused


class LineSplitter:
    """Split a byte stream read in chunks into lines.

    Used instead of ``StreamReader.readline``, whose 64 KiB limit a single
    stream-json line (a big tool result, a huge answer) easily exceeds. Only
    the new bytes are searched, so a 3 MB line arriving in ~50 chunks costs
    one pass.

    ``max_line_bytes`` bounds a line (not counting its newline); ``keep_newline`` leaves
    each complete line's ``\\n`` on it (the server parses lines as they came, so that
    error messages quoting positions are the same).
    """

    def __init__(self, max_line_bytes: int | None = None, *, keep_newline: bool = False) -> None:
        self._pending = bytearray()
        self._limit = max_line_bytes
        self._end = 1 if keep_newline else 0
        self._skipping: Refused | None = None  # discarding the rest of a refused line

    @property
    def pending_bytes(self) -> int:
        """Bytes of the unfinished last line (callers cap it)."""
        return len(self._pending)

    @property
    def incomplete(self) -> bool:
        """An unfinished last line is held or being skipped."""
        return bool(self._pending) or self._skipping is not None

    @property
    def skipping(self) -> Refused | None:
        """Why the unfinished last line is being skipped, if it is."""
        return self._skipping

    def feed(self, chunk: bytes) -> list[bytes]:
        """The lines that ``chunk`` completes (unbounded: never a :class:`Refused`)."""
        assert self._limit is None
        return cast(list[bytes], self.take(chunk))

    def take(self, chunk: bytes, room: int | None = None) -> list[Line]:
        """The lines that ``chunk`` completes, a refused one as its :class:`Refused`.

        ``room``: how many bytes the unfinished last line may still grow by, the bytes that
        complete it included; past it the line is refused (``BUFFERS_FULL``) and skipped to
        its end. (Whether its end comes in the same read as the bytes past the room must not
        decide: that depends on how fast the reader is.) A line that starts and ends within
        one chunk is never held and needs no room.
        """
        out: list[Line] = []
        start = 0
        if self._skipping is not None:
            nl = chunk.find(b"\n")
            if nl < 0:
                return out
            out.append(self._skipping)
            self._skipping = None
            start = nl + 1
        limit = self._limit
        end = self._end
        nl = chunk.find(b"\n", start)
        if nl >= 0 and self._pending:
            if room is not None and nl - start > room:
                out.append(Refused.BUFFERS_FULL)
                self._pending.clear()
            else:
                self._pending += chunk[start : nl + end]
                line = bytes(self._pending)
                self._pending.clear()
                too_long = limit is not None and len(line) - end > limit
                out.append(Refused.TOO_LONG if too_long else line)
            start = nl + 1
            nl = chunk.find(b"\n", start)
        while nl >= 0:
            too_long = limit is not None and nl - start > limit
            out.append(Refused.TOO_LONG if too_long else chunk[start : nl + end])
            start = nl + 1
            nl = chunk.find(b"\n", start)
        rest = len(chunk) - start
        if rest:
            if limit is not None and len(self._pending) + rest > limit:  # no end in sight
                self._refuse(Refused.TOO_LONG)
            elif room is not None and rest > room:
                self._refuse(Refused.BUFFERS_FULL)
            else:
                self._pending += chunk[start:] if start else chunk
        return out

    def _refuse(self, why: Refused) -> None:
        self._pending.clear()
        self._skipping = why

    def finish(self) -> Line | None:
        """At EOF: the unterminated last line, or its :class:`Refused`, if any."""
        if self._skipping is not None:
            why = self._skipping
            self._skipping = None
            return why
        if not self._pending:
            return None
        rest = bytes(self._pending)
        self._pending.clear()
        return rest

    def flush(self) -> bytes | None:
        """The unterminated rest at EOF, if any (unbounded: see :meth:`finish`)."""
        rest = self.finish()
        return rest if isinstance(rest, bytes) else None

    def discard(self) -> None:
        """Drop the unfinished last line, kept or being skipped."""
        self._pending.clear()
        self._skipping = None
