#!/usr/bin/env python3
"""How many closes never reach sockwatch's programs, against the kernel's own count.

The README lists a known gap: now and then a client socket closed first (an
orphaned FIN_WAIT) leaves the kernel without its CLOSE record, and the table
keeps the row until a reconciliation removes it. This measures that rate on
the workload that shows it most (the one of ``bench/attribution.py``): forked
children each connect once to a loopback listener, send a byte, close and exit,
50 at a time, and the listener accepts each batch only after its children are
gone, so the server's ACK of each child's FIN waits for the delayed-ACK timer
and the child's socket goes FIN_WAIT1 -> FIN_WAIT2 -> CLOSE in a timer softirq.

Each run is the kernel test's own check (``short_lived_children``, which also
checks that every missed close leaves no row behind) and prints the closes
never seen: the rows the table repaired, retired when a new socket took the
address or removed by a reconciliation. With ``--tracefs`` it also enables the
``sock:inet_sock_set_state`` trace event (TCP only) and turns on
``kernel.bpf_stats_enabled`` for the run, then compares the state changes the
kernel traced with the invocations of the state program (runs plus runs it
skipped as recursion): the difference is events the kernel never handed to
the BPF program at all, which no counter of ours can see. Both settings are
restored afterwards. The trace event's own work shifts timings a little, so
runs without it come first.

Run as root from the checkout:

    PYTHONPATH=. /opt/sockwatch/venv/bin/python bench/missed_closes.py --runs 3 --tracefs
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("SOCKWATCH_BPF_DIR", str(ROOT / "sockwatch" / "bpf_objects"))

from sockwatch.kernel.features import TRACEFS  # noqa: E402
from sockwatch.kernel.loader import LoaderConfig  # noqa: E402
from sockwatch.monitor import Monitor  # noqa: E402
from tests.kernel.test_attribution import (  # noqa: E402
    RING_BYTES, repaired, short_lived_children)

TRACING = Path(TRACEFS)
EVENT = TRACING / "events/sock/inet_sock_set_state"
BPF_STATS = Path("/proc/sys/kernel/bpf_stats_enabled")
TRANSITION = re.compile(rb"oldstate=TCP_\w+ newstate=TCP_\w+")


@contextlib.contextmanager
def kernel_trace() -> Iterator[Path]:
    """The TCP state-change trace event on, and BPF run counting on, for the block;
    yields the trace file. Every setting touched is put back as it was."""
    settings = {EVENT / "filter": "protocol == 6", EVENT / "enable": "1",
                TRACING / "buffer_size_kb": "65536", TRACING / "tracing_on": "1", BPF_STATS: "1"}
    saved = {}
    for f in settings:
        text = f.read_text().strip()
        # "none" reads back for no filter and "0" clears one; sizes read "7 (expanded: 1408)"
        saved[f] = "0" if text == "none" else text if f.name == "filter" else text.split()[0]
    try:
        for f, value in settings.items():
            f.write_text(value + "\n")
        yield TRACING / "trace"
    finally:
        for f in reversed(settings):
            f.write_text(saved[f] + "\n")


def state_invocations(mon: Monitor) -> int:
    """Invocations (runs plus recursion skips) of the first state program."""
    assert mon.probes is not None
    runs = mon.probes.program_runs()
    first = next(name for name in runs if name.startswith("set_state") and "nested" not in name)
    return sum(runs[first])


def one_run(n: int, tracefs: bool) -> str:
    with contextlib.ExitStack() as stack:
        trace = stack.enter_context(kernel_trace()) if tracefs else None
        mon = stack.enter_context(Monitor(LoaderConfig(ringbuf_bytes=RING_BYTES),
                                          closed_capacity=1 << 16))
        if trace is not None:
            trace.write_text("")  # count from here, with the programs attached
            calls0 = state_invocations(mon)
        loss0, repaired0 = mon.loss(), repaired(mon)
        short_lived_children(mon, n)  # also reconciles when a close was missed
        line = ""
        if trace is not None:
            calls = state_invocations(mon) - calls0
            (TRACING / "tracing_on").write_text("0\n")
            traced = len(TRANSITION.findall(trace.read_bytes()))
            line = (f"; kernel traced {traced} TCP state changes, the state program was "
                    f"invoked {calls} times: {traced - calls} never handed to it")
        missed = repaired(mon) - repaired0
        loss = mon.loss()
    lost = loss.ringbuf_full - loss0.ringbuf_full + loss.recursion_misses - loss0.recursion_misses
    return (f"{n} connections ({2 * n} sockets): {missed} closes never seen, each row "
            f"repaired ({100 * missed / (2 * n):.3f} % of sockets), {lost} records counted "
            f"lost{line}")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--connections", type=int, default=10000, help="per run (default 10000)")
    p.add_argument("--runs", type=int, default=3, help="runs without the trace event (default 3)")
    p.add_argument("--tracefs", action="store_true",
                   help="then as many runs with the kernel's trace event as ground truth")
    args = p.parse_args(argv)
    if args.connections < 1 or args.runs < 1:
        p.error("--connections and --runs must be at least 1")
    if args.tracefs and not EVENT.is_dir():
        p.error(f"--tracefs needs {EVENT} (tracefs mounted, the event compiled in)")
    for tracefs in (False, True) if args.tracefs else (False,):
        for i in range(args.runs):
            label = "with trace event" if tracefs else "plain"
            try:
                result = one_run(args.connections, tracefs)
            except BaseException as exc:  # pytest's skip/fail outcomes included
                print(f"run {i + 1} ({label}): failed: {type(exc).__name__}: {exc}")
                return 1
            print(f"run {i + 1} ({label}): {result}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
