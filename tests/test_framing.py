"""daemon/framing.py: the line splitter of the CLI readers (unbounded) and of the socket
server (bounded: oversized lines skipped to their end, a room for the global budget)."""

from __future__ import annotations

import random

from daemon.framing import LineSplitter, Refused


def test_unbounded_lines_come_without_newline_across_chunks() -> None:
    s = LineSplitter()
    assert s.feed(b'{"a":1}\n{"b"') == [b'{"a":1}']
    assert s.pending_bytes == 4
    assert s.feed(b":2}") == []
    assert s.feed(b"\n\nx") == [b'{"b":2}', b""]
    assert s.flush() == b"x"
    assert s.flush() is None
    assert s.pending_bytes == 0


def test_any_chunking_gives_the_same_lines() -> None:
    data = b"".join(b"line %d %s\n" % (i, b"y" * (i * 37 % 200)) for i in range(300)) + b"tail"
    rng = random.Random(11)
    for keep in (False, True):
        whole = LineSplitter(keep_newline=keep)
        expected = whole.take(data)
        assert len(expected) == 300
        assert whole.finish() == b"tail"
        s = LineSplitter(keep_newline=keep)
        got = []
        i = 0
        while i < len(data):
            n = rng.randint(1, 500)
            got += s.take(data[i : i + n])
            i += n
        assert got == expected
        assert s.finish() == b"tail"
    assert expected[0] == b"line 0 \n"


def test_a_line_over_the_limit_is_refused_in_one_chunk_or_many() -> None:
    s = LineSplitter(10, keep_newline=True)
    assert s.take(b"0123456789\n01234567890\nok\n") == [b"0123456789\n", Refused.TOO_LONG, b"ok\n"]
    # Growing past the limit without an end: dropped at once, skipped to its end.
    assert s.take(b"012345") == []
    assert s.pending_bytes == 6
    assert s.take(b"67890") == []
    assert (s.pending_bytes, s.skipping, s.incomplete) == (0, Refused.TOO_LONG, True)
    assert s.take(b"x" * 1000) == []
    assert s.pending_bytes == 0
    assert s.take(b"yy\nnext\n") == [Refused.TOO_LONG, b"next\n"]
    assert (s.skipping, s.incomplete) == (None, False)
    # A held part plus the rest in the chunk that ends it.
    assert s.take(b"01234") == []
    assert s.take(b"567890\n") == [Refused.TOO_LONG]
    assert s.take(b"01234") == []
    assert s.take(b"56789\n") == [b"0123456789\n"]


def test_the_room_refuses_a_growing_line_as_buffers_full() -> None:
    s = LineSplitter(100, keep_newline=True)
    assert s.take(b"a\nbbbb", room=4) == [b"a\n"]
    assert s.pending_bytes == 4
    assert s.take(b"cc", room=1) == []
    assert (s.pending_bytes, s.skipping) == (0, Refused.BUFFERS_FULL)
    assert s.take(b"dd\ne\n", room=0) == [Refused.BUFFERS_FULL, b"e\n"]
    # Complete lines need no room: only the unfinished tail is held.
    assert s.take(b"fff\n", room=0) == [b"fff\n"]
    # A held line that would pass its room is refused whether or not its end comes in the
    # same chunk (a slow reader gets both in one read, a fast one in two).
    assert s.take(b"gg", room=2) == []
    assert s.take(b"hhh\ni\n", room=2) == [Refused.BUFFERS_FULL, b"i\n"]
    assert s.take(b"jj", room=2) == []
    assert s.take(b"kk\n", room=2) == [b"jjkk\n"]


def test_finish_answers_a_refused_last_line_and_discard_drops_it() -> None:
    s = LineSplitter(4, keep_newline=True)
    s.take(b"toolong")
    assert s.finish() is Refused.TOO_LONG
    assert s.finish() is None
    s.take(b"abc")
    assert s.finish() == b"abc"  # without a newline: it never had one
    s.take(b"toolong")
    assert s.flush() is None  # the unbounded view has no refusals
    s.take(b"ab")
    s.discard()
    assert (s.pending_bytes, s.incomplete, s.finish()) == (0, False, None)
