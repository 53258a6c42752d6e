"""What the kernel hands over, as raw records in batches; malformed ones counted."""

from __future__ import annotations

import time

from sockwatch import records
from sockwatch.kernel.loader import Probes


class EventReader:
    """Drains the ring buffer in batches (the kernel never wakes us: we poll)."""

    def __init__(self, probes: Probes):
        self._probes = probes
        self.decode_errors = 0
        self.records_read = 0

    def drain(self) -> tuple[bytes, list[int]]:
        """(blob, offsets): every whole record committed since the last drain."""
        blob, offsets, bad = self._probes.ring.drain()
        self.decode_errors += bad
        self.records_read += len(offsets) + bad
        return blob, offsets

    def wait(self, timeout_s: float) -> None:
        self._probes.ring.wait(timeout_s)

    def backlog(self) -> int:
        return self._probes.ring.backlog()

    def snapshot(self, netns_path: str | None = None) -> tuple[int, list[bytes]]:
        """(CLOCK_MONOTONIC ns taken just before the walk, one raw row per live socket)
        for our network namespace or the one at ``netns_path``."""
        started = time.monotonic_ns()
        data = self._probes.snapshot_bytes(netns_path)
        size = records.EVENT_SIZE
        rows = [data[off : off + size] for off in range(0, len(data) - size + 1, size)]
        self.decode_errors += len(data) % records.EVENT_SIZE != 0  # a torn tail
        return started, rows
