#!/usr/bin/env python3
"""Benchmark of the per-packet stack-latency probes (stack.bpf.o).

Traffic crosses a veth pair between two network namespaces this script makes
(and removes), between bench/loadgen.c processes, one in each namespace:

- bulk: one connection writing 64 KiB chunks for --seconds (throughput, B/s);
- ping-pong: one connection sending --size bytes and waiting for them back
  (round trips/s): the small-packet case, where a fixed cost per packet shows.

Each round runs both workloads with the lifecycle probes only
(``LoaderConfig(stack_latency=False)``: the baseline) and, right before or
after (the order alternates), with the stack probes as well (the default), so
the comparison isolates what the stack programs add. The machine this was
written on is shared (2 vCPUs, load average 5-8 from other work): throughput
swings by 2-3x within a minute. So the ratio reported is the median over
rounds of with / baseline of the same round (back-to-back runs see the same
neighbours), with the plain medians beside it. Targets: >= 0.95 bulk, >= 0.90
ping-pong.

The cost per packet comes from a separate pass with the kernel's BPF run-time
statistics on (sysctl kernel.bpf_stats_enabled=1, restored afterwards; the
statistics themselves cost two clock reads per run, so they stay off while
throughput is measured): run_time_ns / run_cnt per stack program. Every TCP
data packet across the pair runs the six per-packet hooks once each
(net_dev_queue, net_dev_start_xmit, net_dev_xmit on the sender;
netif_receive_skb, tcp_probe, sk_data_ready on the receiver): their summed mean
is the added CPU time per packet. The two per-system-call hooks
(tcp_sendmsg_locked, sock_recv_length) are shown per call. The programs run
for the whole host's traffic, so the means include other traffic too.

Run as root from the checkout:

    PYTHONPATH=. /opt/sockwatch/venv/bin/python bench/stack.py --seconds 1.5 --rounds 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

from sockwatch.kernel.loader import LoaderConfig, load

HERE = Path(__file__).resolve().parent
TARGET_BULK = 0.95
TARGET_PINGPONG = 0.90
PORT = 5301
PER_PACKET = ("dev_queue", "start_xmit", "xmit", "receive", "tcp_rcv", "data_ready")
PER_CALL = ("sendmsg", "read")
STATS_SYSCTL = Path("/proc/sys/kernel/bpf_stats_enabled")


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


class Pair:
    """Namespaces a and b joined by a veth pair, removed by close()."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.a, self.b = f"swbench-{tag}-a", f"swbench-{tag}-b"
        self.addr_b = "10.215.0.2"
        sh("ip", "netns", "add", self.a)
        sh("ip", "netns", "add", self.b)
        sh("ip", "link", "add", f"swba{tag}", "netns", self.a, "type", "veth",
           "peer", "name", f"swbb{tag}", "netns", self.b)
        for ns, dev, addr in ((self.a, f"swba{tag}", "10.215.0.1"),
                              (self.b, f"swbb{tag}", self.addr_b)):
            sh("ip", "-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")

    def close(self) -> None:
        for ns in (self.a, self.b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def run_load(pair: Pair, loadgen: str, client: list[str], serve_size: int) -> dict:
    """One server in b, one client in a; the client's JSON result."""
    server = subprocess.Popen(
        ["ip", "netns", "exec", pair.b, loadgen, "serve", str(PORT), str(serve_size)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert json.loads(server.stdout.readline()).get("ready")
        out = subprocess.run(["ip", "netns", "exec", pair.a, loadgen, *client],
                             check=True, capture_output=True, text=True).stdout
        server.wait(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    return json.loads(out)


def workloads(pair: Pair, loadgen: str, seconds: float, size: int) -> dict[str, float]:
    bulk = run_load(pair, loadgen, ["bulk", pair.addr_b, str(PORT), str(seconds)], 0)
    pp = run_load(pair, loadgen,
                  ["pingpong", pair.addr_b, str(PORT), str(size), str(seconds)], size)
    return {"bulk": bulk["rate"], "pingpong": pp["rate"]}


def measure(pair: Pair, loadgen: str, stack: bool, seconds: float, size: int) -> dict[str, float]:
    probes = load(LoaderConfig(stack_latency=stack))
    try:
        assert probes.stack_enabled == stack
        return workloads(pair, loadgen, seconds, size)
    finally:
        probes.close()


def costs(pair: Pair, loadgen: str, seconds: float, size: int) -> dict[str, tuple[int, int]]:
    """(run_time_ns, run_cnt) per stack program over one pass of both workloads."""
    old = STATS_SYSCTL.read_text()
    STATS_SYSCTL.write_text("1\n")
    try:
        probes = load(LoaderConfig())
        try:
            workloads(pair, loadgen, seconds, size)
            return {name.rsplit("_", 1)[0]: v for name, v in probes.stack_program_stats().items()}
        finally:
            probes.close()
    finally:
        STATS_SYSCTL.write_text(old)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=1.5, help="length of each run")
    ap.add_argument("--rounds", type=int, default=8, help="baseline/with pairs per workload")
    ap.add_argument("--size", type=int, default=64, help="ping-pong message size in bytes")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/stack.py: needs root (BPF programs, network namespaces)", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory() as tmp:
        loadgen = os.path.join(tmp, "loadgen")
        sh("gcc", "-O2", "-o", loadgen, str(HERE / "loadgen.c"))
        pair = Pair()
        try:
            runs: dict[bool, list[dict[str, float]]] = {False: [], True: []}
            for r in range(args.rounds):
                for stack in ((False, True) if r % 2 == 0 else (True, False)):
                    runs[stack].append(measure(pair, loadgen, stack, args.seconds, args.size))
            cost = costs(pair, loadgen, args.seconds, args.size)
        finally:
            pair.close()

    result: dict = {"seconds": args.seconds, "rounds": args.rounds, "size": args.size}
    for w, target in (("bulk", TARGET_BULK), ("pingpong", TARGET_PINGPONG)):
        base = statistics.median(r[w] for r in runs[False])
        with_ = statistics.median(r[w] for r in runs[True])
        paired = statistics.median(a[w] / b[w] for a, b in zip(runs[True], runs[False]))
        result[w] = {"baseline": base, "with_stack": with_, "ratio": paired,
                     "ratio_of_medians": with_ / base,
                     "target": target, "runs_baseline": [r[w] for r in runs[False]],
                     "runs_with_stack": [r[w] for r in runs[True]]}
    mean = {p: (t / n if n else 0.0) for p, (t, n) in cost.items()}
    result["ns_per_run"] = mean
    result["runs"] = {p: n for p, (_, n) in cost.items()}
    result["ns_per_packet"] = sum(mean.get(p, 0.0) for p in PER_PACKET)
    result["ns_per_syscall"] = {p: mean.get(p, 0.0) for p in PER_CALL}
    if args.json:
        json.dump(result, sys.stdout, indent=1)
        print()
        return 0
    print(f"stack probes, veth pair, {args.rounds} rounds x {args.seconds:g} s per run")
    for w, unit in (("bulk", "MB/s"), ("pingpong", "round trips/s")):
        r, scale = result[w], (1e-6 if w == "bulk" else 1.0)
        verdict = "ok" if r["ratio"] >= r["target"] else "BELOW TARGET"
        print(f"  {w:<9} median baseline {r['baseline'] * scale:10.1f} {unit:<14} with stack "
              f"{r['with_stack'] * scale:10.1f}  paired ratio {r['ratio']:.3f} "
              f"(target >= {r['target']:.2f}: {verdict}; ratio of medians "
              f"{r['ratio_of_medians']:.3f})")
    print("  cost per run (bpf_stats, host-wide means):")
    for p in PER_PACKET + PER_CALL:
        print(f"    {p:<11} {mean.get(p, 0.0):7.1f} ns  x {result['runs'].get(p, 0)} runs")
    print(f"  added per TCP data packet (the six per-packet hooks): "
          f"{result['ns_per_packet']:.0f} ns")
    return 0


if __name__ == "__main__":
    sys.exit(main())
