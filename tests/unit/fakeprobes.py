"""Return values of the Probes API (sockwatch/kernel/loader.py), fixed by the test.

Unit tests of what sits above the kernel (Monitor.latency, the collector, the
API) need the numbers the maps would hold, not the kernel: a test builds them
as raw histogram slot lists with ``test_latency.hist``/``observe`` and hands
them over here. Nothing here claims the kernel produced them; the kernel
tests do that against real probes.
"""

from __future__ import annotations

import time

from sockwatch import records
from sockwatch.interfaces import InterfaceNames
from sockwatch.kernel.loader import HookChoice, Plan
from sockwatch.kernel.reader import EventReader
from sockwatch.monitor import Monitor


class EmptyRing:
    """A ring buffer nobody wrote to."""

    def drain(self) -> tuple[bytes, list[int], int]:
        return b"", [], 0

    def backlog(self) -> int:
        return 0

    def fill(self) -> list[tuple[str, int, int]]:
        return [("events", 2 << 20, 0), ("rescue", 128 << 10, 0)]

    def wait(self, timeout_s: float) -> None:
        time.sleep(timeout_s)


class FakeProbes:
    socks_capacity = 65536

    def __init__(self, hists: list[list[int]], stack: dict, interface_totals: dict,
                 enabled: bool = True):
        self.stack_enabled = enabled
        self._hists, self._stack, self._totals = hists, stack, interface_totals
        self.ring = EmptyRing()
        hooks = [HookChoice("state", "tp_btf", ("set_state_btf",))]
        if enabled:
            hooks.append(HookChoice("net_dev_queue", "tp_btf", ("dev_queue_btf",)))
        self.plan = Plan("tp_btf", None, hooks)

    def histograms(self) -> list[list[int]]:
        return self._hists

    def stack_histograms(self) -> dict:
        assert self.stack_enabled, "read only while the stack programs are loaded"
        return dict(self._stack)

    def interface_totals(self) -> dict:
        assert self.stack_enabled, "read only while the stack programs are loaded"
        return dict(self._totals)

    # the rest of what the collector reads, all quiet
    def totals(self) -> dict:
        return {}

    def stats(self) -> dict:
        return {s: 0 for s in records.Stat}

    def transitions(self) -> dict:
        return {}

    def skipped_runs(self) -> int:
        return 0

    def release_held(self) -> None:
        """Nothing is held: the ring is empty."""


def monitor_over(probes: FakeProbes, read_links) -> Monitor:
    """A Monitor wired to ``probes`` as start() would, interface names read by ``read_links``."""
    mon = Monitor()
    mon.probes = probes  # type: ignore[assignment]
    mon._reader = EventReader(probes)  # type: ignore[arg-type]
    mon.interfaces = InterfaceNames(mon.netns, read_links)
    return mon
