"""Wires probes -> records -> tables, and keeps them in step with the kernel.

Start-up has no gap: attach first, then walk the sockets (iter/tcp), then
apply whatever the ring buffer caught meanwhile; the table's ordering rules
de-duplicate. The same walk, repeated, is the reconciliation that removes
sockets whose close was missed.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from sockwatch import records
from sockwatch.kernel import loader, netns
from sockwatch.kernel.reader import EventReader
from sockwatch.processes import ProcessCache
from sockwatch.seed import procfs
from sockwatch.tables import Connection, ConnTable


def decode_batch(blob: bytes, offsets: list[int]) -> list[records.ConnEvent]:
    """Decode a drained batch (malformed records were already set aside by the reader)."""
    size = records.EVENT_SIZE
    return records.decode_many(blob[off : off + size] for off in offsets)[0]


def current_netns(proc_root: str = "/proc") -> int:
    return os.stat(f"{proc_root}/self/ns/net").st_ino


@dataclass(frozen=True)
class Loss:
    """Everything that was not observed or not kept, by the stage that dropped it."""

    ringbuf_full: int
    socks_map_full: int
    decode_errors: int
    table_full: int
    totals_map_full: int
    untracked_close: int  # not a loss: closes of sockets that predate sockwatch
    suppressed_close: int  # test switch only


class Monitor:
    """The standalone engine behind ``table``, ``trace`` and (later) the daemon."""

    def __init__(
        self,
        cfg: loader.LoaderConfig | None = None,
        *,
        closed_capacity: int = 4096,
        max_live: int = 262144,
        proc_root: str = "/proc",
        objects_dir: Path | None = None,
    ):
        self.cfg = cfg or loader.LoaderConfig()
        self.table = ConnTable(closed_capacity, max_live)
        # Held while records are applied and while readers copy or aggregate, so
        # HTTP threads never see a table half-way through a batch.
        self.lock = threading.RLock()
        # One thread at a time drains the ring buffer or walks the kernel.
        self._io = threading.RLock()
        self._pending: list[tuple[bytes, Sequence[int]]] = []  # drained by reconcile()
        self.processes = ProcessCache(proc_root)
        self._proc_root = proc_root
        self._objects_dir = objects_dir
        self.probes: loader.Probes | None = None
        self._reader: EventReader | None = None
        self.netns = current_netns(proc_root)
        self.started_ns = 0

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> None:
        self.probes = loader.load(self.cfg, self._objects_dir)
        self._reader = EventReader(self.probes)
        self.started_ns = time.monotonic_ns()
        self.reconcile()

    def close(self) -> None:
        if self.probes is not None:
            self.probes.close()
            self.probes = None

    def __enter__(self) -> "Monitor":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- keeping current ------------------------------------------------------------
    def poll_raw(self) -> tuple[bytes, list[int]]:
        """Drain the ring buffer into the tables without decoding: the hot path."""
        assert self._reader is not None, "start() first"
        with self._io:
            blob, offsets = self._reader.drain()
        with self.lock:
            self.table.apply_batch(blob, offsets)
        return blob, offsets

    def poll(self) -> list[records.ConnEvent]:
        """Drain the ring buffer into the tables; returns the records, decoded."""
        blob, offsets = self.poll_raw()
        return decode_batch(blob, offsets)

    def _other_namespaces(self) -> dict[int, str]:
        """Paths into the other network namespaces the table has rows in."""
        wanted: dict[int, set[int]] = {}
        with self.lock:
            for row in self.table.live.values():
                if row.netns != self.netns:
                    wanted.setdefault(row.netns, set()).add(row.tgid)
        if not wanted:
            return {}
        pids = {pid for group in wanted.values() for pid in group if pid}
        return netns.find_paths(set(wanted), pids, self._proc_root)

    def reconcile(self) -> int:
        """Walk the kernel's sockets: fresh counters, seeds, and missed closes removed.

        Our namespace is always walked; other namespaces are walked when the table
        has rows there and a path into them still exists (a /run/netns name or a
        process inside). Rows in namespaces that cannot be entered are left alone.
        """
        assert self._reader is not None, "start() first"
        with self._io:
            return self._reconcile(self._reader)

    def _reconcile(self, reader: EventReader) -> int:
        self._keep(self.poll_raw())
        taken, rows = reader.snapshot()
        walked = {self.netns}
        for ino, path in self._other_namespaces().items():
            try:
                rows += reader.snapshot(path)[1]
            except OSError:
                continue  # the namespace went away between finding and entering it
            walked.add(ino)
        with self.lock:
            seen = self.table.merge_snapshot(rows)
        self._keep(self.poll_raw())  # closes during the walk win over rows read before them
        with self.lock:
            removed = self.table.remove_missing(seen, taken, walked)
        self.resolve_owners(fds=False)  # sockets that predate us get a process name
        return removed

    def _keep(self, batch: tuple[bytes, Sequence[int]]) -> None:
        """Hold batches drained outside run()'s loop so its consumers still see them."""
        if batch[1]:
            self._pending.append(batch)

    def run(
        self,
        stop: threading.Event,
        on_events: Callable[[list[records.ConnEvent]], None] | None = None,
        poll_interval: float | Callable[[], float] = 0.1,
        reconcile_interval: float | Callable[[], float] = 5.0,
        on_batch: Callable[[bytes, list[int]], None] | None = None,
    ) -> None:
        """Poll on a timer until ``stop`` is set (the kernel never wakes us).

        ``on_events`` gets each batch decoded (for printing); ``on_batch`` gets it
        raw (for keeping). Intervals may be callables so a config reload takes
        effect at the next tick.
        """
        period = poll_interval if callable(poll_interval) else lambda: poll_interval
        every = reconcile_interval if callable(reconcile_interval) else lambda: reconcile_interval
        next_reconcile = time.monotonic() + every()
        while not stop.wait(period()):
            batches, self._pending = self._pending, []
            batches.append(self.poll_raw())
            for blob, offsets in batches:
                if offsets and on_batch:
                    on_batch(blob, offsets)
                if offsets and on_events:
                    on_events(decode_batch(blob, offsets))
            if time.monotonic() >= next_reconcile:
                self.reconcile()
                next_reconcile = time.monotonic() + every()

    # -- reading ------------------------------------------------------------------
    def resolve_owners(self, fds: bool = True) -> int:
        """Name, from /proc in one batch, the owners the kernel could only guess
        and (with ``fds``) every fd not yet known. Works on the table's rows, so
        nothing is decoded; each process is looked up once. Returns rows named."""
        with self.lock:
            need = [(key, row.tgid, records.ino_of(row.raw))
                    for key, row in self.table.live.items()
                    if row.owner_is_guess or (fds and row.fd < 0)]
        need = [n for n in need if n[2]]
        if not need:
            return 0
        guesses = any(tgid == 0 for _, tgid, _ in need)
        owners = procfs.socket_owners(None if guesses else {t for _, t, _ in need},
                                      self._proc_root)
        names: dict[int, str] = {}
        named = 0
        for key, tgid, ino in need:
            holders = owners.get(ino)
            if not holders:
                continue
            pid, fd = next((h for h in holders if h[0] == tgid), holders[0])
            if pid not in names:
                info = self.processes.lookup(pid)
                names[pid] = info.name if info else ""
            with self.lock:
                self.table.name_owner(key, pid, names[pid], fd)
            named += 1
        return named

    def connections(self, refresh: bool = True) -> list[Connection]:
        """Live connections with current counters and resolved owners."""
        if refresh:
            self.reconcile()
        self.resolve_owners()
        with self.lock:
            return self.table.snapshot()

    def loss(self) -> Loss:
        assert self.probes is not None and self._reader is not None
        st = self.probes.stats()
        return Loss(
            ringbuf_full=st[records.Stat.RINGBUF_FULL],
            socks_map_full=st[records.Stat.SOCKS_FULL],
            decode_errors=self._reader.decode_errors,
            table_full=self.table.counters["table_full"],
            totals_map_full=st[records.Stat.TOTALS_FULL],
            untracked_close=st[records.Stat.UNTRACKED_CLOSE],
            suppressed_close=st[records.Stat.SUPPRESSED_CLOSE],
        )
