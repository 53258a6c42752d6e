"""The live state: every TCP socket, who owns it, and the recently closed ones.

Records are the only input: OPEN and CLOSE from the ring buffer, SNAPSHOT rows
from iter/tcp at start and at each reconciliation. Nothing here touches the
kernel or /proc, so the rules below are unit-tested with plain records.

The table keeps each socket's latest record as raw bytes and reads only the
hot fields at its head (``records.HOT``) to apply it: under a connection flood
that is the whole per-record cost. Views decode rows into ``Connection``s
when they ask (``snapshot()``), and counting by process happens in the kernel.

Ordering rules (records from before a row's incarnation must not touch it,
since the kernel reuses sock addresses quickly):
- a connection is alive from ``alive_since_ns``: its first state timestamp, or
  the snapshot that first saw it when it predates sockwatch;
- a CLOSE older than that belongs to an earlier socket at the same address, and
  a record of a socket opened after it means that row's close was missed;
- a reconciliation removes only rows alive before the snapshot began that the
  snapshot did not see, in the namespaces it walked.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Iterable

from sockwatch import records
from sockwatch.records import Attrib, ConnEvent, Kind, Result, Role

# Attributions made by a task touching the socket; others are guesses.
TASK_ATTRIBUTIONS = frozenset(
    {Attrib.CONNECT, Attrib.LISTEN, Attrib.ACCEPT, Attrib.FIRST_IO, Attrib.CLOSE}
)
_OPEN, _CLOSE, _SNAPSHOT = Kind.OPEN, Kind.CLOSE, Kind.SNAPSHOT
_KINDS = frozenset(Kind)
_N_ROLES, _N_RESULTS, _N_ATTRIBS = len(Role), len(Result), len(Attrib)
_COMM = slice(records.COMM_OFFSET, records.COMM_OFFSET + records.COMM_LEN)
_SIZE = records.EVENT_SIZE
_hot = records.HOT.unpack_from
_OPENED = tuple(f"opened_{r.name.lower()}" for r in Role)  # indexed by role, no enum per record


@dataclass(slots=True)
class Connection:
    """One socket as views see it: the kernel's latest record plus its owner."""

    ev: ConnEvent  # latest record: tuple, state, counters
    tgid: int
    comm: str
    fd: int
    alive_since_ns: int
    seen_by: str  # "event" or "snapshot": how sockwatch first learned of it
    closed_ns: int = 0
    reconciled: bool = False  # removed by reconciliation, not by a CLOSE record

    @property
    def key(self) -> int:
        return self.ev.skaddr

    @property
    def process(self) -> str:
        """The name used as the ``process`` label: never empty."""
        return self.comm or "unknown"

    @property
    def owner_is_guess(self) -> bool:
        """No task touched it while we watched: /proc must say who holds it."""
        return self.tgid == 0 or self.ev.attrib not in TASK_ATTRIBUTIONS


class Row:
    """A socket in the table: its latest raw record and what we learned of its owner."""

    __slots__ = ("raw", "ts_ns", "alive_since_ns", "netns", "tgid", "comm", "fd", "attrib",
                 "named", "seen_by", "closed_ns", "reconciled")

    def __init__(self, raw: bytes, ts_ns: int, alive_since_ns: int, netns: int, tgid: int,
                 fd: int, attrib: int, seen_by: str):
        self.raw = raw
        self.ts_ns = ts_ns
        self.alive_since_ns = alive_since_ns
        self.netns = netns
        self.tgid = tgid
        self.comm: bytes | str | None = None  # None: the raw record's; str once /proc named it
        self.fd = fd
        self.attrib = attrib  # of the record the owner came from
        self.named = False  # the owner was read from /proc: no longer a guess
        self.seen_by = seen_by
        self.closed_ns = 0
        self.reconciled = False

    @property
    def key(self) -> int:
        return _hot(self.raw)[1]

    @property
    def owner_is_guess(self) -> bool:
        return not self.named and (self.tgid == 0 or self.attrib not in TASK_ATTRIBUTIONS)

    @property
    def comm_bytes(self) -> bytes | str:
        return self.raw[_COMM] if self.comm is None else self.comm

    @property
    def comm_name(self) -> str:
        comm = self.comm_bytes
        return comm if isinstance(comm, str) else records.decode_comm(comm)

    def connection(self) -> Connection:
        ev = records.decode(self.raw)
        return Connection(ev, self.tgid, self.comm_name, self.fd, self.alive_since_ns, self.seen_by,
                          self.closed_ns, self.reconciled)


