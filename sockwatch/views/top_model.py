"""What ``sockwatch top`` shows, computed from two consecutive samples.

Rates come from per-connection differences, not per-process sums: a process's
byte total drops when one of its connections closes, so a difference of sums
would go negative. Each connection's counters are remembered between samples;
a connection that closed in the window contributes its final counters (from
its close event) minus what was last seen of it, and one that opened in the
window contributes everything it has. No kernel access here: unit-tested with
plain dicts.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field
from typing import Any

from sockwatch.views.top_source import Sample

Key = tuple
SYN_STATES = frozenset({"SYN-SENT", "SYN-RECV", "NEW-SYN-RECV"})
# state_times of a connection that did its handshake here: first -> established
HANDSHAKE_FROM = ("SYN-SENT", "SYN-RECV")


def conn_key(d: dict[str, Any]) -> Key:
    """One socket across samples and its close event (an inode is reused only after close)."""
    return (d["netns"], d["ino"], d["local_addr"], d["local_port"], d["remote_addr"],
            d["remote_port"])


def handshake_s(d: dict[str, Any]) -> float | None:
    """SYN_SENT/SYN_RECV -> ESTABLISHED of one connection, when both were seen."""
    times = d.get("state_times") or {}
    est = times.get("ESTAB")
    if est is None:
        return None
    for first in HANDSHAKE_FROM:
        if first in times:
            return max(0.0, est - times[first])
    return None


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (no interpolation between samples); None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


@dataclass
class ConnRow:
    """One live connection (the drill-down) with its rates over the window."""

    d: dict[str, Any]  # fields.connection_dict
    tx_s: float | None = None
    rx_s: float | None = None

    @property
    def handshake_s(self) -> float | None:
        return handshake_s(self.d)

    def matches(self, text: str) -> bool:
        d = self.d
        return any(text in str(v).lower() for v in (
            d["local_addr"], d["local_port"], d["remote_addr"], d["remote_port"], d["state"],
            f"{d['local_addr']}:{d['local_port']}", f"{d['remote_addr']}:{d['remote_port']}"))


@dataclass
class ProcRow:
    """One process: its connections now and what it did during the window."""

    pid: int  # 0: owner unknown
    process: str
    user: str
    states: collections.Counter = field(default_factory=collections.Counter)
    connections: list[ConnRow] = field(default_factory=list)
    # per second over the window; None on the first sample (no window yet)
    out_s: float | None = None
    in_s: float | None = None
    fail_s: float | None = None
    tx_s: float | None = None
    rx_s: float | None = None
    retr_s: float | None = None
    handshakes: list[float] = field(default_factory=list)  # completed in the window
    # per connection, live or closed in the window, when the stack probes measured it
    rcvq_p50_us: list[float] = field(default_factory=list)
    rcvq_max_us: list[float] = field(default_factory=list)

    @property
    def conns(self) -> int:
        return sum(self.states.values())

    def count(self, *states: str) -> int:
        return sum(self.states[s] for s in states)

    @property
    def syn(self) -> int:
        return self.count(*SYN_STATES)

    @property
    def other(self) -> int:
        return self.conns - self.count("ESTAB", "LISTEN") - self.syn

    @property
    def hs_p50(self) -> float | None:
        return percentile(self.handshakes, 0.5)

    @property
    def hs_p99(self) -> float | None:
        return percentile(self.handshakes, 0.99)

    @property
    def rcvq_wait_p50_us(self) -> float | None:
        return percentile(self.rcvq_p50_us, 0.5)

    @property
    def rcvq_wait_max_us(self) -> float | None:
        return max(self.rcvq_max_us) if self.rcvq_max_us else None

    def matches(self, text: str) -> bool:
        """Filter text: name, pid or user, or the port/address/state of a connection."""
        if text in self.process.lower() or text == str(self.pid) or text in self.user.lower():
            return True
        return any(c.matches(text) for c in self.connections)


@dataclass
class ListenerRow:
    pid: int
    process: str
    d: dict[str, Any]  # the listening socket's connection_dict
    established: int = 0  # live accepted connections on its port
    accepts_s: float | None = None
    accept_waits_us: list[float] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.d["local_port"]

    @property
    def accept_wait_p50_us(self) -> float | None:
        return percentile(self.accept_waits_us, 0.5)

    def matches(self, text: str) -> bool:
        return (text in self.process.lower() or text == str(self.pid) or text == str(self.port)
                or text in str(self.d["local_addr"]))


@dataclass
class Frame:
    """Everything one screen needs, for every view."""

    taken: float
    window: float | None  # seconds since the previous sample; None on the first
    processes: list[ProcRow]
    listeners: list[ListenerRow]
    host: ProcRow  # the whole host as one row: states, rates, handshakes
    loss: dict[str, int]
    modes: dict[str, str]
    latency: dict[str, Any]
    events_dropped: int

    @property
    def lost(self) -> int:
        """Events not seen or not kept (sockets that predate us are not a loss)."""
        return sum(v for k, v in self.loss.items()
                   if k not in ("untracked_close", "suppressed_close")) + self.events_dropped


class TopModel:
    """Turns consecutive samples into frames; remembers only what rates need."""

    def __init__(self) -> None:
        self._taken: float | None = None
        # connection -> (sent, received, retransmits, handshake counted)
        self._seen: dict[Key, tuple[int, int, int, bool]] = {}

    def update(self, sample: Sample) -> Frame:
        window = sample.taken - self._taken if self._taken is not None else None
        if window is not None and window <= 0:
            window = None
        procs: dict[int, ProcRow] = {}
        deltas: dict[int, list[int]] = collections.defaultdict(lambda: [0, 0, 0, 0, 0, 0])
        # per pid: [sent, received, retransmits, connects, accepts, fails]
        seen = self._seen
        now_seen: dict[Key, tuple[int, int, int, bool]] = {}
        # (netns, listening port) -> accept() waits of the connections accepted in the window
        accepted: dict[tuple[int, int], list[float | None]] = collections.defaultdict(list)

        def proc(pid: int, name: str | None) -> ProcRow:
            row = procs.get(pid)
            if row is None:
                user = sample.users.get(pid, "-") if pid else "-"
                row = procs[pid] = ProcRow(pid, name or "?", user)
            return row

        def account(d: dict[str, Any], lifetime: float | None) -> tuple[int, int, bool]:
            """Add one connection's window deltas to its owner; returns its tx/rx deltas."""
            key = conn_key(d)
            pid = d["pid"] or 0
            sent, recv, retr = d["bytes_sent"], d["bytes_received"], d["retransmits"]
            before = seen.get(key)
            counted = before[3] if before else False
            if window is None:
                dtx = drx = 0
            elif before is not None:
                dtx, drx = max(0, sent - before[0]), max(0, recv - before[1])
                deltas[pid][2] += max(0, retr - before[2])
            elif lifetime is not None and lifetime <= window:
                dtx, drx = sent, recv  # opened within the window: all of it is new
                deltas[pid][2] += retr
            else:
                dtx = drx = 0  # predates the window but was not seen: no rate for it
            deltas[pid][0] += dtx
            deltas[pid][1] += drx
            hs = None if counted else handshake_s(d)
            if hs is not None:
                counted = True
                if window is not None and (before is not None or
                                           (lifetime is not None and lifetime <= window)):
                    proc(pid, d["process"]).handshakes.append(hs)
            now_seen[key] = (sent, recv, retr, counted)
            if d.get("rcvq_wait_p50_us") is not None:
                owner = proc(pid, d["process"])
                owner.rcvq_p50_us.append(d["rcvq_wait_p50_us"])
                owner.rcvq_max_us.append(d["rcvq_wait_max_us"])
            return dtx, drx, counted

        for ev in sample.events:
            pid = ev["pid"] or 0
            kind = ev["event"]
            if kind == "connect":
                deltas[pid][3] += 1
            elif kind == "accept":
                deltas[pid][4] += 1
                accepted[(ev["netns"], ev["local_port"])].append(ev.get("accept_wait_us"))
            elif kind == "fail":
                deltas[pid][5] += 1
            elif kind == "close" and ev["role"] != "listener":
                account(ev, ev.get("lifetime_s"))
            proc(pid, ev["process"])  # short-lived connections count even when none is left

        listeners: list[ListenerRow] = []
        for d in sample.connections:
            pid = d["pid"] or 0
            row = proc(pid, d["process"])
            row.states[d["state"]] += 1
            if d["role"] == "listener":  # one of its fds too, without byte rates
                listeners.append(ListenerRow(pid, row.process, d))
                row.connections.append(ConnRow(d))
                continue
            dtx, drx, _ = account(d, d.get("age_s"))
            rates = (dtx / window, drx / window) if window else (None, None)
            row.connections.append(ConnRow(d, *rates))

        host = ProcRow(0, "host", "-")
        for pid, row in procs.items():
            host.states.update(row.states)
            host.handshakes += row.handshakes
            host.rcvq_p50_us += row.rcvq_p50_us
            host.rcvq_max_us += row.rcvq_max_us
            if window:
                sent, recv, retr, out, inc, fail = deltas.get(pid, (0,) * 6)
                row.tx_s, row.rx_s, row.retr_s = sent / window, recv / window, retr / window
                row.out_s, row.in_s, row.fail_s = out / window, inc / window, fail / window
        if window:
            totals = [sum(v[i] for v in deltas.values()) for i in range(6)]
            host.tx_s, host.rx_s, host.retr_s, host.out_s, host.in_s, host.fail_s = (
                t / window for t in totals)

        self._listener_details(listeners, sample.connections, accepted, window)
        self._seen = now_seen
        self._taken = sample.taken
        return Frame(sample.taken, window, list(procs.values()), listeners, host, sample.loss,
                     sample.modes, sample.latency, sample.events_dropped)

    @staticmethod
    def _listener_details(listeners: list[ListenerRow], conns: list[dict[str, Any]],
                          accepted: dict[tuple[int, int], list[float | None]],
                          window: float | None) -> None:
        by_port = {(ln.d["netns"], ln.port): ln for ln in listeners}
        for d in conns:
            ln = by_port.get((d["netns"], d["local_port"]))
            # accepted sockets that predate sockwatch have no known role
            if ln is None or d["role"] in ("listener", "client"):
                continue
            ln.established += 1
        for ln in listeners:
            waits = accepted.get((ln.d["netns"], ln.port), [])
            ln.accept_waits_us = [w for w in waits if w is not None]
            if window:
                ln.accepts_s = len(waits) / window
