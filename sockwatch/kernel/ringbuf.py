"""A BPF ring buffer consumer in Python over mmap, without a callback per record.

libbpf's ring_buffer__consume() calls back into Python once per record
(through ctypes: microseconds each). Here everything committed is copied out
in one slice and the 8-byte record headers are walked in a tight loop.
The kernel offers the data area twice back to back so a wrapped record reads
contiguously, but every mapped page counts in the reader's RSS (the whole
area is mapped at mmap time): the data area is mapped once, and a batch that
wraps is copied out in two pieces.
Layout (kernel/bpf/ringbuf.c): page 0 is the consumer position (ours to
write); from page 1 the producer position page, then the data area.

x86_64 keeps loads in order, so reading the producer position before the
records needs no fence; a record still being written has its BUSY bit set and
ends the batch.
"""

from __future__ import annotations

import mmap
import select
import struct
from itertools import chain, repeat
from operator import add, itemgetter
from typing import Sequence

BUSY = 1 << 31
DISCARD = 1 << 30
HEADER = 8
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")


class RingReader:
    def __init__(self, map_fd: int, size: int, record_size: int):
        if size & (size - 1):
            raise ValueError("ring buffer size must be a power of two")
        page = mmap.PAGESIZE
        self._page = page
        self._mask = size - 1
        self._record_size = record_size
        self._stride = (record_size + HEADER + 7) & ~7  # record_size bytes after each header
        self._consumer = mmap.mmap(map_fd, page, mmap.MAP_SHARED,
                                   mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._size = size
        self.peak = 0  # most bytes found waiting at a drain: how near the ring came to full
        self._producer = mmap.mmap(map_fd, page + size, mmap.MAP_SHARED, mmap.PROT_READ,
                                   offset=page)
        self._fd = map_fd

    def backlog(self) -> int:
        """Bytes submitted but not yet consumed (including records still being written)."""
        return _U64.unpack_from(self._producer, 0)[0] - _U64.unpack_from(self._consumer, 0)[0]

    def drain(self) -> tuple[bytes, Sequence[int], int]:
        """(blob, offsets of whole records in it, records of the wrong size skipped)."""
        cons = _U64.unpack_from(self._consumer, 0)[0]
        prod = _U64.unpack_from(self._producer, 0)[0]
        if prod == cons:
            return b"", [], 0
        if prod - cons > self.peak:
            self.peak = prod - cons
        start = self._page + (cons & self._mask)
        end = start + (prod - cons)
        limit = self._page + self._size
        blob = (self._producer[start:end] if end <= limit else
                self._producer[start:limit] + self._producer[self._page : end - self._size])
        fast = self._uniform_prefix(blob)
        offsets: list[int] = []
        bad, pos, end, want = 0, fast * self._stride, len(blob), self._record_size
        unpack = _U32.unpack_from
        while pos + HEADER <= end:
            hdr = unpack(blob, pos)[0]
            if hdr & BUSY:
                break  # still being written: the rest waits for the next drain
            length = hdr & ~(BUSY | DISCARD)
            if not hdr & DISCARD:
                if length == want:
                    offsets.append(pos + HEADER)
                else:
                    bad += 1
            pos += (length + HEADER + 7) & ~7
        _U64.pack_into(self._consumer, 0, cons + pos)
        if fast:
            head = range(HEADER, fast * self._stride, self._stride)
            return blob, list(head) + offsets if offsets else head, bad
        return blob, offsets, bad

    def _uniform_prefix(self, blob: bytes) -> int:
        """How many leading records are committed, kept and of our size: checked at C
        speed through a strided view of the header words (the usual case is all)."""
        n = len(blob) // self._stride
        if not n:
            return 0
        words = memoryview(blob)[: n * self._stride].cast("I")[:: self._stride // 4].tolist()
        if words.count(self._record_size) == n:
            return n
        for i, word in enumerate(words):
            if word != self._record_size:
                return i
        return n

    @property
    def size(self) -> int:
        return self._size

    @property
    def fd(self) -> int:
        return self._fd

    @property
    def stride(self) -> int:
        """Bytes from one record of our size to the next: header, record, padding."""
        return self._stride

    def close(self) -> None:
        self._consumer.close()
        self._producer.close()


class RingPair:
    """The main ring and the rescue ring (``events_rescue`` in lifecycle.bpf.c),
    read as one batch in time order. Every record starts with its u64 timestamp."""

    def __init__(self, main: RingReader, rescue: RingReader):
        self.main, self.rescue = main, rescue
        # Edge-triggered: a ring's fd is readable whenever it holds any record, so
        # under steady load a level-triggered wait returned at once and the reader
        # spun through batches of a few records (measured: ~130 drains/s at 10k
        # connections/s). An edge comes only from the kernel's wake-ups, and
        # records are submitted without one until the ring is filling.
        self._epoll = select.epoll()
        for ring in (main, rescue):
            self._epoll.register(ring.fd, select.EPOLLIN | select.EPOLLET)

    def wait(self, timeout_s: float) -> None:
        """Sleep until the timeout or until either ring forces a wake-up (one that
        came while we were not waiting ends the next wait at once)."""
        self._epoll.poll(timeout_s)

    def backlog(self) -> int:
        return self.main.backlog() + self.rescue.backlog()

    def fill(self) -> list[tuple[str, int, int]]:
        """(ring, size, peak) of both rings, for the self-metrics."""
        return [(name, ring.size, ring.peak)
                for name, ring in (("events", self.main), ("rescue", self.rescue))]

    def drain(self) -> tuple[bytes, Sequence[int], int]:
        blob, offsets, bad = self.main.drain()
        more, more_offsets, more_bad = self.rescue.drain()
        if not more:
            return blob, offsets, bad
        # A few per ten thousand records under load: put the rescued records back
        # in time order, or a rescued OPEN would land after its own CLOSE, and lay
        # them out evenly again (as the table's batch pre-pass wants), at C speed.
        joined, shift, stride = blob + more, len(blob), self.main.stride
        places = list(chain(offsets, map(shift.__add__, more_offsets)))
        stamps = list(map(itemgetter(0), map(_U64.unpack_from, repeat(joined), places)))
        starts = [places[i] - HEADER for i in sorted(range(len(places)), key=stamps.__getitem__)]
        blob = b"".join(map(joined.__getitem__,
                            map(slice, starts, map(add, starts, repeat(stride)))))
        return blob, range(HEADER, len(blob), stride), bad + more_bad

    def close(self) -> None:
        self._epoll.close()
        self.main.close()
        self.rescue.close()
