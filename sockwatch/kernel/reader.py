"""What the kernel hands over, as raw records in batches; malformed ones counted."""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable, Iterator

from sockwatch import records
from sockwatch.kernel.loader import Probes


class EventReader:
    """Drains the ring buffer in batches (the kernel never wakes us: we poll)."""

    def __init__(self, probes: Probes):
        self._probes = probes
        self.decode_errors = 0
        self.records_read = 0
        self.walk_read_cpu_s = 0.0  # CPU the walks' reading threads spent (the kernel's walking)

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
        (OSError if the namespace is gone); consume the chunks at once. A thread
        reads ahead (see ``read_ahead``); its CPU adds to ``walk_read_cpu_s``."""
        return read_ahead(self._whole_records(self._probes.snapshot_chunks(netns_path)),
                          self._count_read_cpu)

    def _count_read_cpu(self, seconds: float) -> None:
        self.walk_read_cpu_s += seconds

    def _whole_records(self, chunks: Iterator[bytes]) -> Iterator[bytes]:
        size = records.EVENT_SIZE
        for chunk in chunks:
            torn = len(chunk) % size
            if torn:  # only ever the last chunk
                self.decode_errors += 1
                chunk = chunk[: len(chunk) - torn]
            if chunk:
                yield chunk


_AHEAD = 16  # chunks read ahead at most: 16 x 32 KB, what one read() of an iterator gives
_DONE = object()


class _Failed:
    """What the reading thread raised, handed to the consumer to raise."""

    def __init__(self, exc: BaseException):
        self.exc = exc


def read_ahead(chunks: Iterator[bytes], spent: Callable[[float], None],
               depth: int = _AHEAD) -> Iterator[bytes]:
    """``chunks``, read by a thread of their own while the consumer works on the
    ones before. Reading a kernel walk is the kernel walking, in read() and
    without the GIL: at 200k sockets it overlaps the merge of what came before
    and a walk takes 0.4 s instead of 0.6. The thread starts at the first chunk
    asked for, reads at most ``depth`` ahead, and reports its CPU time to
    ``spent`` (a walk's cost is the reader's CPU and the consumer's). An error
    while reading is raised to the consumer; a consumer that stops early (or
    fails) stops the thread, which closes ``chunks``."""
    ready: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def hand(item: object) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def pump() -> None:
        cpu = time.thread_time()
        try:
            for chunk in chunks:
                if not hand(chunk):
                    break
            hand(_DONE)
        except BaseException as exc:  # noqa: BLE001 -- the consumer raises it
            hand(_Failed(exc))
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()  # ends the walk early when the consumer stopped
            spent(time.thread_time() - cpu)

    reading = threading.Thread(target=pump, name="walk-read", daemon=True)
    reading.start()
    try:
        while (item := ready.get()) is not _DONE:
            if isinstance(item, _Failed):
                raise item.exc
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        reading.join()
