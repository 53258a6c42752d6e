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
from typing import Callable, Iterator, Sequence

from sockwatch import latency, records
from sockwatch.heap import release_freed_heap, use_one_arena
from sockwatch.interfaces import InterfaceNames, NamespaceLinks
from sockwatch.kernel import loader, netns
from sockwatch.kernel.reader import EventReader
from sockwatch.processes import ProcessCache
from sockwatch.tables import Connection, ConnTable


_NETNS_OWNER = records.field_reader("netns", "sock.tgid").unpack_from
MAX_PENDING = 64  # drained batches kept for run()'s consumers
# Before looking again for a socket no process held: doubled at each miss, so an
# orphan that lives on (a listener held by no fd) costs a walk now and then, not
# one every reconcile.
UNOWNED_RETRY_S = 5.0
UNOWNED_RETRY_MAX_S = 300.0
SYNC_ATTEMPTS = 8  # drains per sync() while a record is still being written
TABLE_WAIT_S = 0.02  # how often the ring is drained while another thread holds the table
# Most of one core periodic walks may take. A walk of 200k sockets costs about
# 0.6 s of CPU: every 5 s that was 12 % of a core on an idle host; the period
# then stretches to 12 s. Walks of a few thousand sockets (tens of ms) keep the
# configured period.
WALK_CPU_SHARE = 0.05


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
    recursion_misses: int  # program runs skipped by the kernel: events never seen
    undelivered: int  # applied to the tables but dropped before run()'s consumers saw them
    untracked_close: int  # not a loss: closes of sockets that predate sockwatch
    suppressed_close: int  # test switch only
    socks_evicted: int  # sockets the full socks LRU map forgot (as of the last walk)


@dataclass(frozen=True)
class Walk:
    """What one reconciliation took and found."""

    owners_s: float  # the kernel putting the fd tables in its holders map (0: not asked)
    walk_s: float  # the walk of every socket, read and merged into the table
    sockets: int  # rows the walk read
    removed: int  # rows it found closed without their CLOSE


