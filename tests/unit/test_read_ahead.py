"""reader.read_ahead: a walk's chunks read by a thread while the consumer merges.

The source here is a plain generator; the kernel tests read real walks through it
(every reconcile does).
"""

from __future__ import annotations

import threading
import time

import pytest

from sockwatch.kernel.reader import read_ahead


class Source:
    """Chunks b"0", b"1", ... with a pause before each (a kernel walk's read()),
    recording how far it got and whether it was closed."""

    def __init__(self, n: int, pause: float = 0.0, fail_at: int | None = None):
        self.n, self.pause, self.fail_at = n, pause, fail_at
        self.made = 0
        self.closed = False

    def chunks(self):
        try:
            for i in range(self.n):
                time.sleep(self.pause)
                if i == self.fail_at:
                    raise OSError(5, "walk failed")
                self.made += 1
                yield str(i).encode()
        finally:
            self.closed = True


def test_chunks_come_in_order_and_the_reader_reports_its_cpu():
    src, spent = Source(200), []
    got = list(read_ahead(src.chunks(), spent.append, depth=4))
    assert got == [str(i).encode() for i in range(200)]
    assert src.closed and len(spent) == 1 and spent[0] >= 0.0
    assert not any(t.name == "walk-read" for t in threading.enumerate())


def test_reading_overlaps_the_consumer():
    # 20 chunks that take 10 ms each to read, each taking the consumer 10 ms:
    # one after the other that is 0.4 s, overlapped about 0.2 s.
    src, spent = Source(20, pause=0.01), []
    started = time.monotonic()
    for _chunk in read_ahead(src.chunks(), spent.append):
        time.sleep(0.01)
    assert time.monotonic() - started < 0.33


def test_a_read_error_reaches_the_consumer_after_the_chunks_before_it():
    src, spent = Source(10, fail_at=3), []
    got = []
    with pytest.raises(OSError, match="walk failed"):
        for chunk in read_ahead(src.chunks(), spent.append):
            got.append(chunk)
    assert got == [b"0", b"1", b"2"] and src.closed and len(spent) == 1


def test_a_consumer_that_stops_early_stops_the_reader_and_closes_the_walk():
    src, spent = Source(10_000), []
    chunks = read_ahead(src.chunks(), spent.append, depth=2)
    assert next(chunks) == b"0"
    chunks.close()  # returns once the reading thread has ended
    assert src.closed and src.made < 10 and len(spent) == 1
    assert not any(t.name == "walk-read" for t in threading.enumerate())


def test_a_consumer_that_fails_stops_the_reader_too():
    src, spent = Source(10_000), []
    with pytest.raises(ValueError):
        for chunk in read_ahead(src.chunks(), spent.append, depth=2):
            if chunk == b"5":
                raise ValueError("merge failed")
    assert src.closed and src.made < 20 and len(spent) == 1
