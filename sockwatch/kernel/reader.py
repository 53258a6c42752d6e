"""What the kernel hands over, as raw records in batches; malformed ones counted."""

from __future__ import annotations

from typing import Iterator

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

    def release_held(self) -> None:
        """Have the kernel send the OPENs it holds back, so the next drain has them."""
        self._probes.release_held()

    def wait(self, timeout_s: float) -> None:
        self._probes.ring.wait(timeout_s)

    def backlog(self) -> int:
        return self._probes.ring.backlog()

    def walk(self, netns_path: str | None = None) -> Iterator[bytes]:
        """One raw row per live socket of our network namespace or the one at
        ``netns_path``, in chunks of whole records. The walk starts at the call
        (OSError if the namespace is gone); consume the chunks at once."""
        return self._whole_records(self._probes.snapshot_chunks(netns_path))

    def _whole_records(self, chunks: Iterator[bytes]) -> Iterator[bytes]:
        size = records.EVENT_SIZE
        for chunk in chunks:
            torn = len(chunk) % size
            if torn:  # only ever the last chunk
                self.decode_errors += 1
                chunk = chunk[: len(chunk) - torn]
            if chunk:
                yield chunk