class ConnTable:
    """``process -> fd -> socket -> 5-tuple``, applied from raw records."""

    def __init__(self, closed_capacity: int = 4096, max_live: int = 262144):
        self.live: dict[int, Row] = {}
        self.closed: collections.deque[Row] = collections.deque(maxlen=closed_capacity)
        self.max_live = max_live
        self.counters: collections.Counter[str] = collections.Counter()
        # While a kernel walk is under way: close time of every socket that closed,
        # so a row the walk read before the close cannot bring it back.
        self._walk_since: int | None = None
        self._closed_during_walk: dict[int, int] = {}
        # (role, result) numbers of every connection that ended; see ended_by_name()
        self.ended: collections.Counter[tuple[int, int]] = collections.Counter()

    # -- records ---------------------------------------------------------------
    def apply_batch(self, blob: bytes, offsets: Iterable[int]) -> None:
        """Apply records found at ``offsets`` in ``blob`` (the ring buffer's hot path:
        hot fields are read in place, bytes are copied only for what is kept).

        The two commonest records, a new socket's OPEN and the CLOSE of a row
        that has one, are applied inline: under a connection flood this loop is
        the engine's whole per-record cost, and calls are most of it in Python.
        """
        live, closed, ended, counters = self.live, self.closed, self.ended, self.counters
        last = len(blob) - _SIZE
        for off in offsets:
            if not 0 <= off <= last:
                counters["malformed"] += 1  # a torn or misaddressed record
                continue
            h = _hot(blob, off)
            ts, skaddr, kind, result, _st, _old, netns, open_ns, tgid, fd, role, attrib = h
            row = live.get(skaddr)
            if (kind == _OPEN and row is None and role < _N_ROLES and attrib < _N_ATTRIBS
                    and len(live) < self.max_live):
                live[skaddr] = Row(blob[off : off + _SIZE], ts, open_ns or ts, netns, tgid, fd,
                                   attrib, "event")
                counters[_OPENED[role]] += 1
            elif (kind == _CLOSE and row is not None and open_ns and ts >= row.alive_since_ns
                    and ts >= row.ts_ns and role < _N_ROLES and result < _N_RESULTS
                    and attrib < _N_ATTRIBS and self._walk_since is None):
                del live[skaddr]
                # _replace and _take_owner, for a record that is now the row's latest
                if tgid and (attrib in TASK_ATTRIBUTIONS or row.tgid == 0):
                    row.tgid, row.attrib, row.comm = tgid, attrib, None
                elif row.comm is None:
                    row.comm = row.raw[_COMM]
                if fd >= 0:
                    row.fd = fd
                row.raw, row.ts_ns, row.closed_ns = blob[off : off + _SIZE], ts, ts
                closed.append(row)
                ended[(role, result)] += 1
            else:
                self._apply(blob, off)

    def apply(self, raw: bytes) -> None:
        """Apply one record (exactly ``records.EVENT_SIZE`` bytes)."""
        self._apply(raw, 0)

    def _apply(self, blob: bytes, off: int) -> None:
        if off < 0 or off + _SIZE > len(blob):
            self.counters["malformed"] += 1  # a torn or misaddressed record
            return
        h = _hot(blob, off)
        if h[2] not in _KINDS or h[10] >= _N_ROLES or h[3] >= _N_RESULTS or h[11] >= _N_ATTRIBS:
            self.counters["malformed"] += 1  # never from our kernel side; counted, not fatal
            return
        raw = blob[off : off + _SIZE] if off or len(blob) != _SIZE else blob
        if h[2] == _CLOSE:
            self._close(raw, h)
        else:
            self._upsert(raw, h)

    def _upsert(self, raw: bytes, h: tuple) -> None:
        ts, skaddr, kind, _res, _st, _old, netns, open_ns, tgid, fd, role, attrib = h
        row = self.live.get(skaddr)
        if row is None:
            if kind == _SNAPSHOT and self._closed_during_walk.get(skaddr, -1) >= ts:
                return  # read by the walk just before it closed: not alive any more
            if len(self.live) >= self.max_live:
                self.counters["table_full"] += 1
                return
            seen_by = "snapshot" if kind == _SNAPSHOT else "event"
            self.live[skaddr] = Row(raw, ts, open_ns or ts, netns, tgid, fd, attrib, seen_by)
            if kind == _OPEN:
                self.counters[_OPENED[role]] += 1
            return
        if ts < row.alive_since_ns:
            return  # a record from an earlier socket at this address
        if open_ns > row.alive_since_ns:
            # A later socket at the same address: the old one closed unseen.
            self._retire(skaddr, row, open_ns, "stale_replaced")
            self._upsert(raw, h)
            return
        if ts >= row.ts_ns:
            self._replace(row, raw, ts)
        self._take_owner(row, raw, tgid, fd, attrib)
        if kind == _OPEN:
            self.counters[_OPENED[role]] += 1

    @staticmethod
    def _replace(row: Row, raw: bytes, ts: int) -> None:
        """Newer counters and state; the owner's name stays until an owner is taken anew."""
        if row.comm is None:
            row.comm = row.raw[_COMM]
        row.raw, row.ts_ns = raw, ts

    @staticmethod
    def _take_owner(row: Row, raw: bytes, tgid: int, fd: int, attrib: int) -> None:
        """A task's attribution beats a guess; a guess never replaces what /proc found."""
        if tgid and (attrib in TASK_ATTRIBUTIONS or row.tgid == 0):
            row.tgid, row.attrib = tgid, attrib
            row.comm = None if row.raw is raw else raw[_COMM]
        if fd >= 0:
            row.fd = fd

    def _close(self, raw: bytes, h: tuple) -> None:
        ts, skaddr, _kind, result, _st, _old, netns, open_ns, tgid, fd, role, attrib = h
        row = self.live.get(skaddr)
        if row is not None and ts >= row.alive_since_ns:
            del self.live[skaddr]
            if not open_ns and records.needs_tuple_from(raw):
                # An untracked close (the socket predates us) comes after the kernel
                # released the port and detached the file: keep what the row knew.
                raw = records.with_tuple_of(raw, row.raw)
            self._replace(row, raw, ts)
            self._take_owner(row, raw, tgid, fd, attrib)
        else:
            # Never seen open: a failed connect, or a socket that lived and died
            # between two reads. The CLOSE record carries everything.
            row = Row(raw, ts, open_ns or ts, netns, tgid, fd, attrib, "event")
        row.closed_ns = ts
        self.closed.append(row)
        self.ended[(role, result)] += 1
        if self._walk_since is not None:
            self._closed_during_walk[skaddr] = ts

    # -- reconciliation ----------------------------------------------------------
    def begin_walk(self, now_ns: int) -> None:
        """A kernel walk starts: remember closes until remove_missing() ends it."""
        self._walk_since = now_ns
        self._closed_during_walk.clear()

    def merge_snapshot(self, rows: Iterable[bytes]) -> set[int]:
        """Apply iter/tcp rows (fresh counters, sockets that predate us); returns their keys."""
        seen = set()
        for raw in rows:
            if len(raw) == _SIZE:
                seen.add(_hot(raw)[1])
            self._apply(raw, 0)
        return seen

    def remove_missing(self, seen: set[int], snapshot_ns: int, walked: set[int]) -> int:
        """Drop rows the snapshot should have seen but did not; returns how many.

        Only namespaces in ``walked`` were looked at; rows elsewhere stay.
        """
        gone = [
            (key, row)
            for key, row in self.live.items()
            if key not in seen and row.netns in walked and row.alive_since_ns < snapshot_ns
        ]
        for key, row in gone:
            self._retire(key, row, snapshot_ns, "reconciled_removed")
        self._walk_since = None
        self._closed_during_walk.clear()
        return len(gone)

    def _retire(self, key: int, row: Row, when_ns: int, counter: str) -> None:
        """Move a row whose close was never seen to the closed ring, and count it."""
        del self.live[key]
        row.closed_ns = when_ns
        row.reconciled = True
        self.closed.append(row)
        self.counters[counter] += 1

    # -- reading -------------------------------------------------------------------
    def snapshot(self) -> list[Connection]:
        """Decoded copies of the live rows: views may keep them while the table moves on."""
        return [row.connection() for row in self.live.values()]

    def recently_closed(self) -> list[Connection]:
        return [row.connection() for row in self.closed]

    def ended_by_name(self) -> dict[tuple[Role, Result], int]:
        return {(Role(r), Result(x)): n for (r, x), n in self.ended.items()}

    def name_owner(self, key: int, tgid: int, comm: str, fd: int) -> None:
        """Record the owner /proc found for a live row (an fd never changes while it lives)."""
        row = self.live.get(key)
        if row is not None:
            row.tgid, row.comm, row.fd, row.named = tgid, comm, fd, True

