"""Bounded labels and histogram buckets for the exporter.

Counters must only go up, and label sets must stay small. Both hold because a
label value, once admitted, keeps its own series for the life of the process
(a sticky allow-list): the first ``cap`` process names or ports get their own
label, later ones are folded into ``other`` and counted. Admission order, not
rank, decides, so no series ever moves from one label to another.
"""

from __future__ import annotations

from sockwatch.records import HIST_SLOTS, HIST_STRIDE

OTHER = "other"
# Upper bounds of the kernel's log2 slots, in seconds: 2**k microseconds.
BOUNDS_S = tuple(2**k / 1e6 for k in range(HIST_SLOTS - 1))


class LabelCap:
    """The sticky allow-list for one label."""

    def __init__(self, cap: int):
        self.cap = cap
        self._admitted: set[str] = set()
        self.folded = 0  # values folded into OTHER (counted once each)
        self._folded_values: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self._admitted:
            return value
        if len(self._admitted) < self.cap:
            self._admitted.add(value)
            return value
        if value not in self._folded_values and len(self._folded_values) < 65536:
            self._folded_values.add(value)
            self.folded += 1
        return OTHER


def cumulative_buckets(slots: list[int]) -> tuple[list[tuple[str, int]], float]:
    """Kernel histogram slots -> Prometheus ``le`` buckets (cumulative) and the sum in seconds.

    ``slots`` is one histogram as the kernel lays it out: HIST_SLOTS counts
    (slot k: at most 2**k us; the last: larger) and, at HIST_STRIDE - 1, the
    sum in nanoseconds.
    """
    if len(slots) != HIST_STRIDE:
        raise ValueError(f"a kernel histogram has {HIST_STRIDE} slots, got {len(slots)}")
    out, running = [], 0
    for bound, count in zip(BOUNDS_S, slots):
        running += count
        out.append((f"{bound:.6g}", running))
    running += slots[HIST_SLOTS - 1]
    out.append(("+Inf", running))
    return out, slots[HIST_STRIDE - 1] / 1e9
