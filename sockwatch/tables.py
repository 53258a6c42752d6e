"""The live state: every TCP socket, who owns it, and the recently closed ones.

Records are the only input: OPEN and CLOSE from the ring buffer, SNAPSHOT rows
from iter/tcp at start and at each reconciliation. Nothing here touches the
kernel or /proc, so the rules below are unit-tested with plain records.

Ordering rules (records from before a row's incarnation must not touch it,
since the kernel reuses sock addresses quickly):
- a connection is alive from ``alive_since_ns``: its first state timestamp, or
  the snapshot that first saw it when it predates sockwatch;
- a CLOSE older than that belongs to an earlier socket at the same address, and
  a record of a socket opened after it means that row's close was missed;
- a reconciliation removes only rows alive before the snapshot began that the
  snapshot did not see, in the snapshot's own network namespace.
"""

from __future__ import annotations

import collections
import dataclasses
from dataclasses import dataclass
from typing import Iterable

from sockwatch.records import (
    TCP_ESTABLISHED,
    TCP_SYN_RECV,
    TCP_SYN_SENT,
    Attrib,
    ConnEvent,
    Kind,
    Result,
    Role,
)
from sockwatch.totals import Totals

# Attributions made by a task touching the socket; others are guesses.
TASK_ATTRIBUTIONS = frozenset(
    {Attrib.CONNECT, Attrib.LISTEN, Attrib.ACCEPT, Attrib.FIRST_IO, Attrib.CLOSE}
)


@dataclass(slots=True)
class Connection:
    """One socket as the tables know it: the kernel's latest view plus its owner."""

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