@dataclass(frozen=True)
class StartTimes:
    """Where a start's wall time went, for the daemon's log: a slow start on a
    busy host is told apart from a slow kernel load."""

    probes_s: float  # waiting for the probes to be loaded and attached
    walk: Walk  # the first walk, which joined the fd tables in the kernel


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
        use_one_arena()  # before the engine's threads start (see sockwatch.heap)
        self.cfg = cfg or loader.LoaderConfig()
        self.table = ConnTable(closed_capacity, max_live)
        # Held while records are applied and while readers copy or aggregate, so
        # HTTP threads never see a table half-way through a batch.
        self.lock = threading.RLock()
        # One thread at a time drains the ring buffer; one at a time walks the kernel.
        self._ring = threading.Lock()
        self._walk = threading.Lock()
        self._pending: list[tuple[bytes, Sequence[int]]] = []  # for run()'s consumers
        self.processes = ProcessCache(proc_root)
        self._proc_root = proc_root
        # (row key, alive since) -> (when the fd tables may be walked again for its
        # owner, the wait that ended then)
        self._unowned: dict[tuple[int, int], tuple[float, float]] = {}
        self._objects_dir = objects_dir
        self.probes: loader.Probes | None = None
        self._reader: EventReader | None = None
        self.netns = current_netns(proc_root)
        self.interfaces = InterfaceNames(self.netns, NamespaceLinks(self.netns, proc_root))
        self.started_ns = 0
        self.socks_entries = 0
        self.socks_evicted = 0
        self.walk_cpu_s = 0.0  # CPU time of the last periodic walk (run())
        self.start_times: StartTimes | None = None
        self._holding = self.cfg.hold_opens  # what the kernel was told (see send_every_open)
        self._holders_mapped = False  # the kernel's "holders" map is filled (see reconcile)
        self._every_open_until = 0.0

    # -- lifecycle -------------------------------------------------------------
    def start(self, loading: loader.Loading | None = None) -> None:
        """Attach (or take the probes ``loading`` is attaching for this config) and
        fill the table from a kernel walk."""
        began = time.monotonic()
        self.probes = (loading or loader.Loading(self.cfg, self._objects_dir)).probes()
        self._reader = EventReader(self.probes)
        self.started_ns = time.monotonic_ns()
        probes_s = time.monotonic() - began
        self.start_times = StartTimes(probes_s, self.reconcile(join_owners=True))

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
    def poll_raw(self) -> tuple[bytes, Sequence[int]]:
        """Drain the ring buffer into the tables without decoding: the hot path.
        OPENs the kernel still holds are released into it first.

        Drain and apply happen under one lock, so once it is taken every record
        drained earlier is in the table (reconcile relies on that). While another
        thread holds the table (a scrape of 200k rows, a walk's chunk) the ring
        keeps being drained every TABLE_WAIT_S into memory, and those batches are
        applied in order once the table is free: a busy table never makes the
        kernel drop records, however small the ring.
        """
        assert self._reader is not None, "start() first"
        with self._ring:
            self._hold_opens()
            self._reader.release_held()
            batches = [self._reader.drain()]
            while not self.lock.acquire(timeout=TABLE_WAIT_S):
                batches.append(self._reader.drain())
            try:
                for blob, offsets in batches:
                    self.table.apply_batch(blob, offsets)
            finally:
                self.lock.release()
        if len(batches) == 1:
            return batches[0]
        offsets, shift = [], 0
        for blob, part in batches:
            offsets.extend(map(shift.__add__, part))
            shift += len(blob)
        return b"".join(blob for blob, _ in batches), offsets

    def send_every_open(self, seconds: float) -> None:
        """Someone reads the event stream (the daemon's /api/events): for ``seconds``,
        the kernel sends each OPEN as it happens instead of holding it until the next
        drain, where the CLOSE of a short connection would have stood for it."""
        self._every_open_until = time.monotonic() + seconds

    def _hold_opens(self) -> None:
        hold = self.cfg.hold_opens and time.monotonic() >= self._every_open_until
        if hold != self._holding and self.probes is not None:
            self.probes.hold_opens(hold)
            self._holding = hold

    def sync(self) -> None:
        """Bring the tables up to date now (from any thread); run()'s consumers still
        get the records. Drains again while records are still being written (a few
        microseconds), so everything submitted before the call is applied."""
        assert self._reader is not None, "start() first"
        for _ in range(SYNC_ATTEMPTS):
            self._keep(self.poll_raw())
            if not self._reader.backlog():
                return

    def poll(self) -> list[records.ConnEvent]:
        """Drain the ring buffer into the tables; returns, decoded, every record drained
        since the last poll() or flush() (also those a reconcile or a view drained)."""
        events: list[records.ConnEvent] = []
        self.flush(events.extend)
        return events

    def _other_namespaces(self) -> dict[int, str]:
        """Paths into the other network namespaces the table has rows in."""
        wanted: dict[int, set[int]] = {}
        with self.lock:
            if not self.table.namespaces() - {self.netns, 0}:
                return {}  # every row is in ours: nothing to scan
            for (ns, tgid), _name in self.table.scan(_NETNS_OWNER):
                if ns != self.netns:
                    wanted.setdefault(ns, set()).add(tgid)
        if not wanted:
            return {}
        pids = {pid for group in wanted.values() for pid in group if pid}
        return netns.find_paths(set(wanted), pids, self._proc_root)

    def reconcile(self, join_owners: bool = False) -> Walk:
        """Walk the kernel's sockets: fresh counters, seeds, and missed closes removed.

        Our namespace is always walked; other namespaces are walked when the table
        has rows there and a path into them still exists (a /run/netns name or a
        process inside). Rows in namespaces that cannot be entered are left alone.
        Safe beside run()'s draining: the walk holds only its own lock, and rows are
        merged in chunks so the ring buffer keeps being drained meanwhile.

        With ``join_owners`` (the first walk, which finds every socket new) the
        kernel first puts the fd tables in a map and the walk joins them into its
        rows: at 200k sockets that saves reading 200k holders and matching them
        here, about 0.45 s of a start. The map is emptied before the next walk,
        off the start's path.
        """
        reader = self._reader
        probes = self.probes
        assert reader is not None and probes is not None, "start() first"
        with self._walk:
            self.sync()
            if self._holders_mapped:
                probes.forget_owners()
            self._holders_mapped = join_owners
            began = time.monotonic()
            joined = join_owners and probes.map_owners() == 0
            mapped = time.monotonic()
            with self.lock:
                self.table.begin_walk(time.monotonic_ns())
            taken = time.monotonic_ns()
            rows = self._merge(reader.walk())
            walked = {self.netns}
            for ino, path in self._other_namespaces().items():
                try:
                    chunks = reader.walk(path)
                except OSError:
                    continue  # the namespace went away between finding and entering it
                rows += self._merge(chunks)
                walked.add(ino)
            walked_s = time.monotonic() - mapped
            self.sync()  # closes during the walk win over rows read before them
            with self.lock:
                removed = self.table.remove_missing(taken, walked)
            # the map's fill, counted with each walk, not per scrape
            self.socks_entries, evicted = probes.socks_fill()
            self.socks_evicted = max(self.socks_evicted, evicted)  # a counter: never back
        if joined:  # the fd tables were read whole: a row the join left unowned has no holder
            now = time.monotonic()
            self._wait_for_owners(False, self._owners_wanted(False, None, now), now)
        else:
            self.resolve_owners(fds=False)  # sockets that predate us get a process name
        self.name_interfaces()
        # A flood leaves big drained batches and a shrunk slab behind; glibc keeps
        # freed heap, so without this RSS stays at the largest ever seen
        # (measured: 94 -> 71 MB after 80k sockets closed; about 4 ms).
        release_freed_heap()
        return Walk(mapped - began, walked_s, rows, removed)

    def _merge(self, chunks: Iterator[bytes]) -> int:
        """Merge a walk's rows chunk by chunk, each under the table lock, so the
        ring buffer keeps being drained meanwhile and only one chunk is held.
        Returns the rows merged."""
        size, rows = records.EVENT_SIZE, 0
        for chunk in chunks:
            with self.lock:
                self.table.merge_snapshot(chunk, range(0, len(chunk), size))
            rows += len(chunk) // size
        return rows

    def _keep(self, batch: tuple[bytes, Sequence[int]]) -> None:
        """Hold a drained batch for run()'s consumers (bounded: they may be absent)."""
        if batch[1]:
            with self.lock:
                self._pending.append(batch)
                for _blob, dropped in self._pending[:-MAX_PENDING]:
                    # applied to the tables, but no consumer drained them in time
                    self.table.counters["undelivered"] += len(dropped)
                del self._pending[:-MAX_PENDING]

    def run(
        self,
        stop: threading.Event,
        on_events: Callable[[list[records.ConnEvent]], None] | None = None,
        poll_interval: float | Callable[[], float] = 0.1,
        reconcile_interval: float | Callable[[], float] = 5.0,
        on_batch: Callable[[bytes, Sequence[int]], None] | None = None,
    ) -> None:
        """Poll on a timer until ``stop`` is set (the kernel never wakes us).

        Reconciliation runs in its own thread so a long walk never delays the
        draining that keeps the ring buffer from overflowing. Walks take at most
        WALK_CPU_SHARE of a core: one that costs more than that of its period
        stretches the wait before the next. ``on_events`` gets
        each batch decoded (for printing); ``on_batch`` gets it raw (for keeping).
        Intervals may be callables so a config reload takes effect at the next tick.
        """
        period = poll_interval if callable(poll_interval) else lambda: poll_interval
        every = reconcile_interval if callable(reconcile_interval) else lambda: reconcile_interval
        failure: list[BaseException] = []
        reader = self._reader
        assert reader is not None, "start() first"

        def reconciling() -> None:
            try:
                wait = every()
                while not stop.wait(wait):
                    cpu, read = time.thread_time(), reader.walk_read_cpu_s
                    self.reconcile()
                    self.walk_cpu_s = (time.thread_time() - cpu
                                       + reader.walk_read_cpu_s - read)
                    wait = max(every(), self.walk_cpu_s / WALK_CPU_SHARE)
            except BaseException as exc:  # re-raised by run() in its own thread
                failure.append(exc)
                stop.set()

        walker = threading.Thread(target=reconciling, name="reconcile", daemon=True)
        walker.start()
        try:
            while not stop.is_set():
                reader.wait(period())  # the timer, or a wake-up when the ring fills
                # One drain per tick, not sync()'s chase: under load records keep
                # coming, so it would drain up to SYNC_ATTEMPTS tiny batches each tick.
                self._keep(self.poll_raw())
                self._deliver(on_events, on_batch)
        finally:
            stop.set()
            walker.join()
        if failure:
            raise failure[0]

    def flush(
        self,
        on_events: Callable[[list[records.ConnEvent]], None] | None = None,
        on_batch: Callable[[bytes, Sequence[int]], None] | None = None,
    ) -> None:
        """Drain now and hand every batch drained since the last flush to the consumers."""
        self.sync()
        self._deliver(on_events, on_batch)

    def _deliver(
        self,
        on_events: Callable[[list[records.ConnEvent]], None] | None,
        on_batch: Callable[[bytes, Sequence[int]], None] | None,
    ) -> None:
        with self.lock:
            batches, self._pending = self._pending, []
        for blob, offsets in batches:
            if on_batch:
                on_batch(blob, offsets)
            if on_events:
                on_events(decode_batch(blob, offsets))

    # -- reading ------------------------------------------------------------------
    def resolve_owners(self, fds: bool = True, keys: set[int] | None = None) -> int:
        """Name, from the kernel's fd tables in one pass (iter/task_file), the owners
        the kernel could only guess and (with ``fds``) every fd not yet known, for
        all rows or those in ``keys``. Rows are matched by sock address, so nothing
        is decoded; a socket held by several processes goes to the one the kernel
        attributed it to, else to the lowest pid. Returns how many rows were named."""
        now = time.monotonic()
        wanted = self._owners_wanted(fds, keys, now)
        probes = self.probes
        if not wanted or probes is None:
            return 0
        names: dict[tuple[int, bytes], str] = {}

        def name_of(pid: int, comm: bytes) -> str:
            name = names.get((pid, comm))
            if name is None:
                name = names[(pid, comm)] = self._process_name(pid, comm)
            return name

        elsewhere: dict[int, tuple] = {}  # held, but not by the process it was attributed to
        named = 0
        for chunk in probes.owner_chunks():
            with self.lock:
                named += self.table.claim_owners(records.OWNER.iter_unpack(chunk), fds, wanted,
                                                 name_of, elsewhere)
        with self.lock:
            named += self.table.claim_owners(elsewhere.values(), fds, wanted, name_of)
        self._wait_for_owners(fds, wanted, now)
        return named

    def _owners_wanted(self, fds: bool, keys: set[int] | None, now: float) -> set[int]:
        """The keys of the rows resolve_owners() should look up now: those with an
        inode (a socket with none has no file, so no fd can hold it), less those
        waiting after a miss."""
        unowned = self._unowned
        for gone in [k for k in unowned if k[0] not in self.table.live]:
            del unowned[gone]
        waiting = {found for found, (until, _wait) in unowned.items() if until > now}
        with self.lock:
            return {key for key, _tgid, ino, since in self.table.owners_to_find(fds, keys)
                    if ino and (not waiting or (key, since) not in waiting)}

    def _wait_for_owners(self, fds: bool, wanted: set[int], now: float) -> None:
        """Rows of ``wanted`` the fd tables were just read for and still need an
        owner (an orphan, a kernel socket) wait before the next look, twice as
        long at each miss."""
        unowned = self._unowned
        with self.lock:
            missed = list(self.table.owners_to_find(fds, wanted))
        for key, _tgid, _ino, since in missed:
            wait = min(2 * unowned.get((key, since), (0.0, UNOWNED_RETRY_S / 2))[1],
                       UNOWNED_RETRY_MAX_S)
            unowned[(key, since)] = (now + wait, wait)

    def _process_name(self, pid: int, comm: bytes) -> str:
        """The name /proc/<pid>/stat (and psutil) give: the leader's comm, or for a
        comm cut at 15 characters, psutil's longer name from the command line."""
        name = records.decode_comm(comm)
        if not comm[records.COMM_LEN - 2]:
            return name
        info = self.processes.lookup(pid)
        return info.name if info else name

    def connections(self, refresh: bool = True,
                    where: Callable[[int, str, int, int, int], bool] | None = None,
                    ) -> list[Connection]:
        """Live connections with current counters and resolved owners.

        ``where(pid, comm, state, sport, dport)`` selects rows before anything is
        decoded or its owner looked up, so a narrow query stays cheap on a big table.
        """
        return [c for batch in self.connection_batches(refresh, where) for c in batch]

    def connection_batches(self, refresh: bool = True,
                           where: Callable[[int, str, int, int, int], bool] | None = None,
                           size: int = 2048) -> Iterator[list[Connection]]:
        """``connections()`` a batch at a time, each copied under the lock when asked
        for: a reader that streams them (the JSON API) holds one batch, not 200k."""
        if refresh:
            self.reconcile()
        with self.lock:
            keys = list(self.table.live) if where is None else self.table.select(where)
        self.resolve_owners(keys=None if where is None else set(keys))
        for start in range(0, len(keys), size):
            with self.lock:
                rows = [self.table.row(key) for key in keys[start : start + size]]
            yield [row.connection() for row in rows if row is not None]

    def name_interfaces(self) -> None:
        """Learn the names of the interfaces that carried traffic, while they still exist:
        one that is gone by the time a view asks keeps the name read here."""
        probes = self.probes
        if probes is not None and probes.stack_enabled:
            self.interfaces.resolve(probes.interface_totals())

    def stack_maps(self) -> tuple[dict[latency.StackKey, list[int]],
                                  dict[latency.IfKey, tuple[int, int, int, int, int]],
                                  dict[latency.IfKey, tuple[str, str]]]:
        """The per-interface histograms, the interface totals, and (label, driver) for
        every interface in them; all empty when the stack programs are off. Read
        straight from the kernel's maps: nothing to drain first."""
        probes = self.probes
        assert probes is not None, "start() first"
        if not probes.stack_enabled:
            return {}, {}, {}
        stack, totals = probes.stack_histograms(), probes.interface_totals()
        return stack, totals, self.interfaces.resolve(latency.interface_keys(stack, totals))

    def latency(self) -> dict:
        """The per-layer latency report (the shape of /api/latency, see latency.report)."""
        assert self.probes is not None, "start() first"
        return latency.report(self.probes.stack_enabled, self.probes.histograms(),
                              *self.stack_maps())

    def loss(self) -> Loss:
        assert self.probes is not None and self._reader is not None
        st = self.probes.stats()
        return Loss(
            ringbuf_full=st[records.Stat.RINGBUF_FULL],
            socks_map_full=st[records.Stat.SOCKS_FULL],
            # the reader's torn records and the rows the table could not apply
            decode_errors=self._reader.decode_errors + self.table.counters["malformed"],
            table_full=self.table.counters["table_full"],
            totals_map_full=st[records.Stat.TOTALS_FULL],
            recursion_misses=max(0, self.probes.skipped_runs() - st[records.Stat.NESTED_RUNS]),
            undelivered=self.table.counters["undelivered"],
            untracked_close=st[records.Stat.UNTRACKED_CLOSE],
            suppressed_close=st[records.Stat.SUPPRESSED_CLOSE],
            socks_evicted=self.socks_evicted,
        )
