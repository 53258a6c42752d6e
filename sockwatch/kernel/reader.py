"""Turn what the kernel hands over into typed records, counting what is malformed."""

from __future__ import annotations

import time

from sockwatch import records
from sockwatch.kernel.libbpf import iter_records
from sockwatch.kernel.loader import Probes


class EventReader:
    """Drains the ring buffer in batches (the kernel never wakes us: we poll)."""

    def __init__(self, probes: Probes):
        self._probes = probes
        self.decode_errors = 0
        self.records_read = 0

    def drain(self) -> list[records.ConnEvent]:
        events, bad = records.decode_many(self._probes.ring.drain())
        self.decode_errors += bad
        self.records_read += len(events) + bad
        return events

    def snapshot(self, netns_path: str | None = None) -> tuple[int, list[records.ConnEvent]]:
        """(CLOCK_MONOTONIC ns taken just before the walk, one row per live socket)
        for our network namespace or the one at ``netns_path``."""
        started = time.monotonic_ns()
        data = self._probes.snapshot_bytes(netns_path)
        rows, bad = records.decode_many(iter_records(data, records.EVENT_SIZE))
        self.decode_errors += bad + (len(data) % records.EVENT_SIZE != 0)  # a torn tail
        return started, rows