class ConnTable:
    """``process -> fd -> socket -> 5-tuple``, applied from records."""

    def __init__(
        self,
        closed_capacity: int = 4096,
        max_live: int = 262144,
        top_processes: int = 20,
        top_ports: int = 20,
    ):
        self.live: dict[int, Connection] = {}
        self.totals = Totals.with_caps(top_processes, top_ports)
        self.closed: collections.deque[Connection] = collections.deque(maxlen=closed_capacity)
        self.max_live = max_live
        self.counters: collections.Counter[str] = collections.Counter()
        # (role, result) of every connection that ended, for rates and metrics
        self.ended: collections.Counter[tuple[Role, Result]] = collections.Counter()

    # -- records ---------------------------------------------------------------
    def apply(self, ev: ConnEvent) -> None:
        if ev.kind == Kind.CLOSE:
            self._close(ev)
        else:
            self._upsert(ev, ev.ts_ns if ev.kind == Kind.SNAPSHOT else 0)

    def apply_all(self, events: Iterable[ConnEvent]) -> None:
        for ev in events:
            self.apply(ev)

    def _upsert(self, ev: ConnEvent, seen_ns: int) -> None:
        conn = self.live.get(ev.skaddr)
        if conn is None:
            if len(self.live) >= self.max_live:
                self.counters["table_full"] += 1
                return
            self.live[ev.skaddr] = Connection(
                ev=ev,
                tgid=ev.tgid,
                comm=ev.comm,
                fd=ev.fd,
                alive_since_ns=ev.open_ns or seen_ns or ev.ts_ns,
                seen_by="snapshot" if ev.kind == Kind.SNAPSHOT else "event",
            )
            if ev.kind == Kind.OPEN:
                self._opened(self.live[ev.skaddr])
            return
        if ev.ts_ns < conn.alive_since_ns:
            return  # a record from an earlier socket at this address
        if ev.open_ns > conn.alive_since_ns:
            # A later socket at the same address: the old one closed unseen.
            self._retire(conn, ev.open_ns, "stale_replaced")
            self._upsert(ev, seen_ns)
            return
        if ev.ts_ns >= conn.ev.ts_ns:
            conn.ev = ev
        self._take_owner(conn, ev)
        if ev.kind == Kind.OPEN:
            self._opened(conn)

    def _opened(self, conn: Connection) -> None:
        """Count an opening once: connects by result, accepts by port, handshakes."""
        ev, t = conn.ev, self.totals
        self.counters["opened_" + ev.role.name.lower()] += 1
        if ev.role == Role.CLIENT:
            t.connects[(t.processes(conn.process), "ok")] += 1
            start = ev.state_ns[TCP_SYN_SENT]
        elif ev.role == Role.SERVER:
            t.accepts[(t.processes(conn.process), t.ports(str(ev.sport)))] += 1
            start = ev.state_ns[TCP_SYN_RECV]
        else:
            return
        done = ev.state_ns[TCP_ESTABLISHED]
        if start and done >= start:
            t.histogram(t.handshake, ev.role.name.lower()).observe_ns(done - start)

    @staticmethod
    def _take_owner(conn: Connection, ev: ConnEvent) -> None:
        """A task's attribution beats a guess; a guess never replaces what /proc found."""
        if ev.tgid and (ev.attrib in TASK_ATTRIBUTIONS or conn.tgid == 0):
            conn.tgid, conn.comm = ev.tgid, ev.comm
        if ev.fd >= 0:
            conn.fd = ev.fd

    def _close(self, ev: ConnEvent) -> None:
        conn = self.live.get(ev.skaddr)
        if conn is not None and ev.ts_ns >= conn.alive_since_ns:
            del self.live[ev.skaddr]
            # An untracked close (the socket predates us) comes after the kernel
            # released the port and detached the file: keep what the row knew.
            if not ev.sport or not ev.ino:
                ev = dataclasses.replace(ev, sport=ev.sport or conn.ev.sport,
                                         ino=ev.ino or conn.ev.ino)
            conn.ev = ev
            self._take_owner(conn, ev)
        else:
            # Never seen open: a failed connect, or a socket that lived and died
            # between two reads. The CLOSE record carries everything.
            conn = Connection(ev, ev.tgid, ev.comm, ev.fd, ev.open_ns or ev.ts_ns, "event")
        conn.closed_ns = ev.ts_ns
        self.closed.append(conn)
        self.ended[(ev.role, ev.result)] += 1
        self._closed(conn)

    def _closed(self, conn: Connection) -> None:
        """Fold a finished connection into the running totals."""
        ev, t = conn.ev, self.totals
        if ev.oldstate == TCP_SYN_SENT and ev.result != Result.OK:
            t.connects[(t.processes(conn.process), ev.result.name.lower())] += 1
            return
        if ev.role == Role.LISTENER:
            return
        totals = t.bytes_for(conn.process)
        totals.sent += ev.payload_sent
        totals.received += ev.payload_received
        totals.retransmits += ev.total_retrans
        if conn.alive_since_ns and ev.ts_ns >= conn.alive_since_ns and conn.seen_by == "event":
            role = ev.role.name.lower()
            t.histogram(t.lifetime, role).observe_ns(ev.ts_ns - conn.alive_since_ns)

    # -- reconciliation ----------------------------------------------------------
    def merge_snapshot(self, rows: Iterable[ConnEvent]) -> set[int]:
        """Apply iter/tcp rows (fresh counters, sockets that predate us); returns their keys."""
        seen = set()
        for row in rows:
            seen.add(row.skaddr)
            self._upsert(row, row.ts_ns)
        return seen

    def remove_missing(self, seen: set[int], snapshot_ns: int, walked: set[int]) -> int:
        """Drop rows the snapshot should have seen but did not; returns how many.

        Only namespaces in ``walked`` were looked at; rows elsewhere stay.
        """
        gone = [
            key
            for key, conn in self.live.items()
            if key not in seen and conn.ev.netns in walked and conn.alive_since_ns < snapshot_ns
        ]
        for key in gone:
            self._retire(self.live[key], snapshot_ns, "reconciled_removed")
        return len(gone)

    def _retire(self, conn: Connection, when_ns: int, counter: str) -> None:
        """Move a row whose close was never seen to the closed ring, and count it."""
        del self.live[conn.key]
        conn.closed_ns = when_ns
        conn.reconciled = True
        self.closed.append(conn)
        self.counters[counter] += 1

    # -- reading -------------------------------------------------------------------
    def snapshot(self) -> list[Connection]:
        """Copies of the live rows: views may keep them while the table moves on."""
        return [dataclasses.replace(c) for c in self.live.values()]

    def recently_closed(self) -> list[Connection]:
        return [dataclasses.replace(c) for c in self.closed]
