"""Monitor.run's walk period: walks may take only WALK_CPU_SHARE of a core.

The walk itself is replaced by a function that burns a known amount of CPU:
what is under test is the scheduling around it, not the kernel walk (the
kernel tests run real ones).
"""

from __future__ import annotations

import threading
import time

from fakeprobes import FakeProbes, monitor_over
from sockwatch import monitor


def walks_during(seconds: float, walk_cpu_s: float) -> tuple[list[float], float]:
    """Start times of the walks run() makes in ``seconds`` with a 10 ms period,
    each walk burning ``walk_cpu_s`` of CPU, and the cost run() recorded."""
    mon = monitor_over(FakeProbes([], {}, {}, enabled=False), lambda ns: {})
    starts: list[float] = []

    def walk() -> int:
        starts.append(time.monotonic())
        end = time.thread_time() + walk_cpu_s
        while time.thread_time() < end:
            pass
        return 0

    mon.reconcile = walk  # type: ignore[method-assign]
    stop = threading.Event()
    timer = threading.Timer(seconds, stop.set)
    timer.start()
    try:
        mon.run(stop, poll_interval=0.01, reconcile_interval=0.01)
    finally:
        timer.cancel()
    return starts, mon.walk_cpu_s


def test_cheap_walks_keep_the_configured_period():
    starts, cost = walks_during(0.6, 0.0)
    assert len(starts) >= 20 and cost < 0.01


def test_a_walk_over_its_cpu_share_stretches_the_wait_before_the_next():
    starts, cost = walks_during(1.5, 0.02)
    stretched = 0.02 / monitor.WALK_CPU_SHARE  # 0.4 s, not the configured 10 ms
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert 2 <= len(starts) <= 4 and cost >= 0.02
    assert all(gap >= stretched for gap in gaps), gaps
