"""Running totals behind the Prometheus counters, bounded in label values.

Counters must only go up, and label sets must stay small. Both hold because a
label value, once admitted, keeps its own series for the life of the process
(a sticky allow-list): the first ``cap`` process names or ports get their own
label, later ones are folded into ``other`` and counted. Admission order, not
rank, decides, so no series ever moves from one label to another.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

OTHER = "other"


class LabelCap:
    """The sticky allow-list for one label."""

    def __init__(self, cap: int):
        self.cap = cap
        self._admitted: set[str] = set()
        self.folded = 0  # observations whose value was folded into OTHER

    def __call__(self, value: str) -> str:
        if value in self._admitted:
            return value
        if len(self._admitted) < self.cap:
            self._admitted.add(value)
            return value
        self.folded += 1
        return OTHER


class Log2Histogram:
    """Counts in power-of-two buckets from 1 µs to about a minute, and a sum.

    The same bucket layout the kernel-side histograms use, so dashboards
    treat every latency alike.
    """

    BOUNDS_S = tuple(2**k / 1e6 for k in range(27))  # 1 µs .. 67 s

    def __init__(self) -> None:
        self.buckets = [0] * (len(self.BOUNDS_S) + 1)  # last is +Inf
        self.count = 0
        self.sum_s = 0.0

    def observe_ns(self, ns: int) -> None:
        us_up = -(-max(ns, 0) // 1000)  # the smallest bound >= ns is 2**k >= us_up
        slot = min(max(us_up - 1, 0).bit_length(), len(self.BOUNDS_S))
        self.buckets[slot] += 1
        self.count += 1
        self.sum_s += ns / 1e9

    def cumulative(self) -> list[tuple[str, int]]:
        """Prometheus ``le`` buckets: (upper bound, count at or below it)."""
        out, running = [], 0
        for bound, n in zip(self.BOUNDS_S + (float("inf"),), self.buckets):
            running += n
            out.append(("+Inf" if bound == float("inf") else f"{bound:.6g}", running))
        return out


@dataclass
class ByteTotals:
    sent: int = 0
    received: int = 0
    retransmits: int = 0


@dataclass
class Totals:
    """What ended or opened so far, by (folded) process and result or port."""

    processes: LabelCap
    ports: LabelCap
    connects: collections.Counter = field(default_factory=collections.Counter)  # (proc, result)
    accepts: collections.Counter = field(default_factory=collections.Counter)  # (proc, port)
    closed_bytes: dict[str, ByteTotals] = field(default_factory=dict)  # proc -> totals
    handshake: dict[str, Log2Histogram] = field(default_factory=dict)  # role -> histogram
    lifetime: dict[str, Log2Histogram] = field(default_factory=dict)  # role -> histogram

    @classmethod
    def with_caps(cls, top_processes: int, top_ports: int) -> "Totals":
        return cls(LabelCap(top_processes), LabelCap(top_ports))

    def histogram(self, family: dict[str, Log2Histogram], role: str) -> Log2Histogram:
        if role not in family:
            family[role] = Log2Histogram()
        return family[role]

    def bytes_for(self, process: str) -> ByteTotals:
        key = self.processes(process)
        if key not in self.closed_bytes:
            self.closed_bytes[key] = ByteTotals()
        return self.closed_bytes[key]
